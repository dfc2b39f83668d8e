"""What the ``train_grader`` rules read when Snakemake parses the workflow: plain names and paths,
kept apart from :mod:`spinecohort.training.grader` so that planning a cohort never imports torch
(about 1.5 s of every dry run)."""
from __future__ import annotations

from pathlib import Path

from ..shipped import default_model_path

__all__ = ["CV_DIR", "IVV_STAGE", "init_weights_path"]

CV_DIR = "grader_cv"
IVV_STAGE = "extract_discs"  # the stage whose rows and IVV files (work/ivv/<scan_id>.npz) are used


def init_weights_path(value: str | None) -> Path | None:
    """``grader_training: init_weights``: ``shipped`` -> the checkout's default grader,
    ``scratch`` (or None) -> None (random initialisation), anything else -> that path."""
    if value is None or value == "scratch":
        return None
    if value == "shipped":
        return default_model_path("grader")
    return Path(value)
