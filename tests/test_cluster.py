"""The SLURM profiles: what each job asks the scheduler for, and how many jobs a big cohort plans.

The GPU test runs the workflow through `--profile profiles/slurm-gpu` and the real
snakemake-executor-plugin-slurm against stand-in SLURM commands (sbatch, srun, sacct, ...) that
record their arguments and run each job on this machine. scripts/slurm-selftest.sh does the same
on a real single-node SLURM cluster.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from spinecohort.pipeline import stage_order

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
GPU_RULES = {"detect", "label", "grade"}
# `snakemake train_grader` (workflow/rules/train.smk); its two training rules are GPU rules too.
TRAIN_RULES = {"grader_ivv_table", "grader_cv", "grader_cv_agreement", "grader_final", "grader_card"}
TRAIN_GPU_RULES = {"grader_cv", "grader_final"}
ALL_RULES = {"demo_cohort", "ingest", "detect", "label", "extract_discs", "grade", "qc", "cohort_tables",
             "agreement", "report"} | TRAIN_RULES

FAKE_SLURM = r'''#!PYTHON
"""Stand-in for SLURM's client commands: sbatch records its arguments and "runs" the job by putting
back the outputs of an earlier local run of the same cohort (FAKE_SLURM_SNAPSHOT -> FAKE_SLURM_OUT)."""
import fcntl, json, os, shutil, sys
from pathlib import Path

STATE = Path(os.environ["FAKE_SLURM_DIR"])
tool, args = Path(sys.argv[0]).name, sys.argv[1:]


def jobs():
    path = STATE / "jobs.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


if tool == "sbatch":
    with open(STATE / "jobs.jsonl", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        earlier = [json.loads(line) for line in handle.read().splitlines()]
        jobid = str(1000 + len(earlier))
        comment = args[args.index("--comment") + 1]
        # The first job of rule FAKE_SLURM_FAIL_FIRST fails (as if out of memory): Snakemake retries it.
        fail = comment.startswith(f"rule_{os.environ.get('FAKE_SLURM_FAIL_FIRST')}_") and not any(
            job["comment"] == comment for job in earlier)
        snapshot, out = Path(os.environ["FAKE_SLURM_SNAPSHOT"]), Path(os.environ["FAKE_SLURM_OUT"])
        for source in [] if fail else snapshot.rglob("*"):
            target = out / source.relative_to(snapshot)
            if source.is_file() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
        state = "OUT_OF_MEMORY" if fail else "COMPLETED"
        handle.write(json.dumps({"id": jobid, "state": state, "comment": comment, "args": args}) + "\n")
    print(jobid)
elif tool in ("sacct", "squeue"):
    for job in jobs():
        print(f"{job['id']}|{job['state']}")
elif tool == "sinfo":
    print("PARTITION\ncpu*\ngpu")
elif tool == "scontrol":
    print("MinJobAge               = 300 sec\nMaxArraySize            = 1001")
elif tool == "sacctmgr":
    print("proj1")
'''


def fake_slurm(root: Path) -> dict[str, str]:
    """Install the stand-in commands under root/bin; return the environment that uses them."""
    bin_dir, state = root / "bin", root / "state"
    bin_dir.mkdir(parents=True)
    state.mkdir()
    script = bin_dir / "fakeslurm"
    script.write_text(FAKE_SLURM.replace("PYTHON", sys.executable, 1))
    script.chmod(0o755)
    for tool in ("sbatch", "sacct", "squeue", "sinfo", "scontrol", "sacctmgr", "sshare", "scancel"):
        (bin_dir / tool).symlink_to(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SPINECOHORT_SLURM_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_SLURM_DIR=str(state),
               SPINECOHORT_SLURM_ACCOUNT="proj1", SPINECOHORT_SLURM_PARTITION="cpu",
               SPINECOHORT_SLURM_GPU_PARTITION="gpu")
    return env


def workdir(root: Path) -> Path:
    """A run folder of its own (its .snakemake/ and SLURM logs stay out of the checkout)."""
    (root / "config").mkdir(parents=True)
    shutil.copy(REPO / "config" / "config.yaml", root / "config" / "config.yaml")
    return root


def write_cohort(root: Path, n_scans: int) -> Path:
    from spinecohort.dicom_writer import SeriesHeader, write_series

    rng = np.random.default_rng(7)
    for i in range(n_scans):
        write_series(rng.integers(0, 2000, (6, 48, 40)).astype(np.float32), root / f"s{i}",
                     SeriesHeader((0.7, 0.7), 4.0), rng)
    manifest = root / "manifest.csv"
    manifest.write_text("scan_id,subject_id,path\n" + "".join(f"s{i},sub{i},s{i}\n" for i in range(n_scans)))
    return manifest


def option(args: list[str], short: str) -> str | None:
    return args[args.index(short) + 1] if short in args else None


def submitted_rule(args: list[str]) -> str:
    comment = option(args, "--comment")
    return re.match(r"rule_(.+?)(_wildcards_.*)?$", comment).group(1)


def test_profiles_name_only_real_rules_and_gpus_only_in_gpu_profile():
    for name in ("slurm", "slurm-gpu"):
        profile = yaml.safe_load((REPO / "profiles" / name / "config.yaml").read_text())
        assert profile["executor"] == "slurm" and profile["retries"] >= 1
        assert set(profile["set-resources"]) <= ALL_RULES and set(profile["set-threads"]) <= ALL_RULES
        assert TRAIN_RULES <= set(profile["set-resources"]) and TRAIN_RULES <= set(profile["set-threads"]), name
        assert "attempt" in str(profile["default-resources"]["mem_mb"])
        for rule, resources in profile["set-resources"].items():
            assert "attempt" in str(resources["mem_mb"]), rule
            wants_gpu = {"gpu", "gres", "gpus"} & set(resources)
            assert bool(wants_gpu) == (name == "slurm-gpu" and rule in GPU_RULES | TRAIN_GPU_RULES), (name, rule)
    # The workflow profile is applied to cluster runs too and wins per key: keep it executor-neutral.
    default = yaml.safe_load((REPO / "profiles" / "default" / "config.yaml").read_text())
    assert not {"cores", "jobs", "executor", "default-resources", "set-resources", "set-threads", "config",
                "configfile", "configfiles", "latency-wait", "retries"} & set(default)


def test_gpu_profile_asks_for_gpus_only_for_model_stages(tmp_path):
    """Every job of a one-shard cohort goes through the plugin's sbatch call (the stand-in sbatch
    puts back the outputs of a local in-process run of the same cohort instead of computing them)."""
    from spinecohort.config import resolve_config
    from spinecohort.pipeline import run_in_process

    env = fake_slurm(tmp_path / "slurm")
    run = workdir(tmp_path / "run")
    manifest = write_cohort(tmp_path / "cohort", 2)
    out = run / "out"
    shard_size = yaml.safe_load((REPO / "profiles" / "slurm-gpu" / "cluster.yaml").read_text())["shard_size"]
    run_in_process(resolve_config({"manifest": str(manifest), "outdir": str(out), "shard_size": shard_size}),
                   manifest, created_by="test")
    shutil.copytree(out, tmp_path / "snapshot")
    env.update(FAKE_SLURM_SNAPSHOT=str(tmp_path / "snapshot"), FAKE_SLURM_OUT=str(out), FAKE_SLURM_FAIL_FIRST="ingest")
    result = subprocess.run(
        [*SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--profile", str(REPO / "profiles" / "slurm-gpu"),
         "--slurm-init-seconds-before-status-checks", "1", "--latency-wait", "5", "--forceall",
         "--config", f"manifest={manifest}", f"outdir={out}", "--", str(out / "tables" / "scans.parquet")],
        cwd=run, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    jobs = [json.loads(line) for line in (tmp_path / "slurm" / "state" / "jobs.jsonl").read_text().splitlines()]
    # The failed first ingest job was resubmitted with twice the memory and time.
    first, retry = [job["args"] for job in jobs if submitted_rule(job["args"]) == "ingest"]
    assert int(option(retry, "--mem")) == 2 * int(option(first, "--mem"))
    assert int(option(retry, "-t")) == 2 * int(option(first, "-t"))
    sbatch = {submitted_rule(job["args"]): job["args"] for job in jobs if job["state"] == "COMPLETED"}
    stages = stage_order()
    profile = yaml.safe_load((REPO / "profiles" / "slurm-gpu" / "config.yaml").read_text())
    # A shard's model stages are one group job (`groups` in the profile), named after its rules.
    grouped = sorted(rule for rule, group in profile["groups"].items() if group == "models" and rule in stages)
    members = {rule: [rule] for rule in [*stages, "qc", "cohort_tables"] if rule not in grouped}
    members["_".join(["models", *grouped])] = grouped
    assert sorted(sbatch) == sorted(members), sbatch.keys()
    assert len(jobs) == len(sbatch) + 1
    for rule, args in sbatch.items():
        line = " ".join(args)
        attempt = 2 if rule == "ingest" else 1
        resources = [profile["set-resources"][r] for r in members[rule]]
        assert option(args, "-A") == "proj1", line
        # a group job: the most memory and CPUs any of its rules needs, their times added up
        assert option(args, "--mem") == str(max(eval(r["mem_mb"], {"attempt": attempt}) for r in resources)), line
        assert option(args, "-t") == str(sum(eval(r["runtime"], {"attempt": attempt}) for r in resources)), line
        assert f"--cpus-per-task={max(profile['set-threads'][r] for r in members[rule])}" in args, line
        if GPU_RULES & set(members[rule]):
            assert "--gpus=1" in args and option(args, "-p") == "gpu", line
        else:
            assert not any(a.startswith(("--gpu", "--gres", "--gpus-per", "--cpus-per-gpu")) for a in args), line
            assert option(args, "-p") == "cpu", line
    if not GPU_RULES & set(stages):
        pytest.skip(f"no GPU stage registered yet (stages: {stages}); the CPU jobs' requests were checked")


def planned_jobs(output: str) -> dict[str, int]:
    table = output[output.index("Job stats:"):]
    counts = {}
    for line in table.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


def test_cluster_plan_is_hundreds_of_jobs_for_ten_thousand_scans(tmp_path):
    """Shard arithmetic on a 1,000-row manifest (benchmarks/bench_plan.py times the 10,000-row plan)."""
    run = workdir(tmp_path)
    rows = 1000
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("scan_id,subject_id,path\n" + "".join(f"scan{i:05d},sub{i // 2},dicom/scan{i:05d}\n"
                                                            for i in range(rows)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(
        [*SNAKEMAKE, "-n", "--snakefile", str(REPO / "Snakefile"), "--profile", str(REPO / "profiles" / "slurm"),
         "--config", f"manifest={manifest}", "outdir=out"],  # user --config merges with the profile's shard_size
        cwd=run, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    counts = planned_jobs(result.stdout + result.stderr)
    shard_size = yaml.safe_load((REPO / "profiles" / "slurm" / "cluster.yaml").read_text())["shard_size"]
    shards = math.ceil(rows / shard_size)
    per_shard = [s for s in stage_order()] + ["qc"]
    for rule in per_shard:
        assert counts[rule] == shards, (rule, counts)
    once = counts["total"] - shards * len(per_shard)
    assert once <= 4, counts  # cohort_tables, agreement, report, all
    # 10,000 scans with all five model stages (+ qc per shard).
    assert math.ceil(10_000 / shard_size) * (5 + 1) + once <= 500
