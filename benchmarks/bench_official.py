#!/usr/bin/env python
"""CPU timing of the official SpineNetV2 detector and grading networks (spinecohort.nets.official).

Per typical scan (the reference's): the detector on 15 slices x 4 tiles of 224x224 (60 tiles)
and the grading net on 6 discs (1x9x112x224 each), float32, ``torch.inference_mode()``.
Statistic: median of ``--runs`` runs after one warm-up run, as in the reference timing file.

Configurations timed on this machine:

* ``reference-like``: what the official package does, re-created with these modules: detector
  called once per slice (batch 4) with the official up-block order (x2 upsample, then 1x1 conv),
  NCHW; grading called once per disc with PyTorch's own Conv3d dispatch on contiguous tensors.
* ``spinecohort``: the defaults of ``spinecohort.nets.official`` (1x1 conv before the upsample,
  oneDNN channels-last-3d Conv3d path), first as loaded, then with ``fold_batchnorm`` applied,
  for the detector batch size(s) of ``--det-batch`` (tiles per call) and the grading batch
  size(s) of ``--grade-batch`` (discs per call); ``--det-channels-last`` also tries NHWC.

Weights: the deterministic recipe weights (realistic magnitudes; the timing does not depend on
them otherwise). Also printed: a matrix-multiply calibration (GFLOP/s), because the machine may be
shared and the reference figures come from another machine
(``../shared/reference/spinenet-cpu-timing.json``: 15.4 s detector + 5.6 s grading per scan).

Usage: ``python benchmarks/bench_official.py [--runs 3] [--threads 2] [--det-batch 4,15,60] [--only detector]``

Measured 2026-11-22 on the shared 2-vCPU dev machine (Intel Xeon with AMX; ``--det-batch 8,15
--grade-batch 1,6``; sgemm 138-221 GFLOP/s during the run, 309 when idle earlier): reference-like
detector 35.5 s + grading 14.4 s = 49.9 s per scan; float32 best 29.2 + 9.0 = 38.3 s (1.31x);
bfloat16 (``models.precision``) 10.5 + 3.0 = 13.5 s (3.69x the reference-like run, 1.55x the
reference file's 20.9 s from another machine). Earlier the same day, with sgemm at 309 GFLOP/s,
the bfloat16 detector took 4.8 s per scan (batch 15), i.e. ~7.8 s per scan in all (2.7x the
reference file). bfloat16 vs float32 outputs: max |diff| 2.4 % (detector maps) and 1.0 %
(grading logits) of the output range; the same argmax grade for 6/6 discs.

An older measurement (load 5-8 from other jobs, so wall times were inflated
~3-4x; cpu/thread = process CPU seconds / 2 threads, an estimate of idle-machine wall time):
detector reference-like 55.8 s, batch 4 47.9 s (BN folded), batch 12 34.1 s, batch 20 31.8 s,
batch 60 28.5 s (1.96x); grading reference-like 13.1 s, oneDNN NDHWC + BN folded 10.1 s (1.30x);
overall 68.9 -> 38.5 s per scan (1.79x). Work per scan: detector 3992 GFLOP, grading 1958 GFLOP,
i.e. the reference's 15.4 s + 5.6 s already ran at 260-350 GFLOP/s on its 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from spinecohort.nets import official
from spinecohort.nets.checkpoints import recipe_state_dict
from spinecohort.nets.official import (fold_batchnorm, official_from_state_dict, official_template, param_dtype,
                                       to_precision)

TIMING_JSON = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "spinenet-cpu-timing.json"
SLICES, TILES, DISCS = 15, 4, 6


def forward_gflop(name: str, shape: tuple[int, ...]) -> float:
    """Floating-point operations of one forward call (counted on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = official_template(name)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(shape, device="meta"))
    return counter.get_total_flops() / 1e9


def gemm_gflops(n: int = 2048, reps: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def timed(fn, runs: int) -> tuple[float, list[float], float]:
    """Median wall seconds, the runs, and the median process CPU seconds / threads (an estimate
    of the wall time on otherwise idle cores when the machine is shared)."""
    fn()  # warm-up
    times, cpu = [], []
    for _ in range(runs):
        t, c = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t)
        cpu.append((time.process_time() - c) / torch.get_num_threads())
    return statistics.median(times), times, statistics.median(cpu)


def run_detector(model, tiles: torch.Tensor, batch: int, channels_last: bool):
    dtype = param_dtype(model)

    def go():
        with torch.inference_mode():
            for start in range(0, tiles.shape[0], batch):
                x = tiles[start : start + batch].to(dtype)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                model(x)
    return go


def run_grading(model, discs: torch.Tensor, batch: int):
    dtype = param_dtype(model)

    def go():
        with torch.inference_mode():
            for start in range(0, discs.shape[0], batch):
                model(discs[start : start + batch].to(dtype))
    return go


def bf16_deviation(model32, model16, x: torch.Tensor) -> dict:
    """How far the bfloat16 network's outputs are from float32's on the same input: max |diff|
    relative to the float32 output's range, and (grading) the share of equal argmax grades."""
    with torch.inference_mode():
        a, b = model32(x), model16(x.to(torch.bfloat16))
    a, b = (list(a), list(b)) if isinstance(a, tuple) else ([a], [b])
    rel = max(float((o.float() - r).abs().max() / r.abs().max()) for r, o in zip(a, b))
    same = [float((o.float().argmax(1) == r.argmax(1)).float().mean()) for r, o in zip(a, b)]
    return {"max_abs_diff_rel_range": round(rel, 4), "argmax_agreement": round(min(same), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--det-batch", default="4,15,60", help="comma-separated detector batch sizes to try")
    ap.add_argument("--det-channels-last", action="store_true", help="also try NHWC for the detector")
    ap.add_argument("--grade-batch", default="1,6", help="comma-separated grading batch sizes to try")
    ap.add_argument("--skip-reference-like", action="store_true")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 configurations (models.precision)")
    ap.add_argument("--only", choices=["detector", "grading"], help="time one network only")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    res: dict = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "runs": args.runs,
        "statistic": "median of runs after one warm-up",
        "gemm_gflops_before": round(gemm_gflops(), 1),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"sgemm 2048^3: {res['gemm_gflops_before']} GFLOP/s; load average {os.getloadavg()[0]:.1f}", flush=True)

    tiles = torch.rand(SLICES * TILES, 1, 224, 224)
    discs = torch.rand(DISCS, 1, 9, 112, 224)
    do_det, do_grade = args.only in (None, "detector"), args.only in (None, "grading")

    det_rows, grade_rows = [], []
    scan_gflop = {
        "detector": SLICES * TILES * forward_gflop("detector", (1, 1, 224, 224)),
        "grading": DISCS * forward_gflop("grading", (1, 1, 9, 112, 224)),
    }
    res["gflop_per_scan"] = {k: round(v, 1) for k, v in scan_gflop.items()}
    print(f"work per scan: detector {scan_gflop['detector']:.0f} GFLOP, grading {scan_gflop['grading']:.0f} GFLOP")

    def record(rows, label, fn):
        med, times, cpu = timed(fn, args.runs)
        gflop = scan_gflop["detector" if rows is det_rows else "grading"]
        rows.append({"config": label, "per_scan_s_median": round(med, 3), "runs_s": [round(t, 3) for t in times],
                     "cpu_s_per_thread_median": round(cpu, 3), "gflops_wall": round(gflop / med, 1)})
        print(f"  {label:<48s} {med:7.2f} s/scan ({gflop / med:5.1f} GFLOP/s; cpu/thread {cpu:6.2f} s)   "
              f"runs {', '.join(f'{t:.2f}' for t in times)}", flush=True)

    if do_det:
        det = official_from_state_dict("detector", recipe_state_dict("detector"))
        print(f"detector: {SLICES} slices x {TILES} tiles of 224x224")
        if not args.skip_reference_like:
            for blk in det.up_blocks:
                blk.conv_first = False
            record(det_rows, "reference-like (batch 4/slice, upsample->conv)",
                   run_detector(det, tiles, TILES, False))
            for blk in det.up_blocks:
                blk.conv_first = True
        batches = [int(v) for v in args.det_batch.split(",")]
        record(det_rows, f"spinecohort (batch {batches[0]}, NCHW)", run_detector(det, tiles, batches[0], False))
        fold_batchnorm(det)
        for b in batches:
            record(det_rows, f"spinecohort (batch {b}, NCHW, BN folded)", run_detector(det, tiles, b, False))
            if args.det_channels_last:
                det.to(memory_format=torch.channels_last)
                record(det_rows, f"spinecohort (batch {b}, NHWC, BN folded)", run_detector(det, tiles, b, True))
                det.to(memory_format=torch.contiguous_format)
        if not args.no_bf16:
            det16 = to_precision(official_from_state_dict("detector", recipe_state_dict("detector")), "bfloat16")
            for b in batches:
                record(det_rows, f"spinecohort bfloat16 (batch {b}, NHWC)", run_detector(det16, tiles, b, True))
            res["detector_bf16_deviation"] = bf16_deviation(det, det16, tiles[:8])
            print(f"  bfloat16 vs float32 outputs (8 tiles): {res['detector_bf16_deviation']}")
            del det16
        del det
    if do_grade:
        grading = official_from_state_dict("grading", recipe_state_dict("grading"))
        print(f"grading: {DISCS} discs of 1x9x112x224")
        if not args.skip_reference_like:
            official.FAST_CONV3D = False
            grading.to(memory_format=torch.contiguous_format)
            record(grade_rows, "reference-like (batch 1, torch Conv3d dispatch)", run_grading(grading, discs, 1))
            official.FAST_CONV3D = True
            official.to_inference_layout(grading)
        gbatches = [int(v) for v in args.grade_batch.split(",")]
        record(grade_rows, f"spinecohort (batch {gbatches[0]}, oneDNN NDHWC)", run_grading(grading, discs, gbatches[0]))
        fold_batchnorm(grading)
        for b in gbatches:
            record(grade_rows, f"spinecohort (batch {b}, oneDNN NDHWC, BN folded)", run_grading(grading, discs, b))
        if not args.no_bf16:
            grading16 = to_precision(official_from_state_dict("grading", recipe_state_dict("grading")), "bfloat16")
            for b in gbatches:
                record(grade_rows, f"spinecohort bfloat16 (batch {b}, NDHWC)", run_grading(grading16, discs, b))
            res["grading_bf16_deviation"] = bf16_deviation(grading, grading16, discs)
            print(f"  bfloat16 vs float32 outputs ({DISCS} discs): {res['grading_bf16_deviation']}")

    res["detector"] = det_rows
    res["grading"] = grade_rows
    res["gemm_gflops_after"] = round(gemm_gflops(), 1)

    def best(rows, prefix="spinecohort ("):
        return min((r["per_scan_s_median"] for r in rows if r["config"].startswith(prefix)), default=0.0)

    def best_cpu(rows, prefix="spinecohort ("):
        return min((r["cpu_s_per_thread_median"] for r in rows if r["config"].startswith(prefix)), default=0.0)

    print(f"sgemm after: {res['gemm_gflops_after']} GFLOP/s; load average {os.getloadavg()[0]:.1f}")
    ref_json = None
    if TIMING_JSON.is_file():
        ref = json.loads(TIMING_JSON.read_text())["network_forward"]
        ref_json = ((ref["detector"]["per_scan_s_median"] if do_det else 0.0)
                    + (ref["grading"]["per_scan_s_median"] if do_grade else 0.0))
        res["reference_json_per_scan_s"] = ref_json
        print(f"reference implies {scan_gflop['detector'] / ref['detector']['per_scan_s_median']:.0f} GFLOP/s "
              f"(detector) and {scan_gflop['grading'] / ref['grading']['per_scan_s_median']:.0f} GFLOP/s (grading) "
              "on its 2 cores")
    ref_like = ref_cpu = None
    if not args.skip_reference_like:
        ref_like = sum(rows[0]["per_scan_s_median"] for rows in (det_rows, grade_rows) if rows)
        ref_cpu = sum(rows[0]["cpu_s_per_thread_median"] for rows in (det_rows, grade_rows) if rows)
        print(f"reference-like on this machine: {ref_like:.2f} s/scan (cpu/thread {ref_cpu:.2f} s)")
    res["best"] = {}
    for precision, prefix in (("float32", "spinecohort ("), ("bfloat16", "spinecohort bfloat16")):
        best_det, best_grade = best(det_rows, prefix), best(grade_rows, prefix)
        ours = best_det + best_grade
        if not ours:
            continue
        row = {"detector_s": best_det, "grading_s": best_grade, "per_scan_s": round(ours, 3)}
        line = f"best spinecohort {precision}: detector {best_det:.2f} s + grading {best_grade:.2f} s = {ours:.2f} s/scan"
        if ref_like:
            ours_cpu = best_cpu(det_rows, prefix) + best_cpu(grade_rows, prefix)
            row["speedup_vs_reference_like_same_machine"] = round(ref_like / ours, 2)
            row["cpu_speedup_vs_reference_like_same_machine"] = round(ref_cpu / ours_cpu, 2)
            line += f"; vs reference-like here {ref_like / ours:.2f}x wall ({ref_cpu / ours_cpu:.2f}x cpu)"
        if ref_json:
            row["speedup_vs_reference_json"] = round(ref_json / ours, 2)
            line += f"; vs reference spinenet 2.1.4 ({TIMING_JSON.name}, {ref_json:.1f} s) {ref_json / ours:.2f}x"
        res["best"][precision] = row
        print(line + " (target >= 2x)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
