"""Training and cross-validating the slice-pooled grader on real graded discs (SPIDER) together
with synthetic phantoms: ``python -m spinecohort.training.grader_real --spider DIR --out OUT``.

Data
----
* **SPIDER** (van der Graaf et al., Scientific Data 11, 264, 2024), the mid-sagittal export in
  ``../shared/data/spider-midsagittal``: one 8-bit PNG slice per series (head up, anterior left:
  rows head -> feet, cols anterior -> posterior, i.e. already the pipeline's canonical in-plane
  view), per-disc grades of one expert per patient. Each PNG is run through the pipeline's own
  library stages as a 1-slice volume (:class:`spinecohort.detect.Detector`,
  :class:`spinecohort.label.Labeller`, :func:`spinecohort.discs.extract_ivvs`, the shipped
  models), so detection and labelling errors are part of the figures: an IVV then holds only its
  centre slice (index 4), the other eight are zero. Grades are matched to IVVs by the pipeline's
  level name (``grades.csv`` ``level``); a graded disc without an IVV at its level counts as not
  graded by the model.

  (The detector keeps a body seen on one slice when the series has one slice:
  ``DetectorConfig.min_slices`` is capped by the slice count, as for any single-slice series.)

* **Phantoms** (:mod:`spinecohort.synthetic`, IVVs from the truth polygons with simulated reads,
  :func:`spinecohort.training.grader.build_synthetic_cohort`) supervise the tasks SPIDER does not
  grade (central canal and foraminal stenosis, the 4-class narrowing scale, marrow); in training
  a share ``single_slice_p`` of them is reduced to its centre slice, so the network sees 1- and
  9-slice inputs of the same discs.

Targets: SPIDER discs supervise Pfirrmann, Spondylolisthesis, Herniation and the two endplate
tasks directly (all other tasks masked). Two SPIDER grades are on other scales than the tasks
and enter as auxiliary binary losses on the task heads' probabilities: SPIDER ``Narrowing`` (any
narrowing, 0/1) against P(Narrowing > 1), and ``Modic > 0`` against the noisy-or of the two
marrow heads, 1 - (1 - P(UpperMarrow = 1)) (1 - P(LowerMarrow = 1)) (Modic changes lie on
either side of the disc; the grade does not say which).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..tasks import DEFAULT_GRADED_DISCS, LUMBAR_DISCS, TASKS

__all__ = [
    "SPIDER_TASKS",
    "AUX_COLUMNS",
    "spider_labels",
    "match_grades",
    "build_spider_ivvs",
]

TASK_NAMES = tuple(t.name for t in TASKS)
#: SPIDER grade column -> pipeline task on the same scale.
SPIDER_TASKS = {"Pfirrmann": "Pfirrmann", "Spondylolisthesis": "Spondylolisthesis", "Herniation": "Herniation",
                "UpperEndplate": "UpperEndplateDefect", "LowerEndplate": "LowerEndplateDefect"}
#: auxiliary binary targets (labels columns), from SPIDER grades on other scales
AUX_COLUMNS = ("SPIDER_Narrowing", "SPIDER_Modic")
#: the disc levels whose IVVs are extracted: every level SPIDER grades (T9-T10 ... L5-S1, the
#: pipeline's default ``graded_discs``; figures are given for them and for the lumbar six)
SPIDER_LEVELS = tuple(DEFAULT_GRADED_DISCS)


def spider_labels(grades: pd.DataFrame | str | Path, series: pd.DataFrame | str | Path) -> pd.DataFrame:
    """One row per (series, graded disc): ``scan_id`` (the series), ``subject_id`` (the patient),
    ``level``, the five SPIDER grades under the tasks' names, ``SPIDER_Narrowing`` (0/1) and
    ``SPIDER_Modic`` (0/1 = Modic type > 0). The same grades hold for every series of a patient."""
    g = pd.read_csv(grades) if not isinstance(grades, pd.DataFrame) else grades.copy()
    s = pd.read_csv(series) if not isinstance(series, pd.DataFrame) else series.copy()
    for name, frame, cols in (("grades", g, ("patient", "level")), ("series", s, ("series", "patient"))):
        missing = [c for c in cols if c not in frame]
        if missing:
            raise ValueError(f"SPIDER {name} table: missing column(s) {', '.join(missing)}")
    g = g.assign(patient=g["patient"].astype(str), level=g["level"].astype(str).str.strip())
    s = s.assign(patient=s["patient"].astype(str), series=s["series"].astype(str))
    m = s[["series", "patient"]].merge(g, on="patient", how="inner")
    out = pd.DataFrame({"scan_id": m["series"], "subject_id": m["patient"], "level": m["level"]})
    for src, task in SPIDER_TASKS.items():
        out[task] = pd.to_numeric(m[src], errors="coerce") if src in m else np.nan
    out["SPIDER_Narrowing"] = pd.to_numeric(m["Narrowing"], errors="coerce") if "Narrowing" in m else np.nan
    modic = pd.to_numeric(m["Modic"], errors="coerce") if "Modic" in m else pd.Series(np.nan, index=m.index)
    out["SPIDER_Modic"] = np.where(modic.notna(), (modic > 0).astype(float), np.nan)
    return out.reset_index(drop=True)


def match_grades(ivv_table: pd.DataFrame, labels: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Graded discs -> IVVs by ``(scan_id, level)`` (the pipeline's level name).

    Returns ``(matched, missing)``: ``matched`` = the ``ivv_table`` rows of graded discs (in
    ``labels`` order, with ``subject_id`` from the labels), ``missing`` = ``scan_id, subject_id,
    level, reason`` of graded discs without an IVV (the scan gave none at all, or none at that
    level). An IVV the labels do not grade is not in either (it has nothing to learn from)."""
    tab = ivv_table.assign(scan_id=ivv_table["scan_id"].astype(str), level=ivv_table["level"].astype(str))
    dup = tab.duplicated(["scan_id", "level"])
    if dup.any():
        first = tab[dup].iloc[0]
        raise ValueError(f"IVV table: scan {first['scan_id']} has level {first['level']} twice")
    lab = labels.assign(scan_id=labels["scan_id"].astype(str), level=labels["level"].astype(str))
    keys = lab[["scan_id", "subject_id", "level"]].drop_duplicates(["scan_id", "level"])
    merged = keys.merge(tab.drop(columns=["subject_id"], errors="ignore"), on=["scan_id", "level"], how="left",
                        indicator=True)
    hit = merged["_merge"] == "both"
    matched = merged[hit].drop(columns="_merge").reset_index(drop=True)
    scans_with_ivv = set(tab["scan_id"])
    miss = merged.loc[~hit, ["scan_id", "subject_id", "level"]].copy()
    miss["reason"] = ["no IVV at this level (level not found)" if s in scans_with_ivv
                      else "no IVV in this scan (nothing detected or labelled)" for s in miss["scan_id"]]
    return matched, miss.reset_index(drop=True)


def spider_volume(data_dir: str | Path, series: Any) -> tuple[np.ndarray, tuple[float, float]]:
    """A SPIDER series (a ``series.csv`` row) as the pipeline reads it: its mid-sagittal PNG as a
    float32 1-slice volume (1, rows, cols), already the canonical in-plane view (README: head up,
    anterior left), and its (row, col) pixel spacing in mm (square pixels)."""
    from PIL import Image

    path = Path(data_dir) / "images" / f"{series.series}.png"
    if not path.exists():
        raise FileNotFoundError(f"SPIDER image {path} is missing")
    with Image.open(path) as im:
        img = np.asarray(im.convert("L"), np.float32)
    if img.ndim != 2 or min(img.shape) < 32:
        raise ValueError(f"{path}: expected a 2-D grey image, got shape {img.shape}")
    return img[None], (float(series.pixel_spacing_mm), float(series.pixel_spacing_mm))


def build_spider_ivvs(data_dir: str | Path, cache_dir: str | Path, levels: Sequence[str] = SPIDER_LEVELS,
                      log: Callable[[str], None] = print) -> pd.DataFrame:
    """Every SPIDER series through detection, labelling and IVV extraction as a 1-slice volume;
    per series ``cache_dir/ivv/<series>.npz`` (:func:`spinecohort.discs.save_ivvs`) and a row per
    IVV in ``cache_dir/ivv_table.csv`` (``scan_id, subject_id, level, path, sequence, site``,
    ``site`` = maker and field strength), plus ``cache_dir/series_log.csv`` (per series: vertebrae
    detected, levels labelled, IVVs, seconds, error). Cached: reused when ``cache_dir/cohort.json``
    matches. Never writes into the repository."""
    import torch

    from ..detect import Detector
    from ..discs import extract_ivvs, save_ivvs
    from ..label import Labeller
    from ..provenance import sha256_file
    from ..shipped import default_model

    data_dir, cache_dir = Path(data_dir), Path(cache_dir)
    series = pd.read_csv(data_dir / "series.csv")
    models = [default_model(r) for r in ("detector", "appearance", "context")]
    detector = Detector.load(models[0])
    key = {"series_sha": sha256_file(data_dir / "series.csv"), "levels": list(levels),
           "models": {p.name: sha256_file(p) for p in models}, "min_slices": 1, "estimated_s1": True,
           "search_below_threshold": detector.config.search_below_threshold}
    done, key_file = cache_dir / "ivv_table.csv", cache_dir / "cohort.json"
    if done.exists() and key_file.exists() and json.loads(key_file.read_text()) == key:
        return pd.read_csv(done, dtype={"scan_id": str, "subject_id": str, "level": str})
    (cache_dir / "ivv").mkdir(parents=True, exist_ok=True)
    labeller = Labeller.load(models[1], models[2])
    rows, logs = [], []
    t0 = time.time()
    for i, r in enumerate(series.itertuples(index=False)):
        sid, started = str(r.series), time.time()
        entry = {"scan_id": sid, "subject_id": str(r.patient), "n_vertebrae": 0, "levels": "", "n_ivvs": 0, "error": ""}
        try:
            vol, spacing = spider_volume(data_dir, r)
            with torch.inference_mode():
                dets = detector.detect(vol, spacing)
            verts = [{"vertebra_id": k, "polygons": d.polygons, "centroid": d.centroid,
                      "found_at_low_threshold": d.found_at_low_threshold} for k, d in enumerate(dets)]
            entry["n_vertebrae"] = len(verts)
            if verts:
                labels = labeller.label(vol, spacing, float(r.slice_thickness_mm), verts)
                for v, (lvl, _) in zip(verts, labels):
                    v["level"] = lvl
                entry["levels"] = " ".join(str(v["level"]) for v in verts)
            ivvs = extract_ivvs(vol, spacing, [v for v in verts if isinstance(v.get("level"), str)], levels=levels)
            path = cache_dir / "ivv" / f"{sid}.npz"
            save_ivvs(path, ivvs)
            entry["n_ivvs"] = len(ivvs)
            site = f"{r.manufacturer} {r.field_strength_t:g}T"
            rows += [{"scan_id": sid, "subject_id": str(r.patient), "level": v.level, "path": str(path),
                      "sequence": r.sequence, "site": site} for v in ivvs]
        except Exception as exc:  # one bad series must not stop the cohort; it is logged and counted
            entry["error"] = f"{type(exc).__name__}: {exc}"
            log(f"{sid}: {entry['error']}")
        entry["seconds"] = round(time.time() - started, 2)
        logs.append(entry)
        if (i + 1) % 40 == 0:
            log(f"SPIDER {i + 1}/{len(series)} series, {len(rows)} IVVs, {time.time() - t0:.0f} s")
    table = pd.DataFrame(rows, columns=["scan_id", "subject_id", "level", "path", "sequence", "site"])
    pd.DataFrame(logs).to_csv(cache_dir / "series_log.csv", index=False)
    table.to_csv(done, index=False)
    key_file.write_text(json.dumps(key))
    return table


# ----------------------------------------------------------------------------- training data
def spider_training_set(data_dir: str | Path, cache_dir: str | Path, log: Callable[[str], None] = print):
    """SPIDER IVVs with their targets: ``(X, keys, targets, aux, labels, missing)``; ``X`` uint8
    (N, 9, 112, 224), ``keys`` ``scan_id, subject_id, level, sequence, site``, ``targets`` per task
    (:func:`spinecohort.training.grader.make_targets`: SPIDER's five tasks, the others all-zero =
    masked), ``aux`` (N, 2) = (SPIDER_Narrowing, SPIDER_Modic > 0), ``labels`` every graded disc
    (:func:`spider_labels`), ``missing`` the graded discs without an IVV (:func:`match_grades`)."""
    from .grader import load_ivv_arrays, make_targets

    data_dir = Path(data_dir)
    table = build_spider_ivvs(data_dir, cache_dir, log=log)
    labels = spider_labels(data_dir / "grades.csv", data_dir / "series.csv")
    matched, missing = match_grades(table, labels)
    X, keys = load_ivv_arrays(matched[["scan_id", "subject_id", "level", "path"]])
    info = matched.set_index(["scan_id", "level"])
    idx = list(zip(keys["scan_id"], keys["level"]))
    keys["sequence"] = [info.loc[k, "sequence"] for k in idx]
    keys["site"] = [info.loc[k, "site"] for k in idx]
    targets = make_targets(keys, labels[["scan_id", "level", *SPIDER_TASKS.values()]])
    lab = labels.set_index(["scan_id", "level"])
    aux = np.stack([lab.loc[idx, c].to_numpy(np.float32) for c in AUX_COLUMNS], 1)
    return X, keys, targets, aux, labels, missing


def phantom_training_set(cache_dir: str | Path, seeds: Sequence[int], reads_seed: int, log: Callable[[str], None] = print):
    """Synthetic phantom IVVs (9 slices, truth polygons) with the two simulated reads (R1,
    R1-repeat) as soft targets for every task: ``(X, keys, targets, table, truth, labels)``."""
    from .grader import build_synthetic_cohort, load_ivv_arrays, make_targets

    table, truth, labels = build_synthetic_cohort(cache_dir, seeds, reads_seed, log=log)
    X, keys = load_ivv_arrays(table)
    targets = make_targets(keys, labels, ("R1", "R1-repeat"))
    return X, keys, targets, table, truth, labels


# ----------------------------------------------------------------------------- recipe
#: the grader this module builds, and the earlier one it is compared with: the earlier recipe's own
#: cross-validation fold models re-scored on today's IVVs (:func:`stage_rescore`), never its final
#: model, which saw every SPIDER patient
NEW, BASELINE = "v5", "v4"
PHANTOM_TRAIN_SEEDS = (100_000, 100_240)  # a subset of grader-cpu-v3's own training phantoms
# held out from every model: all of grader-cpu-v3's held-out seeds (until 2026-12-01 the first 80,
# whose intervals were too wide to decide on, e.g. central canal stenosis 0.48-0.83)
PHANTOM_TEST_SEEDS = (900_000, 900_250)
DEFAULT_K = 5
DEFAULT_STEPS = 1000


#: Per-slice residual stages ((channels, stride) per block) of the recipe's encoder ("v4") and of a
#: tried alternative ("deep": a stride-1 block after each of v4's, twice the CPU per slice, from
#: scratch as v3's 3-D kernels map onto v4's plan only). "deep" led on the inner split (Pfirrmann
#: 0.481 / kappa 0.543 vs 0.452 / 0.527 for v4's plan from scratch) but not in the 5-fold CV
#: (models/grader-cpu-v4.md, Round 2), so it is not the default.
ENCODER_PLANS = {"v4": [[32, 2], [64, 2], [128, 2]],
                 "deep": [[32, 2], [32, 1], [64, 2], [64, 1], [128, 2], [128, 1]]}


def slices_config(seed: int = 0, steps: int = DEFAULT_STEPS, ordinal_weight: float = 0.0, spider_share: float = 0.0,
                  encoder: str = "v4"):
    """The recipe (:class:`spinecohort.training.grader.TrainConfig` defaults, chosen a priori and
    not tuned on any fold) for :class:`spinecohort.nets.grader_slices.GraderSlices` with the
    ``encoder`` version's plan (:data:`ENCODER_PLANS`): half of the 9-slice IVVs reduced to their
    centre slice, padding slices kept empty under augmentation."""
    from ..nets.grader_slices import DEFAULT_SLICES_ARCH
    from .grader import TrainConfig

    arch = {**json.loads(json.dumps(DEFAULT_SLICES_ARCH)), "plan": [list(b) for b in ENCODER_PLANS[encoder]]}
    return TrainConfig(steps=int(steps), seed=int(seed), arch=arch,
                       single_slice_p=0.5, keep_empty_slices=True, aux_weight=1.0,
                       ordinal_weight=float(ordinal_weight), group_share=float(spider_share))


def initial_state(init_3d: str | Path | None):
    """Starting weights: a 3-D grader checkpoint (default: grader-cpu-v3, synthetic-trained)
    mapped onto the slice-pooled network with :func:`~spinecohort.nets.grader_slices.init_from_3d`;
    ``None`` when ``init_3d`` is ``"scratch"``."""
    import torch

    from ..nets.grader_slices import GraderSlices, init_from_3d

    if init_3d in (None, "scratch"):
        return None
    payload = torch.load(init_3d, map_location="cpu", weights_only=True)
    torch.manual_seed(0)  # the few keys not copied keep a seeded initialisation
    net = GraderSlices()
    copied = init_from_3d(net, payload["state_dict"])
    if len(copied) < len(net.state_dict()) // 2:
        raise ValueError(f"{init_3d}: only {len(copied)} of {len(net.state_dict())} tensors map onto GraderSlices")
    return {k: v.clone() for k, v in net.state_dict().items()}


def _combine(parts):
    """Concatenate (X, targets, aux) triples (aux None -> NaN)."""
    X = np.concatenate([p[0] for p in parts])
    targets = [np.concatenate([p[1][k] for p in parts]) for k in range(len(TASKS))]
    aux = np.concatenate([p[2] if p[2] is not None else np.full((len(p[0]), len(AUX_COLUMNS)), np.nan, np.float32)
                          for p in parts])
    return X, targets, aux


def predictions_frame(keys: pd.DataFrame, probs: Sequence[np.ndarray], extra: Mapping[str, object] | None = None):
    """Discs-table rows (:func:`spinecohort.grade.grades_frame`) for ``keys`` plus the auxiliary
    probabilities ``P_Narrowing_gt1`` and ``P_Marrow_any``."""
    from ..grade import grades_frame

    rows = keys.to_dict("records")
    for r in rows:
        r.update(extra or {})
    df = grades_frame(rows, [{t.name: probs[j][i] for j, t in enumerate(TASKS)} for i in range(len(keys))])
    narrow = probs[TASK_NAMES.index("Narrowing")][:, 1:].sum(1)
    up, low = probs[TASK_NAMES.index("UpperMarrow")][:, 1], probs[TASK_NAMES.index("LowerMarrow")][:, 1]
    df["P_Narrowing_gt1"] = narrow
    df["P_Marrow_any"] = 1.0 - (1.0 - up) * (1.0 - low)
    return df


class _Run:
    """Data and settings shared by the stages of one run (loaded lazily, cached under ``work``)."""

    def __init__(self, spider_dir, work, k=DEFAULT_K, seed=0, steps=DEFAULT_STEPS, init_3d=None, log=print,
                 ordinal_weight=0.0, spider_share=0.0, train_seed=None, lr_factor=1.0, encoder="v4"):
        from ..shipped import MODELS_DIR

        self.spider_dir, self.work = Path(spider_dir), Path(work)
        self.k, self.seed, self.steps, self.log = int(k), int(seed), int(steps), log
        self.init_3d = init_3d if init_3d is not None else str(MODELS_DIR / "grader-cpu-v3.pt")
        self.encoder = encoder
        self.ordinal_weight, self.spider_share = float(ordinal_weight), float(spider_share)
        # the training seed alone (batches, augmentation, init noise) may differ from the split seed:
        # a second training seed on the same inner split measures how much a variant's gain is noise
        self.train_seed = self.seed if train_seed is None else int(train_seed)
        self.lr_factor = float(lr_factor)  # phase-A learning rate x this (1 = the recipe's 0.002)
        self.work.mkdir(parents=True, exist_ok=True)
        self._spider = self._phantoms = None

    @property
    def spider(self):
        if self._spider is None:
            self._spider = spider_training_set(self.spider_dir, self.work / "spider", self.log)
        return self._spider

    @property
    def phantoms(self):
        if self._phantoms is None:
            X, keys, targets, *_ = phantom_training_set(self.work / "phantoms" / "train", range(*PHANTOM_TRAIN_SEEDS),
                                                        11, self.log)
            self._phantoms = (X, keys, targets)
        return self._phantoms

    def folds(self) -> np.ndarray:
        from .grader import patient_folds

        return patient_folds(self.spider[1]["subject_id"], self.k, self.seed)

    def fit(self, spider_rows: np.ndarray, tag: str):
        import torch

        from .grader import fit

        X, keys, targets, aux, *_ = self.spider
        Xp, _, tp = self.phantoms
        Xa, ta, aa = _combine([(X[spider_rows], [t[spider_rows] for t in targets], aux[spider_rows]), (Xp, tp, None)])
        cfg = slices_config(self.train_seed, self.steps, self.ordinal_weight, self.spider_share, self.encoder)
        cfg.lr *= self.lr_factor
        group = np.r_[np.ones(len(spider_rows), bool), np.zeros(len(Xp), bool)]  # SPIDER rows first
        self.log(f"{tag}: {len(spider_rows)} SPIDER IVVs ({keys.iloc[spider_rows]['subject_id'].nunique()} patients)"
                 f" + {len(Xp)} phantom IVVs, {cfg.steps} steps, ordinal weight {cfg.ordinal_weight},"
                 f" SPIDER batch share {cfg.group_share or 'uniform'}, init {self.init_3d}")
        torch.manual_seed(self.train_seed)
        t0 = time.time()
        net = fit(Xa, ta, cfg, init_state=initial_state(self.init_3d), finetune=False, log=self.log, aux=aa, group=group)
        return net, cfg, time.time() - t0


def stage_cv_fold(run: _Run, fold: int, tta: int = 4) -> Path:
    """Train fold ``fold``'s model on the other folds' SPIDER patients + phantoms, predict its
    held-out patients' IVVs -> ``work/oof_fold<f>.parquet`` (and the fold model, in ``work``)."""
    from ..grade import save_grader
    from .grader import predict_probs

    X, keys, *_ = run.spider
    folds = run.folds()
    tr, te = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
    held = set(keys.iloc[te]["subject_id"])
    if held & set(keys.iloc[tr]["subject_id"]):
        raise AssertionError(f"fold {fold}: a held-out patient is in the training set")
    net, cfg, seconds = run.fit(tr, f"fold {fold + 1}/{run.k}")
    probs = predict_probs(net, X[te], tta=tta)
    df = predictions_frame(keys.iloc[te].reset_index(drop=True), probs, {"fold": fold, "model_id": f"{NEW}-fold{fold}"})
    out = run.work / f"oof_fold{fold}.parquet"
    df.to_parquet(out, index=False)
    save_grader(run.work / f"grader-{NEW}-fold{fold}.pt", net, {"fold": fold, "k": run.k, "seed": run.seed,
                                                             "config": dataclasses.asdict(cfg), "train_seconds": round(seconds, 1)})
    (run.work / f"fold{fold}.json").write_text(json.dumps({"train_seconds": seconds, "n_train": int(len(tr)),
                                                          "n_test": int(len(te))}))
    run.log(f"fold {fold}: wrote {out} ({seconds:.0f} s training)")
    return out


def stage_final(run: _Run, out: str | Path, tta: int = 4, command: str = "") -> Path:
    """Train on every SPIDER patient + phantoms -> ``out`` (fp16, ``Grader.load``-able)."""
    import torch

    from .. import __version__
    from ..grade import save_grader

    X, keys, *_ = run.spider
    net, cfg, seconds = run.fit(np.arange(len(X)), "final")
    meta = {"model": Path(out).stem, "pipeline_version": __version__,
            "trained_on": {"spider": str(run.spider_dir), "n_spider_ivvs": int(len(X)),
                           # the detector and labeller that placed SPIDER's IVVs (the cache's key)
                           "pipeline_models": sorted(json.loads((run.work / "spider" / "cohort.json").read_text())["models"]),
                           "n_spider_patients": int(keys["subject_id"].nunique()),
                           "phantom_seeds": list(PHANTOM_TRAIN_SEEDS), "n_phantom_ivvs": int(len(run.phantoms[0]))},
            "init_from_3d": Path(run.init_3d).name if run.init_3d not in (None, "scratch") else None,
            "config": dataclasses.asdict(cfg), "train_seconds": round(seconds, 1), "torch": str(torch.__version__),
            "threads": torch.get_num_threads(), "command": command}
    save_grader(out, net, meta)
    run.log(f"final: wrote {out} ({seconds:.0f} s training)")
    return Path(out)


def combine_graders(member_paths: Sequence[str | Path], out: str | Path, meta: Mapping[str, Any] | None = None):
    """Save the graders at ``member_paths`` as one :class:`~spinecohort.nets.grader_slices.GraderEnsemble`
    checkpoint at ``out`` and return that network; the checkpoint's meta lists each member (file,
    sha256, meta) and keeps the first member's ``trained_on`` (what the report's first screen shows)."""
    from ..grade import Grader, save_grader
    from ..nets.grader_slices import GraderEnsemble
    from ..provenance import sha256_file

    if len(member_paths) < 2:
        raise ValueError(f"an ensemble needs at least two members, got {len(member_paths)}")
    graders = [Grader.load(p) for p in member_paths]
    ens = GraderEnsemble([g.net.arch for g in graders])
    for member, g in zip(ens.members, graders):
        member.load_state_dict(g.net.state_dict())
    info = [{"file": Path(p).name, "sha256": sha256_file(p), "meta": g.meta} for p, g in zip(member_paths, graders)]
    full = {"model": Path(out).stem, "members": info, **({"trained_on": graders[0].meta["trained_on"]}
                                                          if "trained_on" in graders[0].meta else {}),
            **dict(meta or {})}
    save_grader(out, ens, full)
    return ens.eval()


def stage_ensemble(run: _Run, member_works: Sequence[str | Path], tta: int = 4) -> None:
    """Cross-validate an ensemble of runs trained on the same patient folds: per fold, the members'
    fold models (``W/grader-*-fold<f>.pt``) combined (:func:`combine_graders`) predict that fold's
    held-out patients -> ``work/oof_fold<f>.parquet`` and ``work/grader-ens-fold<f>.pt``, so
    ``--stage report`` scores the ensemble as it would run. Each member must have held out exactly
    this fold's patients (``W/oof_fold<f>.parquet``): no member saw a patient it predicts."""
    from .grader import predict_probs

    X, keys, *_ = run.spider
    folds = run.folds()
    for f in range(run.k):
        te = np.flatnonzero(folds == f)
        held = set(keys.iloc[te]["subject_id"].astype(str))
        paths = []
        for w in map(Path, member_works):
            member_held = set(pd.read_parquet(w / f"oof_fold{f}.parquet")["subject_id"].astype(str))
            if member_held != held:
                raise ValueError(f"{w}: fold {f} held out other patients than this run's fold {f}")
            found = sorted(w.glob(f"grader-*-fold{f}.pt"))
            if len(found) != 1:
                raise FileNotFoundError(f"{w}: expected one grader-*-fold{f}.pt, found {len(found)}")
            paths.append(found[0])
        net = combine_graders(paths, run.work / f"grader-ens-fold{f}.pt", {"fold": f, "k": run.k, "seed": run.seed})
        probs = predict_probs(net, X[te], tta=tta)
        df = predictions_frame(keys.iloc[te].reset_index(drop=True), probs, {"fold": f, "model_id": f"ens-fold{f}"})
        df.to_parquet(run.work / f"oof_fold{f}.parquet", index=False)
        (run.work / f"fold{f}.json").write_text(json.dumps({"members": [str(p) for p in paths], "n_test": int(len(te))}))
        run.log(f"fold {f}: ensemble of {len(paths)} fold models -> {run.work / f'oof_fold{f}.parquet'}")


def stage_rescore(run: _Run, earlier_work: str | Path, name: str = BASELINE, tta: int = 4) -> Path:
    """An earlier run's cross-validation fold models on today's IVVs -> ``work/oof_<name>.parquet``:
    each patient predicted by the fold model that did not train on it, by the fold that run
    recorded for the patient (``earlier_work/oof_fold<f>.parquet``), not by today's fold split
    (patients enter or leave the IVV set when detection or labelling change, which reshuffles the
    folds). Patients the earlier run never held out are left out (counted as without a grade)."""
    from ..grade import Grader
    from .grader import predict_probs

    earlier_work = Path(earlier_work)
    X, keys, *_ = run.spider
    earlier = pd.concat([pd.read_parquet(earlier_work / f"oof_fold{f}.parquet") for f in range(run.k)])
    fold_of = dict(zip(earlier["subject_id"].astype(str), earlier["fold"].astype(int)))
    folds = keys["subject_id"].astype(str).map(fold_of)
    parts = []
    for f in range(run.k):
        rows = np.flatnonzero(folds.to_numpy() == f)
        model = sorted(earlier_work.glob(f"grader-*-fold{f}.pt"))
        if len(model) != 1:
            raise FileNotFoundError(f"{earlier_work}: expected one grader-*-fold{f}.pt, found {len(model)}")
        net = Grader.load(model[0]).net
        parts.append(predictions_frame(keys.iloc[rows].reset_index(drop=True), predict_probs(net, X[rows], tta=tta),
                                       {"fold": f, "model_id": f"{name}-fold{f}"}))
    out = run.work / f"oof_{name}.parquet"
    pd.concat(parts, ignore_index=True).to_parquet(out, index=False)
    run.log(f"re-scored {earlier_work}'s fold models -> {out} ({int(folds.isna().sum())} IVVs of patients it never held out)")
    return out


def stage_predict(run: _Run, weights: str | Path, name: str, tta: int = 4) -> None:
    """A saved grader on the held-out phantoms, 9-slice -> ``work/phantom_<name>.parquet`` (on SPIDER a
    final model is in sample: its SPIDER figures are the cross-validated ones)."""
    from ..grade import Grader
    from .grader import predict_probs

    g = Grader.load(weights)
    Xt, kt, *_ = phantom_training_set(run.work / "phantoms" / "test", range(*PHANTOM_TEST_SEEDS), 12, run.log)
    predictions_frame(kt, predict_probs(g.net, Xt, tta=tta), {"model_id": Path(weights).stem}).to_parquet(
        run.work / f"phantom_{name}.parquet", index=False)
    run.log(f"predicted {weights} -> {run.work}/phantom_{name}.parquet")


def stage_inner(run: _Run, outer_fold: int = 0, tta: int = 4) -> Path:
    """Hyper-parameter check without the held-out patients: the training patients of outer fold
    ``outer_fold`` split again by patient (5 inner folds, seed + 1); train with ``run.steps`` on
    four inner folds, score the fifth -> ``work/inner_f<outer>_steps<steps>.json`` (balanced
    accuracy and kappa per SPIDER task, no bootstrap). Only such inner figures choose settings."""
    from .grader import patient_folds, predict_probs

    X, keys, *_ = run.spider
    outer = run.folds()
    pool = np.flatnonzero(outer != outer_fold)
    inner = patient_folds(keys.iloc[pool]["subject_id"], run.k, run.seed + 1)
    tr, va = pool[inner != 0], pool[inner == 0]
    net, cfg, seconds = run.fit(tr, f"inner (outer fold {outer_fold}), {run.steps} steps")
    preds = predictions_frame(keys.iloc[va].reset_index(drop=True), predict_probs(net, X[va], tta=tta))
    labels = run.spider[4]
    summary = agreement_summary(preds, labels[labels["subject_id"].isin(set(keys.iloc[va]["subject_id"]))], 0, run.seed)
    res = {"steps": run.steps, "train_seed": run.train_seed, "lr_factor": run.lr_factor, "ordinal_weight": run.ordinal_weight, "spider_share": run.spider_share, "outer_fold": outer_fold, "n_train": int(len(tr)), "n_val": int(len(va)),
           "train_seconds": round(seconds, 1),
           "tasks": {t: {"balanced_accuracy": r["balanced_accuracy"]["estimate"], "kappa": r["kappa"]["estimate"]}
                     for t, r in summary.items()}}
    res["mean_balanced_accuracy"] = float(np.mean([v["balanced_accuracy"] for v in res["tasks"].values()]))
    variant = (f"_lr{run.lr_factor:g}" if run.lr_factor != 1 else "") + (f"_ord{run.ordinal_weight:g}" if run.ordinal_weight else "") + (f"_tseed{run.train_seed}" if run.train_seed != run.seed else "") + (f"_share{run.spider_share:g}" if run.spider_share else "")
    out = run.work / f"inner_f{outer_fold}_steps{run.steps}{variant}.json"
    out.write_text(json.dumps(res, indent=1))
    run.log(f"inner: {json.dumps(res)}")
    return out


# ----------------------------------------------------------------------------- figures
#: the tasks SPIDER grades and the kappa reported for each (linear for the ordinal Pfirrmann)
REPORT_TASKS = {"Pfirrmann": "kappa_linear", "Herniation": "cohen_kappa", "Spondylolisthesis": "cohen_kappa",
                "UpperEndplateDefect": "cohen_kappa", "LowerEndplateDefect": "cohen_kappa"}
PHANTOM_ONLY_TASKS = ("Narrowing", "CentralCanalStenosis", "UpperMarrow", "LowerMarrow",
                      "ForaminalStenosisLeft", "ForaminalStenosisRight")


def _pick(agr: pd.DataFrame, task: str, metric: str) -> dict:
    hit = agr[(agr["task"] == task) & (agr["metric"] == metric) & (agr["level"] == "all") & (agr["site"] == "all")
              & agr["comparison"].str.startswith("model_vs_")]
    if metric != "n_missing_model":
        hit = hit[hit["ci_method"].isin(["bootstrap_percentile", "none"])]
    if hit.empty:
        return {"estimate": None, "ci_low": None, "ci_high": None, "n_discs": 0}
    r = hit.iloc[0]
    f = (lambda v: None if pd.isna(v) else float(v))
    return {"estimate": f(r["estimate"]), "ci_low": f(r["ci_low"]), "ci_high": f(r["ci_high"]), "n_discs": int(r["n_discs"])}


def agreement_summary(preds: pd.DataFrame, labels: pd.DataFrame, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Per SPIDER task: balanced accuracy and kappa with subject-clustered bootstrap CIs
    (:func:`spinecohort.stats.compute_agreement`, pooled over levels), the number of graded discs
    with a model grade and without one (counted, never guessed)."""
    from ..stats import compute_agreement

    agr, _ = compute_agreement(preds, labels, n_bootstrap=n_bootstrap, seed=seed, tasks=list(REPORT_TASKS),
                               by_level=False, by_site=False)
    out = {}
    for task, kappa in REPORT_TASKS.items():
        missing = _pick(agr, task, "n_missing_model")
        out[task] = {"balanced_accuracy": _pick(agr, task, "balanced_accuracy"), "kappa": _pick(agr, task, kappa),
                     "kappa_kind": kappa, "n_graded": missing["n_discs"],
                     "n_missing": int(missing["estimate"] or 0)}
    return out


def _binary_bootstrap(y: np.ndarray, yhat: np.ndarray, subjects: np.ndarray, n_bootstrap: int, seed: int) -> dict:
    """Balanced accuracy and Cohen's kappa of 0/1 arrays with subject-clustered percentile CIs
    (:func:`spinecohort.stats.confusion_metrics` on resampled confusion matrices)."""
    from ..stats import confusion_metrics

    def metrics(w):
        conf = np.zeros((2, 2))
        np.add.at(conf, (y, yhat), w)
        m = confusion_metrics(conf, [0, 1], binary=True)
        return m["balanced_accuracy"], m["cohen_kappa"]

    uniq, inv = np.unique(subjects, return_inverse=True)
    est = metrics(np.ones(len(y)))
    rng = np.random.default_rng(seed)
    boots = np.array([metrics(np.bincount(rng.integers(0, len(uniq), len(uniq)), minlength=len(uniq))[inv].astype(float))
                      for _ in range(n_bootstrap)])
    res = {}
    for j, name in enumerate(("balanced_accuracy", "kappa")):
        b = boots[:, j][np.isfinite(boots[:, j])]
        res[name] = {"estimate": float(est[j]), "ci_low": float(np.percentile(b, 2.5)) if len(b) else None,
                     "ci_high": float(np.percentile(b, 97.5)) if len(b) else None, "n_discs": int(len(y))}
    return res


def auxiliary_summary(preds: pd.DataFrame, labels: pd.DataFrame, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """SPIDER's binary narrowing vs P(Narrowing > 1) > 0.5, and Modic > 0 vs the marrow noisy-or > 0.5."""
    m = labels.merge(preds[["scan_id", "level", "P_Narrowing_gt1", "P_Marrow_any"]], on=["scan_id", "level"])
    out = {}
    for col, pcol in (("SPIDER_Narrowing", "P_Narrowing_gt1"), ("SPIDER_Modic", "P_Marrow_any")):
        d = m[m[col].notna()]
        out[col] = _binary_bootstrap(d[col].to_numpy(int), (d[pcol] > 0.5).to_numpy(int),
                                     d["subject_id"].astype(str).to_numpy(), n_bootstrap, seed)
    return out


def synthetic_summary(preds: pd.DataFrame, labels: pd.DataFrame, n_bootstrap: int = 200, seed: int = 0) -> dict:
    """Held-out phantoms (9 slices): balanced accuracy vs the simulated reader R1 per task
    (:func:`spinecohort.training.grader.evaluate_against_readers`)."""
    from .grader import evaluate_against_readers

    tab = evaluate_against_readers(preds, labels, n_bootstrap=n_bootstrap, seed=seed)
    return {r["task"]: {"estimate": r["model_vs_R1"], "ci_low": r["model_ci_low"], "ci_high": r["model_ci_high"],
                        "n_discs": int(r["n_discs"])} for r in tab.to_dict("records")}


def stage_report(run: _Run, n_bootstrap: int = 1000) -> dict:
    """Every figure of the model card -> ``work/report.json``: this run's CV (out-of-fold) and the
    baseline's fold models re-scored on the same SPIDER discs (:func:`stage_rescore`), pooled, per sequence, per site, on the pipeline's default levels, the
    auxiliary targets, the IVV coverage, and the held-out phantom check."""
    _, keys, _, _, labels, missing = run.spider
    site_of = keys.drop_duplicates("scan_id").set_index("scan_id")["site"]
    seq_of = keys.drop_duplicates("scan_id").set_index("scan_id")["sequence"]
    series = pd.read_csv(run.spider_dir / "series.csv", dtype={"series": str})
    seq_all = dict(zip(series["series"], series["sequence"]))
    site_all = {s: f"{m} {f:g}T" for s, m, f in zip(series["series"], series["manufacturer"], series["field_strength_t"])}
    labels = labels.assign(sequence=labels["scan_id"].map(seq_all), site=labels["scan_id"].map(site_all))
    oof = pd.concat([pd.read_parquet(run.work / f"oof_fold{f}.parquet") for f in range(run.k)], ignore_index=True)
    models = {"cv": oof, "baseline": pd.read_parquet(run.work / f"oof_{BASELINE}.parquet")}
    default_levels = set(LUMBAR_DISCS)
    rep: dict = {"coverage": {}, "models": {}}
    for scope, lab in (("all_graded_levels", labels), ("default_levels", labels[labels["level"].isin(default_levels)])):
        miss = missing[missing["level"].isin(set(lab["level"]))]
        rep["coverage"][scope] = {"n_graded_discs": int(len(lab)), "n_without_ivv": int(len(miss)),
                                  "fraction_without_ivv": float(len(miss) / max(len(lab), 1)),
                                  "by_sequence": {s: {"n": int((lab["sequence"] == s).sum()),
                                                      "without_ivv": int(miss["scan_id"].map(seq_all).eq(s).sum())}
                                                  for s in sorted(lab["sequence"].unique())},
                                  "by_reason": {str(k): int(v) for k, v in miss.groupby("reason").size().items()}}
    for name, preds in models.items():
        res: dict = {}
        for scope, lab in (("all_graded_levels", labels), ("default_levels", labels[labels["level"].isin(default_levels)])):
            res[scope] = agreement_summary(preds, lab, n_bootstrap, run.seed)
        res["aux"] = auxiliary_summary(preds, labels, n_bootstrap, run.seed)
        res["by_sequence"] = {s: agreement_summary(preds, labels[labels["sequence"] == s], n_bootstrap, run.seed)
                              for s in sorted(labels["sequence"].unique())}
        res["by_site"] = {s: agreement_summary(preds, labels[labels["site"] == s], n_bootstrap, run.seed)
                          for s in sorted(labels["site"].dropna().unique())}
        rep["models"][name] = res
    _, _, _, _, _, ph_labels = phantom_training_set(run.work / "phantoms" / "test", range(*PHANTOM_TEST_SEEDS), 12, run.log)
    rep["synthetic"] = {}
    for key, name in (("new", NEW), ("baseline", BASELINE)):
        p = run.work / f"phantom_{name}.parquet"
        if p.exists():
            rep["synthetic"][key] = synthetic_summary(pd.read_parquet(p), ph_labels, 200, run.seed)
    rep["folds"] = {f: json.loads((run.work / f"fold{f}.json").read_text()) for f in range(run.k)
                    if (run.work / f"fold{f}.json").exists()}
    (run.work / "report.json").write_text(json.dumps(rep, indent=1))
    run.log(f"wrote {run.work / 'report.json'}")
    return rep


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spinecohort.training.grader_real", description=__doc__.split("\n\n")[0])
    p.add_argument("--spider", required=True, help="SPIDER mid-sagittal folder (series.csv, grades.csv, images/)")
    p.add_argument("--work", default="/tmp/i14b", help="cache and outputs outside the repository")
    p.add_argument("--stage", choices=["cv", "ensemble", "rescore", "final", "predict", "report", "card", "inner", "all"],
                   default="all",
                   help="inner: settings check on an inner patient split of outer fold 0's training patients")
    p.add_argument("--folds", type=int, nargs="*", default=None, help="with --stage cv: which folds (default all)")
    p.add_argument("--out", default=None, help=f"final model path (default models/grader-cpu-{NEW}.pt)")
    p.add_argument("--baseline-work", default=None,
                   help=f"the {BASELINE} run's --work (its oof_fold*.parquet and grader-*-fold*.pt), re-scored on these IVVs")
    p.add_argument("--members", nargs="*", default=None,
                   help="with --stage ensemble: member runs' --work folders (same folds), cross-validated together")
    p.add_argument("--member-weights", nargs="*", default=None,
                   help="with --stage ensemble: the members' final models, combined into --out")
    p.add_argument("--k", type=int, default=DEFAULT_K)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--init-3d", default=None, help="3-D grader to start from (default models/grader-cpu-v3.pt; 'scratch')")
    p.add_argument("--encoder", choices=sorted(ENCODER_PLANS), default="v4", help="per-slice encoder plan (ENCODER_PLANS)")
    p.add_argument("--ordinal-weight", type=float, default=0.0, help="expected-grade L1 term on Pfirrmann (0 = off)")
    p.add_argument("--spider-share", type=float, default=0.0, help="SPIDER share of each phase-A batch (0 = uniform)")
    p.add_argument("--train-seed", type=int, default=None, help="training seed (default --seed; splits keep --seed)")
    p.add_argument("--lr-factor", type=float, default=1.0, help="phase-A learning rate x this")
    p.add_argument("--tta", type=int, default=4)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log", default="/tmp/i14b_grader_real.log")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from ..shipped import MODELS_DIR
    from . import ProgressLog

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    log = ProgressLog(args.log)
    run = _Run(args.spider, args.work, args.k, args.seed, args.steps, args.init_3d, log,
               args.ordinal_weight, args.spider_share, args.train_seed, args.lr_factor, args.encoder)
    out = Path(args.out) if args.out else MODELS_DIR / f"grader-cpu-{NEW}.pt"
    if args.stage == "inner":
        stage_inner(run, 0, args.tta)
        return 0
    if args.stage in ("cv", "all"):
        for f in (args.folds if args.folds else range(run.k)):
            stage_cv_fold(run, f, args.tta)
    if args.stage == "ensemble":
        if not args.members or len(args.members) < 2:
            raise SystemExit("--stage ensemble needs --members W1 W2 ... (two or more runs' work folders)")
        stage_ensemble(run, args.members, args.tta)
        if args.member_weights:
            combine_graders(args.member_weights, out, {"command": "python -m spinecohort.training.grader_real " + " ".join(argv)})
            log(f"final: wrote {out} (ensemble of {len(args.member_weights)})")
    if args.stage in ("rescore", "all"):
        if not args.baseline_work:
            raise SystemExit(f"--stage {args.stage} needs --baseline-work (the {BASELINE} run's work folder)")
        stage_rescore(run, args.baseline_work, BASELINE, args.tta)
    if args.stage in ("final", "all"):
        stage_final(run, out, args.tta, "python -m spinecohort.training.grader_real " + " ".join(argv))
    if args.stage in ("predict", "all"):
        stage_predict(run, MODELS_DIR / f"grader-cpu-{BASELINE}.pt", BASELINE, args.tta)
        stage_predict(run, out, NEW, args.tta)
    if args.stage in ("report", "all"):
        stage_report(run, args.bootstrap)
    if args.stage in ("card", "all"):
        rep = json.loads((run.work / "report.json").read_text())
        command = ("PYTHONPATH=. python -m spinecohort.training.grader_real --spider ../shared/data/spider-midsagittal"
                   f" --work {args.work} --baseline-work {args.baseline_work} --steps {args.steps} --seed {args.seed}"
                   " --stage all")
        write_model_card(rep, out, out.with_suffix(".md"), command)
        log(f"wrote {out.with_suffix('.md')}; default rule: {json.dumps(default_decision(rep))}")
    return 0



# ----------------------------------------------------------------------------- model card
def default_decision(rep: dict) -> dict:
    """The rule for making the new grader the default, fixed before its figures were seen: on the
    same SPIDER discs its cross-validated Pfirrmann balanced accuracy and linear kappa beat the
    baseline's re-scored CV, no SPIDER task's balanced accuracy drops by more than 0.02, and on
    held-out 9-slice phantoms every phantom-only task stays within 0.03 of the baseline."""
    new, old = rep["models"]["cv"]["all_graded_levels"], rep["models"]["baseline"]["all_graded_levels"]

    def est(r, metric):
        return r[metric]["estimate"] or 0.0

    real = {t: est(new[t], "balanced_accuracy") >= est(old[t], "balanced_accuracy") - 0.02 for t in REPORT_TASKS}
    real["Pfirrmann balanced accuracy higher"] = est(new["Pfirrmann"], "balanced_accuracy") > est(old["Pfirrmann"], "balanced_accuracy")
    real["Pfirrmann kappa higher"] = est(new["Pfirrmann"], "kappa") > est(old["Pfirrmann"], "kappa")
    syn = {}
    s_new, s_old = rep.get("synthetic", {}).get("new", {}), rep.get("synthetic", {}).get("baseline", {})
    for t in PHANTOM_ONLY_TASKS:
        if t in s_new and t in s_old:
            syn[t] = s_new[t]["estimate"] >= s_old[t]["estimate"] - 0.03
    ok = all(real.values()) and len(syn) == len(PHANTOM_ONLY_TASKS) and all(syn.values())
    return {"spider_cv_vs_baseline": real, "within_3_points_on_phantoms": syn, "make_default": bool(ok)}


def _fmt(m: dict) -> str:
    if not m or m.get("estimate") is None:
        return "n/a"
    if m.get("ci_low") is None:
        return f"{m['estimate']:.3f} (no CI)"
    return f"{m['estimate']:.3f} ({m['ci_low']:.3f}-{m['ci_high']:.3f})"


MODEL_LABELS = (("cv", f"{NEW} (5-fold CV)"), ("baseline", f"{BASELINE} recipe (its 5-fold CV models)"))


def report_tables(rep: dict) -> str:
    """Markdown tables of :func:`stage_report`'s figures."""
    lines = []
    for scope, title in (("all_graded_levels", "every graded disc (T9-T10 ... L5-S1)"),
                         ("default_levels", "the lumbar discs (T12-L1 ... L5-S1)")):
        cov = rep["coverage"][scope]
        lines += [f"**{title}**: {cov['n_graded_discs']} graded discs (series x disc), {cov['n_without_ivv']} "
                  f"({100 * cov['fraction_without_ivv']:.1f} %) without an IVV (level not found: counted as not graded,"
                  " excluded from the metrics below).", "",
                  "| task | model | balanced accuracy (95 % CI) | kappa (95 % CI) | discs graded by model / by reader |",
                  "|---|---|---|---|---|"]
        for task in REPORT_TASKS:
            for name, label in MODEL_LABELS:
                r = rep["models"][name][scope][task]
                kind = "linear" if r["kappa_kind"] == "kappa_linear" else "Cohen"
                lines.append(f"| {task} | {label} | {_fmt(r['balanced_accuracy'])} | {kind} {_fmt(r['kappa'])} | "
                             f"{r['n_graded'] - r['n_missing']} / {r['n_graded']} |")
        lines.append("")
    lines += ["**Auxiliary targets** (SPIDER grades on other scales; every graded disc with an IVV):", "",
              "| SPIDER grade | model read-out | model | balanced accuracy (95 % CI) | Cohen kappa (95 % CI) | discs |",
              "|---|---|---|---|---|---|"]
    for col, what in (("SPIDER_Narrowing", "P(Narrowing > 1) > 0.5"), ("SPIDER_Modic", "noisy-or of the marrow heads > 0.5")):
        for name, label in MODEL_LABELS:
            r = rep["models"][name]["aux"][col]
            lines.append(f"| {col.replace('SPIDER_', '')}{' > 0' if col == 'SPIDER_Modic' else ''} | {what} | {label} |"
                         f" {_fmt(r['balanced_accuracy'])} | {_fmt(r['kappa'])} | {r['balanced_accuracy']['n_discs']} |")
    lines += ["", f"**Per sequence** (balanced accuracy, {NEW} CV / {BASELINE} CV; every graded level):", "",
              "| sequence | " + " | ".join(REPORT_TASKS) + " |", "|---|" + "---|" * len(REPORT_TASKS)]
    for seq in rep["models"]["cv"]["by_sequence"]:
        cells = []
        for task in REPORT_TASKS:
            a = rep["models"]["cv"]["by_sequence"][seq][task]
            b = rep["models"]["baseline"]["by_sequence"][seq][task]
            cells.append(f"{_fmt(a['balanced_accuracy'])} / {_fmt(b['balanced_accuracy'])}, n={a['n_graded'] - a['n_missing']}")
        lines.append(f"| {seq} | " + " | ".join(cells) + " |")
    lines += ["", f"**Per site** (maker, field strength; {NEW} CV balanced accuracy):", "",
              "| site | " + " | ".join(REPORT_TASKS) + " |", "|---|" + "---|" * len(REPORT_TASKS)]
    for site, by_task in rep["models"]["cv"]["by_site"].items():
        cells = [f"{_fmt(by_task[t]['balanced_accuracy'])}, n={by_task[t]['n_graded'] - by_task[t]['n_missing']}"
                 for t in REPORT_TASKS]
        lines.append(f"| {site} | " + " | ".join(cells) + " |")
    if rep.get("synthetic"):
        lines += ["", f"**Held-out synthetic phantoms** (seeds {PHANTOM_TEST_SEEDS[0]}-{PHANTOM_TEST_SEEDS[1] - 1},"
                  " 9-slice IVVs from the truth polygons;"
                  " balanced accuracy vs the simulated reader R1, 95 % subject-bootstrap CI):", "",
                  f"| task | {NEW} | {BASELINE} | {NEW} - {BASELINE} |", "|---|---|---|---|"]
        s4, s3 = rep["synthetic"].get("new", {}), rep["synthetic"].get("baseline", {})
        for t in TASKS:
            if t.name in s4 and t.name in s3:
                star = " (phantom-only task)" if t.name in PHANTOM_ONLY_TASKS else ""
                lines.append(f"| {t.name}{star} | {_fmt(s4[t.name])} | {_fmt(s3[t.name])} | "
                             f"{s4[t.name]['estimate'] - s3[t.name]['estimate']:+.3f} |")
    return "\n".join(lines)


def write_model_card(rep: dict, weights: str | Path, md_path: str | Path, command: str, notes: str = "") -> Path:
    """``models/grader-cpu-<NEW>.md``: data, recipe, reproduction, the figures of :func:`stage_report`
    beside the human and SpineNet references, and the default decision."""
    import torch

    from ..provenance import sha256_file

    weights = Path(weights)
    meta = torch.load(weights, map_location="cpu", weights_only=True).get("meta", {})
    cfg = meta.get("config", {})
    dec = default_decision(rep)
    from ..shipped import DEFAULT_MODELS

    # what ships is shipped.DEFAULT_MODELS; the rule below is recorded beside it, and the product
    # decision (real discs first, see the card) can overrule it
    shipped_default = DEFAULT_MODELS["grader"] == Path(weights).name
    folds = rep.get("folds", {})
    cv_seconds = sum(f["train_seconds"] for f in folds.values())
    cov = rep["coverage"]
    lines = [
        f"# {weights.stem}: slice-pooled disc grader trained on real grades (SPIDER) and phantoms",
        "",
        "| | |",
        "|---|---|",
        f"| file | `models/{weights.name}` ({weights.stat().st_size / 1e6:.2f} MB, fp16 weights) |",
        f"| sha256 | `{sha256_file(weights)}` |",
        "| format | `torch.load(weights_only=True)` dict: `format=spinecohort-grader`, `arch` (`name: slices2d`), `state_dict`, `meta` |",
        "| loader | `spinecohort.grade.Grader.load(path)` |",
        "| input | IVV (9, 112, 224) from `spinecohort.discs.extract_ivvs`; any subset of its slices may be zero (a 1-slice series fills only slice 4) |",
        "| output | 11 tasks in SpineNet order, class probabilities on the contract scale |",
        f"| trained | {meta.get('train_seconds', 0) / 60:.1f} min (final model), 5-fold CV {cv_seconds / 60:.1f} min of training;"
        f" 1 torch thread each on the shared 2-core machine (two runs side by side, other jobs running); torch {meta.get('torch')} |",
        f"| default | {'yes' if shipped_default else 'no'} (`spinecohort.shipped.DEFAULT_MODELS`; rule and figures below) |",
        "",
        "## Architecture",
        "",
        "`spinecohort.nets.grader_slices.GraderSlices`: a shared 2-D encoder applied to every *valid* IVV slice"
        " (not all zero): stem convolution 4x4 stride 4, residual basic blocks"
        f" {', '.join(f'{c} ch stride {st}' for c, st in cfg.get('arch', {}).get('plan', []))},"
        " 1x1 projection to 64 channels, average + max pooling over the four quadrants of the (rows, cols) plane"
        " (512-d per slice); masked mean and masked max over the valid slices (1024-d); one 2-layer MLP head per task"
        f" (1024 -> {cfg.get('arch', {}).get('head_hidden', 128)} -> classes). A single slice gives the same output"
        " wherever it sits and whatever the zero slices (tested). "
        + (f"The encoder started from `{meta['init_from_3d']}` (each 3-D kernel summed over its slice axis, each"
           " head's first layer split over the mean / max halves: `init_from_3d`)." if meta.get("init_from_3d")
           else "Trained from scratch (`grader_real.ENCODER_PLANS` says why this plan)."),
        "",
        "## Data",
        "",
        "- **SPIDER** (van der Graaf et al., Scientific Data 11, 264, 2024; the mid-sagittal export in"
        " `../shared/data/spider-midsagittal`, CC BY 4.0): 360 series (T1, T2, T2-SPACE) of 179 patients, one slice"
        " each, one expert's grades. Each PNG went through the pipeline's own detector, labeller and IVV extraction"
        f" (the shipped {', '.join(f'`{m}`' for m in meta.get('trained_on', {}).get('pipeline_models', []))}, with"
        " L5-S1 placed below L5 where the sacrum is not detected, `discs.estimated_s1`, and lumbar counts without C2"
        " in view re-counted from the sacrum, `label.count_from_sacrum`) as a 1-slice volume; grades were matched"
        f" to IVVs by the pipeline's level name. {BASELINE} learnt from IVVs labelled by the first labeller"
        " (`appearance-cpu-v1`), which put the level one too low on about one series in six (the lowest lumbar body"
        " called S1); the grades it learnt were then those of the neighbouring disc.",
        f"  Graded discs (series x disc, every graded level T9-T10 ... L5-S1): {cov['all_graded_levels']['n_graded_discs']},"
        f" {cov['all_graded_levels']['n_without_ivv']} ({100 * cov['all_graded_levels']['fraction_without_ivv']:.1f} %)"
        " without an IVV; on the pipeline's default graded discs (T12-L1 ... L5-S1):"
        f" {cov['default_levels']['n_graded_discs']}, {cov['default_levels']['n_without_ivv']}"
        f" ({100 * cov['default_levels']['fraction_without_ivv']:.1f} %) without an IVV. A disc without an IVV counts as"
        " not graded by the model (reported, never imputed).",
        "- SPIDER supervises Pfirrmann, Herniation, Spondylolisthesis and UpperEndplate/LowerEndplate ->"
        " UpperEndplateDefect/LowerEndplateDefect directly (the other tasks are masked for SPIDER discs). Auxiliary"
        " losses (class-weighted binary cross-entropy on the task heads' probabilities): SPIDER's binary Narrowing"
        " against P(Narrowing > 1); Modic > 0 against the noisy-or 1 - (1 - P(UpperMarrow)) (1 - P(LowerMarrow))."
        " Bulging is not used.",
        f"- **Phantoms** (`spinecohort.synthetic`, seeds {PHANTOM_TRAIN_SEEDS[0]}-{PHANTOM_TRAIN_SEEDS[1] - 1}, a subset of"
        " v3's training phantoms; 9-slice IVVs from the truth polygons, two simulated reads as soft targets) supervise"
        " every task, and alone the tasks SPIDER does not grade (central canal and foraminal stenosis, 4-class"
        " narrowing, marrow). In every fold. Half of them are reduced to their centre slice at each draw.",
        "",
        "## Recipe",
        "",
        f"`spinecohort.training.grader.fit` (phase A: whole network, {cfg.get('steps')} AdamW steps of batch"
        f" {cfg.get('batch_size')}, lr {cfg.get('lr')} one-cycle, class weights (1/frequency)^{cfg.get('balance_power_backbone')},"
        " the recipe's augmentation with padding slices kept empty; phase B: heads on the frozen backbone,"
        f" {cfg.get('head_epochs')} epochs, fully class-balanced), single-slice share {cfg.get('single_slice_p')},"
        f" auxiliary weight {cfg.get('aux_weight')}, seed {cfg.get('seed')}. No hyper-parameter was tuned on any"
        " figure: the recipe's defaults, with the step count set by the time available before any result existed.",
        "",
        "Reproduce (caches and out-of-fold predictions under `--work`, never in the repository):",
        "",
        "```",
        command,
        "```",
        "",
        "## Cross-validated figures on SPIDER (end to end: the pipeline's own detection, labelling, IVVs)",
        "",
        "Patient-level 5-fold CV (`patient_folds`, seed 0): each fold's model never saw the held-out patients' T1 or"
        " T2 series (phantoms in every fold); every SPIDER IVV predicted once, TTA 4. Beside it the same recipe's"
        f" earlier cross-validation ({BASELINE}'s five fold models, trained on the first labeller's IVVs) re-scored on"
        " today's IVVs, each patient by the fold model that did not train on it (`stage_rescore`): the same discs,"
        " so the difference is what cleaner level assignment in training bought. Metrics from"
        " `spinecohort.stats.compute_agreement`, pooled over levels, 95 % subject-clustered bootstrap percentile"
        " intervals (1000 resamples); a series x disc is one observation (T1 and T2 of a patient share the grades"
        " and the bootstrap cluster).",
        "",
        report_tables(rep),
        "",
        "## References",
        "",
        "- Human readers: Pfirrmann inter-rater kappa about 0.6, intra-rater about 0.8 (literature).",
        "- SpineNet external validation on NFBC1966 (Jamaludin et al. 2017 / SpineNetV2, Windsor et al. 2022):"
        " Pfirrmann balanced accuracy 0.78, kappa 0.68; Modic balanced accuracy 0.86.",
        "",
        "## Default decision",
        "",
        f"Rule, fixed before the figures: on the same SPIDER discs the CV Pfirrmann balanced accuracy and linear kappa"
        f" beat {BASELINE}'s re-scored CV, no SPIDER task's balanced accuracy drops by more than 0.02, and on held-out"
        f" 9-slice phantoms each phantom-only task stays within 0.03 of {BASELINE}."
        f" Result: real-grade comparisons {json.dumps(dec['spider_cv_vs_baseline'])}; phantoms"
        f" {json.dumps(dec['within_3_points_on_phantoms'])} -> rule: **{'make it the default' if dec['make_default'] else 'do not make it the default'}**."
        + (" Shipped as the default all the same (stated under 'Where it falls short')."
           if shipped_default and not dec["make_default"] else ""),
        "",
        notes,
        "",
    ]
    Path(md_path).write_text("\n".join(lines))
    return Path(md_path)


if __name__ == "__main__":
    sys.exit(main())
