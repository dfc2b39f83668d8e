"""The cohort tables (``tables/*.parquet``) assembled from every shard's stage outputs, their
Arrow types, and the shard's last job (QC pictures, removal of the stored series)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa

from ..manifest import OPTIONAL, REQUIRED, read_manifest, shard_rows
from ..provenance import make_provenance, read_provenance, write_table
from ..stages import SCAN_LEVEL_COLUMNS, stage_order
from .context import (STATUS_COLUMNS, _format_error, _read_optional, remove_intermediates, scan_series,
                      series_path, shard_dir)

log = logging.getLogger("spinecohort")

#: The stages that run networks: tables/scans.parquet says per scan where each ran (device_<stage>).
MODEL_STAGES = ("detect", "label", "grade")

SCAN_COLUMNS = ["scan_id", "subject_id", "site", "visit", "status", "failed_stage", "error",
                "series_key", "series_description", "n_slices", "rows", "cols", "pixel_spacing_mm",
                "slice_spacing_mm", "fov", "n_vertebrae", "n_discs", "grading_slices"]

# One Arrow type per column, whatever fails (contract): counts are nullable integers, so a failed
# scan's blank leaves them integers; columns not listed keep their inferred type (typed_frame).
_TEXT, _INT, _FLOAT, _FLOATS = pa.string(), pa.int64(), pa.float64(), pa.list_(pa.float64())
SCAN_TYPES: dict[str, pa.DataType] = {
    **{c: _TEXT for c in ("scan_id", "subject_id", "site", "visit", "series", "status", "failed_stage", "error",
                          "series_key", "series_uid", "series_description", "series_choice", "fov",
                          "ingest_warnings", "level_flags", "gpu_model")},
    **{c: _INT for c in ("n_slices", "rows", "cols", "n_vertebrae", "n_discs", "grading_slices")},
    "pixel_spacing_mm": _FLOATS, "slice_spacing_mm": _FLOAT, "level_confidence": _FLOAT,
}
_POLYGONS = pa.list_(pa.struct([("slice", pa.int64()), ("corners", _FLOATS)]))


def table_types(kind: str, columns: list[str]) -> dict[str, pa.DataType]:
    """The Arrow type of each column of cohort table ``kind`` (scans, vertebrae, discs)."""
    if kind == "scans":
        types = dict(SCAN_TYPES)
    elif kind in ("morphometry", "change"):  # built with explicit pandas dtypes (spinecohort.morphometry)
        return {}
    else:
        arrow = {"str": _TEXT, "int64": _INT, "float64": _FLOAT}
        types = {c: arrow[str(d)] for c, d in _row_dtypes(kind).items() if str(d) in arrow}
        types.update({"polygons": _POLYGONS, "box_corners": _FLOATS})
    types.update({c: _FLOATS for c in columns if c.endswith("_probs")})
    types.update({c: _FLOAT for c in columns if c.startswith("seconds_")})
    types.update({c: _TEXT for c in columns if c.startswith("device_")})
    return types


def _numeric_or_text(values: pd.Series) -> pd.Series:
    """A manifest column (read as text) as float64 when every non-blank cell is a number, so that
    e.g. age stays numeric; text otherwise, and also where a leading zero (an ID such as 007)
    would be lost."""
    text = values.fillna("").astype(str).str.strip()
    filled = text[text != ""]
    numbers = pd.to_numeric(filled, errors="coerce")
    if not len(filled) or numbers.isna().any() or filled.str.match(r"^[+-]?0[0-9]").any():
        return values
    return pd.to_numeric(text.where(text != ""), errors="coerce").astype("float64")


def cohort_scans(config: Mapping[str, Any], manifest_file: str | Path, n_shards: int,
                 stages: list[str]) -> pd.DataFrame:
    """``tables/scans.parquet``: one row per manifest row, failures included. With config ``qc``,
    a scan whose QC picture could not be drawn fails at stage ``qc``."""
    outdir = Path(config["outdir"])
    manifest = read_manifest(manifest_file)
    status: dict[str, list[pd.DataFrame]] = {s: [] for s in stages}
    ingest_rows = []
    for shard in range(n_shards):
        here = shard_dir(outdir, shard)
        for stage in stages:
            table = _read_optional(here / f"{stage}.status.parquet")
            if table is not None:
                status[stage].append(table)
        ingest_table = _read_optional(here / "ingest.parquet")
        if ingest_table is not None and len(ingest_table):
            ingest_rows.append(ingest_table)
    merged = manifest.drop(columns=["path"]).copy()
    for column in merged.columns:
        if column not in REQUIRED + OPTIONAL:
            merged[column] = _numeric_or_text(merged[column])
    merged["status"] = "ok"
    merged["failed_stage"] = ""
    merged["error"] = ""
    by_id = {sid: i for i, sid in enumerate(merged["scan_id"])}
    gpus: dict[str, set[str]] = {}
    for stage in stages:
        table = pd.concat(status[stage], ignore_index=True) if status[stage] else pd.DataFrame(columns=STATUS_COLUMNS)
        seconds = dict(zip(table["scan_id"], table["seconds"]))
        merged[f"seconds_{stage}"] = [seconds.get(s, np.nan) for s in merged["scan_id"]]
        if stage in MODEL_STAGES:  # where the stage's networks ran for each scan (none: "")
            device = dict(zip(table["scan_id"], table["device"])) if "device" in table else {}
            merged[f"device_{stage}"] = [device.get(s) or "" for s in merged["scan_id"]]
            if "gpu_model" in table:
                for scan_id, gpu in zip(table["scan_id"], table["gpu_model"]):
                    if isinstance(gpu, str) and gpu:
                        gpus.setdefault(scan_id, set()).add(gpu)
        outcome = dict(zip(table["scan_id"], zip(table["status"], table["error"])))
        for scan_id, index in by_id.items():
            if merged.at[index, "status"] != "ok":
                continue
            state, error = outcome.get(scan_id, ("failed", f"scan {scan_id}: {stage}: no result (stage did not run for this scan)"))
            if state != "ok":
                merged.at[index, "status"] = "failed"
                merged.at[index, "failed_stage"] = stage
                merged.at[index, "error"] = error
    if config.get("qc", True):
        qc = [t for shard in range(n_shards) if (t := _read_optional(shard_dir(outdir, shard) / "qc.status.parquet")) is not None]
        qc_table = pd.concat(qc, ignore_index=True) if qc else pd.DataFrame(columns=STATUS_COLUMNS)
        for scan_id, state, error in zip(qc_table["scan_id"], qc_table["status"], qc_table["error"]):
            index = by_id.get(scan_id)
            if index is not None and state != "ok" and merged.at[index, "status"] == "ok":
                merged.loc[index, ["status", "failed_stage", "error"]] = ["failed", "qc", error]
    merged["gpu_model"] = [";".join(sorted(gpus.get(s, ()))) for s in merged["scan_id"]]
    if ingest_rows:
        info = pd.concat(ingest_rows, ignore_index=True).drop_duplicates("scan_id")
        merged = merged.merge(info, on="scan_id", how="left")
    columns = list(SCAN_COLUMNS)
    if config.get("keep_series_uid"):
        columns.insert(columns.index("series_key") + 1, "series_uid")
    # the ingest columns beyond the contract's are there even when no scan was ingested, so every
    # run's table has the same columns
    for column in columns + ["series_choice", "ingest_warnings"]:
        if column not in merged.columns:  # no scan was ingested: blank cells of the column's type
            kind = SCAN_TYPES.get(column, _TEXT)
            merged[column] = "" if kind == _TEXT else (None if kind == _FLOATS else np.nan)
    extra = [c for c in merged.columns if c not in columns and c != "series_uid"]
    return merged[columns + extra]


def collect_rows(outdir: str | Path, n_shards: int, stage: str) -> pd.DataFrame:
    """Concatenate one stage's rows over all shards."""
    parts = [t for shard in range(n_shards)
             if (t := _read_optional(shard_dir(outdir, shard) / f"{stage}.parquet")) is not None and len(t)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


VERTEBRA_COLUMNS = ["scan_id", "subject_id", "vertebra_id", "level", "level_probability", "slice_min",
                    "slice_max", "centroid_slice", "centroid_row", "centroid_col", "centroid_x_mm",
                    "centroid_y_mm", "centroid_z_mm", "polygons"]
DISC_COLUMNS = ["scan_id", "subject_id", "site", "level", "upper_vertebra_id", "lower_vertebra_id",
                "centre_slice", "centre_row", "centre_col"]


def empty_rows(kind: str) -> pd.DataFrame:
    """A ``vertebrae`` or ``discs`` table with no rows but every column the stages write, typed as
    a non-empty table is: a cohort where nothing was detected still gets the full schema."""
    return pd.DataFrame({column: pd.Series(dtype=dtype) for column, dtype in _row_dtypes(kind).items()})


def _row_dtypes(kind: str) -> dict[str, str]:
    from ..tasks import TASK_NAMES

    if kind == "vertebrae":
        dtypes = {"scan_id": "str", "subject_id": "str", "vertebra_id": "int64", "level": "str",
                  "level_probability": "float64", "slice_min": "int64", "slice_max": "int64",
                  **{f"centroid_{a}": "float64" for a in ("slice", "row", "col", "x_mm", "y_mm", "z_mm")},
                  "polygons": "object", "detection_score": "float64", "found_at_low_threshold": "bool"}
    elif kind == "discs":
        dtypes = {"scan_id": "str", "subject_id": "str", "site": "str", "level": "str",
                  "upper_vertebra_id": "int64", "lower_vertebra_id": "int64",
                  **{f"centre_{a}": "float64" for a in ("slice", "row", "col", "x_mm", "y_mm", "z_mm")},
                  "angle_deg": "float64", "width_mm": "float64", "height_mm": "float64", "box_corners": "object",
                  "grading_slices": "int64", "lower_vertebra_estimated": "bool",
                  "upper_vertebra_estimated": "bool"}
        for task in TASK_NAMES:
            dtypes.update({task: "int64", f"{task}_probs": "object"})
        dtypes["model_id"] = "str"
    else:
        raise ValueError(f"unknown table {kind!r}")
    return dtypes


def shard_models(outdir: str | Path, n_shards: int, stages: list[str]) -> dict[str, str]:
    """Model id -> sha256 over every stage's shard outputs (what the cohort tables were made with)."""
    models: dict[str, str] = {}
    for shard in range(n_shards):
        for stage in stages:
            path = shard_dir(outdir, shard) / f"{stage}.status.parquet"
            if path.exists():
                models.update(json.loads(read_provenance(path).get("models", "{}")))
    return models


def write_cohort_tables(config: Mapping[str, Any], manifest_file: str | Path, n_shards: int,
                        models: Mapping[str, str] | None = None, created_by: str | None = None) -> dict[str, Path]:
    """Assemble ``tables/scans|vertebrae|discs|morphometry|change.parquet`` from every shard's stage outputs."""
    outdir = Path(config["outdir"])
    stages = stage_order()
    scans = cohort_scans(config, manifest_file, n_shards, stages)
    subject = dict(zip(scans["scan_id"], scans["subject_id"]))
    site = dict(zip(scans["scan_id"], scans["site"]))
    tables = {"vertebrae": (VERTEBRA_COLUMNS, _vertebra_stage(stages)), "discs": (DISC_COLUMNS, _disc_stage(stages))}
    frames: dict[str, pd.DataFrame] = {}
    for kind, (columns, stage) in tables.items():
        rows = collect_rows(outdir, n_shards, stage) if stage else pd.DataFrame()
        if len(rows):
            ok = set(scans.loc[scans["status"] == "ok", "scan_id"])
            rows = rows[rows["scan_id"].isin(ok)].copy()
            rows["subject_id"] = rows["scan_id"].map(subject)
            if "site" in columns:
                rows["site"] = rows["scan_id"].map(site)
        if not len(rows):  # nothing detected / graded anywhere: the full, typed schema
            rows = empty_rows(kind)
        for column in columns:
            if column not in rows.columns:
                rows[column] = pd.Series(dtype=object)
        if kind == "vertebrae":
            rows = _move_level_summary(scans, rows)
        frames[kind] = rows[columns + [c for c in rows.columns if c not in columns]].reset_index(drop=True)
        counts = frames[kind].groupby("scan_id").size() if len(frames[kind]) else pd.Series(dtype=int)
        scans[f"n_{kind}"] = [int(counts.get(s, 0)) if status == "ok" else np.nan
                              for s, status in zip(scans["scan_id"], scans["status"])]
    scans["grading_slices"] = _grading_slices(scans, frames["discs"])
    if models is None:  # the contract's `models`: the weights the stages actually used
        models = shard_models(outdir, n_shards, stages)
    provenance = make_provenance(config, models, created_by)
    frames.update(derived_tables(scans, frames))
    paths = {}
    for kind, frame in [("scans", scans), *frames.items()]:
        paths[kind] = outdir / "tables" / f"{kind}.parquet"
        write_table(frame, paths[kind], provenance, types=table_types(kind, list(frame.columns)))
    return paths


def _move_level_summary(scans: pd.DataFrame, vertebrae: pd.DataFrame) -> pd.DataFrame:
    """Put the label stage's per-scan ``level_confidence`` / ``level_flags`` (repeated on each of
    a scan's vertebra rows) into ``scans`` (in place) and return the vertebrae without them. An ok
    scan without vertebrae is flagged ``no_vertebrae_detected``; a failed scan gets null / ''."""
    confidence_column, flags_column = SCAN_LEVEL_COLUMNS
    confidence, flags = {}, {}
    if len(vertebrae) and confidence_column in vertebrae.columns:
        first = vertebrae.drop_duplicates("scan_id")
        confidence = dict(zip(first["scan_id"], first[confidence_column].astype(float)))
        flags = dict(zip(first["scan_id"], first[flags_column].fillna("").astype(str)))
    ok = scans["status"] == "ok"
    scans[confidence_column] = [confidence.get(s, np.nan) if good else np.nan for s, good in zip(scans["scan_id"], ok)]
    scans[flags_column] = [flags.get(s, "no_vertebrae_detected") if good else ""
                           for s, good in zip(scans["scan_id"], ok)]
    return vertebrae.drop(columns=[c for c in SCAN_LEVEL_COLUMNS if c in vertebrae.columns])


def derived_tables(scans: pd.DataFrame, frames: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """``morphometry`` and ``change`` tables: pure functions of the cohort's vertebra landmarks,
    pixel spacings and grades, so computed here rather than in a per-scan stage (no image needed,
    milliseconds a scan, and they always agree with the tables written beside them)."""
    from ..morphometry import CHANGE_DTYPES, MORPHOMETRY_DTYPES, cohort_change, cohort_morphometry, typed

    # Per-scan problems are caught inside (a note on the scan's row); anything else must not cost
    # the cohort its core tables, so it is logged and leaves the typed table empty.
    try:
        morphometry = cohort_morphometry(scans, frames["vertebrae"])
    except Exception:  # noqa: BLE001
        log.exception("tables/morphometry.parquet: morphometry failed; the table is written empty")
        morphometry = typed([], MORPHOMETRY_DTYPES)
    try:
        change = cohort_change(scans, morphometry, frames.get("discs"))
    except Exception:  # noqa: BLE001
        log.exception("tables/change.parquet: change between visits failed; the table is written empty")
        change = typed([], CHANGE_DTYPES)
    return {"morphometry": morphometry, "change": change}


def _grading_slices(scans: pd.DataFrame, discs: pd.DataFrame) -> list[float]:
    """Per scan, the most source slices any of its graded disc volumes holds (1 for a
    single-slice series, at most the IVV's 9); NaN where no disc was graded."""
    if not len(discs) or "grading_slices" not in discs.columns:
        return [np.nan] * len(scans)
    most = pd.to_numeric(discs["grading_slices"], errors="coerce").groupby(discs["scan_id"]).max()
    return [float(most[s]) if s in most.index and status == "ok" else np.nan
            for s, status in zip(scans["scan_id"], scans["status"])]


def _vertebra_stage(stages: list[str]) -> str | None:
    """The latest stage that writes vertebra rows (labelling refines detection)."""
    return next((s for s in ("label", "detect") if s in stages), None)


def _disc_stage(stages: list[str]) -> str | None:
    return next((s for s in ("grade", "extract_discs") if s in stages), None)


def render_shard_qc(config: Mapping[str, Any], manifest_file: str | Path, shard: int,
                    rows: pd.DataFrame | None = None) -> list[Path]:
    """The shard's last job: QC pictures (config ``qc``) for every ingested scan of a shard, from
    the latest vertebra and disc rows, then the removal of the shard's stored series unless
    config ``keep_intermediates`` (every stage that reads them has run).

    A picture that cannot be drawn fails its scan (``qc.status.parquet``, read by the cohort
    tables), never the job: the tables wait on every shard's QC. ``rows`` as for
    :func:`run_shard_stage`."""
    from ..qc import render_qc

    outdir = Path(config["outdir"])
    here = shard_dir(outdir, shard)
    stages = stage_order()
    if rows is None:
        rows = shard_rows(read_manifest(manifest_file), shard, int(config["shard_size"]))
    ingested = _read_optional(here / "ingest.status.parquet")
    ok = set(ingested.loc[ingested["status"] == "ok", "scan_id"]) if ingested is not None else set()
    vertebra_stage, disc_stage = _vertebra_stage(stages), _disc_stage(stages)
    vertebrae = _read_optional(here / f"{vertebra_stage}.parquet") if vertebra_stage else None
    discs = _read_optional(here / f"{disc_stage}.parquet") if disc_stage else None
    written, statuses = [], []
    for _, row in rows.iterrows() if config.get("qc", True) else ():
        scan_id = row["scan_id"]
        if scan_id not in ok and not series_path(outdir / "work", scan_id).exists():
            continue
        started = time.perf_counter()
        target = outdir / "report" / "qc" / f"{scan_id}.png"
        try:
            mine_v = vertebrae[vertebrae["scan_id"] == scan_id] if vertebrae is not None and len(vertebrae) else None
            mine_d = discs[discs["scan_id"] == scan_id] if discs is not None and len(discs) else None
            render_qc(scan_series(outdir / "work", row.to_dict()), mine_v, mine_d, target, title=scan_id)
        except Exception as error:  # noqa: BLE001 - one bad scan never stops the shard
            log.warning("%s", _format_error("qc", scan_id, error))
            statuses.append({"scan_id": scan_id, "status": "failed", "error": _format_error("qc", scan_id, error),
                             "seconds": time.perf_counter() - started})
            continue
        statuses.append({"scan_id": scan_id, "status": "ok", "error": "", "seconds": time.perf_counter() - started})
        written.append(target)
    write_table(pd.DataFrame(statuses, columns=STATUS_COLUMNS), here / "qc.status.parquet", make_provenance(config))
    if not config.get("keep_intermediates", False):
        freed = remove_intermediates(outdir, list(rows["scan_id"]))
        log.info("removed the shard's stored series (%.1f MB); keep_intermediates: true keeps them", freed / 1e6)
    return written

