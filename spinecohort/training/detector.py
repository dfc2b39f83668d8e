"""Training the vertebra detector (``spinecohort train detector``).

Targets (SpineNetV2): per vertebra on a slice, Gaussian peaks at its four corners and its centroid
with variance proportional to the quadrilateral's area, and, per corner, a vector field (x/y
displacement from each pixel to the centroid) in a disc around the corner whose area is
proportional to the quadrilateral's. Loss: class-balanced L1 on each heatmap (mean over pixels
with target > T plus mean over the others, T = 0.01; SpineNetV2 eq. 1-3) plus L2 on the vectors
inside the neighbourhoods. Pixels may be masked out of the loss (public-lumbar: above the top and
below the bottom annotated body, where T12/S1 are visible but unlabelled, and around bodies cut
thin at the lateral edge; synthetic: bodies cut by the field of view).

Data: synthetic phantoms (every field of view and contrast, ``spinecohort.synthetic``) plus the
public-lumbar TRAINING split (vertebral bodies from the vb3 masks; for the disc-annotated ivd
cases, bodies between consecutive discs). Tiles are drawn on the fly with heavy augmentation:
rotation, scale, flips (corners relabelled geometrically), intensity inversion / random
contrast curves, gamma, bias field, blur, low resolution, Rician noise.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

from . import ProgressLog
from ..detect import (
    CHANNEL_CORNER,
    FLIP_COLS_PERM,
    FLIP_ROWS_PERM,
    DetectorConfig,
    build_network,
    save_checkpoint,
)
from ..geometry import polygon_area
from ..shipped import default_model_path

__all__ = [
    "TargetConfig",
    "TrainScan",
    "make_targets",
    "detection_loss",
    "scan_from_public_lumbar",
    "scan_from_synthetic",
    "sample_tile",
    "augment_intensity",
    "train",
    "main",
]

DEFAULT_OUT = default_model_path("detector")
DEFAULT_ARCH_KWARGS = {"widths": [16, 32, 64, 96, 128], "head_width": 16, "arrow_scale": 16.0,
                       "full_res_width": 16}
#: Training slices are stored at this pixel size or finer (saves memory for 0.5 mm scans).
STORE_MM = 1.0


@dataclass
class TargetConfig:
    var_per_area: float = 0.01      # Gaussian variance (px^2) per px^2 of quadrilateral area
    min_sigma: float = 1.0          # px
    radius_per_sqrt_area: float = 0.2  # vector-field neighbourhood radius / sqrt(area)
    min_radius: float = 2.0         # px
    threshold: float = 0.01         # T of the class-balanced L1
    vec_scale: float = 16.0         # vectors are compared in units of this many px
    vec_weight: float = 1.0


# ---------------------------------------------------------------------------------------------
# targets and loss
# ---------------------------------------------------------------------------------------------
def make_targets(polys: Sequence[np.ndarray], shape: tuple[int, int], cfg: TargetConfig | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets for quadrilaterals (corners SA, SP, IP, IA as (row, col), network pixels).

    Returns heat (5, H, W) (corner channels in the official rt, rb, lb, lt order, then the
    centroid), vectors (8, H, W) (x = cols for the 4 corner channels, then y = rows) and the
    vector mask (4, H, W)."""
    cfg = cfg or TargetConfig()
    h, w = shape
    heat = np.zeros((5, h, w), np.float32)
    vec = np.zeros((8, h, w), np.float32)
    vmask = np.zeros((4, h, w), np.float32)
    best = np.full((4, h, w), np.inf, np.float32)  # distance to the corner owning a vector pixel
    for poly in polys:
        q = np.asarray(poly, dtype=np.float64)
        area = polygon_area(q)
        if area <= 0 or not np.all(np.isfinite(q)):
            continue
        sigma = max(cfg.min_sigma, math.sqrt(cfg.var_per_area * area))
        radius = max(cfg.min_radius, cfg.radius_per_sqrt_area * math.sqrt(area))
        centroid = q.mean(axis=0)
        ext = int(math.ceil(max(3 * sigma, radius))) + 1
        points = [(CHANNEL_CORNER[c], c) for c in range(4)] + [(None, 4)]
        for corner, ch in points:
            p = centroid if corner is None else q[corner]
            r0, r1 = max(0, int(p[0]) - ext), min(h, int(p[0]) + ext + 2)
            c0, c1 = max(0, int(p[1]) - ext), min(w, int(p[1]) + ext + 2)
            if r0 >= r1 or c0 >= c1:
                continue
            rr, cc = np.mgrid[r0:r1, c0:c1]
            d2 = (rr - p[0]) ** 2 + (cc - p[1]) ** 2
            g = np.exp(-d2 / (2 * sigma ** 2)).astype(np.float32)
            np.maximum(heat[ch, r0:r1, c0:c1], g, out=heat[ch, r0:r1, c0:c1])
            if corner is None:
                continue
            d = np.sqrt(d2).astype(np.float32)
            sel = (d <= radius) & (d < best[ch, r0:r1, c0:c1])
            if not sel.any():
                continue
            best[ch, r0:r1, c0:c1][sel] = d[sel]
            vec[ch, r0:r1, c0:c1][sel] = (centroid[1] - cc[sel]).astype(np.float32)
            vec[4 + ch, r0:r1, c0:c1][sel] = (centroid[0] - rr[sel]).astype(np.float32)
            vmask[ch, r0:r1, c0:c1][sel] = 1.0
    return heat, vec, vmask


def detection_loss(pred: torch.Tensor, heat: torch.Tensor, vec: torch.Tensor, vmask: torch.Tensor,
                   valid: torch.Tensor | None = None, cfg: TargetConfig | None = None
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Class-balanced L1 on the 5 heatmaps + L2 on the 8 vector channels inside neighbourhoods.

    pred (B, 13, H, W); heat (B, 5, H, W); vec (B, 8, H, W); vmask (B, 4, H, W); valid
    (B, 1, H, W) with 0 where the loss is masked out (heatmaps and vectors)."""
    cfg = cfg or TargetConfig()
    if valid is None:
        valid = torch.ones_like(heat[:, :1])
    err = (pred[:, :5] - heat).abs()
    pos = (heat > cfg.threshold).float() * valid
    neg = (heat <= cfg.threshold).float() * valid
    dims = (0, 2, 3)
    l_pos = (err * pos).sum(dims) / pos.sum(dims).clamp(min=1.0)
    l_neg = (err * neg).sum(dims) / neg.sum(dims).clamp(min=1.0)
    l_heat = (l_pos + l_neg).mean()
    m = (vmask * valid).repeat(1, 2, 1, 1)
    d = (pred[:, 5:] - vec) / cfg.vec_scale
    l_vec = (d.pow(2) * m).sum() / m.sum().clamp(min=1.0)
    total = l_heat + cfg.vec_weight * l_vec
    return total, {"heat": float(l_heat.detach()), "heat_pos": float(l_pos.detach().mean()),
                   "heat_neg": float(l_neg.detach().mean()), "vec": float(l_vec.detach())}


# ---------------------------------------------------------------------------------------------
# training scans
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainScan:
    """A volume with per-slice training quadrilaterals and loss masks (source pixel grid)."""

    name: str
    source: str
    volume: np.ndarray                              # (S, R, C), float16/float32
    spacing: tuple[float, float]                    # (row_mm, col_mm)
    polys: dict[int, list[np.ndarray]] = field(default_factory=dict)
    ignore_boxes: dict[int, list[tuple[float, float, float, float]]] = field(default_factory=dict)
    lines: Any = None                               # annotated extent lines or None
    # hard-negative tile centres per slice (source px): the craniovertebral junction above C2,
    # whose dens, C1 arches and clivus look body-like but are not vertebral bodies
    focus: dict[int, list[np.ndarray]] = field(default_factory=dict)

    def slice_weights(self) -> np.ndarray:
        return np.array([1.0 if self.polys.get(s) else 0.15 for s in range(self.volume.shape[0])])


def _box(poly: np.ndarray, dilate: float) -> tuple[float, float, float, float]:
    q = np.asarray(poly)
    return (q[:, 0].min() - dilate, q[:, 0].max() + dilate, q[:, 1].min() - dilate, q[:, 1].max() + dilate)


def _downsample_for_storage(volume: np.ndarray, spacing: tuple[float, float], polys, boxes, lines, focus=None):
    """Resample slices finer than STORE_MM to STORE_MM (float16) and scale the annotations."""
    sr, sc = spacing
    fr, fc = min(1.0, sr / STORE_MM), min(1.0, sc / STORE_MM)
    focus = focus or {}
    if fr == 1.0 and fc == 1.0:
        return volume.astype(np.float16), spacing, polys, boxes, lines, focus
    vol = np.stack([ndimage.zoom(ndimage.gaussian_filter(sl.astype(np.float32), (0.4 / fr, 0.4 / fc)),
                                 (fr, fc), order=1) for sl in volume])
    ar, ac = vol.shape[1] / volume.shape[1], vol.shape[2] / volume.shape[2]

    def tp(p):
        p = np.asarray(p, float)
        return np.stack([(p[..., 0] + 0.5) * ar - 0.5, (p[..., 1] + 0.5) * ac - 0.5], axis=-1)

    polys = {s: [tp(q) for q in v] for s, v in polys.items()}
    boxes = {s: [((b[0] + .5) * ar - .5, (b[1] + .5) * ar - .5, (b[2] + .5) * ac - .5, (b[3] + .5) * ac - .5)
                 for b in v] for s, v in boxes.items()}
    if lines is not None:
        lines = tuple(tuple(tp(p) for p in ln) for ln in lines)
    focus = {s: [tp(p) for p in v] for s, v in focus.items()}
    return vol.astype(np.float16), (sr / ar, sc / ac), polys, boxes, lines, focus


def scan_from_public_lumbar(case, dilate: float = 3.0, margin_px: float = 2.0, neighbours=()) -> TrainScan:
    """A training scan from a :class:`spinecohort.publiclumbar.PublicLumbarCase`: its vertebral
    bodies (mask-derived, or derived from discs) plus ``neighbours`` (the unannotated S1 / top
    neighbour located by :func:`spinecohort.publiclumbar.neighbour_bodies`), loss masked outside
    that extent and around bodies present but too thin for a quadrilateral on a slice."""
    from ..publiclumbar import annotated_extent_lines

    verts = [v for v in list(case.structures) + list(neighbours) if v.kind == "vertebra" and v.polygons]
    polys: dict[int, list[np.ndarray]] = {}
    boxes: dict[int, list] = {}
    n = case.volume.shape[0]
    for v in verts:
        lo = min(min(v.present_slices), min(v.polygons)) - 1
        hi = max(max(v.present_slices), max(v.polygons)) + 1
        for s in range(max(0, lo), min(n - 1, hi) + 1):
            if s in v.polygons:
                polys.setdefault(s, []).append(v.polygons[s])
            else:
                near = min(v.polygons, key=lambda k: (abs(k - s), k))
                boxes.setdefault(s, []).append(_box(v.polygons[near], dilate))
    lines = annotated_extent_lines(verts, margin_px)
    return TrainScan(case.name, "public-lumbar", case.volume.astype(np.float16), case.pixel_spacing_mm,
                     polys, boxes, lines)


def scan_from_synthetic(scan, name: str = "synthetic", dilate: float = 3.0) -> TrainScan:
    """A training scan from a :class:`spinecohort.synthetic.SyntheticScan`; partial bodies (cut by
    the field of view) are masked out of the loss, as are the slices just beyond a body's
    lateral extent."""
    vol = np.asarray(scan.volume, dtype=np.float32)
    n = vol.shape[0]
    ps = scan.pixel_spacing_mm
    spacing = (float(ps[0]), float(ps[1])) if np.ndim(ps) else (float(ps), float(ps))
    polys: dict[int, list[np.ndarray]] = {}
    boxes: dict[int, list] = {}
    for v in scan.vertebrae:
        vp = {int(s): np.asarray(q, float) for s, q in v.polygons.items()}
        if not vp:
            continue
        lo, hi = min(vp) - 1, max(vp) + 1
        for s in range(max(0, lo), min(n - 1, hi) + 1):
            if s in vp and not getattr(v, "partial", False):
                polys.setdefault(s, []).append(vp[s])
            else:
                near = min(vp, key=lambda k: (abs(k - s), k))
                boxes.setdefault(s, []).append(_box(vp[near], dilate))
    focus = _craniocervical_focus(scan)
    vol, spacing, polys, boxes, _, focus = _downsample_for_storage(vol, spacing, polys, boxes, None, focus)
    return TrainScan(name, "synthetic", vol, spacing, polys, boxes, None, focus)


def _craniocervical_focus(scan) -> dict[int, list[np.ndarray]]:
    """One level above C2 (C2's centroid moved by the C3 -> C2 step) on C2's slices."""
    by_level = {getattr(v, "level", None): v for v in scan.vertebrae}
    c2, c3 = by_level.get("C2"), by_level.get("C3")
    if c2 is None or c3 is None or not c2.polygons or not c3.polygons:
        return {}
    step = np.asarray(c2.centroid[1:], float) - np.asarray(c3.centroid[1:], float)
    return {int(s): [np.asarray(q, float).mean(axis=0) + step] for s, q in c2.polygons.items()}


# ---------------------------------------------------------------------------------------------
# augmentation and tile sampling
# ---------------------------------------------------------------------------------------------
def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], amplitude: float, grid: int = 4) -> np.ndarray:
    coarse = rng.normal(0.0, amplitude, (grid, grid))
    return ndimage.zoom(coarse, (shape[0] / grid, shape[1] / grid), order=3, mode="nearest")[: shape[0], : shape[1]]


def _normalize(x: np.ndarray, valid: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    v = x[valid]
    out = np.zeros_like(x, dtype=np.float32)
    if v.size == 0:
        return out
    lo = v.min()
    p0, p1 = np.percentile(v, [lo_pct, hi_pct])
    rng = abs(p1 - p0)
    if rng <= 0:
        rng = v.max() - lo
    out[valid] = (v - lo) / (rng + 1e-9)
    return out


def augment_intensity(x: np.ndarray, valid: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Contrast/appearance augmentation of a tile (NaN/invalid pixels untouched); returns the
    tile normalised as at inference ((x - min) / (p99.5 - p0.5), invalid pixels 0)."""
    x = _normalize(np.where(valid, x, 0.0), valid)
    shape = x.shape
    if rng.random() < 0.5 * strength:      # bias field
        x = x * np.exp(_smooth_field(rng, shape, rng.uniform(0.05, 0.35)))
    u = rng.random()
    if u < 0.25 * strength:                # random contrast curve (T1 <-> T2 <-> STIR-like)
        xs = np.array([0.0, 0.1, 0.25, 0.45, 0.65, 0.85, 1.1, 3.0])
        ys = np.concatenate([[0.0], rng.uniform(0.0, 1.0, len(xs) - 2), [rng.uniform(0.5, 1.0)]])
        x = np.interp(x, xs, ys)
    elif u < 0.4 * strength:               # inversion
        x = 1.0 - np.clip(x, 0.0, 1.0)
    if rng.random() < 0.7:                 # gamma
        x = np.clip(x, 0.0, None) ** math.exp(rng.uniform(-0.5, 0.5))
    if rng.random() < 0.25 * strength:     # blur
        x = ndimage.gaussian_filter(x, rng.uniform(0.4, 1.3))
    if rng.random() < 0.2 * strength:      # low resolution
        f = rng.uniform(1.3, 2.2)
        small = ndimage.zoom(x, 1.0 / f, order=1)
        x = ndimage.zoom(small, (shape[0] / small.shape[0], shape[1] / small.shape[1]), order=1)
        x = x[: shape[0], : shape[1]]
        if x.shape != shape:
            x = np.pad(x, ((0, shape[0] - x.shape[0]), (0, shape[1] - x.shape[1])), mode="edge")
    if rng.random() < 0.6 * strength:      # Rician noise
        sd = rng.uniform(0.005, 0.07)
        x = np.sqrt((x + rng.normal(0, sd, shape)) ** 2 + rng.normal(0, sd, shape) ** 2)
    return _normalize(x.astype(np.float32), valid)


#: Share of a scan's tiles centred on its hard-negative focus (:attr:`TrainScan.focus`), where it has one.
FOCUS_P = 0.25


def sample_tile(scan: TrainScan, s: int, rng: np.random.Generator, size: int, mm_per_px: float,
                tcfg: TargetConfig | None = None, augment: bool = True):
    """One training tile from slice ``s`` of ``scan``: (image (H,W), heat (5,H,W), vec (8,H,W),
    vmask (4,H,W), valid (H,W)), all float32."""
    tcfg = tcfg or TargetConfig()
    img = scan.volume[s].astype(np.float32)
    sr, sc = scan.spacing
    R, C = img.shape
    mmpp = mm_per_px * (math.exp(rng.uniform(math.log(0.8), math.log(1.25))) if augment else 1.0)
    theta = math.radians(rng.uniform(-25, 25)) if augment and rng.random() < 0.8 else 0.0
    frow = -1.0 if augment and rng.random() < 0.15 else 1.0
    fcol = -1.0 if augment and rng.random() < 0.5 else 1.0
    polys = scan.polys.get(s, [])
    focus = scan.focus.get(s, [])
    if focus and rng.random() < FOCUS_P:
        centre = np.asarray(focus[rng.integers(len(focus))], float)
        centre = centre + rng.uniform(-0.25, 0.25, 2) * size * mmpp / np.array([sr, sc])
    elif polys and rng.random() < 0.85:
        centre = np.asarray(polys[rng.integers(len(polys))]).mean(axis=0)
        jitter = rng.uniform(-0.4, 0.4, 2) * size * mmpp
        centre = centre + jitter / np.array([sr, sc])
    else:
        centre = np.array([rng.uniform(0, R - 1), rng.uniform(0, C - 1)])
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    A = np.diag([1.0 / sr, 1.0 / sc]) @ rot @ np.diag([mmpp * frow, mmpp * fcol])  # out px -> src px
    c0 = (size - 1) / 2.0
    ii, jj = np.mgrid[0:size, 0:size].astype(np.float64)
    off = np.stack([ii.ravel() - c0, jj.ravel() - c0])
    src = centre[:, None] + A @ off                                              # (2, N)
    # anti-alias when the tile is coarser than the source
    sig = (0.45 * max(0.0, mmpp / sr - 1.0), 0.45 * max(0.0, mmpp / sc - 1.0))
    base = ndimage.gaussian_filter(img, sig) if max(sig) > 0.05 else img
    tile = ndimage.map_coordinates(base, src, order=1, cval=np.nan).reshape(size, size)
    valid_img = np.isfinite(tile)
    loss_mask = np.ones(size * size, bool)
    for (r0, r1, cc0, cc1) in scan.ignore_boxes.get(s, []):
        loss_mask &= ~((src[0] >= r0) & (src[0] <= r1) & (src[1] >= cc0) & (src[1] <= cc1))
    if scan.lines is not None:
        from ..publiclumbar import outside_annotated

        loss_mask &= ~outside_annotated(src.T, scan.lines)
    loss_mask = loss_mask.reshape(size, size)
    Ainv = np.linalg.inv(A)
    out_polys = []
    for q in polys:
        o = (Ainv @ (np.asarray(q, float) - centre).T).T + c0
        if frow < 0:
            o = o[list(FLIP_ROWS_PERM)]
        if fcol < 0:
            o = o[list(FLIP_COLS_PERM)]
        out_polys.append(o)
    heat, vec, vmask = make_targets(out_polys, (size, size), tcfg)
    if augment:
        x = augment_intensity(tile, valid_img, rng)
    else:
        x = _normalize(np.where(valid_img, tile, 0.0), valid_img)
    return x, heat, vec, vmask, loss_mask.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# data loading
# ---------------------------------------------------------------------------------------------
def load_public_lumbar_scans(root=None, split: str = "train", log=print, neighbour_detector=None,
                             exclude_sources: Sequence[str] = ()) -> list[TrainScan]:
    """The public-lumbar cases of ``split`` as training scans, without the
    sources (sites) in ``exclude_sources``. With ``neighbour_detector`` (a Detector), S1 and the
    body above the annotated span are supervised where that detector finds them
    (:func:`spinecohort.publiclumbar.neighbour_bodies`) instead of being masked out."""
    from .. import publiclumbar as pl

    scans, n_neighbours = [], 0
    for ref in pl.list_cases(root, split=split):
        if ref.source in exclude_sources:
            continue
        case = pl.load_case(ref)
        extra = []
        if neighbour_detector is not None:
            extra = pl.neighbour_bodies(case, neighbour_detector.detect(case.volume, case.pixel_spacing_mm, search_below=False))
            n_neighbours += len(extra)
        ts = scan_from_public_lumbar(case, neighbours=extra)
        if ts.polys:
            scans.append(ts)
    log(f"public-lumbar {split}: {len(scans)} scans, "
        f"{sum(len(v) for t in scans for v in t.polys.values())} slice quadrilaterals, "
        f"{n_neighbours} neighbour bodies (S1 / above the annotated span) supervised")
    return scans


def make_synthetic_scans(n: int, seed: int, log=print) -> list[TrainScan]:
    """``n`` phantoms cycling through every field of view and contrast (seeds seed*100000 + i)."""
    if n <= 0:
        return []
    from .. import synthetic

    fovs = ("lumbar", "whole", "cervical", "lumbar", "whole")
    contrasts = ("T1", "T2", "STIR")
    scans = []
    t0 = time.time()
    for i in range(n):
        sc = synthetic.generate_scan(seed * 100000 + i, fov=fovs[i % len(fovs)],
                                     contrast=contrasts[(i // len(fovs)) % len(contrasts)])
        scans.append(scan_from_synthetic(sc, f"synthetic-{i}"))
        if (i + 1) % 25 == 0:
            log(f"synthetic: {i + 1}/{n} scans ({time.time() - t0:.0f} s)")
    return scans


class TileSampler:
    """Draws augmented tiles from a pool of scans (deterministic given the generator)."""

    def __init__(self, groups: list[tuple[list[TrainScan], float]], size: int, mm_per_px: float,
                 tcfg: TargetConfig | None = None):
        self.groups = [(g, w) for g, w in groups if g and w > 0]
        total = sum(w for _, w in self.groups)
        self.group_p = np.array([w / total for _, w in self.groups])
        self.size, self.mm_per_px, self.tcfg = size, mm_per_px, tcfg or TargetConfig()
        self.slice_p = [[(w / w.sum()) for w in (t.slice_weights() for t in g)] for g, _ in self.groups]

    def batch(self, rng: np.random.Generator, n: int, augment: bool = True):
        items = []
        for _ in range(n):
            gi = int(rng.choice(len(self.groups), p=self.group_p))
            scans = self.groups[gi][0]
            ti = int(rng.integers(len(scans)))
            s = int(rng.choice(len(self.slice_p[gi][ti]), p=self.slice_p[gi][ti]))
            items.append(sample_tile(scans[ti], s, rng, self.size, self.mm_per_px, self.tcfg, augment))
        x, heat, vec, vmask, valid = (torch.from_numpy(np.stack(z)) for z in zip(*items))
        return x[:, None], heat, vec, vmask, valid[:, None]


class _BatchStream(torch.utils.data.IterableDataset):
    """Batches drawn in a worker process (single worker, seeded: deterministic order)."""

    def __init__(self, sampler: TileSampler, seed: int, batch_size: int, n: int):
        super().__init__()
        self.sampler, self.seed, self.batch_size, self.n = sampler, seed, batch_size, n

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        for _ in range(self.n):
            yield self.sampler.batch(rng, self.batch_size)


# ---------------------------------------------------------------------------------------------
# training loop
# ---------------------------------------------------------------------------------------------
def train(out_path: str | Path = DEFAULT_OUT, *, steps: int = 1500, minutes: float | None = 55.0,
          seed: int = 0, n_synthetic: int = 120, public_lumbar_dir: str | Path | None = None,
          log_path: str | Path | None = None, batch_size: int = 8, crop_px: int = 128,
          lr: float = 2e-3, threads: int = 1, synthetic_weight: float = 0.5,
          config: DetectorConfig | None = None, init: str | Path | None = None,
          checkpoint_every: int = 250, bf16: bool = True, calibrate: bool = True,
          workers: int = 1, flip_tta: bool = False, neighbours_from: str | Path | None = None,
          exclude_sources: Sequence[str] = ()) -> dict[str, Any]:
    """Train the CPU detector and save it to ``out_path`` (fp16 weights + config + meta).

    ``steps`` fixes the schedule (one-cycle); ``minutes`` stops early if the wall clock runs out
    (the checkpoint then holds the weights reached so far). Deterministic for a given seed and
    thread count. ``bf16``: bfloat16 autocast and channels-last tensors (much faster on CPUs
    with AVX-512-BF16/AMX; the loss stays float32). ``flip_tta``: the saved detector averages each
    tile's maps with those of its anterior-posterior mirror (:attr:`DetectorConfig.flip_tta`),
    and its thresholds are calibrated that way. ``neighbours_from``: a detector checkpoint whose
    detections right below / above the annotated span of each public-lumbar case are supervised as
    S1 / the next level up (:func:`load_public_lumbar_scans`). ``exclude_sources``: public-lumbar
    sites left out (leave-one-site-out runs)."""
    torch.set_num_threads(max(1, int(threads)))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    log = ProgressLog(log_path)

    cfg = replace(config or DetectorConfig(arch="cpu-unet", arch_kwargs=dict(DEFAULT_ARCH_KWARGS)),
                  flip_tta=bool(flip_tta))  # a copy: the caller's config stays as it was
    t_start = time.time()
    pl_scans = []
    try:
        neighbour_detector = None
        if neighbours_from:
            from ..detect import Detector

            neighbour_detector = Detector.load(neighbours_from)
        pl_scans = load_public_lumbar_scans(public_lumbar_dir, "train", log, neighbour_detector, exclude_sources)
    except FileNotFoundError as exc:
        log(f"public-lumbar unavailable ({exc}); synthetic only")
    syn_scans = []
    if n_synthetic > 0:
        try:
            syn_scans = make_synthetic_scans(n_synthetic, seed, log)
        except ImportError as exc:
            log(f"synthetic generator unavailable ({exc}); public-lumbar only")
    if not pl_scans and not syn_scans:
        raise RuntimeError("no training data")
    sampler = TileSampler([(pl_scans, 1.0 - synthetic_weight if syn_scans else 1.0),
                           (syn_scans, synthetic_weight if pl_scans else 1.0)],
                          crop_px, cfg.mm_per_px)
    log(f"data ready in {time.time() - t_start:.0f} s")

    net = build_network(cfg)
    if init:
        from ..detect import Detector

        net.load_state_dict(Detector.load(init).net.state_dict())
    net.train()
    if bf16:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1,
                                                div_factor=20.0, final_div_factor=200.0)
    tcfg = TargetConfig()
    meta = {
        "recipe": {"steps": steps, "batch_size": batch_size, "crop_px": crop_px, "lr": lr, "seed": seed,
                   "n_synthetic": len(syn_scans), "n_public_lumbar_train": len(pl_scans),
                   "synthetic_weight": synthetic_weight, "threads": threads, "bf16_autocast": bf16,
                   "craniocervical_focus_p": FOCUS_P, "init": Path(init).name if init else None,
                   "data_workers": workers, "flip_tta": bool(flip_tta),
                   "neighbours_from": Path(neighbours_from).name if neighbours_from else None,
                   "exclude_sources": list(exclude_sources),
                   "target": tcfg.__dict__, "optimizer": "AdamW(wd=1e-4), OneCycle"},
        "torch": str(torch.__version__),
    }
    t_train = time.time()
    running: dict[str, float] = {}
    step = 0
    stream = _BatchStream(sampler, int(rng.integers(2 ** 31)), batch_size, steps)
    if workers > 0:  # tiles are drawn on another core while this one trains
        batches = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1, prefetch_factor=4))
    else:
        batches = iter(stream)
    for step in range(1, steps + 1):
        x, heat, vec, vmask, valid = next(batches)
        if bf16:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = net(x)
        loss, parts = detection_loss(pred.float(), heat, vec, vmask, valid, tcfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        sched.step()
        for k, v in {"loss": float(loss.detach()), **parts}.items():
            running[k] = 0.95 * running.get(k, v) + 0.05 * v
        if step % 25 == 0 or step == 1:
            el = time.time() - t_train
            log(f"step {step}/{steps} " + " ".join(f"{k}={v:.4f}" for k, v in running.items())
                + f" lr={sched.get_last_lr()[0]:.2e} {el / step:.2f} s/step elapsed {el / 60:.1f} min")
        out_of_time = minutes is not None and (time.time() - t_start) / 60.0 > minutes
        if step % checkpoint_every == 0 or step == steps or out_of_time:
            net.eval()
            meta.update({"steps_done": step, "train_minutes": round((time.time() - t_train) / 60, 1),
                         "final_running_loss": {k: round(v, 5) for k, v in running.items()}})
            save_checkpoint(out_path, net, cfg, meta)
            net.train()
        if out_of_time:
            log(f"time limit of {minutes} min reached at step {step}")
            break
    net.eval()
    if calibrate:
        from ..detect import Detector

        det = Detector(net.to(memory_format=torch.contiguous_format), cfg)
        cal = calibrate_thresholds(det, calibration_cases(seed, public_lumbar_dir, log=log), log=log)
        meta["calibration"] = {"best": cal["best"]}
        save_checkpoint(out_path, det.net, det.config, meta)
    log(f"saved {out_path} after {step} steps, {(time.time() - t_start) / 60:.1f} min in total")
    log.close()
    return meta


#: Seeds of the held-out validation phantoms used for threshold calibration: disjoint from the
#: training phantoms (``seed * 100000 + i``) and from the evaluation phantoms (10_000_000 + ...).
CALIBRATION_SEED_BASE = 20_000_000


def calibration_cases(seed: int = 0, public_lumbar_dir=None, n_public: int = 16, n_synthetic: int = 15,
                      log=print) -> list:
    """Cases for threshold calibration: every third public-lumbar training case (up to
    ``n_public``) and ``n_synthetic`` held-out validation phantoms (seeds from
    :data:`CALIBRATION_SEED_BASE`, every field of view and contrast). Validation phantoms rather
    than training ones: the network fits its training phantoms more confidently than new scans,
    so thresholds chosen there come out too high."""
    from ..evaluation import public_lumbar_detection_cases, synthetic_detection_cases

    cases = []
    try:
        cases += public_lumbar_detection_cases(public_lumbar_dir, "train")[::3][:n_public]
    except FileNotFoundError:
        pass
    if n_synthetic > 0:
        try:
            cases += synthetic_detection_cases(n_synthetic, seed, base_seed=CALIBRATION_SEED_BASE)
        except ImportError:
            pass
    log(f"calibration: {len(cases)} cases")
    return cases


def calibrate_thresholds(detector, cases, grid: Sequence[float] = (0.15, 0.2, 0.25, 0.3, 0.4),
                         score_grid: Sequence[float] = (0.0, 0.2, 0.25, 0.3, 0.35, 0.4),
                         log=print) -> dict[str, Any]:
    """Pick the corner and centroid thresholds and the minimum vertebra score maximising
    precision + recall (then the lowest localisation error, then the lowest thresholds) on
    ``cases``; sets them in ``detector.config`` and returns the table."""
    from ..evaluation import match_detections

    maps = []
    for i in range(0, len(cases), 4):
        chunk = cases[i:i + 4]
        maps += detector._predict_maps_batch([c.volume for c in chunk], [c.pixel_spacing_mm for c in chunk])
    table = []
    detector.config.min_score = 0.0
    for ct in grid:
        for mt in grid:
            detector.config.corner_threshold, detector.config.centroid_threshold = float(ct), float(mt)
            dets = [detector._decode_volume(m, f) for m, f in maps]
            for ms in score_grid:
                rows = [match_detections([d for d in ds if d.score >= ms], c) for ds, c in zip(dets, cases)]
                tp = sum(r["tp"] for r in rows)
                fp = sum(r["fp"] for r in rows)
                found = sum(r["found"] for r in rows)
                n = sum(r["n_gt"] for r in rows)
                err = [e for r in rows for e in r["errors_mm"]]
                prec = tp / (tp + fp) if tp + fp else 0.0
                rec = found / n if n else 0.0
                table.append({"corner": ct, "centroid": mt, "min_score": ms, "precision": prec, "recall": rec,
                              "error_mm": float(np.mean(err)) if err else float("inf")})
    best = max(table, key=lambda r: (round(r["precision"] + r["recall"], 4), -round(r["error_mm"], 2),
                                     -(r["corner"] + r["centroid"] + r["min_score"])))
    detector.config.corner_threshold = float(best["corner"])
    detector.config.centroid_threshold = float(best["centroid"])
    detector.config.min_score = float(best["min_score"])
    log(f"calibrated: corner threshold {best['corner']} centroid threshold {best['centroid']} min score "
        f"{best['min_score']} -> precision {best['precision']:.4f} recall {best['recall']:.4f} "
        f"error {best['error_mm']:.2f} mm ({len(cases)} calibration cases)")
    return {"best": best, "table": table}


def calibrate_checkpoint(path: str | Path, out: str | Path | None = None, seed: int = 0,
                         public_lumbar_dir=None, log=print) -> dict[str, Any]:
    """Re-calibrate the thresholds of a saved checkpoint (weights unchanged) in place or to ``out``."""
    from ..detect import Detector

    det = Detector.load(path)
    cases = calibration_cases(seed, public_lumbar_dir, log=log)
    result = calibrate_thresholds(det, cases, log=log)
    meta = dict(det.meta)
    meta["calibration"] = {"best": result["best"], "n_cases": len(cases)}
    save_checkpoint(out or path, det.net, det.config, meta)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spinecohort train detector",
                                description="Train the CPU vertebra detector (SpineNetV2 targets/loss).")
    p.add_argument("out", nargs="?", default=str(DEFAULT_OUT), help="output checkpoint (.pt)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--minutes", type=float, default=55.0, help="wall-clock limit (stops early)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-synthetic", type=int, default=120)
    p.add_argument("--synthetic-weight", type=float, default=0.5)
    p.add_argument("--public-lumbar", default=None, help="public-lumbar folder (default ../shared/...)")
    p.add_argument("--log", default=None, help="append progress to this file")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy shared CPU)")
    p.add_argument("--init", default=None, help="start from this checkpoint")
    p.add_argument("--no-bf16", action="store_true", help="train in float32 (slower)")
    p.add_argument("--no-calibrate", action="store_true", help="skip threshold calibration")
    p.add_argument("--flip-tta", action="store_true",
                   help="the saved detector averages each tile with its anterior-posterior mirror")
    p.add_argument("--workers", type=int, default=1, help="0: draw tiles in the training process")
    p.add_argument("--neighbours-from", default=None,
                   help="detector checkpoint whose detections of S1 (below L5) and of the body above the "
                        "annotated span are supervised on public-lumbar cases (default: masked out)")
    p.add_argument("--exclude-source", action="append", default=[],
                   help="leave this public-lumbar site out (vb2, vb3, ivd); repeatable")
    p.add_argument("--calibrate-only", action="store_true",
                   help="only re-calibrate the thresholds of the checkpoint OUT (weights unchanged)")
    a = p.parse_args(argv)
    if a.calibrate_only:
        torch.set_num_threads(max(1, a.threads))
        calibrate_checkpoint(a.out, seed=a.seed, public_lumbar_dir=a.public_lumbar)
        return 0
    meta = train(a.out, steps=a.steps, minutes=a.minutes, seed=a.seed, n_synthetic=a.n_synthetic,
                 public_lumbar_dir=a.public_lumbar, log_path=a.log, batch_size=a.batch_size,
                 crop_px=a.crop, lr=a.lr, threads=a.threads, synthetic_weight=a.synthetic_weight,
                 init=a.init, bf16=not a.no_bf16, calibrate=not a.no_calibrate, workers=a.workers,
                 flip_tta=a.flip_tta, neighbours_from=a.neighbours_from, exclude_sources=a.exclude_source)
    print(json.dumps({k: v for k, v in meta.items() if k != "recipe"}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
