"""Latent degeneration model: subject age, per-disc latents and grades for every task,
with thresholds calibrated to :data:`TARGET_PREVALENCE` over lumbar discs."""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from ..tasks import TASKS

_TASK_NAMES = tuple(t.name for t in TASKS)


# --------------------------------------------------------------------------- grade model
TARGET_PREVALENCE: dict[str, object] = {
    "Pfirrmann": (0.32, 0.15, 0.23, 0.20, 0.10),
    "Narrowing": (0.60, 0.12, 0.18, 0.10),
    "CentralCanalStenosis": (0.94, 0.035, 0.018, 0.007),
    "Spondylolisthesis": 0.04,
    "UpperEndplateDefect": 0.09,
    "LowerEndplateDefect": 0.09,
    "UpperMarrow": 0.15,
    "LowerMarrow": 0.15,
    "ForaminalStenosisLeft": 0.12,
    "ForaminalStenosisRight": 0.12,
    "Herniation": 0.12,
}
"""Marginal prevalences over lumbar discs (T12-L1 .. L5-S1); thoracic and cervical discs
use the same thresholds with lower level effects, so findings are rarer there."""

_RHO = {
    "Pfirrmann": 0.93, "Narrowing": 0.8, "CentralCanalStenosis": 0.6, "Spondylolisthesis": 0.35,
    "UpperEndplateDefect": 0.5, "LowerEndplateDefect": 0.5, "UpperMarrow": 0.6,
    "LowerMarrow": 0.6, "ForaminalStenosisLeft": 0.55, "ForaminalStenosisRight": 0.55,
    "Herniation": 0.6,
}
_PAIRS = {  # tasks sharing an extra latent component (weight of the shared part)
    "UpperMarrow": ("marrow", 0.65), "LowerMarrow": ("marrow", 0.65),
    "UpperEndplateDefect": ("endplate", 0.4), "LowerEndplateDefect": ("endplate", 0.4),
    "ForaminalStenosisLeft": ("foramen", 0.4), "ForaminalStenosisRight": ("foramen", 0.4),
}
_LUMBAR_DISCS = ("T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
_LEVEL_EFFECT = {
    "L5-S1": 0.55, "L4-L5": 0.6, "L3-L4": 0.15, "L2-L3": -0.15, "L1-L2": -0.35, "T12-L1": -0.45,
    "T11-T12": -0.5, "T10-T11": -0.6, "C5-C6": 0.2, "C6-C7": 0.0, "C4-C5": -0.2,
    "C3-C4": -0.3, "C2-C3": -0.5, "C7-T1": -0.7,
}
_TASK_LEVEL_EFFECT = {
    "Spondylolisthesis": {"L4-L5": 0.7, "L5-S1": 0.55, "L3-L4": 0.15},
    "ForaminalStenosisLeft": {"L5-S1": 0.3, "L4-L5": 0.25},
    "ForaminalStenosisRight": {"L5-S1": 0.3, "L4-L5": 0.25},
}


def _level_effect(disc: str) -> float:
    if disc in _LEVEL_EFFECT:
        return _LEVEL_EFFECT[disc]
    return -0.8 if disc.startswith("T") else -0.4


def _subject_effect(rng: np.random.Generator, age: float) -> float:
    return 0.035 * (age - 50.0) + rng.normal(0.0, 0.5)


def _draw_age(rng: np.random.Generator) -> float:
    return float(np.clip(rng.normal(52.0, 13.0), 20.0, 85.0))


def _task_latents(rng: np.random.Generator, subj: np.ndarray, discs: list[str]):
    """Latent per task per disc: rho * degeneration + (1 - rho^2)^0.5 * noise + level term."""
    n = len(discs)
    lev = np.array([_level_effect(d) for d in discs])
    z = np.asarray(subj, float) + lev + rng.normal(0.0, 0.75, n)
    zs = z / 1.1
    shared = {k: rng.standard_normal(n) for k in ("marrow", "endplate", "foramen")}
    out = {}
    for task in _TASK_NAMES:
        rho = _RHO[task]
        eps = rng.standard_normal(n)
        if task in _PAIRS:
            key, wgt = _PAIRS[task]
            eps = math.sqrt(wgt) * shared[key] + math.sqrt(1.0 - wgt) * eps
        y = rho * zs + math.sqrt(1.0 - rho * rho) * eps
        eff = _TASK_LEVEL_EFFECT.get(task)
        if eff:
            y = y + np.array([eff.get(d, -0.3) for d in discs])
        out[task] = y
    return out, z


@lru_cache(maxsize=1)
def _thresholds() -> dict[str, np.ndarray]:
    """Cut points on each latent giving TARGET_PREVALENCE over lumbar discs.

    Computed once from a fixed internal simulation (its own generator, no global state).
    """
    rng = np.random.default_rng(20220915)
    n_subj = 30000
    ages = np.clip(rng.normal(52.0, 13.0, n_subj), 20.0, 85.0)
    subj = 0.035 * (ages - 50.0) + rng.normal(0.0, 0.5, n_subj)
    discs = list(_LUMBAR_DISCS) * n_subj
    subj_d = np.repeat(subj, len(_LUMBAR_DISCS))
    lat, _ = _task_latents(rng, subj_d, discs)
    thr = {}
    for task in _TASK_NAMES:
        tgt = TARGET_PREVALENCE[task]
        if isinstance(tgt, tuple):
            thr[task] = np.quantile(lat[task], np.cumsum(tgt)[:-1])
        else:
            thr[task] = np.quantile(lat[task], [1.0 - tgt])
    return thr


def _draw_grades(rng: np.random.Generator, age: float, discs: list[str]):
    """Grades (one dict per disc, every task) and the latent degeneration of each disc."""
    thr = _thresholds()
    subj = _subject_effect(rng, age)
    lat, z = _task_latents(rng, np.full(len(discs), subj), discs)
    cols = {}
    for task in TASKS:
        k = np.searchsorted(thr[task.name], lat[task.name])
        cols[task.name] = np.asarray(task.grades)[k].tolist()
    grades = [{t: cols[t][i] for t in _TASK_NAMES} for i in range(len(discs))]
    return grades, z
