"""Simulated radiologist reads of the phantom truth (intra-rater noise, blanks)."""
from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

from ..tasks import TASKS

# intra-rater noise: ordinal -> probability of a +-1 shift per true grade;
# binary -> (miss rate, false-positive rate)
_SHIFT = {
    "Pfirrmann": {1: 0.10, 2: 0.18, 3: 0.22, 4: 0.20, 5: 0.12},
    "Narrowing": {1: 0.07, 2: 0.25, 3: 0.22, 4: 0.12},
    "CentralCanalStenosis": {1: 0.012, 2: 0.25, 3: 0.25, 4: 0.12},
}
_FLIP = {
    "Spondylolisthesis": (0.10, 0.003),
    "UpperEndplateDefect": (0.16, 0.010),
    "LowerEndplateDefect": (0.16, 0.010),
    "UpperMarrow": (0.10, 0.012),
    "LowerMarrow": (0.10, 0.012),
    "ForaminalStenosisLeft": (0.15, 0.012),
    "ForaminalStenosisRight": (0.15, 0.012),
    "Herniation": (0.12, 0.012),
}
_BLANK = 0.02


def simulate_reads(truth: pd.DataFrame, seed: int, readers=("R1", "R1-repeat")) -> pd.DataFrame:
    """Simulated radiologist reads of ``truth`` (``scan_id, level, <tasks>``).

    Every reader is an independent noisy draw from the truth (its generator is seeded with
    ``(seed, crc32(reader))``, so a reader's read does not depend on the others): ordinal
    grades move by one class with 7-25 % probability (more for middle grades), binary
    findings are missed more often than invented (kappa ~0.7-0.9 between two reads, lower
    for rare findings), and ~2 % of cells are left blank (not graded).  Task columns are
    pandas nullable ``Int64``.
    """
    tasks = [t for t in TASKS if t.name in truth.columns]
    out = []
    for reader in readers:
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(str(reader).encode())])
        df = truth[["scan_id", "level"]].copy()
        df.insert(2, "reader", reader)
        n = len(df)
        for task in tasks:
            src = pd.to_numeric(truth[task.name], errors="coerce").to_numpy(dtype=float)
            u = rng.random(n)
            direction = rng.random(n)
            blank = rng.random(n) < _BLANK
            res = src.copy()
            if task.ordinal and not task.binary:
                lo, hi = task.grades[0], task.grades[-1]
                p = np.array([_SHIFT[task.name].get(int(g), 0.15) if np.isfinite(g) else 0.0 for g in src])
                move = u < p
                step = np.where(direction < 0.5, -1.0, 1.0)
                step = np.where(src <= lo, 1.0, np.where(src >= hi, -1.0, step))
                res = np.where(move, src + step, src)
                res = np.clip(res, lo, hi)
            else:
                miss, fp = _FLIP.get(task.name, (0.12, 0.012))
                p = np.where(src >= 1, miss, fp)
                res = np.where(u < p, 1.0 - src, src)
            res = np.where(blank | ~np.isfinite(src), np.nan, res)
            df[task.name] = pd.array(np.where(np.isnan(res), pd.NA, res), dtype="Int64") if n else pd.array([], dtype="Int64")
        out.append(df)
    res = pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=["scan_id", "level", "reader"])
    return res
