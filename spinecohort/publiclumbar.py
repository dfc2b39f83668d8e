"""Loader for the public annotated lumbar MR cases (``../shared/data/public-lumbar``).

Each ``.npz`` holds ``image`` and ``mask`` as (rows, cols, slices), ``spacing_mm`` (row, col,
slice) and ``levels`` (JSON: mask id -> level name, vertebrae such as ``"L3"`` or discs such as
``"L4-L5"``). This module turns a case into the pipeline's conventions:

- ``volume`` float32 (slices, rows, cols), rows superior -> inferior, cols anterior -> posterior;
- one :class:`Structure` per annotated mask id (vertebra or disc) with a quadrilateral per
  sagittal slice where the structure is substantial, corners (row, col) ordered
  superior-anterior, superior-posterior, inferior-posterior, inferior-anterior (SA, SP, IP, IA),
  and its 3-D centroid (mean of its mask voxels, (slice, row, col)).

Split (fixed by the data README): case number divisible by 5 -> ``"val"``, else ``"train"``.
The data never enter the repository; tests skip when the folder is absent.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from .geometry import centroid_mid_slice, polygon_area, quad_centroid, side_of_line

__all__ = [
    "default_root",
    "CaseRef",
    "Structure",
    "PublicLumbarCase",
    "list_cases",
    "load_case",
    "split_of",
    "quad_from_mask",
    "vertebrae_from_discs",
    "annotated_extent_lines",
    "neighbour_bodies",
]

#: A slice's cross-section counts as substantial when its area is at least this fraction of the
#: structure's largest cross-section (and at least MIN_AREA_PX pixels).
SUBSTANTIAL_FRACTION = 0.35
MIN_AREA_PX = 20

_NAME_RE = re.compile(r"^(?P<kind>[a-z0-9]+?)_(?P<num>\d+)\.npz$")
_VERTEBRA_RE = re.compile(r"^(C|T|L|S)\d{1,2}$")
_DISC_RE = re.compile(r"^(C|T|L|S)\d{1,2}-(C|T|L|S)\d{1,2}$")


def default_root() -> Path:
    """``../shared/data/public-lumbar`` beside the repository (``$SPINECOHORT_PUBLIC_LUMBAR``
    overrides)."""
    env = os.environ.get("SPINECOHORT_PUBLIC_LUMBAR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "public-lumbar"


def split_of(number: int) -> str:
    """The README's fixed split: case number divisible by 5 is validation."""
    return "val" if number % 5 == 0 else "train"


@dataclass(frozen=True)
class CaseRef:
    path: Path
    name: str      # file stem, e.g. "vb3_05"
    source: str    # "vb3" (vertebral bodies annotated) or "ivd" (discs annotated)
    number: int
    split: str     # "train" | "val"


@dataclass
class Structure:
    """One annotated structure (vertebral body or disc)."""

    label: int
    level: str                      # "L3", "L4-L5", ...
    kind: str                       # "vertebra" | "disc"
    centroid: tuple[float, float, float]   # (slice, row, col): mean of its mask voxels
    polygons: dict[int, np.ndarray] = field(default_factory=dict)  # slice -> (4,2) (row, col)
    areas: dict[int, int] = field(default_factory=dict)            # slice -> mask pixels
    present_slices: tuple[int, ...] = ()   # every slice with any mask pixel (incl. small ones)
    derived: bool = False            # True when built from neighbouring structures, not a mask

    @property
    def mid_slice(self) -> int:
        """The slice nearest the 3-D centroid that has a polygon (else the rounded centroid)."""
        return centroid_mid_slice(self.polygons, self.centroid[0])


@dataclass
class PublicLumbarCase:
    name: str
    source: str
    number: int
    split: str
    volume: np.ndarray           # float32 (slices, rows, cols)
    mask: np.ndarray             # uint8 (slices, rows, cols)
    pixel_spacing_mm: tuple[float, float]
    slice_spacing_mm: float
    levels: dict[int, str]
    structures: list[Structure]

    @property
    def vertebrae(self) -> list[Structure]:
        return [s for s in self.structures if s.kind == "vertebra"]

    @property
    def discs(self) -> list[Structure]:
        return [s for s in self.structures if s.kind == "disc"]


def list_cases(root: str | os.PathLike | None = None, split: str | None = None,
               source: str | None = None) -> list[CaseRef]:
    """The cases under ``root`` (default :func:`default_root`), sorted by name; optionally only
    one split (``"train"``/``"val"``) and/or one source (``"vb3"``/``"ivd"``)."""
    root = Path(root) if root is not None else default_root()
    if not root.is_dir():
        raise FileNotFoundError(f"public-lumbar folder not found: {root}")
    refs = []
    for path in sorted(root.glob("*.npz")):
        m = _NAME_RE.match(path.name)
        if not m:
            continue
        num = int(m.group("num"))
        ref = CaseRef(path, path.stem, m.group("kind"), num, split_of(num))
        if split is not None and ref.split != split:
            continue
        if source is not None and ref.source != source:
            continue
        refs.append(ref)
    return refs


def _kind_of(level: str) -> str:
    if _DISC_RE.match(level):
        return "disc"
    if _VERTEBRA_RE.match(level):
        return "vertebra"
    raise ValueError(f"unrecognised level name {level!r}")


def _min_area_rect(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimal-area enclosing rectangle of 2-D points: (centre, axes (2,2) unit rows, half-sizes)."""
    pts = np.asarray(points, dtype=np.float64)
    try:
        hull = pts[ConvexHull(pts).vertices]
    except (QhullError, ValueError):
        hull = pts
    best = None
    edges = np.diff(np.vstack([hull, hull[:1]]), axis=0)
    angles = np.unique(np.mod(np.arctan2(edges[:, 1], edges[:, 0]), np.pi / 2).round(6))
    if angles.size == 0:
        angles = np.array([0.0])
    for a in angles:
        u = np.array([np.cos(a), np.sin(a)])
        v = np.array([-np.sin(a), np.cos(a)])
        pu, pv = hull @ u, hull @ v
        area = (pu.max() - pu.min()) * (pv.max() - pv.min())
        if best is None or area < best[0]:
            centre = u * (pu.max() + pu.min()) / 2 + v * (pv.max() + pv.min()) / 2
            best = (area, centre, np.stack([u, v]), np.array([(pu.max() - pu.min()) / 2,
                                                              (pv.max() - pv.min()) / 2]))
    _, centre, axes, half = best
    return centre, axes, half


def quad_from_mask(mask2d: np.ndarray, pad: float = 0.5) -> np.ndarray | None:
    """Four corners (SA, SP, IP, IA) of a 2-D binary region, as (row, col) float64.

    The minimal-area rectangle gives the body's axes: the one closer to the row direction is
    superior -> inferior, the other anterior -> posterior (cols). Each corner is the region's
    pixel furthest along that corner's diagonal (in units of the rectangle's half-sizes), so
    wedge-shaped bodies keep their shape; corners are pushed ``pad`` px outwards (pixel centre ->
    pixel edge). Returns None for an empty or degenerate region.
    """
    pts = np.argwhere(mask2d).astype(np.float64)
    if len(pts) < 3:
        return None
    centre, axes, half = _min_area_rect(pts)
    if np.any(half < 0.5):
        return None
    # axis 0 of the result points inferior (+rows), axis 1 points posterior (+cols)
    if abs(axes[0, 0]) >= abs(axes[1, 0]):
        u, v, hu, hv = axes[0], axes[1], half[0], half[1]
    else:
        u, v, hu, hv = axes[1], axes[0], half[1], half[0]
    if u[0] < 0:
        u = -u
    if v[1] < 0:
        v = -v
    rel = pts - centre
    a, b = rel @ u / hu, rel @ v / hv
    quad = np.empty((4, 2))
    for k, (su, sv) in enumerate(((-1, -1), (-1, 1), (1, 1), (1, -1))):  # SA, SP, IP, IA
        i = int(np.argmax(su * a + sv * b))
        quad[k] = pts[i] + pad * (su * u + sv * v)
    return quad


def _structure_from_mask(label: int, level: str, mask: np.ndarray) -> Structure | None:
    sel = mask == label
    if not sel.any():
        return None
    idx = np.argwhere(sel)
    centroid = tuple(float(x) for x in idx.mean(axis=0))
    areas_all = sel.reshape(sel.shape[0], -1).sum(axis=1)
    present = tuple(int(s) for s in np.nonzero(areas_all)[0])
    threshold = max(MIN_AREA_PX, SUBSTANTIAL_FRACTION * areas_all.max())
    polygons, areas = {}, {}
    for s in present:
        if areas_all[s] < threshold:
            continue
        region = sel[s]
        lab, n = ndimage.label(region)
        if n > 1:  # keep the largest connected piece
            sizes = ndimage.sum(region, lab, range(1, n + 1))
            region = lab == (int(np.argmax(sizes)) + 1)
        quad = quad_from_mask(region)
        if quad is not None:
            polygons[s] = quad
            areas[s] = int(areas_all[s])
    return Structure(label, level, _kind_of(level), centroid, polygons, areas, present)


def vertebrae_from_discs(discs: Iterable[Structure]) -> list[Structure]:
    """Vertebral bodies between consecutive annotated discs (e.g. L3 from L2-L3 and L3-L4).

    The body's superior corners are the upper disc's inferior corners and its inferior corners
    the lower disc's superior corners, on every slice where both discs have a polygon. Marked
    ``derived=True``; the centroid is the area-weighted mean of the quadrilaterals' centroids.
    """
    by_upper = {}
    for d in discs:
        if d.kind != "disc":
            continue
        upper, lower = d.level.split("-")
        by_upper[upper] = d
    out = []
    for d in discs:
        if d.kind != "disc":
            continue
        _, middle = d.level.split("-")
        below = by_upper.get(middle)
        if below is None:
            continue
        polys, areas = {}, {}
        for s in sorted(set(d.polygons) & set(below.polygons)):
            up, lo = d.polygons[s], below.polygons[s]
            quad = np.stack([up[3], up[2], lo[1], lo[0]])
            a = polygon_area(quad)
            if a <= 0:
                continue
            polys[s], areas[s] = quad, a
        if len(polys) == 0:
            continue
        w = np.array([areas[s] for s in polys])
        cen = np.array([polygon_centroid(polys[s]) for s in polys])
        sl = np.array(list(polys), dtype=float)
        centroid = (float((sl * w).sum() / w.sum()), float((cen[:, 0] * w).sum() / w.sum()),
                    float((cen[:, 1] * w).sum() / w.sum()))
        out.append(Structure(-1, middle, "vertebra", centroid, polys,
                             {s: int(round(a)) for s, a in areas.items()}, tuple(polys), True))
    return out


# area centroid of a simple polygon: the detector's own function
polygon_centroid = quad_centroid


def load_case(ref: CaseRef | str | os.PathLike, derive_vertebrae: bool = True) -> PublicLumbarCase:
    """Load one case. With ``derive_vertebrae`` a disc-annotated case also gets the vertebral
    bodies between consecutive discs (:func:`vertebrae_from_discs`)."""
    if not isinstance(ref, CaseRef):
        path = Path(ref)
        m = _NAME_RE.match(path.name)
        num = int(m.group("num")) if m else -1
        ref = CaseRef(path, path.stem, m.group("kind") if m else "unknown", num, split_of(num))
    with np.load(ref.path, allow_pickle=False) as data:
        image = np.ascontiguousarray(np.transpose(data["image"], (2, 0, 1)).astype(np.float32))
        mask = np.ascontiguousarray(np.transpose(data["mask"], (2, 0, 1)))
        spacing = [float(x) for x in data["spacing_mm"]]
        levels = {int(k): str(v) for k, v in json.loads(str(data["levels"])).items()}
    structures = []
    for label in sorted(levels):
        st = _structure_from_mask(label, levels[label], mask)
        if st is not None:
            structures.append(st)
    if derive_vertebrae:
        have = {s.level for s in structures if s.kind == "vertebra"}
        structures += [v for v in vertebrae_from_discs(structures) if v.level not in have]
    return PublicLumbarCase(ref.name, ref.source, ref.number, ref.split, image, mask,
                            (spacing[0], spacing[1]), spacing[2], levels, structures)


def annotated_extent_lines(structures: list[Structure], margin_px: float = 2.0
                           ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None:
    """The lines bounding the annotated part of the spine: the top annotated structure's
    superior edge (SA -> SP) moved ``margin_px`` up and the bottom one's inferior edge (IA -> IP)
    moved ``margin_px`` down, from their mid slices. Returns ((p0, p1) top, (p0, p1) bottom) as
    (row, col) points, or None when nothing is annotated. Use :func:`outside_annotated` to test
    points against them."""
    with_polys = [s for s in structures if s.polygons]
    if not with_polys:
        return None
    top = min(with_polys, key=lambda s: s.centroid[1])
    bottom = max(with_polys, key=lambda s: s.centroid[1])
    tq = top.polygons[top.mid_slice]
    bq = bottom.polygons[bottom.mid_slice]
    up = np.array([-margin_px, 0.0])
    return (tq[0] + up, tq[1] + up), (bq[3] - up, bq[2] - up)


def neighbour_bodies(case: PublicLumbarCase, detections, low: float = 0.6, high: float = 1.5
                     ) -> list[Structure]:
    """The visible but unannotated bodies right next to the annotated span, from a detector's
    output on the case: the detection right below the lowest annotated body becomes the next level
    down (S1 below L5) and the one right above the highest the next level up (T12 above L1, T10
    above T11), when its in-plane distance to that body is ``low``..``high`` times the median
    spacing of the annotated bodies (and it matches no annotated body).

    The README of the data says S1 lies directly below L5 (or the L5-S1 disc) in every case; this
    is how its position is taken from the images rather than guessed, so that training can
    supervise it (SpineNetV2 detects and labels S1). ``detections``: objects or dicts with
    ``polygons`` {slice: (4, 2)} and ``centroid`` (slice, row, col). Returned structures are
    ``derived=True`` with label -1.
    """
    from .tasks import LEVELS, LEVEL_INDEX

    sp = np.asarray(case.pixel_spacing_mm, float)
    verts = sorted((v for v in case.vertebrae if v.polygons and v.level in LEVEL_INDEX),
                   key=lambda v: -v.centroid[1])  # caudal first
    if len(verts) < 2:
        return []

    def get(d, key):
        return d[key] if isinstance(d, dict) else getattr(d, key)

    centres = np.array([[get(d, "centroid")[1], get(d, "centroid")[2]] for d in detections], float).reshape(-1, 2) * sp
    annotated = np.array([[v.centroid[1], v.centroid[2]] for v in verts]) * sp
    spacing = float(np.median(np.hypot(*np.diff(annotated, axis=0).T)))
    # detections that are an annotated body (nearer to it than half the spacing) are not neighbours
    taken = {j for j in range(len(centres))
             if len(annotated) and np.min(np.hypot(*(annotated - centres[j]).T)) < 0.5 * spacing}
    out = []
    for end, step in ((verts[0], -1), (verts[-1], +1)):
        lev = LEVEL_INDEX[end.level] + step
        if not 0 <= lev < len(LEVELS):
            continue
        ref = np.array([end.centroid[1], end.centroid[2]]) * sp
        cand = []
        for j, c in enumerate(centres):
            if j in taken:
                continue
            d = c - ref
            dist = float(np.hypot(*d))
            on_side = d[0] > 0 if step < 0 else d[0] < 0
            if on_side and low * spacing <= dist <= high * spacing:
                cand.append((dist, j))
        if not cand:
            continue
        j = min(cand)[1]
        polys = {int(k): np.asarray(q, float) for k, q in get(detections[j], "polygons").items()}
        if not polys:
            continue
        c = get(detections[j], "centroid")
        out.append(Structure(-1, LEVELS[lev], "vertebra", tuple(float(v) for v in c), polys,
                             {k: int(round(polygon_area(q))) for k, q in polys.items()}, tuple(sorted(polys)), True))
        taken.add(j)
    return out


def outside_annotated(points: np.ndarray, lines) -> np.ndarray:
    """True for (row, col) points above the top line or below the bottom line."""
    pts = np.atleast_2d(np.asarray(points, float))
    if lines is None:
        return np.zeros(len(pts), bool)
    (t0, t1), (b0, b1) = lines
    return (side_of_line(pts, t0, t1) < 0) | (side_of_line(pts, b0, b1) > 0)
