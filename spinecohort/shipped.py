"""The shipped default models (the checkout's ``models/`` folder), named in this one place, and
what each model was trained on (the JSON sidecar beside its weights, see :func:`training_records`).

Sidecar ``models/<stem>.json``: ``model``, ``weights``, ``sha256`` (of the weight file),
``card`` (the ``.md`` model card), ``stage`` and ``training_data``: ``kind`` (``synthetic``,
``real``, ``synthetic+real``), ``data``, ``labels``, ``figures_kind`` (held-out or
cross-validated, on which data), ``figures`` and an optional ``warning``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"

#: Stage role -> file in MODELS_DIR (each has a model card ``<stem>.md`` beside it).
DEFAULT_MODELS = {
    "detector": "detector-cpu-v6.pt",
    "appearance": "appearance-cpu-v4.pt",
    "context": "context-cpu-v4.pt",
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


# ----------------------------------------------------------------------------- training data
#: How the report names a model's training data, by ``training_data.kind``.
KIND_LABELS = {"synthetic": "synthetic only", "synthetic+real": "synthetic + real", "real": "real",
               "cohort": "your labelled cohort", "unknown": "unknown"}


def _record(model_id: str, sha256: str, stage: str, status: str, training: Mapping[str, Any]) -> dict[str, Any]:
    data = dict(training)
    return {"model": model_id, "sha256": sha256, "stage": stage, "status": status,
            "kind": str(data.get("kind", "unknown")),
            "kind_label": KIND_LABELS.get(str(data.get("kind", "unknown")), str(data.get("kind"))),
            "data": str(data.get("data", "")), "labels": str(data.get("labels", "")),
            "figures_kind": str(data.get("figures_kind", "")), "figures": str(data.get("figures", "")),
            "warning": str(data.get("warning") or "")}


def _team_grader_training(card: Mapping[str, Any]) -> dict[str, Any]:
    """``training_data`` of a grader from ``snakemake train_grader``, from its ``grader.json``."""
    data = card.get("data") or {}
    cv = card.get("cross_validation") or {}
    figures = []
    for row in cv.get("evaluation") or []:
        for comparison, value in row.items():
            if comparison.startswith("model_vs_") and isinstance(value, Mapping) and value.get("estimate") is not None:
                figures.append(f"{row['task']} {value['estimate']:.3f} ({comparison})")
    init = (card.get("meta") or {}).get("init_weights") or {}
    return {
        "kind": "cohort",
        "data": (f"{data.get('n_labelled_discs_with_ivv', '?')} labelled discs of {data.get('n_subjects', '?')} subjects "
                 f"({data.get('n_scans', '?')} scans) of the cohort the team trained on"
                 + (f"; fine-tuned from {init['id']}" if init.get("id") else "")),
        "labels": "the team's labels file (train_grader)",
        "figures_kind": f"cross-validated ({cv.get('k', '?')}-fold by subject, out-of-fold)",
        "figures": "balanced accuracy " + ", ".join(figures) if figures else "no cross-validated figure in grader.json",
    }


def training_records(models: Mapping[str, str], custom_grader: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """What each model of a run was trained on, for the report's first screen.

    ``models``: model id -> sha256 (the tables' ``models`` provenance). The record comes from the
    JSON sidecar beside the weights (``models/<stem>.json`` for the shipped models; the
    ``grader.json`` that ``snakemake train_grader`` writes beside a team's ``grader.pt``, given
    as config ``models.grader``), and only counts when its ``sha256`` is that of the weights the
    run used: sidecars sit beside the weight files, never inside them, so no weight file changes
    and a replaced weight file cannot borrow an old record. Official SpineNet weights are
    described from their known origin. Every other model is ``unknown``, and says so."""
    out = []
    for model_id, sha256 in sorted(models.items()):
        model_id, sha256 = str(model_id), str(sha256)
        if model_id.startswith("spinenet-official/"):
            out.append(_record(model_id, sha256, model_id.split("/")[1], "official", {
                "kind": "real",
                "data": "official SpineNetV2 weights (Windsor et al. 2022), trained by their authors on real clinical sagittal MRI",
                "labels": "the authors' radiological gradings",
                "figures_kind": "published by the authors",
                "figures": "not measured by this pipeline: see the authors' publications"}))
            continue
        if model_id.startswith("custom/") and custom_grader:
            sidecar = Path(custom_grader).with_suffix(".json")
        else:
            sidecar = MODELS_DIR / f"{model_id}.json"
        card: dict[str, Any] = {}
        if sidecar.is_file():
            try:
                card = json.loads(sidecar.read_text())
            except ValueError:
                card = {}
        if not card:
            out.append(_record(model_id, sha256, "", "no record", {
                "kind": "unknown", "data": f"no training-data record ({sidecar.name} beside the weights)",
                "warning": "What this model was trained on is not recorded."}))
        elif card.get("sha256") != sha256:
            out.append(_record(model_id, sha256, str(card.get("stage", "")), "sha256 mismatch", {
                "kind": "unknown", "data": f"{sidecar.name} describes other weights (sha256 {str(card.get('sha256'))[:12]}...)",
                "warning": "The weights used are not the ones the training-data record describes."}))
        else:
            training = card.get("training_data") or _team_grader_training(card)
            out.append(_record(model_id, sha256, str(card.get("stage", "grade" if model_id.startswith("custom/") else "")),
                               "matched", training))
    return out
