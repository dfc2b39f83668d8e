"""Agreement between predicted and radiologist disc grades, with subject-clustered intervals.

Entry points
------------
``compute_agreement(predictions, labels, ...) -> (agreement, confusion)`` (this module)
    The two contract tables as DataFrames.
``run_agreement(discs_path, labels_path, out_path, ...)`` (:mod:`spinecohort.stats.io`)
    Reads a predictions table (Parquet/CSV/TSV) and a labels table (CSV/TSV/Parquet) and writes
    ``agreement.parquet`` plus ``confusion.parquet`` beside it with :func:`provenance.write_table`.
``spinecohort agreement DISCS LABELS -o OUT.parquet [--bootstrap N --seed S --confusion PATH]``
    The command (:mod:`spinecohort.stats.cli`; ``agreement_cli(argv)`` runs it from Python).

The metrics are computed in :mod:`spinecohort.stats.metrics`, the resamples in
:mod:`spinecohort.stats.bootstrap`.

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
  (Brodersen et al. 2010, ICPR; the scikit-learn definition). For binary tasks it is undefined
  (NaN) unless the reference has both a positive and a negative disc: with one class it would
  only repeat specificity or sensitivity under a name that promises both.
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

Reading schemes (:mod:`spinecohort.schemes`, config ``reading_schemes``) compare a labels column
on another scale with a binary view of model tasks, as a binary task named by the scheme: by
default ``Narrowing>1`` (``SPIDER_Narrowing`` 0/1 vs model Narrowing > 1) and ``Marrow(any)``
(``SPIDER_Modic`` > 0 vs model UpperMarrow or LowerMarrow). Between two readers both sides use
the column's binary view. Label columns matching no task or scheme are logged, not dropped
silently.

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

import logging
from dataclasses import dataclass
from itertools import combinations
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..schemes import ReadingScheme, label_columns, parse_reading_schemes
from ..tasks import CCS_BINARY, TASKS, disc_levels
from .bootstrap import percentile_cis, resample_weights, stratum_rng
from .metrics import (
    CI_LEVEL,
    METRICS_ALL,
    METRICS_BINARY,
    METRICS_ORDINAL,
    MIN_DISCS_ANALYTIC,
    ccc_fisher_z_ci,
    confusion_metrics,
    kappa_se,
    nan_reason,
    z_quantile,
)

log = logging.getLogger(__name__)

AGREEMENT_COLUMNS = (
    "comparison", "task", "level", "site", "metric", "n_discs", "n_subjects",
    "estimate", "ci_low", "ci_high", "ci_method", "seed", "note",
)
CONFUSION_COLUMNS = ("comparison", "task", "level", "reader_grade", "model_grade", "count")

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


# --------------------------------------------------------------------------- task specs


@dataclass(frozen=True)
class _Spec:
    name: str
    grades: tuple[int, ...]
    ordinal: bool
    source: str  # column read from the input tables
    derive_binary: bool = False  # grade > 1 of ``source``
    scheme: ReadingScheme | None = None  # reader's ``source`` vs a binary view of model tasks

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
                tasks: Sequence[str] | None, schemes: Sequence[ReadingScheme] = ()) -> list[_Spec]:
    pred_cols, label_cols = set(pred_cols), set(label_cols)
    both = pred_cols & label_cols
    known = [t.name for t in TASKS] + [CCS_BINARY] + [s.task for s in schemes]
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
    for scheme in schemes:
        if (scheme.task in wanted and scheme.column in label_cols
                and all(t in pred_cols for t in scheme.model_tasks)):
            specs.append(_Spec(scheme.task, (0, 1), False, scheme.column, scheme=scheme))
    if tasks is not None:
        missing = [t for t in wanted if t not in {s.name for s in specs}]
        if missing:
            log.warning("task(s) %s not in both predictions and labels; skipped", missing)
    return specs


def _scheme_codes(df: pd.DataFrame, scheme: ReadingScheme, model: bool) -> np.ndarray:
    """The binary view (1 = finding, 0 = none, -1 = not graded) of a reading scheme: the
    reader's column, or (``model``) any of the model tasks above the threshold."""
    if model:
        graded = np.ones(len(df), bool)
        positive = np.zeros(len(df), bool)
        for name in scheme.model_tasks:
            x = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
            graded &= np.isfinite(x)
            positive |= np.isfinite(x) & (x > scheme.model_above)
        return np.where(graded, positive.astype(np.int64), -1)
    x = pd.to_numeric(df[scheme.column], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    ok = np.isin(x, scheme.values)
    n_bad = int((np.isfinite(x) & ~ok).sum())
    if n_bad:
        log.warning("%s: %d value(s) outside the reading scheme's scale %s treated as not graded",
                    scheme.column, n_bad, [f"{v:g}" for v in scheme.values])
    return np.where(ok, np.isin(x, scheme.positive).astype(np.int64), -1)


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


# --------------------------------------------------------------------------- input shaping


def normalise_level(values: pd.Series) -> pd.Series:
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
    out["level"] = normalise_level(out["level"])
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


def _codes_frame(df: pd.DataFrame, specs: list[_Spec], model: bool = False) -> dict[str, np.ndarray]:
    """Grade codes per task; ``model``: ``df`` holds predictions (reading schemes take the
    model's view, other tasks read the same column on both sides)."""
    return {s.name: _scheme_codes(df, s.scheme, model) if s.scheme is not None
            else _grade_codes(df[s.source], s) for s in specs}


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
    reading_schemes: Mapping[str, Mapping] | None = None,
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

    ``reading_schemes``: the config's mapping (:mod:`spinecohort.schemes`; ``None`` = the
    shipped defaults): a labels column on another scale is compared, as a binary task named by
    its scheme, with the model's view. Label columns that match no task or scheme, or whose
    model tasks the predictions lack, are logged as warnings (not silently dropped).
    """
    n_bootstrap = int(max(0, n_bootstrap))
    preds = _clean_keys(predictions, "predictions")
    labs = _clean_keys(labels, "labels")
    if "reader" not in labs.columns:
        labs["reader"] = DEFAULT_READER
    labs["reader"] = labs["reader"].astype("string").str.strip()
    labs.loc[labs["reader"].isna() | (labs["reader"] == ""), "reader"] = DEFAULT_READER
    labs["reader"] = labs["reader"].astype(str)

    schemes = parse_reading_schemes(reading_schemes)
    for entry in label_columns(labs.columns, preds.columns, schemes):
        if entry["status"] in ("unknown", "unmappable"):
            log.warning("labels column %s: %s", entry["column"], entry["detail"])
    specs = _task_specs(preds.columns, labs.columns, tasks, schemes)
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
            sites_of(ref["scan_id"]), _codes_frame(ref, specs), _codes_frame(oth, specs, model=True)))
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
        rng = stratum_rng(seed, comp.comparison, level, site)
        boot = np.empty((n_boot, total))
        start = 0
        for w in resample_weights(rng, n_subj_stratum, n_boot):
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
            cis = dict(zip(s.metrics, percentile_cis(np.stack([bs[m] for m in s.metrics]),
                                                      ci_level)))
        for metric in s.metrics:
            value = float(est[metric][0])
            notes = []
            if not np.isfinite(value):
                notes.append(nan_reason(metric, conf_obs))
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
                half = z_quantile(ci_level) * se
                lo, hi = max(-1.0, value - half), min(1.0, value + half)
            else:
                notes.append("analytic kappa SE undefined")
    return dict(base, metric=metric, n_discs=n_discs, n_subjects=n_subjects, estimate=value,
                ci_low=lo, ci_high=hi, ci_method=ANALYTIC_METHOD[metric],
                note="; ".join(notes) or None)


def primary_rows(agreement: pd.DataFrame) -> pd.DataFrame:
    """One row per (comparison, task, level, site, metric): drops the extra analytic-CI rows."""
    return agreement[~agreement["ci_method"].isin(set(ANALYTIC_METHOD.values()))]
