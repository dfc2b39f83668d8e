"""Public-lumbar loader: split, corner derivation from masks, disc-derived bodies, extent lines."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spinecohort import publiclumbar as pl

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data" / "public-lumbar"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"public-lumbar data not available at {DATA}")


def _rect_mask(shape, centre, h, w, tilt):
    rr, cc = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    dr, dc = rr - centre[0], cc - centre[1]
    u = dr * np.cos(tilt) + dc * np.sin(tilt)     # along rows when tilt = 0
    v = -dr * np.sin(tilt) + dc * np.cos(tilt)
    return (np.abs(u) <= h / 2) & (np.abs(v) <= w / 2)


def test_quad_from_mask_recovers_rotated_rectangle():
    for tilt in (0.0, 0.2, -0.35):
        m = _rect_mask((120, 120), (60, 55), 24, 36, tilt)
        q = pl.quad_from_mask(m)
        assert q is not None and q.shape == (4, 2)
        # expected corners (SA, SP, IP, IA) of the continuous rectangle
        u = np.array([np.cos(tilt), np.sin(tilt)])
        v = np.array([-np.sin(tilt), np.cos(tilt)])
        exp = np.array([60, 55]) + np.array([su * 12 * u + sv * 18 * v
                                             for su, sv in ((-1, -1), (-1, 1), (1, 1), (1, -1))])
        assert np.abs(q - exp).max() < 1.6, (tilt, q, exp)
    assert pl.quad_from_mask(np.zeros((10, 10), bool)) is None


def test_split_rule():
    assert pl.split_of(5) == "val" and pl.split_of(50) == "val"
    assert pl.split_of(1) == "train" and pl.split_of(42) == "train"


def test_extent_lines_side():
    lines = ((np.array([50.0, 0.0]), np.array([50.0, 100.0])), (np.array([150.0, 0.0]), np.array([160.0, 100.0])))
    pts = np.array([[40.0, 50.0], [100.0, 50.0], [170.0, 50.0], [152.0, 0.0]])
    assert pl.outside_annotated(pts, lines).tolist() == [True, False, True, True]


@needs_data
def test_cases_and_fixed_split():
    refs = pl.list_cases(DATA)
    assert len(refs) == 76
    val = pl.list_cases(DATA, split="val")
    assert val and all(r.number % 5 == 0 for r in val)
    assert {r.source for r in refs} == {"vb3", "ivd", "vb2"}


@needs_data
def test_vertebra_corners_from_masks():
    case = pl.load_case(DATA / "vb3_01.npz")
    assert case.volume.shape == (19, 224, 224) and case.volume.dtype == np.float32
    assert case.pixel_spacing_mm == (1.0, 1.0) and case.slice_spacing_mm == 4.0
    verts = case.vertebrae
    assert [v.level for v in verts] == ["L1", "L2", "L3", "L4", "L5"]
    rows = []
    for v in verts:
        s = v.mid_slice
        q = v.polygons[s]
        sa, sp, ip, ia = q
        assert sa[0] < ia[0] and sp[0] < ip[0]      # superior above inferior
        assert sa[1] < sp[1] and ia[1] < ip[1]      # anterior before posterior
        # the quadrilateral hugs the mask: most mask pixels inside, area close to the mask's
        from spinecohort.detect import point_in_quad, polygon_area

        pix = np.argwhere(case.mask[s] == v.label)
        inside = np.mean([point_in_quad(p, q) for p in pix[::5]])
        assert inside > 0.9
        assert 0.85 < polygon_area(q) / len(pix) < 1.25
        assert point_in_quad(v.centroid[1:], q)
        assert len(v.polygons) >= 8 and set(v.polygons) <= set(v.present_slices)
        rows.append(v.centroid[1])
    assert rows == sorted(rows)  # L1 on top


@needs_data
def test_disc_case_gives_discs_and_derived_bodies():
    case = pl.load_case(DATA / "ivd_11.npz")
    assert {d.level for d in case.discs} == {"L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"}
    derived = [v for v in case.vertebrae if v.derived]
    assert sorted(v.level for v in derived) == ["L2", "L3", "L4", "L5"]
    by = {d.level: d for d in case.discs}
    l3 = next(v for v in derived if v.level == "L3")
    s = l3.mid_slice
    assert np.allclose(l3.polygons[s][0], by["L2-L3"].polygons[s][3])   # SA = upper disc's IA
    assert np.allclose(l3.polygons[s][2], by["L3-L4"].polygons[s][1])   # IP = lower disc's SP
    # the body lies between its discs
    assert by["L2-L3"].centroid[1] < l3.centroid[1] < by["L3-L4"].centroid[1]


@needs_data
def test_extent_lines_exclude_unlabelled_neighbours():
    case = pl.load_case(DATA / "vb3_01.npz")
    lines = pl.annotated_extent_lines(case.vertebrae)
    l1 = case.vertebrae[0]
    l5 = case.vertebrae[-1]
    q1, q5 = l1.polygons[l1.mid_slice], l5.polygons[l5.mid_slice]
    t12 = (q1[0] + q1[3]) / 2 - [(q1[3] - q1[0])[0], 0]       # one body height above L1
    s1 = (q5[1] + q5[2]) / 2 + [(q5[3] - q5[0])[0], 0]        # one body height below L5
    out = pl.outside_annotated(np.array([t12, s1, l1.centroid[1:], l5.centroid[1:]]), lines)
    assert out.tolist() == [True, True, False, False]


def _body(level, row, label=1):
    quad = np.array([[row - 12, 10], [row - 12, 40], [row + 12, 40], [row + 12, 10]], float)
    return pl.Structure(label, level, "vertebra", (2.0, float(row), 25.0), {2: quad}, {2: 720}, (2,))


def test_neighbour_bodies_name_the_detections_next_to_the_annotated_span():
    # annotated L3-L5 (rows 100, 140, 180) on a 1 mm grid; detections: the three annotated bodies,
    # one right below L5 (S1), one right above L3 (L2) and one far below (a sacral segment)
    structures = [_body("L3", 100, 1), _body("L4", 140, 2), _body("L5", 180, 3)]
    case = pl.PublicLumbarCase("t_01", "vb3", 1, "train", np.zeros((5, 300, 60), np.float32),
                               np.zeros((5, 300, 60), np.uint8), (1.0, 1.0), 4.0, {}, structures)
    detections = [{"polygons": _body("?", r).polygons, "centroid": (2.0, float(r), 25.0)}
                  for r in (100, 141, 179, 221, 60, 290)]
    found = {s.level: s.centroid[1] for s in pl.neighbour_bodies(case, detections)}
    assert found == {"S1": 221.0, "L2": 60.0}
    assert all(s.derived for s in pl.neighbour_bodies(case, detections))
    # nothing at a plausible distance below: S1 is not invented
    found = {s.level for s in pl.neighbour_bodies(case, detections[:3] + detections[5:])}
    assert found == set()
