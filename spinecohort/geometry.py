"""Geometry of vertebral-body polygons, shared by detection, labelling, morphometry, training and
evaluation.

A polygon is a (4, 2) array of (row, col) pixel corners ordered superior-anterior,
superior-posterior, inferior-posterior, inferior-anterior; a body is a dict slice -> polygon.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "signed_area",
    "polygon_area",
    "quad_centroid",
    "is_valid_quad",
    "point_in_quad",
    "outside_image",
    "polygon_iou",
    "side_of_line",
    "nearest_polygon_slice",
    "mid_slice",
    "centroid_mid_slice",
    "jitter_polygons",
]


# ---------------------------------------------------------------------------------------------
# one polygon
# ---------------------------------------------------------------------------------------------
def signed_area(poly: np.ndarray) -> float:
    """Shoelace area of a polygon, negative for corners in the standard (SA, SP, IP, IA) order
    with rows down and cols anterior -> posterior, positive when mirrored."""
    p = np.asarray(poly, dtype=np.float64)
    x, y = p[:, 0], p[:, 1]
    return float((np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def polygon_area(poly: np.ndarray) -> float:
    return abs(signed_area(poly))


def quad_centroid(poly: np.ndarray) -> np.ndarray:
    """Area centroid of a polygon ((row, col)); the vertex mean when degenerate."""
    p = np.asarray(poly, dtype=np.float64)
    x, y = p[:, 0], p[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    a = cross.sum() / 2
    if abs(a) < 1e-9:
        return p.mean(axis=0)
    return np.array([((x + xn) * cross).sum() / (6 * a), ((y + yn) * cross).sum() / (6 * a)])


def is_valid_quad(quad: np.ndarray, min_area: float = 4.0) -> bool:
    """Convex, non-degenerate, and in the expected turning direction (SA, SP, IP, IA)."""
    q = np.asarray(quad, dtype=np.float64)
    if not np.all(np.isfinite(q)):
        return False
    d = np.roll(q, -1, axis=0) - q
    cross = d[:, 0] * np.roll(d, -1, axis=0)[:, 1] - d[:, 1] * np.roll(d, -1, axis=0)[:, 0]
    # (row, col) with rows down, cols right: SA -> SP -> IP -> IA turns with cross < 0
    return bool(np.all(cross < 0) and polygon_area(q) >= min_area)


def point_in_quad(point: Sequence[float], quad: np.ndarray) -> bool:
    """Whether a (row, col) point lies inside a convex polygon (either orientation)."""
    q = np.asarray(quad, dtype=np.float64)
    p = np.asarray(point, dtype=np.float64)
    d = np.roll(q, -1, axis=0) - q
    r = p - q
    cross = d[:, 0] * r[:, 1] - d[:, 1] * r[:, 0]
    return bool(np.all(cross <= 1e-9) or np.all(cross >= -1e-9))


def outside_image(points: np.ndarray, shape: Sequence[int] | None) -> bool:
    """Whether any (row, col) point lies beyond the outer pixel edges of an image of ``shape``
    (rows, cols): a corner there was extrapolated by the detector, not seen. None: unknown, False."""
    if shape is None:
        return False
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return bool((p < -0.5).any() or (p[:, 0] > shape[0] - 0.5).any() or (p[:, 1] > shape[1] - 0.5).any())


def _area2(pts: list[tuple[float, float]]) -> float:
    """Twice the signed shoelace area of a polygon given as a list of (x, y) tuples."""
    n = len(pts)
    return sum(pts[i][0] * pts[(i + 1) % n][1] - pts[(i + 1) % n][0] * pts[i][1] for i in range(n))


def _clip_convex(subject: list[tuple[float, float]], clip: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sutherland-Hodgman: ``subject`` clipped by the convex polygon ``clip`` (both
    counter-clockwise, lists of (x, y) tuples)."""
    out = subject
    n = len(clip)
    for i in range(n):
        if not out:
            break
        ax, ay = clip[i]
        bx, by = clip[(i + 1) % n]
        ex, ey = bx - ax, by - ay
        inp, out = out, []
        prev = inp[-1]
        prev_in = ex * (prev[1] - ay) - ey * (prev[0] - ax) >= 0
        for cur in inp:
            cur_in = ex * (cur[1] - ay) - ey * (cur[0] - ax) >= 0
            if cur_in != prev_in:
                x1, y1, x2, y2 = prev[0], prev[1], cur[0], cur[1]
                den = (x1 - x2) * (ay - by) - (y1 - y2) * (ax - bx)
                if abs(den) < 1e-12:
                    out.append(cur)
                else:
                    t = ((x1 - ax) * (ay - by) - (y1 - ay) * (ax - bx)) / den
                    out.append((x1 + t * (x2 - x1), y1 + t * (y2 - y1)))
            if cur_in:
                out.append(cur)
            prev, prev_in = cur, cur_in
    return out


def polygon_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two convex polygons given as (n, 2) points."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    # quick reject on bounding boxes
    if (a[:, 0].max() < b[:, 0].min() or b[:, 0].max() < a[:, 0].min()
            or a[:, 1].max() < b[:, 1].min() or b[:, 1].max() < a[:, 1].min()):
        return 0.0
    pa = [(float(x), float(y)) for x, y in a]
    pb = [(float(x), float(y)) for x, y in b]
    aa, ab = _area2(pa), _area2(pb)
    if aa < 0:
        pa, aa = pa[::-1], -aa
    if ab < 0:
        pb, ab = pb[::-1], -ab
    inter = _clip_convex(pa, pb)
    ia = abs(_area2(inter)) / 2 if len(inter) >= 3 else 0.0
    union = aa / 2 + ab / 2 - ia
    return float(ia / union) if union > 0 else 0.0


def side_of_line(points: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Signed distance (px) of (row, col) points from the line p0 -> p1, positive on the
    inferior side (larger rows) for a roughly anterior -> posterior line."""
    d = np.asarray(p1, float) - np.asarray(p0, float)
    n = np.array([d[1], -d[0]]) / (np.hypot(*d) + 1e-12)  # normal; for d ~ +cols, n ~ +rows
    if n[0] < 0:
        n = -n
    return (np.asarray(points, float) - p0) @ n


# ---------------------------------------------------------------------------------------------
# a body's polygons across slices
# ---------------------------------------------------------------------------------------------
def nearest_polygon_slice(polygons: Mapping[int, np.ndarray], position: float) -> int:
    """The slice of ``polygons`` nearest ``position`` (ties: the lower slice)."""
    return min(polygons, key=lambda s: (abs(s - position), s))


def mid_slice(polygons: Mapping[int, np.ndarray], centroid_slice: float) -> int | None:
    """The body's mid-sagittal slice: its polygon slice nearest the centroid (ties: the lower)."""
    if not polygons:
        return None
    c = float(centroid_slice) if np.isfinite(centroid_slice) else float(np.median(list(polygons)))
    return nearest_polygon_slice(polygons, c)


def centroid_mid_slice(polygons: Mapping[int, np.ndarray], centroid_slice: float) -> int:
    """An annotated body's mid slice: the rounded centroid slice, or the polygon slice nearest the
    centroid when that one has no polygon (a mask's centroid can fall between its polygons).
    Unlike :func:`mid_slice`, a centroid half-way between two polygon slices goes to the one
    Python's ``round`` picks, and a body without polygons gets its rounded centroid."""
    s = int(round(centroid_slice))
    if polygons and s not in polygons:
        s = nearest_polygon_slice(polygons, centroid_slice)
    return s


# ---------------------------------------------------------------------------------------------
# simulated detector error
# ---------------------------------------------------------------------------------------------


def jitter_polygons(polys: dict[int, np.ndarray], rng: np.random.Generator, strength: float = 1.0
                    ) -> dict[int, np.ndarray]:
    """Polygons perturbed like a detector's output: whole-body shift (~4 % of the box) and scale
    (~4 %), per-corner noise (~2.5 %), and 0-2 lateral slices dropped per side (>= 2 kept)."""
    ks = sorted(polys)
    if not ks:
        return {}
    allp = np.concatenate([polys[k] for k in ks])
    h = max(np.ptp(allp[:, 0]), 2.0)
    w = max(np.ptp(allp[:, 1]), 2.0)
    cen = allp.mean(0)
    shift = rng.normal(0, 0.04 * strength, 2) * (h, w)
    scale = 1.0 + rng.normal(0, 0.04 * strength, 2)
    n = len(ks)
    lo, hi = 0, n
    if n > 2:
        d_lo = int(rng.choice([0, 0, 1, 1, 2])) if strength > 0 else 0
        d_hi = int(rng.choice([0, 0, 1, 1, 2])) if strength > 0 else 0
        lo, hi = min(d_lo, (n - 2) // 2), max(n - d_hi, n - (n - 2) // 2)
        if hi - lo < 2:
            lo, hi = 0, n
    out = {}
    for k in ks[lo:hi]:
        q = (polys[k] - cen) * scale + cen + shift
        q = q + rng.normal(0, 0.025 * strength, (4, 2)) * (h, w)
        out[k] = q
    return out
