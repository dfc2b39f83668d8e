"""The model stages' models, loaded in this one place for every model family (config
``models.family``): the official SpineNet folder (``spinenet-official``, ``models.dir``) or the
CPU models shipped in ``models/`` (``cpu-default``), with a team's own grader (``models.grader``)
in place of the shipped one. A new family is a new branch of :func:`load_models`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from .provenance import sha256_file
from .shipped import default_model

#: Stage role -> the official networks it is built from (``nets.checkpoints.SUBFOLDERS`` names).
OFFICIAL_NETWORKS = {"detector": ("detector",), "labeller": ("appearance", "context"), "grader": ("grading",)}


class LoadedModels(dict):
    """``{role: Detector | Labeller | Grader}`` on the device, plus where their weights came from.

    ``model_ids``: role -> the model id of each weight file it was built from; ``provenance``:
    model id -> sha256 of that file, every file loaded (what the stages report from ``models()``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.model_ids: dict[str, tuple[str, ...]] = {}
        self.provenance: dict[str, str] = {}

    def add(self, role: str, model: Any, files: Mapping[str, str]) -> None:
        """Record ``model`` as ``role``'s, built from ``files`` (model id -> sha256)."""
        self[role] = model
        self.model_ids[role] = tuple(files)
        self.provenance.update(files)


def load_models(config: Mapping[str, Any], roles: Iterable[str], device: str) -> LoadedModels:
    """The models of ``roles`` (``detector``, ``labeller``, ``grader``) of config
    ``models.family``, each on ``device``."""
    roles = list(roles)
    unknown = [role for role in roles if role not in OFFICIAL_NETWORKS]
    if unknown:
        raise ValueError(f"unknown model roles {unknown}: expected some of {sorted(OFFICIAL_NETWORKS)}")
    if config["models"]["family"] == "spinenet-official":
        return _official(config, roles, device)
    return _cpu_default(config, roles, device)


def _official(config: Mapping[str, Any], roles: list[str], device: str) -> LoadedModels:
    from .detect import Detector
    from .grade import Grader
    from .label import Labeller
    from .nets.checkpoints import load_official_folder

    names = [name for role in roles for name in OFFICIAL_NETWORKS[role]]
    # one folder read for every network asked for: its errors name the sub-folder and file
    loaded = load_official_folder(config["models"]["dir"], names=names, precision=config["models"]["precision"])
    networks, ids, sha = loaded.networks, loaded.model_ids, loaded.provenance()
    wrap = {"detector": lambda: Detector.official(networks["detector"], device=device),
            "labeller": lambda: Labeller.official(networks["appearance"], networks["context"], device=device),
            "grader": lambda: Grader.official(networks["grading"], device=device)}
    out = LoadedModels()
    for role in roles:
        out.add(role, wrap[role](), {ids[name]: sha[ids[name]] for name in OFFICIAL_NETWORKS[role]})
    return out


def _cpu_default(config: Mapping[str, Any], roles: list[str], device: str) -> LoadedModels:
    out = LoadedModels()
    for role in roles:
        if role == "detector":
            from .detect import Detector

            path = default_model("detector")
            out.add(role, Detector.load(path, device=device), {path.stem: sha256_file(path)})
        elif role == "labeller":
            from .label import Labeller

            paths = [default_model("appearance"), default_model("context")]
            out.add(role, Labeller.load(*paths, device=device), {p.stem: sha256_file(p) for p in paths})
        else:
            from .grade import Grader

            custom = config["models"].get("grader")
            path = Path(custom) if custom else default_model("grader")
            if not path.is_file():
                raise FileNotFoundError(f"models.grader: grader checkpoint not found: {path}")
            model = Grader.load(path, device=device)
            # a team's own grader (e.g. `snakemake train_grader`'s grader.pt) is named apart
            # from the shipped default; its sha256 pins the exact file
            out.add(role, model, {f"custom/{path.name}" if custom else path.stem: sha256_file(path)})
    return out
