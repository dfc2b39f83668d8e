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

The agreement section is assembled in :mod:`.agreement`; number formatting, figures as data URIs
and the report's task/level order are shared from :mod:`.formatting`.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import platform
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from jinja2 import Environment, FileSystemLoader, select_autoescape  # noqa: E402

from .. import __version__  # noqa: E402
from ..provenance import atomic_write_bytes  # noqa: E402
from ..tasks import TASK_BY_NAME, TASKS  # noqa: E402
from .agreement import _agreement_context  # noqa: E402
from .formatting import READER_COLOURS, _count, _embed_file, _level_order, _png, _task_order, fmt  # noqa: E402

TEMPLATE_DIR = Path(__file__).parent.parent / "templates"  # spinecohort/templates
TEMPLATE = "validation.html.j2"

TEXT_FIELDS = ("scan_id", "failed_stage", "error")
ACQUISITION_COLUMNS = (
    ("n_slices", "slices"), ("rows", "rows"), ("cols", "columns"),
    ("pixel_spacing_mm", "pixel spacing (mm)"), ("slice_spacing_mm", "slice spacing (mm)"),
    ("fov", "field of view"), ("n_vertebrae", "vertebrae detected"),
    ("n_discs", "discs graded"), ("grading_slices", "slices per disc volume graded"),
)


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


# --------------------------------------------------------------------------- grade distributions


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
