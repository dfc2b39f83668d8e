"""Patient-level k-fold cross-validation of the recipe, optionally fine-tuning from a checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ...tasks import TASKS
from .recipe import TrainConfig, fit, load_ivv_arrays, make_targets, predict_probs

__all__ = ["patient_folds", "load_init", "load_init_state", "cross_validate"]


def patient_folds(subjects: Sequence[str], k: int, seed: int) -> np.ndarray:
    """Fold number per row: subjects shuffled with ``seed`` and dealt round-robin into ``k``
    folds, so all discs (and scans) of a subject share a fold."""
    subj = pd.Series([str(s) for s in subjects])
    uniq = np.array(sorted(subj.unique()))
    rng = np.random.default_rng(seed)
    order = uniq[rng.permutation(len(uniq))]
    fold_of = {s: i % k for i, s in enumerate(order)}
    return subj.map(fold_of).to_numpy(np.int64)


def load_init(init_weights, default_arch: dict) -> tuple[dict, dict | None]:
    """``(arch, state_dict)`` to start from, the checkpoint read once: a path's architecture and
    weights (an ensemble's first member: the recipe trains one network), a state dict given as is
    with ``default_arch``, or ``(default_arch, None)`` for scratch."""
    if init_weights is None:
        return default_arch, None
    if isinstance(init_weights, dict):
        return default_arch, init_weights
    import torch

    from ...nets.grader_slices import first_member

    payload = torch.load(init_weights, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict):
        return default_arch, payload
    state = payload["state_dict"] if "state_dict" in payload else payload
    if not payload.get("arch"):
        return default_arch, state
    return first_member(payload["arch"], state)


def load_init_state(init_weights) -> dict | None:
    """The state dict to start from (:func:`load_init` without the architecture)."""
    return load_init(init_weights, {})[1]


def cross_validate(ivv_table: pd.DataFrame | str | Path, labels: pd.DataFrame | str | Path, k: int = 5,
                   seed: int = 0, init_weights=None, config: TrainConfig | None = None,
                   tta: int = 4, log: Callable[[str], None] = print, readers: Sequence[str] | None = None,
                   device: str = "cpu"):
    """Patient-level k-fold CV. Returns ``(oof, fold_models)``: ``oof`` has one row per IVV with
    ``scan_id, subject_id, level, fold, <Task>, <Task>_probs`` (grades on the contract scale;
    IVVs without any label are still predicted), ``fold_models`` the k :class:`Grader` objects
    (on the CPU). Raises ``ValueError`` when fewer than ``k`` subjects have a labelled disc."""
    from ...grade import Grader, grades_frame

    cfg = config or TrainConfig(seed=seed)
    cfg.arch, init_state = load_init(init_weights, cfg.arch)
    X, keys = load_ivv_arrays(ivv_table)
    targets = make_targets(keys, labels, readers)
    if k < 2:
        raise ValueError(f"k = {k}: cross-validation needs at least 2 folds")
    folds = patient_folds(keys["subject_id"], k, seed)
    labelled = np.any(np.stack([t.sum(1) > 0 for t in targets], 1), axis=1) if len(keys) else np.zeros(0, bool)
    n_subjects = keys.loc[labelled, "subject_id"].nunique()
    if n_subjects < k:
        raise ValueError(f"{k}-fold cross-validation needs at least {k} subjects with a labelled disc volume; "
                         f"there are {n_subjects} ({int(labelled.sum())} labelled discs)")
    frames, models = [], []
    for f in range(k):
        tr = np.flatnonzero((folds != f) & labelled)
        te = np.flatnonzero(folds == f)
        log(f"fold {f + 1}/{k}: train {len(tr)} discs, predict {len(te)}")
        net = fit(X[tr], [t[tr] for t in targets], cfg, init_state=init_state, log=log, device=device)
        probs = predict_probs(net, X[te], tta=tta, device=device)
        rows = keys.iloc[te].to_dict("records")
        for r in rows:
            r["fold"] = f
        frames.append(grades_frame(rows, [{t.name: probs[j][i] for j, t in enumerate(TASKS)} for i in range(len(te))]))
        models.append(Grader(net, "cpu", meta={"fold": f, "k": k, "seed": seed}, model_id=f"grader-fold{f}"))
    oof = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return oof, models
