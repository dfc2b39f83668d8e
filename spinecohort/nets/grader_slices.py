"""Slice-pooled disc grader: a shared 2-D encoder per valid IVV slice, pooled over the slices.

Grades 9-slice IVVs and single mid-sagittal slices alike (SPIDER-like exports, 1-slice series):
the input is the usual ``(B, 1, 9, 112, 224)`` IVV batch; a slice is *valid* where it is not all
zero (:mod:`spinecohort.discs` writes zeros for slices outside the volume or the detected range,
so a 1-slice series gives an IVV whose only valid slice is the centre, index 4). Only valid slices
are encoded, and the per-slice features are pooled with a masked mean and a masked max over the
valid slices, so the output for a single slice does not depend on the zero slices nor on where
the slice sits, and a volume is summarised whatever its number of slices.

Per-slice encoder (the in-plane part of :class:`spinecohort.nets.grader_cpu.GraderCPU`, as 2-D
convolutions, so that it can start from that synthetic-trained 3-D network, see
:func:`init_from_3d`): stem convolution 4x4 stride 4 with bias, ReLU -> 16 x 28 x 56; residual
basic blocks 32 ch stride 2 -> 14 x 28, 64 ch stride 2 -> 7 x 14, 128 ch stride 2 -> 4 x 7 (the strides of GraderCPU in-plane); 1x1
projection to 64 channels + BatchNorm + ReLU; average and max pooling over each quadrant of the
(rows, cols) plane (upper / lower x anterior / posterior: where a finding is, e.g. which endplate)
-> 512-d per slice. Slice pooling: masked mean and masked max -> 1024-d disc feature; one 2-layer
MLP head per task in :data:`spinecohort.tasks.TASKS` order (1024 -> ``head_hidden`` -> classes).

Pooling shared per-slice features over a variable number of slices follows the multiple-instance
view of a scan as a set of slices; SpineNet (Jamaludin et al. 2017) and SpineNetV2 (Windsor et al.
2022) grade the IVV with 3-D-aware networks over a fixed slice count, which cannot take one slice.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..tasks import TASKS

__all__ = ["GraderSlices", "GraderEnsemble", "ARCH_NAME", "ENSEMBLE_ARCH_NAME", "DEFAULT_SLICES_ARCH", "valid_slices",
           "init_from_3d", "build_grader_net", "first_member"]

ARCH_NAME = "slices2d"
ENSEMBLE_ARCH_NAME = "ensemble"

#: per-slice residual stages: (out channels, in-plane stride)
DEFAULT_SLICES_PLAN = [[32, 2], [64, 2], [128, 2]]
DEFAULT_SLICES_ARCH = {"name": ARCH_NAME, "stem_width": 16, "plan": DEFAULT_SLICES_PLAN, "proj_width": 64,
                       "head_hidden": 128, "dropout": 0.2}


def valid_slices(x: torch.Tensor) -> torch.Tensor:
    """(B, [1,] S, R, C) -> (B, S) bool: the slice holds any non-zero voxel (the IVV interface:
    zero slices are padding)."""
    if x.dim() == 5:
        x = x[:, 0]
    return x.flatten(2).abs().amax(dim=2) > 0


class _Block2d(nn.Module):
    """Residual basic block: 3x3 conv (strided) -> BN -> ReLU -> 3x3 conv -> BN, plus shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if cin != cout or stride != 1:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        s = x if self.shortcut is None else self.shortcut(x)
        return self.relu(y + s)


class GraderSlices(nn.Module):
    """Shared per-slice 2-D encoder, masked mean + max over the valid slices, 11 task heads.

    ``forward((B, 1, S, R, C))`` -> 11 logit tensors in :data:`TASKS` order. A disc without any
    valid slice gets the feature of zeros (its grades are then meaningless; the pipeline never
    makes such an IVV)."""

    task_names = tuple(t.name for t in TASKS)

    def __init__(self, stem_width: int = 16, plan: Sequence[Sequence[int]] = DEFAULT_SLICES_PLAN,
                 proj_width: int = 64, head_hidden: int = 128, dropout: float = 0.2, name: str = ARCH_NAME):
        super().__init__()
        if name != ARCH_NAME:
            raise ValueError(f"GraderSlices: arch name {name!r}, expected {ARCH_NAME!r}")
        plan = [[int(c), int(s)] for c, s in plan]
        self.arch = {"name": ARCH_NAME, "stem_width": int(stem_width), "plan": plan, "proj_width": int(proj_width),
                     "head_hidden": int(head_hidden), "dropout": float(dropout)}
        # a 4x4 / 4 patch embedding (1.2-1.4 mm cells on a lumbar IVV); no BN on the largest map
        self.stem = nn.Sequential(nn.Conv2d(1, stem_width, 4, stride=4, bias=True), nn.ReLU(inplace=True))
        blocks, cin = [], int(stem_width)
        for cout, st in plan:
            blocks.append(_Block2d(cin, cout, st))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.project = nn.Sequential(nn.Conv2d(cin, proj_width, 1, bias=False), nn.BatchNorm2d(proj_width),
                                     nn.ReLU(inplace=True))
        self.slice_dim = 8 * int(proj_width)  # quadrants x (mean, max)
        self.feature_dim = 2 * self.slice_dim  # slice pooling: masked mean, masked max
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(self.feature_dim, head_hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                          nn.Linear(head_hidden, t.n_classes))
            for t in TASKS
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for blk in self.blocks:  # zero-init the last BN of each residual branch (stable start)
            nn.init.zeros_(blk.bn2.weight)
        self.to(memory_format=torch.channels_last)

    def backbone_parameters(self):
        for name, p in self.named_parameters():
            if not name.startswith("heads."):
                yield p

    def slice_features(self, s: torch.Tensor) -> torch.Tensor:
        """(N, 1, R, C) single slices -> (N, slice_dim)."""
        y = self.project(self.blocks(self.stem(s.contiguous(memory_format=torch.channels_last))))
        return torch.cat([F.adaptive_avg_pool2d(y, (2, 2)).flatten(1), F.adaptive_max_pool2d(y, (2, 2)).flatten(1)], 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, R, C) (or (B, S, R, C)) -> (B, feature_dim)."""
        if x.dim() == 5:
            x = x[:, 0]
        b, s, r, c = x.shape
        valid = valid_slices(x)  # (B, S)
        flat = x.reshape(b * s, r, c)[valid.reshape(-1)]
        per = torch.zeros(b * s, self.slice_dim, dtype=x.dtype, device=x.device)
        if len(flat):
            f = self.slice_features(flat[:, None])
            per = per.to(f.dtype).index_copy(0, torch.nonzero(valid.reshape(-1)).flatten(), f)
        per = per.view(b, s, self.slice_dim)
        m = valid[:, :, None].to(per.dtype)
        count = m.sum(1).clamp_min(1.0)
        mean = (per * m).sum(1) / count
        # features are post-ReLU (>= 0), so zero rows never exceed a valid slice's maximum; an
        # all-empty disc gets 0
        mx = per.masked_fill(~valid[:, :, None], 0.0).amax(1)
        return torch.cat([mean, mx], 1)

    def classify(self, f: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(head(f) for head in self.heads)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.classify(self.features(x))


def init_from_3d(net: GraderSlices, state3d: Mapping[str, torch.Tensor]) -> list[str]:
    """Start ``net`` from a :class:`~spinecohort.nets.grader_cpu.GraderCPU` state dict with the
    same widths (quadrant pooling, 64-channel projection): every 3-D kernel summed over its slice
    axis (the 2-D kernel that answers a slice-constant volume as the 3-D one does), BatchNorm
    copied, each head's first layer split half / half over the (mean, max) slice pooling (for one
    slice, mean = max, so the head then answers as the 3-D head). Returns the keys copied; keys
    whose shapes do not match are left at their initialisation."""
    own = net.state_dict()
    new, done = {}, []
    for key, value in state3d.items():
        if key not in own:
            continue
        v = value.float()
        if v.dim() == 5:
            v = v.sum(dim=2)
        if key.startswith("heads.") and key.endswith(".0.weight") and v.dim() == 2 \
                and own[key].shape[1] == 2 * v.shape[1]:
            v = torch.cat([0.5 * v, 0.5 * v], dim=1)
        if tuple(v.shape) != tuple(own[key].shape):
            continue
        new[key] = v.to(own[key].dtype) if own[key].is_floating_point() else value
        done.append(key)
    own.update(new)
    net.load_state_dict(own)
    return done


class GraderEnsemble(nn.Module):
    """Several independently trained graders answering as one: per task, the mean of the members'
    log-probabilities (a normalised geometric mean of their class probabilities once the caller
    applies softmax, as :class:`spinecohort.grade.Grader` does).

    Why: members trained with different seeds err differently on real discs, and averaging them
    is a cheap gain in discrimination where the real training set is small (three seeds in
    patient-level CV on SPIDER: Pfirrmann balanced accuracy 0.506 against 0.500-0.504 alone;
    ``models/grader-cpu-v4.md``, Round 5); TTA shifts of one network vary less. It costs one
    forward pass per member."""

    def __init__(self, members: Sequence[Mapping], name: str = ENSEMBLE_ARCH_NAME):
        super().__init__()
        if name != ENSEMBLE_ARCH_NAME:
            raise ValueError(f"GraderEnsemble: arch name {name!r}, expected {ENSEMBLE_ARCH_NAME!r}")
        if not members:
            raise ValueError("GraderEnsemble: no members")
        if any(dict(m).get("name") == ENSEMBLE_ARCH_NAME for m in members):
            raise ValueError("GraderEnsemble: a member may not itself be an ensemble")
        self.members = nn.ModuleList(build_grader_net(m) for m in members)
        self.arch = {"name": ENSEMBLE_ARCH_NAME, "members": [dict(m.arch) for m in self.members]}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = [m(x) for m in self.members]
        return tuple(torch.stack([F.log_softmax(o[t].float(), dim=1) for o in outs]).mean(0)
                     for t in range(len(outs[0])))


def first_member(arch: Mapping, state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """``(arch, state_dict)`` of one network to fine-tune from: an ensemble's first member (the
    recipe trains one network), any other checkpoint unchanged."""
    arch = dict(arch or {})
    if arch.get("name") != ENSEMBLE_ARCH_NAME:
        return arch, dict(state)
    prefix = "members.0."
    return dict(arch["members"][0]), {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def build_grader_net(arch: Mapping | None = None) -> nn.Module:
    """The grading network an ``arch`` dict (a grader checkpoint's ``arch``) describes:
    :class:`GraderSlices` when ``arch["name"] == "slices2d"``, :class:`GraderEnsemble` when it is
    ``"ensemble"`` (its ``members`` archs), else the 3-D
    :class:`~spinecohort.nets.grader_cpu.GraderCPU` (old checkpoints store no name)."""
    arch = dict(arch or {})
    name = arch.get("name")
    if name == ARCH_NAME:
        return GraderSlices(**arch)
    if name == ENSEMBLE_ARCH_NAME:
        return GraderEnsemble(**arch)
    if name not in (None, "cpu3d"):
        raise ValueError(f"unknown grader architecture {name!r}; expected {ARCH_NAME!r}, {ENSEMBLE_ARCH_NAME!r}"
                         " or a GraderCPU arch")
    from .grader_cpu import GraderCPU

    arch.pop("name", None)
    return GraderCPU(**arch)
