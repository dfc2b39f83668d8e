"""Detection + labelling time of a 15-slice 512x512 lumbar scan (target <= 4 s on a 2-core CPU).

Run: .venv/bin/python benchmarks/bench_label.py [--runs 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from spinecohort.detect import Detector
from spinecohort.evaluation.labelling import gt_from_polys, match_bodies
from spinecohort.label import Labeller
from spinecohort.shipped import default_model_path
from spinecohort.synthetic import generate_scan


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=4242)
    p.add_argument("--detector", default=str(default_model_path("detector")))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    scan = generate_scan(args.seed, fov="lumbar", contrast="T2", n_slices=15, rows=512)
    assert scan.volume.shape == (15, 512, 512)
    sp = (scan.pixel_spacing_mm, scan.pixel_spacing_mm)
    detector = Detector.load(args.detector)
    labeller = Labeller.load(default_model_path("appearance"), default_model_path("context"))
    total, det_t, lab_t = [], [], []
    for _ in range(args.runs + 1):  # the first run warms up
        t0 = time.perf_counter()
        dets = detector.detect(scan.volume, sp)
        t1 = time.perf_counter()
        labels = labeller.label(scan.volume, sp, scan.slice_spacing_mm, dets)
        t2 = time.perf_counter()
        det_t.append(t1 - t0)
        lab_t.append(t2 - t1)
        total.append(t2 - t0)
    total, det_t, lab_t = total[1:], det_t[1:], lab_t[1:]
    # each truth body beside the label of the detection matched to it (caudal first), as the
    # labelling evaluation matches them; extra detections (e.g. sacral segments) listed apart
    gt = sorted((gt_from_polys(v.level, v.polygons, v.centroid, sp, v.partial) for v in scan.vertebrae),
                key=lambda g: -g.centre_mm[0])
    centres = np.array([[d.centroid[1] * sp[0], d.centroid[2] * sp[1]] for d in dets]).reshape(-1, 2)
    match = match_bodies(gt, centres)
    pairs = [f"{g.level}:{labels[match[i]][0] if i in match else '-'}" for i, g in enumerate(gt)]
    right = sum(i in match and labels[match[i]][0] == g.level for i, g in enumerate(gt) if not g.partial)
    # a weak body below the column that the labeller did not keep is dropped, as the label stage does
    extra = [labels[j][0] for j in range(len(dets)) if j not in set(match.values())
             and not (dets[j].found_at_low_threshold and labels[j][0] is None)]
    print(f"detect + label 15x512x512 lumbar scan, truth:label {' '.join(pairs)}; "
          f"{right}/{sum(not g.partial for g in gt)} whole bodies right; unmatched detections {extra}")
    print(f"median {statistics.median(total):.2f} s (min {min(total):.2f}, max {max(total):.2f}; {args.runs} runs, "
          f"{args.threads} threads): detection {statistics.median(det_t):.2f} s, "
          f"labelling {statistics.median(lab_t):.2f} s")


if __name__ == "__main__":
    main()
