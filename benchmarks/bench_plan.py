"""Planning a 10,000-scan cohort on the cluster: `snakemake -n --profile profiles/slurm` must plan
at most 500 jobs and return within 60 s (issue 7). The manifest's paths need not exist.

Run: .venv/bin/python benchmarks/bench_plan.py [--rows 10000] [--profile profiles/slurm|none]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALL_MODEL_STAGES = 5  # ingest, detect, label, extract_discs, grade


def write_manifest(path: Path, rows: int) -> None:
    with open(path, "w") as handle:
        handle.write("scan_id,subject_id,path,site,visit,age\n")
        for i in range(rows):
            handle.write(f"scan{i:05d},sub{i // 2:05d},dicom/scan{i:05d},site{i % 4},v{i % 2},{40 + i % 40}\n")


def job_stats(output: str) -> dict[str, int]:
    """Planned jobs per rule from Snakemake's "Job stats" table ({} when it printed none)."""
    if "Job stats:" not in output:
        return {}
    table = output[output.index("Job stats:"):]
    counts: dict[str, int] = {}
    for line in table.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--profile", default="profiles/slurm", help="profile folder, or `none` for a plain dry run")
    parser.add_argument("--max-jobs", type=int, default=500)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    args = parser.parse_args()

    from spinecohort.manifest import read_manifest
    from spinecohort.pipeline import stage_order

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = tmp / "manifest.csv"
        write_manifest(manifest, args.rows)
        started = time.perf_counter()
        read_manifest(manifest)
        manifest_seconds = time.perf_counter() - started

        run = tmp / "run"  # own .snakemake/, away from the checkout
        (run / "config").mkdir(parents=True)
        shutil.copy(REPO / "config" / "config.yaml", run / "config" / "config.yaml")
        command = [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(REPO / "Snakefile")]
        if args.profile != "none":
            command += ["--profile", str(REPO / args.profile)]
        command += ["--config", f"manifest={manifest}", f"outdir={tmp / 'out'}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        started = time.perf_counter()
        result = subprocess.run(command, cwd=run, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
    if result.returncode != 0:
        print(result.stdout[-2000:], result.stderr[-2000:], sep="\n")
        return 1
    counts = job_stats(result.stdout + result.stderr)
    stages = stage_order()
    shards = counts.get(stages[0], 0)
    once = counts["total"] - shards * (len(stages) + 1)
    projected = shards * (ALL_MODEL_STAGES + 1) + once
    print(f"profile {args.profile}: {args.rows} manifest rows -> {shards} shards")
    print("planned jobs: " + ", ".join(f"{rule} {n}" for rule, n in counts.items() if rule != "total")
          + f"; total {counts['total']}")
    print(f"with all {ALL_MODEL_STAGES} model stages registered (stages now: {', '.join(stages)}): "
          f"{projected} jobs")
    print(f"dry run: {seconds:.1f} s (of which reading + validating the manifest once: {manifest_seconds:.1f} s)")
    ok = max(projected, counts["total"]) <= args.max_jobs and seconds <= args.max_seconds
    print(f"{'PASS' if ok else 'FAIL'}: <= {args.max_jobs} jobs and <= {args.max_seconds:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
