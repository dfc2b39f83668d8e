"""Labelling stage: beam search on constructed probability maps, crops, shipped weights."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from spinecohort.label import (
    CHAIN,
    LEVEL_FLAGS,
    AppearanceConfig,
    BeamResult,
    BeamConfig,
    Labeller,
    beam_search,
    calibrated_probabilities,
    anchor_at_sacrum,
    count_from_sacrum,
    fit_probability_calibration,
    extract_appearance_volume,
    gap_ratios,
    height_probability_map,
    level_summary,
    sacral_gap,
    vertebra_geometry,
)
from spinecohort.shipped import default_model_path
from spinecohort.tasks import LEVEL_INDEX, LEVELS

APPEARANCE = default_model_path("appearance")
CONTEXT = default_model_path("context")
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def emissions(levels, conf=0.9, spread=0.04):
    """Rows peaked at the given levels (None = flat), a little mass on the neighbours."""
    E = np.full((len(levels), 24), 1e-3)
    for i, lev in enumerate(levels):
        if lev is None:
            E[i] = 1.0 / 24
            continue
        j = LEVEL_INDEX[lev]
        E[i, j] = conf
        for d in (-1, 1):
            if 0 <= j + d < 24:
                E[i, j + d] = spread
    return E / E.sum(1, keepdims=True)


def centres(spacings):
    """Centres (row, col) in mm of bodies caudal first, separated by the given distances."""
    rows = [500.0]
    for d in spacings:
        rows.append(rows[-1] - d)
    return np.array([[r, 100.0] for r in rows])


def test_chain_covers_levels_in_order():
    names = [c[0] for c in CHAIN]
    assert [n for n in names if n in LEVELS] == list(LEVELS)
    assert names.index("S2") < names.index("S1") < names.index("L6") < names.index("L5")
    assert names.index("L1") < names.index("T13") < names.index("T12")
    assert names[-1] == "C1"


def test_plain_lumbar_sequence():
    levels = ["S1", "L5", "L4", "L3", "L2", "L1", "T12"]
    res = beam_search(emissions(levels), gaps=gap_ratios(centres([38] * 6)))
    assert res.labels == levels
    assert all(p > 0.9 for p in res.probabilities)


def test_missing_middle_vertebra_is_skipped():
    # L3 not detected: the bodies above still look like L2, L1, T12; the gap is twice the spacing
    levels = ["S1", "L5", "L4", "L2", "L1", "T12"]
    gaps = gap_ratios(centres([38, 38, 76, 38, 38]))
    res = beam_search(emissions(levels, conf=0.7, spread=0.12), gaps=gaps)
    assert res.labels == levels
    # without geometry the appearance alone still supports the skip
    assert beam_search(emissions(levels), gaps=None).labels == levels


def test_gap_decides_where_the_skip_is():
    # ambiguous appearance above L4; the geometry puts the missing body between L4 and the next
    E = emissions(["S1", "L5", "L4", None, None, None])
    gaps = gap_ratios(centres([38, 38, 76, 38, 38]))
    res = beam_search(E, gaps=gaps)
    assert res.labels[:3] == ["S1", "L5", "L4"]
    assert res.labels[3] == "L2"


def test_scan_without_s1_in_view():
    levels = ["L4", "L3", "L2", "L1", "T12", "T11"]
    res = beam_search(emissions(levels), gaps=gap_ratios(centres([37] * 5)))
    assert res.labels == levels


def test_transitional_sixth_lumbar_vertebra():
    # two lumbar-looking bodies directly above S1: an extra lumbar vertebra (L6), not a shift of
    # every label above it
    E = emissions(["S1", "L5", "L5", "L4", "L3", "L2", "L1", "T12", "T11"])
    E[1:3, 0] = 1e-3  # clearly lumbar, not sacral (else a detected S2 below S1 explains it too)
    res = beam_search(E, gaps=gap_ratios(centres([38] * 8)))
    assert res.labels == ["S1", "L6", "L5", "L4", "L3", "L2", "L1", "T12", "T11"]
    # disabled: the sequence has to shift instead
    res2 = beam_search(E, BeamConfig(transitional=False), gaps=gap_ratios(centres([38] * 8)))
    assert "L6" not in res2.labels


def test_transitional_t13_and_four_lumbar():
    res = beam_search(emissions(["L2", "L1", "T12", "T12", "T11", "T10"]),
                      gaps=gap_ratios(centres([36, 32, 30, 28, 27])))
    assert res.labels == ["L2", "L1", "T13", "T12", "T11", "T10"]
    # four lumbar vertebrae: L1 absent although there is no gap
    res = beam_search(emissions(["S1", "L5", "L4", "L3", "L2", "T12", "T11"]),
                      gaps=gap_ratios(centres([38] * 6)))
    assert res.labels == ["S1", "L5", "L4", "L3", "L2", "T12", "T11"]


def test_double_s1_becomes_s2():
    res = beam_search(emissions(["S1", "S1", "L5", "L4", "L3"]), gaps=gap_ratios(centres([30, 38, 38, 38])))
    assert res.labels == ["S2", "S1", "L5", "L4", "L3"]


def test_sacral_segments_below_s1():
    # three sacrum-looking detections below S1 (fused segments): S4, S3, S2, then S1 and up
    E = emissions(["S1", "S1", "S1", "S1", "L5", "L4", "L3"])
    E[:3] = 0.5 * E[:3] + 0.5 / 24  # the lower segments are less typical
    res = beam_search(E, gaps=gap_ratios(centres([18, 20, 26, 36, 37, 37])))
    assert res.labels == ["S4", "S3", "S2", "S1", "L5", "L4", "L3"]


def test_duplicate_detections_share_a_label():
    from spinecohort.label import duplicate_groups

    # rows (mm) of body centres caudal first; the 3rd is a narrow second detection of the 2nd body
    cen = np.array([[200.0, 50.0], [165.0, 50.0], [162.0, 62.0], [130.0, 50.0]])
    spans = np.array([[187, 213], [152, 178], [150, 176], [117, 143]], float)
    assert duplicate_groups(cen, spans, weights=[9, 9, 2, 9]) == [[0], [1, 2], [3]]
    # a tall false detection spanning two bodies does not chain them together
    cen = np.array([[200.0, 50.0], [190.0, 55.0], [165.0, 50.0]])
    spans = np.array([[187, 213], [170, 212], [152, 178]], float)
    assert duplicate_groups(cen, spans, weights=[9, 2, 9]) == [[0, 1], [2]]


def test_double_c2_becomes_c1():
    res = beam_search(emissions(["C4", "C3", "C2", "C2"]), gaps=gap_ratios(centres([18, 18, 20])))
    assert res.labels == ["C4", "C3", "C2", "C1"]


def test_same_level_twice_never_chosen():
    E = emissions(["L3", "L3", "L3", "L3"])
    res = beam_search(E)
    assert len(set(res.labels)) == 4
    idx = [[c[0] for c in CHAIN].index(n) for n in res.labels]
    assert idx == sorted(idx)


def test_one_vertebra_low_confidence():
    # a lumbar-looking body alone: some lumbar level, with low confidence
    E = np.full((1, 24), 1e-3)
    E[0, 1:6] = 0.2
    res = beam_search(E)
    assert res.labels[0] in {"L5", "L4", "L3", "L2", "L1", "L6"}
    assert res.probabilities[0] < 0.5
    res = beam_search(np.full((1, 24), 1 / 24))
    assert len(res.labels) == 1 and res.probabilities[0] < 0.2
    assert beam_search(np.zeros((0, 24))).labels == []


def _summary(levels, spacings, **kw):
    E = kw.pop("E", None)
    return level_summary(beam_search(emissions(levels) if E is None else E, gaps=gap_ratios(centres(spacings))), **kw)


def test_level_summary_clear_lumbar_scan_with_s1_is_not_flagged():
    summary = _summary(["S1", "L5", "L4", "L3", "L2", "L1", "T12"], [38] * 6)
    assert summary.flags == () and summary.confidence > 0.9


def test_level_summary_flags_a_missing_sacrum():
    summary = _summary(["L5", "L4", "L3", "L2", "L1", "T12", "T11"], [38] * 6)
    assert "no_sacrum_in_view" in summary.flags
    # a thoracic field of view is not expected to show the sacrum
    assert "no_sacrum_in_view" not in _summary(["T12", "T11", "T10", "T9"], [30] * 3).flags


def test_level_summary_flags_counting_variants():
    E = emissions(["S1", "L5", "L5", "L4", "L3", "L2", "L1", "T12", "T11"])
    E[1:3, 0] = 1e-3
    six = _summary(None, [38] * 8, E=E)
    assert "counting_variant_suspected" in six.flags
    t13 = _summary(["L2", "L1", "T12", "T12", "T11", "T10"], [36, 32, 30, 28, 27])
    assert "counting_variant_suspected" in t13.flags
    four = _summary(["S1", "L5", "L4", "L3", "L2", "T12", "T11"], [38] * 6)
    assert "counting_variant_suspected" in four.flags


def test_expensive_variants_are_still_flagged_by_the_probe_decoding():
    # the shipped beam makes transitional counts expensive (a real spine is rarely one): the
    # chosen labels stay standard, and the cheaper probe decoding still raises the flag
    E = emissions(["S1", "L5", "L5", "L4", "L3", "L2", "L1"])
    E[1:3, 0] = 1e-3
    gaps = gap_ratios(centres([38] * 6))
    strict = BeamConfig(six_lumbar_penalty=40.0, t13_penalty=40.0, four_lumbar_penalty=40.0)
    chosen = beam_search(E, strict, gaps)
    assert "L6" not in chosen.labels
    assert "counting_variant_suspected" not in level_summary(chosen).flags
    assert "counting_variant_suspected" in level_summary(chosen, probe=beam_search(E, BeamConfig(), gaps)).flags


def test_level_summary_one_body_and_ambiguous_scans_are_flagged():
    E = np.full((1, 24), 1e-3)
    E[0, 1:6] = 0.2
    one = level_summary(beam_search(E))
    assert "few_vertebrae" in one.flags and "low_confidence" in one.flags and one.confidence < 0.5
    # every body ambiguous between two counts: the posterior is split, the scan flagged
    levels = ["S1", "L5", "L4", "L3", "L2", "L1"]
    E = 0.5 * emissions(levels) + 0.5 * emissions(["L5", "L4", "L3", "L2", "L1", "T12"])
    assert "low_confidence" in _summary(None, [38] * 5, E=E).flags
    empty = level_summary(beam_search(np.zeros((0, 24))))
    assert empty.flags == ("no_vertebrae_detected",) and math.isnan(empty.confidence)
    assert set(one.flags) <= set(LEVEL_FLAGS)


def test_probability_calibration_maps_raw_probabilities_and_is_fitted_from_bodies():
    # Platt scaling with the scan's flag: flagged scans' bodies are right less often
    rng = np.random.default_rng(0)
    raw = rng.uniform(0.05, 0.999, 600)
    flagged = rng.random(600) < 0.4
    correct = rng.random(600) < np.where(flagged, 0.6, 0.97)
    a, b, c = fit_probability_calibration(raw, flagged, correct)
    assert b < -1.0 and abs(c) < 0.5  # the flag carries the information, the raw value none
    p_flag = calibrated_probabilities([0.99], True, (a, b, c))[0]
    p_clear = calibrated_probabilities([0.99], False, (a, b, c))[0]
    assert 0.5 < p_flag < 0.7 < 0.93 < p_clear < 0.99
    # a flag or raw value pointing the wrong way (flagged bodies right more often, confident ones
    # less) is left out: level_probability stays monotone, here the base rate for every body
    odd = rng.random(600) < np.where(flagged, 0.95, 0.8) - 0.3 * (raw > 0.6)
    a2, b2, c2 = fit_probability_calibration(raw, flagged, odd)
    assert b2 == 0.0 and c2 == 0.0
    assert calibrated_probabilities([0.2], True, (a2, b2, c2))[0] == pytest.approx(odd.mean(), abs=0.01)
    assert calibrated_probabilities([0.3, float("nan")], True, ()) [0] == 0.3
    assert math.isnan(calibrated_probabilities([float("nan")], False, (a, b, c))[0])


def test_sacrum_cut_by_image_edge_flag():
    res = beam_search(emissions(["S1", "L5", "L4", "L3", "L2", "L1"]), gaps=gap_ratios(centres([38] * 5)))
    assert "sacrum_cut_by_image_edge" in level_summary(res, room_below=0.4).flags
    assert "sacrum_cut_by_image_edge" not in level_summary(res, room_below=2.5).flags
    assert "sacrum_cut_by_image_edge" not in level_summary(res).flags
    # a cut S1 at the image edge called S2 (L5 then called S1) is the same doubt
    cut = beam_search(emissions(["S1", "S1", "L5", "L4", "L3"]), gaps=gap_ratios(centres([30, 38, 38, 38])))
    assert cut.labels[0] == "S2"
    assert "sacrum_cut_by_image_edge" in level_summary(cut, room_below=0.4).flags
    E = emissions(["S1", "S1", "S1", "L5", "L4", "L3"])
    E[:2] = 0.5 * E[:2] + 0.5 / 24
    long_sacrum = beam_search(E, gaps=gap_ratios(centres([20, 26, 36, 37, 37])))
    assert long_sacrum.labels[0] == "S3"
    assert "sacrum_cut_by_image_edge" not in level_summary(long_sacrum, room_below=0.4).flags
    # a cervical field of view ending at T1 is not about the sacrum
    neck = beam_search(emissions(["T1", "C7", "C6", "C5"]), gaps=gap_ratios(centres([20] * 3)))
    assert "sacrum_cut_by_image_edge" not in level_summary(neck, room_below=0.2).flags
    assert "sacrum_cut_by_image_edge" in LEVEL_FLAGS


def test_disc_below_s1_flag_from_the_sacral_gap():
    def body(top, bottom):  # a 30-pixel-wide box, rows top..bottom, on slice 0
        return vertebra_geometry({0: [[top, 10], [top, 40], [bottom, 40], [bottom, 10]]})

    # caudal first: S2, S1, L5; body heights 30 px
    fused = [body(131, 161), body(100, 130), body(60, 90)]
    disc = [body(139, 169), body(100, 130), body(60, 90)]  # 9 px = 0.3 body heights between S1 and S2
    labels = ["S2", "S1", "L5"]
    assert sacral_gap(fused, labels, 30.0) == pytest.approx(1 / 30)
    assert sacral_gap(disc, labels, 30.0) == pytest.approx(9 / 30)
    assert sacral_gap(disc, ["S1", "L5", "L4"], 30.0) is None  # no S2 below S1: nothing to measure
    res = beam_search(emissions(["S1", "S1", "L5", "L4", "L3"]), gaps=gap_ratios(centres([30, 38, 38, 38])))
    assert res.labels[:2] == ["S2", "S1"]
    assert "disc_below_s1" in level_summary(res, disc_below_s1=True).flags
    assert "disc_below_s1" not in level_summary(res).flags
    plain = beam_search(emissions(["S1", "L5", "L4", "L3"]), gaps=gap_ratios(centres([38] * 3)))
    assert "disc_below_s1" not in level_summary(plain, disc_below_s1=True).flags  # no S2: no such doubt
    assert "disc_below_s1" in LEVEL_FLAGS


def test_more_bodies_than_levels_does_not_crash():
    res = beam_search(np.full((30, 24), 1 / 24))
    assert len(res.labels) == 30
    assert sum(lab is None for lab in res.labels) >= 2


def test_height_map_and_crop_geometry():
    polys = {s: np.array([[40.0, 30.0], [40.0, 70.0], [70.0, 70.0], [70.0, 30.0]]) for s in range(3, 8)}
    g = vertebra_geometry(polys, (5.0, 55.0, 50.0))
    assert g.slices == (3, 7) and g.top == 40.0 and g.bottom == 70.0
    vol = np.random.default_rng(0).random((12, 128, 128)).astype(np.float32) * 1000
    x, f = extract_appearance_volume(vol, (1.0, 1.0), g, AppearanceConfig())
    assert x.shape == (8, 48, 48) and np.isfinite(x).all()
    assert np.allclose(f, [math.log(30 / 25), math.log(40 / 30)], atol=1e-5)
    xo, _ = extract_appearance_volume(vol, (1.0, 1.0), g, AppearanceConfig.official())
    assert xo.shape == (16, 224, 224)
    P = height_probability_map(np.eye(24)[[0, 1]], [(10, 20), (30, 40)], 50, 32)
    assert P.shape == (64, 24) and P[15, 0] == 1 and P[35, 1] == 1 and P[25].sum() == 0


def test_official_layout_runs():
    from spinecohort.nets.official import build_official

    lab = Labeller.official(build_official("appearance"), build_official("context"))
    assert lab.appearance_config.grid == (16, 224, 224) and lab.context_config.pad_multiple == 256
    rng = np.random.default_rng(1)
    vol = rng.random((10, 160, 160)).astype(np.float32)
    verts = [{"polygons": {s: np.array([[r, 60.0], [r, 90.0], [r + 20, 90.0], [r + 20, 60.0]]) for s in range(3, 7)},
              "centroid": (5.0, r + 10, 75.0)} for r in (120.0, 90.0, 60.0)]
    out = lab.label(vol, (1.0, 1.0), 4.0, verts)
    assert len(out) == 3 and all(isinstance(lev, str) for lev, _ in out)


@pytest.mark.skipif(not (APPEARANCE.exists() and CONTEXT.exists()), reason="shipped labeller weights not built yet")
def test_shipped_weights_label_a_synthetic_scan():
    from spinecohort.synthetic import generate_scan

    torch.set_num_threads(1)
    lab = Labeller.load(APPEARANCE, CONTEXT)
    scan = generate_scan(987654, fov="lumbar", n_slices=9, rows=320)
    verts = [{"polygons": v.polygons, "centroid": v.centroid} for v in scan.vertebrae]
    out = lab.label(scan.volume, (scan.pixel_spacing_mm,) * 2, scan.slice_spacing_mm, verts)
    truth = [v.level for v in scan.vertebrae]
    got = [lev for lev, _ in out]
    full = [i for i, v in enumerate(scan.vertebrae) if not v.partial]
    assert sum(got[i] == truth[i] for i in full) >= len(full) - 1
    assert all(0.0 <= p <= 1.0 for _, p in out)
    # input order is kept: reversed input gives reversed output
    out_r = lab.label(scan.volume, (scan.pixel_spacing_mm,) * 2, scan.slice_spacing_mm, verts[::-1])
    assert [lev for lev, _ in out_r] == got[::-1]
    # one body alone: no crash, a level with a probability; nothing usable: (None, nan)
    one = lab.label(scan.volume, (scan.pixel_spacing_mm,) * 2, scan.slice_spacing_mm, verts[2:3])
    assert len(one) == 1 and one[0][0] is not None and 0 < one[0][1] <= 1
    none = lab.label(scan.volume, (scan.pixel_spacing_mm,) * 2, scan.slice_spacing_mm, [{"polygons": {}}])
    assert none[0][0] is None and math.isnan(none[0][1])
    assert lab.label(scan.volume, (scan.pixel_spacing_mm,) * 2, scan.slice_spacing_mm, []) == []


@pytest.mark.skipif(not (APPEARANCE.exists() and CONTEXT.exists()), reason="shipped labeller weights not built yet")
@pytest.mark.skipif(not (SHARED / "data" / "public-lumbar").is_dir(),
                    reason="public-lumbar data not available (../shared/data/public-lumbar)")
def test_shipped_weights_label_a_public_lumbar_case():
    from spinecohort.publiclumbar import list_cases, load_case

    torch.set_num_threads(1)
    lab = Labeller.load(APPEARANCE, CONTEXT)
    case = load_case(list_cases(SHARED / "data" / "public-lumbar", split="val", source="vb3")[0])
    verts = sorted(case.vertebrae, key=lambda v: -v.centroid[1])
    out = lab.label(case.volume, case.pixel_spacing_mm, case.slice_spacing_mm,
                    [{"polygons": v.polygons, "centroid": v.centroid} for v in verts])
    got = [lev for lev, _ in out]
    assert sum(g == v.level for g, v in zip(got, verts)) >= len(verts) - 1


def test_labelling_evaluation_records_calibration_and_fits_it(tmp_path, capsys):
    # the leave-one-site-out workflow in small: evaluate, then fit level_probability's map from
    # the JSON (training-split rows; here synthetic scans marked as such)
    import json

    from spinecohort.evaluation import labelling as ev

    assert ev._public_split_of("vb3_05") == "val" and ev._public_split_of("vb2_08") == "train"
    labeller = Labeller.load(default_model_path("appearance"), default_model_path("context"))
    res = ev.evaluate_labelling(labeller, None, datasets=["synthetic-lumbar"], n_lumbar=2, modes=("truth",))
    rows = res["scans"]
    assert rows and all(len(r["calibration"]["raw"]) == len(r["calibration"]["correct"]) > 0 for r in rows)
    for r in rows:
        r["mode"], r["public_split"] = "end2end", "train"
    path = tmp_path / "loso.json"
    path.write_text(json.dumps(res, default=float))
    assert ev.main(["--calibrate-from", str(path)]) == 0
    out = capsys.readouterr().out
    assert "probability_calibration (fitted on" in out and "ECE" in out


def test_without_c2_a_transitional_count_is_recounted_from_the_sacrum():
    gaps = gap_ratios(centres([38] * 8))
    six_e = emissions(["S1", "L5", "L5", "L4", "L3", "L2", "L1", "T12", "T11"])
    six_e[1:3, 0] = 1e-3
    six = beam_search(six_e, gaps=gaps)
    assert six.labels[:2] == ["S1", "L6"]
    recounted = count_from_sacrum(six, six_e, gaps)
    assert recounted.labels == ["S1", "L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10"]
    # the networks disagree with the re-count: the scan's confidence is low and the variant flagged
    summary = level_summary(recounted)
    assert "counting_variant_suspected" in summary.flags and "low_confidence" in summary.flags

    t13_e = emissions(["S1", "L5", "L4", "L3", "L2", "L1", "T12", "T12", "T11"])
    t13 = beam_search(t13_e, gaps=gaps)
    assert "T13" in t13.labels
    assert count_from_sacrum(t13, t13_e, gaps).labels == ["S1", "L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10"]

    four_gaps = gap_ratios(centres([38] * 6))
    four_e = emissions(["S1", "L5", "L4", "L3", "L2", "T12", "T11"])
    four = beam_search(four_e, gaps=four_gaps)
    assert four.labels == ["S1", "L5", "L4", "L3", "L2", "T12", "T11"]
    assert count_from_sacrum(four, four_e, four_gaps).labels == ["S1", "L5", "L4", "L3", "L2", "L1", "T12"]


def test_recount_keeps_sacral_segments_and_missed_levels_and_needs_an_s1():
    # S2 below S1 and a missed L3 (a double gap) survive the re-count; only the L6 goes
    E = emissions(["S1", "S1", "L5", "L5", "L4", "L2", "L1", "T12"])
    E[2:4, 0] = 1e-3
    gaps = gap_ratios(centres([30, 38, 38, 38, 76, 38, 38]))
    res = beam_search(E, gaps=gaps)
    assert res.labels == ["S2", "S1", "L6", "L5", "L4", "L2", "L1", "T12"]
    assert count_from_sacrum(res, E, gaps).labels == ["S2", "S1", "L5", "L4", "L3", "L1", "T12", "T11"]
    # without an S1 there is nothing to count from: unchanged
    no_s1 = beam_search(emissions(["L2", "L1", "T12", "T12", "T11", "T10"]), gaps=gap_ratios(centres([36, 32, 30, 28, 27])))
    assert "T13" in no_s1.labels and count_from_sacrum(no_s1, np.ones((6, 24)), None) is no_s1


def test_count_from_sacrum_is_shipped_but_not_the_reference_default():
    assert BeamConfig().count_from_sacrum_without_c2 is False  # official family: reference decoding
    assert Labeller.load(APPEARANCE, CONTEXT).beam.count_from_sacrum_without_c2 is True
    assert BeamConfig().anchor_at_sacrum is False and Labeller.load(APPEARANCE, CONTEXT).beam.anchor_at_sacrum is True


def test_anchor_at_sacrum_counts_up_from_a_sacral_lowest_body():
    # the sacrum seen (S1 0.7 at the lowest body) but every body above reads one level high:
    # the beam follows the majority and calls the sacrum L5; the anchor counts up from it instead
    E = emissions([None, "L4", "L3", "L2", "L1", "T12"])
    E[0] = 0.001
    E[0, LEVEL_INDEX["S1"]], E[0, LEVEL_INDEX["L5"]] = 0.7, 0.3
    gaps = gap_ratios(centres([38] * 5))
    res = beam_search(E, gaps=gaps)
    assert res.labels == ["L5", "L4", "L3", "L2", "L1", "T12"]
    anchored = anchor_at_sacrum(res, E, gaps)
    assert anchored.labels == ["S1", "L5", "L4", "L3", "L2", "L1"]
    assert all(0 <= p <= 1 for p in anchored.probabilities) and anchored.probabilities[0] > 0.5
    summary = level_summary(anchored, recounted=True)
    assert "recounted_from_sacrum" in summary.flags and "recounted_from_sacrum" in LEVEL_FLAGS
    assert summary.confidence < 0.5 and "low_confidence" in summary.flags  # the networks disagree
    # the count skips a level only across a gap the size of a missed body (L3 missed here)
    gapped = gap_ratios(centres([38, 38, 76, 38, 38]))
    assert anchor_at_sacrum(res, E, gapped).labels == ["S1", "L5", "L4", "L2", "L1", "T12"]
    gaps2 = gap_ratios(centres([30] + [38] * 5))
    # a decoding that found a sacrum keeps it, even where a higher body looks more like S1
    E3 = np.vstack([emissions(["S1"]), E])
    E3[1, LEVEL_INDEX["S1"]], E3[1, LEVEL_INDEX["L5"]] = 0.95, 0.05
    res3 = beam_search(E3, gaps=gaps2)
    assert res3.labels[0] == "S1" and anchor_at_sacrum(res3, E3, gaps2) is res3
    # no sacral candidate, or S1 already on it: unchanged
    lumbar = beam_search(emissions(["L5", "L4", "L3", "L2"]))
    assert anchor_at_sacrum(lumbar, emissions(["L5", "L4", "L3", "L2"]), None) is lumbar
    plain = beam_search(emissions(["S1", "L5", "L4", "L3"]))
    assert anchor_at_sacrum(plain, emissions(["S1", "L5", "L4", "L3"]), None) is plain
    assert BeamConfig().anchor_at_sacrum is False  # official family: reference decoding


class _ScriptedLabeller(Labeller):
    """label_scan's decision about a weak body, with the decodings scripted: bodies present
    (caudal first) -> their labels."""

    def __init__(self, script):
        self.script = script

    def _label_inputs(self, volume, pixel_spacing_mm, vertebrae, with_maps):
        present = sorted((i for i, v in enumerate(vertebrae) if v["polygons"] is not None),
                         key=lambda i: -vertebrae[i]["centroid"][1])
        out = [(None, float("nan"))] * len(vertebrae)
        for i, level in zip(present, self.script[len(present)]):
            out[i] = (level, 0.9)
        return out, level_summary(BeamResult([], [], [], 0.0))


def _column(n, weak_below=True):
    bodies = [{"polygons": {0: np.eye(4, 2)}, "centroid": (0.0, 200.0 - 30 * k, 100.0)} for k in range(n)]
    if weak_below:
        bodies.append({"polygons": {0: np.eye(4, 2)}, "centroid": (0.0, 230.0, 100.0), "found_at_low_threshold": True})
    return bodies


def test_a_weak_body_below_is_kept_only_as_the_missing_s1():
    vol = np.zeros((1, 8, 8), np.float32)
    upper = ["L5", "L4", "L3", "L2"]
    # no S1 without it, S1 with it: the sacrum the detector saw weakly
    found = _ScriptedLabeller({4: upper, 5: ["S1"] + upper}).label_scan(vol, (1.0, 1.0), 1.0, _column(4))[0]
    assert [lab for lab, _ in found] == upper + ["S1"]
    # the scan already has its S1: the weak body is not a vertebra of it (below S1 it would be S2)
    has_s1 = ["S1", "L5", "L4", "L3"]
    kept = _ScriptedLabeller({4: has_s1, 5: ["S1", "L5", "L4", "L3", "L2"]}).label_scan(vol, (1.0, 1.0), 1.0, _column(4))[0]
    assert [lab for lab, _ in kept[:4]] == has_s1 and kept[4][0] is None and math.isnan(kept[4][1])
    # with it the column is re-read but the weak body is not S1: the labels without it stand
    shifted = _ScriptedLabeller({4: upper, 5: ["L5", "L4", "L3", "L2", "L1"]}).label_scan(vol, (1.0, 1.0), 1.0, _column(4))[0]
    assert [lab for lab, _ in shifted[:4]] == upper and shifted[4][0] is None
    # nothing weak: one decoding, as before
    assert [lab for lab, _ in _ScriptedLabeller({4: upper}).label_scan(vol, (1.0, 1.0), 1.0, _column(4, False))[0]] == upper


def test_a_weakly_detected_s1_is_flagged():
    res = BeamResult(["S1", "L5", "L4", "L3"], [0, 1, 2, 3], [0.9] * 4, 0.0)
    assert "s1_weakly_detected" in level_summary(res, weak_s1=True).flags
    assert "s1_weakly_detected" not in level_summary(res).flags
    no_s1 = BeamResult(["L5", "L4", "L3"], [1, 2, 3], [0.9] * 3, 0.0)
    assert level_summary(no_s1, weak_s1=True).flags == level_summary(no_s1).flags
