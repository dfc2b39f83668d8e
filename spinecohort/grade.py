"""Disc grading inference with test-time augmentation, and evidence hotspots.

``Grader`` wraps either a CPU network (the slice-pooled :mod:`spinecohort.nets.grader_slices` or
the 3-D :mod:`spinecohort.nets.grader_cpu`, loaded from a ``models/grader-cpu-v*.pt`` checkpoint
whose ``arch`` names it) or the official SpineNetV2 grading network
(:class:`spinecohort.nets.official.GradingModel`), and returns, per IVV, class probabilities on
the contract's scale for every task in :data:`spinecohort.tasks.TASKS`.

Test-time augmentation (``tta``): the softmax probabilities of ``tta`` copies of each IVV are
averaged. The copies are fixed integer shifts (zero fill), taken in this order from
:data:`TTA_SHIFTS` (slices, rows, cols): identity, cols +8, cols -8, rows +4, rows -4, slice
window +1, slice window -1, ... (``tta=1`` = no augmentation). Deterministic by construction.

Official network: its input is the IVV halved (the official recipe clips at twice the bodies'
median and divides by 2, so the bodies' median is 0.25; our IVVs clip at 1 = twice the median,
so only voxels brighter than that differ), and its 3-class spondylolisthesis head is mapped onto
the contract's 0/1: P(0) = p[0], P(1) = p[1] + p[2] (class 0 = no listhesis; classes 1 and 2 are
listhesis of either kind, as SpineNet reports them 0-based with 0 meaning absent).

Evidence hotspots (Jamaludin et al. 2017, section 3): for a task, the magnitude of the gradient
of the predicted class's score (its logit; for a mapped class, the log-sum-exp of the logits
mapped to it) with respect to the input voxels, averaged over ``n_aug`` augmented copies
(identity plus seeded integer shifts with a little noise), each copy's map shifted back onto the
IVV grid. :func:`hotspot_montage` draws one PNG per disc and task, large enough to read.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .discs import IVV_SHAPE
from .nets.storage import save_checkpoint_file, storable_state_dict
from .tasks import TASK_BY_NAME, TASKS

__all__ = [
    "Grader",
    "CHECKPOINT_FORMAT",
    "TTA_SHIFTS",
    "tta_shifts",
    "shift_volume",
    "save_grader",
    "grades_frame",
    "hotspot_montage",
]

CHECKPOINT_FORMAT = "spinecohort-grader"
TASK_NAMES = tuple(t.name for t in TASKS)
#: (slices, rows, cols) integer shifts used for test-time augmentation, in order.
TTA_SHIFTS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (0, 0, 8), (0, 0, -8), (0, 4, 0), (0, -4, 0), (1, 0, 0), (-1, 0, 0),
    (0, 4, 8), (0, -4, -8), (0, 4, -8), (0, -4, 8), (0, 0, 16), (0, 0, -16),
)
#: official head -> contract class for each official class (only spondylolisthesis differs)
_OFFICIAL_SPN_MAP = (0, 1, 1)


def tta_shifts(n: int) -> list[tuple[int, int, int]]:
    """The first ``n`` shifts of :data:`TTA_SHIFTS` (``n`` >= 1)."""
    n = int(n)
    if n < 1:
        raise ValueError("tta must be >= 1")
    if n > len(TTA_SHIFTS):
        raise ValueError(f"tta must be <= {len(TTA_SHIFTS)}")
    return list(TTA_SHIFTS[:n])


def shift_volume(x: torch.Tensor, shift: Sequence[int]) -> torch.Tensor:
    """Shift the last three axes (slices, rows, cols) by integers, filling with zeros."""
    out = x
    for axis, d in zip((-3, -2, -1), shift):
        d = int(d)
        if d == 0:
            continue
        n = out.shape[axis]
        rolled = torch.roll(out, d, dims=axis)
        idx = torch.arange(n, device=x.device)
        keep = (idx >= d) if d > 0 else (idx < n + d)
        shape = [1] * out.dim()
        shape[axis] = n
        out = rolled * keep.view(shape).to(rolled.dtype)
    return out


def save_grader(path: str | Path, net: nn.Module, meta: Mapping[str, Any] | None = None, half: bool = True) -> Path:
    """Write a CPU-grader checkpoint (floating tensors in fp16 when ``half``) readable with
    ``torch.load(weights_only=True)``."""
    state = storable_state_dict(net, half)
    # plain JSON types only, so that torch.load(weights_only=True) reads the file
    arch = json.loads(json.dumps(dict(getattr(net, "arch", {}))))
    meta = json.loads(json.dumps(dict(meta or {}), default=str))
    payload = {"format": CHECKPOINT_FORMAT, "format_version": 1, "arch": arch, "state_dict": state, "meta": meta}
    return save_checkpoint_file(path, payload)


def _as_batch(ivvs: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    arr = [np.asarray(getattr(v, "volume", v)) for v in ivvs]
    for a in arr:
        if a.shape != IVV_SHAPE:
            raise ValueError(f"an IVV must have shape {IVV_SHAPE}, got {a.shape}")
    return np.stack(arr) if arr else np.zeros((0, *IVV_SHAPE), np.float32)


class Grader:
    """Disc grading network plus TTA and hotspots. Build with :meth:`load` or :meth:`official`."""

    def __init__(self, net: nn.Module, kind: str = "cpu", device: str = "cpu",
                 meta: Mapping[str, Any] | None = None, model_id: str = "grader"):
        if kind not in ("cpu", "official"):
            raise ValueError("kind must be 'cpu' or 'official'")
        self.net = net.to(device).eval()
        self.kind = kind
        self.device = torch.device(device)
        self.meta = dict(meta or {})
        self.model_id = model_id
        self.input_scale = 0.5 if kind == "official" else 1.0
        from .nets.official import param_dtype

        self.input_dtype = param_dtype(self.net)  # bfloat16 for official nets under models.precision

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "Grader":
        from .nets.grader_cpu import GraderCPU
        from .nets.grader_slices import build_grader_net

        path = Path(path)
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a spinecohort grader checkpoint")
        try:  # the arch dict names the network (slice-pooled "slices2d"; no name = the 3-D GraderCPU)
            net = build_grader_net(payload.get("arch", {}))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: grader checkpoint with an unusable arch: {exc}") from exc
        state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
        net.load_state_dict(state, strict=True)
        if isinstance(net, GraderCPU):
            net.to(memory_format=torch.channels_last_3d)
        return cls(net, "cpu", device, payload.get("meta"), model_id=path.stem)

    @classmethod
    def official(cls, module: nn.Module, device: str = "cpu") -> "Grader":
        """Wrap the official ``GradingModel`` (e.g. from ``build_official('grading')`` with the
        official weights loaded)."""
        return cls(module, "official", device, {"source": "spinenet-official"}, model_id="spinenet-official/grading")

    # ------------------------------------------------------------------ core
    def _logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 9, 112, 224) on the device -> 11 raw logit tensors (official classes)."""
        out = self.net((x[:, None] * self.input_scale).to(self.input_dtype))
        return list(out)

    @staticmethod
    def _group_matrix(task_index: int, kind: str) -> list[list[int]] | None:
        if kind == "official" and TASKS[task_index].name == "Spondylolisthesis":
            groups: list[list[int]] = [[] for _ in TASKS[task_index].grades]
            for j, c in enumerate(_OFFICIAL_SPN_MAP):
                groups[c].append(j)
            return groups
        return None

    def _log_probs(self, logits: list[torch.Tensor]) -> list[torch.Tensor]:
        """Log-probabilities on the contract scale per task."""
        out = []
        for i, lg in enumerate(logits):
            lp = F.log_softmax(lg.float(), dim=1)
            groups = self._group_matrix(i, self.kind)
            if groups is not None:
                lp = torch.stack([torch.logsumexp(lp[:, g], dim=1) for g in groups], dim=1)
            out.append(lp)
        return out

    def _scores(self, logits: list[torch.Tensor], i: int, cls_idx: int) -> torch.Tensor:
        groups = self._group_matrix(i, self.kind)
        lg = logits[i].float()
        if groups is None:
            return lg[:, cls_idx]
        return torch.logsumexp(lg[:, groups[cls_idx]], dim=1)

    def predict_tensor(self, x: torch.Tensor, tta: int = 4, batch_size: int = 32) -> list[np.ndarray]:
        """x (N, 9, 112, 224) float -> per task (N, k) mean probabilities over the TTA copies."""
        shifts = tta_shifts(tta)
        n = x.shape[0]
        sums = [np.zeros((n, t.n_classes), np.float64) for t in TASKS]
        jobs = [(i, s) for i in range(n) for s in shifts]
        with torch.inference_mode():
            for start in range(0, len(jobs), batch_size):
                chunk = jobs[start:start + batch_size]
                xb = torch.stack([shift_volume(x[i], s) for i, s in chunk]).to(self.device, torch.float32)
                lps = self._log_probs(self._logits(xb))
                idx = np.array([i for i, _ in chunk])
                for t, lp in enumerate(lps):
                    np.add.at(sums[t], idx, lp.exp().double().cpu().numpy())
        return [(s / len(shifts)).astype(np.float32) for s in sums]

    def grade(self, ivvs: Sequence[np.ndarray] | np.ndarray, tta: int = 4, batch_size: int = 32) -> list[dict[str, np.ndarray]]:
        """Per IVV: task -> class probabilities on the contract scale (sum 1), TTA-averaged."""
        arr = _as_batch(ivvs)
        if len(arr) == 0:
            return []
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        probs = self.predict_tensor(x, tta=tta, batch_size=batch_size)
        return [{t.name: probs[k][i] for k, t in enumerate(TASKS)} for i in range(len(arr))]

    # ------------------------------------------------------------------ hotspots
    def hotspots(self, ivv: np.ndarray, task: str, n_aug: int = 4, seed: int = 0) -> np.ndarray:
        """|d score / d input| for ``task``'s predicted class, averaged over ``n_aug`` augmented
        copies (identity first; then seeded integer shifts of up to 4 rows / 8 cols plus Gaussian
        noise of s.d. 0.02), each mapped back onto the IVV grid. Returns float32 (9, 112, 224) >= 0.
        """
        if task not in TASK_BY_NAME:
            raise ValueError(f"unknown task {task!r}")
        t_idx = TASK_NAMES.index(task)
        vol = np.asarray(getattr(ivv, "volume", ivv), np.float32)
        if vol.shape != IVV_SHAPE:
            raise ValueError(f"an IVV must have shape {IVV_SHAPE}, got {vol.shape}")
        n_aug = max(int(n_aug), 1)
        rng = np.random.default_rng(seed)
        shifts = [(0, 0, 0)] + [(0, int(rng.integers(-4, 5)), int(rng.integers(-8, 9))) for _ in range(n_aug - 1)]
        noise = [np.zeros_like(vol)] + [rng.normal(0.0, 0.02, vol.shape).astype(np.float32) for _ in range(n_aug - 1)]
        # all-zero slices are padding (no slice there; the slice-pooled grader skips them): keep them zero
        filled = (np.abs(vol).reshape(vol.shape[0], -1).max(axis=1) > 0).astype(np.float32)[:, None, None]
        noise = [nz * filled for nz in noise]
        base = torch.from_numpy(vol)
        views = torch.stack([shift_volume(base, s) + torch.from_numpy(nz) for s, nz in zip(shifts, noise)])
        views = views.to(self.device).requires_grad_(True)
        was_training = self.net.training
        self.net.eval()
        with torch.enable_grad():
            logits = self._logits(views)
            lp = self._log_probs(logits)[t_idx]
            cls_idx = int(lp.exp().mean(0).argmax())
            score = self._scores(logits, t_idx, cls_idx).sum()
            grad, = torch.autograd.grad(score, views)
        self.net.train(was_training)
        g = grad.detach().abs().cpu()
        back = torch.stack([shift_volume(g[v], [-d for d in shifts[v]]) for v in range(n_aug)])
        return back.mean(0).numpy().astype(np.float32)


# ----------------------------------------------------------------------------- tables
def grades_frame(keys: Sequence[Mapping[str, Any]], probs: Sequence[Mapping[str, np.ndarray]],
                 model_id: str | None = None):
    """Discs-table rows: the ``keys`` columns (e.g. scan_id, level, ...) then per task ``<Task>``
    (argmax grade on the contract scale) and ``<Task>_probs`` (list of floats), then ``model_id``."""
    import pandas as pd

    rows = []
    for key, p in zip(keys, probs):
        row = dict(key)
        for t in TASKS:
            pr = np.asarray(p[t.name], float)
            row[t.name] = int(t.grades[int(np.argmax(pr))])
            row[f"{t.name}_probs"] = [float(v) for v in pr]
        if model_id is not None:
            row["model_id"] = model_id
        rows.append(row)
    df = pd.DataFrame(rows)
    for t in TASKS:
        if t.name in df:
            df[t.name] = df[t.name].astype("Int64")
    return df


# ----------------------------------------------------------------------------- montage
def hotspot_montage(ivv: np.ndarray, heat: np.ndarray, path: str | Path, title: str | None = None,
                    slices: Sequence[int] | None = None) -> Path:
    """PNG large enough to read in the report: chosen IVV slices (default every other slice that
    holds image data, so a single-slice IVV shows its one slice, not empty padding) in grey with
    the hotspot map (normalised to its 99.5th percentile) overlaid in red-yellow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vol = np.asarray(getattr(ivv, "volume", ivv), np.float32)
    heat = np.asarray(heat, np.float32)
    if vol.shape != heat.shape:
        raise ValueError("ivv and heat must have the same shape")
    if slices is not None:
        ks = list(slices)
    else:
        filled = [k for k in range(vol.shape[0]) if vol[k].any()] or list(range(vol.shape[0]))
        ks = filled[::2] if len(filled) > 5 else filled
    top = float(np.percentile(heat, 99.5)) or float(heat.max()) or 1.0
    h = np.clip(heat / top, 0.0, 1.0)
    panel = max(2.8, 8.0 / len(ks))  # inches per slice (IVV aspect 2:1); at least 8 in overall
    fig, axes = plt.subplots(1, len(ks), figsize=(panel * len(ks), panel / 2 + 0.45), dpi=100)
    axes = np.atleast_1d(axes)
    for ax, k in zip(axes, ks):
        ax.imshow(vol[k], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.imshow(h[k], cmap="hot", alpha=np.clip(h[k] * 0.9, 0, 0.9), vmin=0.0, vmax=1.0, interpolation="bilinear")
        ax.set_title(f"IVV slice {k}", fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.8 if title else 0.88, wspace=0.05)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path



