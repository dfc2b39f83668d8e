"""Vertebra labelling (SpineNetV2 labelling stage): appearance, context, beam search.

Given the detected vertebral bodies of one sagittal scan (canonical view: rows head -> feet,
cols front -> back, slices in any lateral order), the stage names every body S1, L5, ..., C2:

1. **Appearance.** Around each body, a volume is cut from its bounding cuboid expanded by
   ``inplane_extent`` (1.0 = 100 % of the box edge on each side, i.e. 3x the box, the official
   SpineNet crop) in-plane and ``slice_extent`` (0.5 = 50 % of the slice range on each side)
   across slices, resampled (area-averaging, so thin slices and fine pixels are antialiased) to a
   fixed grid (official 16 x 224 x 224, CPU default 8 x 48 x 48; the CPU default uses a square
   in-plane crop so the body's aspect ratio survives, and passes log body height / depth in mm
   as two extra features), normalised per volume (``robust``: (x - p1) / (p99 - p1), insensitive
   to T1/T2/STIR and to the scanner's scale; ``official``: (x - min) / (p95 + 1e-6)) and
   classified into the 24 levels of :data:`spinecohort.tasks.LEVELS` (0 = S1 ... 23 = C2).
2. **Context.** A height-probability map P (one row per mm of scan height, 24 columns) holds, over
   each body's vertical extent (the rows between its mid-slice superior and inferior endplate
   centres), its temperature-softened appearance probabilities softmax(logits / T_app);
   rows of no body are zero. An image-to-image CNN refines P to P' (softmax(out / T_ctx) per
   row). The emission of body i is the mean of P' over its rows.
3. **Decoding.** A beam search (width 100) walks from the lowest (most caudal) body upwards and
   finds the most probable valid sequence (cost = sum of -log emission + transition penalties,
   :class:`BeamConfig`): labels strictly ascend (the same level twice has probability 0); a
   skipped level (missed detection) costs ``skip_penalty`` per level plus a Gaussian
   log-likelihood term on the vertical gap: ``gap_weight`` x (gap ratio - (skipped + 1))^2, the gap
   ratio being the distance between the two bodies over their neighbours' spacing; transitional
   variants are extra states with their own penalties: a sixth lumbar vertebra ``L6`` (between S1
   and L5; emits like L5), a thirteenth thoracic ``T13`` (between L1 and T12; emits like T12),
   four lumbar vertebrae (L1 absent without a gap: ``four_lumbar_penalty``). A second S1 below S1
   becomes ``S2`` (it emits like S1, ``s2_penalty``), and further sacral segments detected below
   it ``S3``, ``S4``, ``S5`` (``sacral_penalty`` each; detectors do find the fused sacral segments);
   a second C2 above C2 becomes ``C1`` (``c1_penalty``) -- in the 24-class order C2 is the top
   class, so the issue's "second C3 -> C2" reads "second C2 -> C1" here. Without C2 in view the
   shipped settings count from the sacrum, as readers of lumbar series do: a decoding with no
   sacral level whose lowest bodies hold one more S1 than not is re-counted up from it
   (:func:`anchor_at_sacrum`), and a transitional count is re-counted from its S1
   (:func:`count_from_sacrum`). Detections of one body
   (centres closer than 0.4 x its height, or vertical extents overlapping by > 60 %: a second
   detection on a few lateral slices, a sacral ala) are merged first (appearance weighted by
   their slice counts) and share one label.
4. **Probabilities.** A body's raw probability is the posterior marginal of its chosen label
   under the beam (the final hypotheses' scores normalised as softmax(-cost), the weights of the
   hypotheses giving the body that label summed), capped by the local evidence: the refined map
   P' 's probability of that level at the body's height. On a site the networks have not seen,
   the errors are whole-scan shifts by one that the raw value calls near-certain, so the reported
   ``level_probability`` is that raw value passed through a logistic map of (whether the scan is
   flagged, logit of the raw value), ``BeamConfig.probability_calibration``, fitted (Platt
   scaling) on leave-one-site-out labellings: a probability that holds on new sites.

``Labeller.load(appearance_path, context_path)`` reads the CPU checkpoints (``models/appearance-
cpu-v4.pt``, ``models/context-cpu-v4.pt``); ``Labeller.official(appearance, context)`` wraps the
official AppearanceModel / ContextModel (:func:`spinecohort.nets.official.build_official`) with
the official constants (224 x 224 x 16 crop, min/p95 normalisation, temperatures 10 / 10, context
rows padded to a multiple of 256).
"""
from __future__ import annotations

import math
from functools import lru_cache
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .nets.storage import StoredConfig, save_checkpoint_file, storable_state_dict
from .tasks import LEVELS

__all__ = [
    "AppearanceConfig",
    "ContextConfig",
    "BeamConfig",
    "BeamResult",
    "LevelSummary",
    "LEVEL_FLAGS",
    "level_summary",
    "VertebraGeometry",
    "CHAIN",
    "vertebra_geometry",
    "extract_appearance_volume",
    "height_probability_map",
    "beam_search",
    "anchor_at_sacrum",
    "hypothesis_weights",
    "raw_probabilities",
    "calibrated_probabilities",
    "fit_probability_calibration",
    "gap_ratios",
    "duplicate_groups",
    "build_appearance_net",
    "build_context_net",
    "save_labeller_checkpoint",
    "load_labeller_net",
    "Labeller",
    "APPEARANCE_FORMAT",
    "CONTEXT_FORMAT",
]

APPEARANCE_FORMAT = "spinecohort-appearance"
CONTEXT_FORMAT = "spinecohort-context"
N_LEVELS = len(LEVELS)


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class AppearanceConfig(StoredConfig):
    arch: str = "cpu"                     # "cpu" | "official"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    grid: tuple[int, int, int] = (8, 48, 48)   # (slices, rows, cols) of the resampled volume
    inplane_extent: float = 1.0           # each side grows by this x the box edge
    slice_extent: float = 0.5             # each side grows by this x the slice range
    square: bool = True                   # square in-plane crop of the larger box edge (mm)
    norm: str = "robust"                  # "robust" | "official"
    size_features: bool = True            # log(height/25 mm), log(depth/30 mm) as extra inputs
    temperature: float = 1.0              # softmax(logits / T) fills the height map
    batch: int = 64

    @classmethod
    def official(cls) -> "AppearanceConfig":
        return cls(arch="official", grid=(16, 224, 224), square=False, norm="official",
                   size_features=False, temperature=10.0, batch=8)



@dataclass
class ContextConfig(StoredConfig):
    arch: str = "cpu"                     # "cpu" | "official"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    mm_per_row: float = 1.0
    pad_multiple: int = 32                # official: 256
    temperature: float = 1.0              # official: 10
    emission: str = "context"             # "context" (P') | "product" (P' x appearance) | "appearance"

    @classmethod
    def official(cls) -> "ContextConfig":
        return cls(arch="official", pad_multiple=256, temperature=10.0)



@dataclass
class BeamConfig(StoredConfig):
    """Beam-search penalties, in nats (added to the sum of -log emission probabilities)."""

    width: int = 100
    emission_floor: float = 1e-4          # -log floor: a contradicted body costs <= 9.2 nats
    skip_penalty: float = 2.0             # per skipped level (missed detection)
    gap_weight: float = 14.0              # x (gap ratio - (skipped + 1))^2; 0 disables geometry
    s2_penalty: float = 2.0               # second S1 below S1 -> S2
    sacral_penalty: float = 1.5           # each further sacral segment detected below S2 (S3-S5)
    c1_penalty: float = 4.0               # second C2 above C2 -> C1
    six_lumbar_penalty: float = 6.0       # extra lumbar vertebra L6 (between S1 and L5)
    t13_penalty: float = 6.0              # extra thoracic vertebra T13 (between L1 and T12)
    four_lumbar_penalty: float = 6.0      # L1 absent without a gap (four lumbar vertebrae)
    transitional: bool = True             # allow L6, T13 and four lumbar vertebrae
    # without C2 in view, re-count a transitional decoding from the sacrum (count_from_sacrum);
    # off by default: the official family keeps the reference decoding
    count_from_sacrum_without_c2: bool = False
    # a scan is flagged counting_variant_suspected when a decoding with the transitional penalties
    # at this (lower) value has a variant, even though the chosen labelling has none
    variant_probe_penalty: float = 6.0
    # level_probability = sigmoid(a + b * scan flagged + c * logit(raw probability)), (a, b, c)
    # fitted on leave-one-site-out labellings; () reports the raw probability
    probability_calibration: tuple[float, ...] = ()
    # without C2 in view, a decoding with no sacral level is re-counted up from the lowest body
    # whose evidence is more S1 than not (anchor_at_sacrum); off by default: the official family
    # keeps the reference decoding
    anchor_at_sacrum: bool = False


# The label chain walked upwards by the beam: (name, emission column, penalty attribute or None).
CHAIN: tuple[tuple[str, int, str | None], ...] = (
    ("S5", 0, "sacral_penalty"), ("S4", 0, "sacral_penalty"), ("S3", 0, "sacral_penalty"),
    ("S2", 0, "s2_penalty"),
    ("S1", 0, None),
    ("L6", 1, "six_lumbar_penalty"),
    ("L5", 1, None), ("L4", 2, None), ("L3", 3, None), ("L2", 4, None), ("L1", 5, None),
    ("T13", 6, "t13_penalty"),
    *((LEVELS[i], i, None) for i in range(6, N_LEVELS)),
    ("C1", N_LEVELS - 1, "c1_penalty"),
)
_CHAIN_NAMES = tuple(c[0] for c in CHAIN)
_CHAIN_COL = np.array([c[1] for c in CHAIN])
_TRANSITIONAL = ("six_lumbar_penalty", "t13_penalty")


# ---------------------------------------------------------------------------------------------
# geometry and appearance volumes
# ---------------------------------------------------------------------------------------------
@dataclass
class VertebraGeometry:
    rows: tuple[float, float]      # bounding box over all slices' corners (pixels)
    cols: tuple[float, float]
    slices: tuple[int, int]        # first and last slice with a polygon
    top: float                     # mid-slice superior endplate centre row (pixels)
    bottom: float                  # mid-slice inferior endplate centre row (pixels)
    centroid: tuple[float, float, float]


def _as_polygons(polygons: Mapping[Any, Any] | None) -> dict[int, np.ndarray]:
    out = {}
    for k, q in (polygons or {}).items():
        a = np.asarray(q, dtype=np.float64).reshape(-1, 2)
        if a.shape == (4, 2) and np.all(np.isfinite(a)):
            out[int(k)] = a
    return out


def vertebra_geometry(polygons: Mapping[Any, Any] | None, centroid: Sequence[float] | None = None,
                      default_height_px: float = 20.0) -> VertebraGeometry | None:
    """Box, slice range and vertical extent of one body; None when nothing usable is given."""
    polys = _as_polygons(polygons)
    cen = None
    if centroid is not None:
        c = np.asarray(centroid, dtype=np.float64).reshape(-1)
        if c.size == 3 and np.all(np.isfinite(c)):
            cen = (float(c[0]), float(c[1]), float(c[2]))
    if not polys:
        if cen is None:
            return None
        h = default_height_px / 2
        return VertebraGeometry((cen[1] - h, cen[1] + h), (cen[2] - h, cen[2] + h),
                                (int(round(cen[0])), int(round(cen[0]))), cen[1] - h / 2, cen[1] + h / 2, cen)
    allp = np.concatenate(list(polys.values()))
    ks = sorted(polys)
    if cen is None:
        m = np.mean([polys[k].mean(0) for k in ks], axis=0)
        cen = (float(np.mean(ks)), float(m[0]), float(m[1]))
    mid = min(ks, key=lambda k: (abs(k - cen[0]), k))
    q = polys[mid]
    top = float((q[0, 0] + q[1, 0]) / 2)
    bottom = float((q[2, 0] + q[3, 0]) / 2)
    if bottom < top:
        top, bottom = bottom, top
    return VertebraGeometry((float(allp[:, 0].min()), float(allp[:, 0].max())),
                            (float(allp[:, 1].min()), float(allp[:, 1].max())),
                            (ks[0], ks[-1]), top, bottom, cen)


def _slice_weights(n_src: int, lo: float, hi: float, n_out: int) -> tuple[np.ndarray, int, int]:
    """Area-weighting matrix (n_out, j1 - j0) from source slices j0..j1-1 (slice j covers
    [j - 0.5, j + 0.5]) onto n_out equal bins of [lo - 0.5, hi + 0.5]; outside the volume counts
    as zero."""
    a = lo - 0.5
    width = (hi - lo + 1.0) / n_out
    edges = a + width * np.arange(n_out + 1)
    j0 = max(0, int(math.floor(edges[0] + 0.5)))
    j1 = min(n_src, int(math.ceil(edges[-1] + 0.5)))
    if j1 <= j0:
        return np.zeros((n_out, 0)), 0, 0
    js = np.arange(j0, j1)
    lo_e = np.maximum(edges[:-1, None], js[None, :] - 0.5)
    hi_e = np.minimum(edges[1:, None], js[None, :] + 0.5)
    w = np.clip(hi_e - lo_e, 0.0, None) / width
    return w, j0, j1


def extract_appearance_volume(volume: np.ndarray | torch.Tensor, pixel_spacing_mm: Sequence[float],
                              geom: VertebraGeometry, cfg: AppearanceConfig
                              ) -> tuple[np.ndarray, np.ndarray]:
    """The normalised appearance volume (slices, rows, cols) = ``cfg.grid`` of one body, and its
    size features (log(height / 25 mm), log(depth / 30 mm))."""
    vol = volume if isinstance(volume, torch.Tensor) else torch.as_tensor(np.asarray(volume, dtype=np.float32))
    n_s, n_r, n_c = vol.shape
    go_s, go_r, go_c = cfg.grid
    sr, sc = float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1])
    r0, r1 = geom.rows
    c0, c1 = geom.cols
    h_px, w_px = max(r1 - r0, 2.0), max(c1 - c0, 2.0)
    h_mm, w_mm = h_px * sr, w_px * sc
    cr, cc = (r0 + r1) / 2, (c0 + c1) / 2
    f = 1.0 + 2.0 * cfg.inplane_extent
    if cfg.square:
        side = f * max(h_mm, w_mm)
        hr, hc = side / 2 / sr, side / 2 / sc
    else:
        hr, hc = f * h_px / 2, f * w_px / 2
    # slices
    s0, s1 = geom.slices
    ns = s1 - s0 + 1
    w, j0, j1 = _slice_weights(n_s, s0 - cfg.slice_extent * ns, s1 + cfg.slice_extent * ns, go_s)
    out = torch.zeros(go_s, go_r, go_c)
    if j1 > j0:
        # in-plane: integer crop (zero padded), then area/antialiased resize to the grid
        ra, rb = int(math.floor(cr - hr + 0.5)), int(math.floor(cr + hr + 0.5))
        ca, cb = int(math.floor(cc - hc + 0.5)), int(math.floor(cc + hc + 0.5))
        rb, cb = max(rb, ra + 1), max(cb, ca + 1)
        sub = torch.zeros(j1 - j0, rb - ra, cb - ca)
        ia, ib = max(ra, 0), min(rb, n_r)
        ka, kb = max(ca, 0), min(cb, n_c)
        if ib > ia and kb > ka:
            sub[:, ia - ra:ib - ra, ka - ca:kb - ca] = vol[j0:j1, ia:ib, ka:kb].float()
        if not bool(torch.isfinite(sub).all()):
            sub = torch.nan_to_num(sub, nan=0.0, posinf=0.0, neginf=0.0)
        # large crops: integer box-average first (cheap), trimming the remainder symmetrically
        k = min(sub.shape[1] // go_r, sub.shape[2] // go_c)
        if k >= 2:
            tr, tc = sub.shape[1] % k, sub.shape[2] % k
            sub = sub[:, tr // 2:sub.shape[1] - (tr - tr // 2), tc // 2:sub.shape[2] - (tc - tc // 2)]
            sub = F.avg_pool2d(sub[:, None], k)[:, 0]
        down = sub.shape[1] > go_r or sub.shape[2] > go_c
        res = F.interpolate(sub[:, None], size=(go_r, go_c), mode="bilinear", align_corners=False,
                            antialias=down)[:, 0]
        out = torch.einsum("kj,jrc->krc", torch.as_tensor(w, dtype=torch.float32), res)
    a = out.numpy().astype(np.float32, copy=False)
    flat = a.reshape(-1)
    if cfg.norm == "official":
        x = (a - flat.min()) / (float(np.percentile(flat, 95)) + 1e-6)
    else:
        lo, hi = np.percentile(flat, [1.0, 99.0])
        rng = float(hi - lo)
        if rng <= 1e-6:
            rng = float(flat.max() - flat.min()) or 1.0
        x = (a - lo) / rng
    feats = np.array([math.log(h_mm / 25.0), math.log(w_mm / 30.0)], dtype=np.float32)
    return np.ascontiguousarray(x, dtype=np.float32), feats


# ---------------------------------------------------------------------------------------------
# height-probability map
# ---------------------------------------------------------------------------------------------
def _row_span(geom: VertebraGeometry, row_mm: float, mm_per_row: float, n_rows: int) -> tuple[int, int]:
    a = geom.top * row_mm / mm_per_row
    b = geom.bottom * row_mm / mm_per_row
    if b - a < 2.0:
        m = (a + b) / 2
        a, b = m - 1.0, m + 1.0
    i0 = int(max(0, math.floor(a)))
    i1 = int(min(n_rows, math.ceil(b) + 1))
    if i1 <= i0:  # outside the map: clamp to the nearest row
        i0 = int(min(max(0, math.floor(a)), n_rows - 1))
        i1 = i0 + 1
    return i0, i1


def height_probability_map(probs: np.ndarray, spans: Sequence[tuple[int, int]], n_rows: int,
                           pad_multiple: int = 32) -> np.ndarray:
    """P (rows padded to ``pad_multiple``, 24): each body's probabilities over its row span
    (elementwise max where spans overlap); zero elsewhere."""
    h = int(math.ceil(max(n_rows, 1) / pad_multiple) * pad_multiple)
    P = np.zeros((h, probs.shape[1] if probs.ndim == 2 else N_LEVELS), np.float32)
    for p, (i0, i1) in zip(probs, spans):
        if p is None or not np.all(np.isfinite(p)):
            continue
        P[i0:i1] = np.maximum(P[i0:i1], p[None, :])
    return P


# ---------------------------------------------------------------------------------------------
# beam search
# ---------------------------------------------------------------------------------------------
@dataclass
class BeamResult:
    labels: list[str]              # per body, caudal first (the emission rows' order)
    positions: list[int]           # indices into CHAIN
    probabilities: list[float]     # posterior marginal of each chosen label
    cost: float
    hypotheses: list[tuple[float, tuple[int, ...]]] = field(default_factory=list, repr=False)


def gap_ratios(centres_mm: np.ndarray) -> np.ndarray | None:
    """For consecutive bodies (caudal first), distance / local expected spacing (the median of the
    neighbouring pairs' distances, or of all others when there are none). None for < 3 bodies."""
    c = np.asarray(centres_mm, dtype=np.float64)
    n = len(c)
    if n < 3:
        return None
    d = np.hypot(*(c[1:] - c[:-1]).T)
    out = np.ones(n - 1)
    for i in range(n - 1):
        nb = [d[j] for j in (i - 2, i - 1, i + 1, i + 2) if 0 <= j < n - 1]
        ref = float(np.median(nb)) if nb else float(np.median(np.delete(d, i)))
        out[i] = d[i] / ref if ref > 0 else 1.0
    return out


@lru_cache(maxsize=32)
def _transition_tables(cfg_key: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """enter[b] (optional-state penalty, inf when not allowed), mandatory[a, b] (non-optional
    states strictly between), four[a, b] (True when exactly L1 is skipped)."""
    cfg = BeamConfig(*cfg_key)
    n = len(CHAIN)
    enter = np.zeros(n)
    optional = np.zeros(n, bool)
    for i, (_, _, pen) in enumerate(CHAIN):
        if pen is not None:
            optional[i] = True
            enter[i] = float(getattr(cfg, pen))
            if pen in _TRANSITIONAL and not cfg.transitional:
                enter[i] = np.inf
    mand = np.zeros((n, n))
    four = np.zeros((n, n), bool)
    l1 = _CHAIN_NAMES.index("L1")
    s2 = _CHAIN_NAMES.index("S2")
    for a in range(n):
        for b in range(a + 1, n):
            # below S2 the fused sacral segments are contiguous: skipping one counts as a skip
            between = [p for p in range(a + 1, b) if not optional[p] or (a < s2 and p <= s2)]
            mand[a, b] = len(between)
            four[a, b] = between == [l1]
    return enter, mand, four, np.triu(np.ones((n, n), bool), 1)


def _cfg_key(cfg: BeamConfig) -> tuple:
    return tuple(getattr(cfg, f.name) for f in fields(BeamConfig))


def hypothesis_weights(costs: Sequence[float] | np.ndarray) -> np.ndarray:
    """Posterior weights of beam hypotheses from their costs (nats): softmax(-cost)."""
    c = np.asarray(costs, dtype=np.float64)
    w = np.exp(-(c - c.min()))
    return w / w.sum()


def beam_search(emissions: np.ndarray, cfg: BeamConfig | None = None,
                gaps: Sequence[float] | None = None) -> BeamResult:
    """Most probable valid label sequence for bodies ordered caudal first.

    ``emissions`` (n, 24): per body, probabilities over :data:`LEVELS` (rows need not sum to 1).
    ``gaps`` (n - 1): distance ratio of consecutive bodies (:func:`gap_ratios`) or None.
    Hypotheses are ranked by total cost, ties broken by their order of creation (deterministic).
    """
    cfg = cfg or BeamConfig()
    E = np.asarray(emissions, dtype=np.float64).reshape(-1, N_LEVELS)
    n = len(E)
    if n == 0:
        return BeamResult([], [], [], 0.0)
    E = np.where(np.isfinite(E), E, 0.0)
    cost_e = -np.log(np.maximum(E[:, _CHAIN_COL], cfg.emission_floor))  # (n, chain)
    enter, mand, four, upper = _transition_tables(_cfg_key(cfg))
    n_chain = len(CHAIN)
    width = max(1, int(cfg.width))
    start = cost_e[0] + enter
    order = np.lexsort((np.arange(n_chain), start))[:width]
    order = order[np.isfinite(start[order])]
    costs, seqs = start[order], order[:, None]
    gaps_a = None if gaps is None else np.asarray(gaps, dtype=np.float64)
    for i in range(1, n):
        ratio = None if gaps_a is None else float(gaps_a[i - 1])
        trans = cfg.skip_penalty * mand
        alt = cfg.four_lumbar_penalty
        if ratio is not None and np.isfinite(ratio) and cfg.gap_weight > 0:
            # quadratic (a Gaussian likelihood of the ratio): natural spacing jitter costs little,
            # while claiming a missed body across an ordinary-sized gap costs a lot
            trans = trans + cfg.gap_weight * (ratio - (mand + 1.0)) ** 2
            alt = alt + cfg.gap_weight * (ratio - 1.0) ** 2
        if cfg.transitional:
            trans = np.where(four, np.minimum(trans, alt), trans)
        trans = np.where(upper, trans + enter[None, :], np.inf)
        tot = costs[:, None] + trans[seqs[:, -1]] + cost_e[i][None, :]
        flat = tot.ravel()
        ok = np.isfinite(flat)
        if not ok.any():  # more bodies than levels: the remaining ones cannot be labelled
            break
        idx = np.lexsort((np.arange(flat.size), flat))[: min(width, int(ok.sum()))]
        bi, b = np.divmod(idx, n_chain)
        costs, seqs = flat[idx], np.concatenate([seqs[bi], b[:, None]], axis=1)
    best = seqs[0]
    w = hypothesis_weights(costs)
    names = np.asarray(_CHAIN_NAMES, dtype=object)
    labels, probs = [], []
    for i in range(n):
        if i >= seqs.shape[1]:
            labels.append(None)
            probs.append(float("nan"))
            continue
        name = _CHAIN_NAMES[int(best[i])]
        labels.append(name)
        probs.append(float(w[names[seqs[:, i]] == name].sum()))
    hyps = [(float(c), tuple(int(x) for x in sq)) for c, sq in zip(costs, seqs)]
    return BeamResult(labels, [int(x) for x in best], probs, float(costs[0]), hyps)


#: ``level_flags`` vocabulary (``tables/scans.parquet``), each a reason for a reviewer to look.
LEVEL_FLAGS = {
    "no_vertebrae_detected": "nothing was detected, so nothing was labelled",
    "few_vertebrae": "fewer than 3 bodies: the sequence gives little context",
    "no_sacrum_in_view": "lumbar levels without S1: the counting anchor is missing",
    "s1_weakly_detected": "S1 is a body the detector found only at its lower threshold directly below "
                          "the column (spinecohort.detect.find_body_below): the counting anchor is weak",
    "sacrum_cut_by_image_edge": "the image ends within one body height below the lowest body (lumbar, S1 "
                                "or S2): the sacrum that tells S1 from L5 is not in view",
    "disc_below_s1": "a disc-sized gap separates S1 from the S2 below it: a residual S1-S2 disc, or L5 read as "
                     "sacral and named S1 (the body called S2 is then the real S1)",
    "counting_variant_suspected": "the decoding (or a close alternative) has L6, T13 or four lumbar vertebrae",
    "recounted_from_sacrum": "the networks' count above the sacrum disagreed with the body they call S1 "
                             "most clearly; the levels were counted up from that S1",
    "low_confidence": "the labelling's posterior probability is below the threshold",
}
_LUMBAR = ("L1", "L2", "L3", "L4", "L5", "L6")
_VARIANTS = ("L6", "T13")


@dataclass
class LevelSummary:
    """Scan-level doubt about a labelling (``level_confidence``, ``level_flags`` in scans.parquet)."""

    confidence: float                 # posterior of the chosen labelling, beam hypotheses pooled
    flags: tuple[str, ...]            # keys of LEVEL_FLAGS, in that order

    @property
    def flags_text(self) -> str:
        return ";".join(self.flags)


def _field(vertebra: Any, name: str) -> Any:
    """A vertebra's ``name`` whether it is a mapping or a detection object."""
    return vertebra.get(name) if isinstance(vertebra, Mapping) else getattr(vertebra, name, None)


def _has_variant(names: Sequence[str | None]) -> bool:
    present = [n for n in names if n is not None]
    if any(n in _VARIANTS for n in present):
        return True
    # four lumbar vertebrae: T12 directly followed (caudal first) by L2
    return any(a == "L2" and b == "T12" for a, b in zip(present, present[1:]))


#: chain positions of the standard levels (every state but the transitional L6 and T13), caudal first
_STANDARD = [i for i, c in enumerate(CHAIN) if c[0] not in _VARIANTS]


def _local_evidence(emissions: np.ndarray, positions: Sequence[int]) -> list[float]:
    """Per body, its emission's share for the level at chain position ``positions[i]``."""
    E = np.asarray(emissions, dtype=np.float64)
    return [float(E[i, _CHAIN_COL[p]] / max(float(E[i].sum()), 1e-12)) for i, p in enumerate(positions)]


def count_from_sacrum(result: BeamResult, emissions: np.ndarray, gaps: np.ndarray | None) -> BeamResult:
    """The decoding re-counted upwards from its sacrum without transitional states: an L6 becomes L5
    and every body above it one level higher, likewise from a T13 up, and four lumbar vertebrae
    become five (the levels above move down by one); sacral bodies and the levels the decoding
    skipped over a gap (missed detections) are kept. Unchanged without an S1 (no anchor) or
    without a variant.

    Why: without C2 in view an extra or missing vertebra cannot be told from a count shifted by
    one, and on unseen sites the networks' level beliefs do drift by one (on SPIDER's lumbar
    slices the shipped labeller put an L6 above the sacrum in 8 % of series, where the
    annotators, like readers of lumbar series, count from the sacrum). The re-counted bodies get
    their local evidence (emission) as probability; the first decoding's hypotheses stay, so the
    scan's confidence is low and its variant flag set: the doubt stays visible. (A second beam
    search with expensive variants does not do this: it pushes the sacrum down instead, S1 -> S2,
    on 21 of those 30 SPIDER series.)"""
    labels, positions = list(result.labels), list(result.positions)
    if "S1" not in labels or not _has_variant(labels) or len(positions) != len(labels):
        return result
    new = [positions[0]]
    for i in range(1, len(positions)):
        below, here = positions[i - 1], positions[i]
        if CHAIN[here][0].startswith("S"):
            new.append(here)  # the sacrum stays where the decoding found it
            continue
        skipped = sum(1 for p in range(below + 1, here) if p in _STANDARD)
        if CHAIN[below][0] == "L2" and CHAIN[here][0] == "T12" and (gaps is None or gaps[i - 1] < 1.5):
            skipped = 0  # four lumbar vertebrae: L1 absent without a gap, not a missed L1
        rank = _STANDARD.index(new[-1]) + 1 + skipped
        if rank >= len(_STANDARD):  # counted past the top of the chain: keep the decoding
            return result
        new.append(_STANDARD[rank])
    names = [_CHAIN_NAMES[p] for p in new]
    evidence = _local_evidence(emissions, new)
    probabilities = [pr if p == q else ev for p, q, pr, ev in zip(new, positions, result.probabilities, evidence)]
    return BeamResult(names, new, probabilities, result.cost, result.hypotheses)


def raw_probabilities(result: BeamResult, emissions: np.ndarray) -> list[float]:
    """Raw probability per decoded body: the posterior marginal of its chosen label, capped by the
    local evidence (the emission's probability of that level at the body's height)."""
    marg = result.probabilities
    out = []
    for i, lab in enumerate(result.labels):
        if lab is None or i >= len(result.positions):
            out.append(float("nan"))
            continue
        e = emissions[i]
        out.append(min(marg[i], float(e[_CHAIN_COL[result.positions[i]]] / max(e.sum(), 1e-12))))
    return out


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def calibrated_probabilities(raw: Sequence[float], flagged: bool, coef: Sequence[float]) -> list[float]:
    """``level_probability``: sigmoid(a + b * flagged + c * logit(raw)) with ``coef`` = (a, b, c)
    (:attr:`BeamConfig.probability_calibration`); the raw values when ``coef`` is empty."""
    raw = np.asarray(raw, dtype=np.float64)
    if not len(coef):
        return [float(x) for x in raw]
    a, b, c = (float(x) for x in coef)
    z = a + b * float(flagged) + c * _logit(raw)
    return [float(x) if np.isfinite(r) else float("nan") for x, r in zip(1 / (1 + np.exp(-z)), raw)]


def fit_probability_calibration(raw: Sequence[float], flagged: Sequence[bool], correct: Sequence[bool],
                                l2: float = 1.0, iterations: int = 50) -> tuple[float, float, float]:
    """(a, b, c) of :func:`calibrated_probabilities` by L2-regularised logistic regression (Newton
    steps; Platt scaling with the scan's flag as a second feature) on labelled bodies.

    Monotone: a flag never raises ``level_probability`` (b <= 0) and a higher raw posterior never
    lowers it (c >= 0). A feature whose fitted sign says otherwise carries no usable information
    on these bodies; it is left out (coefficient 0) and the rest refitted."""
    X = np.column_stack([np.ones(len(raw)), np.asarray(flagged, float), _logit(raw)])
    y = np.asarray(correct, float)
    use = [0, 1, 2]
    while True:
        w = _fit_logistic(X[:, use], y, l2 * np.diag([0.01 if k == 0 else 1.0 for k in use]), iterations)
        coef = dict(zip(use, w))
        wrong_sign = [k for k in use if (k == 1 and coef[k] > 0) or (k == 2 and coef[k] < 0)]
        if not wrong_sign:
            return float(coef[0]), float(coef.get(1, 0.0)), float(coef.get(2, 0.0))
        use = [k for k in use if k not in wrong_sign]


def _fit_logistic(X: np.ndarray, y: np.ndarray, reg: np.ndarray, iterations: int) -> np.ndarray:
    """Newton steps of L2-regularised logistic regression (``reg``: the penalty matrix; the
    intercept barely shrunk keeps it finite on separable data)."""
    w = np.zeros(X.shape[1])
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-X @ w))
        grad = X.T @ (p - y) + reg @ w
        hess = (X * (p * (1 - p))[:, None]).T @ X + reg + 1e-9 * np.eye(X.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def anchor_at_sacrum(result: BeamResult, emissions: np.ndarray, gaps: np.ndarray | None,
                     n_candidates: int = 3) -> BeamResult:
    """A decoding without any sacral level re-counted from the body the evidence calls S1 most
    clearly: of the lowest ``n_candidates`` bodies, the one with the highest odds of S1 (the
    emission's sacral column against the rest), when those odds exceed 1. That body becomes S1, the
    ones below it S2, S3, ..., and each body above it the next standard level up, one more for
    every body missed where the gap to the body below is a multiple of the usual spacing (``gaps``,
    :func:`gap_ratios`, rounded). Unchanged when the decoding has a sacral level (it found the
    sacrum: on SPIDER's 52_t1 moving its S1 up to the clearest candidate put S1 on L5), when no
    candidate is more S1 than not, or when the count runs past the chain.

    Why: on sites the networks have not seen, the bodies above the sacrum can all read one level
    off, a shifted count that outvotes a sacrum the networks did see (the sacrum called L5 on two
    of the five ivd scans and three of the 54 vb3 scans, leave-one-site-out), while readers, like
    SpineNetV2's lumbar setting, count up from S1; the bodies above are counted rather than decoded
    again, because their evidence is what disagrees. Each re-counted body gets its local evidence
    (emission) for its new level as probability; the decoding's hypotheses are kept, so the scan's
    ``level_confidence`` stays the networks' (low) posterior of the re-count."""
    E = np.asarray(emissions, dtype=np.float64)
    k = min(n_candidates, len(E))
    if k == 0 or len(result.labels) != len(E) or any(lab is not None and lab.startswith("S") for lab in result.labels):
        return result
    odds = [float(E[i, 0]) / max(float(E[i].sum() - E[i, 0]), 1e-12) for i in range(k)]
    top = int(np.argmax(odds))
    s1 = _CHAIN_NAMES.index("S1")
    if odds[top] <= 1.0 or top > s1:
        return result
    positions = [s1 - (top - j) for j in range(top)] + [s1]  # caudal first: ..., S2, S1
    for i in range(top + 1, len(E)):
        ratio = float(gaps[i - 1]) if gaps is not None and np.isfinite(gaps[i - 1]) else 1.0
        rank = _STANDARD.index(positions[-1]) + max(1, int(round(ratio)))
        if rank >= len(_STANDARD):
            return result
        positions.append(_STANDARD[rank])
    names = [_CHAIN_NAMES[p] for p in positions]
    evidence = _local_evidence(E, positions)
    # the first decoding's hypotheses stay: the networks' posterior of the re-count is low, and says so
    return BeamResult(names, positions, evidence, result.cost, result.hypotheses)


def hypotheses_agreeing(result: BeamResult) -> tuple[np.ndarray, np.ndarray]:
    """Per final hypothesis: does it give every body the chosen label (sacral segments below S1,
    which no disc is named after, excepted), and does it hold a transitional count."""
    labels = list(result.labels)
    sacral = {"S2", "S3", "S4", "S5"}
    keep = [i for i, lab in enumerate(labels) if lab is not None and lab not in sacral]
    agree, variant = [], []
    for _, seq in result.hypotheses:
        names = [_CHAIN_NAMES[p] for p in seq]
        agree.append(all(i < len(names) and names[i] == labels[i] for i in keep))
        variant.append(_has_variant(names))
    return np.array(agree, dtype=bool), np.array(variant, dtype=bool)


#: S1-S2 gap (inferior endplate of S1 to superior endplate of S2, mid-slice, in median body heights)
#: from which the two read as separated by a disc. Fused S1-S2 pairs measure 0.03-0.06 (medians per
#: site, shipped labeller on the public-lumbar and SPIDER cases), L5-S1 discs 0.25-0.31 (5th
#: percentile 0.08-0.14); residual S1-S2 discs reach 0.32, so the gap flags rather than relabels.
SACRAL_DISC_GAP = 0.15


def sacral_gap(geoms: Sequence[VertebraGeometry], labels: Sequence[str | None], body_height: float) -> float | None:
    """Gap between the body labelled S1 and the body labelled S2 directly below it (``geoms`` and
    ``labels`` caudal first), in ``body_height`` (the scan's median body height, pixels); None
    without such a pair."""
    for i in range(1, len(labels)):
        if labels[i] == "S1" and labels[i - 1] == "S2":
            return float((geoms[i - 1].top - geoms[i].bottom) / max(body_height, 1.0))
    return None


def level_summary(result: BeamResult, min_confidence: float = 0.7, variant_weight: float = 0.2,
                  probe: BeamResult | None = None, room_below: float | None = None,
                  recounted: bool = False, weak_s1: bool = False, disc_below_s1: bool = False) -> LevelSummary:
    """Doubt about one scan's labelling from its beam search (bodies caudal first).

    ``confidence``: the summed posterior weight (:func:`hypothesis_weights` of the final hypotheses)
    of the hypotheses that give every body the chosen label, sacral segments below S1 (S2-S5, which
    no disc is named after) excepted. A flag is raised for a transitional count in the chosen
    labelling or in alternatives holding at least ``variant_weight`` of the posterior, or in
    ``probe`` (the same bodies decoded with cheaper transitional states), for lumbar levels without
    S1, for an image that ends less than one body height (``room_below``: image below the lowest
    body, in the scan's median body height) under a lowest body called S2, S1 or lumbar, for fewer
    than 3 bodies, for a labelling ``recounted`` from the sacrum (:func:`anchor_at_sacrum`), for an
    S1 that is a weak detection (``weak_s1``), for a disc-sized gap between S1 and S2
    (``disc_below_s1``, :func:`sacral_gap`), and for ``confidence < min_confidence``."""
    labels = list(result.labels)
    if not any(lab is not None for lab in labels):
        return LevelSummary(float("nan"), ("no_vertebrae_detected",))
    confidence, variant_mass = 1.0, 0.0
    if result.hypotheses:
        w = hypothesis_weights([c for c, _ in result.hypotheses])
        agree, variant = hypotheses_agreeing(result)
        confidence, variant_mass = float(w[agree].sum()), float(w[variant].sum())
    flags = []
    n_bodies = sum(lab is not None for lab in labels)
    if n_bodies < 3:
        flags.append("few_vertebrae")
    if any(lab in _LUMBAR for lab in labels) and "S1" not in labels:
        flags.append("no_sacrum_in_view")
    if weak_s1 and "S1" in labels:
        flags.append("s1_weakly_detected")
    lowest = next((lab for lab in labels if lab is not None), None)
    # a lowest "S2" at the image edge is as doubtful as a lowest S1: a cut S1 called S2 puts L5 on S1
    if room_below is not None and room_below < 1.0 and (lowest in ("S1", "S2") or lowest in _LUMBAR):
        flags.append("sacrum_cut_by_image_edge")
    if disc_below_s1 and "S1" in labels and "S2" in labels:
        flags.append("disc_below_s1")
    if _has_variant(labels) or variant_mass >= variant_weight or (probe is not None and _has_variant(probe.labels)):
        flags.append("counting_variant_suspected")
    if recounted:
        flags.append("recounted_from_sacrum")
    if confidence < min_confidence:
        flags.append("low_confidence")
    return LevelSummary(confidence, tuple(flags))


def duplicate_groups(centres_mm: np.ndarray, spans_mm: np.ndarray, fraction: float = 0.4,
                     overlap: float = 0.6, weights: Sequence[float] | None = None) -> list[list[int]]:
    """Bodies (sorted caudal first) that duplicate the previous group's vertebra: centre closer than
    ``fraction`` x the smaller body height to the group's lead body (its member with the largest
    ``weight``, e.g. slice count), or vertical extents (``spans_mm`` (n, 2): top, bottom)
    overlapping the lead's by more than ``overlap`` of the smaller one (two stacked vertebrae
    never do; a second detection of the same body on a few lateral slices, or of a sacral ala,
    does). Each group gets one label."""
    spans = np.asarray(spans_mm, dtype=np.float64).reshape(-1, 2)
    heights = np.maximum(spans[:, 1] - spans[:, 0], 1.0)
    wts = np.ones(len(spans)) if weights is None else np.asarray(weights, dtype=np.float64)
    groups: list[list[int]] = []
    for i in range(len(centres_mm)):
        if groups:
            g = groups[-1]
            k = max(g, key=lambda m: (wts[m], -m))
            h = min(float(heights[k]), float(heights[i]))
            inter = min(spans[k, 1], spans[i, 1]) - max(spans[k, 0], spans[i, 0])
            if math.hypot(*(centres_mm[i] - centres_mm[k])) < fraction * h or inter > overlap * h:
                g.append(i)
                continue
        groups.append([i])
    return groups


# ---------------------------------------------------------------------------------------------
# networks and checkpoints
# ---------------------------------------------------------------------------------------------
def build_appearance_net(cfg: AppearanceConfig) -> nn.Module:
    if cfg.arch == "official":
        from .nets.official import build_official

        return build_official("appearance")
    if cfg.arch == "cpu":
        from .nets.labeller_cpu import AppearanceEnsemble, CPUAppearanceNet

        kw = dict(cfg.arch_kwargs)
        members = int(kw.pop("members", 1))  # > 1: an AppearanceEnsemble of that many nets
        kw.setdefault("n_slices", cfg.grid[0])
        kw.setdefault("n_scalars", 2 if cfg.size_features else 0)
        if members > 1:
            return AppearanceEnsemble([CPUAppearanceNet(**kw) for _ in range(members)])
        return CPUAppearanceNet(**kw)
    raise ValueError(f"unknown appearance architecture {cfg.arch!r} (expected 'cpu' or 'official')")


def build_context_net(cfg: ContextConfig) -> nn.Module:
    if cfg.arch == "official":
        from .nets.official import build_official

        return build_official("context")
    if cfg.arch == "cpu":
        from .nets.labeller_cpu import CPUContextNet

        return CPUContextNet(**cfg.arch_kwargs)
    raise ValueError(f"unknown context architecture {cfg.arch!r} (expected 'cpu' or 'official')")


def save_labeller_checkpoint(path: str | Path, net: nn.Module, config: AppearanceConfig | ContextConfig,
                             meta: Mapping[str, Any] | None = None, half: bool = True) -> None:
    """Weights (floating tensors fp16 when ``half``), config and metadata, readable with
    ``torch.load(weights_only=True)``."""
    fmt = APPEARANCE_FORMAT if isinstance(config, AppearanceConfig) else CONTEXT_FORMAT
    state = storable_state_dict(net, half)
    payload = {"format": fmt, "format_version": 1, "config": config.to_dict(), "state_dict": state,
               "meta": dict(meta or {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint_file(path, payload)


def load_labeller_net(path: str | Path, fmt: str, cfg_cls, builder):
    payload = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ValueError(f"{path}: not a {fmt} checkpoint")
    cfg = cfg_cls.from_dict(payload["config"])
    net = builder(cfg)
    ref = net.state_dict()
    state = {k: (v.to(ref[k].dtype) if k in ref and v.is_floating_point() else v)
             for k, v in payload["state_dict"].items()}
    net.load_state_dict(state, strict=True)
    return net.eval(), cfg, dict(payload.get("meta", {}))


# ---------------------------------------------------------------------------------------------
# the labeller
# ---------------------------------------------------------------------------------------------
class Labeller:
    """Appearance + context networks with their configuration and the beam-search penalties."""

    def __init__(self, appearance: nn.Module, context: nn.Module,
                 appearance_config: AppearanceConfig | None = None,
                 context_config: ContextConfig | None = None, beam: BeamConfig | None = None,
                 device: str = "cpu", meta: Mapping[str, Any] | None = None):
        self.device = torch.device(device)
        self.appearance = appearance.to(self.device).eval()
        self.context = context.to(self.device).eval()
        from .nets.official import param_dtype

        # bfloat16 for official nets under models.precision; the CPU defaults are float32
        self.appearance_dtype, self.context_dtype = param_dtype(self.appearance), param_dtype(self.context)
        self.appearance_config = appearance_config or AppearanceConfig()
        self.context_config = context_config or ContextConfig()
        self.beam = beam or BeamConfig()
        self.meta = dict(meta or {})
        self.duplicate_fraction = 0.4
        self.duplicate_overlap = 0.6
        #: torch threads while labelling (restored afterwards); the CPU networks are small and
        #: many-threaded small ops are slower, above all on a shared CPU. None = leave as set.
        self.threads: int | None = 1
        #: a labelling whose posterior (LevelSummary.confidence) is below this is flagged
        self.min_confidence = 0.7

    @classmethod
    def load(cls, appearance_path: str | Path, context_path: str | Path, device: str = "cpu",
             beam: BeamConfig | None = None) -> "Labeller":
        app, acfg, ameta = load_labeller_net(appearance_path, APPEARANCE_FORMAT, AppearanceConfig, build_appearance_net)
        ctx, ccfg, cmeta = load_labeller_net(context_path, CONTEXT_FORMAT, ContextConfig, build_context_net)
        beam = beam or BeamConfig.from_dict(cmeta.get("beam", {}))
        return cls(app, ctx, acfg, ccfg, beam, device, {"appearance": ameta, "context": cmeta})

    @classmethod
    def official(cls, appearance: nn.Module, context: nn.Module, device: str = "cpu",
                 beam: BeamConfig | None = None) -> "Labeller":
        """Official AppearanceModel / ContextModel (weights loaded by the caller) with the official
        preprocessing constants."""
        return cls(appearance, context, AppearanceConfig.official(), ContextConfig.official(), beam,
                   device, {"source": "official"})

    # -- stages -------------------------------------------------------------------------------
    def appearance_logits(self, volume: np.ndarray, pixel_spacing_mm: Sequence[float],
                          geoms: Sequence[VertebraGeometry]) -> np.ndarray:
        """(n, 24) appearance logits of the given bodies."""
        cfg = self.appearance_config
        if not geoms:
            return np.zeros((0, N_LEVELS), np.float32)
        vol = torch.as_tensor(np.ascontiguousarray(volume, dtype=np.float32))
        crops, feats = zip(*(extract_appearance_volume(vol, pixel_spacing_mm, g, cfg) for g in geoms))
        x = torch.from_numpy(np.stack(crops))[:, None]          # (n, 1, S, R, C)
        f = torch.from_numpy(np.stack(feats))
        out = []
        with torch.inference_mode():
            for b0 in range(0, len(x), max(1, cfg.batch)):
                xb = x[b0:b0 + cfg.batch].to(self.device, self.appearance_dtype)
                if cfg.arch == "official":
                    y = self.appearance(xb.permute(0, 1, 3, 4, 2).contiguous())  # (B,1,R,C,S)
                elif cfg.size_features:
                    y = self.appearance(xb, f[b0:b0 + cfg.batch].to(self.device))
                else:
                    y = self.appearance(xb)
                out.append(y.float().cpu())
        return torch.cat(out).numpy()

    def refine(self, P: np.ndarray) -> np.ndarray:
        """P' = softmax(context(P) / T_ctx) per row; P (H, 24) with H a multiple of pad_multiple."""
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(P, dtype=np.float32))[None, None].to(self.device, self.context_dtype)
            y = self.context(x).float().cpu()[0, 0]
        return torch.softmax(y / self.context_config.temperature, dim=1).numpy()

    def label_geometries(self, volume: np.ndarray, pixel_spacing_mm: Sequence[float],
                         geoms: Sequence[VertebraGeometry], logits: np.ndarray | None = None,
                         weak: Sequence[bool] | None = None) -> tuple[BeamResult, dict[str, Any]]:
        """Labels for bodies given as geometries sorted caudal first; returns the beam result (per
        body) and the intermediate maps (``logits``, ``groups``, ``P``, ``P_refined``,
        ``emissions`` per group). ``weak``: per body, found only at the detector's lower
        threshold (an S1 among them raises ``s1_weakly_detected``)."""
        acfg, ccfg = self.appearance_config, self.context_config
        if logits is None:
            logits = self.appearance_logits(volume, pixel_spacing_mm, geoms)
        z = logits / acfg.temperature
        probs = np.exp(z - z.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        row_mm, col_mm = float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1])
        centres = np.array([[g.centroid[1] * row_mm, g.centroid[2] * col_mm] for g in geoms])
        spans_mm = np.array([[g.top * row_mm, g.bottom * row_mm] for g in geoms])
        n_sl = np.array([g.slices[1] - g.slices[0] + 1.0 for g in geoms])
        groups = duplicate_groups(centres, spans_mm, self.duplicate_fraction, self.duplicate_overlap, n_sl)
        # one body per group: members weighted by their number of slices; the widest gives the span
        wts = [n_sl[g] for g in groups]
        probs_g = np.stack([(probs[g] * w[:, None]).sum(0) / w.sum() for g, w in zip(groups, wts)])
        lead = [g[int(np.argmax(w))] for g, w in zip(groups, wts)]
        n_rows = int(math.ceil(np.asarray(volume).shape[1] * row_mm / ccfg.mm_per_row))
        spans = [_row_span(geoms[m], row_mm, ccfg.mm_per_row, n_rows) for m in lead]
        P = height_probability_map(probs_g, spans, n_rows, ccfg.pad_multiple)
        if ccfg.emission == "appearance":
            Pr, em = P, probs_g
        else:
            Pr = self.refine(P)
            em = np.stack([Pr[i0:i1].mean(axis=0) for i0, i1 in spans])
            if ccfg.emission == "product":
                em = em * probs_g
                em /= em.sum(axis=1, keepdims=True) + 1e-12
        gaps = gap_ratios(centres[lead])
        res_g = beam_search(em, self.beam, gaps)
        recounted = False
        if self.beam.anchor_at_sacrum and "C2" not in res_g.labels:
            anchored = anchor_at_sacrum(res_g, em, gaps)
            recounted = anchored.labels != res_g.labels
            res_g = anchored
        if self.beam.count_from_sacrum_without_c2 and "C2" not in res_g.labels:
            res_g = count_from_sacrum(res_g, em, gaps)
        probe = None
        if self.beam.transitional and self.beam.variant_probe_penalty < min(
                self.beam.six_lumbar_penalty, self.beam.t13_penalty, self.beam.four_lumbar_penalty):
            p = self.beam.variant_probe_penalty
            probe = beam_search(em, replace(self.beam, six_lumbar_penalty=p, t13_penalty=p, four_lumbar_penalty=p),
                                gaps)
        # image left below the lowest body's mid-slice inferior endplate, in the scan's median
        # body height (a tight field of view hides the sacrum; a small sacral segment's own height
        # would understate it); mid-slice extents, not the all-slice box lateral slices inflate
        low = geoms[lead[0]]
        body_height = float(np.median([geoms[m].bottom - geoms[m].top for m in lead]))
        room_below = (np.asarray(volume).shape[1] - 1 - low.bottom) / max(body_height, 1.0)
        weak_s1 = weak is not None and any(weak[m] for gi, members in enumerate(groups)
                                           if res_g.labels[gi] == "S1" for m in members)
        gap_s1 = sacral_gap([geoms[m] for m in lead], res_g.labels, body_height)
        summary = level_summary(res_g, self.min_confidence, probe=probe, room_below=room_below, recounted=recounted,
                                weak_s1=weak_s1, disc_below_s1=gap_s1 is not None and gap_s1 >= SACRAL_DISC_GAP)
        raw = raw_probabilities(res_g, em)
        reported = calibrated_probabilities(raw, bool(summary.flags), self.beam.probability_calibration)
        labels: list[str | None] = [None] * len(geoms)
        probs_out = [float("nan")] * len(geoms)
        pos = [-1] * len(geoms)
        for gi, members in enumerate(groups):
            lab = res_g.labels[gi]
            if lab is None:
                continue
            for m in members:
                labels[m], probs_out[m], pos[m] = lab, reported[gi], res_g.positions[gi]
        res = BeamResult(labels, pos, probs_out, res_g.cost, res_g.hypotheses)
        return res, {"logits": logits, "groups": groups, "P": P, "P_refined": Pr, "emissions": em,
                     "summary": summary, "beam": res_g, "raw_probabilities": raw, "lead": lead}

    def label(self, volume: np.ndarray, pixel_spacing_mm: tuple[float, float], slice_spacing_mm: float,
              vertebrae: Sequence[Mapping[str, Any]]) -> list[tuple[str | None, float]]:
        """(level, probability) per input body, in the input order (:meth:`label_scan` without
        the scan summary)."""
        return self.label_scan(volume, pixel_spacing_mm, slice_spacing_mm, vertebrae)[0]

    def label_scan(self, volume: np.ndarray, pixel_spacing_mm: tuple[float, float], slice_spacing_mm: float,
                   vertebrae: Sequence[Mapping[str, Any]], with_maps: bool = False):
        """(level, probability) per input body, in the input order, and the scan's
        :class:`LevelSummary` (confidence and flags); with ``with_maps`` also the maps of
        :meth:`label_geometries` plus ``input_index`` (the input index of each body it labelled,
        caudal first) and ``rank_of`` (input index -> that position), for calibration.

        ``vertebrae``: dicts with ``polygons`` {slice: (4, 2) (row, col)} and ``centroid``
        (slice, row, col). A body without polygons is placed by its centroid (its appearance
        volume is cut around a 20-pixel box); one with neither gets (None, nan).
        ``slice_spacing_mm`` is accepted for the API (the appearance volume is resampled relative
        to each body's own slice range, as in SpineNet).

        A body marked ``found_at_low_threshold`` (:func:`spinecohort.detect.find_body_below`: a
        weak detection directly below the column) is kept only where the scan is labelled
        without an S1 and, labelled with it, that body reads S1: it is the sacrum a detector
        trained on other sites saw too weakly (flagged ``s1_weakly_detected``). Otherwise it gets
        (None, nan) and the other bodies keep the labels they have without it (below an S1 it
        would be S2 and could pull the count)."""
        weak = {i for i, v in enumerate(vertebrae) if _field(v, "found_at_low_threshold")}
        if not weak:
            return self._label_inputs(volume, pixel_spacing_mm, vertebrae, with_maps)
        strong = [v if i not in weak else {"polygons": None, "centroid": None} for i, v in enumerate(vertebrae)]
        first = self._label_inputs(volume, pixel_spacing_mm, strong, with_maps)
        if any(lab == "S1" for lab, _ in first[0]):
            return first
        second = self._label_inputs(volume, pixel_spacing_mm, vertebrae, with_maps)
        return second if all(second[0][i][0] == "S1" for i in weak) else first

    def _label_inputs(self, volume, pixel_spacing_mm, vertebrae, with_maps: bool):
        vol = np.asarray(volume)
        if vol.ndim != 3:
            raise ValueError(f"expected a (slices, rows, cols) volume, got shape {vol.shape}")
        out: list[tuple[str | None, float]] = [(None, float("nan"))] * len(vertebrae)
        geoms, idx = [], []
        for i, v in enumerate(vertebrae):
            g = vertebra_geometry(_field(v, "polygons"), _field(v, "centroid"))
            if g is not None:
                geoms.append(g)
                idx.append(i)
        if not geoms:
            empty = level_summary(BeamResult([], [], [], 0.0))
            return (out, empty, {"summary": empty, "input_index": [], "rank_of": {}}) if with_maps else (out, empty)
        order = sorted(range(len(geoms)), key=lambda k: (-geoms[k].centroid[1], geoms[k].centroid[2]))
        prev = torch.get_num_threads()
        if self.threads and self.device.type == "cpu" and self.threads != prev:
            torch.set_num_threads(self.threads)
        try:
            weak = [bool(_field(vertebrae[idx[k]], "found_at_low_threshold")) for k in order]
            res, maps = self.label_geometries(vol, pixel_spacing_mm, [geoms[k] for k in order], weak=weak)
        finally:
            if torch.get_num_threads() != prev:
                torch.set_num_threads(prev)
        for rank, k in enumerate(order):
            lab = res.labels[rank] if rank < len(res.labels) else None
            p = res.probabilities[rank] if rank < len(res.probabilities) else float("nan")
            out[idx[k]] = (lab, float(p) if lab is not None else float("nan"))
        if with_maps:
            maps["input_index"] = [idx[k] for k in order]
            maps["rank_of"] = {idx[k]: rank for rank, k in enumerate(order)}
            return out, maps["summary"], maps
        return out, maps["summary"]
