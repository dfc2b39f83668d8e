"""Cohort scale (issue 16): appending scans re-plans only their shard, a killed shard resumes at its
next scan, intermediates are stored compactly and removed after use, and the device a scan ran on
is recorded (a requested GPU that is absent stops the job)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spinecohort import ingest as ingest_mod
from spinecohort.config import resolve_config
from spinecohort.ingest import Series, load_series, save_series
from spinecohort.manifest import read_manifest, shard_keys
from test_cluster import planned_jobs  # one parser of Snakemake's job table for the tests

REPO = Path(__file__).resolve().parents[1]


def write_cohort(root: Path, n_scans: int, seed: int = 5) -> Path:
    from spinecohort.dicom_writer import SeriesHeader, write_series

    rng = np.random.default_rng(seed)
    for i in range(n_scans):
        write_series(rng.integers(0, 2000, (5, 40, 32)).astype(np.float32), root / f"s{i}",
                     SeriesHeader((0.7, 0.7), 4.0), rng)
    manifest = root / "manifest.csv"
    manifest.write_text("scan_id,subject_id,path\n" + "".join(f"s{i},sub{i},s{i}\n" for i in range(n_scans)))
    return manifest


# ----------------------------------------------------------------------------- shard membership
def test_shard_keys_change_only_for_the_shard_whose_rows_change(tmp_path):
    rows = "".join(f"scan{i},sub{i},d/scan{i}\n" for i in range(10))
    (tmp_path / "a.csv").write_text("scan_id,subject_id,path\n" + rows)
    (tmp_path / "b.csv").write_text("scan_id,subject_id,path\n" + rows + "scan10,sub10,d/scan10\n")
    (tmp_path / "c.csv").write_text("scan_id,subject_id,path\n" + rows.replace("d/scan7", "d/scan7-fixed"))
    before, appended, changed = (shard_keys(read_manifest(tmp_path / f"{n}.csv"), 4) for n in "abc")
    assert list(before) == ["0000", "0001", "0002"] and list(appended) == [*before]
    assert [k for k in before if before[k] != appended[k]] == ["0002"]  # the last, unfilled shard only
    assert [k for k in before if before[k] != changed[k]] == ["0001"]  # rows 4-7
    demo = shard_keys(None, 4, {"n_scans": 10, "seed": 0})
    assert list(demo) == list(before) and demo != shard_keys(None, 4, {"n_scans": 10, "seed": 1})


@pytest.mark.slow
def test_appending_a_row_plans_only_its_shard(tmp_path):
    """A finished 2-shard run; one row appended plans one shard's jobs (+ the cohort's tables and
    report), and a changed row re-plans only its own shard."""
    from spinecohort.pipeline import stage_order

    run = tmp_path / "run"  # its own .snakemake/, away from the checkout
    (run / "config").mkdir(parents=True)
    shutil.copy(REPO / "config" / "config.yaml", run / "config" / "config.yaml")
    manifest = tmp_path / "manifest.csv"
    # paths that do not exist: every scan fails at ingestion, which keeps the jobs short
    header, rows = "scan_id,subject_id,path\n", [f"s{i},sub{i},missing/s{i}\n" for i in range(4)]
    manifest.write_text(header + "".join(rows))
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "2",
               "--config", f"manifest={manifest}", "outdir=out", "shard_size=2", "qc=false", "hotspots=none",
               "--", "out/tables/scans.parquet"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(command, cwd=run, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def plan() -> tuple[dict[str, int], str]:
        result = subprocess.run([*command[:5], "-n", *command[5:]], cwd=run, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        text = result.stdout + result.stderr
        return (planned_jobs(text) if "Job stats:" in text else {}), text

    assert plan()[0] == {}  # nothing to do
    per_shard = [*stage_order(), "qc"]
    manifest.write_text(header + "".join(rows) + "s4,sub4,missing/s4\n")
    counts, text = plan()
    assert {rule: counts.get(rule, 0) for rule in per_shard} == {rule: 1 for rule in per_shard}, text[-3000:]
    assert set(counts) - set(per_shard) <= {"cohort_tables", "total"}, counts
    assert "shard=0002" in text and "shard=0000" not in text and "shard=0001" not in text, text[-3000:]

    rows[1] = "s1,sub1,missing/s1-moved\n"  # a corrected row of the first shard
    manifest.write_text(header + "".join(rows))
    counts, text = plan()
    assert {rule: counts.get(rule, 0) for rule in per_shard} == {rule: 1 for rule in per_shard}, text[-3000:]
    assert "shard=0000" in text and "shard=0001" not in text, text[-3000:]


# ----------------------------------------------------------------------------- resuming a shard
class Killed(BaseException):
    """Stands for the job being killed (not an Exception: the stage does not catch it)."""


def test_killed_shard_resumes_at_its_next_scan(tmp_path, monkeypatch):
    from spinecohort.pipeline import run_shard_stage, shard_dir

    manifest = write_cohort(tmp_path / "cohort", 4)
    config = resolve_config({"manifest": str(manifest), "outdir": str(tmp_path / "out"), "shard_size": 4})
    real_ingest = ingest_mod.ingest
    calls: list[str] = []

    def ingest_then_die(path, scan_id, series=None):
        if len(calls) == 2:
            raise Killed()
        calls.append(scan_id)
        return real_ingest(path, scan_id, series)

    monkeypatch.setattr(ingest_mod, "ingest", ingest_then_die)
    with pytest.raises(Killed):
        run_shard_stage("ingest", config, manifest, 0)
    here = shard_dir(config["outdir"], 0)
    assert not (here / "ingest.status.parquet").exists()  # the job's output: not there, so it re-runs
    assert sorted(p.stem for p in (here / "partial" / "ingest").glob("*.parquet")) == ["s0", "s1"]

    calls.clear()
    monkeypatch.setattr(ingest_mod, "ingest", lambda path, scan_id, series=None: (calls.append(scan_id),
                                                                                  real_ingest(path, scan_id, series))[1])
    run_shard_stage("ingest", config, manifest, 0)
    assert calls == ["s2", "s3"]  # s0 and s1 were not recomputed
    assert not (here / "partial").exists()

    # ... and the shard's files equal an uninterrupted run's
    other = {**config, "outdir": str(tmp_path / "again")}
    run_shard_stage("ingest", other, manifest, 0)
    for name in ("ingest.parquet", "ingest.status.parquet"):
        got, want = (pd.read_parquet(shard_dir(c["outdir"], 0) / name) for c in (config, other))
        pd.testing.assert_frame_equal(got.drop(columns=["seconds"], errors="ignore"),
                                      want.drop(columns=["seconds"], errors="ignore"))


def test_records_of_an_interrupted_run_under_another_config_are_not_reused(tmp_path, monkeypatch):
    from spinecohort.config_keys import config_for
    from spinecohort.pipeline import (ScanContext, ScanRecords, _resume_key, run_shard_stage, shard_dir,
                                      stage_classes)

    manifest = write_cohort(tmp_path / "cohort", 2)
    config = resolve_config({"manifest": str(manifest), "outdir": str(tmp_path / "out"), "shard_size": 2})
    here = shard_dir(config["outdir"], 0)
    # what a run killed after s0 leaves behind, under keep_series_uid: false
    stage_cfg = config_for(config, "ingest")
    records = ScanRecords(here / "partial" / "ingest", _resume_key(stage_classes()["ingest"](stage_cfg), stage_cfg, here))
    row = read_manifest(manifest).iloc[0].to_dict()
    records.write(ScanContext(scan_id="s0", row=row, workdir=Path(config["outdir"]) / "work"),
                  {"status": "ok", "error": "", "seconds": 0.0, "device": "", "gpu_model": ""},
                  pd.DataFrame({"scan_id": ["s0"], "series_key": ["from-the-interrupted-run"]}))
    calls: list[str] = []
    real_ingest = ingest_mod.ingest
    monkeypatch.setattr(ingest_mod, "ingest", lambda path, scan_id, series=None: (calls.append(scan_id),
                                                                                  real_ingest(path, scan_id, series))[1])
    run_shard_stage("ingest", {**config, "keep_series_uid": True}, manifest, 0)  # the config changed since
    assert calls == ["s0", "s1"]
    assert "from-the-interrupted-run" not in set(pd.read_parquet(here / "ingest.parquet")["series_key"])
    # under the same config the record is used
    records.write(ScanContext(scan_id="s0", row=row, workdir=Path(config["outdir"]) / "work"),
                  {"status": "ok", "error": "", "seconds": 0.0, "device": "", "gpu_model": ""},
                  pd.DataFrame({"scan_id": ["s0"], "series_key": ["from-the-interrupted-run"]}))
    calls.clear()
    run_shard_stage("ingest", config, manifest, 0)
    assert calls == ["s1"]
    assert "from-the-interrupted-run" in set(pd.read_parquet(here / "ingest.parquet")["series_key"])


# ----------------------------------------------------------------------------- intermediates
@pytest.mark.parametrize("values", ["uint16", "int16", "float"])
def test_compact_series_round_trips_exactly(tmp_path, values):
    rng = np.random.default_rng(0)
    if values == "uint16":
        volume = rng.integers(0, 4096, (6, 64, 48)).astype(np.float32)
    elif values == "int16":
        volume = rng.integers(-1024, 3000, (6, 64, 48)).astype(np.float32)
    else:  # rescaled values that are not integers stay float32
        volume = (rng.integers(0, 4096, (6, 64, 48)) * 0.37 + 0.1).astype(np.float32)
    affine = np.diag([4.0, 0.7, 0.7, 1.0])
    affine[:3, 3] = [1.5, -2.25, 3.0]
    series = Series(volume, affine, {"pixel_spacing_mm": [0.7, 0.7], "slice_spacing_mm": 4.0, "warnings": [],
                                     "series_uid": "1.2.3"})
    save_series(series, tmp_path / "s.npz")
    back = load_series(tmp_path / "s.npz")
    assert back.volume.dtype == np.float32 and np.array_equal(back.volume, volume)
    assert np.array_equal(back.affine, affine) and "series_uid" not in back.meta
    with np.load(tmp_path / "s.npz") as stored:
        assert stored["volume"].dtype == {"uint16": np.uint16, "int16": np.int16, "float": np.float32}[values]
    if values != "float":
        assert (tmp_path / "s.npz").stat().st_size < volume.nbytes / 2 + 4096


def test_removed_intermediates_are_read_again_with_the_same_result(tmp_path):
    from spinecohort.pipeline import render_shard_qc, run_shard_stage, scan_series, series_path

    manifest = write_cohort(tmp_path / "cohort", 2)
    config = resolve_config({"manifest": str(manifest), "outdir": str(tmp_path / "out"), "shard_size": 2,
                             "hotspots": "none"})
    run_shard_stage("ingest", config, manifest, 0)
    work = Path(config["outdir"]) / "work"
    row = read_manifest(manifest).iloc[0].to_dict()
    stored = load_series(series_path(work, "s0"))
    render_shard_qc({**config, "keep_intermediates": True}, manifest, 0)
    assert series_path(work, "s0").exists()
    render_shard_qc(config, manifest, 0)  # the shard's last job: its series go
    assert not series_path(work, "s0").exists() and not series_path(work, "s1").exists()
    again = scan_series(work, row)
    assert np.array_equal(again.volume, stored.volume) and np.array_equal(again.affine, stored.affine)
    assert (Path(config["outdir"]) / "report" / "qc" / "s0.png").exists()


# ----------------------------------------------------------------------------- devices
def test_cuda_requested_without_cuda_stops_with_the_reason():
    import torch

    from spinecohort.stages import DetectStage, DeviceError, torch_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    threads = torch.get_num_threads()
    try:
        with pytest.raises(DeviceError, match=r"device: cuda, but CUDA is not available: .*set device: auto or cpu"):
            torch_device({"device": "cuda", "threads": 1})
        config = resolve_config({"device": "cuda"})
        with pytest.raises(DeviceError, match="CUDA is not available"):
            DetectStage(config)
        assert torch_device({"device": "auto", "threads": 1}) == "cpu"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_scans_table_records_the_device_per_stage(tmp_path, torch_threads):
    from spinecohort.pipeline import MODEL_STAGES, run_in_process
    from spinecohort.report import device_hours

    manifest = write_cohort(tmp_path / "cohort", 2)
    config = resolve_config({"manifest": str(manifest), "outdir": str(tmp_path / "out"), "shard_size": 2,
                             "device": "cpu", "hotspots": "none", "tta": 1, "qc": False})
    scans = pd.read_parquet(run_in_process(config, manifest, created_by="test")["scans"])
    for stage in MODEL_STAGES:
        ran = scans[f"seconds_{stage}"].notna()
        assert (scans.loc[ran, f"device_{stage}"] == "cpu").all() and (scans.loc[~ran, f"device_{stage}"] == "").all()
    assert (scans["gpu_model"] == "").all()
    hours = device_hours(scans)
    assert {r["stage"] for r in hours} >= {"ingest", "detect"} and {r["device"] for r in hours} == {"cpu"}
    assert not (Path(config["outdir"]) / "work" / "series" / "s0.npz").exists()  # removed after the shard


# ----------------------------------------------------------------------------- software deployment
def test_container_and_conda_env_pin_what_pyproject_pins():
    """containers/spinecohort.def (apptainer) and envs/spinecohort.yaml (conda) install the
    package's dependencies, and every rule declares both."""
    import re
    import tomllib

    wanted = {re.split(r"[<>=]", d)[0]: d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    definition = (REPO / "containers" / "spinecohort.def").read_text()
    pinned = set(re.findall(r'"([A-Za-z0-9_.-]+[<>=][^"]*)"', definition))
    assert pinned == set(wanted.values()), pinned ^ set(wanted.values())
    env = (REPO / "envs" / "spinecohort.yaml").read_text()
    for name in wanted:
        if name != "snakemake":  # the controller's, not the jobs'
            assert re.search(rf"^\s*- {re.escape(name)}\b", env, re.M), name
    rules = "".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))
    assert rules.count("script:") == rules.count("container:") == rules.count("conda:") > 10  # every job rule
