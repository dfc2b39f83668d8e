"""Agreement of predicted disc grades with radiologists' reads (``tables/agreement.parquet`` and
``tables/confusion.parquet``); the definitions are in :mod:`spinecohort.stats.agreement`."""
from __future__ import annotations

from .agreement import (
    AGREEMENT_COLUMNS,
    CONFUSION_COLUMNS,
    LABEL_KEY_COLUMNS,
    METRICS_ALL,
    METRICS_BINARY,
    METRICS_ORDINAL,
    _read_table,  # report_stage reads its inputs with it
    agreement_cli,
    ccc_fisher_z_ci,
    compute_agreement,
    confusion_metrics,
    default_confusion_path,
    kappa_se,
    label_warnings,
    primary_rows,
    run_agreement,
)

__all__ = [
    "AGREEMENT_COLUMNS",
    "CONFUSION_COLUMNS",
    "LABEL_KEY_COLUMNS",
    "METRICS_ALL",
    "METRICS_BINARY",
    "METRICS_ORDINAL",
    "agreement_cli",
    "ccc_fisher_z_ci",
    "compute_agreement",
    "confusion_metrics",
    "default_confusion_path",
    "kappa_se",
    "label_warnings",
    "primary_rows",
    "run_agreement",
]
