"""Agreement of predicted disc grades with radiologists' reads (``tables/agreement.parquet`` and
``tables/confusion.parquet``).

- :mod:`~spinecohort.stats.agreement`: the comparisons, strata and rows (and what they mean);
- :mod:`~spinecohort.stats.metrics`: the metrics of a confusion matrix, analytic intervals;
- :mod:`~spinecohort.stats.bootstrap`: the subject-clustered bootstrap;
- :mod:`~spinecohort.stats.io`: reading predictions and labels, writing the tables;
- :mod:`~spinecohort.stats.cli`: the ``spinecohort agreement`` command.
"""
from __future__ import annotations

from .agreement import AGREEMENT_COLUMNS, CONFUSION_COLUMNS, compute_agreement, primary_rows
from .cli import agreement_cli
from .io import (
    LABEL_KEY_COLUMNS,
    _read_table,  # report.stage reads its inputs with it
    default_confusion_path,
    label_warnings,
    run_agreement,
)
from .metrics import (
    METRICS_ALL,
    METRICS_BINARY,
    METRICS_ORDINAL,
    ccc_fisher_z_ci,
    confusion_metrics,
    kappa_se,
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
