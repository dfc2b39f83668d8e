"""The pipeline's shard jobs and cohort tables. Callers (the Snakefile, entry, cli, tests) import
from ``spinecohort.pipeline``; the names below are that public surface, whichever module holds them."""
from .runner import (DISC_COLUMNS, MODEL_STAGES, SCAN_COLUMNS, VERTEBRA_COLUMNS, IngestStage, ScanContext,
                     ScanRecords, Stage, _resume_key, collect_rows, derived_tables, register_stage,
                     remove_intermediates, render_shard_qc, run_in_process, run_shard_stage, scan_series,
                     series_path, shard_dir, stage_classes, stage_config, stage_order, write_cohort_tables)

__all__ = ["DISC_COLUMNS", "MODEL_STAGES", "SCAN_COLUMNS", "VERTEBRA_COLUMNS", "IngestStage", "ScanContext",
           "ScanRecords", "Stage", "_resume_key", "collect_rows", "derived_tables", "register_stage",
           "remove_intermediates", "render_shard_qc", "run_in_process", "run_shard_stage", "scan_series",
           "series_path", "shard_dir", "stage_classes", "stage_config", "stage_order", "write_cohort_tables"]
