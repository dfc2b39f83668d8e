"""A run killed mid-way (SIGKILL, as when a node or the login session dies) resumes with
`--unlock` then the same command (profiles/default has rerun-incomplete), redoes only the unfinished
jobs, and ends with the same tables as an uninterrupted run."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
TABLES = ("scans", "vertebrae", "discs")


def write_cohort(root: Path, n_scans: int) -> Path:
    from spinecohort.dicom_writer import SeriesHeader, write_series

    rng = np.random.default_rng(3)
    for i in range(n_scans):
        write_series(rng.integers(0, 2000, (6, 48, 40)).astype(np.float32), root / f"s{i}",
                     SeriesHeader((0.7, 0.7), 4.0), rng)
    (root / "junk").mkdir()
    (root / "junk" / "x.dcm").write_bytes(b"not dicom")  # one failing scan: failures must resume too
    manifest = root / "manifest.csv"
    manifest.write_text("scan_id,subject_id,path,site\n"
                        + "".join(f"s{i},sub{i},s{i},north\n" for i in range(n_scans)) + "bad,subX,junk,south\n")
    return manifest


def comparable(path: Path):
    """Table contents without timing columns, and file metadata without `created_by` and the
    config hash (the two runs write to different folders)."""
    table = pq.read_table(path)
    metadata = table.schema.metadata or {}
    table = table.select([c for c in table.column_names if not c.startswith("seconds_")])
    return table, {k: v for k, v in metadata.items() if k not in (b"created_by", b"config_sha256", b"pandas")}


@pytest.mark.slow
def test_killed_run_resumes_to_identical_tables(tmp_path):
    from spinecohort.config import resolve_config
    from spinecohort.pipeline import run_in_process
    from spinecohort.provenance import config_sha256

    manifest = write_cohort(tmp_path / "cohort", 2)
    run = tmp_path / "run"  # its own .snakemake/ (locks, incomplete markers), away from the checkout
    (run / "config").mkdir(parents=True)
    shutil.copy(REPO / "config" / "config.yaml", run / "config" / "config.yaml")
    out = run / "out"
    overrides = {"manifest": str(manifest), "outdir": str(out), "shard_size": 2}
    command = [*SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--profile", str(REPO / "profiles" / "default"),
               "--config", *[f"{k}={v}" for k, v in overrides.items()], "--", str(out / "tables" / "scans.parquet")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}

    # 1. Start, and kill the whole process group once the second shard's first stage is written
    #    (with --cores 1 the first shard's jobs are then finished and recorded).
    shards = out / "work" / "shards"
    process = subprocess.Popen([*command[:-2], "--cores", "1", *command[-2:]], cwd=run, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while not (shards / "0001" / "ingest.status.parquet").exists():
            assert process.poll() is None, "snakemake ended before it could be interrupted"
            assert time.monotonic() < deadline, "no stage output after 120 s"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (out / "tables" / "scans.parquet").exists(), "the run finished before it was killed"
    written = sorted(shards.glob("*/*.status.parquet"), key=lambda p: p.stat().st_mtime_ns)
    finished = {p: p.stat().st_mtime_ns for p in written[:-1]}  # the newest may not be recorded as done yet
    assert (run / ".snakemake" / "locks").exists() and any((run / ".snakemake" / "locks").iterdir())

    # 2. Resume: remove the dead run's lock, then the same command (rerun-incomplete is in the profile).
    subprocess.run([*command[:-2], "--unlock"], cwd=run, env=env, check=True, capture_output=True)
    result = subprocess.run([*command[:-2], "--cores", "2", *command[-2:]], cwd=run, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was recomputed although its job had finished"

    # 3. The same tables as an uninterrupted run of the same cohort and config.
    paths = run_in_process(resolve_config({**overrides, "outdir": str(tmp_path / "reference")}), manifest,
                           created_by="test")
    for name in TABLES:
        got, got_meta = comparable(out / "tables" / f"{name}.parquet")
        want, want_meta = comparable(paths[name])
        assert got.schema.names == want.schema.names, name
        assert got.equals(want), (name, got.to_pandas(), want.to_pandas())
        assert got_meta == want_meta, name
    assert pq.read_metadata(out / "tables" / "scans.parquet").metadata[b"config_sha256"].decode() == \
        config_sha256(resolve_config(overrides))
    scans = pq.read_table(out / "tables" / "scans.parquet").to_pandas().set_index("scan_id")
    assert list(scans.index) == ["s0", "s1", "bad"] and scans.loc["bad", "status"] == "failed"
