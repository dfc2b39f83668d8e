"""Agreement metrics of confusion matrices (vectorised over a stack of them, as the bootstrap
needs) and the analytic intervals of kappa and Lin's CCC; definitions and sources in
:mod:`spinecohort.stats.agreement`."""
from __future__ import annotations

from typing import Sequence

import numpy as np

METRICS_ALL = ("balanced_accuracy", "accuracy", "cohen_kappa", "gwet_ac1")
METRICS_BINARY = ("sensitivity", "specificity", "mcc", "prevalence_model", "prevalence_reader")
METRICS_ORDINAL = ("kappa_linear", "kappa_quadratic", "lins_ccc", "within_one", "gwet_ac2")
MIN_DISCS_ANALYTIC = 10
CI_LEVEL = 0.95
_Z975 = 1.959963984540054  # scipy.stats.norm.ppf(0.975)
_EPS = 1e-12


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
    Formulas and sources: :mod:`spinecohort.stats.agreement`.
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
    if binary:
        # with one reference class the mean recall is just specificity (or sensitivity)
        # passed off as a balanced figure: undefined instead
        out["balanced_accuracy"] = np.where(present.all(axis=-1), out["balanced_accuracy"], np.nan)
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
    zq = z_quantile(level)
    half = zq * np.sqrt(var_z)
    return float(np.tanh(z - half)), float(np.tanh(z + half)), None


def z_quantile(level: float) -> float:
    if abs(level - 0.95) < 1e-12:
        return _Z975
    from scipy.stats import norm

    return float(norm.ppf(0.5 + level / 2))


def nan_reason(metric: str, conf: np.ndarray) -> str:
    c = np.asarray(conf, dtype=float)
    n = c.sum()
    if n == 0:
        return "no disc graded by both raters"
    used_ref = int((c.sum(1) > 0).sum())
    used_mod = int((c.sum(0) > 0).sum())
    if metric in ("cohen_kappa", "kappa_linear", "kappa_quadratic"):
        return "undefined: chance agreement p_e = 1 (both raters used one and the same grade)"
    if metric == "sensitivity" or (metric == "balanced_accuracy" and c.shape[0] == 2 and c[1].sum() == 0):
        return "undefined: no positive disc in the reference"
    if metric == "balanced_accuracy" and c.shape[0] == 2 and c[0].sum() == 0:
        return "undefined: no negative disc in the reference"
    if metric == "specificity":
        return "undefined: no negative disc in the reference"
    if metric == "mcc":
        return "undefined: a rater gave every disc the same grade"
    if metric == "lins_ccc":
        return "undefined: both raters gave every disc the same grade"
    if metric == "gwet_ac1" and c.shape[0] < 2:
        return "undefined: scale has one grade"
    return f"undefined (reference used {used_ref} grade(s), model {used_mod})"
