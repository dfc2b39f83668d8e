"""The ``report`` rule: read the cohort tables and render ``report/validation.html``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from .provenance import read_provenance


def build_report(config: Mapping[str, Any], *, scans: str | Path, discs: str | Path, agreement: str | Path | None,
                 labels: str | Path | None, out: str | Path) -> None:
    from .report import render_report

    outdir = Path(config["outdir"])
    agreement_table = pd.read_parquet(agreement) if agreement else None
    confusion_path = Path(agreement).with_name("confusion.parquet") if agreement else None
    confusion = pd.read_parquet(confusion_path) if confusion_path and confusion_path.exists() else None
    qc_dir = outdir / "report" / "qc"
    qc_images = {p.stem: p for p in sorted(qc_dir.glob("*.png"))} if config.get("qc", True) else {}
    hotspot_dir = outdir / "report" / "hotspots"
    hotspots = sorted(hotspot_dir.glob("*.png")) if hotspot_dir.exists() else []
    provenance = read_provenance(discs)
    from .shipped import training_records

    raw_models = provenance.get("models")
    models = json.loads(raw_models) if isinstance(raw_models, str) and raw_models.strip().startswith("{") else {}
    # a team's own grader (models.grader) has its record (grader.json) beside it
    training = training_records(models, (config.get("models") or {}).get("grader"))
    notes = []
    if agreement is None:
        notes.append("No radiologist labels were configured (config key `labels`), so the agreement stage was skipped.")
    render_report(
        out,
        scans=pd.read_parquet(scans),
        discs=pd.read_parquet(discs),
        agreement=agreement_table,
        confusion=confusion,
        labels=pd.read_csv(labels) if labels else None,
        provenance=provenance,
        qc_images=qc_images,
        hotspot_images=hotspots,
        notes=notes,
        training=training,
        reading_schemes=config.get("reading_schemes"),
    )
