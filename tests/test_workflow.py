"""The demo cohort end to end through Snakemake, as `make demo` runs it (tiny cohort)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from spinecohort.label import LEVEL_FLAGS
from spinecohort.provenance import read_provenance

REPO = Path(__file__).resolve().parents[1]


def test_snakemake_demo_end_to_end(tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, "-m", "snakemake", "--cores", "2", "--snakefile", str(REPO / "Snakefile"),
               "--directory", str(REPO), "--config", f"outdir={out}", "demo={n_scans: 3, seed: 5}",
               "shard_size=2", "agreement={bootstrap: 20, seed: 0}", "tta=1"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    scans = pd.read_parquet(out / "tables" / "scans.parquet")
    assert list(scans["scan_id"]) == ["demo0000", "demo0001", "demo0002"]
    assert (scans["status"] == "ok").all(), scans[["scan_id", "error"]]
    # labelling doubt per scan: a posterior in [0, 1] and flags from the documented vocabulary
    assert scans["level_confidence"].between(0, 1).all(), scans["level_confidence"]
    assert all(set(filter(None, flags.split(";"))) <= set(LEVEL_FLAGS) for flags in scans["level_flags"])
    assert "level_confidence" not in pd.read_parquet(out / "tables" / "vertebrae.parquet").columns
    for scan_id in scans["scan_id"]:
        assert (out / "report" / "qc" / f"{scan_id}.png").exists()
    html = (out / "report" / "validation.html").read_text()
    assert "<img" in html and "http://" not in html.replace("http://www.w3.org", "")
    assert {"pipeline_version", "config_sha256", "models", "created_by"} <= set(read_provenance(out / "tables" / "discs.parquet"))
    assert (out / "tables" / "agreement.parquet").exists()
    # Changing tta re-runs grading and what follows it, not ingest/detect/label/extract_discs.
    plan = subprocess.run([*command[:-1], "tta=2", "-n"], capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    jobs = plan.stdout[plan.stdout.index("Job stats:"):].split("\n\n")[0]
    planned = {line.split()[0] for line in jobs.splitlines()[3:] if len(line.split()) == 2}
    assert "grade" in planned and not planned & {"ingest", "detect", "label", "extract_discs"}, jobs
    # No synthetic patient identifier reaches any output.
    for path in out.rglob("*"):
        if path.is_file() and "demo" not in path.relative_to(out).parts[:1]:
            blob = path.read_bytes()
            assert b"Phantom^Subject" not in blob and b"PHANTOM-" not in blob, path


@pytest.mark.slow
def test_snakemake_hostile_cohort_finishes_with_tables_and_report(tmp_path):
    """Hostile scans beside a good one (issue 15): every job ends, the good scan is ok, each hostile
    one ok or failed with a named reason, the report counts the labels' problems, and every output
    is group-readable under a group-sharing umask."""
    import os
    import stat
    import struct

    import nibabel as nib
    import numpy as np

    from spinecohort.dicom_writer import SeriesHeader, write_series

    cohort = tmp_path / "cohort"
    rng = np.random.default_rng(11)
    write_series(rng.integers(0, 2000, (6, 48, 40)).astype(np.float32), cohort / "good", SeriesHeader((0.7, 0.7), 4.0), rng)
    os.mkfifo(cohort / "good" / "pipe")  # read forever before
    nib.save(nib.Nifti1Image(np.ones((5, 30, 20), np.float32), np.eye(4)), cohort / "zero.nii")
    raw = bytearray((cohort / "zero.nii").read_bytes())
    struct.pack_into("<hh12f", raw, 252, 0, 1, *([0.0] * 12))  # all-zero sform: QC divided by its spacing
    struct.pack_into("<12f", raw, 280, *([0.0] * 12))
    (cohort / "zero.nii").write_bytes(raw)
    (cohort / "zero.dcm").symlink_to("/dev/zero")
    manifest = cohort / "manifest.csv"
    manifest.write_text("scan_id,subject_id,path,age\ngood,s1,good,50\nzero_affine,s2,zero.nii,61\ndevzero,s3,zero.dcm,\n")
    labels = cohort / "labels.csv"
    labels.write_text("scan_id,level,Pfirrmann\ngood,L4-L5,severe\ngood,L9-L10,3\nghost,L4-L5,2\n")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "snakemake", "--cores", "2", "--snakefile", str(REPO / "Snakefile"),
               "--directory", str(tmp_path), "--configfile", str(REPO / "config" / "config.yaml"), "--config",
               f"outdir={out}", f"manifest={manifest}", f"labels={labels}", "shard_size=3",
               "agreement={bootstrap: 0, seed: 0}", "tta=1", "hotspots=none"]
    run = subprocess.run(["sh", "-c", 'umask 027 && exec "$@"', "sh", *command], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    scans = pd.read_parquet(out / "tables" / "scans.parquet").set_index("scan_id")
    assert scans.loc["good", "status"] == "ok", scans["error"]
    assert "pipe: not a regular file" in scans.loc["good", "ingest_warnings"]
    assert scans.loc["zero_affine", "error"].startswith("scan zero_affine: file ") and "affine" in scans.loc["zero_affine", "error"]
    assert scans.loc["devzero", "error"].startswith("scan devzero: file ") and "not a regular file" in scans.loc["devzero", "error"]
    html = (out / "report" / "validation.html").read_text()
    assert "1 Pfirrmann grade(s) are not numbers" in html and "(ghost)" in html and "(L9-L10)" in html
    for path in out.rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0o040, path
