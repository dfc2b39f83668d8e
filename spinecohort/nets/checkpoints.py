"""Loading an official SpineNetV2 checkpoint folder, and writing recipe-weight folders.

Folder layout (that of the ``spinenet`` package's ``weights`` directory)::

    <dir>/detect-vfr/ckpt435.pt   {'net': state_dict, 'loss': ..., 'epoch': ...}
    <dir>/appearance/ckpt187.pt   {'net': state_dict, 'loss': ..., 'epoch': ...}
    <dir>/context/ckpt16.pt       {'net': state_dict, 'loss': ..., 'epoch': ...}
    <dir>/grading/ckpt1.pt        {'model_weights': state_dict, 'epoch_no': ...}

File selection. The official package globs ``<sub>/*.pt`` (detector and appearance skip names
containing ``encrypted``) and takes the newest file by ``os.path.getctime``. A ctime is not
reproducible (copying a folder changes it), so by default this module is deterministic instead:
among the ``*.pt`` files of a sub-folder whose name does not contain ``encrypted`` it takes the one
with the HIGHEST checkpoint number (the trailing integer of the stem, ``ckpt435.pt`` -> 435; files
without a number rank below all numbered ones; ties are broken by file name). With the official
download there is exactly one file per sub-folder, so both rules agree. ``select="ctime"``
reproduces the official rule (newest ctime, ties by name). The chosen path and its sha256 are
returned, so the choice is always recorded.

Loading uses ``torch.load(path, map_location='cpu', weights_only=True)`` and a strict check of
names and shapes before ``load_state_dict(strict=True, assign=True)``; any problem raises
:class:`CheckpointError` naming the file and the first offending tensor.

The weight recipe (``recipe_state_dict``, ``recipe_input``, ``write_recipe_folder``) is that of
section 2-3 of the shared ``spinenet-equivalence.md``: deterministic random weights whose forward
outputs are stored in the reference fixtures.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from ..provenance import sha256_file
from .official import NETWORK_FACTS, OFFICIAL_NAMES, official_from_state_dict, official_template
from .storage import save_checkpoint_file

__all__ = [
    "CheckpointError",
    "OfficialModels",
    "SubfolderSpec",
    "SUBFOLDERS",
    "select_checkpoint",
    "check_state_dict",
    "load_official_checkpoint",
    "load_official_folder",
    "sha256_file",
    "recipe_state_dict",
    "recipe_input",
    "write_recipe_folder",
    "RECIPE_WEIGHT_SEED",
    "RECIPE_INPUT_SEED",
]


class CheckpointError(RuntimeError):
    """An official checkpoint folder or file is missing, unreadable or does not match."""


@dataclass(frozen=True)
class SubfolderSpec:
    name: str  # network key
    folder: str  # sub-folder of the checkpoint dir
    state_dict_key: str  # key of the state dict in the saved dict
    official_file: str  # file name of the official download
    exclude_substring: str | None  # glob matches containing this are ignored
    extra: dict  # other keys saved beside the state dict (by write_recipe_folder)


SUBFOLDERS: dict[str, SubfolderSpec] = {
    "detector": SubfolderSpec("detector", "detect-vfr", "net", "ckpt435.pt", "encrypted",
                              {"loss": 0.0, "epoch": 434}),
    "appearance": SubfolderSpec("appearance", "appearance", "net", "ckpt187.pt", "encrypted",
                                {"loss": 0.0, "epoch": 186}),
    "context": SubfolderSpec("context", "context", "net", "ckpt16.pt", None,
                             {"loss": 0.0, "epoch": 15}),
    "grading": SubfolderSpec("grading", "grading", "model_weights", "ckpt1.pt", None,
                             {"epoch_no": 0}),
}
for _k, _spec in SUBFOLDERS.items():  # keep the two fact tables in step
    assert NETWORK_FACTS[_k]["folder"] == _spec.folder
    assert NETWORK_FACTS[_k]["state_dict_key"] == _spec.state_dict_key


class OfficialModels(dict):
    """``{model_id: nn.Module}`` (eval mode) plus where each came from.

    Attributes: ``networks`` (the same mapping as a plain dict), ``files`` (model_id -> Path of
    the file loaded) and ``models_sha256`` (model_id -> hex sha256 of that file), for provenance.
    """

    FAMILY = "spinenet-official"

    def __init__(self, models: dict[str, nn.Module], files: dict[str, Path], sha: dict[str, str]):
        super().__init__(models)
        self.files = dict(files)
        self.models_sha256 = dict(sha)

    @property
    def networks(self) -> dict[str, nn.Module]:
        """``{model_id: nn.Module}`` as a plain dict (the object itself is that mapping too)."""
        return dict(self)

    @property
    def model_ids(self) -> dict[str, str]:
        """``{name: "spinenet-official/<sub-folder>/<file>"}``, e.g. ``spinenet-official/detect-vfr/
        ckpt435.pt``: the family and the file the selection rule chose, without the user's path."""
        return {name: f"{self.FAMILY}/{path.parent.name}/{path.name}" for name, path in self.files.items()}

    def provenance(self) -> dict[str, str]:
        """``{model id: sha256}`` of the loaded files (the pipeline's ``models`` provenance)."""
        ids = self.model_ids
        return {ids[name]: self.models_sha256[name] for name in self.files}


_NUM_RE = re.compile(r"(\d+)$")


def select_checkpoint(folder: str | os.PathLike, name: str, select: str = "highest") -> Path:
    """The checkpoint file of network ``name`` in its sub-folder ``folder`` (see module doc)."""
    spec = SUBFOLDERS[name]
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{name}: checkpoint sub-folder {folder} does not exist")
    cands = sorted(
        p for p in folder.glob("*.pt")
        if p.is_file() and not (spec.exclude_substring and spec.exclude_substring in p.name)
    )
    if not cands:
        raise CheckpointError(f"{name}: no *.pt checkpoint in {folder}")
    if select == "highest":
        def key(p: Path):
            m = _NUM_RE.search(p.stem)
            return (m is not None, int(m.group(1)) if m else -1, p.name)
    elif select == "ctime":
        def key(p: Path):
            return (os.path.getctime(p), p.name)
    else:
        raise ValueError(f"select must be 'highest' or 'ctime', got {select!r}")
    return max(cands, key=key)


def _shape(t) -> tuple[int, ...]:
    return tuple(getattr(t, "shape", ()))


def check_state_dict(model: nn.Module, state: dict, source: str) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly the model's tensors and shapes.

    The message names ``source`` and the first problem in the model's state-dict order
    (missing tensor, then wrong shape), or the first unexpected tensor, with both shapes.
    """
    expected = model.state_dict()
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: state dict is a {type(state).__name__}, not a dict")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    for k in expected:
        if k in missing:
            more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
            hint = f"; unexpected tensor {unexpected[0]!r} shape {_shape(state[unexpected[0]])}" if unexpected else ""
            raise CheckpointError(
                f"{source}: missing tensor {k!r} (expected shape {tuple(expected[k].shape)}){more}{hint}"
            )
        v = state[k]
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{source}: entry {k!r} is a {type(v).__name__}, not a tensor")
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"{source}: tensor {k!r} has shape {tuple(v.shape)} in the file, "
                f"expected {tuple(expected[k].shape)}"
            )
        if expected[k].is_floating_point() and not v.is_floating_point():
            raise CheckpointError(f"{source}: tensor {k!r} has dtype {v.dtype}, expected floating point")
    if unexpected:
        k = unexpected[0]
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{source}: unexpected tensor {k!r} shape {_shape(state[k])}{more}")


def load_official_checkpoint(path: str | os.PathLike, name: str) -> nn.Module:
    """Load one official checkpoint file of network ``name`` into a fresh model (eval mode)."""
    spec = SUBFOLDERS[name]
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable, truncated, or not weights-only loadable
        raise CheckpointError(f"{path}: cannot be loaded as a {name} checkpoint: {exc}") from exc
    if not isinstance(blob, dict) or spec.state_dict_key not in blob:
        keys = sorted(map(str, blob)) if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(
            f"{path}: expected a dict with the state dict under {spec.state_dict_key!r}, found {keys}"
        )
    state = blob[spec.state_dict_key]
    check_state_dict(official_template(name), state, f"{path} [{name}]")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        return official_from_state_dict(name, state)
    except Exception as exc:  # pragma: no cover - check_state_dict catches the known cases
        raise CheckpointError(f"{path} [{name}]: {exc}") from exc


def load_official_folder(
    directory: str | os.PathLike,
    names: Iterable[str] = OFFICIAL_NAMES,
    select: str = "highest",
    precision: str = "float32",
) -> OfficialModels:
    """Load the official networks from a checkpoint folder laid out like spinenet's ``weights``.

    Returns an :class:`OfficialModels` dict ``{name: model}`` (eval mode, CPU, float32 or, with
    ``precision="bfloat16"``, cast by :func:`spinecohort.nets.official.to_precision`) with
    ``.files`` and ``.models_sha256``. Fails fast with :class:`CheckpointError`.
    """
    from .official import PRECISIONS, to_precision

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"official checkpoint folder {directory} does not exist")
    files: dict[str, Path] = {}
    for name in names:  # select every file first, so a missing one fails before any loading
        if name not in SUBFOLDERS:
            raise ValueError(f"unknown official network {name!r}; expected one of {OFFICIAL_NAMES}")
        files[name] = select_checkpoint(directory / SUBFOLDERS[name].folder, name, select)
    models = {name: to_precision(load_official_checkpoint(path, name), precision) for name, path in files.items()}
    sha = {name: sha256_file(path) for name, path in files.items()}
    return OfficialModels(models, files, sha)


# ---------------------------------------------------------------------------------------------
# weight / input recipe (spinenet-equivalence.md sections 2 and 3)
# ---------------------------------------------------------------------------------------------
RECIPE_WEIGHT_SEED = 20261121  # + network index k
RECIPE_INPUT_SEED = 7  # + k
RECIPE_INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "detector": (1, 1, 224, 224),
    "appearance": (1, 1, 224, 224, 16),
    "context": (1, 1, 512, 24),
    "grading": (1, 1, 9, 112, 224),
}


_CHUNK = 1 << 22  # elements per draw for large entries (same stream as one draw, less memory)


def _recipe_entry(rng: np.random.Generator, key: str, ref: torch.Tensor) -> torch.Tensor:
    shape = tuple(ref.shape)
    if not ref.is_floating_point():
        return torch.zeros(shape, dtype=ref.dtype)
    if key.endswith("running_var"):
        arr = rng.uniform(0.5, 1.5, shape)
    elif key.endswith("running_mean"):
        arr = rng.normal(0.0, 0.1, shape)
    elif len(shape) >= 2:
        # standard_normal(S) * sqrt(2 / fan_in) in float64, rounded to float32. Drawn in chunks
        # into a reused buffer: numpy's Generator gives the same C-order stream either way.
        scale = math.sqrt(2.0 / math.prod(shape[1:]))
        out = np.empty(math.prod(shape), dtype=np.float32)
        buf = np.empty(min(out.size, _CHUNK), dtype=np.float64)
        for start in range(0, out.size, _CHUNK):
            part = buf[: min(_CHUNK, out.size - start)]
            rng.standard_normal(out=part)
            part *= scale
            out[start : start + part.size] = part
        return torch.from_numpy(out.reshape(shape))
    elif len(shape) == 1:
        arr = rng.uniform(0.8, 1.2, shape) if key.endswith(".weight") else rng.normal(0.0, 0.05, shape)
    else:
        arr = np.zeros(shape)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def recipe_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Deterministic random weights for network ``name`` (equivalence recipe, section 2).

    Entries are generated in the model's state-dict order, which equals the official order.
    """
    k = OFFICIAL_NAMES.index(name)
    rng = np.random.default_rng(RECIPE_WEIGHT_SEED + k)
    template = official_template(name).state_dict()
    return {key: _recipe_entry(rng, key, ref) for key, ref in template.items()}


def recipe_input(name: str) -> torch.Tensor:
    """The deterministic reference input of network ``name`` (equivalence recipe, section 3)."""
    k = OFFICIAL_NAMES.index(name)
    arr = np.random.default_rng(RECIPE_INPUT_SEED + k).uniform(0.0, 1.0, RECIPE_INPUT_SHAPES[name])
    return torch.from_numpy(arr.astype(np.float32))


def write_recipe_folder(directory: str | os.PathLike, names: Iterable[str] = OFFICIAL_NAMES) -> dict[str, Path]:
    """Write an official-layout checkpoint folder holding recipe weights; returns the files.

    Each file is saved like the official one: a dict with the state dict under ``net`` (or
    ``model_weights`` for grading) beside the other keys the package reads. About 820 MB for
    all four networks (the detector alone is 558 MB).
    """
    directory = Path(directory)
    out: dict[str, Path] = {}
    for name in names:
        spec = SUBFOLDERS[name]
        sub = directory / spec.folder
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / spec.official_file
        blob = {spec.state_dict_key: recipe_state_dict(name), **spec.extra}
        save_checkpoint_file(path, blob)
        out[name] = path
    return out
