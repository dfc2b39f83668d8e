"""What the project's checkpoints hold (weights, the network's config) and the one way a
checkpoint file is written."""
from __future__ import annotations

import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Mapping

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


class StoredConfig:
    """``to_dict`` / ``from_dict`` for a dataclass config saved inside a checkpoint.

    ``to_dict`` gives plain types (tuples become lists, as JSON and ``weights_only`` loading
    want); ``from_dict`` ignores keys the class does not know (a file written by another
    version) and turns lists back into tuples where the default is a tuple."""

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        tuple_default = {f.name: isinstance(f.default, tuple) for f in fields(cls)}
        return cls(**{k: tuple(v) if tuple_default[k] and isinstance(v, list) else v
                      for k, v in d.items() if k in tuple_default})


def save_checkpoint_file(path: str | os.PathLike, payload: Any) -> Path:
    """``torch.save(payload)`` to ``path`` atomically (a killed job never leaves a partial
    checkpoint). Loaders read it with ``torch.load(weights_only=True)``, so ``payload`` holds
    tensors and plain Python types only."""
    with atomic_output(path) as handle:
        torch.save(payload, handle)
    return Path(path)
