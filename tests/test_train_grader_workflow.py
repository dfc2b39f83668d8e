"""`snakemake train_grader` on a tiny demo cohort with its simulated reads: the pipeline's own disc
volumes, patient-level k-fold CV, out-of-fold predictions into the agreement stage, and a final
model with its card (tiny training settings: the recipe itself is tested in test_grade.py)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch

from spinecohort.pipeline import DISC_COLUMNS
from spinecohort.shipped import default_model_path
from spinecohort.tasks import TASK_NAMES

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
TINY = "grader_training={k: 2, seed: 0, steps: 2, batch_size: 4, head_epochs: 1, final: true}"


def snakemake(run: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), *args],
                          cwd=run, capture_output=True, text=True, timeout=600)


def test_train_grader_target_cross_validates_on_the_pipelines_own_discs(tmp_path):
    run = tmp_path / "run"  # its own .snakemake/ and config, away from the checkout
    (run / "config").mkdir(parents=True)
    shutil.copy(REPO / "config" / "config.yaml", run / "config" / "config.yaml")
    out = run / "out"
    # 5 scans of 4 subjects (one comes back for a second visit); 2 shards run side by side
    config = [f"outdir={out}", "demo={n_scans: 5, seed: 5}", "shard_size=3", "threads=1", "tta=1",
              "qc=false", "agreement={bootstrap: 20, seed: 0}"]
    result = snakemake(run, "--cores", "2", "--config", *config, TINY, "--", "train_grader")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    cv = out / "grader_cv"

    # Every labelled disc is predicted exactly once, by the fold that did not train on its subject.
    labels = pd.read_csv(out / "demo" / "labels.csv", dtype={"scan_id": str, "level": str})
    graded = labels[labels[list(TASK_NAMES)].notna().any(axis=1)]
    labelled = set(zip(graded["scan_id"], graded["level"]))
    oof = pd.read_parquet(cv / "oof_predictions.parquet")
    missing = pd.read_csv(cv / "missing_discs.csv")
    assert missing.empty, missing  # the demo's discs are all found
    keys = list(zip(oof["scan_id"], oof["level"]))
    assert len(keys) == len(set(keys)) and set(keys) == labelled
    assert set(oof["fold"]) == {0, 1}
    assert oof.groupby("subject_id")["fold"].nunique().max() == 1
    assert oof.groupby("subject_id")["scan_id"].nunique().max() == 2  # the repeat visit shares its fold
    assert (oof["model_id"] == "grader-fold" + oof["fold"].astype(str)).all()
    # the discs-table layout, so any consumer of tables/discs.parquet reads it
    assert list(oof.columns[:len(DISC_COLUMNS)]) == DISC_COLUMNS
    assert {*TASK_NAMES, *(f"{t}_probs" for t in TASK_NAMES), "model_id"} <= set(oof.columns)
    assert oof[DISC_COLUMNS].notna().all().all()

    # ... and went straight into the agreement stage's code: model vs each reader, beside R1 vs R1-repeat.
    agreement = pd.read_parquet(cv / "agreement.parquet")
    pooled = agreement[(agreement["level"] == "all") & (agreement["site"] == "all")]
    assert {"model_vs_R1", "model_vs_R1-repeat", "R1_vs_R1-repeat"} <= set(pooled["comparison"])
    ba = pooled[(pooled["comparison"] == "model_vs_R1") & (pooled["metric"] == "balanced_accuracy")]
    assert set(TASK_NAMES) <= set(ba["task"]) and ba["estimate"].between(0, 1).all()
    assert (cv / "confusion.parquet").exists()

    # The final model (all labelled discs) loads with weights_only, through the package's loader.
    from spinecohort.discs import load_ivvs
    from spinecohort.grade import Grader

    payload = torch.load(cv / "grader.pt", map_location="cpu", weights_only=True)
    assert payload["format"] == "spinecohort-grader"
    assert payload["meta"]["trained_on"]["n_discs"] == len(labelled)
    assert payload["meta"]["init_weights"]["id"] == default_model_path("grader").stem
    grader = Grader.load(cv / "grader.pt")
    volumes, _ = load_ivvs(out / "work" / "ivv" / f"{oof['scan_id'].iloc[0]}.npz")
    probs = grader.grade([volumes[0]], tta=1)[0]
    assert abs(float(probs["Pfirrmann"].sum()) - 1.0) < 1e-4
    card = json.loads((cv / "grader.json").read_text())
    assert card["cross_validation"]["n_predictions"] == len(labelled) and len(card["cross_validation"]["evaluation"]) == 11
    assert "Cross-validated agreement" in (cv / "grader.md").read_text()

    # Changing k re-runs the CV and what follows it, not the cohort's stages nor the final model.
    plan = snakemake(run, "-n", "--cores", "2", "--config", *config, TINY.replace("k: 2", "k: 3"), "--", "train_grader")
    assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    jobs = plan.stdout[plan.stdout.index("Job stats:"):].split("\n\n")[0]
    planned = {line.split()[0] for line in jobs.splitlines()[3:] if len(line.split()) == 2}
    assert planned == {"grader_cv", "grader_cv_agreement", "grader_card", "train_grader", "total"}, jobs


def test_train_grader_without_labels_says_so(tmp_path):
    run = tmp_path / "run"
    (run / "config").mkdir(parents=True)
    shutil.copy(REPO / "config" / "config.yaml", run / "config" / "config.yaml")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("scan_id,subject_id,path\ns0,sub0,s0\n")
    result = snakemake(run, "-n", "--cores", "1", "--config", f"manifest={manifest}", f"outdir={run / 'out'}",
                       "--", "train_grader")
    assert result.returncode != 0
    assert "train_grader needs radiologist labels" in result.stdout + result.stderr
