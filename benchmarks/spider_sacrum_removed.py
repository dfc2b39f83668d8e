"""Do a labeller's lumbar levels survive losing the sacrum? Measured on SPIDER's mid-sagittal slices
(four hospitals none of the networks' annotated training sites come from).

Each series is detected and labelled; then the bodies it labelled sacral (S1-S5) are removed, as
happens when a detector misses the sacrum on an unfamiliar scanner, and the rest are labelled
again. A labeller that counts from the sacrum alone shifts every level by one (L5 becomes "S1");
one that reads the lumbar bodies themselves keeps their labels. SPIDER gives no vertebra
positions, so this is a consistency figure, not an accuracy: it is the unseen-hospital version of
``spinecohort.evaluation.labelling --modes end2end-no-sacrum`` (which needs annotated bodies).

Run: .venv/bin/python benchmarks/spider_sacrum_removed.py [--spider ../shared/data/spider-midsagittal]
     [--appearance A.pt --context C.pt] [--out per_series.json]
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import pandas as pd
import torch

from spinecohort.detect import Detector
from spinecohort.label import Labeller
from spinecohort.shipped import default_model_path
from spinecohort.training.grader_real import spider_volume


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spider", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "spider-midsagittal"))
    p.add_argument("--appearance", default=str(default_model_path("appearance")))
    p.add_argument("--context", default=str(default_model_path("context")))
    p.add_argument("--detector", default=str(default_model_path("detector")))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="per-series labels with and without the sacrum (JSON)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.spider)
    if not (root / "series.csv").exists():
        raise SystemExit(f"{root}/series.csv not found: this benchmark needs SPIDER's mid-sagittal export")
    detector = Detector.load(args.detector)
    labeller = Labeller.load(args.appearance, args.context)
    per_series, shifts = [], collections.Counter()
    for row in pd.read_csv(root / "series.csv", dtype={"series": str}).itertuples(index=False):
        volume, spacing = spider_volume(root, row)
        verts = detector.detect(volume, spacing)  # label_scan reads the detections as they are
        if not verts:
            continue
        labels, _ = labeller.label_scan(volume, spacing, float(row.slice_thickness_mm), verts)
        lumbar_up = [i for i, (level, _) in enumerate(labels) if level is not None and not level.startswith("S")]
        if len(lumbar_up) == sum(level is not None for level, _ in labels) or not lumbar_up:
            continue  # nothing sacral to remove, or nothing left
        again, flags = labeller.label_scan(volume, spacing, float(row.slice_thickness_mm), [verts[i] for i in lumbar_up])
        before = [labels[i][0] for i in lumbar_up]
        after = [level for level, _ in again]
        # lumbar_up keeps the input order; the lowest body is the one furthest down the image
        lowest = max(range(len(lumbar_up)), key=lambda k: verts[lumbar_up[k]].centroid[1])
        if before != after:
            shifts[f"{before[lowest]} -> {after[lowest]}"] += 1
        per_series.append({"series": row.series, "kept": before == after, "before": before, "after": after,
                           "flags_after": list(flags.flags)})
    n = len(per_series)
    kept = sum(s["kept"] for s in per_series)
    print(f"series with a sacral level and lumbar bodies: {n}")
    print(f"lumbar labels unchanged with the sacrum's bodies removed: {kept} ({100 * kept / max(n, 1):.1f} %)")
    print("lowest remaining body, where the labels changed: "
          + ", ".join(f"{k} ({v})" for k, v in shifts.most_common()))
    unflagged = sum(1 for s in per_series if not s["kept"] and not s["flags_after"])
    print(f"changed and not flagged: {unflagged}")
    if args.out:
        Path(args.out).write_text(json.dumps(per_series, indent=1))


if __name__ == "__main__":
    main()
