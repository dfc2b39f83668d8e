"""The report's agreement section: model vs reader and reader vs reader, from the tables of
:func:`spinecohort.stats.compute_agreement` (missing-model counts, forest plots next to the
reader-vs-reader reference, pooled tables with bootstrap and analytic intervals, per-level plot
and tables, per-site tables, confusion matrices)."""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..tasks import CCS_BINARY, TASK_BY_NAME  # noqa: E402
from .formatting import (  # noqa: E402
    MODEL_COLOURS,
    READER_COLOURS,
    _cell,
    _count,
    _finite,
    _level_order,
    _png,
    _task_order,
    fmt,
    fmt_ci,
)

ANALYTIC_METHODS = ("analytic_kappa_se", "fisher_z")
NOT_PLOTTED = ("prevalence_model", "prevalence_reader", "n_missing_model")
METRIC_LABELS = {
    "balanced_accuracy": "balanced accuracy",
    "accuracy": "accuracy",
    "cohen_kappa": "Cohen's \u03ba",
    "gwet_ac1": "Gwet's AC1",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "mcc": "MCC",
    "prevalence_model": "prevalence (model)",
    "prevalence_reader": "prevalence (reference)",
    "kappa_linear": "linear-weighted \u03ba",
    "kappa_quadratic": "quadratic-weighted \u03ba",
    "lins_ccc": "Lin's CCC",
    "within_one": "within one grade",
    "gwet_ac2": "Gwet's AC2 (quadratic)",
}
METRIC_ORDER = list(METRIC_LABELS)


def _comparison_order(comps: Iterable[str]) -> list[str]:
    comps = list(dict.fromkeys(comps))
    model = sorted(c for c in comps if c.startswith("model_vs_"))
    return model + sorted(c for c in comps if not c.startswith("model_vs_"))


def _colours(comps: Sequence[str]) -> dict[str, str]:
    out, mi, ri = {}, 0, 0
    for c in comps:
        if c.startswith("model_vs_"):
            out[c] = MODEL_COLOURS[mi % len(MODEL_COLOURS)]
            mi += 1
        else:
            out[c] = READER_COLOURS[ri % len(READER_COLOURS)]
            ri += 1
    return out


def _headline_kappa(task: str) -> str:
    spec = TASK_BY_NAME.get(task)
    return "kappa_linear" if spec is not None and spec.ordinal else "cohen_kappa"


def _grades(task: str) -> list[int]:
    if task == CCS_BINARY:
        return [0, 1]
    spec = TASK_BY_NAME.get(task)
    return list(spec.grades) if spec else []


def _split(agreement: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    analytic = agreement[agreement["ci_method"].isin(ANALYTIC_METHODS)]
    primary = agreement[~agreement["ci_method"].isin(ANALYTIC_METHODS)]
    return primary, analytic


def _value_cell(row: pd.Series | None, analytic: pd.Series | None = None) -> dict[str, str]:
    if row is None:
        return _cell("", cls="empty")
    note = row.get("note")
    note = "" if note is None or (isinstance(note, float) and math.isnan(note)) else str(note)
    if not _finite(row["estimate"]):
        # undefined for these data: say so and why, in the cell, not only on hover
        return _cell("undefined", sub=note.removeprefix("undefined: "), title=note, cls="na")
    sub = fmt_ci(row["ci_low"], row["ci_high"])
    if not sub and row.get("ci_method") != "none":
        sub = _ci_reason(note) or "no CI"
    sub2 = ""
    if analytic is not None and _finite(analytic["ci_low"]):
        label = "Fisher z" if analytic["ci_method"] == "fisher_z" else "FCE"
        sub2 = f"analytic, discs independent ({label}) {fmt_ci(analytic['ci_low'], analytic['ci_high'])}"
    cell = _cell(fmt(row["estimate"]), sub=sub, title=note)
    cell["sub2"] = sub2
    return cell


def _ci_reason(note: Any) -> str:
    """The part of a ``note`` that says why an interval is missing ('' if none does)."""
    if not isinstance(note, str):
        return ""
    for part in note.split("; "):
        if part.startswith("CI not computed") or part.startswith("no bootstrap") or "CI needs" in part:
            return part
    return ""


def _ci_status(rows: pd.DataFrame) -> tuple[bool, str]:
    """Whether any row has a bootstrap interval, and else the reason (from the notes)."""
    if rows.empty:
        return False, "no rows"
    has = bool((rows["ci_low"].map(_finite) & rows["ci_high"].map(_finite)).any())
    if has:
        return True, ""
    reasons = [r for r in (_ci_reason(n) for n in rows.get("note", pd.Series(dtype=object))) if r]
    return False, (max(set(reasons), key=reasons.count) if reasons else "bootstrap intervals not computed")


def _forest_plot(task: str, pooled: pd.DataFrame, comps: list[str], colours: dict[str, str]) -> str:
    metrics = [m for m in METRIC_ORDER if m in set(pooled["metric"]) and m not in NOT_PLOTTED]
    n = len(comps)
    legend_rows = math.ceil(n / 3)
    body = 0.1 * len(metrics) * (n + 2.2)  # inches for the axes
    top, bottom = 0.35, 0.75 + 0.22 * legend_rows
    width, left = 5.6, 1.75
    height = body + top + bottom
    fig, ax = plt.subplots(figsize=(width, height))
    fig.subplots_adjust(left=left / width, right=1 - 0.15 / width, top=1 - top / height,
                        bottom=bottom / height)
    lows = [0.0]
    for j, comp in enumerate(comps):
        rows = pooled[pooled["comparison"] == comp].set_index("metric")
        ys, xs, lo, hi = [], [], [], []
        for i, m in enumerate(metrics):
            if m not in rows.index:
                continue
            y = i + (j - (n - 1) / 2) * (0.7 / max(n, 1))
            if not _finite(rows.loc[m, "estimate"]):  # undefined for these data: say so, no point
                ax.text(0.01, y, "undefined", fontsize=7.5, color=colours[comp], va="center", style="italic")
                continue
            est = float(rows.loc[m, "estimate"])
            ys.append(y)
            xs.append(est)
            lo.append(est - float(rows.loc[m, "ci_low"]) if _finite(rows.loc[m, "ci_low"]) else 0)
            hi.append(float(rows.loc[m, "ci_high"]) - est if _finite(rows.loc[m, "ci_high"]) else 0)
            lows.append(est - lo[-1])
        if xs:
            marker = "o" if comp.startswith("model_vs_") else "D"
            ax.errorbar(xs, ys, xerr=[lo, hi], fmt=marker, color=colours[comp], ms=4.5,
                        capsize=2.5, lw=1.3, label=comp.replace("_vs_", " vs "))
    ax.set_yticks(range(len(metrics)))
    ax.set_yticklabels([METRIC_LABELS.get(m, m) for m in metrics])
    ax.invert_yaxis()
    left = min(lows)
    ax.set_xlim(min(0.0, left) - 0.03, 1.02)
    ax.axvline(0, color="#bbbbbb", lw=0.8)
    ax.axvline(1, color="#bbbbbb", lw=0.8, ls=":")
    ax.grid(axis="x", color="#eeeeee")
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(task, loc="left", fontsize=10.5, fontweight="bold")
    has_ci, why = _ci_status(pooled[pooled["metric"].isin(metrics)])
    # an axis only promises intervals it shows
    ax.set_xlabel("estimate, 95% subject-clustered bootstrap CI" if has_ci else f"estimate only: {why}",
                  fontsize=9, color="#1d2430" if has_ci else "#b4531a")
    ax.tick_params(labelsize=8.5)
    centre = (left / width + 1 - 0.15 / width) / 2  # under the axes, not the tick labels
    fig.legend(loc="lower center", bbox_to_anchor=(centre, 0.01),
               ncol=min(3, max(1, n)), frameon=False, fontsize=8.5)
    return _png(fig)


def _per_level_plot(primary: pd.DataFrame, tasks: list[str], comps: list[str],
                    colours: dict[str, str]) -> str | None:
    rows = primary[(primary["site"] == "all") & (primary["level"] != "all")]
    if rows.empty:
        return None
    levels = _level_order(rows["level"])
    ncols = 3
    nrows = math.ceil(len(tasks) / ncols)
    height = 2.3 * nrows + 0.7
    fig, axes = plt.subplots(nrows, ncols, figsize=(12, height), squeeze=False, sharey=True)
    fig.subplots_adjust(left=0.05, right=0.99, top=1 - 0.3 / height, bottom=0.75 / height,
                        hspace=0.45, wspace=0.08)
    x = np.arange(len(levels))
    heads = rows[[m == _headline_kappa(t) for t, m in zip(rows["task"], rows["metric"])]]
    lowest = pd.concat([heads["estimate"], heads["ci_low"]]).min()
    y_low = min(-0.1, float(lowest) - 0.05) if _finite(lowest) else -0.1
    for ax, task in zip(axes.ravel(), tasks):
        metric = _headline_kappa(task)
        sub = rows[(rows["task"] == task) & (rows["metric"] == metric)]
        n = len(comps)
        for j, comp in enumerate(comps):
            s = sub[sub["comparison"] == comp].set_index("level").reindex(levels)
            est = s["estimate"].to_numpy(float)
            lo = np.nan_to_num(est - s["ci_low"].to_numpy(float))
            hi = np.nan_to_num(s["ci_high"].to_numpy(float) - est)
            off = (j - (n - 1) / 2) * (0.6 / max(n, 1))
            ax.errorbar(x + off, est, yerr=[lo, hi], fmt="o" if comp.startswith("model") else "D",
                        color=colours[comp], ms=3.5, capsize=2, lw=1.1,
                        label=comp.replace("_vs_", " vs "))
        ax.set_title(f"{task} \u2014 {METRIC_LABELS[metric]}", fontsize=9, loc="left")
        ax.set_xticks(x)
        ax.set_xticklabels(levels, fontsize=7.5, rotation=0)
        ax.axhline(0, color="#cccccc", lw=0.7)
        ax.set_ylim(y_low, 1.05)
        ax.grid(axis="y", color="#eeeeee")
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    for ax in axes.ravel()[len(tasks):]:
        ax.axis("off")
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), frameon=False,
               bbox_to_anchor=(0.5, 0.0), fontsize=9)
    has_ci, why = _ci_status(heads)
    if not has_ci:
        fig.suptitle(f"estimates only: {why}", fontsize=9, color="#b4531a", x=0.99, ha="right")
    return _png(fig)


def _confusion_blocks(confusion: pd.DataFrame | None, tasks: list[str],
                      comps: list[str]) -> list[dict[str, Any]]:
    if confusion is None or confusion.empty:
        return []
    pooled = confusion[confusion["level"].astype(str) == "all"]
    blocks = []
    for task in tasks:
        mats = []
        for comp in comps:
            cells = pooled[(pooled["task"] == task) & (pooled["comparison"] == comp)]
            if cells.empty:
                continue
            grades = sorted(set(cells["reader_grade"]) | set(cells["model_grade"]))
            table = (cells.pivot_table(index="reader_grade", columns="model_grade", values="count",
                                       aggfunc="sum", fill_value=0)
                     .reindex(index=grades, columns=grades, fill_value=0))
            total = max(int(table.to_numpy().sum()), 1)
            row_tot = table.sum(axis=1)
            rows = []
            for g in grades:
                cells_out = []
                for h in grades:
                    v = int(table.loc[g, h])
                    share = v / row_tot[g] if row_tot[g] else 0.0
                    alpha = 0.08 + 0.8 * share if v else 0.0
                    colour = "31,95,168" if g == h else "217,115,26"
                    cells_out.append({"v": f"{v:,}", "bg": f"rgba({colour},{alpha:.2f})",
                                      "dark": share > 0.55})
                rows.append({"grade": g, "cells": cells_out, "total": f"{int(row_tot[g]):,}"})
            a, b = comp.split("_vs_", 1)
            mats.append({"comparison": comp, "grades": grades, "rows": rows,
                         "row_label": b, "col_label": a, "n": f"{total:,}"})
        if mats:
            blocks.append({"task": task, "mats": mats})
    return blocks


def _table_by(primary: pd.DataFrame, tasks: list[str], comps: list[str],
              by: str) -> list[dict[str, Any]]:
    """Per-level (``by='level'``) or per-site rows: headline metrics for every comparison."""
    other = "site" if by == "level" else "level"
    sub = primary[(primary[other] == "all") & (primary[by] != "all")]
    if sub.empty:
        return []
    keys = _level_order(sub[by]) if by == "level" else sorted(sub[by].astype(str).unique())
    out = []
    for task in tasks:
        kappa = _headline_kappa(task)
        t = sub[sub["task"] == task]
        if t.empty:
            continue
        idx = t.set_index(["comparison", by, "metric"])
        rows = []
        for key in keys:
            cells = []
            n_discs = None
            for comp in comps:
                for metric in ("balanced_accuracy", kappa):
                    k = (comp, key, metric)
                    row = idx.loc[k] if k in idx.index else None
                    if isinstance(row, pd.DataFrame):
                        row = row.iloc[0]
                    if row is not None and n_discs is None:
                        n_discs = row["n_discs"]
                    cells.append(_value_cell(row))
            rows.append({"key": key, "n": _count(n_discs), "cells": cells})
        out.append({"task": task, "kappa": METRIC_LABELS[kappa], "rows": rows})
    return out


def _missing_table(primary: pd.DataFrame, tasks: list[str]) -> dict[str, Any]:
    miss = primary[(primary["metric"] == "n_missing_model") & (primary["site"] == "all")]
    if miss.empty:
        return {}
    comps = _comparison_order(miss["comparison"])
    levels = ["all"] + _level_order(miss["level"])
    tables = []
    for comp in comps:
        m = miss[miss["comparison"] == comp].set_index(["task", "level"])
        rows = []
        for task in tasks:
            cells = []
            for lv in levels:
                if (task, lv) not in m.index:
                    cells.append(_cell(""))
                    continue
                r = m.loc[(task, lv)]
                k, n = int(r["estimate"]), int(r["n_discs"])
                cells.append(_cell(f"{k:,}", sub=f"of {n:,}", cls="warn" if k else ""))
            rows.append({"key": task, "cells": cells})
        total = m.xs("all", level="level")["estimate"].max() if len(m) else 0
        tables.append({"comparison": comp, "levels": levels, "rows": rows,
                       "max_missing": int(total) if _finite(total) else 0})
    # summary: per comparison and level, the task with the most missing discs
    summary = []
    for comp in comps:
        m = miss[miss["comparison"] == comp]
        cells = []
        for lv in levels:
            r = m[m["level"] == lv]
            if r.empty:
                cells.append(_cell(""))
                continue
            worst = r.loc[r["estimate"].idxmax()]
            k, n = int(worst["estimate"]), int(worst["n_discs"])
            pct = f" ({100 * k / n:.1f}%)" if n else ""
            cells.append(_cell(f"{k:,}", sub=f"of {n:,}{pct}", cls="warn" if k else ""))
        summary.append({"key": comp, "cells": cells})
    return {"tables": tables, "summary": summary, "levels": levels}


def _agreement_context(agreement: pd.DataFrame, confusion: pd.DataFrame | None,
                       provenance: Mapping[str, Any]) -> dict[str, Any]:
    primary, analytic = _split(agreement)
    comps = _comparison_order(primary["comparison"])
    colours = _colours(comps)
    tasks = _task_order(primary["task"])
    pooled = primary[(primary["level"] == "all") & (primary["site"] == "all")]
    pooled_an = analytic[(analytic["level"] == "all") & (analytic["site"] == "all")]
    an_idx = {(r.comparison, r.task, r.metric): r for r in pooled_an.itertuples(index=False)}

    per_task = []
    for task in tasks:
        p = pooled[pooled["task"] == task]
        metrics = [m for m in METRIC_ORDER if m in set(p["metric"])]
        idx = {(r.comparison, r.metric): r for r in p.itertuples(index=False)}
        rows = []
        for m in metrics:
            cells = []
            for comp in comps:
                r = idx.get((comp, m))
                a = an_idx.get((comp, task, m))
                cells.append(_value_cell(pd.Series(r._asdict()) if r is not None else None,
                                         pd.Series(a._asdict()) if a is not None else None))
            rows.append({"metric": METRIC_LABELS.get(m, m), "cells": cells})
        n_row = []
        for comp in comps:
            r = idx.get((comp, "accuracy"))
            n_row.append(_cell(_count(r.n_discs) if r is not None else "",
                               sub=f"{_count(r.n_subjects)} subjects" if r is not None else ""))
        has_ci, why = _ci_status(p[p["metric"].isin([m for m in metrics if m not in NOT_PLOTTED])])
        per_task.append({
            "task": task, "rows": rows, "n_row": n_row, "ci_note": None if has_ci else why,
            "forest": _forest_plot(task, p, [c for c in comps if c in set(p["comparison"])],
                                   colours) if len(p) else None,
        })

    undefined = []
    for r in primary[primary["estimate"].isna() & (primary["metric"] != "n_missing_model")
                     ].itertuples(index=False):
        note = r.note if isinstance(r.note, str) else ""
        undefined.append([r.comparison, r.task, r.level, r.site, r.metric, note])
    n_boot = provenance.get("agreement_n_bootstrap") if provenance else None
    pooled_ci, pooled_why = _ci_status(pooled[~pooled["metric"].isin(NOT_PLOTTED)])
    level_rows = primary[(primary["site"] == "all") & (primary["level"] != "all")]
    level_ci, level_why = _ci_status(level_rows[~level_rows["metric"].isin(NOT_PLOTTED)])
    seeds = sorted(set(int(s) for s in primary["seed"].dropna())) if "seed" in primary else []
    return {
        "comparisons": [{"name": c, "colour": colours[c],
                         "kind": "model" if c.startswith("model_vs_") else "reader"} for c in comps],
        "has_reader_pairs": any(not c.startswith("model_vs_") for c in comps),
        "tasks": per_task,
        "missing": _missing_table(primary, tasks),
        "per_level_plot": _per_level_plot(primary, tasks, comps, colours),
        "per_level": _table_by(primary, tasks, comps, "level"),
        "per_site": _table_by(primary, tasks, comps, "site"),
        "confusion": _confusion_blocks(confusion, tasks, comps),
        "undefined": undefined[:300],
        "n_undefined": len(undefined),
        "n_bootstrap": n_boot,
        "seed": ", ".join(map(str, seeds)),
        "ci_note": None if pooled_ci else pooled_why,
        "per_level_ci_note": None if level_ci else level_why,
    }
