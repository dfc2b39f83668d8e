"""Agreement between predicted and radiologist disc grades, with subject-clustered intervals.

Entry points
------------
``compute_agreement(predictions, labels, ...) -> (agreement, confusion)``
    The two contract tables as DataFrames.
``run_agreement(discs_path, labels_path, out_path, ...)``
    Reads a predictions table (Parquet/CSV/TSV) and a labels table (CSV/TSV/Parquet) and writes
    ``agreement.parquet`` plus ``confusion.parquet`` beside it with :func:`provenance.write_table`.
``agreement_cli(argv)``
    ``DISCS LABELS -o OUT.parquet [--bootstrap N --seed S --confusion PATH]``.

Comparisons
-----------
``model_vs_<reader>`` for every reader, and ``<A>_vs_<B>`` for every pair of readers with
``A < B`` in sorted order. In a reader pair, ``A`` takes the model's role and ``B`` is the
*reference*: ``sensitivity``/``specificity``/``balanced_accuracy``/``prevalence_reader`` treat
``B`` as truth, ``prevalence_model`` is ``A``'s prevalence, and in the confusion table
``reader_grade`` is ``B``'s grade and ``model_grade`` is ``A``'s. Discs are matched on
``(scan_id, level)``; a blank cell means "not graded" and drops that disc for that task only
(pairwise deletion).

Strata
------
One pooled stratum (``level = site = "all"``), one per disc level (``site = "all"``) and, when a
site is known for any scan, one per site (``level = "all"``). Level-by-site cells are not
emitted. Site comes from the labels' ``site`` column, else from the predictions' ``site`` column
(per scan); without either there are only pooled-site rows. Subject comes from the labels'
``subject_id``, else the predictions' ``subject_id``, else the ``scan_id`` itself.

Metrics (``metric`` column)
---------------------------
All are functions of the K x K confusion matrix C (rows: reference grade, columns: model grade)
of one stratum, so a bootstrap resample only needs a re-weighted C.

* ``accuracy``: trace(C) / n.
* ``balanced_accuracy``: mean over the reference's observed classes of per-class recall
  (Brodersen et al. 2010, ICPR; the scikit-learn definition).
* ``cohen_kappa``: (p_o - p_e) / (1 - p_e) (Cohen 1960, Educ Psychol Meas 20:37-46).
* ``kappa_linear``/``kappa_quadratic``: weighted kappa (Cohen 1968, Psychol Bull 70:213-220) with
  agreement weights 1 - |i-j|/(K-1) and 1 - (i-j)^2/(K-1)^2 on the full grade scale of the task
  (a grade nobody used still counts in the distances).
* ``gwet_ac1``: (p_a - p_e) / (1 - p_e), p_e = sum_k pi_k (1 - pi_k) / (q - 1), pi_k the mean of
  both raters' marginal proportions, q the number of grades of the task's scale (Gwet 2008, Br J
  Math Stat Psychol 61:29-48).
* ``gwet_ac2``: Gwet's weighted AC2 with *quadratic* weights: p_a = sum w_kl p_kl,
  p_e = T_w / (q (q - 1)) * sum_k pi_k (1 - pi_k), T_w the sum of all weights (Gwet 2014, Handbook
  of Inter-Rater Reliability, 4th ed., ch. 3 / irrCAC ``gwet.ac1.table(weights=quadratic)``).
* ``lins_ccc``: 2 s_xy / (s_x^2 + s_y^2 + (m_x - m_y)^2) with 1/n moments on the grade values
  (Lin 1989, Biometrics 45:255-268).
* ``within_one``: share of discs whose grades differ by at most one.
* binary tasks: ``sensitivity`` = TP/(TP+FN), ``specificity`` = TN/(TN+FP), ``mcc`` (Matthews
  1975, Biochim Biophys Acta 405:442-451), ``prevalence_model`` and ``prevalence_reader``
  (share graded 1 by the model-role rater / the reference).
* ``n_missing_model`` (model comparisons only): discs graded by the reader for this task for
  which the model gave no grade (level not found, scan failed, or blank prediction).
  ``n_discs`` is then the number of reader-graded discs, ``estimate`` the missing count,
  ``ci_method`` ``none``. These discs are *excluded* from every other metric.

``CentralCanalStenosisBinary`` is derived from the 4-class grade (grade > 1) on both sides
(or read from a ``CentralCanalStenosisBinary`` column when the 4-class column is absent) and
gets the binary metrics.

Intervals (``ci_method`` column)
--------------------------------
Every metric gets one row with ``ci_method = "bootstrap_percentile"``: the 95 % percentile
interval of ``n_bootstrap`` subject-clustered bootstrap resamples (subjects drawn with
replacement, all discs of a drawn subject kept together; Davison & Hinkley 1997, Bootstrap
Methods and their Application, sec. 3.8 and 5.3). It is vectorised: per stratum a
(subjects x cells) count matrix M is built once; each resample is a vector of subject
multiplicities w (from ``numpy.random.default_rng``), so all resampled confusion matrices are
``W @ M`` and every metric is evaluated on the stack at once. Each stratum draws its own
stream, seeded by ``(seed, crc32(comparison|level|site))``, so a stratum's interval does not
depend on which other strata or tasks were computed; all tasks in a stratum share the same
resamples.

In addition, ``cohen_kappa``, ``kappa_linear`` and ``kappa_quadratic`` get a *second* row with
``ci_method = "analytic_kappa_se"`` (Wald interval, clipped to [-1, 1], with the large-sample
SE of Fleiss, Cohen & Everitt 1969, Psychol Bull 72:323-327, the same SE that ``statsmodels``
reports; not Cohen's 1960 SE, which is only valid under independence), and
``lins_ccc`` a second row with ``ci_method = "fisher_z"`` (Lin 1989 with the correction of
Lin 2000, Biometrics 56:324-325; interval on atanh(rho_c) back-transformed). Both analytic
intervals treat discs as independent and so ignore the clustering of discs within subjects;
they are given for comparison with the literature. The primary row for a metric is the one
whose ``ci_method`` is ``bootstrap_percentile`` (or ``none`` with ``n_bootstrap=0``): the
table's unique key is (comparison, task, level, site, metric, ci_method).

``note`` (an extra column beside the contract's) is null when all is well and otherwise says
why an estimate or interval is missing, or what an ``n_missing_model`` row counts.

Edge cases never raise: an undefined estimate (e.g. kappa when both raters used one grade,
p_e = 1; sensitivity without reference positives) is NaN and ``note`` says why. Intervals are
NaN (with a note) when the stratum has fewer than ``min_subjects_ci`` subjects (bootstrap) or
fewer than ``MIN_DISCS_ANALYTIC`` discs (analytic), or when the metric is undefined in more
than 10 % of resamples (otherwise the percentiles use the resamples where it is defined).
"""
from __future__ import annotations

import argparse
import logging
import sys
import zlib
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from .tasks import CCS_BINARY, TASKS, disc_levels

log = logging.getLogger(__name__)

AGREEMENT_COLUMNS = (
    "comparison", "task", "level", "site", "metric", "n_discs", "n_subjects",
    "estimate", "ci_low", "ci_high", "ci_method", "seed", "note",
)
CONFUSION_COLUMNS = ("comparison", "task", "level", "reader_grade", "model_grade", "count")

METRICS_ALL = ("balanced_accuracy", "accuracy", "cohen_kappa", "gwet_ac1")
METRICS_BINARY = ("sensitivity", "specificity", "mcc", "prevalence_model", "prevalence_reader")
METRICS_ORDINAL = ("kappa_linear", "kappa_quadratic", "lins_ccc", "within_one", "gwet_ac2")
MISSING_METRIC = "n_missing_model"
ANALYTIC_METHOD = {
    "cohen_kappa": "analytic_kappa_se",
    "kappa_linear": "analytic_kappa_se",
    "kappa_quadratic": "analytic_kappa_se",
    "lins_ccc": "fisher_z",
}
BOOTSTRAP_METHOD = "bootstrap_percentile"
NO_CI = "none"
DEFAULT_READER = "R1"
ALL = "all"
MIN_SUBJECTS_CI = 10
MIN_DISCS_ANALYTIC = 10
MIN_DEFINED_FRACTION = 0.9
CI_LEVEL = 0.95
_Z975 = 1.959963984540054  # scipy.stats.norm.ppf(0.975)
_EPS = 1e-12
_BOOT_CHUNK_CELLS = 4_000_000  # resamples x subjects per chunk (bounds memory)


# --------------------------------------------------------------------------- task specs


@dataclass(frozen=True)
class _Spec:
    name: str
    grades: tuple[int, ...]
    ordinal: bool
    source: str  # column read from the input tables
    derive_binary: bool = False  # grade > 1 of ``source``

    @property
    def k(self) -> int:
        return len(self.grades)

    @property
    def binary(self) -> bool:
        return self.k == 2

    @property
    def metrics(self) -> tuple[str, ...]:
        out = METRICS_ALL
        if self.binary:
            out = out + METRICS_BINARY
        if self.ordinal:
            out = out + METRICS_ORDINAL
        return out


def _task_specs(pred_cols: Iterable[str], label_cols: Iterable[str],
                tasks: Sequence[str] | None) -> list[_Spec]:
    both = set(pred_cols) & set(label_cols)
    known = [t.name for t in TASKS] + [CCS_BINARY]
    if tasks is not None:
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known: {known}")
    wanted = known if tasks is None else [t for t in known if t in set(tasks)]
    specs: list[_Spec] = []
    for task in TASKS:
        if task.name in wanted and task.name in both:
            specs.append(_Spec(task.name, task.grades, task.ordinal, task.name))
    if CCS_BINARY in wanted:
        if "CentralCanalStenosis" in both:
            specs.append(_Spec(CCS_BINARY, (0, 1), False, "CentralCanalStenosis", True))
        elif CCS_BINARY in both:
            specs.append(_Spec(CCS_BINARY, (0, 1), False, CCS_BINARY))
    if tasks is not None:
        missing = [t for t in wanted if t not in {s.name for s in specs}]
        if missing:
            log.warning("task(s) %s not in both predictions and labels; skipped", missing)
    return specs


def _grade_codes(values: pd.Series, spec: _Spec) -> np.ndarray:
    """Index of each grade on the task's scale; -1 for blank or invalid (not graded)."""
    x = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    if spec.derive_binary:
        ok = np.isfinite(x) & np.isin(x, (1, 2, 3, 4))
        return np.where(ok, (x > 1).astype(np.int64), -1)
    grades = np.asarray(spec.grades, dtype=float)
    finite = np.isfinite(x)
    pos = np.searchsorted(grades, np.where(finite, x, grades[0]))
    pos = np.clip(pos, 0, len(grades) - 1)
    ok = finite & (grades[pos] == x)
    n_bad = int((finite & ~ok).sum())
    if n_bad:
        log.warning("%s: %d grade(s) outside the scale %s treated as not graded",
                    spec.name, n_bad, spec.grades)
    return np.where(ok, pos, -1).astype(np.int64)


# --------------------------------------------------------------------------- metrics


def _weights(k: int, kind: str) -> np.ndarray:
    """Agreement weights on a K-grade scale: identity, linear or quadratic (1 on the diagonal)."""
    i = np.arange(k)
    d = np.abs(i[:, None] - i[None, :]).astype(float)
    if kind == "identity" or k == 1:
        return (d == 0).astype(float)
    if kind == "linear":
        return 1.0 - d / (k - 1)
    if kind == "quadratic":
        return 1.0 - (d / (k - 1)) ** 2
    raise ValueError(kind)


def _safe_div(num, den):
    den = np.asarray(den, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.asarray(num, dtype=float) / den
    return np.where(np.abs(den) > _EPS, out, np.nan)


def _kappa(p, pr, pc, w):
    """Weighted kappa with agreement weights w (Cohen 1960; 1968)."""
    po = np.einsum("...ij,ij->...", p, w)
    pe = np.einsum("...i,ij,...j->...", pr, w, pc)
    return _safe_div(po - pe, 1.0 - pe)


def _gwet(p, pr, pc, w):
    """Gwet's AC1 (identity weights) / AC2 (Gwet 2008; Gwet 2014, ch. 3)."""
    q = w.shape[0]
    pa = np.einsum("...ij,ij->...", p, w)
    pi = 0.5 * (pr + pc)
    pe = w.sum() / (q * (q - 1)) * np.sum(pi * (1.0 - pi), axis=-1)
    return _safe_div(pa - pe, 1.0 - pe)


def _ccc_moments(p, pr, pc, g):
    """Means, 1/n variances and covariance of (reference, model) grade values."""
    my = pr @ g
    mx = pc @ g
    vy = pr @ (g * g) - my * my
    vx = pc @ (g * g) - mx * mx
    sxy = np.einsum("...ij,i,j->...", p, g, g) - my * mx
    # clip tiny negative variances from rounding
    return mx, my, np.maximum(vx, 0.0), np.maximum(vy, 0.0), sxy


def confusion_metrics(conf: np.ndarray, grades: Sequence[float], *, binary: bool | None = None,
                      ordinal: bool = True) -> dict[str, np.ndarray]:
    """Every metric from confusion matrices ``conf`` of shape (..., K, K).

    ``conf[..., i, j]`` counts (or weights) discs with reference grade ``grades[i]`` and model
    grade ``grades[j]``. Returns arrays of shape ``conf.shape[:-2]``; NaN where undefined.
    Formulas and sources: see the module docstring.
    """
    c = np.asarray(conf, dtype=float)
    k = c.shape[-1]
    g = np.asarray(grades, dtype=float)
    binary = (k == 2) if binary is None else binary
    n = c.sum(axis=(-2, -1))
    row = c.sum(axis=-1)
    col = c.sum(axis=-2)
    diag = np.diagonal(c, axis1=-2, axis2=-1)
    nn = np.where(n > 0, n, np.nan)
    p = c / nn[..., None, None]
    pr = row / nn[..., None]
    pc = col / nn[..., None]
    out: dict[str, np.ndarray] = {}
    out["accuracy"] = diag.sum(axis=-1) / nn
    present = row > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(present, diag / np.where(present, row, 1.0), 0.0)
    out["balanced_accuracy"] = _safe_div(recall.sum(axis=-1), present.sum(axis=-1))
    eye = _weights(k, "identity")
    out["cohen_kappa"] = _kappa(p, pr, pc, eye)
    out["gwet_ac1"] = _gwet(p, pr, pc, eye) if k > 1 else np.full(n.shape, np.nan)
    if binary:
        tn, fp = c[..., 0, 0], c[..., 0, 1]
        fn, tp = c[..., 1, 0], c[..., 1, 1]
        out["sensitivity"] = _safe_div(tp, tp + fn)
        out["specificity"] = _safe_div(tn, tn + fp)
        den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        out["mcc"] = _safe_div(tp * tn - fp * fn, den)
        out["prevalence_model"] = (tp + fp) / nn
        out["prevalence_reader"] = (tp + fn) / nn
    if ordinal:
        out["kappa_linear"] = _kappa(p, pr, pc, _weights(k, "linear"))
        out["kappa_quadratic"] = _kappa(p, pr, pc, _weights(k, "quadratic"))
        mx, my, vx, vy, sxy = _ccc_moments(p, pr, pc, g)
        out["lins_ccc"] = _safe_div(2.0 * sxy, vx + vy + (mx - my) ** 2)
        near = (np.abs(np.arange(k)[:, None] - np.arange(k)[None, :]) <= 1).astype(float)
        out["within_one"] = np.einsum("...ij,ij->...", p, near)
        out["gwet_ac2"] = _gwet(p, pr, pc, _weights(k, "quadratic"))
    return out


def kappa_se(conf: np.ndarray, weights: str = "identity") -> float:
    """Large-sample SE of (weighted) kappa, Fleiss, Cohen & Everitt (1969), eq. for var(k_w).

    var = [sum_ij p_ij (w_ij - (wbar_i. + wbar_.j)(1 - k))^2 - (k - p_e (1 - k))^2]
          / (n (1 - p_e)^2),
    wbar_i. = sum_j p_.j w_ij, wbar_.j = sum_i p_i. w_ij, w agreement weights.
    """
    c = np.asarray(conf, dtype=float)
    n = c.sum()
    if n <= 0:
        return float("nan")
    w = _weights(c.shape[0], weights)
    p = c / n
    pr, pc = p.sum(1), p.sum(0)
    pe = float(pr @ w @ pc)
    if 1.0 - pe <= _EPS:
        return float("nan")
    po = float((w * p).sum())
    k = (po - pe) / (1.0 - pe)
    wr = w @ pc  # wbar_i.
    wc = pr @ w  # wbar_.j
    term = (p * (w - (wr[:, None] + wc[None, :]) * (1.0 - k)) ** 2).sum()
    var = (term - (k - pe * (1.0 - k)) ** 2) / (n * (1.0 - pe) ** 2)
    return float(np.sqrt(var)) if var >= 0 else float("nan")


def ccc_fisher_z_ci(conf: np.ndarray, grades: Sequence[float],
                    level: float = CI_LEVEL) -> tuple[float, float, str | None]:
    """Lin's (1989) interval for rho_c via Z = atanh(rho_c), with Lin's (2000) corrected variance.

    var(Z) = 1/(n-2) [ (1-r^2) rc^2 / ((1-rc^2) r^2) + 2 rc^3 (1-rc) u^2 / (r (1-rc^2)^2)
                       - rc^4 u^4 / (2 r^2 (1-rc^2)^2) ],  u = (m_x - m_y) / sqrt(s_x s_y),
    r the Pearson correlation. Returns (low, high, reason-if-NaN).
    """
    c = np.asarray(conf, dtype=float)
    n = c.sum()
    if n < MIN_DISCS_ANALYTIC:
        return np.nan, np.nan, f"analytic CI needs >= {MIN_DISCS_ANALYTIC} discs"
    g = np.asarray(grades, dtype=float)
    p = c / n
    mx, my, vx, vy, sxy = (float(v) for v in _ccc_moments(p, p.sum(1), p.sum(0), g))
    if vx <= _EPS or vy <= _EPS:
        return np.nan, np.nan, "Fisher z CI undefined: a rater gave one grade only"
    r = sxy / np.sqrt(vx * vy)
    rc = 2.0 * sxy / (vx + vy + (mx - my) ** 2)
    if abs(r) <= _EPS:
        return np.nan, np.nan, "Fisher z CI undefined: Pearson r = 0"
    if 1.0 - rc * rc <= _EPS:
        return np.nan, np.nan, "Fisher z CI undefined: |CCC| = 1"
    u = (mx - my) / np.sqrt(np.sqrt(vx * vy))
    a = 1.0 - rc * rc
    var_z = ((1 - r * r) * rc * rc / (a * r * r)
             + 2 * rc ** 3 * (1 - rc) * u * u / (r * a * a)
             - rc ** 4 * u ** 4 / (2 * r * r * a * a)) / (n - 2)
    if not np.isfinite(var_z) or var_z < 0:
        return np.nan, np.nan, "Fisher z CI undefined: negative variance estimate"
    z = np.arctanh(rc)
    zq = _z_quantile(level)
    half = zq * np.sqrt(var_z)
    return float(np.tanh(z - half)), float(np.tanh(z + half)), None


def _z_quantile(level: float) -> float:
    if abs(level - 0.95) < 1e-12:
        return _Z975
    from scipy.stats import norm

    return float(norm.ppf(0.5 + level / 2))


def _nan_reason(metric: str, conf: np.ndarray) -> str:
    c = np.asarray(conf, dtype=float)
    n = c.sum()
    if n == 0:
        return "no disc graded by both raters"
    used_ref = int((c.sum(1) > 0).sum())
    used_mod = int((c.sum(0) > 0).sum())
    if metric in ("cohen_kappa", "kappa_linear", "kappa_quadratic"):
        return "undefined: chance agreement p_e = 1 (both raters used one and the same grade)"
    if metric == "sensitivity":
        return "undefined: no positive disc in the reference"
    if metric == "specificity":
        return "undefined: no negative disc in the reference"
    if metric == "mcc":
        return "undefined: a rater gave every disc the same grade"
    if metric == "lins_ccc":
        return "undefined: both raters gave every disc the same grade"
    if metric == "gwet_ac1" and c.shape[0] < 2:
        return "undefined: scale has one grade"
    return f"undefined (reference used {used_ref} grade(s), model {used_mod})"


# --------------------------------------------------------------------------- input shaping


def _norm_level(values: pd.Series) -> pd.Series:
    """``' l5/s1 '`` -> ``'L5-S1'`` (upper case, no blanks, ``/``, ``_`` and dashes as ``-``)."""
    uniq = pd.unique(values.astype(str))
    clean = (pd.Series(uniq, dtype=object).str.upper()
             .str.replace(r"\s+", "", regex=True)
             .str.replace(r"[/_\u2013\u2014]", "-", regex=True))
    return values.astype(str).map(dict(zip(uniq, clean)))


def _clean_keys(df: pd.DataFrame, what: str) -> pd.DataFrame:
    for col in ("scan_id", "level"):
        if col not in df.columns:
            raise ValueError(f"{what} needs a {col!r} column (has {list(df.columns)})")
    out = df.copy()
    out = out[out["scan_id"].notna() & out["level"].notna()]
    out["scan_id"] = out["scan_id"].astype(str).str.strip()
    out["level"] = _norm_level(out["level"])
    out = out[(out["scan_id"] != "") & (out["level"] != "")]
    return out


def _scan_map(frames: Sequence[pd.DataFrame], col: str) -> dict[str, str]:
    """scan_id -> value of ``col``; earlier frames take precedence."""
    out: dict[str, str] = {}
    for df in reversed(frames):
        if df is None or col not in df.columns:
            continue
        sub = df[["scan_id", col]].dropna()
        sub = sub[sub[col].astype(str).str.strip() != ""]
        sub = sub.drop_duplicates("scan_id", keep="first")
        out.update(dict(zip(sub["scan_id"].astype(str), sub[col].astype(str).str.strip())))
    return out


def _level_order(levels: Iterable[str]) -> list[str]:
    ranks = {name: i for i, name in enumerate(reversed(disc_levels()))}  # cranial first
    return sorted(set(levels), key=lambda lv: (lv not in ranks, ranks.get(lv, 0), lv))


@dataclass
class _Pairs:
    """Discs of one comparison: reference rows with the other rater's grades beside them."""
    comparison: str
    model_role: bool  # True for model_vs_<reader>
    subject: np.ndarray  # int codes
    level: np.ndarray  # object
    site: np.ndarray  # object, None where unknown
    ref: dict[str, np.ndarray]  # task -> grade index, -1 missing
    oth: dict[str, np.ndarray]


def _codes_frame(df: pd.DataFrame, specs: list[_Spec]) -> dict[str, np.ndarray]:
    return {s.name: _grade_codes(df[s.source], s) for s in specs}


# --------------------------------------------------------------------------- bootstrap


def _stratum_seed(seed: int, comparison: str, level: str, site: str) -> np.random.Generator:
    key = zlib.crc32(f"{comparison}|{level}|{site}".encode())
    return np.random.default_rng([int(seed), key])


def _resample_weights(rng: np.random.Generator, n_subjects: int, n_boot: int):
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


def _percentile_cis(samples: np.ndarray, level: float) -> list[tuple[float, float, str | None]]:
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


# --------------------------------------------------------------------------- main computation


def compute_agreement(
    predictions: pd.DataFrame,
    labels: pd.DataFrame,
    *,
    n_bootstrap: int = 2000,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    by_level: bool = True,
    by_site: bool = True,
    min_subjects_ci: int = MIN_SUBJECTS_CI,
    ci_level: float = CI_LEVEL,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Agreement and confusion tables (contract: ``tables/agreement.parquet``, ``confusion``).

    ``predictions``: ``scan_id, level, <Task>...`` (optional ``subject_id``, ``site``).
    ``labels``: ``scan_id, level, <Task>...`` (optional ``reader`` [default ``R1``],
    ``subject_id``, ``site``). See the module docstring for comparisons, strata, metrics,
    intervals and the ``n_missing_model`` rows.

    ``tasks``: ``None`` = every contract task present in both tables plus
    ``CentralCanalStenosisBinary``; an explicit list computes exactly those tasks (unknown
    names raise ``ValueError``, tasks missing from a table are skipped with a warning).
    ``by_level``/``by_site`` switch the per-level/per-site strata off. Raises only when
    ``scan_id``/``level`` columns are missing; data problems give NaN with a ``note``.
    """
    n_bootstrap = int(max(0, n_bootstrap))
    preds = _clean_keys(predictions, "predictions")
    labs = _clean_keys(labels, "labels")
    if "reader" not in labs.columns:
        labs["reader"] = DEFAULT_READER
    labs["reader"] = labs["reader"].astype("string").str.strip()
    labs.loc[labs["reader"].isna() | (labs["reader"] == ""), "reader"] = DEFAULT_READER
    labs["reader"] = labs["reader"].astype(str)

    specs = _task_specs(preds.columns, labs.columns, tasks)
    empty = (pd.DataFrame({c: [] for c in AGREEMENT_COLUMNS}),
             pd.DataFrame({c: [] for c in CONFUSION_COLUMNS}))
    if not specs or labs.empty:
        return _typed_agreement(empty[0]), _typed_confusion(empty[1])

    n_dup = int(preds.duplicated(["scan_id", "level"]).sum())
    if n_dup:
        log.warning("predictions: %d duplicate (scan_id, level) rows; keeping the first", n_dup)
        preds = preds.drop_duplicates(["scan_id", "level"], keep="first")
    n_dup = int(labs.duplicated(["scan_id", "level", "reader"]).sum())
    if n_dup:
        log.warning("labels: %d duplicate (scan_id, level, reader) rows; keeping the first", n_dup)
        labs = labs.drop_duplicates(["scan_id", "level", "reader"], keep="first")

    subj_map = _scan_map([labs, preds], "subject_id")
    site_map = _scan_map([labs, preds], "site") if by_site else {}
    all_subjects = sorted(set(subj_map.values()) | set(labs["scan_id"]) | set(preds["scan_id"]))
    subj_code = pd.Series(np.arange(len(all_subjects)), index=all_subjects)

    def subjects_of(scan_ids: pd.Series) -> np.ndarray:
        ids = scan_ids.astype(object)
        subj = ids.map(subj_map).astype(object)
        subj = subj.where(subj.notna(), ids)
        return subj.map(subj_code).to_numpy(dtype=np.int64)

    def sites_of(scan_ids: pd.Series) -> np.ndarray:
        site = scan_ids.map(site_map).to_numpy(dtype=object)
        return np.where(pd.isna(site), None, site)

    pred_keyed = preds.set_index(["scan_id", "level"])
    readers = sorted(labs["reader"].unique())
    by_reader = {r: labs[labs["reader"] == r] for r in readers}
    comps: list[_Pairs] = []
    for r in readers:
        ref = by_reader[r].reset_index(drop=True)
        keys = pd.MultiIndex.from_frame(ref[["scan_id", "level"]])
        oth = pred_keyed.reindex(keys).reset_index()
        comps.append(_Pairs(
            f"model_vs_{r}", True, subjects_of(ref["scan_id"]), ref["level"].to_numpy(object),
            sites_of(ref["scan_id"]), _codes_frame(ref, specs), _codes_frame(oth, specs)))
    for a, b in combinations(readers, 2):
        ref = by_reader[b].merge(by_reader[a], on=["scan_id", "level"], suffixes=("", "__oth"))
        if ref.empty:
            log.warning("readers %s and %s share no disc; no %s_vs_%s rows", a, b, a, b)
            continue
        oth = ref[["scan_id", "level"]].copy()
        for s in specs:
            oth[s.source] = ref[f"{s.source}__oth"]
        comps.append(_Pairs(
            f"{a}_vs_{b}", False, subjects_of(ref["scan_id"]), ref["level"].to_numpy(object),
            sites_of(ref["scan_id"]), _codes_frame(ref, specs), _codes_frame(oth, specs)))

    rows: list[dict] = []
    conf_parts: list[pd.DataFrame] = []
    for comp in comps:
        strata = [(ALL, ALL, np.ones(len(comp.subject), bool))]
        if by_level:
            for lv in _level_order(comp.level):
                strata.append((lv, ALL, comp.level == lv))
        if by_site:
            known = [s for s in comp.site if s is not None]
            for st in sorted(set(known)):
                strata.append((ALL, st, comp.site == st))
        for level, site, mask in strata:
            rows.extend(_stratum_rows(comp, specs, level, site, mask, n_bootstrap, seed,
                                      min_subjects_ci, ci_level))
            if site == ALL:
                conf_parts.extend(_confusion_rows(comp, specs, level, mask))
    agreement = _typed_agreement(pd.DataFrame(rows, columns=list(AGREEMENT_COLUMNS)))
    confusion = pd.DataFrame({c: np.concatenate([np.asarray(p[c]) for p in conf_parts])
                              if conf_parts else [] for c in CONFUSION_COLUMNS})
    return agreement, _typed_confusion(confusion)


def _typed_agreement(df: pd.DataFrame) -> pd.DataFrame:
    df = df.reindex(columns=list(AGREEMENT_COLUMNS))
    for col in ("comparison", "task", "level", "site", "metric", "ci_method", "note"):
        df[col] = df[col].astype(object)
    for col in ("n_discs", "n_subjects", "seed"):
        df[col] = df[col].astype("int64")
    for col in ("estimate", "ci_low", "ci_high"):
        df[col] = df[col].astype("float64")
    return df.reset_index(drop=True)


def _typed_confusion(df: pd.DataFrame) -> pd.DataFrame:
    df = df.reindex(columns=list(CONFUSION_COLUMNS))
    for col in ("comparison", "task", "level"):
        df[col] = df[col].astype(object)
    for col in ("reader_grade", "model_grade", "count"):
        df[col] = df[col].astype("int64")
    return df.reset_index(drop=True)


def _confusion_rows(comp: _Pairs, specs: list[_Spec], level: str, mask: np.ndarray) -> list[dict]:
    parts = []
    for s in specs:
        r, m = comp.ref[s.name][mask], comp.oth[s.name][mask]
        ok = (r >= 0) & (m >= 0)
        if level != ALL and not ok.any():
            continue
        counts = np.bincount(r[ok] * s.k + m[ok], minlength=s.k * s.k)
        g = np.asarray(s.grades)
        parts.append({
            "comparison": [comp.comparison] * counts.size, "task": [s.name] * counts.size,
            "level": [level] * counts.size, "reader_grade": np.repeat(g, s.k),
            "model_grade": np.tile(g, s.k), "count": counts,
        })
    return parts


def _stratum_rows(comp: _Pairs, specs: list[_Spec], level: str, site: str, mask: np.ndarray,
                  n_boot: int, seed: int, min_subjects_ci: int, ci_level: float) -> list[dict]:
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return []
    subj_local, subj_inv = np.unique(comp.subject[idx], return_inverse=True)
    n_subj_stratum = subj_local.size
    offsets, cells = [], []
    total = 0
    for s in specs:
        offsets.append(total)
        total += s.k * s.k
    # (subject, cell) count matrix M for all tasks at once
    flat = []
    for s, off in zip(specs, offsets):
        r, m = comp.ref[s.name][idx], comp.oth[s.name][idx]
        ok = (r >= 0) & (m >= 0)
        flat.append(subj_inv[ok] * total + off + r[ok] * s.k + m[ok])
    flat_all = np.concatenate(flat) if flat else np.zeros(0, np.int64)
    M = np.bincount(flat_all, minlength=n_subj_stratum * total).reshape(n_subj_stratum, total)
    M = M.astype(np.float64)
    observed = M.sum(axis=0)

    boot = None
    boot_note = None
    if n_boot <= 0:
        boot_note = "no bootstrap requested (n_bootstrap = 0)"
    elif n_subj_stratum < min_subjects_ci:
        boot_note = f"CI not computed: {n_subj_stratum} subject(s) < {min_subjects_ci}"
    elif observed.sum() > 0:
        rng = _stratum_seed(seed, comp.comparison, level, site)
        boot = np.empty((n_boot, total))
        start = 0
        for w in _resample_weights(rng, n_subj_stratum, n_boot):
            boot[start:start + w.shape[0]] = w @ M
            start += w.shape[0]

    base = {"comparison": comp.comparison, "level": level, "site": site, "seed": int(seed)}
    rows: list[dict] = []
    for s, off in zip(specs, offsets):
        sl = slice(off, off + s.k * s.k)
        conf_obs = observed[sl].reshape(s.k, s.k)
        n_discs = int(round(conf_obs.sum()))
        n_subjects = int((M[:, sl].sum(axis=1) > 0).sum())
        task_base = dict(base, task=s.name)
        if comp.model_role:
            r, m = comp.ref[s.name][idx], comp.oth[s.name][idx]
            graded = r >= 0
            miss = graded & (m < 0)
            rows.append(dict(
                task_base, metric=MISSING_METRIC, n_discs=int(graded.sum()),
                n_subjects=int(np.unique(subj_inv[graded]).size), estimate=float(miss.sum()),
                ci_low=np.nan, ci_high=np.nan, ci_method=NO_CI,
                note=("reader-graded discs without a model grade (level not found, scan failed "
                      "or blank prediction); excluded from the other metrics")))
        est = confusion_metrics(conf_obs[None], s.grades, binary=s.binary, ordinal=s.ordinal)
        cis = None
        if boot is not None and n_discs > 0:
            bs = confusion_metrics(boot[:, sl].reshape(-1, s.k, s.k), s.grades,
                                   binary=s.binary, ordinal=s.ordinal)
            cis = dict(zip(s.metrics, _percentile_cis(np.stack([bs[m] for m in s.metrics]),
                                                      ci_level)))
        for metric in s.metrics:
            value = float(est[metric][0])
            notes = []
            if not np.isfinite(value):
                notes.append(_nan_reason(metric, conf_obs))
            lo = hi = np.nan
            method = BOOTSTRAP_METHOD if n_boot > 0 else NO_CI
            if np.isfinite(value):
                if cis is not None:
                    lo, hi, why = cis[metric]
                    if why:
                        notes.append(why)
                elif boot_note:
                    notes.append(boot_note)
            rows.append(dict(task_base, metric=metric, n_discs=n_discs, n_subjects=n_subjects,
                             estimate=value, ci_low=lo, ci_high=hi, ci_method=method,
                             note="; ".join(notes) or None))
            if metric in ANALYTIC_METHOD:
                rows.append(_analytic_row(task_base, metric, value, conf_obs, s, n_discs,
                                          n_subjects, notes[:1] if not np.isfinite(value) else [],
                                          ci_level))
    return rows


def _analytic_row(base: dict, metric: str, value: float, conf: np.ndarray, spec: _Spec,
                  n_discs: int, n_subjects: int, notes: list[str], ci_level: float) -> dict:
    lo = hi = np.nan
    notes = list(notes)
    if np.isfinite(value):
        if n_discs < MIN_DISCS_ANALYTIC:
            notes.append(f"analytic CI needs >= {MIN_DISCS_ANALYTIC} discs")
        elif metric == "lins_ccc":
            lo, hi, why = ccc_fisher_z_ci(conf, spec.grades, ci_level)
            if why:
                notes.append(why)
        else:
            kind = {"cohen_kappa": "identity", "kappa_linear": "linear",
                    "kappa_quadratic": "quadratic"}[metric]
            se = kappa_se(conf, kind)
            if np.isfinite(se):
                half = _z_quantile(ci_level) * se
                lo, hi = max(-1.0, value - half), min(1.0, value + half)
            else:
                notes.append("analytic kappa SE undefined")
    return dict(base, metric=metric, n_discs=n_discs, n_subjects=n_subjects, estimate=value,
                ci_low=lo, ci_high=hi, ci_method=ANALYTIC_METHOD[metric],
                note="; ".join(notes) or None)


def primary_rows(agreement: pd.DataFrame) -> pd.DataFrame:
    """One row per (comparison, task, level, site, metric): drops the extra analytic-CI rows."""
    return agreement[~agreement["ci_method"].isin(set(ANALYTIC_METHOD.values()))]


# --------------------------------------------------------------------------- file entry points


# Label columns that are not grades.
LABEL_KEY_COLUMNS = ("scan_id", "level", "reader", "subject_id", "site", "visit")


def label_warnings(labels: pd.DataFrame, scan_ids: Iterable[str] | None = None) -> list[str]:
    """Counted problems of a labels table that the agreement would otherwise pass over without a
    word: grades that are not numbers (``severe``) or off the task's scale, disc levels that do not
    exist (``L9-L10``), ``scan_id``s not in the cohort and columns that match no task."""
    out: list[str] = []
    known_tasks = [t.name for t in TASKS] + [CCS_BINARY]
    ignored = [str(c) for c in labels.columns if c not in known_tasks and c not in LABEL_KEY_COLUMNS]
    if ignored:
        out.append(f"labels: {len(ignored)} column(s) match no task and were ignored: {', '.join(ignored[:10])}")
    scales = {t.name: t.grades for t in TASKS} | {CCS_BINARY: (0, 1)}
    for task in [c for c in known_tasks if c in labels.columns]:
        text = labels[task].astype("string").str.strip()
        given = text.notna() & (text != "")
        numbers = pd.to_numeric(text.where(given), errors="coerce")
        not_number = given & numbers.isna()
        if not_number.any():
            examples = ", ".join(repr(v) for v in pd.unique(text[not_number])[:3])
            out.append(f"labels: {int(not_number.sum())} {task} grade(s) are not numbers ({examples}); treated as not graded")
        off_scale = numbers.notna() & ~numbers.isin(scales[task])
        if off_scale.any():
            out.append(f"labels: {int(off_scale.sum())} {task} grade(s) outside the scale {scales[task]}; treated as not graded")
    if "level" in labels.columns:
        levels = _norm_level(labels["level"].dropna())
        unknown = levels[~levels.isin(disc_levels())]
        if len(unknown):
            examples = ", ".join(pd.unique(unknown)[:3])
            out.append(f"labels: {len(unknown)} row(s) with a disc level that does not exist ({examples}); ignored")
    if scan_ids is not None and "scan_id" in labels.columns:
        ids = labels["scan_id"].dropna().astype(str).str.strip()
        unknown = ids[~ids.isin(set(map(str, scan_ids)))]
        if len(unknown):
            examples = ", ".join(pd.unique(unknown)[:3])
            out.append(f"labels: {len(unknown)} row(s) for scan_id(s) not in the manifest ({examples}); ignored")
    return out


def _read_table(path: str | Path, kind: str) -> pd.DataFrame:
    """A predictions or labels table; an unreadable one raises ``ValueError`` naming the file."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix.lower() == ".gz" else path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        else:
            sep = "\t" if suffix in (".tsv", ".tab", ".tsv.gz") else ","
            text_cols = {"scan_id": str, "subject_id": str, "level": str, "reader": str, "site": str}
            # utf-8-sig: a spreadsheet's byte-order mark would otherwise rename the first column
            df = pd.read_csv(path, sep=sep, dtype=text_cols, keep_default_na=True, encoding="utf-8-sig")
    except (OSError, ValueError) as error:  # empty, undecodable or malformed files are ValueErrors
        detail = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"{kind} {path}: not a readable table ({detail})") from None
    df.columns = [str(c).strip() for c in df.columns]
    log.info("%s: %d rows from %s", kind, len(df), path)
    return df


def default_confusion_path(out_path: str | Path) -> Path:
    """``.../agreement.parquet`` -> ``.../confusion.parquet``; ``x.parquet`` -> ``x_confusion.parquet``."""
    out = Path(out_path)
    if "agreement" in out.stem:
        return out.with_name(out.stem.replace("agreement", "confusion") + out.suffix)
    return out.with_name(f"{out.stem}_confusion{out.suffix or '.parquet'}")


def run_agreement(
    discs_path: str | Path,
    labels_path: str | Path,
    out_path: str | Path,
    n_bootstrap: int = 2000,
    seed: int = 0,
    *,
    confusion_path: str | Path | None = None,
    provenance: dict[str, str] | None = None,
    tasks: Sequence[str] | None = None,
    created_by: str | None = None,
) -> tuple[Path, Path]:
    """Read predictions + labels, write agreement and confusion Parquet; returns both paths.

    Provenance: ``provenance`` if given, else the discs table's own Parquet metadata (so model
    ids and config hash carry over) with ``created_by`` set to this command; ``n_bootstrap`` and
    ``seed`` are added as ``agreement_n_bootstrap`` / ``agreement_seed`` metadata keys.
    """
    from .provenance import make_provenance, read_provenance, write_table

    discs = _read_table(discs_path, "predictions")
    labels = _read_table(labels_path, "labels")
    for warning in label_warnings(labels):  # the report adds scan_ids missing from the manifest
        log.warning("%s", warning)
    try:
        agreement, confusion = compute_agreement(discs, labels, n_bootstrap=n_bootstrap, seed=seed,
                                                 tasks=tasks)
    except ValueError as error:  # a missing key column: name the files, not only the table's role
        raise ValueError(f"agreement of {discs_path} with {labels_path}: {error}") from None
    if provenance is None:
        prov = make_provenance(created_by=created_by)
        if str(discs_path).lower().endswith((".parquet", ".pq")):
            try:
                prov.update({k: v for k, v in read_provenance(discs_path).items()
                             if k != "created_by"})
            except Exception:  # provenance is best effort; the tables matter
                log.warning("could not read provenance from %s", discs_path)
    else:
        prov = dict(provenance)
    prov["agreement_n_bootstrap"] = str(int(n_bootstrap))
    prov["agreement_seed"] = str(int(seed))
    out = Path(out_path)
    conf_out = Path(confusion_path) if confusion_path else default_confusion_path(out)
    write_table(agreement, out, prov)
    write_table(confusion, conf_out, prov)
    return out, conf_out


def agreement_cli(argv: Sequence[str] | None = None) -> int:
    """``DISCS LABELS -o OUT.parquet [--bootstrap N] [--seed S] [--confusion PATH]``."""
    ap = argparse.ArgumentParser(prog="spinecohort agreement",
                                 description="Agreement of predicted disc grades with readers.")
    ap.add_argument("discs", help="predictions table (Parquet, CSV or TSV)")
    ap.add_argument("labels", help="radiologist labels (CSV, TSV or Parquet)")
    ap.add_argument("-o", "--out", required=True, help="agreement Parquet to write")
    ap.add_argument("--confusion", default=None, help="confusion Parquet (default: beside OUT)")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out, conf = run_agreement(args.discs, args.labels, args.out, args.bootstrap, args.seed,
                              confusion_path=args.confusion)
    print(f"wrote {out} and {conf}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO)
    sys.exit(agreement_cli())
