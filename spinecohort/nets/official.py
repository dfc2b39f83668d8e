"""Independent PyTorch implementations of the four official SpineNetV2 networks.

Written from the architecture facts of the shared reference (``spinenet-official-checkpoints.json``
and ``spinenet-equivalence.md``, section 7); no code of the ``spinenet`` package is used. The
module names, registration order and tensor shapes are chosen so that ``state_dict()`` has exactly
the official entry names, shapes and order, i.e. an official checkpoint loads strictly.

Networks (``build_official(name)``):

``detector``   VFRResNetDetector: 2-D U-Net on a ResNet-50 encoder, (B,1,224,224) -> (B,13,224,224)
``appearance`` AppearanceModel: small 3-D CNN, (B,1,224,224,16) (rows, cols, slices) -> (B,24) logits
``context``    ContextModel: rows-only U-Net, (B,1,R,24), R a multiple of 16 -> (B,1,R,24)
``grading``    GradingModel: 3-D ResNet-34-like, (B,1,9,112,224) -> tuple of 11 logit tensors

All outputs are raw (no sigmoid/softmax). Build the models in eval mode (``build_official`` does)
and run them under ``torch.inference_mode()``.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "OFFICIAL_NAMES",
    "GRADING_HEADS",
    "GRADING_CLASSES",
    "LEVEL_NAMES",
    "DETECTOR_CHANNELS",
    "NETWORK_FACTS",
    "VFRResNetDetector",
    "AppearanceModel",
    "ContextModel",
    "GradingModel",
    "build_official",
    "official_template",
    "official_from_state_dict",
    "to_inference_layout",
    "fold_batchnorm",
    "Conv3d",
]

OFFICIAL_NAMES: tuple[str, ...] = ("detector", "appearance", "context", "grading")

#: Grading heads in output order, and their class counts.
GRADING_HEADS: tuple[str, ...] = (
    "pf", "nar", "ccs", "spn", "ued", "led", "umc", "lmc", "fsl", "fsr", "hrn",
)
GRADING_CLASSES: dict[str, int] = {
    "pf": 5, "nar": 4, "ccs": 4, "spn": 3, "ued": 2, "led": 2,
    "umc": 2, "lmc": 2, "fsl": 2, "fsr": 2, "hrn": 2,
}

#: Appearance / context level order (index 0..23).
LEVEL_NAMES: tuple[str, ...] = (
    "S1", "L5", "L4", "L3", "L2", "L1",
    "T12", "T11", "T10", "T9", "T8", "T7", "T6", "T5", "T4", "T3", "T2", "T1",
    "C7", "C6", "C5", "C4", "C3", "C2",
)

#: Detector output channels (raw maps; arrows in 224-px tile units).
DETECTOR_CHANNELS: dict[str, tuple[int, ...]] = {
    "corners_rt_rb_lb_lt": (0, 1, 2, 3),
    "centroid": (4,),
    "arrow_col_x": (5, 6, 7, 8),
    "arrow_row_y": (9, 10, 11, 12),
}

#: Per-network facts: official class, checkpoint sub-folder and key, I/O layout (batch first).
NETWORK_FACTS: dict[str, dict[str, Any]] = {
    "detector": {
        "class": "VFRResNetDetector",
        "folder": "detect-vfr",
        "state_dict_key": "net",
        "official_file": "ckpt435.pt",
        "input_shape": (4, 1, 224, 224),
        "input_layout": "(tiles, 1, rows, cols)",
        "output": "Tensor (B, 13, 224, 224): ch 0-3 corners rt,rb,lb,lt; 4 centroid; "
        "5-8 arrow x (cols); 9-12 arrow y (rows); raw, no sigmoid",
        "state_dict_entries": 414,
    },
    "appearance": {
        "class": "AppearanceModel",
        "folder": "appearance",
        "state_dict_key": "net",
        "official_file": "ckpt187.pt",
        "input_shape": (1, 1, 224, 224, 16),
        "input_layout": "(B, 1, rows, cols, slices)",
        "output": "Tensor (B, 24): level logits in LEVEL_NAMES order (pipeline: softmax(x/10))",
        "state_dict_entries": 39,
    },
    "context": {
        "class": "ContextModel",
        "folder": "context",
        "state_dict_key": "net",
        "official_file": "ckpt16.pt",
        "input_shape": (1, 1, 512, 24),
        "input_layout": "(B, 1, rows (1 per mm, multiple of 16), 24 levels)",
        "output": "Tensor (B, 1, rows, 24): level scores (pipeline: softmax(x/10) then beam search)",
        "state_dict_entries": 58,
    },
    "grading": {
        "class": "GradingModel",
        "folder": "grading",
        "state_dict_key": "model_weights",
        "official_file": "ckpt1.pt",
        "input_shape": (1, 1, 9, 112, 224),
        "input_layout": "(B, 1, slices, rows, cols)",
        "output": "tuple of 11 Tensors (B, n) in GRADING_HEADS order; raw logits, argmax per head",
        "state_dict_entries": 239,
    },
}

_BN_EPS = 1e-5


def _mkldnn_fast_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a 3-D convolution may be sent straight to oneDNN (CPU float32 inference)."""
    return (
        FAST_CONV3D
        and _HAS_MKLDNN_CONV
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


_HAS_MKLDNN_CONV = hasattr(torch, "mkldnn_convolution") and torch.backends.mkldnn.is_available()
#: Set to False to fall back to PyTorch's own Conv3d dispatch (e.g. for timing comparisons).
FAST_CONV3D = True


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (same parameters and state dict) that, for CPU float32 inference, runs
    oneDNN directly on a channels-last-3d input.

    PyTorch 2.13's own dispatch sends some of these convolutions (e.g. 64 -> 64 channels, and
    contiguous inputs in general) to its slow reference kernel or to a slow oneDNN layout,
    up to ~8x (grading) and ~30x (appearance) slower. Same arithmetic (direct convolution in
    float32), so results only differ by summation-order rounding. Elsewhere (autograd, other
    dtypes or devices) it is a plain ``nn.Conv3d``.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        if self.padding_mode == "zeros" and _mkldnn_fast_path(input, weight):
            x = input.contiguous(memory_format=torch.channels_last_3d)
            return torch.mkldnn_convolution(
                x, weight, bias, self.padding, self.stride, self.dilation, self.groups
            )
        return super()._conv_forward(input, weight, bias)


# ---------------------------------------------------------------------------------------------
# detector: VFRResNetDetector
# ---------------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """ResNet-50 bottleneck, v1.5 (stride on the 3x3 conv), no conv biases."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, project: bool = False):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=_BN_EPS)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width, eps=_BN_EPS)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=_BN_EPS)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if project:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch, eps=_BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + shortcut)


def _resnet50_layer(in_ch: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [Bottleneck(in_ch, width, stride=stride, project=True)]
    layers += [Bottleneck(width * 4, width) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ConvBlock(nn.Module):
    """3x3 conv (padding 1, with bias) -> BatchNorm -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(out_ch, eps=_BN_EPS)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class Bridge(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.bridge = nn.Sequential(ConvBlock(ch, ch), ConvBlock(ch, ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bridge(x)


class Upsample2x(nn.Module):
    """Bilinear x2 upsampling, align_corners=False (half-pixel centres, edge clamp)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class UpBlock(nn.Module):
    """x2 bilinear upsample + 1x1 conv, concat [upsampled, skip], two ConvBlocks.

    The official block upsamples before its 1x1 conv. Both are linear and the bilinear weights
    sum to one, so the conv may be applied first at a quarter of the cost; ``conv_first`` (the
    default) does that. Set it to False to follow the official operation order literally.
    """

    def __init__(self, in_ch: int, out_ch: int, skip_ch: int, conv_first: bool = True):
        super().__init__()
        self.upsample = nn.Sequential(Upsample2x(), nn.Conv2d(in_ch, out_ch, 1, bias=True))
        self.conv_block_1 = ConvBlock(out_ch + skip_ch, out_ch)
        self.conv_block_2 = ConvBlock(out_ch, out_ch)
        self.conv_first = conv_first

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up, conv = self.upsample[0], self.upsample[1]
        x = up(conv(x)) if self.conv_first else conv(up(x))
        x = torch.cat([x, skip], dim=1)
        return self.conv_block_2(self.conv_block_1(x))


class VFRResNetDetector(nn.Module):
    """Vertebral-body detector: U-Net on a ResNet-50 encoder; (B,1,H,W) -> (B,13,H,W).

    H and W must be multiples of 32 (224 in the pipeline).
    """

    def __init__(self, conv_first: bool = True):
        super().__init__()
        self.input_block = nn.Sequential(
            nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64, eps=_BN_EPS),
            nn.ReLU(inplace=True),
        )
        self.input_pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                _resnet50_layer(64, 64, 3, 1),
                _resnet50_layer(256, 128, 4, 2),
                _resnet50_layer(512, 256, 6, 2),
                _resnet50_layer(1024, 512, 3, 2),
            ]
        )
        self.bridge = Bridge(2048)
        self.up_blocks = nn.ModuleList(
            [
                UpBlock(2048, 1024, 1024, conv_first),
                UpBlock(1024, 512, 512, conv_first),
                UpBlock(512, 256, 256, conv_first),
                UpBlock(256, 128, 64, conv_first),
                UpBlock(128, 64, 1, conv_first),
            ]
        )
        self.out = nn.Conv2d(64, 13, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [x]  # s0: raw input
        y = self.input_block(x)
        skips.append(y)  # s1: stem output before the max-pool
        y = self.input_pool(y)
        for i, layer in enumerate(self.down_blocks):
            y = layer(y)
            if i < 3:
                skips.append(y)  # s2, s3, s4
        y = self.bridge(y)
        for block, skip in zip(self.up_blocks, reversed(skips)):
            y = block(y, skip)
        return self.out(y)


# ---------------------------------------------------------------------------------------------
# appearance: AppearanceModel
# ---------------------------------------------------------------------------------------------
class AppearanceModel(nn.Module):
    """Level classifier on a (B,1,224,224,16) vertebra volume (rows, cols, slices) -> (B,24)."""

    def __init__(self):
        super().__init__()
        self.conv1 = Conv3d(1, 8, (3, 3, 1), stride=(2, 2, 1), padding=(3, 3, 0))
        self.bnrm1 = nn.BatchNorm3d(8, eps=_BN_EPS)
        self.conv2 = Conv3d(8, 16, (3, 3, 1), padding=(3, 3, 0))
        self.bnrm2 = nn.BatchNorm3d(16, eps=_BN_EPS)
        self.conv3 = Conv3d(16, 32, 3)
        self.bnrm3 = nn.BatchNorm3d(32, eps=_BN_EPS)
        self.conv4 = Conv3d(32, 64, 3)
        self.bnrm4 = nn.BatchNorm3d(64, eps=_BN_EPS)
        self.conv5 = Conv3d(64, 128, 3)
        self.bnrm5 = nn.BatchNorm3d(128, eps=_BN_EPS)
        self.fc1 = nn.Linear(6400, 256)
        self.fc2 = nn.Linear(256, 24)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bnrm1(F.relu(self.conv1(x)))
        x = self.bnrm2(F.relu(self.conv2(x)))
        x = F.max_pool3d(x, (2, 2, 1))
        x = self.bnrm3(F.relu(self.conv3(x)))
        x = F.max_pool3d(x, (2, 2, 1))
        x = self.bnrm4(F.relu(self.conv4(x)))
        x = F.max_pool3d(x, 2)
        x = self.bnrm5(F.relu(self.conv5(x)))
        x = F.max_pool3d(x, 2)
        x = x.reshape(x.shape[0], -1)  # channel-major (c, rows, cols, slices)
        x = F.relu(self.fc1(self.dropout(x)))
        return self.fc2(self.dropout(x))


# ---------------------------------------------------------------------------------------------
# context: ContextModel
# ---------------------------------------------------------------------------------------------
def _ctx_conv(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, (5, 3), padding=(4, 1), dilation=(2, 1), bias=True)


class ContextModel(nn.Module):
    """Level-sequence model on a (B,1,rows,24) image; rows a multiple of 16 -> (B,1,rows,24)."""

    def __init__(self):
        super().__init__()
        self.conv1 = _ctx_conv(1, 16)
        self.bnrm1 = nn.BatchNorm2d(16, eps=_BN_EPS)
        self.conv2 = _ctx_conv(16, 32)
        self.bnrm2 = nn.BatchNorm2d(32, eps=_BN_EPS)
        self.conv3 = _ctx_conv(32, 64)
        self.bnrm3 = nn.BatchNorm2d(64, eps=_BN_EPS)
        self.conv4 = _ctx_conv(64, 128)
        self.bnrm4 = nn.BatchNorm2d(128, eps=_BN_EPS)
        self.conv_mid = nn.Conv2d(128, 128, 3, padding=1, bias=True)
        self.bnrm_mid = nn.BatchNorm2d(128, eps=_BN_EPS)
        self.conv5 = _ctx_conv(128, 64)
        self.bnrm5 = nn.BatchNorm2d(64, eps=_BN_EPS)
        self.conv6 = _ctx_conv(128, 32)
        self.bnrm6 = nn.BatchNorm2d(32, eps=_BN_EPS)
        self.conv7 = _ctx_conv(64, 16)
        self.bnrm7 = nn.BatchNorm2d(16, eps=_BN_EPS)
        self.conv8 = _ctx_conv(16, 1)

    @staticmethod
    def _up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=(2.0, 1.0), mode="bilinear", align_corners=False)

    @staticmethod
    def _pool(x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, (2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % 16:
            raise ValueError(f"ContextModel needs a row count divisible by 16, got {x.shape[-2]}")
        x = self._pool(self.bnrm1(F.relu(self.conv1(x))))
        d2 = self._pool(self.bnrm2(F.relu(self.conv2(x))))
        d3 = self._pool(self.bnrm3(F.relu(self.conv3(d2))))
        x = self._pool(self.bnrm4(F.relu(self.conv4(d3))))
        x = self.bnrm_mid(F.relu(self.conv_mid(x)))
        x = self.bnrm5(F.relu(self.conv5(self._up(x))))
        x = torch.cat([x, d3], dim=1)
        x = self.bnrm6(F.relu(self.conv6(self._up(x))))
        x = torch.cat([x, d2], dim=1)
        x = self.bnrm7(F.relu(self.conv7(self._up(x))))
        return self.conv8(self._up(x))


# ---------------------------------------------------------------------------------------------
# grading: GradingModel
# ---------------------------------------------------------------------------------------------
class BasicBlock3d(nn.Module):
    """3-D ResNet basic block; stride (1, s, s) on the first conv and on the projection."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, project: bool = False):
        super().__init__()
        st = (1, stride, stride)
        self.conv1 = Conv3d(in_ch, out_ch, 3, stride=st, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(out_ch, eps=_BN_EPS)
        self.conv2 = Conv3d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(out_ch, eps=_BN_EPS)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if project:
            self.downsample = nn.Sequential(
                Conv3d(in_ch, out_ch, 1, stride=st, bias=False),
                nn.BatchNorm3d(out_ch, eps=_BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + shortcut)


def _resnet34_layer(in_ch: int, out_ch: int, blocks: int, stride: int, project: bool) -> nn.Sequential:
    layers = [BasicBlock3d(in_ch, out_ch, stride, project)]
    layers += [BasicBlock3d(out_ch, out_ch) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class GradingModel(nn.Module):
    """Disc grading: (B,1,9,112,224) (slices, rows, cols) -> 11 logit tensors (GRADING_HEADS)."""

    heads = GRADING_HEADS

    def __init__(self):
        super().__init__()
        self.conv1 = Conv3d(1, 64, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=True)
        self.bn1 = nn.BatchNorm3d(64, eps=_BN_EPS)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.layer1 = _resnet34_layer(64, 64, 3, 1, project=False)
        self.layer2 = _resnet34_layer(64, 128, 4, 1, project=True)  # stride 1 (not torchvision's 2)
        self.layer3 = _resnet34_layer(128, 256, 6, 2, project=True)
        self.layer4 = _resnet34_layer(256, 512, 3, 2, project=True)
        for head in GRADING_HEADS:
            self.add_module(f"fc_{head}", nn.Linear(512, GRADING_CLASSES[head]))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3, 4))  # global average pool -> (B, 512)

    def classify(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The eleven linear heads on (B, 512) features, in GRADING_HEADS order."""
        return tuple(getattr(self, f"fc_{head}")(features) for head in GRADING_HEADS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.classify(self.features(x))


# ---------------------------------------------------------------------------------------------
_CLASSES = {
    "detector": VFRResNetDetector,
    "appearance": AppearanceModel,
    "context": ContextModel,
    "grading": GradingModel,
}


def _deterministic_fill(model: nn.Module) -> None:
    """Cheap placeholder values: zero weights and biases, identity BatchNorm."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.reset_parameters()  # weight 1, bias 0, running mean 0 / var 1, counter 0
            else:
                for p in mod.parameters(recurse=False):
                    p.zero_()


def _fold_pair(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``conv`` with the eval-mode BatchNorm ``bn`` that follows it folded in."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    fused = copy.copy(conv)
    fused._parameters = dict(conv._parameters)
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    weight = (conv.weight * scale.reshape(shape)).contiguous(memory_format=_memory_format(conv.weight))
    bias = shift if conv.bias is None else conv.bias * scale + shift
    fused.weight = nn.Parameter(weight, requires_grad=False)
    fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous():
        return torch.channels_last_3d
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution into it (inference speed-up of
    a few per cent for the detector and grading nets); in place, returns ``model``.

    Only for eval-mode inference: afterwards the state dict is NOT the official layout any more
    (BatchNorms become ``nn.Identity``; bias-free convs get a bias). Appearance and context apply
    BatchNorm after the ReLU, so there is nothing to fold there. Results change by float32
    rounding only (checked against the reference fixtures in the tests).
    """
    pairs: list[tuple[nn.Module, str, str]] = []
    for mod in model.modules():
        if isinstance(mod, (Bottleneck, BasicBlock3d)):
            pairs += [(mod, f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(mod, f"bn{i}")]
        elif isinstance(mod, ConvBlock):
            pairs.append((mod, "conv", "bn"))
        elif isinstance(mod, GradingModel):
            pairs.append((mod, "conv1", "bn1"))
        elif isinstance(mod, nn.Sequential) and len(mod) >= 2:
            if isinstance(mod[0], (nn.Conv2d, nn.Conv3d)) and isinstance(mod[1], nn.modules.batchnorm._BatchNorm):
                pairs.append((mod, "0", "1"))  # stem 'input_block' and projection 'downsample'
    with torch.no_grad():
        for parent, conv_name, bn_name in pairs:
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            if isinstance(bn, nn.Identity):
                continue  # already folded
            setattr(parent, conv_name, _fold_pair(conv, bn))
            setattr(parent, bn_name, nn.Identity())
    return model


def official_template(name: str) -> nn.Module:
    """The network ``name`` on the ``meta`` device (shapes only, no memory): for inspecting the
    state-dict layout or for ``load_state_dict(..., assign=True)``."""
    try:
        cls = _CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown official network {name!r}; expected one of {OFFICIAL_NAMES}") from None
    with torch.device("meta"):
        return cls().eval()


def to_inference_layout(model: nn.Module) -> nn.Module:
    """Put the weights of the 3-D networks (appearance, grading) in channels-last-3d memory
    format, which oneDNN runs fastest on the CPU; in place, returns ``model``. Values, names
    and shapes (and thus ``state_dict()``) are unchanged; 2-D networks are left as they are."""
    if isinstance(model, (AppearanceModel, GradingModel)):
        model.to(memory_format=torch.channels_last_3d)
    return model


PRECISIONS = ("float32", "bfloat16")


def to_precision(model: nn.Module, precision: str = "float32") -> nn.Module:
    """Cast an official network for inference in ``precision``; in place, returns ``model``.

    ``float32`` leaves it unchanged (the numbers equal the reference). ``bfloat16`` folds the
    BatchNorms that follow convolutions in float32 first (so the statistics are not rounded
    twice), then stores every parameter in bfloat16 in the CPU's fastest layout: on CPUs with
    AMX / AVX512-BF16, oneDNN then runs the detector and grading ~3x faster than float32
    (``benchmarks/bench_official.py``), at bfloat16's ~3 significant digits (outputs differ from
    float32 by ~1-3 % of their range). Inputs are cast by the stage wrappers (:func:`param_dtype`).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if precision == "float32":
        return model
    fold_batchnorm(model)
    model.to(torch.bfloat16)
    is_3d = isinstance(model, (AppearanceModel, GradingModel))
    return model.to(memory_format=torch.channels_last_3d if is_3d else torch.channels_last)


def param_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of ``model``'s parameters (what its input must be cast to)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def official_from_state_dict(name: str, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Network ``name`` holding the given tensors (strict names and shapes), in eval mode, with
    frozen parameters (``requires_grad=False``) and in its CPU inference layout
    (:func:`to_inference_layout`)."""
    model = official_template(name)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return to_inference_layout(model.eval().requires_grad_(False))


def build_official(name: str, *, random_init: bool = False) -> nn.Module:
    """A fresh official network by key (``detector``, ``appearance``, ``context``, ``grading``).

    Returned in eval mode, float32, on the CPU, parameters frozen. The weights are meant to be replaced by
    ``load_state_dict`` (see :mod:`spinecohort.nets.checkpoints`), so by default they are only
    zero-filled (BatchNorm as identity), which is much faster than PyTorch's random
    initialisation (~140 M parameters for the detector); ``random_init=True`` applies the
    latter instead.
    """
    try:
        cls = _CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown official network {name!r}; expected one of {OFFICIAL_NAMES}") from None
    if random_init:
        return to_inference_layout(cls().eval().requires_grad_(False))
    model = official_template(name).to_empty(device="cpu")
    _deterministic_fill(model)
    return to_inference_layout(model.eval().requires_grad_(False))
