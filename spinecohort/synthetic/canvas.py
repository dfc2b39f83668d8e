"""Drawing helpers: a slice canvas in mm, convex-polygon signed distances, anti-aliased
painting of bones and ellipses, partial-volume coverage and smooth random fields."""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _coverage(dx: float, lo: float, hi: float, thk: float) -> float:
    """Fraction of the slab [dx - thk/2, dx + thk/2] inside |x| in [lo, hi] (partial volume)."""
    def seg(a, b):
        return max(0.0, min(dx + thk / 2, b) - max(dx - thk / 2, a))

    if lo <= 0:
        return seg(-hi, hi) / thk
    return (seg(lo, hi) + seg(-hi, -lo)) / thk


class _Upsampler:
    """Separable linear interpolation from a coarse grid (cells of f pixels) to the image grid."""

    def __init__(self, n_out: tuple[int, int], n_in: tuple[int, int], f: float):
        self.ax = [self._axis(n_out[k], n_in[k], f) for k in (0, 1)]

    @staticmethod
    def _axis(n_out, n_in, f):
        pos = np.clip((np.arange(n_out) - (f - 1) / 2.0) / f, 0.0, n_in - 1.0)
        j0 = np.minimum(np.floor(pos).astype(np.intp), max(n_in - 2, 0))
        j1 = np.minimum(j0 + 1, n_in - 1)
        w = (pos - j0).astype(np.float32)
        return j0, j1, w

    def __call__(self, c: np.ndarray) -> np.ndarray:
        (r0, r1, wr), (c0, c1, wc) = self.ax
        t = c[r0] * (1.0 - wr)[:, None] + c[r1] * wr[:, None]
        return t[:, c0] * (1.0 - wc)[None, :] + t[:, c1] * wc[None, :]


def _smooth_field(rng: np.random.Generator, shape, cell_px: float) -> np.ndarray:
    """Zero-mean unit-variance smooth random field with correlation length ~cell_px."""
    cell_px = max(cell_px, 1.0)
    gs = (int(math.ceil(shape[0] / cell_px)) + 1, int(math.ceil(shape[1] / cell_px)) + 1)
    g = ndimage.gaussian_filter(rng.standard_normal(gs), 0.8, mode="wrap").astype(np.float32)
    f = _Upsampler(tuple(shape), gs, cell_px)(g)
    f = f - f.mean()
    return (f / (f.std() + 1e-9)).astype(np.float32)


class _Canvas:
    """One slice being painted, with the pixel grid in mm."""

    def __init__(self, img: np.ndarray, sp: float):
        self.img = img
        self.sp = sp
        self.rows, self.cols = img.shape
        self.yv = (np.arange(self.rows, dtype=np.float32) * np.float32(sp))[:, None]
        self.xv = (np.arange(self.cols, dtype=np.float32) * np.float32(sp))[None, :]

    def patch(self, pts, margin: float):
        pts = np.asarray(pts, float).reshape(-1, 2)
        inv = 1.0 / self.sp
        i0 = max(int(math.floor((pts[:, 0].min() - margin) * inv)), 0)
        j0 = max(int(math.floor((pts[:, 1].min() - margin) * inv)), 0)
        i1 = min(int(math.ceil((pts[:, 0].max() + margin) * inv)) + 1, self.rows)
        j1 = min(int(math.ceil((pts[:, 1].max() + margin) * inv)) + 1, self.cols)
        if i0 >= i1 or j0 >= j1:
            return None
        return (slice(i0, i1), slice(j0, j1)), self.yv[i0:i1], self.xv[:, j0:j1]

    def blend(self, sl, alpha, val):
        sub = self.img[sl]
        sub += alpha * (val - sub)


_NEXT = {k: np.r_[1:k, 0] for k in range(3, 9)}


def _edges(C):
    """Edges of the convex polygon C: start points A, unit directions, lengths, outward normals."""
    A = np.asarray(C, float)
    d = A[_NEXT[len(A)]] - A
    L = np.sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1]) + 1e-9
    d = d / L[:, None]
    nrm = np.empty_like(d)
    nrm[:, 0] = -d[:, 1]
    nrm[:, 1] = d[:, 0]
    cen = A.mean(0) - A
    if cen[0, 0] * nrm[0, 0] + cen[0, 1] * nrm[0, 1] > 0:  # convex: one orientation for all
        nrm = -nrm
    return A, d, L, nrm


def _edge_dists(py, px, A, nrm):
    """Outside distance to every edge line, shape (k, h, w)."""
    ny = nrm[:, 0].astype(np.float32)[:, None, None]
    nx = nrm[:, 1].astype(np.float32)[:, None, None]
    c = (A[:, 0] * nrm[:, 0] + A[:, 1] * nrm[:, 1]).astype(np.float32)[:, None, None]
    return py[None] * ny + px[None] * nx - c


def _edge_param(py, px, A, d, L):
    return np.clip(((py - A[0]) * d[0] + (px - A[1]) * d[1]) / L, 0.0, 1.0)


def _rounded_sdf(E, r):
    """Signed distance (mm) of a convex shape from outside-distances E (k, h, w), corner radius r."""
    E = E + r
    pos = np.sqrt(np.sum(np.square(np.maximum(E, 0.0)), axis=0))
    neg = np.minimum(E.max(axis=0), 0.0)
    return pos + neg - r


def _box_corners(o, du, dv, u0, u1, v0, v1):
    """Corners of the box {o + du*u + dv*v : u in [u0,u1], v in [v0,v1]} (convex order)."""
    return np.array([o + du * u1 + dv * v1, o + du * u1 + dv * v0,
                     o + du * u0 + dv * v0, o + du * u0 + dv * v1])


def _paint_bone(cv: _Canvas, C, r, marrow, cortex, ct, alpha_scale=1.0, extra=None):
    """Rounded convex bone with dark cortical rim of thickness ct (mm)."""
    got = cv.patch(C, r + 2 * cv.sp + 1.0)
    if got is None or alpha_scale <= 0:
        return
    sl, py, px = got
    A, d, L, nrm = _edges(C)
    sdf = _rounded_sdf(_edge_dists(py, px, A, nrm), r)
    a = np.clip(0.5 - sdf / cv.sp, 0.0, 1.0) * alpha_scale
    if not a.any():
        return
    inner = np.clip(0.5 + (-sdf - ct) / cv.sp, 0.0, 1.0)
    m = marrow if np.isscalar(marrow) else marrow[sl]
    cv.blend(sl, a, cortex + (m - cortex) * inner)


def _paint_ellipse(cv: _Canvas, c, e1, r1, r2, val, alpha_scale=1.0, soft=None):
    """Ellipse centred c with semi-axis r1 along unit e1 and r2 across."""
    if alpha_scale <= 0:
        return
    e2 = np.array([-e1[1], e1[0]])
    got = cv.patch([c], max(r1, r2) + 2 * cv.sp)
    if got is None:
        return
    sl, py, px = got
    a1 = (py - c[0]) * e1[0] + (px - c[1]) * e1[1]
    a2 = (py - c[0]) * e2[0] + (px - c[1]) * e2[1]
    q = np.sqrt((a1 / r1) ** 2 + (a2 / r2) ** 2)
    soft = soft if soft is not None else cv.sp / min(r1, r2)
    a = np.clip(0.5 + (1.0 - q) / soft, 0.0, 1.0) * alpha_scale
    v = val if np.isscalar(val) else val[sl]
    cv.blend(sl, a, v)


def _paint_ring_bone(cv, c, e1, r1, r2, marrow, cortex, ct, alpha_scale=1.0):
    _paint_ellipse(cv, c, e1, r1, r2, cortex, alpha_scale)
    if r1 > ct + 0.5 and r2 > ct + 0.5:
        _paint_ellipse(cv, c, e1, r1 - ct, r2 - ct, marrow, alpha_scale)

