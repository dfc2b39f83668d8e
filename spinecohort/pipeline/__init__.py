"""The pipeline's shard jobs and cohort tables, by purpose:

- :mod:`.context`: what a stage sees (:class:`ScanContext`), the :class:`Stage` base, work paths;
- :mod:`.runner`: one stage over one shard (config slice, resume records), and the whole run in process;
- :mod:`.tables`: the cohort tables and the shard's QC job.

Callers (the Snakefile, entry, cli, tests) import from ``spinecohort.pipeline``. Only
:mod:`.context` is imported eagerly: :mod:`spinecohort.stages` imports it while runner and tables
import the stages, so loading those here would make ``import spinecohort.stages`` circular. The
other names load on first use (PEP 562).
"""
from __future__ import annotations

import importlib
from typing import Any

from .context import ScanContext, Stage, remove_intermediates, scan_series, series_path, shard_dir

_LAZY = {
    **dict.fromkeys(("run_in_process", "run_shard_stage", "ScanRecords", "_resume_key"), ".runner"),
    **dict.fromkeys(("DISC_COLUMNS", "MODEL_STAGES", "SCAN_COLUMNS", "VERTEBRA_COLUMNS", "collect_rows",
                     "derived_tables", "render_shard_qc", "write_cohort_tables"), ".tables"),
    **dict.fromkeys(("stage_classes", "stage_order", "IngestStage"), "spinecohort.stages"),
}

__all__ = ["ScanContext", "Stage", "remove_intermediates", "scan_series", "series_path", "shard_dir", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value
