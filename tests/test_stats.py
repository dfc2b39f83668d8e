"""Agreement statistics against independent references (scikit-learn, statsmodels, published
worked examples), property tests, edge cases and the file entry point."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, cohen_kappa_score,
                             matthews_corrcoef, recall_score)
from statsmodels.stats.inter_rater import cohens_kappa

from spinecohort import stats
from spinecohort.stats import (AGREEMENT_COLUMNS, CONFUSION_COLUMNS, agreement_cli,
                               ccc_fisher_z_ci, compute_agreement, confusion_metrics, kappa_se,
                               primary_rows, run_agreement)
from spinecohort.tasks import CCS_BINARY, LUMBAR_DISCS, TASK_BY_NAME, TASKS

# scikit-learn warns about single-class inputs the edge-case tests create on purpose
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:sklearn.metrics._classification")

TOL = 1e-6
N_BOOT = 500


# --------------------------------------------------------------------------- synthetic cohort


def synthetic(n_subjects=400, seed=1, readers=("R1", "R2"), p_model=0.25, p_reader=0.15,
              p_blank=0.03, p_not_found=0.02):
    """Subjects with 6 discs, 3 sites; latent subject effect so discs of a subject correlate.

    Predictions miss ``p_not_found`` of discs (level not found) and both tables have blank
    cells, so pairwise deletion and the missing-model counts are exercised.
    """
    rng = np.random.default_rng(seed)
    levels = list(LUMBAR_DISCS)
    subj = np.repeat(np.arange(n_subjects), len(levels))
    base = pd.DataFrame({
        "scan_id": [f"scan{s:04d}" for s in subj],
        "subject_id": [f"sub{s:04d}" for s in subj],
        "site": np.array(["A", "B", "C"])[subj % 3],
        "level": levels * n_subjects,
    })
    truth = {}
    for t in TASKS:
        latent = rng.normal(size=n_subjects)[subj] + rng.normal(size=len(base))
        probs = np.linspace(0, 1, t.n_classes + 1)[1:-1] if t.n_classes > 2 else [0.75]
        cuts = np.quantile(latent, probs)
        truth[t.name] = np.asarray(t.grades)[np.searchsorted(cuts, latent)]

    def rater(p_err):
        df = base.copy()
        for t in TASKS:
            g = truth[t.name].astype(float)
            flip = rng.random(len(g)) < p_err
            g[flip] = rng.choice(t.grades, flip.sum())
            g[rng.random(len(g)) < p_blank] = np.nan
            df[t.name] = g
        return df

    preds = rater(p_model)
    preds = preds[rng.random(len(preds)) >= p_not_found].reset_index(drop=True)
    labels = []
    for r in readers:
        d = rater(p_reader).drop(columns=["subject_id", "site"])
        d["reader"] = r
        labels.append(d)
    return preds, pd.concat(labels, ignore_index=True)


@pytest.fixture(scope="module")
def cohort():
    preds, labels = synthetic()
    agreement, confusion = compute_agreement(preds, labels, n_bootstrap=N_BOOT, seed=7)
    return preds, labels, agreement, confusion


def _pairs(preds, labels, comparison):
    """(reference, other) grade frames for one comparison, as the contract defines them."""
    a, b = comparison.split("_vs_")
    ref = labels[labels.reader == b]
    if a == "model":
        oth = preds
    else:
        oth = labels[labels.reader == a]
    m = ref.merge(oth, on=["scan_id", "level"], how="left", suffixes=("", "_o"))
    site = preds.drop_duplicates("scan_id").set_index("scan_id")["site"]
    m["site_"] = m["scan_id"].map(site)
    return m


def _stratum(m, level, site):
    if level != "all":
        m = m[m.level == level]
    if site != "all":
        m = m[m.site_ == site]
    return m


# --------------------------------------------------------------------------- table shape


def test_tables_follow_the_contract(cohort):
    preds, labels, agreement, confusion = cohort
    assert tuple(agreement.columns) == AGREEMENT_COLUMNS
    assert tuple(confusion.columns) == CONFUSION_COLUMNS
    assert set(agreement.comparison) == {"model_vs_R1", "model_vs_R2", "R1_vs_R2"}
    assert set(agreement.level) == {"all", *LUMBAR_DISCS}
    assert set(agreement.site) == {"all", "A", "B", "C"}
    assert set(agreement.task) == {t.name for t in TASKS} | {CCS_BINARY}
    key = ["comparison", "task", "level", "site", "metric", "ci_method"]
    assert not agreement.duplicated(key).any()
    prim = primary_rows(agreement)
    assert not prim.duplicated(key[:-1]).any()
    for task, rows in prim[prim.comparison == "model_vs_R1"].groupby("task"):
        spec = TASK_BY_NAME.get(task)
        want = set(stats.METRICS_ALL) | {"n_missing_model"}
        if task == CCS_BINARY or spec.binary:
            want |= set(stats.METRICS_BINARY)
        if spec is not None and spec.ordinal:
            want |= set(stats.METRICS_ORDINAL)
        assert set(rows.metric) == want, task
    assert set(agreement.ci_method) == {"bootstrap_percentile", "analytic_kappa_se", "fisher_z",
                                        "none"}
    assert (agreement.seed == 7).all()
    # confusion: full grid per (comparison, task, level), counts add up to n_discs
    pooled = prim[(prim.level == "all") & (prim.site == "all") & (prim.metric == "accuracy")]
    for _, row in pooled.iterrows():
        cells = confusion[(confusion.comparison == row.comparison) & (confusion.task == row.task)
                          & (confusion.level == "all")]
        k = 2 if row.task == CCS_BINARY else TASK_BY_NAME[row.task].n_classes
        assert len(cells) == k * k
        assert cells["count"].sum() == row.n_discs


# --------------------------------------------------------------------------- references


def test_estimates_match_sklearn_and_statsmodels(cohort):
    preds, labels, agreement, _ = cohort
    key = ["comparison", "task", "level", "site", "metric"]
    prim = {k: r for k, r in zip(map(tuple, primary_rows(agreement)[key].to_numpy()),
                                 primary_rows(agreement).itertuples(index=False))}
    an = agreement[agreement.ci_method == "analytic_kappa_se"]
    analytic = {k: r for k, r in zip(map(tuple, an[key].to_numpy()), an.itertuples(index=False))}
    checked = 0
    strata = [("all", "all"), ("L4-L5", "all"), ("all", "B")]
    for comparison in ["model_vs_R1", "model_vs_R2", "R1_vs_R2"]:
        m = _pairs(preds, labels, comparison)
        for level, site in strata:
            sm = _stratum(m, level, site)
            for spec in [*TASKS, CCS_BINARY]:
                name = spec if isinstance(spec, str) else spec.name
                col = "CentralCanalStenosis" if name == CCS_BINARY else name
                ok = sm[col].notna() & sm[f"{col}_o"].notna()
                y_true = sm.loc[ok, col].to_numpy(int)
                y_pred = sm.loc[ok, f"{col}_o"].to_numpy(int)
                if name == CCS_BINARY:
                    y_true, y_pred = (y_true > 1).astype(int), (y_pred > 1).astype(int)
                    grades, binary, ordinal = [0, 1], True, False
                else:
                    grades, binary, ordinal = list(spec.grades), spec.binary, spec.ordinal

                def got(metric):
                    return prim[(comparison, name, level, site, metric)].estimate

                assert prim[(comparison, name, level, site, "accuracy")].n_discs == len(y_true)
                assert got("accuracy") == pytest.approx(accuracy_score(y_true, y_pred), abs=TOL)
                if binary and len(set(y_true)) < 2:  # one reference class: undefined, not sklearn's figure
                    assert np.isnan(got("balanced_accuracy"))
                else:
                    assert got("balanced_accuracy") == pytest.approx(
                        balanced_accuracy_score(y_true, y_pred), abs=TOL)
                assert got("cohen_kappa") == pytest.approx(
                    cohen_kappa_score(y_true, y_pred, labels=grades), abs=TOL)
                table = np.zeros((len(grades), len(grades)))
                np.add.at(table, (np.searchsorted(grades, y_true), np.searchsorted(grades, y_pred)), 1)
                res = cohens_kappa(table)
                assert got("cohen_kappa") == pytest.approx(res.kappa, abs=TOL)
                assert kappa_se(table) == pytest.approx(res.std_kappa, abs=TOL)
                row = analytic[(comparison, name, level, site, "cohen_kappa")]
                assert row.ci_low == pytest.approx(max(-1, res.kappa - 1.959963984540054 * res.std_kappa), abs=TOL)
                assert row.ci_high == pytest.approx(min(1, res.kappa + 1.959963984540054 * res.std_kappa), abs=TOL)
                if binary:
                    assert got("sensitivity") == pytest.approx(
                        recall_score(y_true, y_pred, pos_label=1), abs=TOL)
                    assert got("specificity") == pytest.approx(
                        recall_score(y_true, y_pred, pos_label=0), abs=TOL)
                    assert got("mcc") == pytest.approx(matthews_corrcoef(y_true, y_pred), abs=TOL)
                    assert got("prevalence_model") == pytest.approx(y_pred.mean(), abs=TOL)
                    assert got("prevalence_reader") == pytest.approx(y_true.mean(), abs=TOL)
                if ordinal:
                    for w in ("linear", "quadratic"):
                        assert got(f"kappa_{w}") == pytest.approx(
                            cohen_kappa_score(y_true, y_pred, labels=grades, weights=w), abs=TOL)
                        res_w = cohens_kappa(table, wt=w)
                        assert got(f"kappa_{w}") == pytest.approx(res_w.kappa, abs=TOL)
                        assert kappa_se(table, w) == pytest.approx(res_w.std_kappa, abs=TOL)
                        row = analytic[(comparison, name, level, site, f"kappa_{w}")]
                        half = 1.959963984540054 * res_w.std_kappa
                        assert row.ci_low == pytest.approx(max(-1, res_w.kappa - half), abs=TOL)
                    # Lin's CCC, straightforward formula on the raw grades (1/n moments)
                    x, y = y_pred.astype(float), y_true.astype(float)
                    ccc = 2 * np.mean((x - x.mean()) * (y - y.mean())) / (
                        x.var() + y.var() + (x.mean() - y.mean()) ** 2)
                    assert got("lins_ccc") == pytest.approx(ccc, abs=TOL)
                    assert got("within_one") == pytest.approx(np.mean(np.abs(x - y) <= 1), abs=TOL)
                checked += 1
    assert checked == 3 * len(strata) * (len(TASKS) + 1)


def _lin_fisher_z_raw(x, y):
    """Lin (1989, eq. for var of Z) with the Lin (2000) correction, coded on raw vectors."""
    n = len(x)
    sx, sy = x.std(), y.std()
    r = np.corrcoef(x, y)[0, 1]
    rc = 2 * r * sx * sy / (sx ** 2 + sy ** 2 + (x.mean() - y.mean()) ** 2)
    u = (x.mean() - y.mean()) / np.sqrt(sx * sy)
    se_rc = np.sqrt(((1 - r ** 2) * rc ** 2 * (1 - rc ** 2) / r ** 2
                     + 2 * rc ** 3 * (1 - rc) * u ** 2 / r
                     - rc ** 4 * u ** 4 / (2 * r ** 2)) / (n - 2))
    se_z = se_rc / (1 - rc ** 2)
    z = 0.5 * np.log((1 + rc) / (1 - rc))
    return np.tanh(z - 1.959963984540054 * se_z), np.tanh(z + 1.959963984540054 * se_z)


def test_ccc_fisher_z_interval_matches_raw_data_formula():
    rng = np.random.default_rng(3)
    y = rng.integers(1, 6, 300)
    x = np.clip(y + rng.integers(-1, 2, 300) + (rng.random(300) < 0.2), 1, 5)
    conf = np.zeros((5, 5))
    np.add.at(conf, (y - 1, x - 1), 1)
    lo, hi, why = ccc_fisher_z_ci(conf, [1, 2, 3, 4, 5])
    assert why is None
    ref_lo, ref_hi = _lin_fisher_z_raw(x.astype(float), y.astype(float))
    assert (lo, hi) == pytest.approx((ref_lo, ref_hi), abs=TOL)
    est = confusion_metrics(conf, [1, 2, 3, 4, 5])["lins_ccc"]
    assert lo < est < hi


def test_gwet_published_example():
    """Gwet's cont3x3abstractors table (Gwet 2014, Handbook of Inter-Rater Reliability, 4th ed.;
    distributed with Gwet's irrCAC R package 1.0). Published values from the irrCAC README
    (kappa2.table: Cohen's kappa 0.7964094; gwet.ac1.table: AC1 0.8493305; pa2.table: 0.89) and
    the irrCAC 'weighting' vignette with quadratic.weights(1:3) (AC2 0.9402369, Cohen's
    weighted kappa 0.8921569)."""
    table = np.array([[13, 0, 0], [0, 20, 7], [0, 4, 56]])
    m = confusion_metrics(table, [1, 2, 3])
    assert m["accuracy"] == pytest.approx(0.89, abs=TOL)
    assert m["cohen_kappa"] == pytest.approx(0.7964094, abs=TOL)
    assert m["gwet_ac1"] == pytest.approx(0.8493305, abs=TOL)
    assert m["gwet_ac2"] == pytest.approx(0.9402369, abs=TOL)
    assert m["kappa_quadratic"] == pytest.approx(0.8921569, abs=TOL)


def test_intervals_contain_their_estimates(cohort):
    _, _, agreement, _ = cohort
    with_ci = agreement[agreement.ci_low.notna()]
    assert len(with_ci) > 0.9 * (agreement.ci_method != "none").sum()
    assert (with_ci.ci_low <= with_ci.estimate + 1e-12).all()
    assert (with_ci.estimate <= with_ci.ci_high + 1e-12).all()
    assert with_ci.ci_low.between(-1, 1).all() and with_ci.ci_high.between(-1, 1).all()
    assert (with_ci.ci_high - with_ci.ci_low).gt(0).all()


def test_bootstrap_resamples_subjects_not_discs():
    """Six identical discs per subject: the clustered interval must be ~sqrt(6) wider than the
    disc-level analytic one."""
    rng = np.random.default_rng(5)
    n = 300
    truth = rng.integers(0, 2, n)
    model = np.where(rng.random(n) < 0.2, 1 - truth, truth)
    rows = []
    for i in range(n):
        for lv in LUMBAR_DISCS:
            rows.append({"scan_id": f"s{i}", "level": lv, "Herniation": truth[i],
                         "model": model[i]})
    df = pd.DataFrame(rows)
    labels = df[["scan_id", "level", "Herniation"]]
    preds = df[["scan_id", "level"]].assign(Herniation=df["model"])
    agreement, _ = compute_agreement(preds, labels, n_bootstrap=2000, by_level=False)
    k = agreement[(agreement.metric == "cohen_kappa") & (agreement.level == "all")]
    width = (k.ci_high - k.ci_low).to_numpy()
    boot = width[k.ci_method.to_numpy() == "bootstrap_percentile"][0]
    analytic = width[k.ci_method.to_numpy() == "analytic_kappa_se"][0]
    assert boot / analytic > 1.8


def test_deterministic_given_seed():
    preds, labels = synthetic(n_subjects=40, readers=("R1",))
    a1, c1 = compute_agreement(preds, labels, n_bootstrap=200, seed=3)
    a2, c2 = compute_agreement(preds, labels, n_bootstrap=200, seed=3)
    a3, _ = compute_agreement(preds, labels, n_bootstrap=200, seed=4)
    pd.testing.assert_frame_equal(a1, a2)
    pd.testing.assert_frame_equal(c1, c2)
    assert not np.allclose(a1.ci_low.fillna(0), a3.ci_low.fillna(0))
    # a stratum's interval does not depend on which tasks were computed
    only = compute_agreement(preds, labels, n_bootstrap=200, seed=3, tasks=["Pfirrmann"])[0]
    both = a1[a1.task == "Pfirrmann"].reset_index(drop=True)
    pd.testing.assert_frame_equal(only, both)


def test_pooled_estimates_equal_metrics_of_confusion_table(cohort):
    _, _, agreement, confusion = cohort
    prim = primary_rows(agreement)
    for (comp, task, level), cells in confusion.groupby(["comparison", "task", "level"]):
        grades = sorted(cells.reader_grade.unique())
        k = len(grades)
        conf = cells.sort_values(["reader_grade", "model_grade"])["count"].to_numpy().reshape(k, k)
        spec = TASK_BY_NAME.get(task)
        m = confusion_metrics(conf, grades, ordinal=bool(spec and spec.ordinal))
        rows = prim[(prim.comparison == comp) & (prim.task == task) & (prim.level == level)
                    & (prim.site == "all")].set_index("metric")
        for metric, value in m.items():
            assert rows.loc[metric, "estimate"] == pytest.approx(float(value), abs=TOL, nan_ok=True)


# --------------------------------------------------------------------------- properties

SYMMETRIC = ("accuracy", "cohen_kappa", "kappa_linear", "kappa_quadratic", "gwet_ac1",
             "gwet_ac2", "lins_ccc", "within_one")


@st.composite
def confusion_matrices(draw, min_k=2, max_k=5):
    k = draw(st.integers(min_k, max_k))
    cells = draw(st.lists(st.integers(0, 30), min_size=k * k, max_size=k * k))
    conf = np.array(cells, dtype=float).reshape(k, k)
    if conf.sum() == 0:
        conf[0, 0] = 1
    return conf


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=60))
def test_perfect_agreement_gives_one(grades):
    conf = np.zeros((5, 5))
    for g in grades:
        conf[g - 1, g - 1] += 1
    m = confusion_metrics(conf, [1, 2, 3, 4, 5])
    for metric in ("accuracy", "balanced_accuracy", "gwet_ac1", "gwet_ac2", "within_one"):
        assert m[metric] == pytest.approx(1.0)
    if len(set(grades)) > 1:
        for metric in ("cohen_kappa", "kappa_linear", "kappa_quadratic", "lins_ccc"):
            assert m[metric] == pytest.approx(1.0)
    else:
        assert np.isnan(m["cohen_kappa"])  # p_e = 1


@settings(max_examples=150, deadline=None)
@given(confusion_matrices())
def test_symmetric_metrics_are_symmetric(conf):
    k = conf.shape[0]
    a = confusion_metrics(conf, list(range(1, k + 1)))
    b = confusion_metrics(conf.T, list(range(1, k + 1)))
    for metric in SYMMETRIC + (("mcc",) if k == 2 else ()):
        assert float(a[metric]) == pytest.approx(float(b[metric]), abs=1e-9, nan_ok=True)
    if k == 2:  # swapping raters swaps the roles of the one-sided metrics
        assert float(a["prevalence_model"]) == pytest.approx(float(b["prevalence_reader"]))
        tn, fp, fn, tp = conf.ravel()
        if tp + fp > 0:  # precision of a == sensitivity of b
            assert float(b["sensitivity"]) == pytest.approx(tp / (tp + fp))


@settings(max_examples=150, deadline=None)
@given(confusion_matrices(min_k=2, max_k=5), st.randoms(use_true_random=False))
def test_relabelling_classes_leaves_nominal_kappa_unchanged(conf, rnd):
    k = conf.shape[0]
    perm = list(range(k))
    rnd.shuffle(perm)
    relabelled = conf[np.ix_(perm, perm)]
    a = confusion_metrics(conf, list(range(k)), ordinal=False)
    b = confusion_metrics(relabelled, list(range(k)), ordinal=False)
    for metric in ("cohen_kappa", "gwet_ac1", "accuracy", "balanced_accuracy"):
        assert float(a[metric]) == pytest.approx(float(b[metric]), abs=1e-9, nan_ok=True)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=40))
def test_compute_agreement_never_crashes_and_matches_sklearn(pairs):
    ref, mod = np.array(pairs).T
    labels = pd.DataFrame({"scan_id": [f"s{i % 7}" for i in range(len(ref))],
                           "level": [f"L{i // 7}-L{i // 7 + 1}" for i in range(len(ref))],
                           "Narrowing": ref})
    preds = labels[["scan_id", "level"]].assign(Narrowing=mod)
    agreement, confusion = compute_agreement(preds, labels, n_bootstrap=20, by_level=False)
    est = primary_rows(agreement).set_index("metric")["estimate"]
    assert est["accuracy"] == pytest.approx(accuracy_score(ref, mod))
    assert est["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(ref, mod))
    if len(set(ref) | set(mod)) > 1:
        assert est["cohen_kappa"] == pytest.approx(
            cohen_kappa_score(ref, mod, labels=[1, 2, 3, 4]), abs=TOL)
    nan_rows = agreement[agreement.estimate.isna()]
    assert nan_rows.note.notna().all()
    assert confusion["count"].sum() == len(ref)


# --------------------------------------------------------------------------- edge cases


def _one_task(ref, mod, task="Pfirrmann", **kw):
    n = len(ref)
    labels = pd.DataFrame({"scan_id": [f"s{i // 3}" for i in range(n)],
                           "level": [LUMBAR_DISCS[i % 3] for i in range(n)], task: ref})
    preds = labels[["scan_id", "level"]].assign(**{task: mod})
    return compute_agreement(preds, labels, **kw)


def _get(agreement, metric, level="all", method=None):
    rows = agreement[(agreement.metric == metric) & (agreement.level == level)
                     & (agreement.site == "all")]
    if method:
        rows = rows[rows.ci_method == method]
    return rows.iloc[0]


def test_constant_ratings_kappa_nan_with_reason():
    a, _ = _one_task([3] * 60, [3] * 60, n_bootstrap=100)
    row = _get(a, "cohen_kappa", method="bootstrap_percentile")
    assert np.isnan(row.estimate) and "p_e = 1" in row.note
    assert _get(a, "accuracy").estimate == 1.0
    assert _get(a, "gwet_ac1").estimate == 1.0
    assert np.isnan(_get(a, "lins_ccc").estimate) and _get(a, "lins_ccc").note
    assert np.isnan(_get(a, "cohen_kappa", method="analytic_kappa_se").estimate)


def test_binary_balanced_accuracy_without_a_positive_reference_disc_is_undefined():
    a, _ = _one_task([0] * 30, [0] * 27 + [1] * 3, task="Herniation", n_bootstrap=50)
    row = _get(a, "balanced_accuracy")
    assert np.isnan(row.estimate) and row.note == "undefined: no positive disc in the reference"
    assert _get(a, "specificity").estimate == pytest.approx(0.9)  # what 0.9 'balanced' would have hidden
    a, _ = _one_task([1] * 30, [1] * 30, task="Herniation", n_bootstrap=0)
    assert "no negative disc" in _get(a, "balanced_accuracy").note


def test_class_absent_in_one_rater():
    rng = np.random.default_rng(0)
    ref = rng.integers(1, 5, 90)  # reader never grades 5
    mod = np.clip(ref + rng.integers(-1, 2, 90), 1, 5)
    a, c = _one_task(ref, mod, n_bootstrap=100)
    assert _get(a, "balanced_accuracy").estimate == pytest.approx(balanced_accuracy_score(ref, mod))
    assert _get(a, "kappa_linear").estimate == pytest.approx(
        cohen_kappa_score(ref, mod, labels=[1, 2, 3, 4, 5], weights="linear"))
    pooled = c[c.level == "all"]
    assert len(pooled) == 25 and pooled[pooled.reader_grade == 5]["count"].sum() == 0


def test_binary_without_positives():
    a, _ = _one_task([0] * 30, [0] * 29 + [1], task="Herniation", n_bootstrap=100)
    row = _get(a, "sensitivity")
    assert np.isnan(row.estimate) and "no positive" in row.note
    assert _get(a, "specificity").estimate == pytest.approx(29 / 30)
    assert np.isnan(_get(a, "mcc").estimate)
    assert _get(a, "prevalence_model").estimate == pytest.approx(1 / 30)


def test_tiny_stratum_estimates_without_interval():
    a, _ = _one_task([1, 2, 3, 4, 5, 1], [1, 2, 3, 4, 4, 2], n_bootstrap=100)
    row = _get(a, "accuracy")
    assert row.estimate == pytest.approx(4 / 6)
    assert np.isnan(row.ci_low) and "subject" in row.note
    assert row.n_subjects == 2 and row.n_discs == 6
    ana = _get(a, "cohen_kappa", method="analytic_kappa_se")
    assert np.isfinite(ana.estimate) and np.isnan(ana.ci_low) and "discs" in ana.note


def test_blank_cells_dropped_pairwise_and_missing_levels_counted():
    labels = pd.DataFrame({
        "scan_id": ["a"] * 4 + ["b"] * 4 + ["failed"] * 2,
        "level": ["L2-L3", "L3-L4", "L4-L5", "L5-S1"] * 2 + ["L4-L5", "L5-S1"],
        "Pfirrmann": [1, 2, 3, np.nan, 2, 3, 4, 5, 3, 3],
        "Herniation": [0, 1, 0, 1, 0, 0, 1, 1, 0, 1],
    })
    preds = pd.DataFrame({  # 'a' L2-L3 not found; scan 'failed' absent; a blank model cell
        "scan_id": ["a"] * 3 + ["b"] * 4,
        "level": ["L3-L4", "L4-L5", "L5-S1", "L2-L3", "L3-L4", "L4-L5", "L5-S1"],
        "Pfirrmann": [2, 3, 4, 2, 3, np.nan, 5],
        "Herniation": [1, 0, 1, 0, 0, 1, 1],
    })
    a, c = compute_agreement(preds, labels, n_bootstrap=50)
    pf = a[(a.task == "Pfirrmann") & (a.site == "all")]
    acc = pf[(pf.metric == "accuracy") & (pf.level == "all")].iloc[0]
    assert acc.n_discs == 5  # a:L3-L4,L4-L5 ; b:L2-L3,L3-L4,L5-S1
    assert acc.estimate == 1.0
    miss = pf[(pf.metric == "n_missing_model") & (pf.level == "all")].iloc[0]
    # reader-graded Pfirrmann discs: 9; missing model: a:L2-L3, b:L4-L5 (blank), failed x2
    assert miss.n_discs == 9 and miss.estimate == 4 and miss.ci_method == "none"
    per_level = pf[pf.metric == "n_missing_model"].set_index("level")["estimate"]
    assert per_level["L2-L3"] == 1 and per_level["L4-L5"] == 2 and per_level["L5-S1"] == 1
    hern = a[(a.task == "Herniation") & (a.metric == "n_missing_model") & (a.level == "all")]
    assert hern.estimate.iloc[0] == 3
    assert c[(c.task == "Pfirrmann") & (c.level == "all")]["count"].sum() == 5
    assert a.comparison.unique().tolist() == ["model_vs_R1"]  # default reader name


def test_ccs_binary_derived_from_four_class_grade():
    ref = [1, 2, 3, 4, 1, 1, 2, 4, 3, 1] * 3
    mod = [1, 1, 3, 4, 2, 1, 2, 3, 1, 1] * 3
    a, c = _one_task(ref, mod, task="CentralCanalStenosis", n_bootstrap=0)
    cells = c[(c.task == CCS_BINARY) & (c.level == "all")].set_index(
        ["reader_grade", "model_grade"])["count"]
    r, m = np.array(ref) > 1, np.array(mod) > 1
    assert cells[(1, 1)] == np.sum(r & m) and cells[(0, 1)] == np.sum(~r & m)
    assert cells[(1, 0)] == np.sum(r & ~m) and cells[(0, 0)] == np.sum(~r & ~m)
    sens = _get(a[a.task == CCS_BINARY], "sensitivity")
    assert sens.estimate == pytest.approx(recall_score(r, m))
    assert sens.ci_method == "none" and "n_bootstrap = 0" in sens.note


def test_invalid_grades_and_level_spelling():
    labels = pd.DataFrame({"scan_id": ["x", "x", "y"], "level": ["l4/l5", " L5-S1", "L4_L5"],
                           "Pfirrmann": [6, 2, 3], "reader": ["R2", None, "R2"]})
    preds = pd.DataFrame({"scan_id": ["x", "x", "y"], "level": ["L4-L5", "L5-S1", "L4-L5"],
                          "Pfirrmann": [3, 2, 3]})
    a, _ = compute_agreement(preds, labels, n_bootstrap=0)
    # blank reader -> R1; R1 and R2 share no disc, so there is no R1_vs_R2 comparison
    assert set(a.comparison) == {"model_vs_R1", "model_vs_R2"}
    m2 = a[(a.comparison == "model_vs_R2") & (a.metric == "accuracy") & (a.level == "all")]
    assert m2.n_discs.iloc[0] == 1  # the grade 6 is not on the scale: not graded
    assert set(a.level) == {"all", "L4-L5", "L5-S1"}


def test_reader_pairs_sorted_and_reader_b_is_reference():
    base = pd.DataFrame({"scan_id": [f"s{i}" for i in range(20)], "level": "L4-L5"})
    r1 = base.assign(reader="R1", Herniation=[1] * 10 + [0] * 10)
    r1r = base.assign(reader="R1-repeat", Herniation=[1] * 5 + [0] * 15)
    r2 = base.assign(reader="R2", Herniation=[1] * 20)
    preds = base.assign(Herniation=[1] * 20)
    a, c = compute_agreement(preds, pd.concat([r2, r1r, r1]), n_bootstrap=0, by_level=False)
    assert list(dict.fromkeys(a.comparison)) == [
        "model_vs_R1", "model_vs_R1-repeat", "model_vs_R2",
        "R1_vs_R1-repeat", "R1_vs_R2", "R1-repeat_vs_R2"]
    prim = primary_rows(a)
    rr = prim[prim.comparison == "R1_vs_R1-repeat"].set_index("metric")["estimate"]
    # R1-repeat is the reference: 5 positives, R1 finds all 5 -> sensitivity 1
    assert rr["sensitivity"] == 1.0 and rr["specificity"] == pytest.approx(10 / 15)
    assert rr["prevalence_reader"] == 0.25 and rr["prevalence_model"] == 0.5
    assert "n_missing_model" not in set(a[a.comparison == "R1_vs_R1-repeat"].metric)
    cells = c[c.comparison == "R1_vs_R1-repeat"].set_index(["reader_grade", "model_grade"])["count"]
    assert cells[(0, 1)] == 5  # reader_grade = R1-repeat (reference), model_grade = R1


def test_empty_and_taskless_inputs():
    labels = pd.DataFrame({"scan_id": [], "level": [], "Pfirrmann": []})
    preds = pd.DataFrame({"scan_id": ["a"], "level": ["L4-L5"], "Pfirrmann": [3]})
    a, c = compute_agreement(preds, labels)
    assert a.empty and tuple(a.columns) == AGREEMENT_COLUMNS and tuple(c.columns) == CONFUSION_COLUMNS
    a, c = compute_agreement(preds, pd.DataFrame({"scan_id": ["a"], "level": ["L4-L5"]}))
    assert a.empty and c.empty
    with pytest.raises(ValueError):
        compute_agreement(preds, labels, tasks=["NotATask"])


def test_subject_defaults_to_scan_and_site_from_predictions():
    preds, labels = synthetic(n_subjects=30, readers=("R1",))
    a, _ = compute_agreement(preds.drop(columns=["subject_id"]), labels, n_bootstrap=0)
    acc = a[(a.metric == "accuracy") & (a.task == "Pfirrmann") & (a.level == "all")]
    assert set(acc.site) == {"all", "A", "B", "C"}
    assert acc[acc.site == "all"].n_subjects.iloc[0] == 30
    a, _ = compute_agreement(preds.drop(columns=["site"]), labels, n_bootstrap=0)
    assert set(a.site) == {"all"}


# --------------------------------------------------------------------------- files


def test_run_agreement_writes_both_tables_with_provenance(tmp_path):
    from spinecohort.provenance import make_provenance, read_provenance, write_table

    preds, labels = synthetic(n_subjects=30, readers=("R1", "R2"))
    preds["scan_id"] = preds["scan_id"].str.replace("scan", "0")  # leading zeros survive CSV
    labels["scan_id"] = labels["scan_id"].str.replace("scan", "0")
    discs = tmp_path / "discs.parquet"
    write_table(preds, discs, make_provenance(models={"grader": "abc123"}))
    labels_csv = tmp_path / "labels.csv"
    labels.to_csv(labels_csv, index=False)
    out = tmp_path / "tables" / "agreement.parquet"
    got = run_agreement(discs, labels_csv, out, n_bootstrap=50, seed=2)
    assert got == (out, tmp_path / "tables" / "confusion.parquet")
    agreement = pd.read_parquet(out)
    assert tuple(agreement.columns) == AGREEMENT_COLUMNS
    assert pd.read_parquet(got[1])["count"].sum() > 0
    prov = read_provenance(out)
    assert json.loads(prov["models"]) == {"grader": "abc123"}
    meta = pq.read_schema(out).metadata
    assert meta[b"agreement_n_bootstrap"] == b"50" and meta[b"agreement_seed"] == b"2"
    direct, _ = compute_agreement(preds, labels, n_bootstrap=50, seed=2)
    pd.testing.assert_series_equal(agreement["estimate"], direct["estimate"])

    assert agreement_cli([str(discs), str(labels_csv), "-o", str(tmp_path / "x.parquet"),
                          "--bootstrap", "0"]) == 0
    assert (tmp_path / "x_confusion.parquet").exists()
