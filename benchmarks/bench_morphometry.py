"""Morphometry time of a 6-disc scan (T12..S1, 15 slices; target <= 0.1 s added per scan).

Times the two parts for one scan: the endplate refinement of the corners, run in the detect
stage on the image (``detect.refine_endplates``, every polygon of every body in view on every
slice), and the cohort-table path: the vertebrae-table rows (polygons as stored in
``tables/vertebrae.parquet``) -> every body, disc and the scan row -> the typed frame, plus the
change table for a second visit of the same subject.

Run: .venv/bin/python benchmarks/bench_morphometry.py [--runs 20]
"""
from __future__ import annotations

import argparse
import statistics
import time

import pandas as pd

from spinecohort.detect import DetectedVertebra, refine_endplates
from spinecohort.morphometry import cohort_change, cohort_morphometry
from spinecohort.synthetic import generate_scan

LEVELS = ("T12", "L1", "L2", "L3", "L4", "L5", "S1")


def vertebrae_rows(scan, scan_id: str) -> list[dict]:
    rows = []
    for i, v in enumerate(v for v in scan.vertebrae if v.level in LEVELS):
        rows.append({"scan_id": scan_id, "vertebra_id": i, "level": v.level, "centroid_slice": float(v.centroid[0]),
                     "polygons": [{"slice": int(s), "corners": [float(x) for x in q.reshape(-1)]}
                                  for s, q in sorted(v.polygons.items())]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    scan = generate_scan(args.seed, fov="lumbar", contrast="T2", n_slices=15, rows=256)
    levels = {v.level for v in scan.vertebrae}
    assert set(LEVELS) <= levels, f"phantom seed {args.seed} lacks {set(LEVELS) - levels}"
    spacing = [scan.pixel_spacing_mm, scan.pixel_spacing_mm]
    one = pd.DataFrame([{"scan_id": "a", "subject_id": "s", "site": "x", "visit": "v1", "status": "ok",
                         "pixel_spacing_mm": spacing}])
    vertebrae_one = pd.DataFrame(vertebrae_rows(scan, "a"))
    two = pd.concat([one, one.assign(scan_id="b", visit="v2")], ignore_index=True)
    vertebrae_two = pd.DataFrame(vertebrae_rows(scan, "a") + vertebrae_rows(scan, "b"))
    bodies = [DetectedVertebra({int(k): q for k, q in v.polygons.items() if 0 <= k < scan.volume.shape[0]},
                               tuple(v.centroid), 1.0) for v in scan.vertebrae]
    n_polygons = sum(len(b.polygons) for b in bodies)
    single, single_cpu, pair, refine, refine_cpu = [], [], [], [], []
    for _ in range(args.runs + 1):  # the first run warms up
        t0, c0 = time.perf_counter(), time.process_time()
        refine_endplates(scan.volume, spacing, bodies)
        refine.append(time.perf_counter() - t0)
        refine_cpu.append(time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        morph = cohort_morphometry(one, vertebrae_one)
        t1, c1 = time.perf_counter(), time.process_time()
        both = cohort_morphometry(two, vertebrae_two)
        cohort_change(two, both)
        t2 = time.perf_counter()
        single.append(t1 - t0)
        single_cpu.append(c1 - c0)
        pair.append((t2 - t1) / 2)
    single, single_cpu, pair, refine, refine_cpu = single[1:], single_cpu[1:], pair[1:], refine[1:], refine_cpu[1:]
    n_discs = int((morph["kind"] == "disc").sum())
    # single-threaded: CPU time is the cost on an idle core; wall time grows on a loaded machine
    print(f"6-disc scan ({n_discs} discs, {int((morph['kind'] == 'vertebra').sum())} bodies, 15 slices): "
          f"morphometry {1000 * statistics.median(single):.1f} ms wall median (max {1000 * max(single):.1f}), "
          f"{1000 * statistics.median(single_cpu):.1f} ms CPU, over {args.runs} runs; with the change table, "
          f"per scan of a two-visit subject {1000 * statistics.median(pair):.1f} ms wall")
    print(f"endplate refinement in the detect stage ({len(bodies)} bodies in view, {n_polygons} polygons): "
          f"{1000 * statistics.median(refine):.1f} ms wall median (max {1000 * max(refine):.1f}), "
          f"{1000 * statistics.median(refine_cpu):.1f} ms CPU")


if __name__ == "__main__":
    main()
