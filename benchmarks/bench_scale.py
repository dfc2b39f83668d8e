"""Cohort scale (issue 16), three figures:

1. jobs planned after appending 1 row to a finished 1,000-row cohort (shard_size 200, the SLURM
   profiles'): the first run's scans point at missing folders, so every job is quick (each scan
   fails at ingestion), but Snakemake records every job as it would for real scans;
2. seconds of `snakemake -n --profile profiles/slurm` on a 100,000-row manifest (and its CPU time:
   on a shared machine the wall time also measures the other load);
3. the size of `work/` against the input DICOM after a demo run (`snakemake --cores 2`,
   `demo.n_scans` scans; 0 skips it).

Run: .venv/bin/python benchmarks/bench_scale.py [--rows 1000] [--big-rows 100000] [--demo-scans 12]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_plan import job_stats, write_manifest  # the sibling benchmark's manifest and plan parsing

REPO = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
ENV["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), ENV.get("PYTHONPATH")]))


def run_folder(root: Path) -> Path:
    """A folder of its own for Snakemake's .snakemake/ (away from the checkout)."""
    (root / "config").mkdir(parents=True)
    shutil.copy(REPO / "config" / "config.yaml", root / "config" / "config.yaml")
    return root


def snakemake(args: list[str], cwd: Path, timeout: int = 3600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), *args]
    result = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        sys.exit(f"snakemake failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def append_one_row(tmp: Path, rows: int) -> None:
    run = run_folder(tmp / "append")
    manifest = tmp / "append.csv"
    write_manifest(manifest, rows)
    config = ["--config", f"manifest={manifest}", "outdir=out", "shard_size=200", "qc=false", "hotspots=none"]
    started = time.perf_counter()
    snakemake(["--cores", "2", *config], run)
    print(f"[append] finished run of {rows} rows (all scans missing: quick jobs) in {time.perf_counter() - started:.0f} s")
    with open(manifest, "a") as handle:
        handle.write(f"scan{rows:06d},subnew,missing/new,site0,v1,50\n")
    counts = job_stats(snakemake(["-n", *config], run).stdout)
    per_shard = {k: v for k, v in counts.items() if k not in ("cohort_tables", "agreement", "report", "all", "total")}
    print(f"[append] 1 row appended to {rows}: planned {counts.get('total', 0)} jobs: "
          + ", ".join(f"{k} {v}" for k, v in counts.items() if k != "total"))
    print(f"[append] per-shard jobs planned: {sum(per_shard.values())} "
          f"(one shard has {len(per_shard)} rules; {'PASS' if max(per_shard.values(), default=0) <= 1 else 'FAIL'}: "
          "<= 1 shard's jobs + tables and report)")


def big_dry_run(tmp: Path, rows: int) -> None:
    run = run_folder(tmp / "big")
    manifest = tmp / "big.csv"
    write_manifest(manifest, rows)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = snakemake(["-n", "--profile", str(REPO / "profiles" / "slurm"), "--config", f"manifest={manifest}",
                        f"outdir={tmp / 'big-out'}"], run)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    counts = job_stats(result.stdout)
    print(f"[dry run] {rows} rows, --profile profiles/slurm: {seconds:.1f} s wall, {cpu:.1f} s CPU, "
          f"{counts.get('total', 0)} jobs planned ({'PASS' if seconds <= 10 else 'over'} the 10 s target)")


def demo_work_size(tmp: Path, n_scans: int) -> None:
    run = run_folder(tmp / "demo")
    out = tmp / "demo-out"
    started = time.perf_counter()
    snakemake(["--cores", "2", "--config", f"outdir={out}", f"demo={{n_scans: {n_scans}, seed: 0}}"], run,
              timeout=4 * 3600)

    def size(path: Path) -> int:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    work, scans = size(out / "work"), size(out / "demo" / "scans")
    print(f"[demo] {n_scans} scans in {time.perf_counter() - started:.0f} s: input DICOM {scans / 1e6:.1f} MB, "
          f"work/ {work / 1e6:.1f} MB = {100 * work / scans:.0f} % "
          f"(work/ivv {size(out / 'work' / 'ivv') / 1e6:.1f} MB, work/series {size(out / 'work' / 'series') / 1e6:.1f} MB; "
          f"{'PASS' if work <= scans / 2 else 'FAIL'}: <= 50 %)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000, help="rows of the cohort a row is appended to (0 skips)")
    parser.add_argument("--big-rows", type=int, default=100_000, help="rows of the dry-run manifest (0 skips)")
    parser.add_argument("--demo-scans", type=int, default=12, help="demo cohort size (0 skips)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.rows:
            append_one_row(Path(tmp), args.rows)
        if args.big_rows:
            big_dry_run(Path(tmp), args.big_rows)
        if args.demo_scans:
            demo_work_size(Path(tmp), args.demo_scans)
    return 0


if __name__ == "__main__":
    sys.exit(main())
