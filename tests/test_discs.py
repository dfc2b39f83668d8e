"""IVV extraction: geometry (rotation, 2:1 aspect, width), slice alignment and 9-slice
padding/cropping, intensity normalisation, the coordinate round trip, storage."""
from __future__ import annotations

import math

import numpy as np
import pytest

from spinecohort.discs import (IVV_SHAPE, estimated_s1, estimated_upper, extract_ivv, extract_ivvs, load_ivvs, polygon_mask,
                               save_ivvs, vertebrae_from_synthetic)
from spinecohort.tasks import LUMBAR_DISCS


def _rot(v, ang):
    c, s = math.cos(ang), math.sin(ang)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def tilted_pair(angle_deg=20.0, n_slices=7, detected=range(1, 6), centre_slice=3.0, spacing=(0.8, 0.8),
                body_w_mm=32.0, body_h_mm=24.0, disc_mm=8.0, seed=0, lower_wider=1.0):
    """Two textured rectangular bodies (upper above lower) with a dark disc between, tilted by
    ``angle_deg`` (endplates along a direction at that angle from the col axis), in mm geometry
    on a grid with ``spacing``. Returns (volume, spacing, vertebrae dicts, body mask per slice)."""
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing, float)
    rows, cols = int(160 / sp[0]), int(160 / sp[1])
    ang = math.radians(angle_deg)
    e_h = np.array([math.sin(ang), math.cos(ang)])  # along the endplate, (row, col) mm
    e_v = np.array([math.cos(ang), -math.sin(ang)])  # toward the feet
    centre = np.array([80.0, 80.0])

    def body(offset_v, w):
        c = centre + e_v * offset_v
        hw, hh = w / 2, body_h_mm / 2
        sa = c - e_v * hh - e_h * hw
        spp = c - e_v * hh + e_h * hw
        ip = c + e_v * hh + e_h * hw
        ia = c + e_v * hh - e_h * hw
        return np.array([sa, spp, ip, ia]), c

    up_mm, up_c = body(-(body_h_mm + disc_mm) / 2, body_w_mm)
    lo_mm, lo_c = body((body_h_mm + disc_mm) / 2, body_w_mm * lower_wider)
    vol = np.zeros((n_slices, rows, cols), np.float32) + 30.0
    vol += rng.normal(0, 3, vol.shape).astype(np.float32)
    disc = np.array([up_mm[3], up_mm[2], lo_mm[1], lo_mm[0]])
    polys = {"up": {}, "lo": {}}
    for s in detected:
        for name, pmm in (("up", up_mm), ("lo", lo_mm)):
            ppx = pmm / sp
            polys[name][s] = ppx
            sl, m = polygon_mask(ppx, (rows, cols))
            tex = rng.uniform(170, 230, m.shape).astype(np.float32)
            vol[s][sl] = np.where(m, tex, vol[s][sl])
        sl, m = polygon_mask(disc / sp, (rows, cols))
        vol[s][sl] = np.where(m, 60.0, vol[s][sl])
    cs = float(centre_slice)
    verts = [
        {"vertebra_id": 0, "level": "L5", "polygons": polys["lo"], "centroid": (cs, *(lo_c / sp))},
        {"vertebra_id": 1, "level": "L4", "polygons": polys["up"], "centroid": (cs, *(up_c / sp))},
    ]
    return vol, tuple(spacing), verts


@pytest.mark.parametrize("angle", [-25.0, 0.0, 20.0])
def test_rotation_makes_upper_inferior_endplate_horizontal(angle):
    vol, sp, verts = tilted_pair(angle)
    ivv = extract_ivv(vol, sp, verts[1], verts[0])
    assert ivv.volume.shape == IVV_SHAPE and ivv.volume.dtype == np.float32
    assert ivv.level == "L4-L5" and ivv.upper == "L4" and ivv.lower == "L5"
    assert math.isclose(ivv.angle_rad, math.radians(angle), abs_tol=1e-9)
    # the endplate corners land on one IVV row, anterior left of posterior
    up = verts[1]["polygons"][3]
    pts = ivv.to_ivv([[3, *up[3]], [3, *up[2]]])
    assert abs(pts[0, 1] - pts[1, 1]) < 1e-6
    assert pts[0, 2] < pts[1, 2]
    # image check: the body -> disc transition is on the same row across the disc
    mid = ivv.volume[4]
    edge_rows = []
    for j in (80, 112, 144):
        col = mid[:, j]
        edge_rows.append(int(np.argmax(col[:-3] - col[3:])))  # strongest bright -> dark step downward
    assert max(edge_rows) - min(edge_rows) <= 1
    assert abs(np.mean(edge_rows) + 1.5 - pts[0, 1]) <= 2.0


def test_box_is_2_to_1_and_twice_the_wider_body():
    vol, sp, verts = tilted_pair(12.0, lower_wider=1.25)
    ivv = extract_ivv(vol, sp, verts[1], verts[0])
    assert ivv.width_px / ivv.height_px == pytest.approx(2.0)
    assert ivv.width_mm == pytest.approx(2 * 32.0 * 1.25, rel=1e-6)
    assert ivv.height_mm == pytest.approx(32.0 * 1.25, rel=1e-6)
    assert ivv.width_px == pytest.approx(ivv.width_mm / 0.8)
    # the stored corners are the box: SA, SP, IP, IA map to the IVV's outer pixel edges
    c = ivv.to_ivv(np.column_stack([np.full(4, ivv.mid_slice), ivv.box_corners]))
    np.testing.assert_allclose(c[:, 1:], [[-0.5, -0.5], [-0.5, 223.5], [111.5, 223.5], [111.5, -0.5]], atol=1e-6)
    side = np.hypot(*((ivv.box_corners[1] - ivv.box_corners[0]) * 0.8))
    assert side == pytest.approx(ivv.width_mm)


def test_non_square_pixels_keep_the_endplate_horizontal():
    vol, sp, verts = tilted_pair(15.0, spacing=(0.6, 0.9))
    ivv = extract_ivv(vol, sp, verts[1], verts[0])
    up = verts[1]["polygons"][3]
    pts = ivv.to_ivv([[3, *up[3]], [3, *up[2]]])
    assert abs(pts[0, 1] - pts[1, 1]) < 1e-6
    assert ivv.width_mm == pytest.approx(64.0, rel=1e-6)


def test_slices_aligned_on_mid_slice_and_padded_to_nine():
    vol, sp, verts = tilted_pair(5.0, n_slices=7, detected=range(1, 6), centre_slice=3.0)
    ivv = extract_ivv(vol, sp, verts[1], verts[0])
    assert ivv.mid_slice == 3
    assert ivv.slices == [-1, -1, 1, 2, 3, 4, 5, -1, -1]
    for k, s in enumerate(ivv.slices):
        if s < 0:
            assert not ivv.volume[k].any()
        else:
            assert ivv.volume[k].max() > 0.3


def test_slices_cropped_to_nine_around_the_centroids():
    vol, sp, verts = tilted_pair(5.0, n_slices=15, detected=range(0, 15), centre_slice=8.4)
    ivv = extract_ivv(vol, sp, verts[1], verts[0])
    assert ivv.mid_slice == 8
    assert ivv.slices == list(range(4, 13))
    # off-centre: the window follows the centroids and pads past the last detected slice
    vol, sp, verts = tilted_pair(5.0, n_slices=15, detected=range(0, 15), centre_slice=12.6)
    ivv = extract_ivv(vol, sp, verts[1], verts[0])
    assert ivv.slices == [9, 10, 11, 12, 13, 14, -1, -1, -1]


def test_intensity_median_of_bodies_is_half_and_clipped():
    vol, sp, verts = tilted_pair(10.0)
    vol[3, 98:102, 98:102] = 5000.0  # bright artefact inside the disc
    ivv = extract_ivv(vol, sp, verts[1], verts[0])
    assert ivv.volume.min() >= 0.0 and ivv.volume.max() <= 1.0
    assert ivv.volume[4].max() == 1.0
    for k, s in enumerate(ivv.slices):
        if s < 0:
            continue
        # per slice: source median over the two bodies maps to 0.5 exactly
        vals = []
        for v in verts:
            sl, m = polygon_mask(v["polygons"][s], vol.shape[1:])
            vals.append(vol[s][sl][m])
        med = float(np.median(np.concatenate(vals)))
        assert ivv.medians[k] == pytest.approx(med)
        # and the IVV voxels well inside the bodies have median ~0.5
        body = np.zeros(ivv.volume.shape[1:], bool)
        body[4:22, 70:154] = True  # upper body strip (bodies fill rows ~0..40 of 112)
        body[90:108, 70:154] = True
        assert np.median(ivv.volume[k][body]) == pytest.approx(0.5, abs=0.03)


def test_centre_round_trip_to_source_grid():
    vol, sp, verts = tilted_pair(-17.0, spacing=(0.7, 0.75), centre_slice=3.2)
    ivv = extract_ivv(vol, sp, verts[1], verts[0])
    expected = (np.asarray(verts[0]["centroid"]) + np.asarray(verts[1]["centroid"])) / 2
    np.testing.assert_allclose(ivv.centre, expected)
    # the IVV's centre pixel sits on the disc centre of the mid slice
    src = ivv.to_source([[4, 55.5, 111.5]])[0]
    np.testing.assert_allclose(src, [ivv.mid_slice, expected[1], expected[2]], atol=1e-9)
    np.testing.assert_allclose(ivv.to_source(ivv.to_ivv([ivv.centre]))[0], ivv.centre, atol=1e-9)
    rng = np.random.default_rng(1)
    pts = rng.uniform([0, 0, 0], [9, 112, 224], (20, 3))
    np.testing.assert_allclose(ivv.to_ivv(ivv.to_source(pts)), pts, atol=1e-9)
    # a voxel sampled at an IVV pixel equals the (normalised) source value there
    k, i, j = 4, 30, 100
    s, r, c = ivv.to_source([[k, i, j]])[0]
    from scipy import ndimage

    val = ndimage.map_coordinates(vol[int(s)].astype(np.float64), [[r], [c]], order=3, mode="nearest")[0]
    assert ivv.volume[k, i, j] == pytest.approx(min(max(val * 0.5 / ivv.medians[k], 0), 1), abs=1e-4)


def test_extract_ivvs_levels_and_unlabelled():
    vol, sp, verts = tilted_pair(8.0)
    extra = dict(verts[1], level=None, vertebra_id=2)
    # the unlabelled detection is not used: L3-L4's upper body is only estimated above L4
    ivvs = extract_ivvs(vol, sp, verts + [extra], levels=("L4-L5", "L3-L4"))
    assert [v.level for v in ivvs] == ["L4-L5", "L3-L4"] and ivvs[1].upper_estimated and ivvs[1].upper_id is None
    assert extract_ivvs(vol, sp, verts, levels=("L2-L3",)) == []  # neither body labelled
    ivv = extract_ivvs(vol, sp, verts, levels=("L4-L5",))[0]
    assert (ivv.upper_id, ivv.lower_id) == (1, 0) and not ivv.upper_estimated


def test_disc_above_the_topmost_body_is_placed_when_in_view():
    angle = 15.0
    vol, sp, verts = tilted_pair(angle_deg=angle)  # L4 above L5, 24 mm bodies, 8 mm disc
    ivvs = {v.level: v for v in extract_ivvs(vol, sp, verts, levels=("L3-L4", "L4-L5"))}
    l34, l45 = ivvs["L3-L4"], ivvs["L4-L5"]
    assert l34.upper_estimated and not l34.lower_estimated and not l45.upper_estimated
    # L3 one body plus one disc (L4-L5's, 8 mm) above L4 along L4's axis: the disc centre lies 16 mm
    # above L4's centroid (the pair's centre is (80, 80) mm, L4 16 mm above it)
    a = math.radians(angle)
    e_v = np.array([math.cos(a), -math.sin(a)])
    np.testing.assert_allclose(np.asarray(l34.centre[1:]) * np.asarray(sp), np.array([80.0, 80.0]) - 32.0 * e_v,
                               atol=0.3)
    assert math.isclose(l34.angle_rad, l45.angle_rad, abs_tol=1e-6)  # parallel to L4's superior endplate
    # the intensity scale is L4's alone
    window, inside = polygon_mask(verts[1]["polygons"][3], vol.shape[1:])
    assert l34.medians[4] == pytest.approx(float(np.median(vol[3][window][inside])))
    # out of the image (a series ending just above L4) or above a transitional count: nothing
    l4_top_row = min(p[:, 0].min() for p in verts[1]["polygons"].values())
    assert estimated_upper(vol.shape, sp, verts[1], "L3", verts[0]) is not None
    shifted = [dict(v, polygons={k: p - [l4_top_row - 3, 0] for k, p in v["polygons"].items()},
                    centroid=np.subtract(v["centroid"], [0, l4_top_row - 3, 0])) for v in verts]
    assert [v.level for v in extract_ivvs(vol, sp, shifted, levels=("L3-L4", "L4-L5"))] == ["L4-L5"]
    six = [dict(verts[0], level="L6"), dict(verts[1], level="L5")]
    assert [v.level for v in extract_ivvs(vol, sp, six, levels=("L4-L5", "L5-L6"))] == []


def test_synthetic_scan_and_storage(tmp_path):
    from spinecohort.synthetic import generate_scan

    scan = generate_scan(3, fov="lumbar", n_slices=9, rows=224)
    ivvs = extract_ivvs(scan.volume, scan.pixel_spacing_mm, vertebrae_from_synthetic(scan), levels=LUMBAR_DISCS)
    assert [v.level for v in ivvs] == ["L5-S1", "L4-L5", "L3-L4", "L2-L3", "L1-L2", "T12-L1"]
    truth = {d.level: d.centre for d in scan.discs}
    for v in ivvs:
        assert v.volume.shape == IVV_SHAPE
        assert 0.0 <= v.volume.min() and v.volume.max() <= 1.0
        # the box centre is close to the truth disc centre (centroid midpoint vs disc quad centre)
        assert np.hypot(*(np.subtract(v.centre[1:], truth[v.level][1:]) * scan.pixel_spacing_mm)) < 5.0
    path = save_ivvs(tmp_path / "scan.npz", ivvs)
    vols, levels = load_ivvs(path)
    assert vols.dtype == np.float16 and vols.shape == (6, *IVV_SHAPE)
    assert levels == [v.level for v in ivvs]
    np.testing.assert_allclose(vols[2], ivvs[2].volume, atol=1e-3)
    with np.load(path) as z:
        assert z["slices"].shape == (6, 9) and z["box_corners"].shape == (6, 4, 2)


def test_l5_s1_placed_below_l5_when_the_sacrum_is_not_detected():
    angle = 15.0
    vol, sp, verts = tilted_pair(angle_deg=angle)  # L4 above L5, 24 mm bodies, 8 mm disc, no S1
    ivvs = {v.level: v for v in extract_ivvs(vol, sp, verts, levels=("L4-L5", "L5-S1"))}
    assert set(ivvs) == {"L4-L5", "L5-S1"}
    l5s1 = ivvs["L5-S1"]
    assert l5s1.lower_estimated and l5s1.lower_id is None and l5s1.upper_id == 0
    assert not ivvs["L4-L5"].lower_estimated
    # one L5 body height plus the L4-L5 disc height below L5 along its axis: the disc centre lies
    # half that step below L5's centroid (the tilted pair's centre is (80, 80) mm, L5 16 mm below)
    a = math.radians(angle)
    e_v = np.array([math.cos(a), -math.sin(a)])
    np.testing.assert_allclose(np.asarray(l5s1.centre[1:]) * np.asarray(sp), np.array([80.0, 80.0]) + 32.0 * e_v,
                               atol=0.3)
    assert math.isclose(l5s1.angle_rad, ivvs["L4-L5"].angle_rad, abs_tol=1e-9)  # L5's endplate, as for any disc
    assert math.isclose(l5s1.width_mm, ivvs["L4-L5"].width_mm, rel_tol=1e-6)
    # the intensity scale is L5's alone: the guessed outline below it does not enter the median
    window, inside = polygon_mask(verts[0]["polygons"][3], vol.shape[1:])
    assert l5s1.medians[4] == pytest.approx(float(np.median(vol[3][window][inside])))


def test_no_estimated_s1_outside_the_image_or_below_a_sixth_lumbar_body():
    vol, sp, verts = tilted_pair(angle_deg=0.0)
    l5_bottom_row = max(p[:, 0].max() for p in verts[0]["polygons"].values())
    cut = vol[:, : int(l5_bottom_row) + 5]  # the image ends just below L5: the sacrum is not in view
    assert [v.level for v in extract_ivvs(cut, sp, verts, levels=("L4-L5", "L5-S1"))] == ["L4-L5"]
    # six lumbar vertebrae: the body below "L5" is L6, so S1 is not where L5's neighbour would be
    six = [dict(verts[0], level="L6"), dict(verts[1], level="L5")]
    assert extract_ivvs(vol, sp, six, levels=("L4-L5", "L5-S1")) == []


def test_a_weakly_detected_s1_names_l5_s1_but_l5_places_its_box():
    vol, sp, verts = tilted_pair(angle_deg=15.0)  # verts[0] is L5, verts[1] L4
    estimated = {v.level: v for v in extract_ivvs(vol, sp, verts, levels=("L5-S1",))}["L5-S1"]
    # a weak S1 outline a few mm off where the sacrum is: the box ignores it
    s1_polygons = {s: q + [6.0, 3.0] for s, q in estimated_s1(vol.shape, sp, verts[0], verts[1])["polygons"].items()}
    weak = {"level": "S1", "vertebra_id": 2, "polygons": s1_polygons, "centroid": (3.0, 0.0, 0.0),
            "found_at_low_threshold": True}
    l5s1 = {v.level: v for v in extract_ivvs(vol, sp, verts + [weak], levels=("L5-S1",))}["L5-S1"]
    assert l5s1.lower_estimated and np.allclose(l5s1.box_corners, estimated.box_corners)
    strong = dict(weak, found_at_low_threshold=False)  # a detected S1 sets the box itself
    placed = {v.level: v for v in extract_ivvs(vol, sp, verts + [strong], levels=("L5-S1",))}["L5-S1"]
    assert not placed.lower_estimated and placed.lower_id == 2
    assert not np.allclose(placed.box_corners, estimated.box_corners)
