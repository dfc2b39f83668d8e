"""Every pipeline stage, and :data:`STAGES`, the one ordered list of them. Ingest reads the scan;
the model stages each load their models once per shard job and turn the stage module's results
into the contract's table rows."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from . import ingest as ingest_mod
from .config_keys import STAGE_KEYS
from .pipeline.context import ScanContext, Stage
from .models import load_models
from .morphometry import true_cell


class DeviceError(RuntimeError):
    """config ``device: cuda`` where no CUDA GPU can be used: the job stops rather than run on the CPU."""


def torch_device(config: Mapping[str, Any]) -> str:
    """The torch device of a model stage: ``auto`` is CUDA when torch sees a GPU, else the CPU;
    ``cuda`` without a usable GPU raises :class:`DeviceError` naming why (a GPU run that silently
    fell back to the CPU would take days and go unnoticed)."""
    import torch

    torch.set_num_threads(int(config.get("threads", 2)))
    wanted = config.get("device", "auto")
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = f"this torch ({torch.__version__}) is a CPU-only build"
        else:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            why = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU"
                   + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
                   + ": no GPU on this node, no GPU given to the job, or a driver problem")
        raise DeviceError(f"config device: cuda, but CUDA is not available: {why}. Run on a GPU node "
                          "(profiles/slurm-gpu asks SLURM for one), or set device: auto or cpu.")
    return wanted


def gpu_name(device: str) -> str:
    """The GPU model a device string runs on (torch's name for it), "" for the CPU."""
    if not device.startswith("cuda"):
        return ""
    import torch

    return str(torch.cuda.get_device_name(torch.device(device)))


# ----------------------------------------------------------------------------- detection
def vertebra_rows(scan: ScanContext, detections: list) -> pd.DataFrame:
    """Contract rows (``tables/vertebrae.parquet``) from detections in the canonical view."""
    rows = []
    for vertebra_id, detection in enumerate(detections):
        stored = scan.canonical.to_stored_polygons(detection.polygons)
        slices = sorted(stored)
        polygons = [{"slice": s, "corners": [float(v) for v in stored[s].reshape(-1)]} for s in slices]
        centroid = scan.canonical.to_stored_points(np.asarray(detection.centroid, dtype=float))[0]
        x, y, z = scan.series.to_patient(centroid)[0]
        rows.append({
            "scan_id": scan.scan_id, "vertebra_id": vertebra_id, "level": None, "level_probability": np.nan,
            "slice_min": slices[0], "slice_max": slices[-1],
            "centroid_slice": float(centroid[0]), "centroid_row": float(centroid[1]), "centroid_col": float(centroid[2]),
            "centroid_x_mm": float(x), "centroid_y_mm": float(y), "centroid_z_mm": float(z),
            "polygons": polygons, "detection_score": float(detection.score),
            "found_at_low_threshold": bool(detection.found_at_low_threshold),
        })
    return pd.DataFrame(rows)


def canonical_vertebrae(scan: ScanContext, rows: pd.DataFrame) -> list[dict]:
    """Vertebra rows of a scan as the stage modules take them: canonical view, caudal first."""
    if not len(rows):
        return []
    vertebrae = []
    for _, row in rows.sort_values("vertebra_id").iterrows():
        stored = {int(p["slice"]): np.asarray(p["corners"], dtype=float).reshape(4, 2) for p in row["polygons"]}
        centroid = scan.canonical.from_stored_points([row["centroid_slice"], row["centroid_row"], row["centroid_col"]])[0]
        vertebrae.append({"vertebra_id": int(row["vertebra_id"]), "level": row.get("level"),
                          "polygons": scan.canonical.from_stored_polygons(stored),
                          "centroid": tuple(float(v) for v in centroid),
                          "found_at_low_threshold": true_cell(row.get("found_at_low_threshold"))})
    return vertebrae


class IngestStage(Stage):
    name = "ingest"

    def run_scan(self, scan: ScanContext) -> pd.DataFrame:
        series_arg = scan.row.get("series") or None
        series = ingest_mod.ingest(scan.row["path"], scan.scan_id, series_arg)
        ingest_mod.save_series(series, scan.series_path)
        meta = series.meta
        # the SeriesInstanceUID is a DICOM identifier: written only when the team opts in
        uid = {"series_uid": meta["series_uid"]} if self.config.get("keep_series_uid") else {}
        return pd.DataFrame([{
            "scan_id": scan.scan_id,
            "series_key": meta["series_key"],
            **uid,
            "series_description": meta["series_description"],
            "series_choice": meta["series_choice"],
            "n_slices": meta["n_slices"],
            "rows": meta["rows"],
            "cols": meta["cols"],
            "pixel_spacing_mm": [float(v) for v in meta["pixel_spacing_mm"]],
            "slice_spacing_mm": meta["slice_spacing_mm"],
            "fov": f"{meta['rows'] * meta['pixel_spacing_mm'][0]:.0f}x{meta['cols'] * meta['pixel_spacing_mm'][1]:.0f} mm",
            "ingest_warnings": "; ".join(meta["warnings"]),
        }])



class DetectStage(Stage):
    name = "detect"
    after = "ingest"

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        self.device = torch_device(config)
        self.gpu_model = gpu_name(self.device)
        loaded = load_models(config, ["detector"], self.device)
        self.detector = loaded["detector"]
        self._models = loaded.provenance

    def models(self) -> dict[str, str]:
        return dict(self._models)

    def run_scan(self, scan: ScanContext) -> pd.DataFrame:
        detections = self.detector.detect(scan.canonical.volume, scan.canonical.pixel_spacing_mm)
        return vertebra_rows(scan, detections)


# ----------------------------------------------------------------------------- labelling
#: per-scan labelling summary columns (label stage rows -> tables/scans.parquet)
SCAN_LEVEL_COLUMNS = ("level_confidence", "level_flags")


def drop_unlabelled_weak_bodies(rows: pd.DataFrame) -> pd.DataFrame:
    """Labelled vertebra rows without the weak body below the column (``found_at_low_threshold``)
    that the labeller did not keep as S1: it is not a vertebra of the scan. ``vertebra_id`` is
    renumbered, caudal first, so 0 stays the lowest."""
    if "found_at_low_threshold" not in rows:
        return rows
    rows = rows.sort_values("vertebra_id")
    rows = rows[~(rows["found_at_low_threshold"].astype(bool) & rows["level"].isna())].reset_index(drop=True)
    return rows.assign(vertebra_id=np.arange(len(rows), dtype=np.int64))


class LabelStage(Stage):
    name = "label"
    after = "detect"
    needs_rows_of = ("detect",)

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        self.device = torch_device(config)
        self.gpu_model = gpu_name(self.device)
        loaded = load_models(config, ["labeller"], self.device)
        self.labeller = loaded["labeller"]
        self._models = loaded.provenance

    def models(self) -> dict[str, str]:
        return dict(self._models)

    def run_scan(self, scan: ScanContext) -> pd.DataFrame:
        rows = scan.previous["detect"]
        if not len(rows):  # nothing detected: nothing to label, and not a failure
            return rows
        rows = rows.sort_values("vertebra_id").reset_index(drop=True)
        series = scan.series
        labels, summary = self.labeller.label_scan(scan.canonical.volume, scan.canonical.pixel_spacing_mm,
                                                   series.slice_spacing_mm, canonical_vertebrae(scan, rows))
        rows["level"] = [level for level, _ in labels]
        rows["level_probability"] = [float(probability) for _, probability in labels]
        rows = drop_unlabelled_weak_bodies(rows)
        # scan-level doubt, carried on each row and moved to scans.parquet by the cohort tables
        rows[SCAN_LEVEL_COLUMNS[0]] = float(summary.confidence)
        rows[SCAN_LEVEL_COLUMNS[1]] = summary.flags_text
        return rows


# ----------------------------------------------------------------------------- disc volumes
def ivv_path(workdir: Path, scan_id: str) -> Path:
    return Path(workdir) / "ivv" / f"{scan_id}.npz"


class ExtractDiscsStage(Stage):
    name = "extract_discs"
    after = "label"
    needs_rows_of = ("label",)

    def run_scan(self, scan: ScanContext) -> pd.DataFrame:
        from .discs import extract_ivvs, save_ivvs

        rows = scan.previous["label"]
        series = scan.series
        vertebrae = [v for v in canonical_vertebrae(scan, rows) if isinstance(v["level"], str)]
        ivvs = extract_ivvs(scan.canonical.volume, scan.canonical.pixel_spacing_mm, vertebrae,
                            levels=tuple(self.config["graded_discs"]))
        save_ivvs(ivv_path(scan.workdir, scan.scan_id), ivvs)
        vertebra_id = {v["level"]: v["vertebra_id"] for v in vertebrae}
        row_mm, col_mm = scan.canonical.pixel_spacing_mm  # the IVV's width and height are the view's
        records = []
        for ivv in ivvs:
            centre = scan.canonical.to_stored_points(np.asarray(ivv.centre, dtype=float))[0]
            _, box = scan.canonical.to_stored_quad(int(round(ivv.centre[0])), ivv.box_corners)
            x, y, z = series.to_patient(centre)[0]
            records.append({
                "scan_id": scan.scan_id, "level": ivv.level,
                "upper_vertebra_id": vertebra_id.get(ivv.upper), "lower_vertebra_id": vertebra_id.get(ivv.lower),
                "centre_slice": float(centre[0]), "centre_row": float(centre[1]), "centre_col": float(centre[2]),
                "centre_x_mm": float(x), "centre_y_mm": float(y), "centre_z_mm": float(z),
                "angle_deg": float(np.degrees(ivv.angle_rad)),
                "width_mm": float(ivv.width_px * col_mm), "height_mm": float(ivv.height_px * row_mm),
                "box_corners": [float(v) for v in box.reshape(-1)],
                # source slices the IVV holds (the rest is zero padding): what grading sees
                "grading_slices": int(sum(s >= 0 for s in ivv.slices)),
                # L5-S1 placed below L5 because the sacrum was not detected (discs.estimated_s1)
                "lower_vertebra_estimated": bool(ivv.lower_estimated),
                # the disc above the topmost labelled body, its upper body placed (discs.estimated_upper)
                "upper_vertebra_estimated": bool(ivv.upper_estimated),
            })
        return pd.DataFrame(records)


# ----------------------------------------------------------------------------- grading
class GradeStage(Stage):
    name = "grade"
    after = "extract_discs"
    needs_rows_of = ("extract_discs",)
    # Discs per shard with hotspot montages when config hotspots = report: examples, not every
    # disc. Each gets one montage per task of config hotspot_tasks (one backward pass each), so a
    # reviewer of any task has examples at the cost of a few more graded discs.
    REPORT_EXAMPLES_PER_SHARD = 1

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        self.device = torch_device(config)
        self.gpu_model = gpu_name(self.device)
        loaded = load_models(config, ["grader"], self.device)
        self.grader = loaded["grader"]
        self.model_id = loaded.model_ids["grader"][0]  # the discs table's model_id column
        self._models = loaded.provenance
        self._examples_left = self.REPORT_EXAMPLES_PER_SHARD

    def models(self) -> dict[str, str]:
        return dict(self._models)

    def resumed(self, rows: pd.DataFrame) -> None:
        # the shard's report examples went to its first discs, already graded by the interrupted run
        self._examples_left = max(0, self._examples_left - len(rows))

    def run_scan(self, scan: ScanContext) -> pd.DataFrame:
        from .discs import load_ivvs
        from .grade import hotspot_montage
        from .tasks import TASK_NAMES, TASKS

        rows = scan.previous["extract_discs"].reset_index(drop=True)
        if not len(rows):
            return rows
        volumes, levels = load_ivvs(ivv_path(scan.workdir, scan.scan_id))
        by_level = dict(zip(levels, volumes.astype(np.float32)))
        ivvs = [by_level[level] for level in rows["level"]]
        predictions = self.grader.grade(ivvs, tta=int(self.config["tta"]))
        for task in TASKS:
            probabilities = [np.asarray(p[task.name], dtype=float) for p in predictions]
            rows[task.name] = [int(task.grades[int(np.argmax(p))]) for p in probabilities]
            rows[f"{task.name}_probs"] = [[float(v) for v in p] for p in probabilities]
        rows["model_id"] = self.model_id
        mode = self.config.get("hotspots", "report")
        hotspot_tasks = set(self.config.get("hotspot_tasks") or TASK_NAMES)
        for index, level in enumerate(rows["level"]):
            if mode == "all" or (mode == "report" and self._examples_left > 0):
                self._examples_left -= 1
                # the tasks under review (default all): a single gradient pass each, the
                # augmented average would multiply the cost by the tasks' number again
                for task in [t for t in TASKS if t.name in hotspot_tasks]:
                    heat = self.grader.hotspots(ivvs[index], task.name, n_aug=1)
                    grade = rows.at[index, task.name]
                    target = (Path(self.config["outdir"]) / "report" / "hotspots"
                              / f"{scan.scan_id}_{level}_{task.name}.png")
                    hotspot_montage(ivvs[index], heat, target, title=f"{scan.scan_id} {level}: {task.name} {grade}")
        return rows


# ----------------------------------------------------------------------------- the stages, in order
#: Every stage, in execution order: the one list of stages (the Snakefile makes a rule per entry).
STAGES: tuple[type[Stage], ...] = (IngestStage, DetectStage, LabelStage, ExtractDiscsStage, GradeStage)


def _check_stages(stages: tuple[type[Stage], ...]) -> None:
    """Each stage takes the ok scans of the stage it names in ``after``: that one must come earlier.
    Each stage's config keys are listed in config_keys.STAGE_KEYS: checked at import rather than by
    the stage's first job."""
    for index, stage in enumerate(stages):
        if stage.after is not None and stage.after not in [s.name for s in stages[:index]]:
            raise RuntimeError(f"stage {stage.name!r} runs after {stage.after!r}, which is not an earlier stage")
    if set(STAGE_KEYS) != {stage.name for stage in stages}:
        raise RuntimeError(f"config_keys.STAGE_KEYS lists {sorted(STAGE_KEYS)}, the stages are "
                           f"{[stage.name for stage in stages]}")


_check_stages(STAGES)


def stage_classes() -> dict[str, type[Stage]]:
    """Stage name -> class, in execution order."""
    return {stage.name: stage for stage in STAGES}


def stage_order() -> list[str]:
    """Stage names in execution order."""
    return [stage.name for stage in STAGES]
