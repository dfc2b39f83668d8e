"""The grader's training recipe: targets from reads, augmentation, the two training phases
(:func:`fit`) and prediction with test-time augmentation.

Recipe (SpineNetV2-style, sized for a shared CPU)
-------------------------------------------------
Two phases, as SpineNetV2 fine-tunes its grading network (backbone first, then the heads on the
frozen backbone with a class-balanced loss):

A. **backbone** (whole network): ``steps`` AdamW steps of ``batch_size`` IVVs, one-cycle
   schedule (linear warm-up, cosine decay). Loss: per-task cross-entropy, summed over the 11
   tasks, on soft targets (the mean one-hot of the available reads of a disc: with one reader the
   usual hard label), class weights ``(1 / frequency) ** balance_power_backbone`` (normalised
   to mean 1 per labelled disc), missing labels masked. Augmentation as in SpineNet /
   SpineNetV2, ranges times ``aug_strength`` (0.75 by default): in-plane rotation (+-8 deg),
   scale (0.9-1.1) and shifts (+-8 rows, +-16 cols) for a share ``affine_p`` of the IVVs;
   intensity scale (+-15 %) and a gamma-like curve x (1 + a (1 - x)), |a| <= 0.3, for all,
   Gaussian noise (s.d. up to 0.03)
   for a share ``noise_p``; slice-window jitter (+-1 slice, zero fill, probability
   ``slice_jitter_p``); left-right mirroring of the slice order (probability 0.5) with the
   foraminal left/right labels swapped.
B. **heads**: backbone frozen (BatchNorm in inference mode); the 512-d features of
   ``head_views`` augmented copies of every training IVV are computed once, then the 11 MLP
   heads are trained ``head_epochs`` epochs with *fully* class-balanced cross-entropy
   (``balance_power_heads = 1``: weights 1 / frequency), which targets balanced accuracy.

With ``init_weights`` (fine-tuning) phase A starts from those weights at ``finetune_lr_factor``
times the learning rate; phase B is unchanged.

The network is the one ``TrainConfig.arch`` (or the starting checkpoint's ``arch``) names: the
3-D :class:`~spinecohort.nets.grader_cpu.GraderCPU` or the slice-pooled
:class:`~spinecohort.nets.grader_slices.GraderSlices`. For the latter, augmentation keeps all-zero
(padding) slices zero, and ``single_slice_p`` reduces that share of the IVVs to their centre slice
(what a 1-slice series gives). A disc's all-zero target row masks that task for it (a cohort that
grades only some tasks); ``fit(..., aux=...)`` adds binary auxiliary losses on the heads'
probabilities (P(Narrowing > 1); the noisy-or of the marrow heads) for grades on other scales
(:mod:`spinecohort.training.grader_real`: SPIDER's binary narrowing and Modic > 0).

Inputs: ``ivv_table`` (CSV/Parquet or DataFrame) with ``scan_id, subject_id, level, path``, path
= the scan's ``.npz`` from :func:`spinecohort.discs.save_ivvs` (``volumes`` (n, 9, 112, 224),
``levels`` (n,)); ``labels``: ``scan_id, level, <Task>...`` and optionally ``reader`` (all
readers' reads of a disc are averaged into its soft target; blank = not graded).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ...discs import IVV_SHAPE
from ...nets.grader_cpu import DEFAULT_ARCH
from ...tasks import TASKS

__all__ = [
    "TASK_NAMES",
    "TrainConfig",
    "read_frame",
    "load_ivv_arrays",
    "make_targets",
    "class_weights",
    "augment_batch",
    "fit",
    "predict_probs",
]

TASK_NAMES = tuple(t.name for t in TASKS)
_FSL, _FSR = TASK_NAMES.index("ForaminalStenosisLeft"), TASK_NAMES.index("ForaminalStenosisRight")

log_ = logging.getLogger("spinecohort.training.grader")


@dataclass
class TrainConfig:
    steps: int = 4400
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_frac: float = 0.06
    aug_strength: float = 0.75  # scales the geometric / intensity augmentation ranges
    slice_jitter_p: float = 0.3
    affine_p: float = 0.5  # share of IVVs rotated / scaled / shifted
    noise_p: float = 0.3  # share of IVVs with added Gaussian noise
    balance_power_backbone: float = 0.75
    head_epochs: int = 30
    head_views: int = 2
    head_lr: float = 1e-3
    head_batch: int = 256
    balance_power_heads: float = 1.0
    finetune_lr_factor: float = 0.3
    seed: int = 0
    arch: dict = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_ARCH)))
    log_every: int = 50
    eval_every: int = 0  # with a validation set: every N steps (0 = only at the end)
    tta_eval: int = 4
    # slice-pooled grader (spinecohort.nets.grader_slices) on 1- and 9-slice IVVs:
    single_slice_p: float = 0.0  # share of training IVVs reduced to their centre slice (index 4)
    keep_empty_slices: bool = False  # augmentation keeps all-zero (padding) slices zero
    aux_weight: float = 1.0  # weight of the auxiliary binary losses (fit's ``aux``)
    # Pfirrmann is ordinal and scored with linear kappa: plain cross-entropy charges a 1-vs-2 and a
    # 1-vs-5 confusion alike, so an expected-grade L1 term (scaled to [0, 1]) is added with this
    # weight (0 = off), in both phases
    ordinal_weight: float = 0.0
    # share of each phase-A batch drawn from the rows ``fit(..., group=...)`` marks True (e.g. the
    # real SPIDER discs among phantoms); 0 = uniform draws over all rows as before
    group_share: float = 0.0


# ----------------------------------------------------------------------------- data

def read_frame(obj: pd.DataFrame | str | Path) -> pd.DataFrame:
    """A DataFrame as given (copied), or read from a Parquet, CSV or TSV file."""
    if isinstance(obj, pd.DataFrame):
        return obj.copy()
    p = Path(obj)
    if p.suffix.lower() in (".parquet", ".pq"):
        return pd.read_parquet(p)
    # identifiers stay text ("007" is not 7), as the manifest reader and the agreement stage read them
    keys = {c: str for c in ("scan_id", "subject_id", "level", "reader", "site", "path")}
    return pd.read_csv(p, sep="\t" if p.suffix.lower() == ".tsv" else ",", dtype=keys)


def load_ivv_arrays(ivv_table: pd.DataFrame | str | Path) -> tuple[np.ndarray, pd.DataFrame]:
    """All IVVs of the table as uint8 (N, 9, 112, 224) (value * 255) and the keys
    (``scan_id, subject_id, level``) in the same order. Rows whose level is missing from the
    scan's file are dropped (with a warning)."""
    table = read_frame(ivv_table)
    base = Path(ivv_table).parent if isinstance(ivv_table, (str, Path)) else Path(".")
    if "subject_id" not in table:
        table["subject_id"] = table["scan_id"]
    keys, chunks = [], []
    for path, grp in table.groupby("path", sort=False):
        p = Path(path)
        if not p.is_absolute() and not p.exists():
            p = base / p
        with np.load(p, allow_pickle=False) as z:
            vols, levels = z["volumes"], [str(s) for s in z["levels"]]
        where = {lv: i for i, lv in enumerate(levels)}
        for _, row in grp.iterrows():
            i = where.get(str(row["level"]))
            if i is None:
                log_.warning("%s: level %s not in %s", row["scan_id"], row["level"], p)
                continue
            v = np.asarray(vols[i], np.float32)
            chunks.append(np.clip(np.rint(v * 255.0), 0, 255).astype(np.uint8))
            keys.append({"scan_id": str(row["scan_id"]), "subject_id": str(row["subject_id"]), "level": str(row["level"])})
    X = np.stack(chunks) if chunks else np.zeros((0, *IVV_SHAPE), np.uint8)
    return X, pd.DataFrame(keys, columns=["scan_id", "subject_id", "level"])


def make_targets(keys: pd.DataFrame, labels: pd.DataFrame | str | Path,
                 readers: Sequence[str] | None = None) -> list[np.ndarray]:
    """Soft targets per task, (N, k) float32 in ``keys`` order: the mean one-hot of the reads of
    each disc (readers restricted to ``readers`` when given); all-zero rows = not graded."""
    lab = read_frame(labels)
    if readers is not None and "reader" in lab:
        lab = lab[lab["reader"].astype(str).isin([str(r) for r in readers])]
    lab = lab.assign(scan_id=lab["scan_id"].astype(str), level=lab["level"].astype(str).str.strip())
    index = {(s, l): i for i, (s, l) in enumerate(zip(keys["scan_id"], keys["level"]))}
    rows = np.array([index.get((s, l), -1) for s, l in zip(lab["scan_id"], lab["level"])])
    ok = rows >= 0
    out = []
    for t in TASKS:
        tgt = np.zeros((len(keys), t.n_classes), np.float64)
        if t.name in lab:
            vals = pd.to_numeric(lab[t.name], errors="coerce").to_numpy(float)
            code = {g: j for j, g in enumerate(t.grades)}
            for r, v in zip(rows[ok], vals[ok]):
                if np.isfinite(v) and int(v) in code and float(v) == int(v):
                    tgt[r, code[int(v)]] += 1.0
        s = tgt.sum(1, keepdims=True)
        out.append(np.where(s > 0, tgt / np.maximum(s, 1e-12), 0.0).astype(np.float32))
    return out


def class_weights(targets: Sequence[np.ndarray], power: float, smoothing: float = 1.0) -> list[np.ndarray]:
    """Per task ``(1 / (n_c + smoothing)) ** power``, scaled so the mean weight over labelled discs
    is 1 (``n_c`` = soft count of class c)."""
    out = []
    for tgt in targets:
        n = tgt.sum(0).astype(np.float64)
        w = (1.0 / (n + smoothing)) ** power
        total = float(tgt.sum())
        mean = float((n * w).sum() / total) if total > 0 else 1.0
        out.append((w / mean).astype(np.float32))
    return out


# ----------------------------------------------------------------------------- augmentation
_NOISE_BANK: dict[tuple, "torch.Tensor"] = {}


def _noise_bank(shape: tuple[int, int, int], n: int = 24) -> "torch.Tensor":
    """n fixed standard-normal volumes (seeded), reused by :func:`augment_batch`."""
    import torch

    key = (tuple(shape), n)
    if key not in _NOISE_BANK:
        _NOISE_BANK[key] = torch.randn((n, *shape), generator=torch.Generator().manual_seed(12345))
    return _NOISE_BANK[key]


def augment_batch(x: "torch.Tensor", targets: list["torch.Tensor"], gen: "torch.Generator",
                  strength: float = 1.0, slice_jitter_p: float = 0.3, affine_p: float = 0.5,
                  noise_p: float = 0.3, keep_empty_slices: bool = False) -> tuple["torch.Tensor", list["torch.Tensor"]]:
    """Training augmentation of a (B, 9, 112, 224) float batch in [0, 1] (see the module docs).
    Returns the augmented batch and the targets with foraminal left/right swapped where mirrored.
    ``keep_empty_slices``: all-zero slices (padding, "no slice here") stay exactly zero, as the
    slice-pooled grader reads them (noise would turn them into slices)."""
    import torch
    import torch.nn.functional as F

    b, s, h, w = x.shape

    def u(lo, hi, n=b):
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    # mirror the slice order (patient left <-> right; foraminal labels swapped) and slice-window
    # jitter (+-1 slice with probability slice_jitter_p, zero fill), as one gather
    mirror = torch.rand(b, generator=gen) < 0.5
    jit = torch.where(torch.rand(b, generator=gen) < slice_jitter_p,
                      torch.where(torch.rand(b, generator=gen) < 0.5, -1, 1), 0)
    if mirror.any():
        tl, tr = targets[_FSL], targets[_FSR]
        m = mirror[:, None]
        targets = list(targets)
        targets[_FSL], targets[_FSR] = torch.where(m, tr, tl), torch.where(m, tl, tr)
    if mirror.any() or (jit != 0).any():
        k = torch.arange(s)[None].expand(b, s)
        src = k - jit[:, None]
        valid = (src >= 0) & (src < s)
        src = src.clamp(0, s - 1)
        src = torch.where(mirror[:, None], s - 1 - src, src)
        flat = (torch.arange(b)[:, None] * s + src).flatten()
        x = x.reshape(b * s, h, w).index_select(0, flat).reshape(b, s, h, w)
        if not bool(valid.all()):
            x = x * valid[:, :, None, None].to(x.dtype)
    # in-plane affine (pixel-space rotation / scale / shift, in normalised coordinates), on a
    # random subset (probability affine_p): resampling is the costly part of a CPU step
    sel = torch.nonzero(torch.rand(b, generator=gen) < affine_p).flatten()
    if len(sel):
        m = len(sel)
        ang = u(-8.0, 8.0, m) * strength * math.pi / 180.0
        sc = 1.0 + u(-0.1, 0.1, m) * strength
        ty = u(-8.0, 8.0, m) * strength / (h / 2.0)
        tx = u(-16.0, 16.0, m) * strength / (w / 2.0)
        c, sn = torch.cos(ang) / sc, torch.sin(ang) / sc
        theta = torch.zeros(m, 2, 3)
        theta[:, 0, 0] = c
        theta[:, 0, 1] = -sn * (h / w)
        theta[:, 1, 0] = sn * (w / h)
        theta[:, 1, 1] = c
        theta[:, 0, 2] = tx
        theta[:, 1, 2] = ty
        grid = F.affine_grid(theta, (m, s, h, w), align_corners=False)
        x = x.clone()
        x[sel] = F.grid_sample(x[sel], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    filled = x.flatten(2).abs().amax(2) > 0  # (B, S): slices holding data, before noise
    # intensity: a gamma-like monotone curve x (1 + a (1 - x)) on [0, 1] and a scale for all,
    # Gaussian noise on a subset (probability noise_p; drawn from a small bank of noise volumes,
    # which costs far less than fresh draws)
    a = (u(-0.3, 0.3) * strength)[:, None, None, None]
    g = (1.0 + u(-0.15, 0.15) * strength)[:, None, None, None]
    x = x * torch.addcmul((1.0 + a) * g, -a * g, x)  # = x (1 + a (1 - x)) g, two passes
    nsel = torch.nonzero(torch.rand(b, generator=gen) < noise_p).flatten()
    if len(nsel):
        bank = _noise_bank((s, h, w))
        pick = torch.randint(0, len(bank), (len(nsel),), generator=gen)
        sd = u(0.0, 0.03 * strength, len(nsel))[:, None, None, None]
        x[nsel] = x[nsel] + sd * bank[pick]
    if keep_empty_slices:
        x = x * filled[:, :, None, None].to(x.dtype)
    return x.clamp(0.0, 1.0), targets


# ----------------------------------------------------------------------------- training
def _loss(logits, targets, weights, mask_sum_floor: float = 1.0):
    import torch.nn.functional as F

    total = 0.0
    for lg, tg, w in zip(logits, targets, weights):
        lab = tg.sum(1) > 0
        n = float(lab.sum())
        if n == 0:
            continue
        lp = F.log_softmax(lg.float(), dim=1)
        total = total + -(tg * w[None] * lp).sum() / max(n, mask_sum_floor)
    return total


_NARROWING, _UPPER_MARROW, _LOWER_MARROW = (TASK_NAMES.index(n) for n in ("Narrowing", "UpperMarrow", "LowerMarrow"))
_PFIRRMANN = TASK_NAMES.index("Pfirrmann")


def _ordinal_loss(logits, targets, weights, task: int = _PFIRRMANN):
    """Class-weighted mean |E_model[grade] - E_target[grade]| / (K - 1) on task ``task``'s labelled
    rows: a distance-aware term for an ordinal grade (Pfirrmann), which SpineNet (Jamaludin et al.
    2017) and SpineNetV2 (Windsor et al. 2022) treat as plain classes; here it sits beside the
    cross-entropy to make far-off grades cost more, which is what linear kappa measures."""
    import torch

    lg, tg, w = logits[task].float(), targets[task], weights[task]
    lab = tg.sum(1) > 0
    if not bool(lab.any()):
        return 0.0
    lg, tg = lg[lab], tg[lab]
    k = torch.arange(lg.shape[1], dtype=lg.dtype, device=lg.device)
    tg = tg / tg.sum(1, keepdim=True)
    err = ((torch.softmax(lg, 1) * k).sum(1) - (tg * k).sum(1)).abs() / max(1, lg.shape[1] - 1)
    rw = (tg * w[None]).sum(1)  # the target's class weight, so rare grades are not drowned out
    return (rw * err).sum() / rw.sum().clamp_min(1e-6)


def aux_probabilities(logits) -> "torch.Tensor":
    """(B, 2) probabilities the auxiliary targets are compared with: P(Narrowing > 1), and the
    noisy-or of the two marrow heads, 1 - (1 - P(UpperMarrow)) (1 - P(LowerMarrow))."""
    import torch

    narrow = torch.softmax(logits[_NARROWING].float(), 1)[:, 1:].sum(1)
    up = torch.softmax(logits[_UPPER_MARROW].float(), 1)[:, 1]
    low = torch.softmax(logits[_LOWER_MARROW].float(), 1)[:, 1]
    return torch.stack([narrow, 1.0 - (1.0 - up) * (1.0 - low)], 1)


def aux_weights(aux: np.ndarray, power: float) -> np.ndarray:
    """(2, 2) class weights (negative, positive) per auxiliary target, as :func:`class_weights`."""
    out = []
    for j in range(aux.shape[1]):
        a = aux[:, j]
        ok = np.isfinite(a)
        onehot = np.zeros((len(a), 2), np.float32)
        onehot[ok, a[ok].astype(int)] = 1.0
        out.append(class_weights([onehot], power)[0])
    return np.stack(out)


def _aux_loss(logits, aux: "torch.Tensor", weights: "torch.Tensor") -> "torch.Tensor | float":
    """Class-weighted binary cross-entropy of :func:`aux_probabilities` against ``aux`` (B, 2)
    (NaN = not graded), averaged over the graded entries of each target and summed."""
    import torch

    p = aux_probabilities(logits).clamp(1e-6, 1.0 - 1e-6)
    total = 0.0
    for j in range(aux.shape[1]):
        ok = torch.isfinite(aux[:, j])
        if not bool(ok.any()):
            continue
        y = aux[ok, j]
        w = torch.where(y > 0.5, weights[j, 1], weights[j, 0])
        total = total + -(w * (y * p[ok, j].log() + (1.0 - y) * (1.0 - p[ok, j]).log())).sum() / float(ok.sum())
    return total


def _single_slice(x: "torch.Tensor", gen: "torch.Generator", p: float) -> "torch.Tensor":
    """A share ``p`` of the (B, 9, R, C) batch reduced to the centre slice (the others zeroed):
    what a 1-slice series gives (slice index 4 of an IVV)."""
    import torch

    if p <= 0:
        return x
    sel = torch.rand(x.shape[0], generator=gen) < p
    if not bool(sel.any()):
        return x
    keep = torch.zeros(x.shape[1], dtype=x.dtype)
    keep[x.shape[1] // 2] = 1.0
    x = x.clone()
    x[sel] = x[sel] * keep[None, :, None, None]
    return x


def _batches_of(n: int, size: int, rng: np.random.Generator, group: np.ndarray | None = None,
                share: float = 0.0):
    """Index batches: epochs of a permutation, or (``group`` and ``share`` > 0) ``round(share *
    size)`` rows drawn from ``group``'s True rows and the rest from the others, each side cycling
    through its own permutations."""
    if group is not None and share > 0:
        g_in, g_out = np.flatnonzero(group), np.flatnonzero(~np.asarray(group, bool))
        k_in = int(round(share * size))
        ok = 0 < k_in < size and k_in <= len(g_in) and size - k_in <= len(g_out)  # else: uniform draws
        its = [_batches_of(len(g_in), k_in, rng), _batches_of(len(g_out), size - k_in, rng)] if ok else None
        if its is not None:
            while True:
                yield np.sort(np.concatenate([g_in[next(its[0])], g_out[next(its[1])]]))
    while True:
        perm = rng.permutation(n)
        for i in range(0, n - size + 1, size):
            yield np.sort(perm[i:i + size])


def _to_float(xb: np.ndarray) -> "torch.Tensor":
    import torch

    return torch.from_numpy(xb).float().mul_(1.0 / 255.0)


def predict_probs(net, X: np.ndarray, tta: int = 4, batch_size: int = 32, device: str = "cpu") -> list[np.ndarray]:
    """Per task (N, k) TTA-averaged probabilities of a grading network (3-D or slice-pooled) on uint8 or float IVVs
    (the network is moved to ``device``)."""
    import torch

    from ...grade import Grader

    g = Grader(net, "cpu", device)
    out = [np.zeros((len(X), t.n_classes), np.float32) for t in TASKS]
    chunk = max(1, 256)
    for start in range(0, len(X), chunk):
        xb = X[start:start + chunk]
        xt = _to_float(xb) if xb.dtype == np.uint8 else torch.from_numpy(np.asarray(xb, np.float32))
        pr = g.predict_tensor(xt, tta=tta, batch_size=batch_size)
        for k in range(len(TASKS)):
            out[k][start:start + len(xb)] = pr[k]
    return out


def balanced_accuracy_simple(probs: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> dict[str, float]:
    """Quick per-task balanced accuracy against the argmax of the soft targets (monitoring only)."""
    out = {}
    for t, p, tg in zip(TASKS, probs, targets):
        lab = tg.sum(1) > 0
        if not lab.any():
            continue
        y, yh = tg[lab].argmax(1), p[lab].argmax(1)
        rec = [float((yh[y == c] == c).mean()) for c in np.unique(y)]
        out[t.name] = float(np.mean(rec))
    return out


def fit(X: np.ndarray, targets: Sequence[np.ndarray], config: TrainConfig | None = None,
        init_state: dict | None = None, log: Callable[[str], None] = print,
        val: tuple[np.ndarray, Sequence[np.ndarray]] | None = None, device: str = "cpu",
        aux: np.ndarray | None = None, finetune: bool | None = None, group: np.ndarray | None = None):
    """Train the grader ``config.arch`` names (:func:`spinecohort.nets.grader_slices.build_grader_net`:
    the slice-pooled net or the 3-D :class:`GraderCPU`) on uint8 IVVs ``X`` (N, 9, 112, 224) and
    soft ``targets`` (a disc's all-zero target row masks that task for it); returns the network
    (eval mode, on ``device``) after phases A and B.

    ``aux``: optional (N, 2) float auxiliary binary targets (NaN = not graded) compared with
    :func:`aux_probabilities` (P(Narrowing > 1); noisy-or of the marrow heads) with a
    class-weighted binary cross-entropy times ``config.aux_weight``, in both phases.
    ``group``: optional (N,) bool rows that make up ``config.group_share`` of each phase-A batch.
    ``finetune``: whether ``init_state`` counts as fine-tuning (learning rate x
    ``finetune_lr_factor``; default: whenever ``init_state`` is given).

    ``device`` (e.g. ``"cuda"``) runs the network there; batches are drawn and augmented on the
    CPU with the same seeded generators, so the sequence of batches does not depend on it."""
    import torch

    from ...nets.grader_slices import build_grader_net

    cfg = config or TrainConfig()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    net = build_grader_net(cfg.arch)
    # the slice-pooled net reads all-zero slices as "no slice": augmentation must keep them empty
    keep_empty = bool(cfg.keep_empty_slices or getattr(net, "arch", {}).get("name") == "slices2d")
    if finetune is None:
        finetune = init_state is not None
    if init_state is not None:
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in init_state.items()})
    dev = torch.device(device)
    net.to(dev)
    tg_all = [torch.from_numpy(t) for t in targets]
    n = len(X)
    t0 = time.time()
    aux_t = None if aux is None else torch.from_numpy(np.asarray(aux, np.float32))
    if aux_t is not None and len(aux_t) != n:
        raise ValueError(f"aux has {len(aux_t)} rows for {n} IVVs")

    def aux_term(logits, idx, weights):
        if aux_t is None or cfg.aux_weight == 0:
            return 0.0
        return cfg.aux_weight * _aux_loss(logits, aux_t[idx].to(dev), weights)

    # ---- phase A: whole network
    wa = [torch.from_numpy(w).to(dev) for w in class_weights(targets, cfg.balance_power_backbone)]
    wxa = None if aux is None else torch.from_numpy(aux_weights(np.asarray(aux, np.float32), cfg.balance_power_backbone)).to(dev)
    lr = cfg.lr * (cfg.finetune_lr_factor if finetune else 1.0)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    warm = max(1, int(cfg.steps * cfg.warmup_frac))

    def lr_at(step):
        if step < warm:
            return lr * (step + 1) / warm
        q = (step - warm) / max(1, cfg.steps - warm)
        return lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * q)))

    batches = _batches_of(n, min(cfg.batch_size, n), rng, group, cfg.group_share)

    def ord_term(logits, tb, weights):
        return cfg.ordinal_weight * _ordinal_loss(logits, tb, weights) if cfg.ordinal_weight else 0.0
    net.train()
    run_loss = 0.0
    for step in range(cfg.steps):
        for gp in opt.param_groups:
            gp["lr"] = lr_at(step)
        idx = next(batches)
        xb = _single_slice(_to_float(X[idx]), gen, cfg.single_slice_p)
        xb, tb = augment_batch(xb, [t[idx] for t in tg_all], gen, cfg.aug_strength,
                               cfg.slice_jitter_p, cfg.affine_p, cfg.noise_p, keep_empty)
        logits = net(xb[:, None].to(dev))
        tb = [t.to(dev) for t in tb]
        loss = _loss(logits, tb, wa) + aux_term(logits, idx, wxa) + ord_term(logits, tb, wa)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run_loss += loss.item()
        if (step + 1) % cfg.log_every == 0:
            log(f"A step {step + 1}/{cfg.steps} loss {run_loss / cfg.log_every:.3f} lr {lr_at(step):.2e} "
                f"{time.time() - t0:.0f} s")
            run_loss = 0.0
        if val is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            net.eval()
            ba = balanced_accuracy_simple(predict_probs(net, val[0], tta=1, device=device), val[1])
            log("  val BA (tta 1): " + " ".join(f"{k[:8]}={v:.3f}" for k, v in ba.items()))
            net.train()

    # ---- phase B: heads on the frozen backbone, fully class-balanced
    net.eval()
    feats, ftg, fidx = [], [], []
    with torch.inference_mode():
        for view in range(cfg.head_views):
            for start in range(0, n, 64):
                idx = np.arange(start, min(start + 64, n))
                xb = _to_float(X[idx])
                tb = [t[idx] for t in tg_all]
                if view > 0:  # later views: also 1-slice copies, as in phase A
                    xb = _single_slice(xb, gen, cfg.single_slice_p)
                    xb, tb = augment_batch(xb, tb, gen, 0.7 * cfg.aug_strength, cfg.slice_jitter_p,
                                           cfg.affine_p, cfg.noise_p, keep_empty)
                feats.append(net.features(xb[:, None].to(dev)))
                ftg.append([t.to(dev) for t in tb])
                fidx.append(idx)
    F_all = torch.cat(feats)
    T_all = [torch.cat([b[k] for b in ftg]) for k in range(len(TASKS))]
    I_all = np.concatenate(fidx)
    log(f"B features {tuple(F_all.shape)} {time.time() - t0:.0f} s")
    wb = [torch.from_numpy(w).to(dev) for w in class_weights(targets, cfg.balance_power_heads)]
    wxb = None if aux is None else torch.from_numpy(aux_weights(np.asarray(aux, np.float32), cfg.balance_power_heads)).to(dev)
    for p in net.backbone_parameters():
        p.requires_grad_(False)
    head_params = [p for h in net.heads for p in h.parameters()]
    opt = torch.optim.AdamW(head_params, lr=cfg.head_lr, weight_decay=cfg.weight_decay)
    nf = len(F_all)
    per_epoch = max(1, nf // cfg.head_batch)
    total = cfg.head_epochs * per_epoch
    it = 0
    for ep in range(cfg.head_epochs):
        for h in net.heads:
            h.train()
        perm = torch.from_numpy(rng.permutation(nf)).to(dev)
        run = 0.0
        for b in range(per_epoch):
            sel = perm[b * cfg.head_batch:(b + 1) * cfg.head_batch]
            for gp in opt.param_groups:
                gp["lr"] = cfg.head_lr * 0.5 * (1.0 + math.cos(math.pi * it / total))
            logits = net.classify(F_all[sel])
            ts = [t[sel] for t in T_all]
            loss = _loss(logits, ts, wb) + aux_term(logits, I_all[sel.cpu().numpy()], wxb) + ord_term(logits, ts, wb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run += loss.item()
            it += 1
        if (ep + 1) % max(1, cfg.head_epochs // 5) == 0:
            log(f"B epoch {ep + 1}/{cfg.head_epochs} loss {run / per_epoch:.3f}")
    for p in net.parameters():
        p.requires_grad_(True)
    net.eval()
    log(f"trained in {time.time() - t0:.0f} s")
    if val is not None:
        ba = balanced_accuracy_simple(predict_probs(net, val[0], tta=cfg.tta_eval, device=device), val[1])
        log("  val BA: " + " ".join(f"{k[:8]}={v:.3f}" for k, v in ba.items()))
    return net
