"""The demo cohort end to end through Snakemake, as `make demo` runs it (tiny cohort)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

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
