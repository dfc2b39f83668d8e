"""Vertebral body detection (SpineNetV2 detection stage).

A fully convolutional network maps each sagittal slice to 13 maps (official channel layout):
corner heatmaps rt, rb, lb, lt (ch 0-3), a centroid heatmap (ch 4) and, per corner, the x (cols,
ch 5-8) and y (rows, ch 9-12) displacement from the corner to its vertebra's centroid in network
pixels. The stage:

1. resamples every slice to the network's pixel size (``mm_per_px``) and cuts it into tiles
   (one tile per axis when the scan fits the network's field, else overlapping tiles: lumbar-size
   25 cm / 30 % overlap, 50 cm / 40 % along axes longer than ``whole_threshold_mm``); each tile is
   normalised on its own ((x - min) / (p99.5 - p0.5), as the official pipeline) and padded to a
   multiple of 32;
2. runs all tiles (of one or several scans) in a few batched forward passes under
   ``torch.inference_mode()``;
3. merges overlapping tiles by the median (a tile does not vote within ``tile_margin`` of an
   edge it shares with another tile, where it sees vertebrae cut) and decodes each slice:
   threshold, connected components, one peak per component; each centroid takes, per corner
   type, the corner whose arrow lands closest to it (within ``arrow_tolerance`` x the arrow
   length); one missing corner is rebuilt from the opposite corner's arrow, more missing
   corners drop the centroid;
4. groups slice quadrilaterals across slices by polygon IoU (largest first) and removes
   single-slice detections (a one-slice series keeps them: that slice is all there is);
5. moves each corner across its endplate to where the image's endplate profile lines up with
   the neighbouring bodies' on that slice (:func:`refine_endplates`, ``refine_endplates``): the
   network, which sees 1.3 mm pixels, is off by a per-body offset that the native-resolution
   image shows;
6. looks once more directly below the lowest body, on the same maps decoded at a lower
   threshold (:func:`find_body_below`, ``search_below_threshold``): on scanners it was not
   trained on, the top of the sacrum often scores too low. That body is tentative
   (``found_at_low_threshold``): the labeller keeps it only as a missing S1.

Polygons come back in the ingested series' pixel grid, corners (row, col) ordered
superior-anterior, superior-posterior, inferior-posterior, inferior-anterior, vertebrae sorted
caudal (largest row) first.

The architecture is configuration: ``Detector.load(path)`` rebuilds the network named in the
checkpoint's :class:`DetectorConfig` (``"cpu-unet"`` = :mod:`spinecohort.nets.detector_cpu`,
``"official"`` = :func:`spinecohort.nets.official.build_official` ``('detector')``), and
``Detector.official(module)`` wraps an official VFRResNetDetector with the official
preprocessing constants.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

# used here, and still importable from detect (its __all__) for existing callers
from .geometry import is_valid_quad, point_in_quad, polygon_area, polygon_iou, quad_centroid
from .nets.storage import StoredConfig, save_checkpoint_file, storable_state_dict

__all__ = [
    "CORNER_NAMES",
    "CHANNEL_CORNER",
    "DetectorConfig",
    "DetectedVertebra",
    "SliceQuad",
    "Detector",
    "build_network",
    "plan_tiles",
    "resample_volume",
    "normalize_tiles",
    "merge_tiles",
    "find_peaks",
    "decode_slice",
    "group_across_slices",
    "merge_fragments",
    "drop_lateral",
    "refine_endplates",
    "polygon_iou",
    "polygon_area",
    "quad_centroid",
    "point_in_quad",
    "is_valid_quad",
    "save_checkpoint",
    "CHECKPOINT_FORMAT",
]

#: Polygon corner order used everywhere in spinecohort.
CORNER_NAMES = ("SA", "SP", "IP", "IA")
#: Network corner channel c (0..3) holds polygon corner CHANNEL_CORNER[c]: the official order
#: rt, rb, lb, lt with anterior on the left (low cols) is SP, IP, IA, SA.
CHANNEL_CORNER = (1, 2, 3, 0)
CENTROID_CHANNEL = 4
ARROW_X_CHANNELS = (5, 6, 7, 8)
ARROW_Y_CHANNELS = (9, 10, 11, 12)
N_CHANNELS = 13
CHECKPOINT_FORMAT = "spinecohort-detector"
#: Corner permutations that keep geometric order after flipping rows / cols.
FLIP_ROWS_PERM = (3, 2, 1, 0)
FLIP_COLS_PERM = (1, 0, 3, 2)


@dataclass
class DetectorConfig(StoredConfig):
    """Preprocessing, tiling and decoding constants; saved inside the checkpoint."""

    arch: str = "cpu-unet"                      # "cpu-unet" | "official"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    mm_per_px: float = 250.0 / 192.0            # network pixel size (tile_mm / net input px)
    tile_mm: float = 250.0                      # lumbar-size tile edge
    overlap: float = 0.3
    max_single_mm: float = 330.0                # an axis up to this extent is one tile
    whole_threshold_mm: float = 450.0           # an axis longer than this uses whole-spine tiles
    whole_tile_mm: float = 500.0
    whole_overlap: float = 0.4
    tile_margin: float = 0.1                    # a tile does not vote this close to an inner edge
    pad_multiple: int = 32
    norm_low_pct: float = 0.5
    norm_high_pct: float = 99.5
    corner_threshold: float = 0.5
    centroid_threshold: float = 0.5
    arrow_tolerance: float = 0.5                # arrow must land within this x its length
    arrow_max_px: float = 0.0                   # and within this many net px (0 = no limit)
    max_missing_corners: int = 1
    duplicate_corner_px: float = 2.0
    group_iou: float = 0.25
    max_slice_gap: int = 1                      # a vertebra may skip this many slices
    merge_iou: float = 0.25                     # fragments of one body (slice gap <= merge_max_gap)
    merge_max_gap: int = 3                      # overlapping this much are merged (0 IoU = off)
    min_slices: int = 2                         # single-slice detections are removed
    min_score: float = 0.0                      # vertebrae scoring lower are dropped
    lateral_check: bool = True                  # drop groups lying wholly lateral to the column
    peak_mode: str = "component"                # "component" (one peak per connected component,
                                                # as the reference) or "local_max" (every 3x3 maximum)
    batch_tiles: int = 32
    flip_tta: bool = False                      # also run each tile mirrored anterior-posterior and
                                                # average the maps (test-time augmentation)
    autocast_bf16: bool = False                 # bfloat16 inference (fast on AVX512-BF16/AMX CPUs)
    refine_endplates: bool = True               # corners moved across their endplate to the image's
                                                # edge profile (refine_endplates); off: network only
    search_below_threshold: float = 0.12        # > 0: one more body looked for directly below the
                                                # lowest at this lower threshold (find_body_below)

    @classmethod
    def official(cls) -> "DetectorConfig":
        """The official SpineNetV2 constants (26 cm tiles -> 224 px, 40 % overlap, thresholds
        0.6, arrow check 0.5 x length or 20 px, grouping IoU 0.2), and the official corners as
        the network gives them (no endplate refinement: not measured with these networks)."""
        return cls(arch="official", mm_per_px=260.0 / 224.0, tile_mm=260.0, overlap=0.4,
                   max_single_mm=260.0, whole_threshold_mm=1e9, tile_margin=0.0, corner_threshold=0.6,
                   centroid_threshold=0.6, arrow_max_px=20.0, group_iou=0.2, batch_tiles=8,
                   refine_endplates=False, search_below_threshold=0.0)


@dataclass
class DetectedVertebra:
    polygons: dict[int, np.ndarray]               # slice -> (4,2) (row, col) in the ingested grid
    centroid: tuple[float, float, float]          # (slice, row, col)
    score: float
    slice_scores: dict[int, float] = field(default_factory=dict, repr=False)
    found_at_low_threshold: bool = False          # only the search below the column found it

    @property
    def slice_min(self) -> int:
        return min(self.polygons)

    @property
    def slice_max(self) -> int:
        return max(self.polygons)

    def polygon_near(self, s: int, max_dist: int = 1) -> np.ndarray | None:
        """Its polygon on slice ``s``, else on the nearest slice within ``max_dist``."""
        if s in self.polygons:
            return self.polygons[s]
        near = [k for k in self.polygons if abs(k - s) <= max_dist]
        if not near:
            return None
        return self.polygons[min(near, key=lambda k: (abs(k - s), k))]


@dataclass
class SliceQuad:
    quad: np.ndarray       # (4,2) (row, col)
    score: float


# ---------------------------------------------------------------------------------------------
# networks
# ---------------------------------------------------------------------------------------------
def build_network(config: DetectorConfig) -> nn.Module:
    """The network named by ``config.arch`` (untrained)."""
    if config.arch in ("cpu-unet", "cpu_unet"):
        from .nets.detector_cpu import CPUDetectorUNet

        return CPUDetectorUNet(**config.arch_kwargs)
    if config.arch == "official":
        from .nets.official import build_official

        return build_official("detector")
    raise ValueError(f"unknown detector architecture {config.arch!r} (expected 'cpu-unet' or 'official')")


def save_checkpoint(path: str | Path, net: nn.Module, config: DetectorConfig,
                    meta: dict[str, Any] | None = None, half: bool = True) -> None:
    """Save weights (floating tensors as fp16 when ``half``) with the config and metadata, in a
    form ``torch.load(weights_only=True)`` reads."""
    state = storable_state_dict(net, half)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": 1,
        "config": config.to_dict(),
        "state_dict": state,
        # plain JSON types only, so weights_only loading accepts it
        "meta": json.loads(json.dumps(dict(meta or {}), default=str)),
    }
    save_checkpoint_file(path, payload)


# ---------------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------------
def resample_volume(volume: np.ndarray | torch.Tensor, pixel_spacing_mm: Sequence[float],
                    mm_per_px: float) -> tuple[torch.Tensor, tuple[float, float]]:
    """(S, R, C) -> (S, R', C') at ``mm_per_px``; returns the tensor and the per-axis scale
    factors (R'/R, C'/C). Original coordinate = (resampled + 0.5) / factor - 0.5."""
    vol = torch.as_tensor(np.ascontiguousarray(volume), dtype=torch.float32)
    s, r, c = vol.shape
    sr, sc = float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1])
    r2 = max(1, int(round(r * sr / mm_per_px)))
    c2 = max(1, int(round(c * sc / mm_per_px)))
    if (r2, c2) == (r, c):
        return vol, (1.0, 1.0)
    out = F.interpolate(vol[:, None], size=(r2, c2), mode="bilinear", align_corners=False,
                        antialias=(r2 < r or c2 < c))[:, 0]
    return out, (r2 / r, c2 / c)


def _axis_tiles(extent: int, config: DetectorConfig) -> list[tuple[int, int]]:
    """(start, size) of the tiles along one axis of ``extent`` network pixels."""
    mm = extent * config.mm_per_px
    if mm > config.whole_threshold_mm:
        edge, overlap = config.whole_tile_mm, config.whole_overlap
    else:
        edge, overlap = config.tile_mm, config.overlap
    size = int(round(edge / config.mm_per_px))
    single = int(round(max(config.max_single_mm, edge) / config.mm_per_px))
    if extent <= single or extent <= size:
        return [(0, extent)]
    stride = max(1, int(size * (1.0 - overlap)))
    n = int(math.ceil((extent - size) / stride)) + 1
    starts = np.round(np.linspace(0, extent - size, n)).astype(int)
    return [(int(s0), size) for s0 in starts]


def plan_tiles(shape: tuple[int, int], config: DetectorConfig) -> list[tuple[int, int, int, int]]:
    """Tiles covering a resampled slice of ``shape`` (R', C'): (row0, rows, col0, cols)."""
    return [(r0, rh, c0, cw) for r0, rh in _axis_tiles(shape[0], config)
            for c0, cw in _axis_tiles(shape[1], config)]


def _padded(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def normalize_tiles(tiles: torch.Tensor, low_pct: float = 0.5, high_pct: float = 99.5) -> torch.Tensor:
    """Per-tile (x - min) / (p_high - p_low + 1e-9) (the official normalisation); (N, H, W)."""
    flat = tiles.reshape(tiles.shape[0], -1)
    lo = flat.min(dim=1).values
    q = torch.quantile(flat, torch.tensor([low_pct / 100.0, high_pct / 100.0], dtype=flat.dtype), dim=1)
    rng = (q[1] - q[0]).abs()
    ptp = flat.max(dim=1).values - lo
    rng = torch.where(rng > 0, rng, ptp)
    return (tiles - lo[:, None, None]) / (rng[:, None, None] + 1e-9)


#: Output channel c of a tile mirrored left-right (cols) holds channel COLS_MIRROR_CHANNELS[c] of
#: the original: corner heatmaps rt<->lt, rb<->lb; the centroid stays; the vector channels follow
#: their corners (the x components also change sign, see :func:`unmirror_maps`).
COLS_MIRROR_CHANNELS = (3, 2, 1, 0, 4, 8, 7, 6, 5, 12, 11, 10, 9)


def unmirror_maps(maps: torch.Tensor) -> torch.Tensor:
    """Network maps (C=13, rows, cols) of a cols-mirrored tile -> maps of the original tile."""
    out = maps.flip(-1)[list(COLS_MIRROR_CHANNELS)]
    out[5:9] = -out[5:9]
    return out


def merge_tiles(outputs: Sequence[torch.Tensor], boxes: Sequence[tuple[int, int, int, int]],
                shape: tuple[int, int], margin: float = 0.0) -> torch.Tensor:
    """Merge per-tile maps (C, rows, cols) into one (C, R', C') map; overlaps take the median
    (the mean of the two middle values for an even count).

    ``margin``: a tile does not vote within this fraction of its size from an edge it shares
    with another tile (not at the image border): a vertebra cut by that edge is half seen there
    and would halve the peaks of the tile that sees it whole. Pixels no trimmed tile covers
    keep every tile's vote."""
    if len(outputs) == 1:
        r0, rh, c0, cw = boxes[0]
        if (r0, c0) == (0, 0) and (rh, cw) == tuple(shape):
            return outputs[0]
    ch = outputs[0].shape[0]
    stack = torch.full((len(outputs), ch, *shape), float("nan"))
    for i, (o, (r0, rh, c0, cw)) in enumerate(zip(outputs, boxes)):
        stack[i, :, r0:r0 + rh, c0:c0 + cw] = o
    if len(outputs) == 1:
        return torch.nan_to_num(stack[0])
    if margin > 0:
        keep = torch.zeros(len(outputs), 1, *shape, dtype=torch.bool)
        for i, (r0, rh, c0, cw) in enumerate(boxes):
            mr, mc = int(round(margin * rh)), int(round(margin * cw))
            top = r0 + (mr if r0 > 0 else 0)
            bottom = r0 + rh - (mr if r0 + rh < shape[0] else 0)
            left = c0 + (mc if c0 > 0 else 0)
            right = c0 + cw - (mc if c0 + cw < shape[1] else 0)
            keep[i, :, top:bottom, left:right] = True
        keep |= ~keep.any(dim=0, keepdim=True)  # uncovered after trimming: every tile votes
        stack = torch.where(keep, stack, torch.tensor(float("nan")))
    srt, _ = torch.sort(stack, dim=0)  # NaNs sort last
    count = (~torch.isnan(stack[:, :1])).sum(dim=0, keepdim=True).clamp(min=1)
    lo = torch.gather(srt, 0, ((count - 1) // 2).expand(1, ch, *shape))
    hi = torch.gather(srt, 0, (count // 2).expand(1, ch, *shape))
    return torch.nan_to_num(((lo + hi) / 2)[0])


# ---------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------
def find_peaks(heat: np.ndarray, threshold: float, mode: str = "component") -> tuple[np.ndarray, np.ndarray]:
    """Threshold, label connected components (4-connectivity), one argmax per component
    (``mode="local_max"``: every 3 x 3 local maximum above the threshold instead, which keeps
    touching peaks apart), with quadratic sub-pixel refinement. Returns points (n, 2) (row, col)
    and peak values (n,)."""
    mask = heat > threshold
    if not mask.any():
        return np.zeros((0, 2)), np.zeros(0)
    if mode == "local_max":
        mask = mask & (heat >= ndimage.maximum_filter(heat, size=3, mode="nearest"))
    lab, n = ndimage.label(mask)  # 4-connectivity; in local_max mode plateaus count once
    flat = np.flatnonzero(lab)
    labs = lab.ravel()[flat]
    v = heat.ravel()[flat]
    order = np.lexsort((-v, labs))  # per label, the highest value first
    first = np.ones(len(order), bool)
    first[1:] = labs[order][1:] != labs[order][:-1]
    best = flat[order][first]
    pos = np.stack(np.unravel_index(best, heat.shape), axis=1).astype(np.int64)
    vals = heat.ravel()[best].astype(np.float64)
    pts = pos.astype(np.float64)
    h, w = heat.shape
    for k, (r, c) in enumerate(pos):
        v0 = heat[r, c]
        if 0 < r < h - 1:
            a, b = heat[r - 1, c], heat[r + 1, c]
            den = a - 2 * v0 + b
            if den < 0:
                pts[k, 0] += float(np.clip(0.5 * (a - b) / den, -0.5, 0.5))
        if 0 < c < w - 1:
            a, b = heat[r, c - 1], heat[r, c + 1]
            den = a - 2 * v0 + b
            if den < 0:
                pts[k, 1] += float(np.clip(0.5 * (a - b) / den, -0.5, 0.5))
    return pts, vals


def _sample(field2d: np.ndarray, pts: np.ndarray) -> np.ndarray:
    if len(pts) == 0:
        return np.zeros(0)
    return ndimage.map_coordinates(field2d, pts.T, order=1, mode="nearest")


def decode_slice(maps: np.ndarray, config: DetectorConfig) -> list[SliceQuad]:
    """Quadrilaterals on one slice from its 13 maps (network pixel units)."""
    cents, cvals = find_peaks(maps[CENTROID_CHANNEL], config.centroid_threshold, config.peak_mode)
    if len(cents) == 0:
        return []
    corners = []
    for c in range(4):
        pts, vals = find_peaks(maps[c], config.corner_threshold, config.peak_mode)
        arrows = np.stack([_sample(maps[ARROW_Y_CHANNELS[c]], pts),
                           _sample(maps[ARROW_X_CHANNELS[c]], pts)], axis=1) if len(pts) else np.zeros((0, 2))
        corners.append((CHANNEL_CORNER[c], pts, vals, arrows))
    quads: list[SliceQuad] = []
    for m, mval in zip(cents, cvals):
        quad = np.full((4, 2), np.nan)
        arrow_of = np.full((4, 2), np.nan)
        score = [float(mval)]
        for k, pts, vals, arrows in corners:
            if len(pts) == 0:
                score.append(0.0)
                continue
            landing = pts + arrows
            dist = np.hypot(*(landing - m).T)
            length = np.hypot(*arrows.T)
            ok = dist <= config.arrow_tolerance * length
            if config.arrow_max_px > 0:
                ok &= dist <= config.arrow_max_px
            if not ok.any():
                score.append(0.0)
                continue
            j = int(np.argmin(np.where(ok, dist, np.inf)))
            quad[k] = pts[j]
            arrow_of[k] = arrows[j]
            score.append(float(vals[j]))
        missing = [k for k in range(4) if np.isnan(quad[k, 0])]
        if len(missing) > config.max_missing_corners or len(missing) == 4:
            continue
        for k in missing:
            opp = (k + 2) % 4
            if np.isnan(arrow_of[opp, 0]):
                break
            quad[k] = m + arrow_of[opp]
        if np.isnan(quad).any():
            continue
        if not is_valid_quad(quad) or not point_in_quad(m, quad):
            continue
        quads.append(SliceQuad(quad, float(np.mean(score))))
    return _remove_duplicates(quads, config.duplicate_corner_px)


def _remove_duplicates(quads: list[SliceQuad], corner_px: float) -> list[SliceQuad]:
    """Of quads sharing a corner (closer than ``corner_px``) or overlapping heavily, keep the
    higher-scoring one."""
    order = sorted(range(len(quads)), key=lambda i: -quads[i].score)
    kept: list[SliceQuad] = []
    for i in order:
        q = quads[i]
        clash = False
        for p in kept:
            if np.min(np.hypot(*(q.quad - p.quad).T)) < corner_px or polygon_iou(q.quad, p.quad) > 0.3:
                clash = True
                break
        if not clash:
            kept.append(q)
    return kept


def group_across_slices(per_slice: dict[int, list[SliceQuad]], iou_threshold: float = 0.25,
                        max_gap: int = 1, min_slices: int = 2, merge_iou: float = 0.0,
                        merge_max_gap: int = 3) -> list[dict[int, SliceQuad]]:
    """Chain slice quadrilaterals into vertebrae: each quad joins the group whose most recent
    quad (at most ``max_gap`` slices skipped) overlaps it most, if IoU > ``iou_threshold``
    (pairs assigned greedily, largest IoU first). With ``merge_iou`` > 0, groups on disjoint
    slices at most ``merge_max_gap`` slices apart whose facing quads overlap more than that are
    merged (a body interrupted at a lateral slice). Groups seen on fewer than ``min_slices``
    slices are dropped."""
    groups: list[dict[int, SliceQuad]] = []
    last: list[int] = []
    for s in sorted(per_slice):
        quads = per_slice[s]
        open_ids = [g for g in range(len(groups)) if s - 1 - max_gap <= last[g] < s]
        pairs = []
        for gi in open_ids:
            prev = groups[gi][last[gi]].quad
            for qi, q in enumerate(quads):
                iou = polygon_iou(prev, q.quad)
                if iou > iou_threshold:
                    pairs.append((iou, -(s - last[gi]), gi, qi))
        pairs.sort(reverse=True)
        used_g, used_q = set(), set()
        for iou, _, gi, qi in pairs:
            if gi in used_g or qi in used_q:
                continue
            groups[gi][s] = quads[qi]
            last[gi] = s
            used_g.add(gi)
            used_q.add(qi)
        for qi, q in enumerate(quads):
            if qi not in used_q:
                groups.append({s: q})
                last.append(s)
    if merge_iou > 0:
        groups = merge_fragments(groups, merge_iou, merge_max_gap)
    return [g for g in groups if len(g) >= min_slices]


def merge_fragments(groups: list[dict[int, SliceQuad]], iou_threshold: float, max_gap: int
                    ) -> list[dict[int, SliceQuad]]:
    """Merge groups on disjoint slice ranges (gap <= ``max_gap``) whose facing quads overlap
    by IoU > ``iou_threshold``; larger groups absorb smaller ones first."""
    groups = sorted((dict(g) for g in groups), key=lambda g: -len(g))
    merged = True
    while merged:
        merged = False
        for i in range(len(groups)):
            gi = groups[i]
            lo_i, hi_i = min(gi), max(gi)
            for j in range(i + 1, len(groups)):
                gj = groups[j]
                lo_j, hi_j = min(gj), max(gj)
                if hi_j < lo_i:
                    gap, a, b = lo_i - hi_j - 1, gi[lo_i], gj[hi_j]
                elif lo_j > hi_i:
                    gap, a, b = lo_j - hi_i - 1, gi[hi_i], gj[lo_j]
                else:
                    continue
                if gap <= max_gap and polygon_iou(a.quad, b.quad) > iou_threshold:
                    gi.update(gj)
                    del groups[j]
                    merged = True
                    break
            if merged:
                break
    return groups


def drop_lateral(verts: list[DetectedVertebra], k: int = 4, min_ref_slices: int = 3) -> list[DetectedVertebra]:
    """Drop detections whose slice range misses the spinal column's local mid-sagittal region:
    the median centroid slice of the ``k`` nearest (in-plane) other detections spanning at least
    ``min_ref_slices`` slices, +- a quarter of their median slice extent (at least 1 slice).
    Removes pedicles, facets and lateral masses found on far-lateral slices; follows a
    scoliotic column because the reference is local."""
    if len(verts) < 3:
        return verts
    cen = np.array([v.centroid for v in verts])
    span = np.array([v.slice_max - v.slice_min + 1 for v in verts])
    keep = []
    for i, v in enumerate(verts):
        ref = [j for j in range(len(verts)) if j != i and span[j] >= min_ref_slices]
        if len(ref) < 2:
            keep.append(v)
            continue
        d = np.hypot(cen[ref, 1] - cen[i, 1], cen[ref, 2] - cen[i, 2])
        near = [ref[j] for j in np.argsort(d)[:k]]
        centre = float(np.median(cen[near, 0]))
        tol = max(1.0, 0.25 * float(np.median(span[near])))
        if v.slice_min <= centre + tol and v.slice_max >= centre - tol:
            keep.append(v)
    return keep


def find_body_below(verts: list[DetectedVertebra], candidates: list[DetectedVertebra],
                    factors: tuple[float, float], reach: tuple[float, float] = (0.55, 1.6),
                    max_offset: float = 0.5) -> DetectedVertebra | None:
    """The best-scoring candidate (decoded at a lower threshold) that continues the column one
    body below the lowest detection: its centroid 0.55-1.6 x the lowest pair's spacing further
    along the column, at most half that spacing off it, overlapping neither of the two lowest."""
    if len(verts) < 2:
        return None
    scale = np.array([1.0, factors[0], factors[1]])  # ingested px -> isotropic network px
    low, above = np.array(verts[0].centroid) * scale, np.array(verts[1].centroid) * scale
    axis = (low - above)[1:]
    spacing = float(np.hypot(*axis))
    if spacing <= 0:
        return None
    axis /= spacing
    best = None
    for c in candidates:
        d = (np.array(c.centroid) * scale - low)[1:]
        along, off = float(d @ axis), abs(float(d[0] * axis[1] - d[1] * axis[0]))
        if not (reach[0] * spacing <= along <= reach[1] * spacing and off <= max_offset * spacing):
            continue
        if any(polygon_iou(q, v.polygons[s]) > 0.05 for v in verts[:2] for s, q in c.polygons.items()
               if s in v.polygons):
            continue
        if best is None or c.score > best.score:
            best = c
    return None if best is None else replace(best, found_at_low_threshold=True)


def _vertebra_from_group(group: dict[int, SliceQuad]) -> DetectedVertebra:
    slices = sorted(group)
    areas = np.array([max(polygon_area(group[s].quad), 1e-6) for s in slices])
    cents = np.array([quad_centroid(group[s].quad) for s in slices])
    w = areas / areas.sum()
    centroid = (float(np.dot(w, slices)), float(np.dot(w, cents[:, 0])), float(np.dot(w, cents[:, 1])))
    score = float(np.mean([group[s].score for s in slices]))
    return DetectedVertebra({s: group[s].quad.astype(np.float64) for s in slices}, centroid, score,
                            {s: group[s].score for s in slices})


# ---------------------------------------------------------------------------------------------
# endplate refinement
# ---------------------------------------------------------------------------------------------
#: Profiles across an endplate are averaged over this stretch of it (mm from the corner): past
#: the rounded corner, short of the endplate's central concavity.
ENDPLATE_SEGMENT_MM = (1.5, 4.0)
#: Profile half-length across the endplate, its sampling step, and the largest move of a corner
#: (about twice the network's scatter across the endplate). The part compared, +-1.5 mm, holds
#: the cortex and the step to the disc and stays within half a thin (thoracic, cervical) disc,
#: so the facing endplate of the next body does not enter it.
ENDPLATE_PROFILE_MM = 3.0
ENDPLATE_STEP_MM = 0.25
ENDPLATE_MAX_SHIFT_MM = 1.5
#: A corner is compared with its own body's other corner on that endplate and both corners of
#: this many nearest bodies on the slice: neighbours share size, disc height and coil signal.
ENDPLATE_PEERS = 4
#: A corner moves only where its profile correlates this well with its peers' (their shared
#: shape explains >= 81 % of it, signal about twice the noise): below that the image places a
#: corner less reliably than the network (thoracic bodies of whole-spine series at 1.2 mm
#: pixels), and noise, a fused sacral segment or a body cut by the image border keep theirs.
ENDPLATE_MIN_CORR = 0.9


def refine_endplates(volume: np.ndarray, pixel_spacing_mm: Sequence[float],
                     vertebrae: Sequence[DetectedVertebra]) -> list[DetectedVertebra]:
    """The vertebrae with each polygon's corners moved across their endplate (perpendicular to
    the superior or inferior edge, at most ``ENDPLATE_MAX_SHIFT_MM``) so that the image's
    intensity profile across the endplate next to the corner lines up with the same profile at
    the nearest other bodies' corners on that slice.

    Why: the network sees the slice at 1.3 mm pixels, and its error across an endplate is mostly
    an offset per body (much the same on neighbouring slices, so averaging slices does not remove
    it; a finer peak fit of its heatmaps does not either) that the native-resolution image shows.
    Where the endplate edge lies relative to a corner differs by contrast and by how a reference
    was drawn (on the phantoms the corners sit on the outer edge of the dark cortex; expert masks
    of water-fat T1 end about a millimetre inside the strongest edge, of T2 about a millimetre
    outside it), so snapping to the strongest edge would bias one or another. Instead each
    corner's template is the profile at its peers' network corners (``ENDPLATE_PEERS``; never
    its own), and the median move on a slice is zero: the network's placement convention is
    kept on average, and each body's departure from it is removed. Superior and inferior
    endplates are compared apart; a corner whose best match is weak (``ENDPLATE_MIN_CORR``) or
    at the end of the search stays, and so do all of a slice's when most match weakly (no shared
    endplate to go by). Deterministic; a few ms a scan.

    Centroids and scores are unchanged; ``volume`` is (slices, rows, cols) in the polygons' grid.
    """
    sp = np.asarray([float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1])])
    out = [replace(v, polygons=dict(v.polygons), slice_scores=dict(v.slice_scores)) for v in vertebrae]
    for s in sorted({k for v in vertebrae for k in v.polygons}):
        on_slice = [i for i, v in enumerate(vertebrae) if s in v.polygons]
        if len(on_slice) < 2 or not 0 <= s < volume.shape[0]:  # no other body to compare with
            continue
        quads = np.stack([vertebrae[i].polygons[s] for i in on_slice]) * sp
        moved = _align_endplates(np.asarray(volume[s], dtype=np.float32), sp, quads) / sp
        for i, q in zip(on_slice, moved):
            if is_valid_quad(q) or is_valid_quad(q[::-1]):  # still convex (a mirrored series turns the other way)
                out[i].polygons[s] = q
    return out


def _standardise(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=-1, keepdims=True)
    return x / (x.std(axis=-1, keepdims=True) + 1e-12)


def _align_endplates(image: np.ndarray, spacing: np.ndarray, quads: np.ndarray) -> np.ndarray:
    """:func:`refine_endplates` on one slice: (n, 4, 2) corners in mm -> moved corners in mm."""
    n = len(quads)
    along = quads[:, [1, 0, 3, 2]] - quads  # each corner towards the other end of its endplate
    along /= np.linalg.norm(along, axis=-1, keepdims=True) + 1e-12
    normal = np.stack([-along[..., 1], along[..., 0]], axis=-1)
    inward = np.einsum("bkd,bkd->bk", quads - quads.mean(axis=1, keepdims=True), normal) < 0
    normal[inward] *= -1  # pointing out of the body, into the disc
    offsets = np.arange(-ENDPLATE_PROFILE_MM, ENDPLATE_PROFILE_MM + 1e-9, ENDPLATE_STEP_MM)
    stretch = np.arange(ENDPLATE_SEGMENT_MM[0], ENDPLATE_SEGMENT_MM[1] + 1e-9, 0.5)
    points = (quads[:, :, None, None] + stretch[:, None] * along[:, :, None, None]
              + offsets[:, None, None] * normal[:, :, None, None])  # (n, 4, offsets, stretch, 2) mm
    values = ndimage.map_coordinates(image, [points[..., 0].ravel() / spacing[0], points[..., 1].ravel() / spacing[1]],
                                     order=1, mode="nearest")
    profiles = values.reshape(points.shape[:-1]).mean(axis=-1)  # (n, 4, offsets)
    m = int(round(ENDPLATE_MAX_SHIFT_MM / ENDPLATE_STEP_MM))
    width = len(offsets) - 2 * m
    # every window of `width` samples, at lags -m..m steps; standardised, so a brighter or
    # darker body (coil bias, marrow) compares on shape alone
    windows = _standardise(profiles[:, :, np.arange(2 * m + 1)[:, None] + np.arange(width)])
    centres = quads.mean(axis=1)
    distance = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    np.fill_diagonal(distance, np.inf)
    peers = np.zeros((n, n))
    peers[np.arange(n)[:, None], np.argsort(distance, axis=1)[:, :min(ENDPLATE_PEERS, n - 1)]] = 1.0
    shift = np.zeros((n, 4))
    for corners in ([0, 1], [2, 3]):  # superior endplates, inferior endplates
        w = windows[:, corners]  # (bodies, 2 corners, lags, width)
        lag = np.full((n, 2), m)
        for _ in range(3):  # templates from the windows at their current lags, then new lags
            aligned = np.take_along_axis(w, lag[..., None, None], axis=2)[:, :, 0]
            template = _standardise((peers @ aligned.sum(axis=1))[:, None] + aligned[:, ::-1])
            corr = np.einsum("bclt,bct->bcl", w, template) / width
            lag = corr.argmax(axis=-1)
        best, lo, hi = (np.take_along_axis(corr, np.clip(lag + d, 0, 2 * m)[..., None], axis=-1)[..., 0]
                        for d in (0, -1, 1))
        inner = (lag > 0) & (lag < 2 * m)
        curve = lo - 2 * best + hi
        sub = np.where(inner & (curve < 0), 0.5 * (lo - hi) / np.where(curve < 0, curve, -1.0), 0.0)
        move = (lag + sub - m) * ENDPLATE_STEP_MM  # > 0: this edge lies further out than its peers'
        ok = inner & (best >= ENDPLATE_MIN_CORR)
        # a slice where most corners match weakly has no shared endplate to go by (noise, no edge)
        if not ok.any() or np.median(best) < ENDPLATE_MIN_CORR:
            continue
        move = move - np.median(move[ok])
        ok &= np.abs(move) <= ENDPLATE_MAX_SHIFT_MM
        shift[:, corners] = np.where(ok, move, 0.0)
    return quads + shift[..., None] * normal


# ---------------------------------------------------------------------------------------------
# the detector
# ---------------------------------------------------------------------------------------------
class Detector:
    """A detection network with its preprocessing/decoding configuration."""

    def __init__(self, net: nn.Module, config: DetectorConfig | None = None, device: str = "cpu",
                 meta: dict[str, Any] | None = None):
        self.config = config or DetectorConfig()
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.meta = dict(meta or {})
        from .nets.official import param_dtype

        # a network stored in bfloat16 (official family, models.precision) takes bfloat16 input
        self.input_dtype = param_dtype(self.net)
        self.channels_last = self.config.autocast_bf16 or self.input_dtype == torch.bfloat16
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "Detector":
        """A spinecohort detector checkpoint (:func:`save_checkpoint`), or an official SpineNet
        ``detect-vfr`` checkpoint (a dict with key ``net``)."""
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
            config = DetectorConfig.from_dict(payload["config"])
            state = payload["state_dict"]
            meta = payload.get("meta", {})
        elif isinstance(payload, dict) and "net" in payload:
            config, state, meta = DetectorConfig.official(), payload["net"], {"source": "official"}
        else:
            raise ValueError(f"{path}: not a detector checkpoint")
        net = build_network(config)
        ref = net.state_dict()
        state = {k: (v.to(ref[k].dtype) if k in ref and v.is_floating_point() else v)
                 for k, v in state.items()}
        net.load_state_dict(state, strict=True)
        return cls(net, config, device, meta)

    @classmethod
    def official(cls, module: nn.Module, device: str = "cpu",
                 config: DetectorConfig | None = None) -> "Detector":
        """Wrap an official VFRResNetDetector (e.g. ``build_official('detector')`` with the
        user's ``ckpt435.pt`` loaded) with the official preprocessing constants."""
        return cls(module, config or DetectorConfig.official(), device, {"source": "official"})

    # -- inference ----------------------------------------------------------------------------
    def _prepare(self, volume: np.ndarray, spacing: Sequence[float]):
        res, factors = resample_volume(volume, spacing, self.config.mm_per_px)
        boxes = plan_tiles(tuple(res.shape[1:]), self.config)
        return res, factors, boxes

    def _forward(self, tiles: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run normalised, unpadded (h, w) tiles through the network; returns (13, h, w) maps.
        Tiles of the same padded shape share batches."""
        cfg = self.config
        out: list[torch.Tensor | None] = [None] * len(tiles)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(tiles):
            shp = (_padded(t.shape[0], cfg.pad_multiple), _padded(t.shape[1], cfg.pad_multiple))
            by_shape.setdefault(shp, []).append(i)
        with torch.inference_mode():
            for (ph, pw), ids in by_shape.items():
                for b0 in range(0, len(ids), max(1, cfg.batch_tiles)):
                    chunk = ids[b0:b0 + cfg.batch_tiles]
                    x = torch.zeros(len(chunk), 1, ph, pw)
                    for j, i in enumerate(chunk):
                        h, w = tiles[i].shape
                        x[j, 0, :h, :w] = tiles[i]
                    x = x.to(self.device, self.input_dtype)
                    if self.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
                        y = self.net(x)
                    y = y.float().cpu()
                    for j, i in enumerate(chunk):
                        h, w = tiles[i].shape
                        out[i] = y[j, :, :h, :w]
        return out  # type: ignore[return-value]

    def predict_maps(self, volume: np.ndarray, pixel_spacing_mm: Sequence[float]) -> tuple[torch.Tensor, tuple[float, float]]:
        """Merged network maps (S, 13, R', C') on the resampled grid, and the scale factors."""
        return self._predict_maps_batch([volume], [pixel_spacing_mm])[0]

    def _predict_maps_batch(self, volumes, spacings):
        cfg = self.config
        prepared = [self._prepare(v, s) for v, s in zip(volumes, spacings)]
        tiles, index = [], []
        for vi, (res, _, boxes) in enumerate(prepared):
            for bi, (r0, rh, c0, cw) in enumerate(boxes):
                crops = res[:, r0:r0 + rh, c0:c0 + cw]
                crops = normalize_tiles(crops, cfg.norm_low_pct, cfg.norm_high_pct)
                for s in range(res.shape[0]):
                    tiles.append(crops[s])
                    index.append((vi, s, bi))
        outputs = self._forward(tiles)
        if cfg.flip_tta:
            mirrored = self._forward([t.flip(-1) for t in tiles])
            outputs = [(o + unmirror_maps(m)) / 2 for o, m in zip(outputs, mirrored)]
        per: dict[tuple[int, int], dict[int, torch.Tensor]] = {}
        for (vi, s, bi), o in zip(index, outputs):
            per.setdefault((vi, s), {})[bi] = o
        results = []
        for vi, (res, factors, boxes) in enumerate(prepared):
            shape = tuple(res.shape[1:])
            maps = torch.stack([
                merge_tiles([per[(vi, s)][bi] for bi in range(len(boxes))], boxes, shape, cfg.tile_margin)
                for s in range(res.shape[0])
            ])
            results.append((maps, factors))
        return results

    def _decode_volume(self, maps: torch.Tensor, factors: tuple[float, float],
                       config: DetectorConfig | None = None) -> list[DetectedVertebra]:
        cfg = config or self.config
        fr, fc = factors
        per_slice: dict[int, list[SliceQuad]] = {}
        arr = maps.numpy()
        for s in range(arr.shape[0]):
            quads = decode_slice(arr[s], cfg)
            for q in quads:  # network grid -> ingested grid
                q.quad = np.stack([(q.quad[:, 0] + 0.5) / fr - 0.5, (q.quad[:, 1] + 0.5) / fc - 0.5], axis=1)
            per_slice[s] = quads
        # A series with fewer slices than min_slices (a single sagittal slice) cannot show a
        # body on min_slices slices: every slice's quads count, not none.
        min_slices = min(cfg.min_slices, arr.shape[0])
        groups = group_across_slices(per_slice, cfg.group_iou, cfg.max_slice_gap, min_slices,
                                     cfg.merge_iou, cfg.merge_max_gap)
        verts = [v for v in (_vertebra_from_group(g) for g in groups) if v.score >= cfg.min_score]
        if cfg.lateral_check and arr.shape[0] > 1:  # one slice: nothing lies lateral to it
            verts = drop_lateral(verts)
        verts.sort(key=lambda v: (-v.centroid[1], v.centroid[2]))
        return verts

    def _weak_body_below(self, maps: torch.Tensor, factors: tuple[float, float],
                         verts: list[DetectedVertebra]) -> DetectedVertebra | None:
        """The weak body below the column (:func:`find_body_below`) decoded from the same maps at
        ``search_below_threshold``, if any (search off at 0)."""
        t = self.config.search_below_threshold
        if t <= 0:
            return None
        weak = self._decode_volume(maps, factors, replace(self.config, corner_threshold=t, centroid_threshold=t))
        return find_body_below(verts, weak, factors)

    def detect(self, volume: np.ndarray, pixel_spacing_mm: Sequence[float], *,
               flip_rows: bool = False, flip_cols: bool = False, search_below: bool = True) -> list[DetectedVertebra]:
        """Vertebrae in one (slices, rows, cols) volume, caudal (largest row) first.

        ``flip_rows``/``flip_cols``: the volume's rows run inferior -> superior / its cols run
        posterior -> anterior; it is flipped for the network and the polygons mapped back (corner
        names stay anatomical). ``search_below`` (with the config's ``search_below_threshold`` >
        0): also the weak body directly below the column, marked ``found_at_low_threshold``, a
        tentative detection that :meth:`spinecohort.label.Labeller.label_scan` keeps or drops;
        callers that do not label (detection metrics, training targets) pass False."""
        return self.detect_batch([volume], [pixel_spacing_mm], flip_rows=[flip_rows], flip_cols=[flip_cols],
                                 search_below=search_below)[0]

    def detect_batch(self, volumes: Sequence[np.ndarray], spacings: Sequence[Sequence[float]], *,
                     flip_rows: Sequence[bool] | None = None,
                     flip_cols: Sequence[bool] | None = None, search_below: bool = True) -> list[list[DetectedVertebra]]:
        """:meth:`detect` for several scans, their tiles batched together."""
        n = len(volumes)
        if len(spacings) != n:
            raise ValueError("volumes and spacings differ in length")
        flip_rows = list(flip_rows or [False] * n)
        flip_cols = list(flip_cols or [False] * n)
        prepared = []
        for v, fr_, fc_ in zip(volumes, flip_rows, flip_cols):
            v = np.asarray(v, dtype=np.float32)
            if v.ndim != 3:
                raise ValueError(f"expected a (slices, rows, cols) volume, got shape {v.shape}")
            if fr_:
                v = v[:, ::-1]
            if fc_:
                v = v[:, :, ::-1]
            prepared.append(np.ascontiguousarray(v))
        out = []
        for (maps, factors), v, spacing, fr_, fc_ in zip(self._predict_maps_batch(prepared, spacings), prepared,
                                                          spacings, flip_rows, flip_cols):
            verts = self._decode_volume(maps, factors)
            if self.config.refine_endplates:
                verts = refine_endplates(v, spacing, verts)
            # after the refinement, which it must not enter: the labeller may drop it, and the
            # bodies' corners are then as without the search (its own outline stays the network's)
            weak = self._weak_body_below(maps, factors, verts) if search_below else None
            if weak is not None:
                verts.insert(0, weak)
            if fr_ or fc_:
                verts = [_unflip(x, v.shape, fr_, fc_) for x in verts]
                verts.sort(key=lambda x: (-x.centroid[1], x.centroid[2]))
            out.append(verts)
        return out


def _unflip(v: DetectedVertebra, shape: tuple[int, int, int], flip_rows: bool, flip_cols: bool) -> DetectedVertebra:
    _, rows, cols = shape
    polys = {}
    for s, q in v.polygons.items():
        q = q.copy()
        if flip_rows:
            q[:, 0] = rows - 1 - q[:, 0]
            q = q[list(FLIP_ROWS_PERM)]
        if flip_cols:
            q[:, 1] = cols - 1 - q[:, 1]
            q = q[list(FLIP_COLS_PERM)]
        polys[s] = q
    s, r, c = v.centroid
    if flip_rows:
        r = rows - 1 - r
    if flip_cols:
        c = cols - 1 - c
    return replace(v, polygons=polys, centroid=(s, r, c), slice_scores=dict(v.slice_scores))
