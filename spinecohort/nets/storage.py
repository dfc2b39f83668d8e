"""Weights as stored in the project's checkpoints."""
from __future__ import annotations

import torch
from torch import nn


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
