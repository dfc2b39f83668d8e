"""Weights as stored in the project's checkpoints, and the one way a checkpoint file is written."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..provenance import atomic_output


def storable_state_dict(net: nn.Module, half: bool = True) -> dict[str, torch.Tensor]:
    """The network's state dict on the CPU, contiguous, floating tensors in fp16 when ``half``
    (halves the file; the loaders cast back to the network's dtype)."""
    state = {}
    for key, value in net.state_dict().items():
        value = value.detach().cpu()
        if half and value.is_floating_point():
            value = value.half()
        state[key] = value.contiguous()
    return state


def save_checkpoint_file(path: str | os.PathLike, payload: Any) -> Path:
    """``torch.save(payload)`` to ``path`` atomically (a killed job never leaves a partial
    checkpoint). Loaders read it with ``torch.load(weights_only=True)``, so ``payload`` holds
    tensors and plain Python types only."""
    with atomic_output(path) as handle:
        torch.save(payload, handle)
    return Path(path)
