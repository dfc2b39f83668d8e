"""Ingestion time of a 15-slice 512x512 sagittal series (target <= 1 s on a 2-core CPU).

Run: .venv/bin/python benchmarks/bench_ingest.py
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from spinecohort.dicom_writer import SeriesHeader, write_series
from spinecohort.ingest import ingest


def main() -> None:
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 4095, size=(15, 512, 512)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        write_series(volume, Path(tmp) / "scan", SeriesHeader((0.6, 0.6), 4.0), rng)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            series = ingest(Path(tmp) / "scan", "bench")
            times.append(time.perf_counter() - started)
    assert series.volume.shape == (15, 512, 512)
    print(f"ingest 15x512x512 DICOM series: median {statistics.median(times):.3f} s "
          f"(min {min(times):.3f}, max {max(times):.3f}; 5 runs)")


if __name__ == "__main__":
    main()
