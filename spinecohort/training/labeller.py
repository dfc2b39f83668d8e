"""Training the labelling networks (``spinecohort train labeller``).

Recipe (deterministic given ``--seed``):

1. **Data cache** (``--stage prepare``; resumable, ``--workers`` processes, under ``--cache``,
   default ``/tmp/spinecohort-labeller-cache``; nothing is written into the repository):
   synthetic phantoms ``spinecohort.synthetic.generate_scan(seed)`` for seeds ``0..N-1``
   (fields of view drawn lumbar / whole / cervical 40 / 35 / 25 %, contrasts as the generator
   draws them). For every truth body (partial ones included) ``K`` appearance volumes are cut
   from its polygons after detector-like jitter (:func:`jitter_polygons`: box shift and scale,
   per-corner noise, lateral slices dropped) and stored as uint8, with the body's size features,
   level and vertical extent.
2. **Appearance** (``--stage appearance``): the CPU appearance net on the synthetic scans with
   ``seed % 5 != 4`` plus the public-lumbar TRAINING split: L1-L5 from the masks (the ivd cases'
   L2-L5 between annotated discs), 6 jittered volumes each, and, when ``--detector`` exists, the
   detector's output on those cases (:func:`public_lumbar_detector_items`: detections matched to
   annotated bodies keep their level; the detection right below the lowest / above the highest
   annotated body becomes S1 / the next level up (T12 above L1, T10 above T11), so the visible but
   unannotated neighbours are supervised too), 4 volumes each. Cross-entropy with label smoothing 0.05, level-balanced sampling
   (1/sqrt(count)), AdamW (weight decay 1e-3), one-cycle schedule (max lr 3e-3), batch 32 with
   25 % public-lumbar (``--public-weight``); augmentation: lateral mirror, intensity
   inversion (25 %), gamma, contrast/brightness, blur, noise, size-feature noise and a shared
   subject-size shift (log SD 0.1: real lower thoracic bodies are ~20 % larger than the phantoms'). ``--exclude-source``
   leaves a public-lumbar site out of every stage (leave-one-site-out evaluation). With
   ``--spider DIR`` SPIDER's mid-sagittal lumbar slices (four further hospitals) join the real
   share, levels from ``--spider-teacher``'s confident decodings (self-training,
   :func:`spider_pseudo_items`; half of them also cut tightly below S1), 4 volumes per body.
3. **Context** (``--stage context``): appearance probabilities of the HELD-OUT synthetic scans
   (``seed % 5 == 4``, never seen by the appearance net) form, per level, a pool of realistic
   (mis)classifications. A training map takes one scan's body geometry (any split; extents in mm
   with +-1.5 mm jitter, all scaled by one subject-size factor), a random crop of its height (sub-fields of view), gives every body
   either its own held-out probabilities (held-out scans) or a pool draw of its level, sharpens or
   softens them (temperature x U(0.6, 1.6)), drops each body with p = 0.1 (its rows still
   supervised; S1 with p = 0.25, as detectors miss it on unfamiliar scanners), adds a
   false-positive body with p = 0.15 and, below S1 with p = 0.3, one to three
   fused-sacral-segment detections with S1-like appearance (both unsupervised), and fills P as
   the labeller does. Loss: cross-entropy of P' on every row of every truth body (the public-
   lumbar training geometry included, with its detector-derived S1 / T12, and SPIDER's
   pseudo-labelled geometry with ``--spider``); AdamW (lr 2e-3, one
   cycle), batch 12, 2000 steps.

``--stage all`` (default) runs the three in order and writes the appearance and context checkpoints
(fp16 state dicts; the shipped pair is ``models/appearance-cpu-v4.pt``, ``models/context-cpu-v4.pt``,
trained with ``--spider``: ``models/appearance-cpu-v4.md`` has the command).
Progress goes to ``--log``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import ProgressLog
from ..geometry import jitter_polygons
from ..provenance import atomic_output
from ..label import (
    AppearanceConfig,
    BeamConfig,
    ContextConfig,
    build_appearance_net,
    build_context_net,
    extract_appearance_volume,
    height_probability_map,
    save_labeller_checkpoint,
    vertebra_geometry,
)
from ..shipped import default_model_path
from ..tasks import LEVEL_INDEX, LEVELS

__all__ = [
    "DEFAULT_CACHE",
    "combine_appearance",
    "prepare_synthetic",
    "public_lumbar_items",
    "train_appearance",
    "train_context",
    "main",
]

DEFAULT_CACHE = Path("/tmp/spinecohort-labeller-cache")
#: Beam penalties stored with the shipped context net (the BeamConfig defaults stay those of the
#: official family). Chosen on leave-one-site-out labellings of the public-lumbar TRAINING cases
#: (validation cases never looked at): transitional counts (L6, T13, four lumbar) at 6 nats and
#: sacral segments at 1.5-2 nats let networks trained on phantoms shift a real spine by one at the
#: sacrum (L5 -> S1, S1 -> S2) or insert a T13 (git 3bc86db:models/context-cpu-v2.md); with v3's networks
#: sacral segments at 10-16 nats scored alike, 12 taken (models/context-cpu-v4.md, History). The logistic
#: map of level_probability was fitted the same way (``spinecohort.evaluation.labelling --calibrate-from``).
#: Without C2 in view a transitional decoding is re-counted from the sacrum (label.count_from_sacrum):
#: on SPIDER's lumbar slices the labeller otherwise put an L6 above the sacrum in 8 % of series; and
#: a decoding with no sacral level is re-counted up from the lowest body the networks call S1 more
#: than not (label.anchor_at_sacrum; the clearest such body rather than the most cranial, chosen on
#: the held-out sites' training cases: models/context-cpu-v4.md). With v4's networks (SPIDER in the
#: recipe) neither the flag nor the raw posterior told right from wrong on the leave-one-site-out
#: labellings, so level_probability is the fitted base rate alone.
SHIPPED_BEAM = {"six_lumbar_penalty": 12.0, "s2_penalty": 12.0, "probability_calibration": (2.3017, 0.0, 0.0),
                "count_from_sacrum_without_c2": True, "anchor_at_sacrum": True}
DEFAULT_APPEARANCE = default_model_path("appearance")
DEFAULT_CONTEXT = default_model_path("context")
FOV_PROBS = (("lumbar", 0.40), ("whole", 0.35), ("cervical", 0.25))
#: SD of the per-sample log subject-size shift (appearance size features; context geometry)
SIZE_SHIFT_SD = 0.1
Q_OFFSET, Q_SCALE = 0.5, 100.0   # uint8 storage of normalised volumes: q = (x + 0.5) * 100


def _quantize(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round((x + Q_OFFSET) * Q_SCALE), 0, 255).astype(np.uint8)


def _dequantize(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) / Q_SCALE - Q_OFFSET


def is_heldout_seed(seed: int) -> bool:
    """Synthetic seeds kept from the appearance net (their predictions feed the context net)."""
    return seed % 5 == 4


def fov_for_seed(seed: int) -> str:
    u = np.random.default_rng([seed, 7151]).random()
    acc = 0.0
    for name, p in FOV_PROBS:
        acc += p
        if u < acc:
            return name
    return FOV_PROBS[-1][0]


# ---------------------------------------------------------------------------------------------
# data cache
# ---------------------------------------------------------------------------------------------
def _scan_items(volume, spacing, verts, rng, cfg: AppearanceConfig, k_jitter: int, strength: float = 1.0):
    """Appearance volumes (uint8), features, labels and per-body geometry rows of one scan."""
    vol = torch.as_tensor(np.asarray(volume, dtype=np.float32))
    crops, feats, labels, body = [], [], [], []
    geo = []
    for bi, (level, polys, centroid, partial) in enumerate(verts):
        g0 = vertebra_geometry(polys, centroid)
        if g0 is None:
            continue
        geo.append((LEVEL_INDEX[level], g0.top * spacing[0], g0.bottom * spacing[0],
                    g0.centroid[1] * spacing[0], g0.centroid[2] * spacing[1], float(partial)))
        for k in range(k_jitter):
            jp = jitter_polygons(polys, rng, (0.5 if k == 0 else 1.0) * strength)
            g = vertebra_geometry(jp, None)
            if g is None:
                continue
            x, f = extract_appearance_volume(vol, spacing, g, cfg)
            crops.append(_quantize(x))
            feats.append(f)
            labels.append(LEVEL_INDEX[level])
            body.append(len(geo) - 1)
    s, r, c = cfg.grid
    return dict(
        crops=np.stack(crops) if crops else np.zeros((0, s, r, c), np.uint8),
        feats=np.stack(feats).astype(np.float32) if feats else np.zeros((0, 2), np.float32),
        labels=np.asarray(labels, np.int64), body=np.asarray(body, np.int64),
        geometry=np.asarray(geo, np.float64).reshape(-1, 6),
    )


def _prepare_one(args) -> str:
    seed, cache, k_jitter, cfg_d = args
    torch.set_num_threads(1)
    from ..synthetic import generate_scan

    path = Path(cache) / f"syn_{seed:06d}.npz"
    if path.exists():
        return f"{seed} cached"
    cfg = AppearanceConfig.from_dict(cfg_d)
    fov = fov_for_seed(seed)
    scan = generate_scan(seed, fov=fov)
    rng = np.random.default_rng([seed, 991])
    verts = [(v.level, v.polygons, v.centroid, v.partial) for v in scan.vertebrae]
    sp = (scan.pixel_spacing_mm, scan.pixel_spacing_mm)
    items = _scan_items(scan.volume, sp, verts, rng, cfg, k_jitter)
    height_mm = scan.volume.shape[1] * scan.pixel_spacing_mm
    with atomic_output(path) as handle:  # parallel workers and a killed run never leave a partial file
        np.savez(handle, **items, seed=seed, fov=fov, contrast=scan.contrast, height_mm=height_mm)
    return f"{seed} {fov} {scan.contrast} {len(items['labels'])} volumes"


def prepare_synthetic(cache: Path, n: int, k_jitter: int = 3, workers: int = 1,
                      cfg: AppearanceConfig | None = None, log=print, start: int = 0) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    cfg = cfg or AppearanceConfig()
    jobs = [(s, str(cache), k_jitter, cfg.to_dict()) for s in range(start, start + n)]
    t0 = time.time()
    if workers <= 1:
        for i, j in enumerate(jobs):
            msg = _prepare_one(j)
            if i % 10 == 0:
                log(f"prepare {i + 1}/{n} {msg} ({time.time() - t0:.0f} s)")
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for i, msg in enumerate(pool.imap(_prepare_one, jobs)):
                if i % 10 == 0:
                    log(f"prepare {i + 1}/{n} {msg} ({time.time() - t0:.0f} s)")
    log(f"prepare done: {n} scans in {time.time() - t0:.0f} s")


def _resize_crops(crops: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """uint8 volumes (N, S, R, C) cached at another in-plane size -> ``grid`` (antialiased)."""
    if crops.shape[1:] == tuple(grid) or len(crops) == 0:
        return crops
    x = torch.from_numpy(_dequantize(crops))
    n, s, r, c = x.shape
    y = F.interpolate(x.reshape(n * s, 1, r, c), size=tuple(grid[1:]), mode="bilinear",
                      align_corners=False, antialias=True).reshape(n, s, grid[1], grid[2])
    return _quantize(y.numpy())


def load_synthetic_cache(cache: Path, n: int, start: int = 0, grid: Sequence[int] | None = None) -> list[dict]:
    out = []
    for s in range(start, start + n):
        p = cache / f"syn_{s:06d}.npz"
        if not p.exists():
            continue
        with np.load(p, allow_pickle=False) as d:
            item = {k: d[k] for k in d.files}
        if grid is not None:
            item["crops"] = _resize_crops(item["crops"], grid)
        out.append(item)
    return out


def public_lumbar_items(split: str = "train", k_jitter: int = 6, cfg: AppearanceConfig | None = None,
                        seed: int = 0, root=None, exclude_sources: Sequence[str] = ()) -> list[dict]:
    """Appearance items of the public-lumbar cases of one split (annotated bodies only), without
    the sites in ``exclude_sources``."""
    from ..publiclumbar import list_cases, load_case

    cfg = cfg or AppearanceConfig()
    out = []
    for ref in list_cases(root, split=split):
        if ref.source in exclude_sources:
            continue
        case = load_case(ref)
        rng = np.random.default_rng([seed, ref.number, 17])
        verts = [(v.level, v.polygons, v.centroid, False) for v in case.vertebrae
                 if v.polygons and v.level in LEVEL_INDEX]
        verts.sort(key=lambda t: -t[2][1])
        items = _scan_items(case.volume, case.pixel_spacing_mm, verts, rng, cfg, k_jitter)
        items.update(seed=-1, fov="public-lumbar", name=ref.name,
                     height_mm=case.volume.shape[1] * case.pixel_spacing_mm[0])
        out.append(items)
    return out


def public_lumbar_detector_items(detector, split: str = "train", k_jitter: int = 6,
                                 cfg: AppearanceConfig | None = None, seed: int = 0, root=None,
                                 log=print, exclude_sources: Sequence[str] = (),
                                 tight_share: float = 0.0) -> list[dict]:
    """Appearance items of public-lumbar cases from the detector's output: detections matched to
    an annotated body take its level (and keep the detector's polygons), and the visible but
    unannotated neighbours the detector finds right below / above the annotated span
    (:func:`spinecohort.publiclumbar.neighbour_bodies`: S1 below L5, T12 above L1, T10 above T11)
    are supervised with their level. Other detections are not used. A ``tight_share`` of the cases
    with an S1 is added a second time cut tightly below it (:func:`tight_cut_items`)."""
    from ..evaluation.labelling import gt_from_polys, match_bodies
    from ..publiclumbar import list_cases, load_case, neighbour_bodies

    cfg = cfg or AppearanceConfig()
    out = []
    n_extra = 0
    for ref in list_cases(root, split=split):
        if ref.source in exclude_sources:
            continue
        case = load_case(ref)
        sp = case.pixel_spacing_mm
        gt = [gt_from_polys(v.level, v.polygons, v.centroid, sp) for v in case.vertebrae
              if v.polygons and v.level in LEVEL_INDEX]
        if len(gt) < 2:
            continue
        dets = detector.detect(case.volume, sp, search_below=False)
        centres = np.array([[d.centroid[1] * sp[0], d.centroid[2] * sp[1]] for d in dets]).reshape(-1, 2)
        match = match_bodies(gt, centres)
        verts = [(g.level, dets[j].polygons, dets[j].centroid, False) for i, g in enumerate(gt)
                 for j in [match.get(i)] if j is not None]
        extra = neighbour_bodies(case, dets)
        verts += [(v.level, v.polygons, v.centroid, False) for v in extra]
        n_extra += len(extra)
        verts.sort(key=lambda t: -t[2][1])
        rng = np.random.default_rng([seed, ref.number, 23])
        items = _scan_items(case.volume, sp, verts, rng, cfg, k_jitter, strength=0.5)
        items.update(seed=-1, fov="public-lumbar", name=ref.name, height_mm=case.volume.shape[1] * sp[0])
        out.append(items)
        if tight_share > 0 and any(v[0] == "S1" for v in verts) and rng.random() < tight_share:
            items = tight_cut_items(case.volume, sp, verts, rng, cfg, k_jitter, 0.5)
            items.update(seed=-1, fov="public-lumbar-tight", name=f"{ref.name}-tight")
            out.append(items)
    n_tight = sum(it["fov"] == "public-lumbar-tight" for it in out)
    log(f"public-lumbar {split} via the detector: {len(out) - n_tight} cases (+{n_tight} cut tightly below S1), "
        f"{n_extra} S1 / upper-neighbour bodies added")
    return out


def _only_levels(items: dict, levels: Sequence[str] | None) -> dict:
    """Appearance volumes of ``items`` restricted to ``levels`` (geometry untouched)."""
    if levels is None:
        return items
    keep = np.isin(items["labels"], [LEVEL_INDEX[lvl] for lvl in levels if lvl in LEVEL_INDEX])
    return {**items, **{k: items[k][keep] for k in ("crops", "feats", "labels", "body")}}


def tight_cut_items(volume, spacing, bodies, rng: np.random.Generator, cfg: AppearanceConfig, k_jitter: int,
                    strength: float) -> dict:
    """:func:`_scan_items` of a scan cut as a tightly framed lumbar series is: the image ends at a row
    drawn between 30 % down S1 and half a body below it, bodies above the cut kept. ``bodies``
    (level, polygons, centroid, partial) must hold an S1. Why: where real S1s are only ever seen
    with the sacrum below them, a lowest body at the image edge reads as S1 (the L5 -> S1 error of
    tightly framed series)."""
    s1_rows = np.concatenate([np.asarray(q)[:, 0] for lvl, polys, _, _ in bodies if lvl == "S1"
                              for q in polys.values()])
    top, bottom = float(s1_rows.min()), float(s1_rows.max())
    cut = min(int(rng.uniform(top + 0.3 * (bottom - top), bottom + 0.5 * (bottom - top))), volume.shape[1])
    kept = [b for b in bodies if min(np.asarray(q)[:, 0].min() for q in b[1].values()) < cut - 3]
    items = _scan_items(volume[:, :cut], spacing, kept, rng, cfg, k_jitter, strength=strength)
    items["height_mm"] = cut * spacing[0]
    return items


def spider_pseudo_items(detector, teacher, root, k_jitter: int = 4, cfg: AppearanceConfig | None = None,
                        seed: int = 0, log=print, tight_share: float = 0.5,
                        levels: Sequence[str] | None = None) -> list[dict]:
    """Appearance items of SPIDER's mid-sagittal lumbar slices (van der Graaf et al. 2024; four
    hospitals, Philips and Siemens, 1.5 / 3 T, T1 / T2 / T2-SPACE) labelled by a ``teacher``
    :class:`spinecohort.label.Labeller` (self-training: SPIDER gives no vertebra positions).
    Each slice runs as a 1-slice volume through ``detector`` and the teacher; only series the
    teacher decodes with an S1 and without any level flag are kept (a confident count from the
    sacrum), every detected body of them supervised with the teacher's level. What this adds is
    real S1s and lumbar bodies from scanners the public-lumbar sites do not cover; the levels are
    the teacher's, so for leave-one-site-out figures the teacher must be the fold's own labeller.

    SPIDER's slices show the whole sacrum; real lumbar series are often framed tightly (the image
    ends inside S1). A ``tight_share`` of the kept series is added a second time cut at a row
    drawn between 30 % down S1 and half a body below it (bodies below the cut dropped), so that
    real S1s do not teach that a lowest body at the image edge is S1.

    ``levels``: only the bodies the teacher gives one of these levels become appearance volumes
    (all when None); the geometry (context training) keeps every body."""
    import pandas as pd

    from .grader_real import spider_volume

    cfg = cfg or AppearanceConfig()
    root = Path(root)
    series = pd.read_csv(root / "series.csv", dtype={"series": str})
    out, n_skipped = [], 0
    t0 = time.time()
    for r in series.itertuples(index=False):
        vol, sp = spider_volume(root, r)
        with torch.inference_mode():
            dets = detector.detect(vol, sp, search_below=False)
            verts = [{"vertebra_id": k, "polygons": d.polygons, "centroid": d.centroid} for k, d in enumerate(dets)]
            labels, summary = teacher.label_scan(vol, sp, float(r.slice_thickness_mm), verts) if verts else ([], None)
        names = [lvl for lvl, _ in labels]
        if summary is None or summary.flags or "S1" not in names:
            n_skipped += 1
            continue
        bodies = [(lvl, d.polygons, d.centroid, False) for lvl, d in zip(names, dets) if lvl in LEVEL_INDEX]
        bodies.sort(key=lambda t: -t[2][1])
        rng = np.random.default_rng([seed, int(r.patient), len(out), 29])
        items = _only_levels(_scan_items(vol, sp, bodies, rng, cfg, k_jitter, strength=0.5), levels)
        items.update(seed=-1, fov="spider", name=str(r.series), height_mm=vol.shape[1] * sp[0])
        out.append(items)
        if rng.random() < tight_share:
            items = _only_levels(tight_cut_items(vol, sp, bodies, rng, cfg, k_jitter, 0.5), levels)
            items.update(seed=-1, fov="spider-tight", name=f"{r.series}-tight")
            out.append(items)
    n_tight = sum(it["fov"] == "spider-tight" for it in out)
    log(f"SPIDER pseudo-labelled by the teacher: {len(out) - n_tight} series kept (+{n_tight} cut tightly), "
        f"{n_skipped} skipped (no S1 or a level flag), {sum(len(it['geometry']) for it in out)} bodies "
        f"({time.time() - t0:.0f} s)")
    return out


# ---------------------------------------------------------------------------------------------
# appearance training
# ---------------------------------------------------------------------------------------------
def augment_batch(x: np.ndarray, rng: np.random.Generator, rotate_deg: float = 0.0) -> np.ndarray:
    """(B, S, R, C) normalised volumes: lateral mirror, in-plane rotation by U(-rotate_deg,
    rotate_deg) about the crop centre (when > 0), inversion, gamma, contrast, blur, noise."""
    x = x.copy()
    b = len(x)
    for i in range(b):
        v = x[i]
        if rng.random() < 0.5:
            v = v[::-1]
        if rotate_deg > 0:
            from scipy import ndimage

            v = ndimage.rotate(v, rng.uniform(-rotate_deg, rotate_deg), axes=(1, 2), reshape=False,
                               order=1, mode="nearest")
        if rng.random() < 0.25:  # contrast inversion (T1 vs T2 / STIR marrow) around the robust range
            v = 1.0 - v
        g = math.exp(rng.normal(0, 0.25))
        v = np.sign(v) * np.abs(v) ** g
        v = v * rng.uniform(0.8, 1.2) + rng.normal(0, 0.08)
        if rng.random() < 0.3:
            from scipy import ndimage

            v = ndimage.gaussian_filter(v, (0, rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0)))
        v = v + rng.normal(0, rng.uniform(0.0, 0.06), v.shape)
        x[i] = v
    return x.astype(np.float32)


def _gather(items: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    crops = np.concatenate([it["crops"] for it in items])
    feats = np.concatenate([it["feats"] for it in items])
    labels = np.concatenate([it["labels"] for it in items])
    src = np.concatenate([np.full(len(it["labels"]), i) for i, it in enumerate(items)])
    return crops, feats, labels, src


def evaluate_appearance(net, crops, feats, labels, batch: int = 256) -> tuple[float, float, np.ndarray]:
    """(accuracy, within-one accuracy, logits) of the appearance net on uint8 volumes."""
    net.eval()
    out = []
    with torch.inference_mode():
        for b0 in range(0, len(crops), batch):
            x = torch.from_numpy(_dequantize(crops[b0:b0 + batch]))[:, None]
            f = torch.from_numpy(feats[b0:b0 + batch])
            out.append(net(x, f).float())
    logits = torch.cat(out).numpy() if out else np.zeros((0, 24), np.float32)
    pred = logits.argmax(1)
    acc = float(np.mean(pred == labels)) if len(labels) else float("nan")
    acc1 = float(np.mean(np.abs(pred - labels) <= 1)) if len(labels) else float("nan")
    return acc, acc1, logits


def train_appearance(syn: list[dict], public: list[dict], public_val: list[dict], *, steps: int,
                     batch: int = 32, lr: float = 3e-3, seed: int = 0, public_weight: float = 0.25,
                     cfg: AppearanceConfig | None = None, log=print, minutes: float | None = None,
                     rotate_deg: float = 0.0):
    cfg = cfg or AppearanceConfig()
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 1])
    net = build_appearance_net(cfg)
    tr = [it for it in syn if not is_heldout_seed(int(it["seed"]))]
    va = [it for it in syn if is_heldout_seed(int(it["seed"]))]
    sc, sf, sl, _ = _gather(tr)
    pc, pf, pl, _ = _gather(public) if public else (sc[:0], sf[:0], sl[:0], None)
    # level-balanced sampling over synthetic volumes (rare levels: C2, S1, cervical)
    counts = np.bincount(sl, minlength=24).astype(float)
    wts = 1.0 / np.sqrt(np.maximum(counts[sl], 1.0))
    wts /= wts.sum()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    n_pub = int(round(batch * public_weight)) if len(pl) else 0
    log(f"appearance: {len(sl)} synthetic volumes ({len(tr)} scans), {len(pl)} public, "
        f"{sum(p.numel() for p in net.parameters())} parameters")
    for step in range(steps):
        net.train()
        i_s = rng.choice(len(sl), batch - n_pub, p=wts)
        xs, fs, ys = [sc[i_s]], [sf[i_s]], [sl[i_s]]
        if n_pub:
            i_p = rng.integers(0, len(pl), n_pub)
            xs.append(pc[i_p]); fs.append(pf[i_p]); ys.append(pl[i_p])
        x = augment_batch(_dequantize(np.concatenate(xs)), rng, rotate_deg)
        # + a shared subject-size shift: real spines are larger than the phantoms' and vary more
        # (lower thoracic bodies by ~20 %), so absolute size must not name a level on its own
        f = (np.concatenate(fs) + rng.normal(0, 0.03, (len(x), 2)) + rng.normal(0, SIZE_SHIFT_SD, (len(x), 1))
             ).astype(np.float32)
        y = torch.from_numpy(np.concatenate(ys))
        logits = net(torch.from_numpy(x)[:, None], torch.from_numpy(f))
        loss = F.cross_entropy(logits, y, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"appearance step {step}/{steps} loss {float(loss.detach()):.3f} lr {sched.get_last_lr()[0]:.2e} "
                f"({time.time() - t0:.0f} s)")
        if step % 1000 == 999 or step == steps - 1:
            msg = []
            if va:
                vc, vf, vl, _ = _gather(va)
                a, a1, _ = evaluate_appearance(net, vc, vf, vl)
                msg.append(f"held-out synthetic acc {a:.3f} +-1 {a1:.3f}")
            if public_val:
                vc, vf, vl, _ = _gather(public_val)
                a, a1, _ = evaluate_appearance(net, vc, vf, vl)
                msg.append(f"public val acc {a:.3f} +-1 {a1:.3f}")
            log("appearance eval: " + "; ".join(msg))
        if minutes is not None and time.time() - t0 > minutes * 60:
            log(f"appearance: time limit at step {step}")
            break
    net.eval()
    return net


# ---------------------------------------------------------------------------------------------
# context training
# ---------------------------------------------------------------------------------------------
class ContextSampler:
    """Random height-probability maps with targets (see the module docstring)."""

    def __init__(self, scans: list[dict], pools: dict[int, np.ndarray], own: dict[int, np.ndarray],
                 temperature: float = 1.0, drop_p: float = 0.1, fp_p: float = 0.15, pad_multiple: int = 32,
                 sacral_p: float = 0.3, s1_drop_p: float = 0.25):
        self.scans = scans
        self.pools = pools          # level -> (m, 24) held-out logits
        self.own = own              # scan index -> (n_bodies, 24) held-out logits (mean over jitters)
        self.temperature = temperature
        self.drop_p = drop_p
        self.fp_p = fp_p
        self.sacral_p = sacral_p
        # real scans from unseen sites often lose S1 to the detector: L5 must stay L5 without it
        self.s1_drop_p = s1_drop_p
        self.pad = pad_multiple

    def sample(self, rng: np.random.Generator):
        si = int(rng.integers(len(self.scans)))
        sc = self.scans[si]
        geo = sc["geometry"]  # (n, 6): level, top, bottom, crow, ccol, partial (mm)
        height = float(sc["height_mm"])
        if len(geo) == 0:
            return None
        size = math.exp(rng.normal(0, SIZE_SHIFT_SD))  # subject size, as for the appearance net
        geo = np.concatenate([geo[:, :1], geo[:, 1:5] * size, geo[:, 5:]], axis=1)
        height *= size
        # random sub-field of view (crop of the height), keeping >= 1 body
        lo, hi = 0.0, height
        if rng.random() < 0.35 and len(geo) > 3:
            span = rng.uniform(0.35, 0.9) * height
            lo = rng.uniform(0, height - span)
            hi = lo + span
        keep = [(i, g) for i, g in enumerate(geo) if g[2] > lo + 3 and g[1] < hi - 3]
        if not keep:
            return None
        n_rows = int(math.ceil(hi - lo))
        own = self.own.get(si)
        use_own = own is not None and rng.random() < 0.6
        tscale = self.temperature * math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
        probs, spans, tgt_spans = [], [], []
        for i, g in keep:
            lev = int(g[0])
            top = g[1] - lo + rng.normal(0, 1.5)
            bot = g[2] - lo + rng.normal(0, 1.5)
            if bot - top < 2:
                m = (top + bot) / 2
                top, bot = m - 1, m + 1
            i0, i1 = max(0, int(math.floor(top))), min(n_rows, int(math.ceil(bot)) + 1)
            if i1 <= i0:
                continue
            tgt_spans.append((i0, i1, lev))
            if rng.random() < (self.s1_drop_p if lev == 0 else self.drop_p):
                continue
            if use_own:
                z = own[i]
            else:
                pool = self.pools.get(lev)
                if pool is None or len(pool) == 0:
                    continue
                z = pool[int(rng.integers(len(pool)))]
            z = z / tscale
            p = np.exp(z - z.max())
            probs.append(p / p.sum())
            spans.append((i0, i1))
        # fused sacral segments below S1 found by a detector: S1-like appearance, unsupervised
        s1 = [g for _, g in keep if int(g[0]) == 0]
        if s1 and rng.random() < self.sacral_p and self.pools.get(0) is not None:
            bottom = s1[0][2] - lo
            h = s1[0][2] - s1[0][1]
            for _ in range(int(rng.integers(1, 4))):
                h *= rng.uniform(0.65, 0.9)
                top = bottom + rng.uniform(1.0, 4.0)
                bottom = top + h
                if bottom > n_rows - 1:
                    break
                z = self.pools[0][int(rng.integers(len(self.pools[0])))] / (tscale * rng.uniform(1.0, 2.5))
                p = np.exp(z - z.max())
                probs.append(p / p.sum())
                spans.append((int(top), int(math.ceil(bottom)) + 1))
        if rng.random() < self.fp_p and n_rows > 30:
            c = rng.uniform(0, n_rows)
            hh = rng.uniform(5, 15)
            z = rng.normal(0, 2.0, 24)
            p = np.exp(z - z.max())
            probs.append(p / p.sum())
            spans.append((max(0, int(c - hh)), min(n_rows, int(c + hh))))
        if probs:
            P = height_probability_map(np.stack(probs), spans, n_rows, self.pad)
        else:
            P = np.zeros((int(math.ceil(n_rows / self.pad) * self.pad), 24), np.float32)
        tgt = np.full(P.shape[0], -100, np.int64)
        for i0, i1, lev in tgt_spans:
            tgt[i0:i1] = lev
        return P, tgt


def _collate(samples):
    h = max(P.shape[0] for P, _ in samples)
    x = torch.zeros(len(samples), 1, h, 24)
    y = torch.full((len(samples), h), -100, dtype=torch.long)
    for i, (P, t) in enumerate(samples):
        x[i, 0, :P.shape[0]] = torch.from_numpy(P)
        y[i, :len(t)] = torch.from_numpy(t)
    return x, y


def train_context(sampler: ContextSampler, *, steps: int, batch: int = 12, lr: float = 2e-3, seed: int = 0,
                  cfg: ContextConfig | None = None, log=print, minutes: float | None = None):
    cfg = cfg or ContextConfig()
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 2])
    net = build_context_net(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    log(f"context: {len(sampler.scans)} geometries, {sum(p.numel() for p in net.parameters())} parameters")
    run = []
    for step in range(steps):
        net.train()
        samples = []
        while len(samples) < batch:
            s = sampler.sample(rng)
            if s is not None:
                samples.append(s)
        x, y = _collate(samples)
        out = net(x)[:, 0] / cfg.temperature  # (B, H, 24)
        loss = F.cross_entropy(out.reshape(-1, 24), y.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            m = y >= 0
            acc = float((out.argmax(-1)[m] == y[m]).float().mean()) if m.any() else float("nan")
        run.append((float(loss.detach()), acc))
        if step % 100 == 0 or step == steps - 1:
            l_, a_ = np.mean(run, axis=0)
            run = []
            log(f"context step {step}/{steps} loss {l_:.3f} row acc {a_:.3f} ({time.time() - t0:.0f} s)")
        if minutes is not None and time.time() - t0 > minutes * 60:
            log(f"context: time limit at step {step}")
            break
    net.eval()
    return net


def combine_appearance(member_paths: Sequence[str | Path], out: str | Path, argv: Sequence[str] = ()) -> Path:
    """One appearance checkpoint holding several trained appearance nets as an
    :class:`spinecohort.nets.labeller_cpu.AppearanceEnsemble` (``arch_kwargs.members``). The
    members must share the configuration; each one's file name, sha256 and metadata are kept."""
    from ..label import APPEARANCE_FORMAT, load_labeller_net
    from ..nets.labeller_cpu import AppearanceEnsemble
    from ..provenance import sha256_file

    if len(member_paths) < 2:
        raise ValueError("an appearance ensemble needs at least two member checkpoints")
    nets, metas, cfg = [], [], None
    for path in member_paths:
        net, member_cfg, meta = load_labeller_net(path, APPEARANCE_FORMAT, AppearanceConfig, build_appearance_net)
        if isinstance(net, AppearanceEnsemble):
            raise ValueError(f"{path}: already an ensemble; combine single networks")
        if cfg is not None and member_cfg.to_dict() != cfg.to_dict():
            raise ValueError(f"{path}: configuration differs from {member_paths[0]}")
        cfg = member_cfg
        nets.append(net)
        metas.append({"file": Path(path).name, "sha256": sha256_file(path), "meta": meta})
    # build_appearance_net rebuilds this same module from arch_kwargs.members when it is loaded
    cfg = replace(cfg, arch_kwargs={**cfg.arch_kwargs, "members": len(nets)})
    ensemble = AppearanceEnsemble(nets)
    save_labeller_checkpoint(out, ensemble, cfg, {"recipe": "spinecohort.training.labeller --stage ensemble",
                                                  "argv": list(argv), "members": metas})
    return Path(out)


def heldout_logits(net, syn: list[dict]) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], list[dict]]:
    """Per-level pools and per-scan (mean over jitters) logits of the held-out synthetic scans."""
    pools: dict[int, list] = {}
    own: dict[int, np.ndarray] = {}
    for si, it in enumerate(syn):
        if not is_heldout_seed(int(it["seed"])) or len(it["labels"]) == 0:
            continue
        _, _, z = evaluate_appearance(net, it["crops"], it["feats"], it["labels"])
        for lev, row in zip(it["labels"], z):
            pools.setdefault(int(lev), []).append(row)
        nb = len(it["geometry"])
        acc = np.zeros((nb, 24))
        cnt = np.zeros(nb)
        # the first jitter of each body is the mildest; use it (closest to a good detection)
        for b, row in zip(it["body"], z):
            if cnt[b] == 0:
                acc[b] = row
            cnt[b] += 1
        own[si] = acc
    return {k: np.stack(v) for k, v in pools.items()}, own, syn


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spinecohort train labeller", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=["prepare", "appearance", "context", "all", "beam", "ensemble"], default="all",
                   help="beam: only rewrite the beam-search penalties stored in --context-out; ensemble: "
                        "combine the --ensemble-members appearance checkpoints into --appearance-out")
    p.add_argument("--ensemble-members", nargs="+", default=None, metavar="APPEARANCE",
                   help="with --stage ensemble: trained appearance checkpoints read as one (mean log-probabilities)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--n-synthetic", type=int, default=400)
    p.add_argument("--k-jitter", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--appearance-out", default=str(DEFAULT_APPEARANCE))
    p.add_argument("--context-out", default=str(DEFAULT_CONTEXT))
    p.add_argument("--appearance-steps", type=int, default=4000)
    p.add_argument("--context-steps", type=int, default=2000)
    p.add_argument("--public-weight", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--minutes", type=float, default=None, help="per-network wall-clock limit")
    p.add_argument("--public-lumbar", default=None)
    p.add_argument("--detector", default=str(default_model_path("detector")),
                   help="detector used to find S1/T12 on public-lumbar training cases (skipped if absent)")
    p.add_argument("--spider", default=None,
                   help="SPIDER mid-sagittal folder: add its slices, levels from --spider-teacher (self-training)")
    p.add_argument("--spider-teacher", nargs=2, metavar=("APPEARANCE", "CONTEXT"),
                   default=[str(DEFAULT_APPEARANCE), str(DEFAULT_CONTEXT)],
                   help="labeller whose confident SPIDER decodings supervise (leave-one-site-out: the fold's own)")
    p.add_argument("--spider-levels", nargs="+", default=None, metavar="LEVEL",
                   help="SPIDER bodies the appearance net learns from (default all; the context net sees all)")
    p.add_argument("--exclude-source", action="append", default=[],
                   help="leave this public-lumbar site (vb2, vb3, ivd) out of training; repeatable "
                        "(leave-one-site-out evaluation)")
    p.add_argument("--variant-penalty", type=float, default=SHIPPED_BEAM["six_lumbar_penalty"],
                   help="nats for a sixth lumbar vertebra, a T13 or four lumbar vertebrae (stored with the context net)")
    p.add_argument("--sacral-penalty", type=float, default=SHIPPED_BEAM["s2_penalty"],
                   help="nats for each detection labelled a sacral segment below S1 (S2-S5)")
    p.add_argument("--probability-calibration", type=float, nargs="*", default=SHIPPED_BEAM["probability_calibration"],
                   metavar="COEF", help="a b c of level_probability = sigmoid(a + b flagged + c logit(raw)) (fit them "
                                        "with spinecohort.evaluation.labelling --calibrate-from on leave-one-site-out runs)")
    p.add_argument("--count-from-sacrum", action=argparse.BooleanOptionalAction,
                   default=SHIPPED_BEAM["count_from_sacrum_without_c2"],
                   help="without C2 in view, re-count a decoding with L6 / T13 / four lumbar from the sacrum")
    p.add_argument("--anchor-at-sacrum", action=argparse.BooleanOptionalAction,
                   default=SHIPPED_BEAM["anchor_at_sacrum"],
                   help="without C2 in view, count up from the lowest body the networks call S1 most clearly "
                        "when the decoding does not")
    p.add_argument("--rotate-deg", type=float, default=0.0,
                   help="appearance augmentation: rotate each volume in-plane by up to this many degrees")
    p.add_argument("--public-tight-share", type=float, default=0.0,
                   help="share of public-lumbar training cases with an S1 added again cut tightly below it "
                        "(tight_cut_items; 0 in the shipped recipe)")
    p.add_argument("--log", default=None)
    args = p.parse_args(argv)
    beam = replace(BeamConfig(), six_lumbar_penalty=args.variant_penalty, t13_penalty=args.variant_penalty,
                   four_lumbar_penalty=args.variant_penalty, s2_penalty=args.sacral_penalty,
                   sacral_penalty=args.sacral_penalty,
                   probability_calibration=tuple(args.probability_calibration),
                   count_from_sacrum_without_c2=args.count_from_sacrum, anchor_at_sacrum=args.anchor_at_sacrum)
    if args.stage == "ensemble":
        if not args.ensemble_members:
            raise SystemExit("--stage ensemble needs --ensemble-members")
        out = combine_appearance(args.ensemble_members, args.appearance_out,
                                 list(argv if argv is not None else sys.argv[1:]))
        print(f"appearance ensemble of {len(args.ensemble_members)} nets written to {out}")
        return 0
    if args.stage == "beam":
        from ..label import CONTEXT_FORMAT, load_labeller_net

        cnet, ccfg, cmeta = load_labeller_net(args.context_out, CONTEXT_FORMAT, ContextConfig, build_context_net)
        cmeta["beam"] = beam.to_dict()
        cmeta["beam_argv"] = list(argv if argv is not None else sys.argv[1:])
        save_labeller_checkpoint(args.context_out, cnet, ccfg, cmeta)
        print(f"beam settings of {args.context_out}: {json.dumps(cmeta['beam'])}")
        return 0
    torch.set_num_threads(max(1, args.threads))
    log = ProgressLog(args.log)

    cache = Path(args.cache)
    acfg, ccfg = AppearanceConfig(), ContextConfig()
    t_all = time.time()
    if args.stage in ("prepare", "all"):
        prepare_synthetic(cache, args.n_synthetic, args.k_jitter, args.workers, acfg, log)
    detector = None
    if args.detector and Path(args.detector).exists() and args.stage in ("appearance", "context", "all"):
        from ..detect import Detector

        detector = Detector.load(args.detector)
        log(f"detector {args.detector} found: public-lumbar S1/T12 supervised from its detections")
    pub_det: list[dict] = []
    spider: list[dict] = []
    if args.spider and args.stage in ("appearance", "context", "all"):
        from ..label import Labeller

        if detector is None:
            raise SystemExit("--spider needs --detector: SPIDER gives no vertebra positions")
        spider = spider_pseudo_items(detector, Labeller.load(*args.spider_teacher), args.spider, 4, acfg,
                                     args.seed, log, levels=args.spider_levels)
    if args.stage in ("appearance", "all"):
        syn = load_synthetic_cache(cache, args.n_synthetic, grid=acfg.grid)
        pub, pub_val = [], []
        try:
            excl = tuple(args.exclude_source)
            pub = public_lumbar_items("train", 6, acfg, args.seed, args.public_lumbar, excl)
            pub_val = public_lumbar_items("val", 1, acfg, args.seed, args.public_lumbar, excl)
            if detector is not None:
                pub_det = public_lumbar_detector_items(detector, "train", 4, acfg, args.seed, args.public_lumbar,
                                                       log, excl, tight_share=args.public_tight_share)
        except FileNotFoundError as e:
            log(f"public-lumbar not available ({e}); synthetic only")
        t0 = time.time()
        net = train_appearance(syn, pub + pub_det + spider, pub_val, steps=args.appearance_steps, seed=args.seed,
                               public_weight=args.public_weight, cfg=acfg, log=log, minutes=args.minutes,
                               rotate_deg=args.rotate_deg)
        va = [it for it in syn if is_heldout_seed(int(it["seed"]))]
        metrics = {}
        if va:
            a, a1, _ = evaluate_appearance(net, *_gather(va)[:3])
            metrics["heldout_synthetic_top1"], metrics["heldout_synthetic_within1"] = a, a1
        if pub_val:
            a, a1, _ = evaluate_appearance(net, *_gather(pub_val)[:3])
            metrics["public_lumbar_val_top1"], metrics["public_lumbar_val_within1"] = a, a1
        meta = {"recipe": "spinecohort.training.labeller", "argv": list(argv if argv is not None else sys.argv[1:]),
                "seed": args.seed, "n_synthetic": args.n_synthetic, "steps": args.appearance_steps,
                "public_lumbar_detector_items": len(pub_det), "spider_pseudo_series": len(spider),
                "spider_teacher": [Path(x).name for x in args.spider_teacher] if spider else [],
                "spider_levels": args.spider_levels,
                "exclude_sources": list(args.exclude_source),
                "train_seconds": round(time.time() - t0, 1), "metrics": metrics}
        save_labeller_checkpoint(args.appearance_out, net, acfg, meta)
        log(f"appearance saved to {args.appearance_out}: {json.dumps(metrics)}")
    if args.stage in ("context", "all"):
        from ..label import APPEARANCE_FORMAT, load_labeller_net

        syn = load_synthetic_cache(cache, args.n_synthetic, grid=acfg.grid)
        net, _, _ = load_labeller_net(args.appearance_out, APPEARANCE_FORMAT, AppearanceConfig, build_appearance_net)
        pools, own, _ = heldout_logits(net, syn)
        geos = list(syn)
        try:  # public-lumbar training geometry (annotated bodies, + S1/T12 via the detector)
            if detector is not None:
                geos += pub_det or public_lumbar_detector_items(detector, "train", 1, acfg, args.seed,
                                                                args.public_lumbar, log, tuple(args.exclude_source))
            else:
                geos += public_lumbar_items("train", 1, acfg, args.seed, args.public_lumbar,
                                            tuple(args.exclude_source))
        except FileNotFoundError:
            pass
        geos += spider
        sampler = ContextSampler(geos, pools, own, temperature=acfg.temperature, pad_multiple=ccfg.pad_multiple)
        t0 = time.time()
        cnet = train_context(sampler, steps=args.context_steps, seed=args.seed, cfg=ccfg, log=log,
                             minutes=args.minutes)
        meta = {"recipe": "spinecohort.training.labeller", "argv": list(argv if argv is not None else sys.argv[1:]),
                "seed": args.seed, "steps": args.context_steps, "train_seconds": round(time.time() - t0, 1),
                "beam": beam.to_dict()}
        save_labeller_checkpoint(args.context_out, cnet, ccfg, meta)
        log(f"context saved to {args.context_out}")
    log(f"done in {time.time() - t_all:.0f} s")
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
