"""Labeller training data: SPIDER slices supervised by a teacher's confident decodings."""
from __future__ import annotations

import numpy as np
from PIL import Image

from spinecohort.detect import Detector
from spinecohort.label import LevelSummary
from spinecohort.shipped import default_model_path
from spinecohort.synthetic import generate_scan
from spinecohort.tasks import LEVEL_INDEX, LEVELS
from spinecohort.training.labeller import spider_pseudo_items

LUMBAR_FROM_BOTTOM = ["S1", "L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9"]


class ScriptedTeacher:
    """Names the detections from the bottom up with ``levels`` and reports ``flags``, per series
    (in the order the series are read)."""

    def __init__(self, script):
        self.script = list(script)
        self.calls = 0

    def label_scan(self, volume, spacing, slice_spacing, verts):
        levels, flags = self.script[self.calls]
        self.calls += 1
        order = sorted(range(len(verts)), key=lambda i: -verts[i]["centroid"][1])  # caudal first
        out = [(None, float("nan"))] * len(verts)
        for rank, i in enumerate(order):
            out[i] = (levels[rank] if rank < len(levels) else None, 0.9)
        return out, LevelSummary(0.9, tuple(flags))


def write_spider_folder(root, n_series):
    """A SPIDER-like folder (series.csv, images/<series>.png) of phantom mid-sagittal slices."""
    (root / "images").mkdir(parents=True)
    rows = []
    for k in range(n_series):
        scan = generate_scan(11, fov="lumbar", contrast="T2", n_slices=5, rows=256)
        mid = scan.volume[scan.volume.shape[0] // 2]
        img = np.clip(255 * (mid - mid.min()) / (np.ptp(mid) + 1e-6), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"{k}_t2.png")
        rows.append(f"{k}_t2,{k},t2,{scan.pixel_spacing_mm},4.0")
    (root / "series.csv").write_text("series,patient,sequence,pixel_spacing_mm,slice_thickness_mm\n"
                                     + "\n".join(rows) + "\n")


def test_spider_pseudo_items_keep_only_confident_decodings_with_an_s1(tmp_path):
    write_spider_folder(tmp_path, 3)
    teacher = ScriptedTeacher([
        (LUMBAR_FROM_BOTTOM, ()),                                   # kept
        (LUMBAR_FROM_BOTTOM, ("counting_variant_suspected",)),      # flagged: skipped
        (LUMBAR_FROM_BOTTOM[1:], ()),                               # no S1: skipped
    ])
    items = spider_pseudo_items(Detector.load(default_model_path("detector")), teacher, tmp_path, k_jitter=2,
                                log=lambda _: None, tight_share=0.0)
    assert teacher.calls == 3
    assert [it["name"] for it in items] == ["0_t2"]
    item = items[0]
    geometry = item["geometry"]  # level, top, bottom, ... (mm), as the synthetic items
    assert len(geometry) >= 5
    # the teacher's caudal-first names land on the bodies from the bottom up
    caudal_first = geometry[np.argsort(-geometry[:, 1])]
    assert [int(g[0]) for g in caudal_first[:3]] == [LEVEL_INDEX["S1"], LEVEL_INDEX["L5"], LEVEL_INDEX["L4"]]
    assert item["crops"].dtype == np.uint8 and item["crops"].shape[0] == 2 * len(geometry)
    assert set(item["labels"].tolist()) == set(int(g[0]) for g in geometry)


def test_spider_pseudo_items_add_a_tightly_framed_copy_ending_inside_or_below_s1(tmp_path):
    write_spider_folder(tmp_path, 1)
    teacher = ScriptedTeacher([(LUMBAR_FROM_BOTTOM, ())])
    full, tight = spider_pseudo_items(Detector.load(default_model_path("detector")), teacher, tmp_path,
                                      k_jitter=1, log=lambda _: None, tight_share=1.0)
    assert (full["fov"], tight["fov"]) == ("spider", "spider-tight")
    assert tight["height_mm"] < full["height_mm"]
    s1 = full["geometry"][full["geometry"][:, 0] == LEVEL_INDEX["S1"]][0]  # level, top, bottom (mm)
    # the cut lies between 30 % down S1 and half an S1 height below it; S1 stays, nothing below it
    assert s1[1] + 0.3 * (s1[2] - s1[1]) - 1 <= tight["height_mm"] <= s1[2] + 0.5 * (s1[2] - s1[1]) + 1
    assert LEVEL_INDEX["S1"] in tight["geometry"][:, 0]
    assert (tight["geometry"][:, 1] < tight["height_mm"]).all()


def _random_appearance_checkpoint(path, seed, cfg=None):
    import torch

    from spinecohort.label import AppearanceConfig, build_appearance_net, save_labeller_checkpoint

    torch.manual_seed(seed)
    cfg = cfg or AppearanceConfig()
    net = build_appearance_net(cfg)
    save_labeller_checkpoint(path, net, cfg, {"seed": seed})
    return path


def test_an_appearance_ensemble_reads_as_the_mean_of_its_members_log_probabilities(tmp_path):
    import pytest
    import torch

    from spinecohort.label import APPEARANCE_FORMAT, AppearanceConfig, build_appearance_net, load_labeller_net
    from spinecohort.nets.labeller_cpu import AppearanceEnsemble
    from spinecohort.training.labeller import combine_appearance

    paths = [_random_appearance_checkpoint(tmp_path / f"member{k}.pt", k) for k in range(3)]
    out = combine_appearance(paths, tmp_path / "ensemble.pt")
    ensemble, cfg, meta = load_labeller_net(out, APPEARANCE_FORMAT, AppearanceConfig, build_appearance_net)
    assert isinstance(ensemble, AppearanceEnsemble) and cfg.arch_kwargs["members"] == 3
    assert [m["file"] for m in meta["members"]] == ["member0.pt", "member1.pt", "member2.pt"]
    assert all(len(m["sha256"]) == 64 and m["meta"]["seed"] == k for k, m in enumerate(meta["members"]))

    x = torch.rand(5, 1, *cfg.grid)
    f = torch.randn(5, 2)
    with torch.no_grad():
        members = [load_labeller_net(p, APPEARANCE_FORMAT, AppearanceConfig, build_appearance_net)[0] for p in paths]
        expected = torch.stack([torch.log_softmax(m(x, f), 1) for m in members]).mean(0)
        got = ensemble(x, f)
    assert torch.allclose(got, expected, atol=1e-5)
    # members differ, so the ensemble is not any one of them
    assert not torch.allclose(got, torch.log_softmax(members[0](x, f), 1), atol=1e-3)

    with pytest.raises(ValueError, match="at least two"):
        combine_appearance(paths[:1], tmp_path / "one.pt")
    with pytest.raises(ValueError, match="already an ensemble"):
        combine_appearance([out, paths[0]], tmp_path / "nested.pt")
    other = _random_appearance_checkpoint(tmp_path / "other.pt", 9, AppearanceConfig(inplane_extent=0.5))
    with pytest.raises(ValueError, match="configuration differs"):
        combine_appearance([paths[0], other], tmp_path / "mixed.pt")


def test_rotation_augmentation_turns_the_crop_and_is_off_by_default():
    from spinecohort.training.labeller import augment_batch

    x = np.zeros((1, 2, 48, 48), np.float32)
    x[:, :, 23:25, 4:44] = 1.0  # a horizontal bar, like an endplate

    def tilt(v):  # angle of the bar's principal axis from the rows, degrees (inversion-proof)
        d = np.abs(v - np.median(v))
        rows, cols = np.unravel_index(np.argsort(d, axis=None)[-80:], d.shape)
        w, e = np.linalg.eigh(np.cov(np.stack([cols - cols.mean(), rows - rows.mean()])))
        t = abs(np.degrees(np.arctan2(e[1, -1], e[0, -1]))) % 180
        return min(t, 180 - t)

    flat = [tilt(augment_batch(x, np.random.default_rng(s))[0, 0]) for s in range(8)]
    turned = [tilt(augment_batch(x, np.random.default_rng(s), rotate_deg=30)[0, 0]) for s in range(8)]
    assert max(flat) < 3.0
    assert max(turned) > 8.0 and max(turned) < 33.0


def test_tight_cut_ends_the_image_inside_or_just_below_s1_and_drops_the_bodies_below():
    from spinecohort.label import AppearanceConfig
    from spinecohort.training.labeller import tight_cut_items

    scan = next(sc for sc in (generate_scan(k, fov="lumbar", n_slices=5, rows=256) for k in range(20))
                if any(v.level == "S1" and v.polygons and not v.partial for v in sc.vertebrae))
    # image continuing 80 rows below the phantom, so that a cut inside S1 is well above the edge
    volume = np.concatenate([scan.volume, np.zeros((scan.volume.shape[0], 80, scan.volume.shape[2]), np.float32)], 1)
    bodies = [(v.level, v.polygons, v.centroid, False) for v in scan.vertebrae
              if v.polygons and v.level in LEVEL_INDEX]
    bodies.sort(key=lambda t: -t[2][1])
    s1 = next(b for b in bodies if b[0] == "S1")
    rows = np.concatenate([np.asarray(q)[:, 0] for q in s1[1].values()])
    top, bottom = rows.min(), rows.max()
    sp = (scan.pixel_spacing_mm, scan.pixel_spacing_mm)
    for seed in range(5):
        items = tight_cut_items(volume, sp, bodies, np.random.default_rng(seed), AppearanceConfig(), 1, 0.5)
        cut = items["height_mm"] / sp[0]
        assert top + 0.3 * (bottom - top) - 1 <= cut <= bottom + 0.5 * (bottom - top) + 1
        assert cut < volume.shape[1] - 40  # the image really ends at the sacrum
        kept = {LEVELS[i] for i in items["labels"]}
        assert "S1" in kept and "L5" in kept
        below = [b[0] for b in bodies if min(np.asarray(q)[:, 0].min() for q in b[1].values()) >= cut - 3]
        assert not kept & set(below)  # sacral segments below the cut are not in the cut scan
