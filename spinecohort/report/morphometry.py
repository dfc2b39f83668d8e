"""The report's morphometry and change sections (context for ``templates/morphometry.html.j2``).

Per-level distributions of the landmark measures (box plots and median/IQR tables), the bodies
flagged by height loss (Genant grade >= 1) with a QC crop of the measured slice, lordosis, and for
longitudinal cohorts the change between consecutive visits per level.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..morphometry import polygons_of  # noqa: E402
from ..tasks import LEVEL_INDEX  # noqa: E402

BODY_MEASURES = (("height_anterior_mm", "Ha (mm)"), ("height_middle_mm", "Hm (mm)"),
                 ("height_posterior_mm", "Hp (mm)"), ("depth_mm", "depth (mm)"), ("wedge_ratio", "Ha/Hp"))
DISC_MEASURES = (("height_middle_mm", "middle height (mm)"), ("disc_height_index", "height index"),
                 ("endplate_angle_deg", "endplate angle (\u00b0)"), ("slip_mm", "slip (mm)"), ("slip_pct", "slip (%)"))
CHANGE_MEASURES = (("vertebra", "height_anterior_mm", "\u0394 Ha (mm)"), ("vertebra", "height_posterior_mm", "\u0394 Hp (mm)"),
                   ("vertebra", "height_loss", "\u0394 height loss"), ("disc", "height_middle_mm", "\u0394 disc height (mm)"),
                   ("disc", "disc_height_index", "\u0394 height index"), ("disc", "slip_mm", "\u0394 slip (mm)"))
MAX_CROPS = 40


def _level_key(level: str) -> tuple:
    """Cranial first: vertebrae by index, discs by their upper vertebra, between the vertebrae."""
    upper = level.split("-")[0]
    return (-LEVEL_INDEX.get(upper, -99), "-" in level, level)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(x: Any, digits: int = 1) -> str:
    return f"{x:.{digits}f}" if x is not None and np.isfinite(x) else "\u2014"


def _median_iqr(values: pd.Series, digits: int) -> str:
    v = pd.to_numeric(values, errors="coerce").dropna().to_numpy(dtype=float)
    if not len(v):
        return "\u2014"
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return f"{med:.{digits}f} ({q1:.{digits}f}\u2013{q3:.{digits}f})"


def _per_level(frame: pd.DataFrame, measures, digits=1) -> tuple[list[str], list[dict[str, Any]]]:
    levels = sorted(frame["level"].dropna().astype(str).unique(), key=_level_key)
    rows = []
    for level in levels:
        part = frame[frame["level"] == level]
        rows.append({"level": level, "n": len(part),
                     "cells": [_median_iqr(part[m], 2 if "ratio" in m or "index" in m else digits) for m, _ in measures]})
    return levels, rows


def _boxes(frame: pd.DataFrame, measures, title: str) -> str | None:
    levels = sorted(frame["level"].dropna().astype(str).unique(), key=_level_key)
    if not levels:
        return None
    fig, axes = plt.subplots(1, len(measures), figsize=(3.0 * len(measures), 0.32 * len(levels) + 1.4), sharey=True)
    for ax, (m, label) in zip(np.atleast_1d(axes), measures):
        data = [pd.to_numeric(frame.loc[frame["level"] == lv, m], errors="coerce").dropna().to_numpy() for lv in levels]
        keep = [i for i, d in enumerate(data) if len(d)]
        if keep:
            ax.boxplot([data[i] for i in keep], positions=keep, orientation="horizontal", widths=0.6, showfliers=True,
                       flierprops={"markersize": 2})
        ax.set_yticks(range(len(levels)), levels, fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    np.atleast_1d(axes)[0].invert_yaxis()  # shared y: cranial levels on top
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _png(fig)


def fracture_crop(series_file: Any, polygons: Any, slice_index: int, title: str, margin_mm: float = 25.0) -> str | None:
    """A PNG data URI: the measured slice around one body with its corner landmarks.
    ``series_file``: a stored series (path) or the :class:`~spinecohort.ingest.Series` itself."""
    from ..ingest import Series, load_series
    from ..orientation import CanonicalView

    if isinstance(series_file, Series):
        series = series_file
    else:
        path = Path(series_file)
        if not path.exists():
            return None
        series = load_series(path)
    polys = polygons_of(polygons)
    if slice_index not in polys or not 0 <= slice_index < series.volume.shape[0]:
        return None
    # drawn upright (the canonical view) whatever the stored orientation, as the QC pictures
    view = CanonicalView.of(series)
    view_slice, quad = view.from_stored_quad(slice_index, polys[slice_index])
    row_mm, col_mm = view.pixel_spacing_mm
    image = view.volume[view_slice]
    r0, c0 = np.floor(quad.min(0) - [margin_mm / row_mm, margin_mm / col_mm]).astype(int)
    r1, c1 = np.ceil(quad.max(0) + [margin_mm / row_mm, margin_mm / col_mm]).astype(int)
    r0, c0 = max(r0, 0), max(c0, 0)
    r1, c1 = min(r1, image.shape[0]), min(c1, image.shape[1])
    crop = image[r0:r1, c0:c1]
    if crop.size == 0:
        return None
    low, high = np.percentile(crop, [1, 99.5])
    fig, ax = plt.subplots(figsize=(2.4, 2.4 * crop.shape[0] * row_mm / max(crop.shape[1] * col_mm, 1e-6)))
    ax.imshow(crop, cmap="gray", vmin=low, vmax=high if high > low else low + 1, aspect=row_mm / col_mm)
    closed = np.vstack([quad, quad[:1]]) - [r0, c0]
    ax.plot(closed[:, 1], closed[:, 0], color="#ff4081", linewidth=1.0)
    ax.plot(closed[:4, 1], closed[:4, 0], "o", color="#ffeb3b", markersize=2.5)
    ax.set_title(title, fontsize=7)
    ax.set_axis_off()
    fig.tight_layout(pad=0.1)
    return _png(fig)


def morphometry_context(morphometry: pd.DataFrame | None, change: pd.DataFrame | None = None,
                        vertebrae: pd.DataFrame | None = None, series_dir: str | Path | None = None,
                        series_of: Any = None) -> dict[str, Any] | None:
    """Template context; None when the cohort has no morphometry rows. ``vertebrae`` and
    ``series_dir`` (the ingested series, ``work/series``) give the fracture crops; ``series_of``
    (scan_id -> Series), when given, is used instead (intermediates removed: the scan re-read)."""
    if morphometry is None or not len(morphometry):
        return None
    m = morphometry
    bodies, discs, scans = m[m["kind"] == "vertebra"], m[m["kind"] == "disc"], m[m["kind"] == "scan"]
    _, body_rows = _per_level(bodies, BODY_MEASURES)
    _, disc_rows = _per_level(discs, DISC_MEASURES)
    lordosis = pd.to_numeric(scans["lordosis_deg"], errors="coerce").dropna()
    flagged = bodies[bodies["morphometric_fracture"].fillna(False).astype(bool)].sort_values(
        ["genant_grade", "height_loss"], ascending=False)
    polys = {}
    if vertebrae is not None and len(vertebrae):
        polys = {(r.scan_id, int(r.vertebra_id)): r.polygons for r in vertebrae.itertuples(index=False)}
    fractures = []
    for i, r in enumerate(flagged.itertuples(index=False)):
        crop = None
        if i < MAX_CROPS and (series_dir is not None or series_of is not None) and pd.notna(r.slice) \
                and pd.notna(r.vertebra_id):
            key = (r.scan_id, int(r.vertebra_id))
            if key in polys:
                try:
                    source = series_of(r.scan_id) if series_of is not None else Path(series_dir) / f"{r.scan_id}.npz"
                    crop = None if source is None else fracture_crop(
                        source, polys[key], int(r.slice), f"{r.scan_id} {r.level} grade {int(r.genant_grade)}")
                except (OSError, ValueError, KeyError):  # a missing/odd series costs the crop only
                    crop = None
        fractures.append({"scan_id": r.scan_id, "level": r.level, "grade": int(r.genant_grade),
                          "kind": r.height_loss_kind, "loss": _fmt(100 * r.height_loss, 0),
                          "wedge": _fmt(r.wedge_ratio, 2), "crush": _fmt(r.crush_ratio, 2), "slice": int(r.slice),
                          "crop": crop})
    not_measured = scans[scans["lordosis_deg"].isna()]["note"].dropna().astype(str)
    context = {
        "n_scans": int(m["scan_id"].nunique()), "n_bodies": len(bodies), "n_discs": len(discs),
        "body_measures": [label for _, label in BODY_MEASURES], "body_rows": body_rows,
        "disc_measures": [label for _, label in DISC_MEASURES], "disc_rows": disc_rows,
        "body_plot": _boxes(bodies, BODY_MEASURES[:4], "vertebral bodies") if len(bodies) else None,
        "disc_plot": _boxes(discs, DISC_MEASURES[:3] + DISC_MEASURES[4:], "discs") if len(discs) else None,
        "lordosis": {"n": len(lordosis), "summary": _median_iqr(lordosis, 1),
                     "missing": not_measured.value_counts().head(5).items()},
        "meyerding": discs["meyerding_grade"].dropna().astype(int).value_counts().sort_index().items(),
        "fractures": fractures, "n_fractures": len(fractures), "max_crops": MAX_CROPS,
        "change": change_context(change),
    }
    return context


def change_context(change: pd.DataFrame | None) -> dict[str, Any] | None:
    """Per-level change between consecutive visits (mean and SD of the differences, n pairs)."""
    if change is None or not len(change):
        return None
    rows = []
    for level in sorted(change["level"].dropna().astype(str).unique(), key=_level_key):
        part = change[change["level"] == level]
        cells = []
        for kind, measure, _ in CHANGE_MEASURES:
            d = pd.to_numeric(part.loc[part["kind"] == kind, f"delta_{measure}"], errors="coerce").dropna()
            digits = 3 if "index" in measure or "loss" in measure else 1
            cells.append(f"{d.mean():+.{digits}f} \u00b1 {d.std(ddof=1) if len(d) > 1 else 0:.{digits}f}" if len(d) else "")
        rows.append({"level": level, "n": int(len(part)), "cells": cells})
    days = pd.to_numeric(change.drop_duplicates(["scan_id_from", "scan_id_to"])["interval_days"], errors="coerce").dropna()
    incident = change[change["incident_fracture"].fillna(False).astype(bool)]
    return {"n_subjects": int(change["subject_id"].nunique()),
            "n_pairs": int(change[["scan_id_from", "scan_id_to"]].drop_duplicates().shape[0]),
            "interval": _median_iqr(days, 0) if len(days) else None,
            "measures": [label for _, _, label in CHANGE_MEASURES], "rows": rows,
            "incident": [{"subject_id": r.subject_id, "level": r.level, "visits": f"{r.visit_from} \u2192 {r.visit_to}",
                          "grades": f"{r.genant_grade_from} \u2192 {r.genant_grade_to}"} for r in incident.itertuples(index=False)]}
