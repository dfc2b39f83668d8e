"""CPU-default networks of the labelling stage (SpineNetV2 appearance + context).

``CPUAppearanceNet``: one vertebra's appearance volume ``(B, 1, S, R, C)`` (slices, rows, cols;
default 8 x 48 x 48, see :class:`spinecohort.label.AppearanceConfig`) plus, optionally, a few
scalar size features ``(B, F)`` (log body height / depth in mm) -> 24 level logits in the order
of :data:`spinecohort.tasks.LEVELS` (index 0 = S1 ... 23 = C2). The slices are folded into the
channels of a small 2-D CNN (a vertebra volume has few slices and the net is much cheaper so),
after a per-slice stem shared by all slices.

``CPUContextNet``: the height-probability map ``(B, 1, H, 24)`` (1 row per mm, H a multiple of
``row_multiple``) -> refined logits of the same shape, like the official ContextModel's I/O. The
24 level columns are treated as channels of a 1-D encoder-decoder along the rows (stride 16, then
dilated residual blocks at 16 mm per row: a receptive field of ~800 mm, enough to count from the
sacrum or C2 across a whole spine), with skip connections and the input's log-probabilities added back, so
an untrained net starts near the identity.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AppearanceEnsemble", "CPUAppearanceNet", "CPUContextNet", "N_LEVELS"]

N_LEVELS = 24


def _c2(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CPUAppearanceNet(nn.Module):
    """Small level classifier on a (B, 1, S, R, C) vertebra volume (+ (B, n_scalars) features).

    A shared per-slice stem (stride 2), the slices folded into channels, then a stride-2 conv and
    three conv/pool stages to 1/16 of the input; mean- and max-pooled features (+ the scalars)
    feed a two-layer head."""

    def __init__(self, n_slices: int = 8, widths: Sequence[int] = (8, 48, 64, 96, 128),
                 n_scalars: int = 2, hidden: int = 128, dropout: float = 0.3,
                 n_classes: int = N_LEVELS):
        super().__init__()
        w = [int(x) for x in widths]
        self.n_slices = int(n_slices)
        self.n_scalars = int(n_scalars)
        self.stem = _c2(1, w[0], stride=2)
        self.body = nn.Sequential(
            _c2(w[0] * self.n_slices, w[1], stride=2),
            _c2(w[1], w[2]), nn.MaxPool2d(2),
            _c2(w[2], w[3]), nn.MaxPool2d(2),
            _c2(w[3], w[4]),
        )
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(w[4] * 2 + self.n_scalars, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: torch.Tensor, scalars: torch.Tensor | None = None) -> torch.Tensor:
        b, _, s, r, c = x.shape
        if s != self.n_slices:
            raise ValueError(f"CPUAppearanceNet expects {self.n_slices} slices, got {s}")
        y = self.stem(x.reshape(b * s, 1, r, c))
        y = y.reshape(b, s * y.shape[1], y.shape[2], y.shape[3])
        y = self.body(y)
        feat = torch.cat([y.mean(dim=(2, 3)), y.amax(dim=(2, 3))], dim=1)
        if self.n_scalars:
            if scalars is None:
                scalars = torch.zeros(b, self.n_scalars, dtype=feat.dtype, device=feat.device)
            feat = torch.cat([feat, scalars.to(feat.dtype)], dim=1)
        return self.head(feat)


class AppearanceEnsemble(nn.Module):
    """Several appearance nets of one architecture, trained apart (different augmentation draws),
    read as one: the mean of their log-softmax outputs (a geometric mean of their probabilities,
    returned as logits). Averaging members that err on different bodies steadies the level
    evidence on scanners none of them saw (Lakshminarayanan et al. 2017, deep ensembles)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an appearance ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor, scalars: torch.Tensor | None = None) -> torch.Tensor:
        return torch.stack([F.log_softmax(m(x, scalars), dim=1) for m in self.members]).mean(dim=0)


def _c1(cin: int, cout: int, k: int = 5, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
                         nn.BatchNorm1d(cout), nn.ReLU(inplace=True))


class CPUContextNet(nn.Module):
    """Height-probability map refinement: (B, 1, H, 24) -> (B, 1, H, 24) logits.

    Encoder of ``len(widths)`` stride-2 stages (1 mm -> 2^k mm rows), dilated residual blocks at
    the coarsest scale, decoder with skip connections back to 1 mm, plus the input's
    log-probabilities on covered rows (``skip_gain``)."""

    def __init__(self, widths: Sequence[int] = (24, 32, 48, 64), mid: int = 64,
                 dilations: Sequence[int] = (1, 2, 4, 8, 1), n_levels: int = N_LEVELS):
        super().__init__()
        w = [int(x) for x in widths]
        self.n_levels = n_levels
        self.row_multiple = 2 ** len(w)
        cin = n_levels + 1  # probabilities + occupancy (row covered by a detection)
        self.enc = nn.ModuleList([_c1(cin if i == 0 else w[i - 1], w[i], 5) for i in range(len(w))])
        self.mid_in = _c1(w[-1], mid, 3)
        self.mid = nn.ModuleList([_c1(mid, mid, 3, d) for d in dilations])
        dec = []
        prev = mid
        for i in reversed(range(len(w))):
            dec.append(_c1(prev + w[i], w[i], 3))
            prev = w[i]
        self.dec = nn.ModuleList(dec)
        self.out = nn.Conv1d(w[0], n_levels, 1)
        self.skip_gain = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % self.row_multiple:
            raise ValueError(f"CPUContextNet needs a row count divisible by {self.row_multiple}")
        p = x[:, 0].transpose(1, 2)  # (B, 24, H)
        occ = (p.sum(dim=1, keepdim=True) > 0).to(p.dtype)
        h = torch.cat([p, occ], dim=1)
        skips = []
        for i, blk in enumerate(self.enc):
            h = blk(h if i == 0 else F.max_pool1d(h, 2))
            skips.append(h)
        m = self.mid_in(F.max_pool1d(h, 2))
        for blk in self.mid:
            m = m + blk(m)
        for blk, sk in zip(self.dec, reversed(skips)):
            m = blk(torch.cat([F.interpolate(m, size=sk.shape[-1], mode="linear", align_corners=False), sk], 1))
        logits = self.out(m) + self.skip_gain * torch.log(p.clamp(min=1e-4)) * occ
        return logits.transpose(1, 2)[:, None]
