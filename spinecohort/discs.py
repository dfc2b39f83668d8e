"""Intervertebral volumes (IVVs): the disc-centred crops the grading network reads.

Recipe (SpineNetV2, Windsor et al. 2022; the official ``get_ivd_vol`` facts in
``spinenet-official-checkpoints.json``), for every disc of the configured list whose two
vertebrae are labelled:

* **centre**: midpoint of the two vertebral-body centroids (slice, row, col);
* **orientation**: the box is rotated so that the *upper* vertebra's inferior endplate (its
  inferior-anterior -> inferior-posterior edge on its mid slice) is horizontal, anterior on the
  left, head at the top;
* **size**: width twice the wider of the two bodies (body width = extent of its mid-slice corners
  along the endplate direction), height half the width (2:1 aspect);
* **slices**: 9 native slices centred on the mid slice (``round`` of the centroids' mean slice);
  slices outside those where either vertebra is detected, or outside the volume, are zero
  (``slices`` entry ``-1``);
* **resampling**: cubic B-spline interpolation onto a 112 x 224 grid per slice (pixel centres
  at ``((j + 0.5) / 224 - 0.5) * width`` along the endplate and ``((i + 0.5) / 112 - 0.5) *
  height`` across it), geometry in millimetres so non-square pixels are handled;
* **intensity**: each slice is scaled so that the median of the source voxels inside the two
  vertebral bodies on that slice is 0.5 (a slice without body outlines uses the nearest slice
  that has them), then clipped to [0, 1]. (The official network instead saw values clipped at
  twice the median and halved; :meth:`spinecohort.grade.Grader.official` converts.)

Array layout: ``volume[k, i, j]`` = (IVV slice, row, col), rows head -> feet, cols front -> back,
slices toward patient left, i.e. the canonical view of the input volume.

Coordinates: ``IVV.to_source`` / ``IVV.to_ivv`` map (k, i, j) <-> (slice, row, col) of the source
grid, which is how hotspots and QC boxes go back to the scan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from matplotlib.path import Path as _MplPath
from scipy import ndimage

from .provenance import atomic_output
from .tasks import DEFAULT_GRADED_DISCS, LEVEL_INDEX, LEVELS, disc_name

__all__ = [
    "IVV",
    "IVV_SHAPE",
    "N_SLICES",
    "extract_ivvs",
    "extract_ivv",
    "estimated_s1",
    "estimated_upper",
    "vertebrae_from_synthetic",
    "polygon_mask",
    "save_ivvs",
    "load_ivvs",
]

N_SLICES = 9
ROWS, COLS = 112, 224
IVV_SHAPE = (N_SLICES, ROWS, COLS)
MEDIAN_TARGET = 0.5
#: Box width over the wider vertebral body's width (SpineNetV2: the body plus 50 % each side).
WIDTH_FACTOR = 2.0
ASPECT = 2.0  # width / height


@dataclass
class IVV:
    """One intervertebral volume and the geometry that maps it back to the source scan."""

    level: str  # disc name, cranial vertebra first ('L5-S1')
    upper: str
    lower: str
    volume: np.ndarray  # float32 (9, 112, 224) (slices, rows, cols)
    centre: tuple[float, float, float]  # (slice, row, col) in the source grid
    angle_rad: float  # direction of the box's +col axis: atan2(d_row_mm, d_col_mm) of IA -> IP
    width_px: float  # box width in source pixels (geometric-mean spacing if not square)
    height_px: float
    box_corners: np.ndarray  # (4, 2) (row, col) on the mid slice: SA, SP, IP, IA of the box
    slices: list[int]  # source slice per IVV slice, -1 = zero padding
    mid_slice: int = 0  # source slice at IVV slice 4
    width_mm: float = 0.0
    height_mm: float = 0.0
    pixel_spacing_mm: tuple[float, float] = (1.0, 1.0)
    upper_id: int | None = None  # vertebra ids when the input dicts carry them
    lower_id: int | None = None
    medians: list[float] = field(default_factory=list)  # source intensity scaled to 0.5, per slice
    lower_estimated: bool = False  # the lower body was not detected: placed by :func:`estimated_s1`
    upper_estimated: bool = False  # the upper body was not found: placed by :func:`estimated_upper`

    # ------------------------------------------------------------------ coordinates
    def _axes_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c, s = math.cos(self.angle_rad), math.sin(self.angle_rad)
        e_h = np.array([s, c])  # along the endplate (toward posterior), (row, col) mm
        e_v = np.array([c, -s])  # across it (toward the feet)
        sp = np.asarray(self.pixel_spacing_mm, float)
        return e_h, e_v, sp

    def to_source(self, points: Sequence[float] | np.ndarray) -> np.ndarray:
        """(n, 3) IVV coordinates (k, i, j) -> (slice, row, col) of the source grid.

        ``k`` maps to ``mid_slice + k - 4`` (slices are native, not resampled).
        """
        p = np.asarray(points, float).reshape(-1, 3)
        e_h, e_v, sp = self._axes_mm()
        u = ((p[:, 2] + 0.5) / COLS - 0.5) * self.width_mm
        v = ((p[:, 1] + 0.5) / ROWS - 0.5) * self.height_mm
        centre_mm = np.asarray(self.centre[1:], float) * sp
        mm = centre_mm[None] + u[:, None] * e_h[None] + v[:, None] * e_v[None]
        out = np.empty_like(p)
        out[:, 0] = self.mid_slice + p[:, 0] - N_SLICES // 2
        out[:, 1:] = mm / sp[None]
        return out

    def to_ivv(self, points: Sequence[float] | np.ndarray) -> np.ndarray:
        """(n, 3) source (slice, row, col) -> IVV (k, i, j); the inverse of :meth:`to_source`."""
        p = np.asarray(points, float).reshape(-1, 3)
        e_h, e_v, sp = self._axes_mm()
        d = p[:, 1:] * sp[None] - np.asarray(self.centre[1:], float)[None] * sp[None]
        u = d @ e_h
        v = d @ e_v
        out = np.empty_like(p)
        out[:, 0] = p[:, 0] - self.mid_slice + N_SLICES // 2
        out[:, 1] = (v / self.height_mm + 0.5) * ROWS - 0.5
        out[:, 2] = (u / self.width_mm + 0.5) * COLS - 0.5
        return out

    def geometry(self) -> dict[str, Any]:
        """Everything but the voxels (JSON-friendly)."""
        return {
            "level": self.level, "upper": self.upper, "lower": self.lower,
            "centre": [float(v) for v in self.centre], "angle_rad": float(self.angle_rad),
            "width_px": float(self.width_px), "height_px": float(self.height_px),
            "width_mm": float(self.width_mm), "height_mm": float(self.height_mm),
            "box_corners": np.asarray(self.box_corners, float).tolist(),
            "slices": [int(s) for s in self.slices], "mid_slice": int(self.mid_slice),
            "pixel_spacing_mm": [float(v) for v in self.pixel_spacing_mm],
            "upper_id": self.upper_id, "lower_id": self.lower_id, "lower_estimated": bool(self.lower_estimated),
            "upper_estimated": bool(self.upper_estimated),
        }


# ----------------------------------------------------------------------------- helpers
def _get(v: Any, key: str, default: Any = None) -> Any:
    if isinstance(v, Mapping):
        return v.get(key, default)
    return getattr(v, key, default)


def vertebrae_from_synthetic(scan: Any) -> list[dict]:
    """Truth vertebrae of a :class:`~spinecohort.synthetic.SyntheticScan` as extraction input."""
    return [{"vertebra_id": i, "level": v.level, "polygons": dict(v.polygons), "centroid": tuple(v.centroid)}
            for i, v in enumerate(scan.vertebrae)]


def polygon_mask(poly: np.ndarray, shape: tuple[int, int]) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Pixels whose centres lie inside the (row, col) polygon: (bounding-box slices, bool mask)."""
    poly = np.asarray(poly, float).reshape(-1, 2)
    r0 = max(int(math.floor(poly[:, 0].min())), 0)
    r1 = min(int(math.ceil(poly[:, 0].max())) + 1, shape[0])
    c0 = max(int(math.floor(poly[:, 1].min())), 0)
    c1 = min(int(math.ceil(poly[:, 1].max())) + 1, shape[1])
    if r0 >= r1 or c0 >= c1:
        return None
    rr, cc = np.mgrid[r0:r1, c0:c1]
    pts = np.column_stack([rr.ravel(), cc.ravel()]).astype(float)
    inside = _MplPath(poly).contains_points(pts, radius=1e-9).reshape(rr.shape)
    return (slice(r0, r1), slice(c0, c1)), inside


def _mid_slice_of(polygons: Mapping[int, np.ndarray]) -> int:
    keys = sorted(int(k) for k in polygons)
    return int(round(float(np.median(keys))))


def _poly_near(polygons: Mapping[int, np.ndarray], s: float) -> np.ndarray:
    keys = sorted(int(k) for k in polygons)
    best = min(keys, key=lambda k: (abs(k - s), k))
    return np.asarray(polygons[best], float).reshape(4, 2)


def _spacing(pixel_spacing_mm: tuple[float, float] | float) -> np.ndarray:
    """(row, col) mm per pixel; a scalar means square pixels."""
    if np.isscalar(pixel_spacing_mm):
        pixel_spacing_mm = (float(pixel_spacing_mm), float(pixel_spacing_mm))
    return np.asarray(pixel_spacing_mm, float).reshape(2)


def _norm_polygons(polys: Mapping[Any, Any]) -> dict[int, np.ndarray]:
    return {int(k): np.asarray(v, float).reshape(4, 2) for k, v in polys.items()}


def _centroid(v: Any, polygons: Mapping[int, np.ndarray]) -> np.ndarray:
    """The vertebra's centroid, or (without one) the mean slice and mean corner of its outlines."""
    c = _get(v, "centroid")
    if c is not None:
        c = np.asarray(c, float).reshape(-1)
        if c.size == 3 and np.all(np.isfinite(c)):
            return c
    keys = sorted(polygons)
    corners = np.concatenate([polygons[k] for k in keys])
    return np.array([float(np.mean(keys)), *corners.mean(0)])


def _slice_median(volume: np.ndarray, s: int, polys: list[np.ndarray]) -> float | None:
    vals = []
    img = volume[s]
    for p in polys:
        got = polygon_mask(p, img.shape)
        if got is None:
            continue
        sl, m = got
        if m.any():
            vals.append(np.asarray(img[sl][m], np.float64))
    if not vals:
        return None
    med = float(np.median(np.concatenate(vals)))
    return med if med > 0 else None


# ----------------------------------------------------------------------------- extraction
def extract_ivv(volume: np.ndarray, pixel_spacing_mm: tuple[float, float] | float, upper: Any, lower: Any,
                level: str | None = None) -> IVV:
    """The IVV between two vertebrae (dicts or objects with ``level``, ``polygons``, ``centroid``)."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be (slices, rows, cols), got shape {volume.shape}")
    sp = _spacing(pixel_spacing_mm)
    n_sl, n_rows, n_cols = volume.shape
    pu, pl = _norm_polygons(_get(upper, "polygons")), _norm_polygons(_get(lower, "polygons"))
    if not pu or not pl:
        raise ValueError("both vertebrae need at least one polygon")
    lower_estimated = bool(_get(lower, "estimated", False))
    upper_estimated = bool(_get(upper, "estimated", False))
    # an estimated outline is a guess of where the body is: it sets the box, not the intensity scale
    pl_for_scale = {} if lower_estimated else pl
    pu_for_scale = {} if upper_estimated else pu
    cu, cl = _centroid(upper, pu), _centroid(lower, pl)
    centre = (cu + cl) / 2.0

    # orientation from the upper body's inferior endplate (IA -> IP) on its mid slice
    up_mid = _mid_slice_of(pu)
    poly_u = _poly_near(pu, up_mid)
    poly_l = _poly_near(pl, _mid_slice_of(pl))
    d = (poly_u[2] - poly_u[3]) * sp
    if not np.all(np.isfinite(d)) or np.hypot(*d) < 1e-6:
        d = np.array([0.0, 1.0])
    angle = math.atan2(d[0], d[1])
    c, s = math.cos(angle), math.sin(angle)
    e_h, e_v = np.array([s, c]), np.array([c, -s])

    # size: twice the wider body along the endplate direction
    widths = [float(np.ptp((p * sp) @ e_h)) for p in (poly_u, poly_l)]
    width_mm = WIDTH_FACTOR * max(max(widths), 1e-3)
    height_mm = width_mm / ASPECT

    # slices: 9 native slices on the mid slice, within the detected range and the volume
    mid = int(round(float(centre[0])))
    detected = sorted(set(pu) | set(pl))
    lo_s, hi_s = max(detected[0], 0), min(detected[-1], n_sl - 1)
    mid = int(min(max(mid, lo_s), hi_s)) if lo_s <= hi_s else mid
    src = [mid + k - N_SLICES // 2 for k in range(N_SLICES)]
    src = [s_ if lo_s <= s_ <= hi_s else -1 for s_ in src]

    # sample grid (mm -> source px)
    u = ((np.arange(COLS) + 0.5) / COLS - 0.5) * width_mm
    v = ((np.arange(ROWS) + 0.5) / ROWS - 0.5) * height_mm
    cmm = centre[1:] * sp
    grid_r = (cmm[0] + v[:, None] * e_v[0] + u[None, :] * e_h[0]) / sp[0]
    grid_c = (cmm[1] + v[:, None] * e_v[1] + u[None, :] * e_h[1]) / sp[1]
    inside = (grid_r >= -0.5) & (grid_r <= n_rows - 0.5) & (grid_c >= -0.5) & (grid_c <= n_cols - 0.5)
    margin = 4
    r0 = max(int(math.floor(grid_r.min())) - margin, 0)
    r1 = min(int(math.ceil(grid_r.max())) + margin + 1, n_rows)
    c0 = max(int(math.floor(grid_c.min())) - margin, 0)
    c1 = min(int(math.ceil(grid_c.max())) + margin + 1, n_cols)

    # per-slice medians of the two bodies (nearest slice with outlines when a slice has none)
    medians: dict[int, float] = {}
    for s_ in src:
        if s_ < 0:
            continue
        polys = [p[s_] for p in (pu_for_scale, pl_for_scale) if s_ in p]
        m = _slice_median(volume, s_, polys) if polys else None
        if m is not None:
            medians[s_] = m
    if not medians:  # no outline on the used slices: nearest slices with outlines
        for s_ in sorted(detected, key=lambda k: abs(k - mid)):
            if 0 <= s_ < n_sl:
                m = _slice_median(volume, s_, [p[s_] for p in (pu_for_scale, pl_for_scale) if s_ in p])
                if m is not None:
                    medians[s_] = m
                    break

    out = np.zeros(IVV_SHAPE, np.float32)
    used_medians: list[float] = []
    for k, s_ in enumerate(src):
        if s_ < 0:
            used_medians.append(float("nan"))
            continue
        if medians:
            key = min(medians, key=lambda m_: (abs(m_ - s_), m_))
            med = medians[key]
        else:  # no body outline anywhere in range: the volume's median of non-zero voxels
            nz = volume[volume > 0]
            med = float(np.median(nz)) if nz.size else 1.0
            medians[s_] = med
        used_medians.append(med)
        if r0 >= r1 or c0 >= c1:
            continue
        crop = np.asarray(volume[s_, r0:r1, c0:c1], np.float64)
        vals = ndimage.map_coordinates(crop, [grid_r - r0, grid_c - c0], order=3, mode="nearest", prefilter=True)
        vals = np.where(inside, vals, 0.0) * (MEDIAN_TARGET / med)
        out[k] = np.clip(vals, 0.0, 1.0)

    corners_mm = np.array([
        cmm - e_v * height_mm / 2 - e_h * width_mm / 2,  # superior-anterior
        cmm - e_v * height_mm / 2 + e_h * width_mm / 2,  # superior-posterior
        cmm + e_v * height_mm / 2 + e_h * width_mm / 2,  # inferior-posterior
        cmm + e_v * height_mm / 2 - e_h * width_mm / 2,  # inferior-anterior
    ])
    px = math.sqrt(float(sp[0] * sp[1]))
    up_name, lo_name = str(_get(upper, "level")), str(_get(lower, "level"))
    uid, lid = _get(upper, "vertebra_id"), _get(lower, "vertebra_id")
    return IVV(
        level=level or disc_name(up_name, lo_name), upper=up_name, lower=lo_name, volume=out,
        centre=(float(centre[0]), float(centre[1]), float(centre[2])), angle_rad=float(angle),
        width_px=width_mm / px, height_px=height_mm / px, box_corners=corners_mm / sp[None],
        slices=[int(s_) for s_ in src], mid_slice=int(mid), width_mm=float(width_mm), height_mm=float(height_mm),
        pixel_spacing_mm=(float(sp[0]), float(sp[1])),
        upper_id=None if uid is None else int(uid), lower_id=None if lid is None else int(lid),
        medians=used_medians, lower_estimated=lower_estimated, upper_estimated=upper_estimated,
    )


def extract_ivvs(volume: np.ndarray, pixel_spacing_mm: tuple[float, float] | float, vertebrae: Iterable[Any],
                 levels: Sequence[str] = DEFAULT_GRADED_DISCS) -> list[IVV]:
    """IVVs of every disc in ``levels`` whose two vertebrae are labelled, caudal first; L5-S1 also
    when L5 is the lowest labelled body and the sacrum's place is in the image (:func:`estimated_s1`,
    also used for an S1 marked ``found_at_low_threshold`` whose place is in the image),
    and the disc above the topmost labelled body when the place of the body above it is in the
    image (:func:`estimated_upper`).

    ``vertebrae``: dicts (or objects) with ``level`` (None = unlabelled, skipped), ``polygons``
    {slice: (4, 2) (row, col) SA, SP, IP, IA} and ``centroid`` (slice, row, col), optionally
    ``vertebra_id``; canonical view (see the module docstring). A level that occurs twice uses
    its first vertebra.
    """
    by_level: dict[str, Any] = {}
    for v in vertebrae:
        lvl = _get(v, "level")
        if lvl is None or (isinstance(lvl, float) and math.isnan(lvl)):
            continue
        lvl = str(lvl)
        if lvl in by_level or not _get(v, "polygons"):
            continue
        by_level[lvl] = v
    wanted = set(levels)
    below_l5 = {"S1", "L6"}  # a body labelled below L5 (L6: six lumbar vertebrae) is not S1's place
    # an S1 found only at the detector's lower threshold names the levels, but its outline is a weak
    # decoding: L5's geometry places the box as when the sacrum is not detected at all
    weak_s1 = "S1" in by_level and bool(_get(by_level["S1"], "found_at_low_threshold", False))
    if "L5-S1" in wanted and "L5" in by_level and (weak_s1 or not below_l5 & set(by_level)):
        s1 = estimated_s1(np.shape(volume), pixel_spacing_mm, by_level["L5"], by_level.get("L4"))
        if s1 is not None:
            by_level["S1"] = s1
    standard = [lvl for lvl in by_level if lvl in LEVELS]
    if standard and not {"T13", "L6"} & set(by_level):  # a transitional count: the name above is unsure
        top = max(standard, key=LEVEL_INDEX.get)
        i_top = LEVEL_INDEX[top]
        if i_top + 1 < len(LEVELS) and disc_name(LEVELS[i_top + 1], top) in wanted:
            below = by_level.get(LEVELS[i_top - 1]) if i_top > 0 else None
            upper = estimated_upper(np.shape(volume), pixel_spacing_mm, by_level[top], LEVELS[i_top + 1], below)
            if upper is not None:
                by_level[LEVELS[i_top + 1]] = upper
    order = list(LEVELS) + ["S2"]
    out = []
    for i in range(len(order) - 1):
        lower_name, upper_name = order[i], order[i + 1]
        if upper_name == "S2":
            continue
        name = disc_name(upper_name, lower_name)
        if name not in wanted or upper_name not in by_level or lower_name not in by_level:
            continue
        out.append(extract_ivv(volume, pixel_spacing_mm, by_level[upper_name], by_level[lower_name], name))
    return out


def _body_axis_and_disc(body: Any, pixel_spacing_mm: tuple[float, float] | float, neighbour: Any,
                        neighbour_above: bool) -> tuple[dict, np.ndarray, np.ndarray, float, float] | None:
    """A body's outlines ({slice: (4, 2)}), the (row, col) spacing, its unit axis (superior ->
    inferior endplate midpoints on its mid slice, mm), its height and the disc height to use next to
    it: the gap to ``neighbour`` (the body above it when ``neighbour_above``, else below) clamped to
    15-50 % of the body height, else 30 %. None without a usable outline."""
    polys = _norm_polygons(_get(body, "polygons") or {})
    if not polys:
        return None
    sp = _spacing(pixel_spacing_mm)
    poly = _poly_near(polys, _mid_slice_of(polys)) * sp
    top, bottom = (poly[0] + poly[1]) / 2, (poly[2] + poly[3]) / 2
    axis = bottom - top
    body_mm = float(np.hypot(*axis))
    if not np.isfinite(body_mm) or body_mm < 1e-3:
        return None
    axis = axis / body_mm
    disc_mm = 0.3 * body_mm
    other = _norm_polygons(_get(neighbour, "polygons") or {}) if neighbour is not None else {}
    if other:
        a = _poly_near(other, _mid_slice_of(other)) * sp
        gap = float(np.dot(top - (a[2] + a[3]) / 2, axis)) if neighbour_above else \
            float(np.dot((a[0] + a[1]) / 2 - bottom, axis))
        if np.isfinite(gap):
            disc_mm = float(np.clip(gap, 0.15 * body_mm, 0.5 * body_mm))
    return polys, sp, axis, body_mm, disc_mm


def _inside(volume_shape: Sequence[int], centroid: np.ndarray) -> bool:
    rows, cols = int(volume_shape[-2]), int(volume_shape[-1])
    return bool(0 <= centroid[1] <= rows - 1 and 0 <= centroid[2] <= cols - 1)


def estimated_s1(volume_shape: Sequence[int], pixel_spacing_mm: tuple[float, float] | float, l5: Any,
                 l4: Any = None) -> dict | None:
    """Where S1 lies when L5 is labelled but the sacrum was not detected, or None when that place
    is outside the image.

    Why: the top of the sacrum is the body the detector misses most on scans unlike its training
    data (on SPIDER's single mid-sagittal slices about one series in four), and without it the
    L5-S1 disc, the one most often degenerate, would go ungraded although it is in view. The
    grading box needs only the disc centre, L5's endplate and a body width, so S1's outline is
    taken as L5's moved caudally along L5's own axis (superior -> inferior endplate midpoints, on
    every slice) by one L5 body height plus one disc height: the L4-L5 disc's when L4 is given
    (clamped to 15-50 % of the body height), else 30 % of it. The result is marked ``estimated``:
    :func:`extract_ivv` then scales intensities by L5 alone, and the disc's row says so.
    """
    geometry = _body_axis_and_disc(l5, pixel_spacing_mm, l4, neighbour_above=True)
    if geometry is None:
        return None
    pu, sp, axis, body_mm, disc_mm = geometry
    shift_px = axis * (body_mm + disc_mm) / sp
    centroid = _centroid(l5, pu) + np.array([0.0, *shift_px])
    if not _inside(volume_shape, centroid):
        return None  # the sacrum's place is cut off by the image edge: nothing to grade there
    return {"level": "S1", "vertebra_id": None, "estimated": True, "centroid": centroid,
            "polygons": {k: p + shift_px[None] for k, p in pu.items()}}


def estimated_upper(volume_shape: Sequence[int], pixel_spacing_mm: tuple[float, float] | float, body: Any,
                    level: str, below: Any = None) -> dict | None:
    """Where the vertebra above the topmost labelled ``body`` lies (named ``level``), or None when
    the disc between them is not in view (the estimated inferior endplate outside the image).

    Why: the disc above the topmost labelled body is often in view while the body above it is not
    found (at the top of the image, cut or unlabelled): on SPIDER's slices 184 of the 349 reader-
    graded discs without an IVV were such top discs (T12-L1 ... T9-T10). The grading box needs the
    disc centre, an endplate and a width, so the body above is taken as a parallelogram one body
    height tall whose inferior endplate lies one disc height (the gap to ``below``, the body under
    ``body``, clamped to 15-50 % of the body height, else 30 %) above ``body``'s superior endplate
    and parallel to it, on every slice. Marked ``estimated``: :func:`extract_ivv` then scales
    intensities by ``body`` alone, and the disc's row says so (``upper_vertebra_estimated``)."""
    geometry = _body_axis_and_disc(body, pixel_spacing_mm, below, neighbour_above=False)
    if geometry is None:
        return None
    pl, sp, axis, body_mm, disc_mm = geometry
    step_disc, step_body = axis * disc_mm / sp, axis * (disc_mm + body_mm) / sp
    polygons = {k: np.stack([q[0] - step_body, q[1] - step_body, q[1] - step_disc, q[0] - step_disc])
                for k, q in pl.items()}
    centroid = _centroid(body, pl) - np.array([0.0, *step_body])
    # the disc must be in view, the body above it need not: its inferior endplate inside the image
    endplate = _centroid(body, pl) - np.array([0.0, *(axis * (disc_mm + body_mm / 2) / sp)])
    if not _inside(volume_shape, endplate):
        return None
    return {"level": level, "vertebra_id": None, "estimated": True, "centroid": centroid, "polygons": polygons}


# ----------------------------------------------------------------------------- storage
def save_ivvs(path: str | Path, ivvs: Sequence[IVV]) -> Path:
    """One scan's IVVs as ``.npz``: ``volumes`` (n, 9, 112, 224) float16, ``levels`` (n,) str, and
    the geometry (``centres`` (n, 3), ``angles``, ``widths_px``, ``heights_px``, ``widths_mm``,
    ``heights_mm``, ``box_corners`` (n, 4, 2), ``slices`` (n, 9), ``mid_slices``, ``upper``,
    ``lower``, ``pixel_spacing_mm`` (n, 2))."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(ivvs)
    arrays = {
        "volumes": np.stack([v.volume for v in ivvs]).astype(np.float16) if n else np.zeros((0, *IVV_SHAPE), np.float16),
        "levels": np.array([v.level for v in ivvs], dtype=str),
        "upper": np.array([v.upper for v in ivvs], dtype=str),
        "lower": np.array([v.lower for v in ivvs], dtype=str),
        "centres": np.array([v.centre for v in ivvs], float).reshape(n, 3),
        "angles": np.array([v.angle_rad for v in ivvs], float),
        "widths_px": np.array([v.width_px for v in ivvs], float),
        "heights_px": np.array([v.height_px for v in ivvs], float),
        "widths_mm": np.array([v.width_mm for v in ivvs], float),
        "heights_mm": np.array([v.height_mm for v in ivvs], float),
        "box_corners": np.array([v.box_corners for v in ivvs], float).reshape(n, 4, 2),
        "slices": np.array([v.slices for v in ivvs], np.int64).reshape(n, N_SLICES),
        "mid_slices": np.array([v.mid_slice for v in ivvs], np.int64),
        "pixel_spacing_mm": np.array([v.pixel_spacing_mm for v in ivvs], float).reshape(n, 2),
    }
    with atomic_output(path) as handle:
        np.savez_compressed(handle, **arrays)
    return path


def load_ivvs(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """(volumes (n, 9, 112, 224) float16, levels) from a file written by :func:`save_ivvs` (or any
    ``.npz`` with those two arrays)."""
    with np.load(path, allow_pickle=False) as z:
        return z["volumes"], [str(s) for s in z["levels"]]
