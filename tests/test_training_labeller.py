"""Labeller training data: SPIDER slices supervised by a teacher's confident decodings."""
from __future__ import annotations

import numpy as np
from PIL import Image

from spinecohort.detect import Detector
from spinecohort.label import LevelSummary
from spinecohort.shipped import default_model_path
from spinecohort.synthetic import generate_scan
from spinecohort.tasks import LEVEL_INDEX
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
