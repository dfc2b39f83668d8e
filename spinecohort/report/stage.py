"""The ``report`` rule: read the cohort tables and render ``report/validation.html``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from ..provenance import read_provenance


def _series_source(outdir: Path, manifest: str | Path | None):
    """scan_id -> its series for the fracture crops: the stored one, or the scan re-read where
    the shard's intermediates were removed (config keep_intermediates: false)."""
    if manifest is None:
        return None
    from ..manifest import read_manifest
    from ..pipeline import scan_series

    rows = {row["scan_id"]: row for row in read_manifest(manifest).to_dict("records")}

    def series_of(scan_id: str):
        try:
            return scan_series(outdir / "work", rows[scan_id])
        except Exception:  # noqa: BLE001 - a scan that cannot be re-read costs its crop only
            return None

    return series_of


def build_report(config: Mapping[str, Any], *, scans: str | Path, discs: str | Path, agreement: str | Path | None,
                 labels: str | Path | None, out: str | Path, morphometry: str | Path | None = None,
                 change: str | Path | None = None, vertebrae: str | Path | None = None,
                 manifest: str | Path | None = None) -> None:
    from .validation import input_warnings, render_report
    from .morphometry import morphometry_context
    from ..stats import _read_table

    outdir = Path(config["outdir"])
    agreement_table = pd.read_parquet(agreement) if agreement else None
    confusion_path = Path(agreement).with_name("confusion.parquet") if agreement else None
    confusion = pd.read_parquet(confusion_path) if confusion_path and confusion_path.exists() else None
    qc_dir = outdir / "report" / "qc"
    qc_images = {p.stem: p for p in sorted(qc_dir.glob("*.png"))} if config.get("qc", True) else {}
    hotspot_dir = outdir / "report" / "hotspots"
    hotspots = sorted(hotspot_dir.glob("*.png")) if hotspot_dir.exists() else []
    morphometry_ctx = morphometry_context(
        pd.read_parquet(morphometry) if morphometry and Path(morphometry).exists() else None,
        pd.read_parquet(change) if change and Path(change).exists() else None,
        pd.read_parquet(vertebrae) if vertebrae and Path(vertebrae).exists() else None,
        outdir / "work" / "series", series_of=_series_source(outdir, manifest))
    provenance = read_provenance(discs)
    from ..shipped import training_records

    raw_models = provenance.get("models")
    models = json.loads(raw_models) if isinstance(raw_models, str) and raw_models.strip().startswith("{") else {}
    # a team's own grader (models.grader) has its record (grader.json) beside it
    training = training_records(models, (config.get("models") or {}).get("grader"))
    notes = []
    if agreement is None:
        notes.append("No radiologist labels were configured (config key `labels`), so the agreement stage was skipped.")
    scans_table = pd.read_parquet(scans)
    labels_table = _read_table(labels, "labels") if labels else None
    render_report(
        out,
        scans=scans_table,
        discs=pd.read_parquet(discs),
        agreement=agreement_table,
        confusion=confusion,
        labels=labels_table,
        provenance=provenance,
        qc_images=qc_images,
        hotspot_images=hotspots,
        notes=notes,
        warnings=input_warnings(scans_table, labels_table),
        morphometry=morphometry_ctx,
        training=training,
        reading_schemes=config.get("reading_schemes"),
    )
