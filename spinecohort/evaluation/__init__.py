"""Evaluation of the pipeline's stages against annotations (``spinecohort evaluate
detection|labelling|morphometry``): :mod:`~spinecohort.evaluation.detection`,
:mod:`~spinecohort.evaluation.labelling`, :mod:`~spinecohort.evaluation.morphometry`.

The detection evaluation's names are re-exported here (they were ``spinecohort.evaluation``'s
before the stages' evaluations became one package)."""
from __future__ import annotations

from .detection import (
    DetectionCase,
    EvalBody,
    contains_centroid,
    evaluate_detection,
    match_detections,
    public_lumbar_detection_cases,
    synthetic_case,
    synthetic_detection_cases,
)

__all__ = [
    "DetectionCase",
    "EvalBody",
    "contains_centroid",
    "evaluate_detection",
    "match_detections",
    "public_lumbar_detection_cases",
    "synthetic_case",
    "synthetic_detection_cases",
]
