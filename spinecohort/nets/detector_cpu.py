"""CPU-friendly vertebra detector: a small U-Net producing the official 13-channel layout.

Input ``(B, 1, H, W)`` (H, W multiples of 32), output ``(B, 13, H, W)`` with the channel layout
of the official SpineNetV2 detector (``spinecohort.nets.official.DETECTOR_CHANNELS``):

- 0-3: corner heatmaps rt, rb, lb, lt (= superior-posterior, inferior-posterior,
  inferior-anterior, superior-anterior when cols run anterior -> posterior);
- 4: centroid heatmap;
- 5-8: corner -> centroid displacement along cols (x), in input pixels, same corner order;
- 9-12: the same along rows (y).

Heatmaps are raw (no sigmoid; targets peak at 1). The encoder/decoder work at half resolution
after a stride-2 stem; the decoder's features are upsampled to the input size and, with the raw
input, refined by one full-resolution 3x3 convolution (``full_res_width``; 0 = plain bilinear
upsampling of the maps), so nearby corners across thin discs stay separate peaks.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CPUDetectorUNet", "build_cpu_detector", "N_OUT"]

N_OUT = 13


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _Down(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(_conv_bn_relu(cin, cout, stride), _conv_bn_relu(cout, cout))


class _Up(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.conv1 = _conv_bn_relu(cin + cskip, cout)
        self.conv2 = _conv_bn_relu(cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv2(self.conv1(torch.cat([x, skip], dim=1)))


class CPUDetectorUNet(nn.Module):
    """Small U-Net; ``widths`` per level (level 0 at half the input resolution)."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 96, 128), head_width: int = 24,
                 arrow_scale: float = 16.0, full_res_width: int = 0):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        self.widths = widths
        self.arrow_scale = float(arrow_scale)
        self.stem = _Down(1, widths[0], 2)
        self.downs = nn.ModuleList(_Down(widths[i - 1], widths[i], 2) for i in range(1, len(widths)))
        ups = []
        cin = widths[-1]
        for i in range(len(widths) - 2, -1, -1):
            cout = head_width if i == 0 else widths[i]
            ups.append(_Up(cin, widths[i], cout))
            cin = cout
        self.ups = nn.ModuleList(ups)
        self.full_res_width = int(full_res_width)
        if self.full_res_width > 0:
            # full-resolution refinement: upsampled features + the raw input -> 3x3 conv
            self.refine = _conv_bn_relu(cin + 1, self.full_res_width)
            cin = self.full_res_width
        self.head = nn.Conv2d(cin, N_OUT, 1)
        with torch.no_grad():
            self.head.bias.zero_()
            self.head.weight.mul_(0.1)

    @property
    def stride(self) -> int:
        return 2 ** len(self.widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        y = self.stem(x)
        skips = [y]
        for down in self.downs:
            y = down(y)
            skips.append(y)
        skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        if self.full_res_width > 0:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            y = self.head(self.refine(torch.cat([y, x], dim=1)))
        else:
            y = F.interpolate(self.head(y), size=size, mode="bilinear", align_corners=False)
        heat, arrows = y[:, :5], y[:, 5:] * self.arrow_scale
        return torch.cat([heat, arrows], dim=1)


def build_cpu_detector(**kwargs) -> CPUDetectorUNet:
    """The CPU default detector (keyword arguments as :class:`CPUDetectorUNet`)."""
    return CPUDetectorUNet(**kwargs)
