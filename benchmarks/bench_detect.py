#!/usr/bin/env python
"""Benchmark the detection stage: a 15-slice 512 x 512 lumbar series with the default model.

Reports the median wall time of ``Detector.detect`` over a few runs (after one warm-up call) and
the process's peak resident memory. Target on the project's 2-core CPU: <= 3 s per series.

    python benchmarks/bench_detect.py [--model CHECKPOINT] [--threads 2] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spinecohort.detect import Detector  # noqa: E402
from spinecohort.shipped import default_model_path  # noqa: E402


def lumbar_series(seed: int = 7) -> tuple[np.ndarray, tuple[float, float], int]:
    """A synthetic 15 x 512 x 512 lumbar series (0.6 mm pixels); a noise volume when the phantom
    generator is unavailable. Returns volume, spacing and the number of true (whole) bodies."""
    try:
        from spinecohort import synthetic

        scan = synthetic.generate_scan(seed, fov="lumbar", contrast="T2", n_slices=15, rows=512, cols=512)
        sp = float(scan.pixel_spacing_mm)
        return scan.volume, (sp, sp), sum(not v.partial for v in scan.vertebrae)
    except ImportError:
        rng = np.random.default_rng(seed)
        return rng.random((15, 512, 512), dtype=np.float32) * 1000, (0.6, 0.6), -1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(default_model_path("detector")))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast inference")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    volume, spacing, n_true = lumbar_series()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    det = Detector.load(a.model)
    det.config.autocast_bf16 = a.bf16
    if a.bf16:
        det.net = det.net.to(memory_format=torch.channels_last)
    found = det.detect(volume, spacing)  # warm-up
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        found = det.detect(volume, spacing)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    load1 = None
    try:
        load1 = float(open("/proc/loadavg").read().split()[0])
    except OSError:
        pass
    out = {
        "series": {"slices": int(volume.shape[0]), "rows": int(volume.shape[1]), "cols": int(volume.shape[2]),
                   "pixel_spacing_mm": spacing[0]},
        "threads": a.threads, "bf16": a.bf16,
        "median_s": round(statistics.median(times), 3), "runs_s": [round(t, 3) for t in times],
        "peak_rss_mib": round(peak / 1024, 1), "rss_before_model_mib": round(rss0 / 1024, 1),
        "vertebrae_detected": len(found), "vertebrae_true": n_true, "load_avg_1min": load1,
        "torch": str(torch.__version__),
    }
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
