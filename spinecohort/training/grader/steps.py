"""The ``snakemake --cores N train_grader`` target (workflow/rules/train.smk), one function per
rule: the cohort's own stages up to disc extraction, then :func:`write_ivv_table`,
:func:`run_cv`, :func:`run_final` (and :func:`~spinecohort.training.grader.cards.write_cv_model_card`).
Outputs go to ``<outdir>/grader_cv/``."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from ...tasks import TASKS
from ..grader_rules import CV_DIR, IVV_STAGE, init_weights_path
from .cv import cross_validate, load_init
from .recipe import TrainConfig, fit, load_ivv_arrays, make_targets, read_frame

__all__ = [
    "CV_DIR",
    "IVV_STAGE",
    "IVV_TABLE_COLUMNS",
    "init_weights_path",
    "train_config",
    "labelled_discs",
    "build_ivv_table",
    "write_ivv_table",
    "run_cv",
    "run_final",
]

log_ = logging.getLogger("spinecohort.training.grader")

IVV_TABLE_COLUMNS = ["scan_id", "subject_id", "site", "level", "path", "upper_vertebra_id", "lower_vertebra_id",
                     "centre_slice", "centre_row", "centre_col"]


def train_config(config: Mapping[str, Any]) -> TrainConfig:
    """The recipe (:class:`TrainConfig`) with the pipeline config's ``grader_training`` settings;
    out-of-fold predictions use the pipeline's ``tta``, as the grade stage does."""
    settings = config["grader_training"]
    cfg = TrainConfig(seed=int(settings["seed"]), tta_eval=int(config["tta"]))
    for key in ("steps", "head_epochs", "batch_size"):
        if settings.get(key) is not None:
            setattr(cfg, key, int(settings[key]))
    return cfg


def labelled_discs(labels: pd.DataFrame | str | Path, readers: Sequence[str] | None = None) -> pd.DataFrame:
    """``scan_id, level`` of every disc with at least one valid grade (of ``readers``' reads)."""
    lab = read_frame(labels)
    missing = [c for c in ("scan_id", "level") if c not in lab]
    if missing:
        raise ValueError(f"labels: missing column(s) {', '.join(missing)}")
    keys = (lab.assign(scan_id=lab["scan_id"].astype(str), level=lab["level"].astype(str).str.strip())
            [["scan_id", "level"]].drop_duplicates().reset_index(drop=True))
    targets = make_targets(keys, lab, readers)
    graded = np.any(np.stack([t.sum(1) > 0 for t in targets], 1), axis=1) if len(keys) else np.zeros(0, bool)
    return keys[graded].reset_index(drop=True)


def build_ivv_table(outdir: str | Path, manifest_file: str | Path, n_shards: int,
                    labels: pd.DataFrame | str | Path,
                    readers: Sequence[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The labelled discs the pipeline extracted, from its own outputs: ``(table, missing)``.

    ``table``: one row per disc, :data:`IVV_TABLE_COLUMNS` (``path`` = the scan's IVV file written
    by the extract_discs stage; the other columns from the manifest and that stage's rows), in
    manifest order. ``missing``: ``scan_id, level, reason`` of labelled discs without an IVV (scan
    not in the manifest, scan failed, or the disc was not found or not labelled at that level)."""
    from ...manifest import read_manifest
    from ...pipeline import collect_rows
    from ...stages import ivv_path

    outdir = Path(outdir)
    manifest = read_manifest(manifest_file)
    rows = collect_rows(outdir, n_shards, IVV_STAGE)
    if not len(rows):
        rows = pd.DataFrame(columns=["scan_id", "level"])
    rows = rows.assign(scan_id=rows["scan_id"].astype(str), level=rows["level"].astype(str))
    wanted = labelled_discs(labels, readers)
    table = rows.merge(wanted, on=["scan_id", "level"], how="inner")
    info = manifest.set_index("scan_id")
    table["subject_id"] = table["scan_id"].map(info["subject_id"])
    table["site"] = table["scan_id"].map(info["site"])
    table["path"] = [str(ivv_path(outdir / "work", s).resolve()) for s in table["scan_id"]]
    for column in IVV_TABLE_COLUMNS:
        if column not in table:
            table[column] = pd.Series(dtype=object)
    table = table[IVV_TABLE_COLUMNS].reset_index(drop=True)

    found = set(zip(table["scan_id"], table["level"]))
    extracted_scans = set(rows["scan_id"])
    reasons = []
    for scan_id, level in zip(wanted["scan_id"], wanted["level"]):
        if (scan_id, level) in found:
            continue
        if scan_id not in info.index:
            reasons.append((scan_id, level, "scan not in the manifest"))
        elif scan_id not in extracted_scans:
            reasons.append((scan_id, level, "no disc extracted from this scan (failed or nothing found)"))
        else:
            reasons.append((scan_id, level, "disc not found at this level by the pipeline"))
    missing = pd.DataFrame(reasons, columns=["scan_id", "level", "reason"])
    return table, missing


def _training_provenance(config: Mapping[str, Any], models: Mapping[str, str] | None, created_by: str | None,
                         **extra: Any) -> dict[str, str]:
    from ...provenance import make_provenance

    prov = make_provenance(config, models, created_by)
    prov["grader_training"] = json.dumps(config["grader_training"], sort_keys=True)
    prov.update({k: json.dumps(v, sort_keys=True, default=str) for k, v in extra.items()})
    return prov


def _init_record(init: Path | None) -> dict[str, Any] | None:
    from ...provenance import sha256_file

    return None if init is None else {"id": init.stem, "path": str(init), "sha256": sha256_file(init)}


def write_ivv_table(outdir: str | Path, manifest_file: str | Path, n_shards: int, labels: str | Path,
                    out: str | Path, missing_out: str | Path | None = None, readers: Sequence[str] | None = None,
                    created_by: str | None = None, log: Callable[[str], None] = log_.info) -> Path:
    """Rule ``grader_ivv_table``: :func:`build_ivv_table` -> ``out`` (Parquet); the labelled discs
    without an IVV are logged and written to ``missing_out`` (CSV; default ``missing_discs.csv``
    beside ``out``)."""
    from ...provenance import atomic_write_bytes, make_provenance, write_table

    table, missing = build_ivv_table(outdir, manifest_file, n_shards, labels, readers)
    out = Path(out)
    if not len(table):
        raise ValueError(f"no labelled disc of {labels} was extracted by the pipeline ({len(missing)} labelled "
                         "discs; check that the labels' scan_id and level match the manifest and the disc names)")
    log(f"{len(table)} labelled discs with an IVV ({table['scan_id'].nunique()} scans, "
        f"{table['subject_id'].nunique()} subjects); {len(missing)} labelled discs without one")
    for reason, count in missing.groupby("reason").size().items():
        log(f"  without an IVV: {count} ({reason})")
    write_table(table, out, make_provenance(None, None, created_by))
    atomic_write_bytes(missing_out or out.with_name("missing_discs.csv"), missing.to_csv(index=False).encode())
    return out


def run_cv(config: Mapping[str, Any], ivv_table: str | Path, labels: str | Path, oof_out: str | Path,
           fold_dir: str | Path, created_by: str | None = None,
           log: Callable[[str], None] = log_.info, recipe: TrainConfig | None = None) -> Path:
    """Rule ``grader_cv``: :func:`cross_validate` with the config's ``grader_training`` settings
    (``recipe``: a :class:`TrainConfig` of the caller's instead of :func:`train_config`'s);
    writes the fold models (``fold_dir/grader-fold<i>.pt``) and the out-of-fold predictions in the
    discs-table layout
    (``tables/discs.parquet`` columns, ``model_id`` = the fold model, plus ``fold``), ready for
    the agreement stage. Disc columns the IVV table lacks (a table not written by
    :func:`write_ivv_table`) are left blank."""
    from ...grade import save_grader
    from ...pipeline import DISC_COLUMNS
    from ...provenance import sha256_file, write_table
    from ...stages import torch_device

    settings = config["grader_training"]
    device = torch_device(config)
    init = init_weights_path(settings["init_weights"])
    cfg = recipe or train_config(config)
    table = read_frame(ivv_table)
    k = int(settings["k"])
    log(f"{k}-fold patient-level CV on {len(table)} discs, init {init or 'scratch'}, device {device}, "
        f"{cfg.steps} steps, {cfg.head_epochs} head epochs")
    t0 = time.time()
    oof, models = cross_validate(table, labels, k=k, seed=int(settings["seed"]), init_weights=init, config=cfg,
                                 tta=int(config["tta"]), log=log, readers=settings.get("readers"), device=device)
    fold_paths = [Path(fold_dir) / f"grader-fold{f}.pt" for f in range(len(models))]
    shas = {}
    for f, (grader, path) in enumerate(zip(models, fold_paths)):
        meta = {"model": Path(path).stem, "fold": f, "k": k, "seed": int(settings["seed"]),
                "init_weights": _init_record(init), "config": asdict(cfg), "created_by": created_by}
        save_grader(path, grader.net, meta)
        shas[Path(path).stem] = sha256_file(path)
    # site, vertebra ids, centre: from the IVV table
    extra = [c for c in DISC_COLUMNS if c not in oof.columns and c in table.columns]
    oof = oof.merge(table[["scan_id", "level", *extra]].astype({"scan_id": str, "level": str}),
                    on=["scan_id", "level"], how="left")
    oof["model_id"] = [Path(fold_paths[f]).stem for f in oof["fold"]]
    tasks = [c for t in TASKS for c in (t.name, f"{t.name}_probs")]
    oof = oof.reindex(columns=DISC_COLUMNS + tasks + ["model_id", "fold"])
    write_table(oof, oof_out, _training_provenance(config, shas, created_by, init_weights=_init_record(init),
                                                   train_seconds=round(time.time() - t0, 1)))
    log(f"wrote {oof_out} ({len(oof)} out-of-fold predictions, {time.time() - t0:.0f} s)")
    return Path(oof_out)


def run_final(config: Mapping[str, Any], ivv_table: str | Path, labels: str | Path, out: str | Path,
              created_by: str | None = None, log: Callable[[str], None] = log_.info,
              recipe: TrainConfig | None = None) -> Path:
    """Rule ``grader_final``: one model trained on every labelled disc of ``ivv_table`` with the
    same recipe and starting point as the fold models; a ``torch.load(weights_only=True)``
    checkpoint for :meth:`spinecohort.grade.Grader.load`."""
    import torch

    from ... import __version__
    from ...grade import save_grader
    from ...stages import torch_device

    settings = config["grader_training"]
    device = torch_device(config)
    init = init_weights_path(settings["init_weights"])
    cfg = recipe or train_config(config)
    cfg.arch, init_state = load_init(init, cfg.arch)
    table = read_frame(ivv_table)
    X, keys = load_ivv_arrays(table)
    targets = make_targets(keys, labels, settings.get("readers"))
    keep = np.any(np.stack([t.sum(1) > 0 for t in targets], 1), axis=1)
    log(f"final model on {int(keep.sum())} labelled discs, init {init or 'scratch'}, device {device}")
    t0 = time.time()
    net = fit(X[keep], [t[keep] for t in targets], cfg, init_state=init_state, log=log, device=device)
    seconds = time.time() - t0
    kept = keys[keep]
    readers = settings.get("readers")
    meta = {
        "model": Path(out).stem, "pipeline_version": __version__,
        "trained_on": {"ivv_table": str(ivv_table), "labels": str(labels), "n_discs": int(keep.sum()),
                       "n_scans": int(kept["scan_id"].nunique()), "n_subjects": int(kept["subject_id"].nunique()),
                       "readers": list(readers) if readers else "all"},
        "init_weights": _init_record(init), "config": asdict(cfg), "grader_training": dict(settings),
        "train_seconds": round(seconds, 1), "device": device, "torch": str(torch.__version__),
        "threads": torch.get_num_threads(), "created_by": created_by,
    }
    save_grader(out, net, meta)
    log(f"wrote {out} ({seconds:.0f} s)")
    return Path(out)
