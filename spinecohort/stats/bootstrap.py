"""The subject-clustered bootstrap: one random stream per stratum, subjects' multiplicities per
resample, and percentile intervals (:mod:`spinecohort.stats.agreement`, "Intervals")."""
from __future__ import annotations

import zlib

import numpy as np

MIN_DEFINED_FRACTION = 0.9
_BOOT_CHUNK_CELLS = 4_000_000  # resamples x subjects per chunk (bounds memory)


def stratum_rng(seed: int, comparison: str, level: str, site: str) -> np.random.Generator:
    key = zlib.crc32(f"{comparison}|{level}|{site}".encode())
    return np.random.default_rng([int(seed), key])


def resample_weights(rng: np.random.Generator, n_subjects: int, n_boot: int):
    """Yield (n_chunk, n_subjects) float arrays: how often each subject is drawn per resample."""
    chunk = max(1, min(n_boot, _BOOT_CHUNK_CELLS // max(n_subjects, 1)))
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        idx = rng.integers(0, n_subjects, size=(b, n_subjects))
        idx += (np.arange(b, dtype=np.int64) * n_subjects)[:, None]
        counts = np.bincount(idx.ravel(), minlength=b * n_subjects)
        yield counts.reshape(b, n_subjects).astype(np.float64)
        done += b


def percentile_cis(samples: np.ndarray, level: float) -> list[tuple[float, float, str | None]]:
    """Percentile intervals of each row of ``samples`` (metrics x resamples)."""
    q = [(1 - level) / 2, (1 + level) / 2]
    finite = np.isfinite(samples)
    out: list[tuple[float, float, str | None]] = [(np.nan, np.nan, None)] * samples.shape[0]
    complete = finite.all(axis=1)
    if complete.any():
        bounds = np.quantile(samples[complete], q, axis=1)
        for j, i in enumerate(np.flatnonzero(complete)):
            out[i] = (float(bounds[0, j]), float(bounds[1, j]), None)
    for i in np.flatnonzero(~complete):
        frac = finite[i].mean() if samples.shape[1] else 0.0
        if frac < MIN_DEFINED_FRACTION:
            out[i] = (np.nan, np.nan, f"CI not computed: metric undefined in "
                      f"{100 * (1 - frac):.0f}% of bootstrap resamples")
        else:
            lo, hi = np.quantile(samples[i, finite[i]], q)
            out[i] = (float(lo), float(hi), None)
    return out
