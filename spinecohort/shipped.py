"""The shipped default models (the checkout's ``models/`` folder), named in this one place."""
from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"

#: Stage role -> file in MODELS_DIR (each has a model card ``<stem>.md`` beside it).
DEFAULT_MODELS = {
    "detector": "detector-cpu-v6.pt",
    "appearance": "appearance-cpu-v2.pt",
    "context": "context-cpu-v2.pt",
    "grader": "grader-cpu-v3.pt",
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
