"""Grading time of one lumbar scan's 6 discs with the default TTA (4 copies), shipped CPU model
(target <= 0.2 s on a 2-core CPU), for the 9-slice IVVs of a volume and for the same discs as a
single-slice series gives them (centre slice only: the slice-pooled default encodes only the
slices that hold data). IVV extraction is timed separately.

Run: .venv/bin/python benchmarks/bench_grade.py [--threads 1 2] [--runs 7] [--tta 4] [--model PATH]

Reports each thread count (the pipeline's ``threads`` default is 2; on a CPU shared with other
jobs one thread is usually faster, because OpenMP threads spin-wait when cores are oversubscribed).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from spinecohort.discs import extract_ivvs, vertebrae_from_synthetic
from spinecohort.grade import Grader
from spinecohort.shipped import default_model_path
from spinecohort.synthetic import generate_scan
from spinecohort.tasks import LUMBAR_DISCS

MODEL = default_model_path("grader")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to time")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--tta", type=int, default=4)
    ap.add_argument("--model", default=str(MODEL), help="grader checkpoint (default: the shipped default)")
    args = ap.parse_args()

    scan = generate_scan(7, fov="lumbar", n_slices=15, rows=512)
    vertebrae = vertebrae_from_synthetic(scan)
    ext = []
    for _ in range(3):
        started = time.perf_counter()
        # the six lumbar discs, as the target is stated (the default levels also grade lower thoracic ones)
        ivvs = extract_ivvs(scan.volume, scan.pixel_spacing_mm, vertebrae, levels=LUMBAR_DISCS)
        ext.append(time.perf_counter() - started)
    assert len(ivvs) == 6, [v.level for v in ivvs]
    volumes = [v.volume for v in ivvs]
    singles = []
    for v in volumes:  # the centre slice alone, as a 1-slice series' IVV holds it
        one = np.zeros_like(v)
        one[4] = v[4]
        singles.append(one)

    grader = Grader.load(args.model)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for what, vols in (("9-slice", volumes), ("1-slice", singles)):
            grader.grade(vols, tta=args.tta)  # warm-up
            times = []
            for _ in range(args.runs):
                started = time.perf_counter()
                grader.grade(vols, tta=args.tta)
                times.append(time.perf_counter() - started)
            result = {
                "what": f"grade 6 {what} discs, tta={args.tta}, {threads} threads", "model": Path(args.model).name,
                "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                "max_s": round(max(times), 3), "runs": args.runs,
                "extract_6_ivvs_median_s": round(statistics.median(ext), 3), "target_s": 0.2,
            }
            print(f"grade 6 {what} discs (tta {args.tta}, {threads} threads): median {result['median_s']:.3f} s "
                  f"(min {result['min_s']:.3f}, max {result['max_s']:.3f}; {args.runs} runs); "
                  f"IVV extraction of 6 discs: median {result['extract_6_ivvs_median_s']:.3f} s")
            print(json.dumps(result))


if __name__ == "__main__":
    main()
