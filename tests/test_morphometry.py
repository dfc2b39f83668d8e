"""Morphometry on constructed geometry: known wedge, slip, lordosis and change between visits."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spinecohort import morphometry as mm
from spinecohort.tasks import TASK_NAMES

SPACING = (0.8, 0.5)  # anisotropic on purpose: (row, col) mm per pixel


def body_mm(bottom_row: float, ant_col: float, ha: float, hp: float, depth: float, tilt_deg: float = 0.0) -> np.ndarray:
    """Corners SA, SP, IP, IA (mm, (row, col)) of a body with a flat inferior endplate in its own
    frame, rotated by ``tilt_deg`` about its inferior-anterior corner (positive: posterior end up)."""
    local = np.array([[0.0, ha], [depth, hp], [depth, 0.0], [0.0, 0.0]])  # (x posterior, y up)
    t = math.radians(tilt_deg)
    x = local[:, 0] * math.cos(t) - local[:, 1] * math.sin(t)
    y = local[:, 0] * math.sin(t) + local[:, 1] * math.cos(t)
    return np.stack([bottom_row - y, ant_col + x], axis=1)


def to_px(quad_mm: np.ndarray) -> np.ndarray:
    return quad_mm / np.asarray(SPACING)


def record(vertebra_id: int, level: str | None, quad_mm: np.ndarray, slices=(5, 6, 7), centroid_slice=6.0) -> dict:
    px = to_px(quad_mm)
    return {"vertebra_id": vertebra_id, "level": level, "centroid_slice": centroid_slice,
            "polygons": [{"slice": s, "corners": [float(v) for v in px.reshape(-1)]} for s in slices]}


def column(levels=("L1", "L2", "L3", "L4", "L5", "S1"), height=25.0, disc=10.0, depth=35.0, overrides=None):
    """Straight column, cranial first, S1 lowest; ``overrides`` level -> corners in mm."""
    overrides = overrides or {}
    out, bottom = [], 400.0
    for i, level in enumerate(reversed(levels)):  # caudal first: vertebra_id 0 = lowest
        quad = overrides.get(level, body_mm(bottom, 100.0, height, height, depth))
        out.append(record(i, level, quad))
        bottom -= height + disc
    return out


def by(rows, kind, level):
    return next(r for r in rows if r["kind"] == kind and r["level"] == level)


def test_body_heights_depth_in_mm_with_anisotropic_pixels():
    rows = mm.scan_morphometry(column(), SPACING)
    l3 = by(rows, "vertebra", "L3")
    assert l3["height_anterior_mm"] == pytest.approx(25.0)
    assert l3["height_middle_mm"] == pytest.approx(25.0)
    assert l3["height_posterior_mm"] == pytest.approx(25.0)
    assert l3["depth_mm"] == pytest.approx(35.0)
    assert l3["slice"] == 6 and l3["genant_grade"] == 0 and l3["morphometric_fracture"] is False
    disc = by(rows, "disc", "L3-L4")
    assert disc["height_anterior_mm"] == pytest.approx(10.0) and disc["height_posterior_mm"] == pytest.approx(10.0)
    assert disc["disc_height_index"] == pytest.approx(20.0 / 35.0)
    assert disc["endplate_angle_deg"] == pytest.approx(0.0, abs=1e-9)
    assert disc["slip_mm"] == pytest.approx(0.0, abs=1e-9) and disc["meyerding_grade"] == 0


def test_wedge_of_known_ratio_is_graded_by_height_loss():
    # L2 anterior 18 mm, posterior 25 mm: wedge ratio 0.72, 28 % loss -> Genant grade 2
    bottom_l2 = 400.0 - 4 * 35.0
    wedge = body_mm(bottom_l2, 100.0, 18.0, 25.0, 35.0)
    rows = mm.scan_morphometry(column(overrides={"L2": wedge}), SPACING)
    l2 = by(rows, "vertebra", "L2")
    assert l2["wedge_ratio"] == pytest.approx(18.0 / 25.0)
    assert l2["height_middle_mm"] == pytest.approx(21.5)
    assert l2["height_loss"] == pytest.approx(0.28) and l2["height_loss_kind"] == "wedge"
    assert l2["genant_grade"] == 2 and l2["morphometric_fracture"] is True
    assert "not a diagnosis" in l2["note"]
    assert by(rows, "vertebra", "L3")["genant_grade"] == 0


def test_crush_against_neighbours_and_genant_bands():
    bottom_l3 = 400.0 - 3 * 35.0
    crushed = body_mm(bottom_l3, 100.0, 14.0, 14.0, 35.0)  # 44 % lower than both neighbours
    rows = mm.scan_morphometry(column(overrides={"L3": crushed}), SPACING)
    l3 = by(rows, "vertebra", "L3")
    assert l3["crush_ratio"] == pytest.approx(14.0 / 25.0)
    assert l3["crush_ratio_above"] == pytest.approx(14.0 / 25.0) and l3["crush_ratio_below"] == pytest.approx(14.0 / 25.0)
    l4 = by(rows, "vertebra", "L4")
    assert l4["crush_ratio_above"] == pytest.approx(25.0 / 14.0) and l4["crush_ratio_below"] == pytest.approx(1.0)
    assert l4["crush_ratio"] == pytest.approx(25.0 / 19.5)
    assert l3["height_loss_kind"] == "crush" and l3["genant_grade"] == 3
    assert [mm.genant_grade(x) for x in (0.1, 0.22, 0.3, 0.41)] == [0, 1, 2, 3]
    assert by(rows, "vertebra", "S1")["genant_grade"] is not None  # outside the range: NaN, typed later
    assert math.isnan(by(rows, "vertebra", "S1")["genant_grade"])


def test_25_percent_anterior_slip_and_meyerding():
    depth = 35.0
    slipped = body_mm(400.0 - 35.0, 100.0 - 0.25 * depth, 25.0, 25.0, depth)  # L5 forward on S1
    rows = mm.scan_morphometry(column(overrides={"L5": slipped}), SPACING)
    disc = by(rows, "disc", "L5-S1")
    assert disc["slip_mm"] == pytest.approx(0.25 * depth)
    assert disc["slip_pct"] == pytest.approx(25.0)
    assert disc["meyerding_grade"] == 1
    assert [mm.meyerding_grade(x) for x in (2.0, 30.0, -30.0, 60.0, 90.0, 120.0)] == [0, 2, 2, 3, 4, 5]
    # retrolisthesis: negative slip
    back = body_mm(400.0 - 35.0, 100.0 + 3.5, 25.0, 25.0, depth)
    disc = by(mm.scan_morphometry(column(overrides={"L5": back}), SPACING), "disc", "L5-S1")
    assert disc["slip_mm"] == pytest.approx(-3.5) and disc["slip_pct"] == pytest.approx(-10.0)


@pytest.mark.parametrize("mirror", [False, True])
def test_known_lordosis_angle_any_storage_orientation(mirror):
    # S1's superior endplate tilted 40 deg (posterior end up), L1 level: lordosis +40 deg
    s1 = body_mm(400.0, 100.0, 25.0, 25.0, 35.0, tilt_deg=40.0)
    quads = {"S1": s1}
    recs = column(overrides=quads)
    if mirror:  # stored with cols running posterior -> anterior: corner names stay anatomical
        for r in recs:
            for p in r["polygons"]:
                c = np.asarray(p["corners"]).reshape(4, 2)
                c[:, 1] = 1000.0 - c[:, 1]
                p["corners"] = list(c.reshape(-1))
    rows = mm.scan_morphometry(recs, SPACING)
    scan = by(rows, "scan", "L1-S1")
    assert scan["lordosis_deg"] == pytest.approx(40.0)
    assert scan["in_view"] == "L1,L2,L3,L4,L5,S1"
    assert by(rows, "disc", "L5-S1")["endplate_angle_deg"] == pytest.approx(40.0)


def test_no_s1_in_view_lordosis_nan_with_reason():
    rows = mm.scan_morphometry(column(levels=("T12", "L1", "L2", "L3")), SPACING)
    scan = by(rows, "scan", "L1-S1")
    assert math.isnan(scan["lordosis_deg"])
    assert "S1 not in view" in scan["note"] and scan["in_view"] == "T12,L1,L2,L3"


def test_a_weakly_detected_s1_names_levels_but_is_not_measured():
    recs = column(overrides={"S1": body_mm(400.0, 100.0, 25.0, 25.0, 35.0, tilt_deg=40.0)})
    for r in recs:
        r["found_at_low_threshold"] = r["level"] == "S1"
    rows = mm.scan_morphometry(recs, SPACING)
    scan, disc = by(rows, "scan", "L1-S1"), by(rows, "disc", "L5-S1")
    assert math.isnan(scan["lordosis_deg"]) and "lower threshold" in scan["note"]
    assert math.isnan(disc["endplate_angle_deg"]) and disc["note"] == mm.WEAK_NOTE
    assert by(rows, "vertebra", "S1")["note"] == mm.WEAK_NOTE
    assert np.isfinite(by(rows, "disc", "L4-L5")["endplate_angle_deg"])  # the rest is measured as before
    for r in recs:
        r["found_at_low_threshold"] = float("nan")  # a null cell is a normal detection
    assert by(mm.scan_morphometry(recs, SPACING), "scan", "L1-S1")["lordosis_deg"] == pytest.approx(40.0)


def test_mid_slice_is_nearest_polygon_to_centroid():
    rec = record(0, "L3", body_mm(300.0, 100.0, 25.0, 25.0, 35.0), slices=(3, 4, 9), centroid_slice=7.2)
    assert mm.scan_morphometry([rec], SPACING)[0]["slice"] == 9


def test_bodies_cut_by_the_image_border_are_not_measured():
    # L1 pushed up so its superior corners lie above row 0; the image ends above S1's inferior endplate
    recs = column(overrides={"L1": body_mm(20.0, 100.0, 25.0, 25.0, 35.0)})
    shape = (490, 400)  # rows, cols: S1's inferior corners are at row 500
    assert all(np.isfinite(r["height_anterior_mm"]) for r in mm.scan_morphometry(recs, SPACING)
               if r["kind"] == "vertebra" and r["level"] != "S1")
    rows = mm.scan_morphometry(recs, SPACING, shape)
    for level in ("L1", "S1"):
        cut = by(rows, "vertebra", level)
        assert math.isnan(cut["height_anterior_mm"]) and math.isnan(cut["wedge_ratio"]) and cut["note"] == mm.CUT_NOTE
    l2 = by(rows, "vertebra", "L2")
    assert math.isnan(l2["crush_ratio_above"]) and l2["crush_ratio"] == pytest.approx(1.0)  # from L3 alone
    assert by(rows, "disc", "L5-S1")["height_anterior_mm"] == pytest.approx(10.0)  # S1's superior endplate is in view
    scan = by(rows, "scan", "L1-S1")
    assert math.isnan(scan["lordosis_deg"]) and "L1 is cut by the image border" in scan["note"]
    # the cohort table takes the shape from the scans table (ingest's rows, cols)
    scans = scans_frame([("p1", "v1")]).assign(rows=shape[0], cols=shape[1])
    morph = mm.cohort_morphometry(scans, vertebrae_frame({"s0": recs}))
    cut = morph[(morph["kind"] == "vertebra") & morph["level"].isin(["L1", "S1"])]
    assert cut["height_posterior_mm"].isna().all() and set(cut["note"]) == {mm.CUT_NOTE}


def scans_frame(visits, dates=None):
    rows = []
    for i, (subject, visit) in enumerate(visits):
        rows.append({"scan_id": f"s{i}", "subject_id": subject, "site": "A", "visit": visit, "status": "ok",
                     "pixel_spacing_mm": [SPACING[0], SPACING[1]]})
        if dates:
            rows[-1]["visit_date"] = dates[i]
    return pd.DataFrame(rows)


def vertebrae_frame(per_scan):
    rows = []
    for scan_id, recs in per_scan.items():
        rows += [{"scan_id": scan_id, **r} for r in recs]
    return pd.DataFrame(rows)


def test_two_visits_known_change_matched_by_label():
    scans = scans_frame([("p1", "v2"), ("p1", "v1"), ("p2", "v1")], dates=["2021-03-11", "2020-03-11", "2020-01-01"])
    bottom_l2 = 400.0 - 4 * 35.0
    first = column()
    # second visit: L2 lost 6 mm anteriorly (24 % -> Genant 1), T12 came into view and every
    # vertebra_id shifts by one: levels must be matched by label
    later = column(levels=("T12", "L1", "L2", "L3", "L4", "L5", "S1"),
                   overrides={"L2": body_mm(bottom_l2, 100.0, 19.0, 25.0, 35.0)})
    later = [{**r, "vertebra_id": r["vertebra_id"] + 1} for r in later]
    vertebrae = vertebrae_frame({"s0": later, "s1": first, "s2": first})
    morph = mm.cohort_morphometry(scans, vertebrae)
    assert list(morph.columns) == mm.MORPHOMETRY_COLUMNS
    discs = pd.DataFrame([{"scan_id": "s1", "level": "L4-L5", **{t: 1 for t in TASK_NAMES}},
                          {"scan_id": "s0", "level": "L4-L5", **{t: 1 for t in TASK_NAMES}, "Pfirrmann": 3}])
    change = mm.cohort_change(scans, morph, discs)
    assert list(change.columns) == list(mm.CHANGE_DTYPES)
    assert set(change["subject_id"]) == {"p1"}  # p2 has one visit
    l2 = change[(change["kind"] == "vertebra") & (change["level"] == "L2")].iloc[0]
    assert (l2["visit_from"], l2["visit_to"], l2["scan_id_from"], l2["scan_id_to"]) == ("v1", "v2", "s1", "s0")
    assert l2["interval_days"] == 365
    assert l2["delta_height_anterior_mm"] == pytest.approx(-6.0)
    assert l2["delta_height_posterior_mm"] == pytest.approx(0.0, abs=1e-9)
    assert l2["genant_grade_from"] == 0 and l2["genant_grade_to"] == 1 and l2["delta_genant_grade"] == 1
    assert bool(l2["incident_fracture"]) is True
    disc = change[(change["kind"] == "disc") & (change["level"] == "L4-L5")].iloc[0]
    assert disc["Pfirrmann_from"] == 1 and disc["Pfirrmann_to"] == 3 and disc["delta_Pfirrmann"] == 2
    assert "T12" not in set(change["level"])  # only in view at one visit
    assert change["interval_days"].dtype == "Int64" and change["delta_height_anterior_mm"].dtype == "float64"


def test_visits_ordered_by_name_without_dates_and_empty_typed_tables():
    scans = scans_frame([("p1", "v10"), ("p1", "v2")])
    morph = mm.cohort_morphometry(scans, vertebrae_frame({"s0": column(), "s1": column()}))
    change = mm.cohort_change(scans, morph, None)
    assert set(change["visit_from"]) == {"v2"} and change["interval_days"].isna().all()
    empty = mm.cohort_change(scans.iloc[:1], morph, None)
    assert len(empty) == 0 and list(empty.columns) == list(mm.CHANGE_DTYPES)
    assert str(empty["delta_genant_grade"].dtype) == "Int64"


def test_failed_scans_and_bad_spacing_keep_fixed_dtypes():
    scans = scans_frame([("p1", "v1"), ("p2", "v1"), ("p3", "v1")])
    scans.loc[1, "status"] = "failed"
    scans.at[2, "pixel_spacing_mm"] = None
    morph = mm.cohort_morphometry(scans, vertebrae_frame({"s0": column(levels=("L4", "L5"))}))
    assert set(morph["scan_id"]) == {"s0", "s2"}
    bad = morph[morph["scan_id"] == "s2"].iloc[0]
    assert bad["kind"] == "scan" and "scan s2" in bad["note"] and "pixel spacing" in bad["note"]
    assert {c: str(t) for c, t in morph.dtypes.items()} == {c: t for c, t in mm.MORPHOMETRY_DTYPES.items()}
    nothing = mm.cohort_morphometry(scans.iloc[:0], vertebrae_frame({}))
    assert len(nothing) == 0 and {c: str(t) for c, t in nothing.dtypes.items()} == mm.MORPHOMETRY_DTYPES


def test_report_sections_with_fracture_crop_and_change(tmp_path):
    from spinecohort.ingest import Series, save_series
    from spinecohort.report import render_report
    from spinecohort.report import morphometry_context

    scans = scans_frame([("p1", "v1"), ("p1", "v2")], dates=["2020-01-01", "2020-07-01"])
    bottom_l2 = 400.0 - 4 * 35.0
    wedge = body_mm(bottom_l2, 100.0, 18.0, 25.0, 35.0)
    vertebrae = vertebrae_frame({"s0": column(), "s1": column(overrides={"L2": wedge})})
    morph = mm.cohort_morphometry(scans, vertebrae)
    change = mm.cohort_change(scans, morph, None)
    series_dir = tmp_path / "series"
    volume = np.random.default_rng(0).random((10, 560, 400)).astype(np.float32)
    save_series(Series(volume, np.eye(4), {"pixel_spacing_mm": list(SPACING), "slice_spacing_mm": 4.0}),
                series_dir / "s1.npz")
    context = morphometry_context(morph, change, vertebrae, series_dir)
    assert [(f["scan_id"], f["level"], f["grade"]) for f in context["fractures"]] == [("s1", "L2", 2)]
    assert context["fractures"][0]["crop"].startswith("data:image/png;base64,")
    out = render_report(tmp_path / "v.html", scans=scans, discs=None, morphometry=context)
    html = out.read_text()
    for text in ('id="morphometry"', 'id="change"', "not a diagnosis", "Incident morphometric fractures",
                 'alt="fracture crop s1 L2"', "182 (182\u2013182) days"):
        assert text in html, text
    assert morphometry_context(morph.iloc[:0]) is None


def test_evaluation_pairs_and_bland_altman():
    from spinecohort.detect import DetectedVertebra
    from spinecohort.evaluation import DetectionCase, EvalBody
    from spinecohort.evaluation.morphometry import agreement, measure_pairs

    stats = agreement([1.0, -1.0, 2.0, 2.0])
    assert stats["n"] == 4 and stats["mad"] == pytest.approx(1.5) and stats["bias"] == pytest.approx(1.0)
    assert stats["loa_high"] - stats["bias"] == pytest.approx(1.96 * np.std([1, -1, 2, 2], ddof=1))
    truth = to_px(body_mm(300.0, 100.0, 25.0, 25.0, 35.0))
    polys = {s: truth for s in (4, 5, 6)}
    case = DetectionCase("c", np.zeros((8, 600, 400), np.float32), SPACING, 4.0,
                         [EvalBody((5.0, *truth.mean(0)), polys, "L3")])
    taller = truth + np.array([[-1.0, 0], [-1.0, 0], [0, 0], [0, 0]])  # superior corners 1 px (0.8 mm) up
    det = DetectedVertebra({4: taller, 5: taller}, (4.6, *truth.mean(0)), 0.9)
    (pair,) = measure_pairs([det], case)
    assert pair["slice_pipeline"] == 5 and pair["slice_reference"] == 5
    assert pair["pipeline"]["height_anterior_mm"] - pair["reference"]["height_anterior_mm"] == pytest.approx(0.8)
    assert pair["pipeline"]["depth_mm"] == pytest.approx(pair["reference"]["depth_mm"])
    assert pair["cut"] is False
    # a detection reaching past the image's top edge is not measured, and counted as such
    above = taller - np.array([truth[0, 0] + 1.0, 0.0])  # superior corners at row -1
    case.bodies[0].centroid = (5.0, *above.mean(0))
    (pair,) = measure_pairs([DetectedVertebra({5: above}, (5.0, *above.mean(0)), 0.9)], case)
    assert pair["cut"] is True and math.isnan(pair["pipeline"]["height_anterior_mm"])


def test_unlabelled_bodies_get_heights_only_and_sacral_segments_none():
    recs = column(levels=("L4", "L5", "S1"))
    recs += [record(7, "S2", body_mm(450.0, 100.0, 20.0, 20.0, 30.0)), record(8, None, body_mm(120.0, 100.0, 25.0, 25.0, 35.0))]
    rows = mm.scan_morphometry(recs, SPACING)
    bodies = [r for r in rows if r["kind"] == "vertebra"]
    assert [r["level"] for r in bodies] == ["L4", "L5", "S1", "S2", None]
    assert bodies[4]["height_anterior_mm"] == pytest.approx(25.0) and math.isnan(bodies[4]["crush_ratio"])
    # fused sacral segments have no inferior endplate: no body measures, said in the note ...
    for sacral in bodies[2:4]:
        assert math.isnan(sacral["height_anterior_mm"]) and math.isnan(sacral["depth_mm"])
        assert sacral["note"] == mm.SACRAL_NOTE
    # ... while S1's superior endplate still bounds the L5-S1 disc
    assert [r["level"] for r in rows if r["kind"] == "disc"] == ["L4-L5", "L5-S1"]
    assert np.isfinite(by(rows, "disc", "L5-S1")["height_anterior_mm"])


def render_bodies(quads_mm, shape=(200, 120), spacing=SPACING, cortex_mm=1.0, supersample=4) -> np.ndarray:
    """One sagittal slice: convex bodies (marrow 1.0 inside a 1 mm dark cortex 0.15) on disc
    signal 0.6, each pixel the mean of ``supersample``**2 point samples, so an edge at a
    sub-pixel position shows as a partial-volume pixel."""
    rows, cols = shape
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5
    r = (np.arange(rows)[:, None] + sub[None, :]).reshape(-1) * spacing[0]
    c = (np.arange(cols)[:, None] + sub[None, :]).reshape(-1) * spacing[1]
    rr, cc = np.meshgrid(r, c, indexing="ij")
    img = np.full(rr.shape, 0.6)
    for q in quads_mm:
        # signed distance to a convex polygon: the largest distance outside any edge line
        edge = np.roll(q, -1, axis=0) - q
        normal = np.stack([edge[:, 1], -edge[:, 0]], axis=1) / np.linalg.norm(edge, axis=1)[:, None]
        if np.dot(q.mean(0) - q[0], normal[0]) > 0:
            normal = -normal
        d = np.max([(rr - a[0]) * nr + (cc - a[1]) * nc for a, (nr, nc) in zip(q, normal)], axis=0)
        img = np.where(d <= 0, np.where(d > -cortex_mm, 0.15, 1.0), img)
    return img.reshape(rows, supersample, cols, supersample).mean(axis=(1, 3)).astype(np.float32)


def endplate_column():
    """Four 25 mm bodies 10 mm apart, endplates at sub-pixel rows, one tilted 4 degrees."""
    return [body_mm(bottom, 12.3, 25.0, 25.0, 35.0, tilt) for bottom, tilt in
            ((150.37, 0.0), (115.21, 4.0), (80.55, 0.0), (45.13, 0.0))]


@pytest.mark.parametrize("mirror", [False, True])
def test_endplate_refinement_moves_misplaced_corners_onto_the_edge(mirror):
    from spinecohort.detect import DetectedVertebra, refine_endplates

    truth = [to_px(q) for q in endplate_column()]
    image = render_bodies(endplate_column())
    # body 1: SA 1.0 mm too low (into the body), SP 0.6 mm too high, IA 0.8 mm too high
    quads = [q.copy() for q in truth]
    quads[1] += np.array([[1.0, 0.0], [-0.6, 0.0], [0.0, 0.0], [-0.8, 0.0]]) / SPACING
    if mirror:  # cols stored posterior -> anterior: corners keep their anatomical names
        image = image[:, ::-1].copy()
        truth, quads = ([np.column_stack([q[:, 0], image.shape[1] - 1 - q[:, 1]]) for q in qs] for qs in (truth, quads))
    dets = [DetectedVertebra({0: q}, (0.0, *q.mean(0)), 1.0) for q in quads]
    refined = [d.polygons[0] for d in refine_endplates(image[None], SPACING, dets)]
    for want, got in zip(truth, refined):  # every corner within 0.15 mm of its endplate; exact ones stay
        assert np.abs(got - want)[:, 0].max() * SPACING[0] < 0.15
    measured = mm.body_measures(mm.to_mm(refined[1], SPACING))
    assert measured["height_anterior_mm"] == pytest.approx(25.0, abs=0.2)
    assert measured["height_posterior_mm"] == pytest.approx(25.0, abs=0.2)
    # the tilted body's corners moved across its endplates, not along them
    step = (refined[1] - quads[1]) * SPACING
    along = np.diff(mm.to_mm(truth[1], SPACING)[[0, 1]], axis=0)[0]
    assert np.abs(step @ along / np.linalg.norm(along)).max() < 0.05 and np.abs(step).max() > 0.5
    assert dets[1].polygons[0] is quads[1]  # the detections passed in are not changed


def test_endplate_refinement_keeps_corners_without_an_edge_or_a_peer():
    from spinecohort.detect import DetectedVertebra, refine_endplates

    quads = [to_px(q) for q in endplate_column()]
    dets = [DetectedVertebra({0: q}, (0.0, *q.mean(0)), 1.0) for q in quads]
    noise = np.random.default_rng(3).random((1, 200, 120)).astype(np.float32)
    for d, r in zip(dets, refine_endplates(noise, SPACING, dets)):  # no endplate in the image: nothing moves
        assert np.array_equal(r.polygons[0], d.polygons[0])
    image = render_bodies(endplate_column())[None]
    alone = [DetectedVertebra({0: quads[1] + [[1.0, 0.0], [0, 0], [0, 0], [0, 0]]}, (0.0, 0.0, 0.0), 1.0)]
    assert np.array_equal(refine_endplates(image, SPACING, alone)[0].polygons[0], alone[0].polygons[0])


PUBLIC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "public-lumbar"


@pytest.mark.skipif(not (PUBLIC / "vb3_05.npz").exists(),
                    reason=f"public-lumbar data not available at {PUBLIC} (a fresh clone has no ../shared)")
def test_shipped_detector_heights_against_expert_masks_on_one_validation_case():
    from spinecohort import publiclumbar as pl
    from spinecohort.detect import Detector
    from spinecohort.evaluation import DetectionCase, EvalBody
    from spinecohort.evaluation.morphometry import QUANTITIES, agreement, measure_pairs
    from spinecohort.shipped import default_model

    real = pl.load_case(PUBLIC / "vb3_05.npz")
    assert real.split == "val"
    bodies = [EvalBody(v.centroid, v.polygons, v.level, v.mid_slice) for v in real.vertebrae if v.polygons]
    case = DetectionCase(real.name, real.volume, real.pixel_spacing_mm, real.slice_spacing_mm, bodies)
    detections = Detector.load(default_model("detector")).detect(case.volume, case.pixel_spacing_mm)
    pairs = measure_pairs(detections, case)
    assert sorted(p["level"] for p in pairs) == ["L1", "L2", "L3", "L4", "L5"]
    stats = agreement([p["pipeline"][q] - p["reference"][q] for p in pairs for q in QUANTITIES])
    assert stats["n"] == 20 and stats["mad"] < 2.0, stats


def test_derived_tables_never_cost_the_core_tables(monkeypatch, caplog):
    from spinecohort import pipeline

    scans = scans_frame([("p1", "v1")])
    frames = {"vertebrae": vertebrae_frame({"s0": column()}), "discs": pd.DataFrame()}
    tables = pipeline.derived_tables(scans, frames)
    assert (tables["morphometry"]["kind"] == "vertebra").sum() == 6 and len(tables["change"]) == 0

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(mm, "cohort_change", broken)
    tables = pipeline.derived_tables(scans, frames)
    assert len(tables["morphometry"]) and len(tables["change"]) == 0
    assert list(tables["change"].columns) == list(mm.CHANGE_DTYPES)
    assert "tables/change.parquet" in caplog.text
