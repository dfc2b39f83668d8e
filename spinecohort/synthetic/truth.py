"""Phantom truth: the scan, vertebra and disc records, and the per-disc grade table."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from .degeneration import _TASK_NAMES


@dataclass
class SyntheticVertebra:
    level: str  # 'S1', 'L5', ..., 'C2'
    polygons: dict[int, np.ndarray]  # slice -> (4, 2) (row, col): SA, SP, IP, IA
    centroid: tuple[float, float, float]  # (slice, row, col) of the body centre
    partial: bool = False  # body cut by the image border (evaluators may ignore it)


@dataclass
class SyntheticDisc:
    level: str  # 'L5-S1'
    upper: str
    lower: str
    grades: dict[str, int]  # every task of tasks.TASKS on the contract scale
    centre: tuple[float, float, float]  # (slice, row, col)
    partial: bool = False  # disc or one of its vertebrae cut by the image border
    findings: dict[str, object] = field(default_factory=dict)  # extra truth (Modic type, ...)


@dataclass
class SyntheticScan:
    volume: np.ndarray  # float32 (slices, rows, cols), 0..4095
    pixel_spacing_mm: float
    slice_thickness_mm: float
    fov: str  # 'lumbar' | 'whole' | 'cervical'
    contrast: str  # 'T1' | 'T2' | 'STIR'
    echo_time_ms: float
    repetition_time_ms: float
    inversion_time_ms: float | None
    vertebrae: list[SyntheticVertebra]  # caudal first
    discs: list[SyntheticDisc]  # caudal first
    seed: int
    slice_spacing_mm: float = 0.0  # centre-to-centre; equals the thickness (no gap)
    magnetic_field_t: float = 1.5
    age: float = 50.0
    midline_slice: int = 0  # slice through the midline (cord)


def truth_frame(scans: Mapping[str, SyntheticScan] | Iterable[tuple[str, SyntheticScan]],
                levels: Iterable[str] | None = None, include_partial: bool = True) -> pd.DataFrame:
    """One row per disc: ``scan_id, level, <task columns>`` (the input of :func:`simulate_reads`)."""
    items = scans.items() if isinstance(scans, Mapping) else scans
    keep = set(levels) if levels is not None else None
    rows = []
    for sid, scan in items:
        for d in scan.discs:
            if keep is not None and d.level not in keep:
                continue
            if d.partial and not include_partial:
                continue
            rows.append({"scan_id": sid, "level": d.level, **{t: d.grades[t] for t in _TASK_NAMES}})
    return pd.DataFrame(rows, columns=["scan_id", "level", *_TASK_NAMES])
