"""The shipped default models (the checkout's ``models/`` folder), named in this one place."""
from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"

#: Stage role -> file in MODELS_DIR (each has a model card ``<stem>.md`` beside it).
DEFAULT_MODELS = {
    "detector": "detector-cpu-v5.pt",
    "appearance": "appearance-cpu-v1.pt",
    "context": "context-cpu-v1.pt",
    # v4 (SPIDER + phantoms): the product grades real discs, where v3 (phantoms only) is at chance
    # (SPIDER Pfirrmann balanced accuracy 0.20 vs v4's 0.48 in patient CV); v4 gives up 7-9 points
    # on phantom-only tasks, a trade-off written in models/grader-cpu-v4.md
    "grader": "grader-cpu-v4.pt",
}


def default_model_path(role: str) -> Path:
    """Where the shipped default model for ``role`` (a key of :data:`DEFAULT_MODELS`) lives."""
    return MODELS_DIR / DEFAULT_MODELS[role]


def default_model(role: str) -> Path:
    """:func:`default_model_path`, which must exist."""
    path = default_model_path(role)
    if not path.exists():
        raise FileNotFoundError(f"model file {path} is missing (the checkout's models/ folder)")
    return path
