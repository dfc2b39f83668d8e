"""Training the disc grader (``spinecohort train grader``): the synthetic-only grader-cpu-v3 (the
shipped default until grader-cpu-v4, :mod:`spinecohort.training.grader_real`), and a team's own
data with patient-level k-fold cross-validation and fine-tuning.

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

Entry points
------------
``train_synthetic(out, data_dir, ...)``: grader-cpu-v3 (synthetic only): synthetic
scans (:mod:`spinecohort.synthetic`) -> IVVs from the truth polygons -> labels = the two simulated
reads (R1, R1-repeat; what a team with a repeat-read subset has), evaluated on a held-out
synthetic cohort with disjoint seeds against R1, beside R1 vs R1-repeat.

``cross_validate(ivv_table, labels, k=5, seed=0, init_weights=None)``: patient-level k-fold CV
on a team's data; returns out-of-fold predictions in the discs-table format (``scan_id, level,
<Task>, <Task>_probs``, plus ``subject_id``, ``fold``) that go straight into
:func:`spinecohort.stats.compute_agreement`, and the fold models.

``snakemake --cores N train_grader`` (workflow/rules/train.smk): the same on the pipeline's own
disc volumes, one rule per step: :func:`write_ivv_table` (the labelled discs the extract_discs
stage wrote), :func:`run_cv` (out-of-fold predictions in the discs-table layout, then the
agreement stage's code), :func:`run_final` and :func:`write_cv_model_card`; settings from the
config's ``grader_training`` keys, outputs under ``<outdir>/grader_cv/``.

``main(argv)``: ``spinecohort train grader --ivv-table T --labels L --out DIR [--k 5 --seed S
--init-weights W --steps N --final]`` or ``--synthetic --out models/grader-cpu-v3.pt``.

Inputs: ``ivv_table`` (CSV/Parquet or DataFrame) with ``scan_id, subject_id, level, path``, path
= the scan's ``.npz`` from :func:`spinecohort.discs.save_ivvs` (``volumes`` (n, 9, 112, 224),
``levels`` (n,)); ``labels``: ``scan_id, level, <Task>...`` and optionally ``reader`` (all
readers' reads of a disc are averaged into its soft target; blank = not graded).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from .. import ProgressLog
from ...discs import IVV_SHAPE, extract_ivvs, save_ivvs, vertebrae_from_synthetic
from ...nets.grader_cpu import DEFAULT_ARCH
from ...shipped import default_model_path
from ...tasks import DEFAULT_GRADED_DISCS, TASKS

__all__ = [
    "TrainConfig",
    "load_ivv_arrays",
    "make_targets",
    "class_weights",
    "augment_batch",
    "fit",
    "predict_probs",
    "cross_validate",
    "build_synthetic_cohort",
    "train_synthetic",
    "evaluate_against_readers",
    "write_model_card",
    "init_weights_path",
    "train_config",
    "labelled_discs",
    "build_ivv_table",
    "write_ivv_table",
    "run_cv",
    "run_final",
    "write_cv_model_card",
    "main",
]

TASK_NAMES = tuple(t.name for t in TASKS)
# the synthetic-only recipe's output: grader-cpu-v3 (no longer the default grader, so it is named
# here rather than taken from shipped.DEFAULT_MODELS, which would overwrite v4 with a 3-D model)
DEFAULT_OUT = default_model_path("grader").parent / "grader-cpu-v3.pt"
DEFAULT_DATA_DIR = Path("/tmp/grader_data")
DEFAULT_LOG = Path("/tmp/grader_train.log")
SYNTH_TRAIN_SEEDS = (100_000, 101_600)  # [start, stop)
SYNTH_STEPS = 8800  # phase-A steps of the synthetic-only grader-cpu-v3 (twice a team run's default)
SYNTH_TEST_SEEDS = (900_000, 900_250)
READS_SEED = {"train": 11, "test": 12}
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

def _read_any(obj: pd.DataFrame | str | Path) -> pd.DataFrame:
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
    table = _read_any(ivv_table)
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
    lab = _read_any(labels)
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


# ----------------------------------------------------------------------------- cross-validation
def patient_folds(subjects: Sequence[str], k: int, seed: int) -> np.ndarray:
    """Fold number per row: subjects shuffled with ``seed`` and dealt round-robin into ``k``
    folds, so all discs (and scans) of a subject share a fold."""
    subj = pd.Series([str(s) for s in subjects])
    uniq = np.array(sorted(subj.unique()))
    rng = np.random.default_rng(seed)
    order = uniq[rng.permutation(len(uniq))]
    fold_of = {s: i % k for i, s in enumerate(order)}
    return subj.map(fold_of).to_numpy(np.int64)


def _load_init(init_weights) -> dict | None:
    if init_weights is None:
        return None
    import torch

    if isinstance(init_weights, dict):
        return init_weights
    payload = torch.load(init_weights, map_location="cpu", weights_only=True)
    return payload["state_dict"] if isinstance(payload, dict) and "state_dict" in payload else payload


def _arch_of(init_weights, default: dict) -> dict:
    if init_weights is None or isinstance(init_weights, dict):
        return default
    import torch

    payload = torch.load(init_weights, map_location="cpu", weights_only=True)
    return dict(payload.get("arch") or default) if isinstance(payload, dict) else default


def cross_validate(ivv_table: pd.DataFrame | str | Path, labels: pd.DataFrame | str | Path, k: int = 5,
                   seed: int = 0, init_weights=None, config: TrainConfig | None = None,
                   tta: int = 4, log: Callable[[str], None] = print, readers: Sequence[str] | None = None,
                   device: str = "cpu"):
    """Patient-level k-fold CV. Returns ``(oof, fold_models)``: ``oof`` has one row per IVV with
    ``scan_id, subject_id, level, fold, <Task>, <Task>_probs`` (grades on the contract scale;
    IVVs without any label are still predicted), ``fold_models`` the k :class:`Grader` objects
    (on the CPU). Raises ``ValueError`` when fewer than ``k`` subjects have a labelled disc."""
    from ...grade import Grader, grades_frame

    cfg = config or TrainConfig(seed=seed)
    init_state = _load_init(init_weights)
    if init_weights is not None:
        cfg.arch = _arch_of(init_weights, cfg.arch)
    X, keys = load_ivv_arrays(ivv_table)
    targets = make_targets(keys, labels, readers)
    if k < 2:
        raise ValueError(f"k = {k}: cross-validation needs at least 2 folds")
    folds = patient_folds(keys["subject_id"], k, seed)
    labelled = np.any(np.stack([t.sum(1) > 0 for t in targets], 1), axis=1) if len(keys) else np.zeros(0, bool)
    n_subjects = keys.loc[labelled, "subject_id"].nunique()
    if n_subjects < k:
        raise ValueError(f"{k}-fold cross-validation needs at least {k} subjects with a labelled disc volume; "
                         f"there are {n_subjects} ({int(labelled.sum())} labelled discs)")
    frames, models = [], []
    for f in range(k):
        tr = np.flatnonzero((folds != f) & labelled)
        te = np.flatnonzero(folds == f)
        log(f"fold {f + 1}/{k}: train {len(tr)} discs, predict {len(te)}")
        net = fit(X[tr], [t[tr] for t in targets], cfg, init_state=init_state, log=log, device=device)
        probs = predict_probs(net, X[te], tta=tta, device=device)
        rows = keys.iloc[te].to_dict("records")
        for r in rows:
            r["fold"] = f
        frames.append(grades_frame(rows, [{t.name: probs[j][i] for j, t in enumerate(TASKS)} for i in range(len(te))]))
        models.append(Grader(net, "cpu", meta={"fold": f, "k": k, "seed": seed}, model_id=f"grader-fold{f}"))
    oof = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return oof, models


# ----------------------------------------------------------------------------- synthetic data
def _synthetic_fov(seed: int) -> str:
    """Lumbar for 4 seeds in 5, whole spine otherwise (cervical scans hold no graded lumbar disc)."""
    return "whole" if seed % 5 == 0 else "lumbar"


def _one_synthetic(args: tuple[int, str, tuple[str, ...]]) -> list[dict]:
    seed, out_dir, levels = args
    from ...synthetic import generate_scan

    scan_id = f"syn{seed:06d}"
    path = Path(out_dir) / "ivv" / f"{scan_id}.npz"
    side = path.with_suffix(".json")
    if path.exists() and side.exists():  # cached by an interrupted earlier run
        return json.loads(side.read_text())
    scan = generate_scan(seed, fov=_synthetic_fov(seed))
    keep = {d.level: d for d in scan.discs if d.level in levels and not d.partial}
    ivvs = [v for v in extract_ivvs(scan.volume, scan.pixel_spacing_mm, vertebrae_from_synthetic(scan), levels)
            if v.level in keep]
    save_ivvs(path, ivvs)
    rows = [{"scan_id": scan_id, "subject_id": scan_id, "level": v.level, "path": str(path),
             "contrast": scan.contrast, "fov": scan.fov, **{t: int(keep[v.level].grades[t]) for t in TASK_NAMES}}
            for v in ivvs]
    side.write_text(json.dumps(rows))
    return rows


def build_synthetic_cohort(out_dir: str | Path, seeds: Sequence[int], reads_seed: int,
                           levels: Sequence[str] = DEFAULT_GRADED_DISCS, workers: int = 1,
                           log: Callable[[str], None] = print) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Synthetic scans -> per-scan IVV files (from the truth polygons; discs cut by the field of
    view skipped), ``ivv_table.csv``, ``truth.csv`` and ``labels.csv`` (two simulated reads, R1
    and R1-repeat, seeded ``reads_seed``) under ``out_dir``. Cached: the tables are reused when
    ``cohort.json`` matches the seeds, and each scan's IVVs and truth (``ivv/<scan_id>.npz`` /
    ``.json``) whenever present."""
    from ...synthetic import simulate_reads

    out_dir = Path(out_dir)
    done = out_dir / "ivv_table.csv"
    seeds = [int(s) for s in seeds]
    key = {"seeds_sha": hashlib.sha256(json.dumps(seeds).encode()).hexdigest(), "n_scans": len(seeds),
           "reads_seed": int(reads_seed), "levels": list(levels)}
    key_file = out_dir / "cohort.json"
    if done.exists() and key_file.exists() and json.loads(key_file.read_text()) == key:
        return pd.read_csv(done), pd.read_csv(out_dir / "truth.csv"), pd.read_csv(out_dir / "labels.csv")
    (out_dir / "ivv").mkdir(parents=True, exist_ok=True)
    jobs = [(s, str(out_dir), tuple(levels)) for s in seeds]
    rows: list[dict] = []
    t0 = time.time()
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for i, r in enumerate(pool.imap(_one_synthetic, jobs, chunksize=4)):
                rows.extend(r)
                if (i + 1) % 50 == 0:
                    log(f"synthetic {i + 1}/{len(jobs)} scans, {time.time() - t0:.0f} s")
    else:
        for i, job in enumerate(jobs):
            rows.extend(_one_synthetic(job))
            if (i + 1) % 50 == 0:
                log(f"synthetic {i + 1}/{len(jobs)} scans, {time.time() - t0:.0f} s")
    full = pd.DataFrame(rows)
    table = full[["scan_id", "subject_id", "level", "path", "contrast", "fov"]]
    truth = full[["scan_id", "level", *TASK_NAMES]]
    labels = simulate_reads(truth, reads_seed)
    truth.to_csv(out_dir / "truth.csv", index=False)
    labels.to_csv(out_dir / "labels.csv", index=False)
    table.to_csv(done, index=False)
    key_file.write_text(json.dumps(key))
    return table, truth, labels


# ----------------------------------------------------------------------------- evaluation
def evaluate_against_readers(preds: pd.DataFrame, labels: pd.DataFrame, n_bootstrap: int = 200,
                             seed: int = 0, reader: str = "R1", repeat: str = "R1-repeat") -> pd.DataFrame:
    """Pooled balanced accuracy, model vs ``reader`` beside ``reader`` vs ``repeat``, per task
    (with :func:`spinecohort.stats.compute_agreement`; bootstrap percentile CIs)."""
    from ...stats import compute_agreement

    agr, _ = compute_agreement(preds, labels, n_bootstrap=n_bootstrap, seed=seed, by_level=False, by_site=False)
    agr = agr[(agr["level"] == "all") & (agr["site"] == "all") & (agr["metric"] == "balanced_accuracy")]
    agr = agr[agr["ci_method"].isin(["bootstrap_percentile", "none"])]
    out = []
    a_b = f"{reader}_vs_{repeat}" if reader < repeat else f"{repeat}_vs_{reader}"
    for task in agr["task"].unique():
        m = agr[(agr["task"] == task) & (agr["comparison"] == f"model_vs_{reader}")]
        r = agr[(agr["task"] == task) & (agr["comparison"] == a_b)]
        if m.empty or r.empty:
            continue
        m, r = m.iloc[0], r.iloc[0]
        out.append({"task": task, "n_discs": int(m["n_discs"]),
                    "model_vs_R1": float(m["estimate"]), "model_ci_low": float(m["ci_low"]), "model_ci_high": float(m["ci_high"]),
                    "R1_vs_R1repeat": float(r["estimate"]), "reader_ci_low": float(r["ci_low"]), "reader_ci_high": float(r["ci_high"]),
                    "difference": float(m["estimate"] - r["estimate"]),
                    "within_3_points": bool(m["estimate"] >= r["estimate"] - 0.03)})
    return pd.DataFrame(out)


def _table_markdown(df: pd.DataFrame) -> str:
    lines = ["| task | discs | model vs R1 (95% CI) | R1 vs R1-repeat (95% CI) | difference | within 3 points |",
             "|---|---:|---|---|---:|:---:|"]
    for _, r in df.iterrows():
        lines.append(f"| {r['task']} | {r['n_discs']} | {r['model_vs_R1']:.3f} ({r['model_ci_low']:.3f}-{r['model_ci_high']:.3f}) "
                     f"| {r['R1_vs_R1repeat']:.3f} ({r['reader_ci_low']:.3f}-{r['reader_ci_high']:.3f}) "
                     f"| {r['difference']:+.3f} | {'yes' if r['within_3_points'] else 'NO'} |")
    return "\n".join(lines)


_POOL_CARD_TEXT = {
    "global": "1x1x1 projection to 256 channels, global average + max pooling",
    "quadrants": "1x1x1 projection to 64 channels, average + max pooling over each quadrant of the (rows, cols) plane",
    "hybrid": ("1x1x1 projection to 128 channels, global average + max pooling of all of them plus average + max"
               " pooling over each quadrant of the (rows, cols) plane of the first 32"),
}


def write_model_card(summary: dict[str, Any], path: str | Path, command: str) -> Path:
    """``models/grader-cpu-v2.md`` from :func:`train_synthetic`'s summary."""
    cfg = summary["config"]
    table = pd.DataFrame(summary["evaluation"])
    truth = summary.get("model_vs_truth_balanced_accuracy", {})
    n_pass = int(table["within_3_points"].sum()) if len(table) else 0
    lines = [
        f"# {Path(summary['path']).stem}: CPU-default disc grading network",
        "",
        "> **Synthetic-trained. Not for research on real scans.** These weights have only ever seen",
        "> synthetic phantoms (`spinecohort.synthetic`). They exist so that the pipeline, its tests",
        "> and the demo run end to end on a CPU, and as a starting point for fine-tuning on a team's",
        f"> own labelled scans (`spinecohort train grader --init-weights models/{Path(summary['path']).name}`).",
        "> Grades they produce on real MRI are meaningless.",
        "",
        "| | |",
        "|---|---|",
        f"| file | `models/{Path(summary['path']).name}` ({summary['bytes'] / 1e6:.2f} MB, fp16 weights) |",
        f"| sha256 | `{summary['sha256']}` |",
        "| format | `torch.load(weights_only=True)` dict: `format=spinecohort-grader`, `arch`, `state_dict`, `meta` |",
        "| loader | `spinecohort.grade.Grader.load(path)` |",
        "| input | IVV (9, 112, 224) = (slices, rows, cols) from `spinecohort.discs.extract_ivvs` |",
        "| output | 11 tasks in SpineNet order, class probabilities on the contract scale |",
        f"| torch | {summary.get('torch')} ({summary.get('threads')} thread) |",
        "",
        "## Architecture",
        "",
        "`spinecohort.nets.grader_cpu.GraderCPU`: 3-D convolution stem (kernel 3x4x4, stride 1x4x4),",
        "three residual blocks (32/64/128 channels) with in-plane and slice striding, "
        + _POOL_CARD_TEXT[cfg["arch"].get("pool", "global")],
        "-> 512-d feature, one 2-layer MLP head per task",
        f"(512 -> {cfg['arch']['head_hidden']} -> classes). Arch: `{json.dumps(cfg['arch'])}`.",
        "",
        "## Data",
        "",
        f"- Training: synthetic scans with seeds {summary['train_seeds'][0]}..{summary['train_seeds'][1] - 1}"
        f" ({summary['n_train_discs']} discs T12-L1..L5-S1; 4 in 5 lumbar field of view, 1 in 5 whole spine;",
        "  T1/T2/STIR as drawn by the generator). Discs cut by the field of view are skipped.",
        "- IVVs are extracted from the *truth* vertebra polygons with `spinecohort.discs.extract_ivvs`.",
        f"- Labels: the simulated reads (`simulate_reads(truth, seed={summary['reads_seed']['train']})`), readers"
        f" {', '.join(summary['train_readers'])}; the reads of a disc are averaged into a soft target",
        "  (what a team with a repeat-read subset has). Truth grades are never used for training.",
        f"- Held-out test cohort: seeds {summary['test_seeds'][0]}..{summary['test_seeds'][1] - 1} (disjoint),"
        f" {summary['n_test_discs']} discs, reads with seed {summary['reads_seed']['test']}.",
        "",
        "## Recipe",
        "",
        f"Phase A (whole network): {cfg['steps']} AdamW steps, batch {cfg['batch_size']}, lr {cfg['lr']}"
        f" (warm-up {cfg['warmup_frac']:.0%}, cosine), weight decay {cfg['weight_decay']}, class weights"
        f" (1/frequency)^{cfg['balance_power_backbone']}; augmentation (ranges x {cfg['aug_strength']}):"
        f" rotation +-8 deg, scale 0.9-1.1, shifts +-8 rows / +-16 cols (p {cfg['affine_p']}), intensity"
        f" scale +-15 % and curve x(1+a(1-x)), |a| <= 0.3, noise s.d. <= 0.03 (p {cfg['noise_p']}); slice-window jitter +-1"
        f" (p {cfg['slice_jitter_p']}); left-right mirroring (p 0.5) with the foraminal labels swapped.",
        f"Phase B (heads on the frozen backbone): features of {cfg['head_views']} views per disc,"
        f" {cfg['head_epochs']} epochs, lr {cfg['head_lr']}, fully class-balanced cross-entropy"
        f" (weights (1/frequency)^{cfg['balance_power_heads']}). Seed {cfg['seed']}; deterministic with"
        " one thread.",
        "",
        f"Training time: {summary['train_seconds'] / 60:.1f} min (phases A+B, 1 torch thread, on the shared"
        " 2-core development machine while other jobs ran); building the synthetic cohorts:"
        f" {summary['data_seconds'] / 60:.1f} min (0 when cached).",
        "",
        "Reproduce:",
        "",
        "```",
        command,
        "```",
        "",
        "(`spinecohort train grader ...` takes the same arguments. The cohorts are cached under",
        "`--data-dir`; with one torch thread the run is deterministic for a given machine.)",
        "",
        "## Evaluation (held-out synthetic cohort)",
        "",
        f"Balanced accuracy with TTA {cfg['tta_eval']}, from `spinecohort.stats.compute_agreement`"
        " (pooled over levels; 95 % subject-bootstrap percentile intervals,"
        f" {summary.get('n_bootstrap', 200)} resamples). Reference: the simulated reader's own repeat agreement"
        " (R1 vs R1-repeat, R1-repeat as reference). Criterion: model vs R1 at least the reader's"
        f" repeat agreement minus 0.03. **{n_pass}/{len(table)} rows meet it.**",
        "",
        _table_markdown(table) if len(table) else "(no evaluation)",
        "",
    ]
    if truth:
        lines += ["Balanced accuracy against the synthetic truth (for information; a team never has it): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in truth.items()) + ".", ""]
    lines += [
        "## Limitations",
        "",
        "- Synthetic anatomy, contrasts and findings only; no real-scan validation of any kind.",
        "- IVVs from truth polygons; detector/labeller errors in the pipeline are not part of this evaluation.",
        "- Rare grades (central canal stenosis 3-4, spondylolisthesis) have few training examples;"
        " their balanced-accuracy intervals are wide.",
        "",
    ]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path


def train_synthetic(out: str | Path = DEFAULT_OUT, data_dir: str | Path = DEFAULT_DATA_DIR,
                    config: TrainConfig | None = None, train_seeds: tuple[int, int] = SYNTH_TRAIN_SEEDS,
                    test_seeds: tuple[int, int] = SYNTH_TEST_SEEDS, workers: int = 1,
                    n_bootstrap: int = 200, log: Callable[[str], None] = print,
                    readers: Sequence[str] = ("R1", "R1-repeat"), command: str | None = None) -> dict[str, Any]:
    """Build (or reuse) the synthetic training and held-out cohorts, train, evaluate, save.

    Writes ``out`` and its model card ``out.with_suffix('.md')``; the summary (returned), the
    evaluation table and the test predictions go to ``data_dir/eval/<stem>.eval.json``,
    ``.eval.csv`` and ``.test_predictions.parquet``."""
    import torch

    from ...grade import grades_frame, save_grader
    from ...provenance import sha256_file

    cfg = config or TrainConfig()
    if set(range(*train_seeds)) & set(range(*test_seeds)):
        raise ValueError("training and test seeds overlap")
    data_dir = Path(data_dir)
    t0 = time.time()
    tab_tr, _, lab_tr = build_synthetic_cohort(data_dir / "train", range(*train_seeds), READS_SEED["train"], workers=workers, log=log)
    tab_te, truth_te, lab_te = build_synthetic_cohort(data_dir / "test", range(*test_seeds), READS_SEED["test"], workers=workers, log=log)
    t_data = time.time() - t0
    log(f"data: {len(tab_tr)} training discs, {len(tab_te)} test discs ({t_data:.0f} s)")
    X, keys = load_ivv_arrays(tab_tr)
    targets = make_targets(keys, lab_tr, readers)
    t1 = time.time()
    net = fit(X, targets, cfg, log=log)
    t_train = time.time() - t1
    del X
    Xt, keys_t = load_ivv_arrays(tab_te)
    probs = predict_probs(net, Xt, tta=cfg.tta_eval)
    preds = grades_frame(keys_t.to_dict("records"), [{t.name: probs[j][i] for j, t in enumerate(TASKS)} for i in range(len(Xt))])
    table = evaluate_against_readers(preds, lab_te, n_bootstrap=n_bootstrap, seed=cfg.seed)
    truth_ba = evaluate_against_readers(preds, truth_te.assign(reader="truth").pipe(
        lambda d: pd.concat([d, lab_te[lab_te["reader"] == "R1"]], ignore_index=True)), n_bootstrap=0,
        reader="truth", repeat="R1")
    meta = {
        "model": Path(out).stem, "trained_on": "synthetic phantoms only (spinecohort.synthetic); NOT for research on real scans",
        "train_seeds": list(train_seeds), "test_seeds": list(test_seeds), "reads_seed": READS_SEED,
        "train_readers": list(readers), "n_train_discs": int(len(keys)), "n_test_discs": int(len(keys_t)),
        "config": asdict(cfg), "train_seconds": round(t_train, 1), "data_seconds": round(t_data, 1),
        "torch": str(torch.__version__), "threads": torch.get_num_threads(),
    }
    out = Path(out)
    save_grader(out, net, meta, half=True)
    summary = {"path": str(out), "sha256": sha256_file(out), "bytes": out.stat().st_size, **meta,
               "evaluation": table.to_dict("records"),
               "model_vs_truth_balanced_accuracy": {r["task"]: r["model_vs_R1"] for r in truth_ba.to_dict("records")}}
    summary["n_bootstrap"] = n_bootstrap
    aux = data_dir / "eval"  # evaluation artefacts stay beside the data, not in models/
    aux.mkdir(parents=True, exist_ok=True)
    table.to_csv(aux / f"{out.stem}.eval.csv", index=False)
    (aux / f"{out.stem}.eval.json").write_text(json.dumps(summary, indent=1, default=str))
    preds.to_parquet(aux / f"{out.stem}.test_predictions.parquet", index=False)
    write_model_card(summary, out.with_suffix(".md"), command or
                     f".venv/bin/python -m spinecohort.training.grader --synthetic --out {out} --data-dir {data_dir}")
    log("\n" + _table_markdown(table))
    log(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB, sha256 {summary['sha256']})")
    return summary


# ----------------------------------------------------------------------------- Snakemake target
# `snakemake --cores N train_grader` (workflow/rules/train.smk): the cohort's own stages up to
# disc extraction, then the functions below, one rule each. Outputs go to <outdir>/grader_cv/.
CV_DIR = "grader_cv"
IVV_STAGE = "extract_discs"  # the stage whose rows and IVV files (work/ivv/<scan_id>.npz) are used
IVV_TABLE_COLUMNS = ["scan_id", "subject_id", "site", "level", "path", "upper_vertebra_id", "lower_vertebra_id",
                     "centre_slice", "centre_row", "centre_col"]


def init_weights_path(value: str | None) -> Path | None:
    """``grader_training: init_weights``: ``shipped`` -> the checkout's default grader,
    ``scratch`` (or None) -> None (random initialisation), anything else -> that path."""
    if value is None or value == "scratch":
        return None
    if value == "shipped":
        return default_model_path("grader")
    return Path(value)


def train_config(config: Mapping[str, Any]) -> TrainConfig:
    """The recipe (:class:`TrainConfig`) with the pipeline config's ``grader_training`` settings;
    out-of-fold predictions use the pipeline's ``tta``, as the grade stage does."""
    settings = config["grader_training"]
    cfg = TrainConfig(seed=int(settings["seed"]), tta_eval=int(config["tta"]))
    for key in ("steps", "head_epochs", "batch_size"):
        if settings.get(key) is not None:
            setattr(cfg, key, int(settings[key]))
    return cfg


def labelled_discs(labels: pd.DataFrame | str | Path, readers: Sequence[str] | None = None) -> pd.DataFrame:
    """``scan_id, level`` of every disc with at least one valid grade (of ``readers``' reads)."""
    lab = _read_any(labels)
    missing = [c for c in ("scan_id", "level") if c not in lab]
    if missing:
        raise ValueError(f"labels: missing column(s) {', '.join(missing)}")
    keys = (lab.assign(scan_id=lab["scan_id"].astype(str), level=lab["level"].astype(str).str.strip())
            [["scan_id", "level"]].drop_duplicates().reset_index(drop=True))
    targets = make_targets(keys, lab, readers)
    graded = np.any(np.stack([t.sum(1) > 0 for t in targets], 1), axis=1) if len(keys) else np.zeros(0, bool)
    return keys[graded].reset_index(drop=True)


def build_ivv_table(outdir: str | Path, manifest_file: str | Path, n_shards: int,
                    labels: pd.DataFrame | str | Path,
                    readers: Sequence[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The labelled discs the pipeline extracted, from its own outputs: ``(table, missing)``.

    ``table``: one row per disc, :data:`IVV_TABLE_COLUMNS` (``path`` = the scan's IVV file written
    by the extract_discs stage; the other columns from the manifest and that stage's rows), in
    manifest order. ``missing``: ``scan_id, level, reason`` of labelled discs without an IVV (scan
    not in the manifest, scan failed, or the disc was not found or not labelled at that level)."""
    from ...manifest import read_manifest
    from ...pipeline import collect_rows
    from ...stages import ivv_path

    outdir = Path(outdir)
    manifest = read_manifest(manifest_file)
    rows = collect_rows(outdir, n_shards, IVV_STAGE)
    if not len(rows):
        rows = pd.DataFrame(columns=["scan_id", "level"])
    rows = rows.assign(scan_id=rows["scan_id"].astype(str), level=rows["level"].astype(str))
    wanted = labelled_discs(labels, readers)
    table = rows.merge(wanted, on=["scan_id", "level"], how="inner")
    info = manifest.set_index("scan_id")
    table["subject_id"] = table["scan_id"].map(info["subject_id"])
    table["site"] = table["scan_id"].map(info["site"])
    table["path"] = [str(ivv_path(outdir / "work", s).resolve()) for s in table["scan_id"]]
    for column in IVV_TABLE_COLUMNS:
        if column not in table:
            table[column] = pd.Series(dtype=object)
    table = table[IVV_TABLE_COLUMNS].reset_index(drop=True)

    found = set(zip(table["scan_id"], table["level"]))
    extracted_scans = set(rows["scan_id"])
    reasons = []
    for scan_id, level in zip(wanted["scan_id"], wanted["level"]):
        if (scan_id, level) in found:
            continue
        if scan_id not in info.index:
            reasons.append((scan_id, level, "scan not in the manifest"))
        elif scan_id not in extracted_scans:
            reasons.append((scan_id, level, "no disc extracted from this scan (failed or nothing found)"))
        else:
            reasons.append((scan_id, level, "disc not found at this level by the pipeline"))
    missing = pd.DataFrame(reasons, columns=["scan_id", "level", "reason"])
    return table, missing


def _training_provenance(config: Mapping[str, Any], models: Mapping[str, str] | None, created_by: str | None,
                         **extra: Any) -> dict[str, str]:
    from ...provenance import make_provenance

    prov = make_provenance(config, models, created_by)
    prov["grader_training"] = json.dumps(config["grader_training"], sort_keys=True)
    prov.update({k: json.dumps(v, sort_keys=True, default=str) for k, v in extra.items()})
    return prov


def _init_record(init: Path | None) -> dict[str, Any] | None:
    from ...provenance import sha256_file

    return None if init is None else {"id": init.stem, "path": str(init), "sha256": sha256_file(init)}


def write_ivv_table(outdir: str | Path, manifest_file: str | Path, n_shards: int, labels: str | Path,
                    out: str | Path, missing_out: str | Path | None = None, readers: Sequence[str] | None = None,
                    created_by: str | None = None, log: Callable[[str], None] = log_.info) -> Path:
    """Rule ``grader_ivv_table``: :func:`build_ivv_table` -> ``out`` (Parquet); the labelled discs
    without an IVV are logged and written to ``missing_out`` (CSV; default ``missing_discs.csv``
    beside ``out``)."""
    from ...provenance import atomic_write_bytes, make_provenance, write_table

    table, missing = build_ivv_table(outdir, manifest_file, n_shards, labels, readers)
    out = Path(out)
    if not len(table):
        raise ValueError(f"no labelled disc of {labels} was extracted by the pipeline ({len(missing)} labelled "
                         "discs; check that the labels' scan_id and level match the manifest and the disc names)")
    log(f"{len(table)} labelled discs with an IVV ({table['scan_id'].nunique()} scans, "
        f"{table['subject_id'].nunique()} subjects); {len(missing)} labelled discs without one")
    for reason, count in missing.groupby("reason").size().items():
        log(f"  without an IVV: {count} ({reason})")
    write_table(table, out, make_provenance(None, None, created_by))
    atomic_write_bytes(missing_out or out.with_name("missing_discs.csv"), missing.to_csv(index=False).encode())
    return out


def run_cv(config: Mapping[str, Any], ivv_table: str | Path, labels: str | Path, oof_out: str | Path,
           fold_dir: str | Path, created_by: str | None = None,
           log: Callable[[str], None] = log_.info) -> Path:
    """Rule ``grader_cv``: :func:`cross_validate` with the config's ``grader_training`` settings;
    writes the fold models (``fold_dir/grader-fold<i>.pt``) and the out-of-fold predictions in the
    discs-table layout
    (``tables/discs.parquet`` columns, ``model_id`` = the fold model, plus ``fold``), ready for
    the agreement stage."""
    from ...grade import save_grader
    from ...pipeline import DISC_COLUMNS
    from ...provenance import sha256_file, write_table
    from ...stages import torch_device

    settings = config["grader_training"]
    device = torch_device(config)
    init = init_weights_path(settings["init_weights"])
    cfg = train_config(config)
    table = _read_any(ivv_table)
    k = int(settings["k"])
    log(f"{k}-fold patient-level CV on {len(table)} discs, init {init or 'scratch'}, device {device}, "
        f"{cfg.steps} steps, {cfg.head_epochs} head epochs")
    t0 = time.time()
    oof, models = cross_validate(table, labels, k=k, seed=int(settings["seed"]), init_weights=init, config=cfg,
                                 tta=int(config["tta"]), log=log, readers=settings.get("readers"), device=device)
    fold_paths = [Path(fold_dir) / f"grader-fold{f}.pt" for f in range(len(models))]
    shas = {}
    for f, (grader, path) in enumerate(zip(models, fold_paths)):
        meta = {"model": Path(path).stem, "fold": f, "k": k, "seed": int(settings["seed"]),
                "init_weights": _init_record(init), "config": asdict(cfg), "created_by": created_by}
        save_grader(path, grader.net, meta)
        shas[Path(path).stem] = sha256_file(path)
    extra = [c for c in DISC_COLUMNS if c not in oof.columns]  # site, vertebra ids, centre: from the IVV table
    oof = oof.merge(table[["scan_id", "level", *extra]].astype({"scan_id": str, "level": str}),
                    on=["scan_id", "level"], how="left")
    oof["model_id"] = [Path(fold_paths[f]).stem for f in oof["fold"]]
    tasks = [c for t in TASKS for c in (t.name, f"{t.name}_probs")]
    oof = oof[DISC_COLUMNS + tasks + ["model_id", "fold"]]
    write_table(oof, oof_out, _training_provenance(config, shas, created_by, init_weights=_init_record(init),
                                                   train_seconds=round(time.time() - t0, 1)))
    log(f"wrote {oof_out} ({len(oof)} out-of-fold predictions, {time.time() - t0:.0f} s)")
    return Path(oof_out)


def run_final(config: Mapping[str, Any], ivv_table: str | Path, labels: str | Path, out: str | Path,
              created_by: str | None = None, log: Callable[[str], None] = log_.info) -> Path:
    """Rule ``grader_final``: one model trained on every labelled disc of ``ivv_table`` with the
    same recipe and starting point as the fold models; a ``torch.load(weights_only=True)``
    checkpoint for :meth:`spinecohort.grade.Grader.load`."""
    import torch

    from ... import __version__
    from ...grade import save_grader
    from ...stages import torch_device

    settings = config["grader_training"]
    device = torch_device(config)
    init = init_weights_path(settings["init_weights"])
    cfg = train_config(config)
    if init is not None:
        cfg.arch = _arch_of(init, cfg.arch)
    table = _read_any(ivv_table)
    X, keys = load_ivv_arrays(table)
    targets = make_targets(keys, labels, settings.get("readers"))
    keep = np.any(np.stack([t.sum(1) > 0 for t in targets], 1), axis=1)
    log(f"final model on {int(keep.sum())} labelled discs, init {init or 'scratch'}, device {device}")
    t0 = time.time()
    net = fit(X[keep], [t[keep] for t in targets], cfg, init_state=_load_init(init), log=log, device=device)
    seconds = time.time() - t0
    kept = keys[keep]
    readers = settings.get("readers")
    meta = {
        "model": Path(out).stem, "pipeline_version": __version__,
        "trained_on": {"ivv_table": str(ivv_table), "labels": str(labels), "n_discs": int(keep.sum()),
                       "n_scans": int(kept["scan_id"].nunique()), "n_subjects": int(kept["subject_id"].nunique()),
                       "readers": list(readers) if readers else "all"},
        "init_weights": _init_record(init), "config": asdict(cfg), "grader_training": dict(settings),
        "train_seconds": round(seconds, 1), "device": device, "torch": str(torch.__version__),
        "threads": torch.get_num_threads(), "created_by": created_by,
    }
    save_grader(out, net, meta)
    log(f"wrote {out} ({seconds:.0f} s)")
    return Path(out)


def write_cv_model_card(config: Mapping[str, Any], weights: str | Path, ivv_table: str | Path, missing: str | Path,
                        oof: str | Path, agreement: str | Path, json_out: str | Path, md_out: str | Path) -> Path:
    """Rule ``grader_card``: ``grader.json`` (everything below, machine-readable) and ``grader.md``
    (the model card) beside the final model: data, recipe, starting weights, and the
    cross-validated agreement of the fold models' out-of-fold predictions with each reader (the
    estimate of how the final model grades scans it has not seen), beside reader-vs-reader
    agreement where the labels have several readers."""
    import torch

    from ...provenance import atomic_write_bytes, sha256_file

    weights = Path(weights)
    payload = torch.load(weights, map_location="cpu", weights_only=True)
    meta = dict(payload.get("meta") or {})
    table = _read_any(ivv_table)
    missing = pd.read_csv(missing, dtype=str)
    predictions = pd.read_parquet(oof)
    agr = pd.read_parquet(agreement)
    pooled = agr[(agr["level"] == "all") & (agr["site"] == "all") & (agr["metric"] == "balanced_accuracy")
                 & agr["ci_method"].isin(["bootstrap_percentile", "none"])]
    comparisons = sorted(pooled["comparison"].unique(), key=lambda c: (not c.startswith("model_vs_"), c))
    evaluation = []
    for task in [t.name for t in TASKS if t.name in set(pooled["task"])]:
        row: dict[str, Any] = {"task": task}
        for comp in comparisons:
            hit = pooled[(pooled["task"] == task) & (pooled["comparison"] == comp)]
            if len(hit):
                r = hit.iloc[0]
                row[comp] = {k: (None if pd.isna(r[k]) else float(r[k])) for k in ("estimate", "ci_low", "ci_high")}
                row[comp]["n_discs"] = int(r["n_discs"])
        evaluation.append(row)
    settings = config["grader_training"]
    summary = {
        "model": weights.stem, "path": str(weights), "sha256": sha256_file(weights), "bytes": weights.stat().st_size,
        "loader": "spinecohort.grade.Grader.load(path)", "meta": meta,
        "data": {"n_labelled_discs_with_ivv": int(len(table)), "n_scans": int(table["scan_id"].nunique()),
                 "n_subjects": int(table["subject_id"].nunique()),
                 "n_labelled_discs_without_ivv": int(len(missing)),
                 "without_ivv_by_reason": {str(k): int(v) for k, v in missing.groupby("reason").size().items()}
                 if len(missing) else {}},
        "cross_validation": {"k": int(settings["k"]), "seed": int(settings["seed"]), "tta": int(config["tta"]),
                             "n_predictions": int(len(predictions)),
                             "folds": {str(f): int(n) for f, n in predictions.groupby("fold").size().items()},
                             "metric": "balanced_accuracy (pooled over levels and sites)",
                             "bootstrap": int(config["agreement"]["bootstrap"]),
                             "evaluation": evaluation},
    }
    atomic_write_bytes(json_out, json.dumps(summary, indent=1, default=str).encode())

    cfg = meta.get("config") or {}
    init = meta.get("init_weights")
    started = "random initialisation" if not init else "`{}` (sha256 `{}...`)".format(init["id"], init["sha256"][:16])
    header = "| task | " + " | ".join(f"{c} (95% CI)" for c in comparisons) + " |"
    lines_eval = [header, "|---|" + "---|" * len(comparisons)]
    for row in evaluation:
        cells = []
        for comp in comparisons:
            v = row.get(comp)
            if v is None or v["estimate"] is None:
                cells.append("" if v is None else f"n/a, n={v['n_discs']}")
                continue
            ci = "no CI" if v["ci_low"] is None else f"{v['ci_low']:.3f}-{v['ci_high']:.3f}"
            cells.append(f"{v['estimate']:.3f} ({ci}), n={v['n_discs']}")
        lines_eval.append(f"| {row['task']} | " + " | ".join(cells) + " |")
    lines = [
        f"# {weights.stem}: disc grader trained on this cohort's labels",
        "",
        "| | |",
        "|---|---|",
        f"| file | `{weights.name}` ({summary['bytes'] / 1e6:.2f} MB, fp16 weights) |",
        f"| sha256 | `{summary['sha256']}` |",
        "| format | `torch.load(weights_only=True)` dict: `format=spinecohort-grader`, `arch`, `state_dict`, `meta` |",
        "| loader | `spinecohort.grade.Grader.load(path)` |",
        f"| started from | {started} |",
        f"| trained | {meta.get('train_seconds', '?')} s on {meta.get('device', '?')} (torch {meta.get('torch', '?')}) |",
        "",
        "## Data",
        "",
        f"- {summary['data']['n_labelled_discs_with_ivv']} labelled discs from {summary['data']['n_scans']} scans of"
        f" {summary['data']['n_subjects']} subjects, as the pipeline extracted them (its own detection, labelling and"
        " disc volumes: what the model will see on the rest of the cohort).",
        f"- Targets: the reads of {', '.join(settings['readers']) if settings.get('readers') else 'every reader'}"
        " (a disc's reads averaged into a soft target).",
        f"- Labelled discs without a disc volume (not used): {summary['data']['n_labelled_discs_without_ivv']}"
        + "".join(f"; {n}: {r}" for r, n in summary["data"]["without_ivv_by_reason"].items()) + " (`missing_discs.csv`).",
        "",
        "## Recipe",
        "",
        f"SpineNetV2-style fine-tuning (`spinecohort.training.grader`): phase A, the whole network, {cfg.get('steps')}"
        f" AdamW steps of batch {cfg.get('batch_size')} (learning rate x {cfg.get('finetune_lr_factor')} when"
        f" fine-tuning); phase B, the heads on the frozen backbone, {cfg.get('head_epochs')} epochs, class-balanced."
        f" Seed {cfg.get('seed')}.",
        "",
        "## Cross-validated agreement",
        "",
        f"{settings['k']}-fold cross-validation at subject level (seed {settings['seed']}; all scans of a subject in"
        " one fold): every labelled disc is predicted once, by the model of the fold that did not train on its"
        " subject (`oof_predictions.parquet`), with the same recipe and starting weights as this model; TTA"
        f" {config['tta']}. Balanced accuracy pooled over levels and sites, 95 % subject-bootstrap intervals"
        f" ({config['agreement']['bootstrap']} resamples); every metric, level and site is in `agreement.parquet`,"
        " the confusion matrices in `confusion.parquet`. These figures estimate how this model (trained on all of"
        " the labelled discs) grades scans it has not seen from the same cohort.",
        "",
        *lines_eval,
        "",
        ("\"no CI\": too few subjects for the subject bootstrap (the `note` column of `agreement.parquet`). "
         if any(v is not None and v.get("ci_low") is None for row in evaluation for v in
                [row.get(c) for c in comparisons]) else "")
        + "The estimate includes the pipeline's own detection and labelling errors on these discs; labelled"
        " discs it did not extract (above) are not in it.",
        "",
        "## Use",
        "",
        "Grade the rest of the cohort with this file as the grading model (README, *Training the grader on your own"
        " labels*).",
        "",
    ]
    atomic_write_bytes(md_out, "\n".join(lines).encode())
    return Path(md_out)


# ----------------------------------------------------------------------------- CLI
def _config_from_args(args) -> TrainConfig:
    cfg = TrainConfig(seed=args.seed)
    if args.steps is not None:
        cfg.steps = args.steps
    if args.head_epochs is not None:
        cfg.head_epochs = args.head_epochs
    if args.batch_size is not None:
        cfg.batch_size = args.batch_size
    cfg.tta_eval = args.tta
    if args.pool is not None:
        cfg.arch["pool"] = args.pool
    return cfg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spinecohort train grader", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ivv-table", help="CSV/Parquet: scan_id, subject_id, level, path (per-scan IVV .npz)")
    p.add_argument("--labels", help="labels CSV/Parquet: scan_id, level, <Task>..., optional reader")
    p.add_argument("--out", required=True, help="output folder (CV) or .pt file (--synthetic)")
    p.add_argument("--k", type=int, default=5, help="folds (patient level)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-weights", default=None, help="grader checkpoint to fine-tune from (e.g. the shipped one in models/)")
    p.add_argument("--readers", default=None, help="comma-separated readers whose reads are the targets (default all)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"phase-A steps per model (default {TrainConfig.steps}; {SYNTH_STEPS} with --synthetic)")
    p.add_argument("--head-epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--tta", type=int, default=4)
    p.add_argument("--pool", choices=["global", "quadrants", "hybrid"], default=None,
                   help="feature pooling of a new network (spinecohort.nets.grader_cpu; default: DEFAULT_ARCH's)")
    p.add_argument("--final", action="store_true", help="after CV, also train on all labelled discs -> OUT/grader.pt")
    p.add_argument("--synthetic", action="store_true", help="reproduce the synthetic-only grader-cpu-v3 (--out models/grader-cpu-v3.pt)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="synthetic cohort cache (with --synthetic)")
    p.add_argument("--workers", type=int, default=1, help="processes generating synthetic scans")
    p.add_argument("--train-seeds", type=int, nargs=2, default=list(SYNTH_TRAIN_SEEDS), metavar=("START", "STOP"),
                   help="synthetic training scan seeds [START, STOP) (with --synthetic)")
    p.add_argument("--test-seeds", type=int, nargs=2, default=list(SYNTH_TEST_SEEDS), metavar=("START", "STOP"),
                   help="held-out synthetic scan seeds [START, STOP) (with --synthetic)")
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--log", default=str(DEFAULT_LOG))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(max(1, args.threads))
    log = ProgressLog(args.log)

    cfg = _config_from_args(args)
    readers = args.readers.split(",") if args.readers else None
    if args.synthetic:
        if args.steps is None:
            cfg.steps = SYNTH_STEPS
        command = ".venv/bin/python -m spinecohort.training.grader " + " ".join(list(sys.argv[1:] if argv is None else argv))
        train_synthetic(args.out, args.data_dir, cfg, train_seeds=tuple(args.train_seeds),
                        test_seeds=tuple(args.test_seeds), workers=args.workers, n_bootstrap=args.bootstrap, log=log,
                        readers=readers or ("R1", "R1-repeat"), command=command)
        return 0
    if not args.ivv_table or not args.labels:
        print("spinecohort train grader: --ivv-table and --labels are required (or --synthetic)", file=sys.stderr)
        return 2
    from ...grade import save_grader
    from ...stats import compute_agreement

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    oof, models = cross_validate(args.ivv_table, args.labels, k=args.k, seed=args.seed,
                                 init_weights=args.init_weights, config=cfg, tta=args.tta, log=log, readers=readers)
    oof.to_parquet(out / "oof_predictions.parquet", index=False)
    for i, g in enumerate(models):
        save_grader(out / f"grader-fold{i}.pt", g.net, g.meta)
    agr, conf = compute_agreement(oof, _read_any(args.labels), n_bootstrap=args.bootstrap, seed=args.seed)
    agr.to_parquet(out / "oof_agreement.parquet", index=False)
    conf.to_parquet(out / "oof_confusion.parquet", index=False)
    log(f"wrote {out / 'oof_predictions.parquet'} and {out / 'oof_agreement.parquet'}")
    if args.final:
        X, keys = load_ivv_arrays(args.ivv_table)
        targets = make_targets(keys, args.labels, readers)
        keep = np.any(np.stack([t.sum(1) > 0 for t in targets], 1), axis=1)
        net = fit(X[keep], [t[keep] for t in targets], cfg, init_state=_load_init(args.init_weights), log=log)
        save_grader(out / "grader.pt", net, {"trained_on": str(args.ivv_table), "config": asdict(cfg)})
        log(f"wrote {out / 'grader.pt'}")
    return 0


