"""Detection stage: targets <-> decoding, grouping, tiling, loss masking, shipped weights."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from spinecohort.detect import (
    CHANNEL_CORNER,
    DetectedVertebra,
    Detector,
    DetectorConfig,
    SliceQuad,
    decode_slice,
    drop_lateral,
    find_body_below,
    group_across_slices,
    merge_fragments,
    is_valid_quad,
    merge_tiles,
    plan_tiles,
    point_in_quad,
    polygon_iou,
    save_checkpoint,
    unmirror_maps,
)
from spinecohort.shipped import default_model_path
from spinecohort.training.detector import TargetConfig, detection_loss, make_targets

MODEL = default_model_path("detector")


def _quad(r, c, h, w, tilt=0.0):
    pts = np.array([[-h / 2, -w / 2], [-h / 2, w / 2], [h / 2, w / 2], [h / 2, -w / 2]])
    rot = np.array([[np.cos(tilt), -np.sin(tilt)], [np.sin(tilt), np.cos(tilt)]])
    return pts @ rot.T + [r, c]


def test_quad_geometry():
    q = _quad(50, 50, 20, 30)
    assert is_valid_quad(q)
    assert not is_valid_quad(q[[1, 0, 3, 2]])  # mirrored order turns the wrong way
    assert point_in_quad((50, 50), q) and not point_in_quad((80, 50), q)
    assert polygon_iou(q, q) == pytest.approx(1.0)
    assert polygon_iou(q, q + [0, 15]) == pytest.approx(1 / 3, abs=1e-6)
    assert polygon_iou(q, q + [40, 0]) == 0.0


def test_targets_decode_roundtrip():
    """Targets made from known polygons decode back to the same polygons within a pixel,
    including small, tightly packed (cervical-like) bodies and tilted ones."""
    polys = [_quad(40 + i * 28, 80 + i * 4, 20, 30, 0.15 * i) for i in range(5)]
    polys += [_quad(30 + i * 12.5, 30, 9, 12, 0.1) for i in range(8)]
    heat, vec, vmask = make_targets(polys, (192, 192))
    assert heat.shape == (5, 192, 192) and vec.shape == (8, 192, 192) and vmask.shape == (4, 192, 192)
    # channel c holds corner CHANNEL_CORNER[c]; the peak sits on that corner
    r, c = np.round(polys[0][CHANNEL_CORNER[0]]).astype(int)
    assert heat[0, r, c] > 0.9
    quads = decode_slice(np.concatenate([heat, vec]), DetectorConfig())
    assert len(quads) == len(polys)
    for p in polys:
        best = max(quads, key=lambda q: polygon_iou(q.quad, p))
        assert np.abs(best.quad - p).max() < 1.0


def test_unmirror_maps_inverts_an_anterior_posterior_mirror():
    """The maps of a cols-mirrored tile, unmirrored, are the original tile's maps (corner
    channels swap sides, x arrows change sign), so flip test-time augmentation can average them."""
    polys = [_quad(40 + i * 30, 70 + i * 6, 22, 30, 0.2 - 0.1 * i) for i in range(4)]
    width = 160
    mirrored = [(p * [1, -1] + [0, width - 1])[[1, 0, 3, 2]] for p in polys]  # still geometric order
    heat, vec, _ = make_targets(polys, (192, width))
    heat_m, vec_m, _ = make_targets(mirrored, (192, width))
    maps = torch.from_numpy(np.concatenate([heat, vec]))
    back = unmirror_maps(torch.from_numpy(np.concatenate([heat_m, vec_m])))
    assert torch.allclose(back, maps, atol=1e-3)  # (targets are cut off 3 sigma out, asymmetrically)
    quads = decode_slice(((maps + back) / 2).numpy(), DetectorConfig())
    assert len(quads) == len(polys)
    for p in polys:
        assert min(np.abs(q.quad - p).max() for q in quads) < 1.0


def test_decode_rebuilds_one_missing_corner_and_drops_two():
    p = _quad(60, 60, 24, 32)
    heat, vec, _ = make_targets([p], (128, 128))
    maps = np.concatenate([heat, vec])
    one = maps.copy()
    one[0] = 0  # channel 0 = SP corner missing -> rebuilt from the IA corner's arrow
    quads = decode_slice(one, DetectorConfig())
    assert len(quads) == 1 and np.abs(quads[0].quad - p).max() < 1.0
    two = one.copy()
    two[1] = 0
    assert decode_slice(two, DetectorConfig()) == []


def test_group_across_slices():
    a, b = _quad(50, 50, 20, 30), _quad(80, 52, 20, 30)
    per_slice = {
        0: [SliceQuad(a, 0.9)],
        1: [SliceQuad(a + 0.5, 0.9), SliceQuad(b, 0.8)],
        2: [SliceQuad(a + 1.0, 0.9), SliceQuad(b + 0.5, 0.8)],
        3: [SliceQuad(b + 1.0, 0.8), SliceQuad(_quad(150, 150, 10, 10), 0.7)],  # single-slice blip
        5: [SliceQuad(b + 1.0, 0.8)],  # one skipped slice still joins b
    }
    groups = group_across_slices(per_slice, iou_threshold=0.25, max_gap=1, min_slices=2)
    assert len(groups) == 2
    slices = sorted(sorted(g) for g in groups)
    assert slices == [[0, 1, 2], [1, 2, 3, 5]]
    # largest IoU wins when two candidates overlap the same quad
    per_slice = {0: [SliceQuad(a, 1.0), SliceQuad(a + [12, 0], 1.0)], 1: [SliceQuad(a + [10, 0], 1.0)]}
    groups = group_across_slices(per_slice, 0.25, 1, 2)
    assert len(groups) == 1 and np.allclose(groups[0][0].quad, a + [12, 0])


def test_fragments_merge_and_lateral_groups_drop():
    a = _quad(50, 50, 20, 30)
    main = {s: SliceQuad(a, 0.9) for s in range(4, 10)}
    frag = {1: SliceQuad(a + 1, 0.5), 2: SliceQuad(a + 1, 0.5)}     # same body, 1 slice gap
    other = {s: SliceQuad(a + [60, 0], 0.9) for s in range(4, 10)}
    merged = merge_fragments([main, frag, other], 0.25, 3)
    assert sorted(len(g) for g in merged) == [6, 8]
    # a 2-slice detection on far-lateral slices (a facet or pedicle) is dropped; bodies stay
    column = [DetectedVertebra({s: _quad(40 + 30 * i, 50, 20, 30) for s in range(5, 12)}, (8.0, 40 + 30 * i, 50), 0.6)
              for i in range(5)]
    lateral = DetectedVertebra({0: _quad(85, 110, 10, 10), 1: _quad(85, 110, 10, 10)}, (0.5, 85, 110), 0.4)
    kept = drop_lateral(column + [lateral])
    assert len(kept) == 5 and lateral not in kept


def test_plan_tiles_and_median_merge():
    cfg = DetectorConfig()
    # a lumbar scan (~31 cm) is one pass; a whole-spine scan (~90 x 40 cm) is tiled
    assert plan_tiles((236, 236), cfg) == [(0, 236, 0, 236)]
    cfg.mm_per_px = 4.0  # coarse grid: same tiling in mm, small arrays
    shape = (int(900 / cfg.mm_per_px), int(400 / cfg.mm_per_px))
    tiles = plan_tiles(shape, cfg)
    rows = sorted({(t[0], t[1]) for t in tiles})
    cols = sorted({(t[2], t[3]) for t in tiles})
    assert len(rows) >= 2 and len(cols) >= 2
    # rows (90 cm) use whole-spine tiles (50 cm, 40 %), cols (40 cm) lumbar-size ones (25 cm, 30 %)
    assert rows[0][1] * cfg.mm_per_px == pytest.approx(cfg.whole_tile_mm, rel=0.01)
    assert cols[0][1] * cfg.mm_per_px == pytest.approx(cfg.tile_mm, rel=0.01)
    for axis, extent in ((rows, shape[0]), (cols, shape[1])):
        assert axis[0][0] == 0 and axis[-1][0] + axis[-1][1] == extent
        for (s0, n0), (s1, _) in zip(axis, axis[1:]):
            assert s1 < s0 + n0  # overlapping
    # merging tiles cut from one map gives the map back; overlaps take the median
    full = torch.randn(13, *shape)
    outs = [full[:, r0:r0 + rh, c0:c0 + cw] for r0, rh, c0, cw in tiles]
    assert torch.allclose(merge_tiles(outs, tiles, shape), full)
    noisy = [o.clone() for o in outs]
    noisy[0] += 100.0  # one outlier tile: with 3+ overlapping tiles the median ignores it
    merged = merge_tiles(noisy, tiles, shape)
    r0, rh, c0, cw = tiles[0]
    cover = torch.zeros(shape)
    for t in tiles:
        cover[t[0]:t[0] + t[1], t[2]:t[2] + t[3]] += 1
    three = cover >= 3
    assert torch.allclose(merged[:, three], full[:, three])
    # with a margin a tile does not vote next to an edge it shares with another tile, so a body
    # cut by that edge (half seen, low output there) does not dilute the tile that sees it whole
    cut = [o.clone() for o in outs]
    r0, rh, c0, cw = tiles[1]  # starts inside the image along the rows
    assert r0 > 0 or c0 > 0
    edge = int(0.1 * (rh if r0 > 0 else cw))
    if r0 > 0:
        cut[1][:, :edge] = 0.0
    else:
        cut[1][:, :, :edge] = 0.0
    assert torch.allclose(merge_tiles(cut, tiles, shape, margin=0.1), full)
    assert not torch.allclose(merge_tiles(cut, tiles, shape), full)
    assert torch.allclose(merge_tiles(outs, tiles, shape, margin=0.45), full)  # gaps fall back to all tiles


def test_loss_masking_and_balance():
    polys = [_quad(40, 40, 20, 30)]
    heat, vec, vmask = (torch.from_numpy(x)[None] for x in make_targets(polys, (96, 96)))
    pred = torch.cat([heat, vec], dim=1).clone()
    valid = torch.ones(1, 1, 96, 96)
    loss0, _ = detection_loss(pred, heat, vec, vmask, valid)
    assert float(loss0) == pytest.approx(0.0, abs=1e-6)
    # a false peak inside a masked-out region costs nothing; outside it, it does
    bad = pred.clone()
    bad[:, 4, 80:90, 80:90] = 1.0
    masked = valid.clone()
    masked[:, :, 70:, 70:] = 0
    assert float(detection_loss(bad, heat, vec, vmask, masked)[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(detection_loss(bad, heat, vec, vmask, valid)[0]) > 0
    # class balance: missing the small positive set costs as much as a uniform error on negatives
    miss = pred.clone()
    miss[:, :5] = 0
    _, parts = detection_loss(miss, heat, vec, vmask, valid, TargetConfig())
    assert parts["heat_pos"] > 0.2 and parts["heat_neg"] < 0.05
    # vector errors only count inside the neighbourhoods
    off = pred.clone()
    off[:, 5:] += (1 - vmask.repeat(1, 2, 1, 1)) * 50.0
    assert float(detection_loss(off, heat, vec, vmask, valid)[1]["vec"]) == pytest.approx(0.0, abs=1e-6)


class _Oracle(torch.nn.Module):
    """Stands in for a network: returns fixed maps for every tile (tests the stage plumbing)."""

    def __init__(self, maps: torch.Tensor):
        super().__init__()
        self.maps = maps

    def forward(self, x):
        h, w = x.shape[-2:]
        out = torch.zeros(x.shape[0], 13, h, w)
        mh, mw = min(h, self.maps.shape[1]), min(w, self.maps.shape[2])
        out[:, :, :mh, :mw] = self.maps[:, :mh, :mw]
        return out


def test_detector_plumbing_with_oracle_and_checkpoint(tmp_path):
    cfg = DetectorConfig(arch="cpu-unet", arch_kwargs={"widths": [8, 8, 8, 8, 8], "head_width": 8})
    # a 200 x 200 px slice at 1.3 mm -> one tile on the network grid (no resampling)
    cfg.mm_per_px = 1.3
    polys = [_quad(60, 90, 24, 32), _quad(100, 92, 24, 32)]
    heat, vec, _ = make_targets(polys, (224, 224))
    det = Detector(_Oracle(torch.from_numpy(np.concatenate([heat, vec]))), cfg)
    vol = np.random.default_rng(0).random((4, 200, 200)).astype(np.float32)
    found = det.detect(vol, (1.3, 1.3))
    assert len(found) == 2 and isinstance(found[0], DetectedVertebra)
    assert found[0].centroid[1] > found[1].centroid[1]  # caudal first
    assert sorted(found[0].polygons) == [0, 1, 2, 3]
    assert np.abs(found[0].polygons[1] - polys[1]).max() < 1.0
    # flips map polygons back into the caller's grid with anatomical corner order
    flipped = det.detect(vol[:, ::-1].copy(), (1.3, 1.3), flip_rows=True)
    q = flipped[0].polygons[0]
    assert is_valid_quad(q)
    assert np.abs(q - (polys[0] * [-1, 1] + [199, 0])[[3, 2, 1, 0]]).max() < 1.0
    # batch of scans = the same as one at a time
    many = det.detect_batch([vol, vol[:3]], [(1.3, 1.3), (1.3, 1.3)])
    assert [len(x) for x in many] == [2, 2]
    # checkpoint round trip (fp16 weights, config inside)
    from spinecohort.detect import build_network

    real = build_network(cfg)
    path = tmp_path / "d.pt"
    save_checkpoint(path, real, cfg, {"note": "test"})
    loaded = Detector.load(path)
    assert loaded.config == cfg and loaded.meta["note"] == "test"
    for k, v in real.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(loaded.net.state_dict()[k], v.half().float())


def test_official_wrapper_uses_official_constants():
    det = Detector.official(_Oracle(torch.zeros(13, 224, 224)))
    assert det.config.arch == "official"
    assert det.config.mm_per_px == pytest.approx(260 / 224)
    assert det.config.overlap == 0.4 and det.config.corner_threshold == 0.6
    # a 512 x 512 slice at 0.6 mm is cut into 2 x 2 tiles of 224 px, as the reference does
    shape = (round(512 * 0.6 / det.config.mm_per_px),) * 2
    tiles = plan_tiles(shape, det.config)
    assert len(tiles) == 4 and {t[1] for t in tiles} == {224}
    assert det.detect(np.zeros((1, 512, 512), np.float32), (0.6, 0.6)) == []


@pytest.mark.skipif(not MODEL.exists(), reason="shipped detector weights not present")
@pytest.mark.skipif(importlib.util.find_spec("spinecohort.synthetic") is None, reason="no synthetic generator")
def test_shipped_weights_detect_synthetic_scan():
    from spinecohort import synthetic

    assert MODEL.stat().st_size < 8 * 2 ** 20
    det = Detector.load(MODEL)
    scan = synthetic.generate_scan(424242, fov="lumbar", contrast="T2")
    found = det.detect(scan.volume, (scan.pixel_spacing_mm, scan.pixel_spacing_mm))
    truth = [v for v in scan.vertebrae if not v.partial]
    hit = 0
    for v in truth:
        s = int(round(v.centroid[0]))
        inside = [d for d in found if (q := d.polygon_near(s)) is not None and point_in_quad(v.centroid[1:], q)]
        hit += len(inside) == 1
    assert hit >= len(truth) - 1
    assert all(d.centroid[1] >= e.centroid[1] for d, e in zip(found, found[1:]))
    for d in found:
        for q in d.polygons.values():
            assert q.shape == (4, 2) and is_valid_quad(q)


def _body(r, c, h=20.0, w=24.0, score=0.9):
    return DetectedVertebra({0: _quad(r, c, h, w)}, (0.0, float(r), float(c)), score)


def test_find_body_below_takes_the_best_weak_body_one_step_down_the_column():
    column = [_body(200, 100), _body(170, 95), _body(140, 90)]  # caudal first, 30 px apart
    step_down = _body(228, 104, score=0.3)
    weaker = _body(232, 106, score=0.2)
    too_far = _body(275, 112, score=0.8)        # 2.5 spacings: a body further down, not the next
    off_column = _body(225, 130, score=0.8)    # 30 px beside the column's line
    overlapping = _body(205, 101, score=0.9)   # the lowest body found again
    found = find_body_below(column, [weaker, too_far, off_column, overlapping, step_down], (1.0, 1.0))
    assert found is not None and found.centroid == step_down.centroid
    assert found.found_at_low_threshold and not step_down.found_at_low_threshold
    assert find_body_below(column, [too_far, off_column, overlapping], (1.0, 1.0)) is None
    assert find_body_below(column[:1], [step_down], (1.0, 1.0)) is None  # no column to follow
    # distances are measured on the network's isotropic grid: 15 px beside the line is within
    # half a spacing at square pixels, 45 px (too far) where the columns are resampled 3x
    beside = _body(228, 115, score=0.3)
    assert find_body_below(column, [beside], (1.0, 1.0)) is not None
    assert find_body_below(column, [beside], (1.0, 3.0)) is None


def test_search_below_is_off_for_the_official_constants():
    assert DetectorConfig.official().search_below_threshold == 0.0
    assert Detector.load(MODEL).config.search_below_threshold > 0
