"""Quality-control picture per scan: the mid-sagittal slice with vertebrae, levels and disc boxes."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .ingest import Series  # noqa: E402
from .morphometry import true_cell  # noqa: E402
from .orientation import CanonicalView  # noqa: E402
from .provenance import atomic_write_bytes  # noqa: E402


def _mid_slice(series: Series, vertebrae: pd.DataFrame) -> int:
    if len(vertebrae) and "centroid_slice" in vertebrae:
        return int(round(float(np.median(vertebrae["centroid_slice"]))))
    return series.volume.shape[0] // 2


def _polygon_on(polygons, slice_index: int, view: CanonicalView) -> np.ndarray | None:
    """The polygon on stored slice ``slice_index``, else the one on the nearest slice, in ``view``."""
    if polygons is None or len(polygons) == 0:
        return None
    best = min(polygons, key=lambda p: abs(int(p["slice"]) - slice_index))
    return view.from_stored_quad(int(best["slice"]), best["corners"])[1]


def render_qc(series: Series, vertebrae: pd.DataFrame | None, discs: pd.DataFrame | None, path: str | Path,
              title: str = "") -> None:
    """Write the QC PNG. ``vertebrae``/``discs`` use the contract's table columns (stored grid; may
    be empty). Drawn in the networks' canonical view, head up and front left, however the series
    is stored, so a reviewer reads every scan the same way."""
    vertebrae = vertebrae if vertebrae is not None else pd.DataFrame()
    discs = discs if discs is not None else pd.DataFrame()
    view = CanonicalView.of(series)
    index = _mid_slice(series, vertebrae)
    view_index = int(round(view.from_stored_points([index, 0, 0])[0, 0]))
    image = view.volume[view_index]
    low, high = np.percentile(image, [1, 99.5])
    row_mm, col_mm = view.pixel_spacing_mm
    height = 5.0
    width = height * image.shape[1] * col_mm / (image.shape[0] * row_mm)
    figure, axis = plt.subplots(figsize=(max(width, 2.5), height), dpi=110)
    axis.imshow(image, cmap="gray", vmin=low, vmax=high if high > low else low + 1, aspect=row_mm / col_mm,
                interpolation="bilinear")
    for _, vertebra in vertebrae.iterrows():
        corners = _polygon_on(vertebra.get("polygons"), index, view)
        if corners is None:
            continue
        closed = np.vstack([corners, corners[:1]])
        # a body found only at the detector's lower threshold (a weak S1) is dotted: check it first
        weak = true_cell(vertebra.get("found_at_low_threshold"))
        axis.plot(closed[:, 1], closed[:, 0], color="#00e5ff", linewidth=1.0, linestyle=":" if weak else "-")
        label = vertebra.get("level")
        if isinstance(label, str) and label:
            axis.text(corners[:, 1].min() - 4 / col_mm, corners[:, 0].mean(), label, color="#ffeb3b",
                      fontsize=7, ha="right", va="center", fontweight="bold")
    for _, disc in discs.iterrows():
        box = disc.get("box_corners")
        if box is None or (isinstance(box, float) and np.isnan(box)):
            continue
        centre_slice = disc.get("centre_slice")
        box_slice = int(round(float(centre_slice))) if centre_slice is not None and np.isfinite(centre_slice) else index
        box = view.from_stored_quad(box_slice, box)[1]
        closed = np.vstack([box, box[:1]])
        axis.plot(closed[:, 1], closed[:, 0], color="#ff4081", linewidth=0.9, linestyle="--")
    axis.set_title(title or f"slice {index + 1}/{series.volume.shape[0]}", fontsize=8)  # the stored slice number
    axis.set_axis_off()
    figure.tight_layout(pad=0.2)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
