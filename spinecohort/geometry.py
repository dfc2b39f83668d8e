"""Geometry of vertebral-body polygons, shared by detection, labelling, morphometry, training and
evaluation.

A polygon is a (4, 2) array of (row, col) pixel corners ordered superior-anterior,
superior-posterior, inferior-posterior, inferior-anterior; a body is a dict slice -> polygon.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "jitter_polygons",
]


def jitter_polygons(polys: dict[int, np.ndarray], rng: np.random.Generator, strength: float = 1.0
                    ) -> dict[int, np.ndarray]:
    """Polygons perturbed like a detector's output: whole-body shift (~4 % of the box) and scale
    (~4 %), per-corner noise (~2.5 %), and 0-2 lateral slices dropped per side (>= 2 kept)."""
    ks = sorted(polys)
    if not ks:
        return {}
    allp = np.concatenate([polys[k] for k in ks])
    h = max(np.ptp(allp[:, 0]), 2.0)
    w = max(np.ptp(allp[:, 1]), 2.0)
    cen = allp.mean(0)
    shift = rng.normal(0, 0.04 * strength, 2) * (h, w)
    scale = 1.0 + rng.normal(0, 0.04 * strength, 2)
    n = len(ks)
    lo, hi = 0, n
    if n > 2:
        d_lo = int(rng.choice([0, 0, 1, 1, 2])) if strength > 0 else 0
        d_hi = int(rng.choice([0, 0, 1, 1, 2])) if strength > 0 else 0
        lo, hi = min(d_lo, (n - 2) // 2), max(n - d_hi, n - (n - 2) // 2)
        if hi - lo < 2:
            lo, hi = 0, n
    out = {}
    for k in ks[lo:hi]:
        q = (polys[k] - cen) * scale + cen + shift
        q = q + rng.normal(0, 0.025 * strength, (4, 2)) * (h, w)
        out[k] = q
    return out
