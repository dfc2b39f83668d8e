"""The validation report: one self-contained HTML file (contract: ``report/validation.html``).

Everything is inlined: CSS in the page, figures as base64 PNG drawn with matplotlib's Agg
backend, QC thumbnails and hotspot examples read from disk and embedded the same way. There are
no scripts and no external resources, so a reviewer can open it offline or attach it to a
submission.

First screen: what each model was trained on (synthetic or real, which data, held-out or
cross-validated figures; :func:`spinecohort.shipped.training_records`) and the scans whose levels
are flagged (``level_flags`` of ``scans.parquet``, with their QC pictures). Then: cohort summary,
failures, agreement (missing-model counts, forest plots of model vs
reader next to the reader-vs-reader reference, pooled tables with bootstrap and analytic
intervals, per-level plot and tables, per-site tables, confusion matrices), grade distributions
model vs readers (after SpineNet's comparison of grade distributions, Jamaludin et al. 2017,
Eur Spine J, Fig. 6), QC
thumbnails, hotspot examples and provenance.
"""
from __future__ import annotations

import base64
import datetime as _dt
import io
import json
import math
import platform
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from jinja2 import Environment, FileSystemLoader, select_autoescape  # noqa: E402

from .. import __version__  # noqa: E402
from ..provenance import atomic_write_bytes  # noqa: E402
from ..tasks import CCS_BINARY, TASK_BY_NAME, TASKS, disc_levels  # noqa: E402

TEMPLATE_DIR = Path(__file__).parent.parent / "templates"  # spinecohort/templates
TEMPLATE = "validation.html.j2"

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
MODEL_COLOURS = ["#1f5fa8", "#d9731a", "#2a9d5b", "#9b3fb5", "#c23b3b"]
READER_COLOURS = ["#555555", "#8c8c8c", "#b0b0b0", "#3d3d3d"]
TEXT_FIELDS = ("scan_id", "failed_stage", "error")
ACQUISITION_COLUMNS = (
    ("n_slices", "slices"), ("rows", "rows"), ("cols", "columns"),
    ("pixel_spacing_mm", "pixel spacing (mm)"), ("slice_spacing_mm", "slice spacing (mm)"),
    ("fov", "field of view"), ("n_vertebrae", "vertebrae detected"),
    ("n_discs", "discs graded"), ("grading_slices", "slices per disc volume graded"),
)


# --------------------------------------------------------------------------- formatting


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers with ``digits`` decimals; NaN/None as an em dash."""
    if value is None:
        return "\u2014"
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(x):
        return "\u2014"
    return f"{x:.{digits}f}"


def fmt_ci(low: Any, high: Any, digits: int = 3) -> str:
    if low is None or high is None or not (_finite(low) and _finite(high)):
        return ""
    return f"[{fmt(low, digits)}, {fmt(high, digits)}]"


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _count(x: Any) -> str:
    return f"{int(x):,}" if _finite(x) else "\u2014"


def _cell(main: str, sub: str = "", title: str = "", cls: str = "") -> dict[str, str]:
    return {"main": main, "sub": sub, "title": title, "cls": cls}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
         ".webp": "image/webp", ".svg": "image/svg+xml"}


def _embed_file(path: str | Path) -> str | None:
    p = Path(path)
    mime = _MIME.get(p.suffix.lower())
    if mime is None or not p.is_file():
        return None
    return f"data:{mime};base64," + base64.b64encode(p.read_bytes()).decode("ascii")


# --------------------------------------------------------------------------- first screen


def _flag_list(value: Any) -> list[str]:
    """``level_flags`` as a list: a list/array, or text separated by ``;``, ``,`` or ``|``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        parts = value.replace("|", ";").replace(",", ";").split(";")
    else:
        try:
            parts = [str(v) for v in value]
        except TypeError:
            parts = [str(value)]
    return [p.strip() for p in parts if p and p.strip()]


def flagged_level_scans(scans: pd.DataFrame | None, qc_images: Mapping[str, str | Path] | None = None,
                        limit: int = 40) -> dict[str, Any]:
    """Scans whose level labelling is flagged (``level_flags`` column, e.g. ``no_sacrum_in_view``,
    ``counting_variant_suspected``, ``low_confidence``), each with its QC picture. Empty when the
    column is absent or every entry is empty."""
    if scans is None or "level_flags" not in scans.columns:
        return {"rows": [], "total": 0}
    rows = []
    for _, r in scans.iterrows():
        flags = _flag_list(r["level_flags"])
        if not flags:
            continue
        scan_id = str(r.get("scan_id", ""))
        path = (qc_images or {}).get(scan_id)
        rows.append({"scan_id": scan_id, "flags": ", ".join(flags),
                     "confidence": fmt(r.get("level_confidence"), 2) if "level_confidence" in scans.columns else "",
                     "uri": _embed_file(path) if path is not None else None})
    return {"rows": rows[:limit], "total": len(rows)}


def _training_context(training: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    order = {"detect": 0, "detect-vfr": 0, "label": 1, "appearance": 1, "context": 2, "grade": 3, "grading": 3}
    rows = sorted((dict(r) for r in training), key=lambda r: (order.get(r.get("stage", ""), 9), r["model"]))
    return {"rows": rows,
            "synthetic_graders": [r["model"] for r in rows if r.get("stage") == "grade" and r.get("kind") == "synthetic"]}


def _label_columns(labels: pd.DataFrame | None, discs: pd.DataFrame | None,
                   reading_schemes: Mapping[str, Any] | None) -> list[dict[str, str]]:
    if labels is None:
        return []
    from ..schemes import label_columns, parse_reading_schemes

    return label_columns(labels.columns, None if discs is None else discs.columns,
                         parse_reading_schemes(reading_schemes))


def _task_order(names: Iterable[str]) -> list[str]:
    order = []
    for t in TASKS:
        order.append(t.name)
        if t.name == "CentralCanalStenosis":
            order.append(CCS_BINARY)
    names = list(dict.fromkeys(names))
    return [n for n in order if n in names] + sorted(n for n in names if n not in order)


def _level_order(levels: Iterable[str]) -> list[str]:
    ranks = {name: i for i, name in enumerate(reversed(disc_levels()))}
    uniq = {str(lv) for lv in levels if str(lv) != "all"}
    return sorted(uniq, key=lambda lv: (lv not in ranks, ranks.get(lv, 0), lv))


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


# --------------------------------------------------------------------------- cohort summary


def _describe(values: pd.Series) -> str:
    num = pd.to_numeric(values, errors="coerce").dropna()
    if len(num) and len(num) >= 0.8 * values.notna().sum():
        q1, med, q3 = np.percentile(num, [25, 50, 75])
        digits = 0 if np.allclose(num, np.round(num)) else 2
        return (f"median {fmt(med, digits)} (IQR {fmt(q1, digits)}\u2013{fmt(q3, digits)}; "
                f"range {fmt(num.min(), digits)}\u2013{fmt(num.max(), digits)})")
    counts = values.dropna().astype(str).value_counts()
    if counts.empty:
        return "\u2014"
    shown = ", ".join(f"{k} ({v})" for k, v in counts.head(5).items())
    more = f", \u2026 {len(counts) - 5} more" if len(counts) > 5 else ""
    return shown + more


def _cohort_summary(scans: pd.DataFrame | None, discs: pd.DataFrame | None) -> dict[str, Any]:
    scans = scans if scans is not None else pd.DataFrame()
    status = scans["status"].astype(str) if "status" in scans.columns else pd.Series(
        ["ok"] * len(scans), index=scans.index)
    ok = scans[status == "ok"]
    facts = [
        ("scans in manifest", _count(len(scans))),
        ("processed (status ok)", _count(len(ok))),
        ("failed", _count((status == "failed").sum())),
    ]
    if "subject_id" in scans.columns:
        facts.append(("subjects", _count(scans["subject_id"].nunique())))
    if "visit" in scans.columns and scans["visit"].notna().any():
        facts.append(("visits", ", ".join(sorted(scans["visit"].dropna().astype(str).unique()))))
    n_discs = 0 if discs is None else len(discs)
    facts.append(("discs graded", _count(n_discs)))

    sites = []
    if "site" in scans.columns and len(scans):
        site = scans["site"].fillna("(none)").astype(str)
        for name in sorted(site.unique()):
            sel = site == name
            sites.append([name, _count(sel.sum()), _count((sel & (status == "ok")).sum()),
                          _count((sel & (status == "failed")).sum())])

    acquisition = []
    for col, label in ACQUISITION_COLUMNS:
        if col in ok.columns and ok[col].notna().any():
            acquisition.append((label, _describe(ok[col])))

    timing = []
    for col in [c for c in scans.columns if str(c).startswith("seconds_")]:
        sec = pd.to_numeric(ok[col], errors="coerce").dropna()
        if len(sec):
            timing.append((col.removeprefix("seconds_"), fmt(sec.median(), 1),
                           fmt(sec.max(), 1), fmt(sec.sum() / 3600, 2)))

    per_level = []
    if discs is not None and len(discs) and "level" in discs.columns:
        counts = discs["level"].astype(str).value_counts()
        per_level = [(lv, _count(counts[lv])) for lv in _level_order(counts.index)]
    return {"facts": facts, "sites": sites, "acquisition": acquisition, "timing": timing,
            "per_level": per_level}


def _failures(scans: pd.DataFrame | None, limit: int = 500) -> dict[str, Any]:
    if scans is None or "status" not in scans.columns:
        return {"rows": [], "more": 0}
    failed = scans[scans["status"].astype(str) == "failed"]
    rows = []
    for _, r in failed.head(limit).iterrows():
        err = "" if pd.isna(r.get("error")) else str(r.get("error"))
        rows.append([str(r.get("scan_id", "")),
                     "" if pd.isna(r.get("failed_stage")) else str(r.get("failed_stage")),
                     err if len(err) <= 400 else err[:400] + " \u2026"])
    return {"rows": rows, "more": max(0, len(failed) - limit)}


def input_warnings(scans: pd.DataFrame | None, labels: pd.DataFrame | None, limit: int = 200) -> list[str]:
    """Counted warnings about the input: each scan's ingest warnings (files ignored, slices missing,
    non-MR modality, ...) and what the labels hold that the agreement cannot use."""
    from ..stats import label_warnings

    out: list[str] = []
    if scans is not None and "ingest_warnings" in scans.columns:
        warned = scans[scans["ingest_warnings"].fillna("").astype(str) != ""]
        if len(warned):
            out.append(f"{len(warned)} scan(s) ingested with warnings (column ingest_warnings of tables/scans.parquet)")
            out += [f"{r.scan_id}: {r.ingest_warnings}" for r in warned.head(limit).itertuples()]
            if len(warned) > limit:
                out.append(f"\u2026 {len(warned) - limit} more scan(s) with ingest warnings")
    if labels is not None:
        out += label_warnings(labels, scans["scan_id"] if scans is not None and "scan_id" in scans.columns else None)
    return out


# --------------------------------------------------------------------------- agreement


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


def _grade_histograms(discs: pd.DataFrame | None, labels: pd.DataFrame | None) -> str | None:
    sources: list[tuple[str, pd.DataFrame]] = []
    if discs is not None and len(discs):
        sources.append(("model", discs))
    if labels is not None and len(labels):
        if "reader" in labels.columns:
            reader = labels["reader"].fillna("R1").astype(str)
            for r in sorted(reader.unique()):
                sources.append((r, labels[reader == r]))
        else:
            sources.append(("R1", labels))
    tasks = [t for t in TASKS if any(t.name in df.columns and df[t.name].notna().any()
                                     for _, df in sources)]
    if not tasks:
        return None
    ncols = 4
    nrows = math.ceil(len(tasks) / ncols)
    height = 2.3 * nrows + 0.6
    fig, axes = plt.subplots(nrows, ncols, figsize=(12, height), squeeze=False)
    fig.subplots_adjust(left=0.06, right=0.99, top=1 - 0.6 / height, bottom=0.35 / height,
                        hspace=0.55, wspace=0.22)
    colours = ["#1f5fa8"] + READER_COLOURS
    width = 0.8 / len(sources)
    for ax, task in zip(axes.ravel(), tasks):
        grades = np.asarray(task.grades)
        ns: list[str] = []
        for j, (name, df) in enumerate(sources):
            if task.name not in df.columns:
                continue
            vals = pd.to_numeric(df[task.name], errors="coerce").dropna()
            if vals.empty:
                continue
            share = np.array([(vals == g).mean() for g in grades])
            ax.bar(np.arange(len(grades)) + (j - (len(sources) - 1) / 2) * width, share,
                   width=width, color=colours[j % len(colours)], label=name)
            ns.append(f"{len(vals):,}")
        ax.set_xticks(np.arange(len(grades)))
        ax.set_xticklabels([str(g) for g in grades])
        ax.set_title(task.name, fontsize=9, loc="left")
        ax.set_xlabel("n = " + " / ".join(ns), fontsize=7.5, color="#5d6675", labelpad=2)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", color="#eeeeee")
        ax.set_axisbelow(True)
        ax.tick_params(labelsize=8)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    for ax in axes.ravel()[len(tasks):]:
        ax.axis("off")
    handles, names = [], []
    for ax in axes.ravel():
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="upper center", ncol=len(names), frameon=False, fontsize=9,
               bbox_to_anchor=(0.5, 1.0))
    for ax in axes[:, 0]:
        ax.set_ylabel("share of discs", fontsize=8.5)
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


# --------------------------------------------------------------------------- hotspots


def _hotspot_groups(paths: Sequence[str | Path] | None, limit: int) -> list[dict[str, Any]]:
    """Hotspot montages grouped by task, from names ``<scan_id>_<level>_<Task>.png`` (older
    ``<scan_id>_<level>.png`` montages were Pfirrmann's)."""
    groups: dict[str, list[dict[str, str]]] = {}
    for path in list(paths or []):
        stem = Path(path).stem
        parts = stem.rsplit("_", 2)
        if len(parts) == 3 and parts[2] in TASK_BY_NAME:
            task, name = parts[2], f"{parts[0]} {parts[1]}"
        else:
            task, name = "Pfirrmann", stem.replace("_", " ")
        items = groups.setdefault(task, [])
        if len(items) < limit:
            uri = _embed_file(path)
            if uri is not None:
                items.append({"name": name, "uri": uri})
    return [{"task": t, "items": groups[t]} for t in _task_order(groups) if groups[t]]


# --------------------------------------------------------------------------- provenance


def _provenance_rows(provenance: Mapping[str, Any] | None) -> tuple[list, list, list]:
    prov = dict(provenance or {})
    models = []
    raw = prov.pop("models", None)
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            models.append(("models", raw))
            raw = None
    if isinstance(raw, Mapping):
        models.extend((str(k), str(v)) for k, v in sorted(raw.items()))
    elif isinstance(raw, (list, tuple)):
        models.extend((str(i), str(v)) for i, v in enumerate(raw))
    rows = [(str(k), v if isinstance(v, str) else json.dumps(v, default=str))
            for k, v in prov.items()]
    env = [("python", platform.python_version()), ("numpy", np.__version__),
           ("pandas", pd.__version__), ("matplotlib", matplotlib.__version__),
           ("spinecohort (report)", __version__)]
    return rows, models, env


# --------------------------------------------------------------------------- entry point


def device_hours(scans: pd.DataFrame | None) -> list[dict[str, str]]:
    """Per stage and device, the scans and the hours of per-scan processing (the ``seconds_<stage>``
    of ``tables/scans.parquet``; model loading is not counted). A stage without a ``device_<stage>``
    column ran no network: its time is CPU time."""
    if scans is None or not len(scans):
        return []
    gpu = scans["gpu_model"].fillna("").astype(str) if "gpu_model" in scans else pd.Series("", index=scans.index)
    rows = []
    for column in [c for c in scans.columns if c.startswith("seconds_")]:
        stage = column.removeprefix("seconds_")
        seconds = pd.to_numeric(scans[column], errors="coerce")
        device = scans[f"device_{stage}"].fillna("").astype(str) if f"device_{stage}" in scans else pd.Series("cpu", index=scans.index)
        device = device.where(device != "", "cpu")
        label = device.where(~device.str.startswith("cuda") | (gpu == ""), device + " (" + gpu + ")")
        for name in sorted(label[seconds.notna()].unique()):
            mine = seconds[(label == name) & seconds.notna()]
            rows.append({"stage": stage, "device": name, "scans": str(len(mine)), "hours": f"{mine.sum() / 3600:.3f}"})
    return rows


def render_report(
    out_html: str | Path,
    *,
    scans: pd.DataFrame | None,
    discs: pd.DataFrame | None = None,
    agreement: pd.DataFrame | None = None,
    confusion: pd.DataFrame | None = None,
    labels: pd.DataFrame | None = None,
    provenance: Mapping[str, Any] | None = None,
    qc_images: Mapping[str, str | Path] | None = None,
    hotspot_images: Sequence[str | Path] | None = None,
    notes: Sequence[str] | None = None,
    warnings: Sequence[str] | None = None,
    morphometry: Mapping[str, Any] | None = None,
    title: str = "spinecohort validation report",
    max_thumbnails: int = 60,
    training: Sequence[Mapping[str, Any]] | None = None,
    reading_schemes: Mapping[str, Any] | None = None,
) -> Path:
    """Write the self-contained validation report to ``out_html`` (atomically) and return it.

    ``agreement``/``confusion`` are the tables of :func:`spinecohort.stats.compute_agreement`;
    ``None`` means no radiologist labels were configured, which the report states plainly.
    ``qc_images`` maps scan_id to a PNG/JPEG path; at most ``max_thumbnails`` are embedded.
    ``warnings``: counted input warnings (:func:`input_warnings`), listed in their own section.
    ``morphometry``: the morphometry/change sections' context
    (:func:`spinecohort.report.morphometry.morphometry_context`); None omits them.
    ``training``: what each model was trained on (:func:`spinecohort.shipped.training_records`);
    ``None`` derives it from the ``models`` provenance. ``reading_schemes``: the config's, to
    list how each labels column was read (``None``: the shipped defaults).
    """
    notes = [str(n) for n in (notes or [])]
    qc = []
    qc_items = list((qc_images or {}).items())
    for scan_id, path in qc_items[:max_thumbnails]:
        uri = _embed_file(path)
        if uri is None:
            notes.append(f"QC image for {scan_id} not found or not an image: {path}")
        else:
            qc.append({"scan_id": str(scan_id), "uri": uri})
    hotspots = _hotspot_groups(hotspot_images, max_thumbnails)
    if training is None:
        raw = (provenance or {}).get("models")
        try:
            models = json.loads(raw) if isinstance(raw, str) else dict(raw or {})
        except ValueError:
            models = {}
        from ..shipped import training_records

        training = training_records(models)

    agreement_ctx = None
    if agreement is not None and len(agreement):
        agreement_ctx = _agreement_context(agreement, confusion, provenance or {})
    prov_rows, models, env = _provenance_rows(provenance)
    context = {
        "title": title,
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "version": (provenance or {}).get("pipeline_version", __version__),
        "notes": notes,
        "summary": _cohort_summary(scans, discs),
        "device_hours": device_hours(scans),
        "failures": _failures(scans),
        "warnings": [str(w) for w in (warnings or [])],
        "labels_configured": agreement is not None,
        "agreement": agreement_ctx,
        "histograms": _grade_histograms(discs, labels),
        "qc": qc,
        "qc_total": len(qc_items),
        "hotspots": hotspots,
        "morphometry": morphometry,
        "hotspot_tasks": [g["task"] for g in hotspots],
        "training": _training_context(training),
        "flagged": flagged_level_scans(scans, qc_images),
        "label_columns": _label_columns(labels, discs, reading_schemes),
        "provenance": prov_rows,
        "models": models,
        "environment": env,
    }
    env_j = Environment(loader=FileSystemLoader(str(TEMPLATE_DIR)),
                        autoescape=select_autoescape(["html", "j2"]),
                        trim_blocks=True, lstrip_blocks=True)
    html = env_j.get_template(TEMPLATE).render(**context)
    out = Path(out_html)
    atomic_write_bytes(out, html.encode("utf-8"))
    return out
