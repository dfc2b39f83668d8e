"""CPU-default disc grading network.

Input ``(B, 1, 9, 112, 224)`` (IVV slices, rows, cols; see :mod:`spinecohort.discs`), output a
tuple of 11 logit tensors in SpineNet's head order (:data:`spinecohort.tasks.TASKS`: Pfirrmann 5,
Narrowing 4, CentralCanalStenosis 4, then the eight binary tasks with 2 classes each).

Architecture (a slim 3-D ResNet in the spirit of SpineNetV2's grading network, sized for CPUs):

* stem: one 3-D convolution, kernel (3, 4, 4), stride (1, 4, 4) (patch embedding: 1.2-1.4 mm
  in-plane cells for a lumbar IVV) with bias, ReLU (no BatchNorm: the input is already
  normalised, and BatchNorm on this largest map costs a quarter of a CPU training step)
  -> 16 x 9 x 28 x 56;
* three residual basic blocks (``plan``): 32 ch, stride (2, 2, 2) -> 5 x 14 x 28; 64 ch,
  stride (1, 2, 2) -> 5 x 7 x 14; 128 ch, stride (2, 2, 2) -> 3 x 4 x 7, the last one with a
  (3, 3, 3) convolution (the stem and the strided slice steps mix the slices before);
* the 512-d disc feature, by ``pool``: ``"global"`` (v1): 1x1x1 projection to 256 channels,
  global average and global max pooling concatenated; ``"quadrants"``: projection to 64
  channels, average and max pooling over each quadrant of the (rows, cols) plane (upper/lower
  x anterior/posterior; all slices), so the feature keeps *where* a finding is: the upper vs
  the lower endplate, the posterior canal vs the disc; ``"hybrid"``: projection to 128
  channels, global average and max of all of them (256) plus quadrant average and max of the
  first 32 (256): a finding on the quadrants' border (a herniation at the disc's mid-height)
  keeps a whole-volume summary while the endplates keep their place (on the synthetic cohort
  no better than ``"quadrants"``, see models/grader-cpu-v3.md);
* one 2-layer MLP head per task (512 -> ``head_hidden`` -> classes, ReLU, dropout).

Weights and activations are kept in ``channels_last_3d``, which is markedly faster on CPUs.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..tasks import TASKS

__all__ = ["GraderCPU", "build_cpu_grader", "FEATURE_DIM", "DEFAULT_ARCH"]

FEATURE_DIM = 512
#: Feature pooling -> channels after the 1x1x1 projection (x average/max x regions = FEATURE_DIM).
POOL_WIDTH = {"global": 256, "quadrants": 64, "hybrid": 128}
_HYBRID_QUADRANT_CHANNELS = 32


def _pad(k: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(v) // 2 for v in k)


class _Block(nn.Module):
    """Residual basic block: conv k1 (strided) -> BN -> ReLU -> conv k2 -> BN, plus shortcut."""

    def __init__(self, cin: int, cout: int, stride, k1=(1, 3, 3), k2=(3, 3, 3)):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, k1, stride, _pad(k1), bias=False)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = nn.Conv3d(cout, cout, k2, 1, _pad(k2), bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if cin != cout or stride != 1:
            self.shortcut = nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False), nn.BatchNorm3d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        s = x if self.shortcut is None else self.shortcut(x)
        return self.relu(y + s)


#: Residual stages: (out channels, stride (s, r, c), kernel 1, kernel 2).
DEFAULT_PLAN = [
    [32, [2, 2, 2], [1, 3, 3], [1, 3, 3]],
    [64, [1, 2, 2], [1, 3, 3], [1, 3, 3]],
    [128, [2, 2, 2], [1, 3, 3], [3, 3, 3]],
]


class GraderCPU(nn.Module):
    """Slim 3-D ResNet grader; ``forward`` returns 11 logit tensors in :data:`TASKS` order."""

    task_names = tuple(t.name for t in TASKS)

    def __init__(self, stem_width: int = 16, plan: Sequence[Sequence] = DEFAULT_PLAN, head_hidden: int = 128,
                 dropout: float = 0.2, pool: str = "global"):
        super().__init__()
        if pool not in POOL_WIDTH:
            raise ValueError(f"unknown pool {pool!r}; expected one of {sorted(POOL_WIDTH)}")
        plan = [[int(c), [int(v) for v in st], [int(v) for v in k1], [int(v) for v in k2]] for c, st, k1, k2 in plan]
        self.arch = {"stem_width": int(stem_width), "plan": plan, "head_hidden": int(head_hidden),
                     "dropout": float(dropout), "pool": pool}
        self.pool = pool
        self.stem = nn.Sequential(
            nn.Conv3d(1, stem_width, (3, 4, 4), stride=(1, 4, 4), padding=(1, 0, 0), bias=True),
            nn.ReLU(inplace=True),
        )
        blocks, cin = [], int(stem_width)
        for cout, st, k1, k2 in plan:
            blocks.append(_Block(cin, cout, tuple(st), tuple(k1), tuple(k2)))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        width = POOL_WIDTH[pool]
        self.project = nn.Sequential(
            nn.Conv3d(cin, width, 1, bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
        )
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(FEATURE_DIM, head_hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                          nn.Linear(head_hidden, t.n_classes))
            for t in TASKS
        )
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for blk in self.blocks:  # zero-init the last BN of each residual branch (stable start)
            nn.init.zeros_(blk.bn2.weight)
        self.to(memory_format=torch.channels_last_3d)

    def backbone_parameters(self):
        for name, p in self.named_parameters():
            if not name.startswith("heads."):
                yield p

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 9, 112, 224) -> (B, 512): average and max pooled projection."""
        x = x.contiguous(memory_format=torch.channels_last_3d)
        y = self.project(self.blocks(self.stem(x)))
        if self.pool == "quadrants":
            return _quadrant_pool(y)
        whole = torch.cat([y.mean(dim=(2, 3, 4)), y.amax(dim=(2, 3, 4))], dim=1)
        if self.pool == "global":
            return whole
        return torch.cat([whole, _quadrant_pool(y[:, :_HYBRID_QUADRANT_CHANNELS])], dim=1)

    def classify(self, f: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(head(f) for head in self.heads)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.classify(self.features(x))


def _quadrant_pool(y: torch.Tensor) -> torch.Tensor:
    """(B, C, S, R, C') -> (B, 8C): average and max over each (upper/lower, anterior/posterior) quadrant."""
    return torch.cat([F.adaptive_avg_pool3d(y, (1, 2, 2)).flatten(1),
                      F.adaptive_max_pool3d(y, (1, 2, 2)).flatten(1)], dim=1)


DEFAULT_ARCH = {"stem_width": 16, "plan": DEFAULT_PLAN, "head_hidden": 128, "dropout": 0.2, "pool": "quadrants"}


def build_cpu_grader(**kwargs) -> GraderCPU:
    """The CPU default grader (keyword arguments as :class:`GraderCPU`)."""
    arch = dict(DEFAULT_ARCH)
    arch.update(kwargs)
    return GraderCPU(**arch)
