"""Shard-level execution of the pipeline's stages (the cohort tables: :mod:`.tables`).

A shard is a contiguous block of manifest rows. Each stage job processes one shard: it loads its
models once, processes every scan that the previous stage left ``ok``, and writes two Parquet
files atomically: ``<stage>.status.parquet`` (one row per scan of the shard) and
``<stage>.parquet`` (the stage's rows, e.g. vertebrae). A scan that fails is recorded with a
one-line reason and never stops the shard.

Each finished scan is recorded at once (``partial/<stage>/<scan_id>.parquet``), so a job killed
mid-shard resumes at its next unfinished scan; the shard's files are assembled from those records.
Per-scan intermediates (the ingested series) are a cache: a stage that needs a removed one re-reads
the scan, and each shard's last job removes them unless config ``keep_intermediates``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import traceback
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..config_keys import RESUME_IGNORED_KEYS, config_for
from ..manifest import read_manifest, shard_rows
from ..provenance import make_provenance, sha256_file, write_table
from ..stages import stage_classes, stage_order
from .context import (DEVICE_COLUMNS, STATUS_COLUMNS, ScanContext, Stage, _format_error, _read_optional,
                      shard_dir)
from .tables import render_shard_qc, write_cohort_tables

log = logging.getLogger("spinecohort")

def run_shard_stage(stage_name: str, config: Mapping[str, Any], manifest_file: str | Path, shard: int,
                    created_by: str | None = None, rows: pd.DataFrame | None = None) -> None:
    """Run one stage over one shard and write its status and rows.

    ``rows``: the shard's manifest rows (the Snakemake job reads them from the shard's own
    manifest); default: shard ``shard`` of ``manifest_file``. Scans recorded as done by an earlier,
    interrupted run of the same job (same config, models and inputs) are not run again."""
    config = config_for(config, stage_name)
    stage = stage_classes()[stage_name](config)
    outdir = Path(config["outdir"])
    workdir = outdir / "work"
    here = shard_dir(outdir, shard)
    if rows is None:
        rows = shard_rows(read_manifest(manifest_file), shard, int(config["shard_size"]))
    eligible = set(rows["scan_id"])
    if stage.after is not None:
        previous_status = pd.read_parquet(here / f"{stage.after}.status.parquet")
        eligible = set(previous_status.loc[previous_status["status"] == "ok", "scan_id"])
    previous_rows = {name: _read_optional(here / f"{name}.parquet") for name in stage.needs_rows_of}

    contexts: list[ScanContext] = []
    for _, row in rows.iterrows():
        if row["scan_id"] not in eligible:
            continue
        context = ScanContext(scan_id=row["scan_id"], row=row.to_dict(), workdir=workdir)
        for name, table in previous_rows.items():
            if table is not None and len(table):
                context.previous[name] = table[table["scan_id"] == row["scan_id"]].reset_index(drop=True)
            else:
                context.previous[name] = pd.DataFrame()
        contexts.append(context)

    records = ScanRecords(here / "partial" / stage_name, _resume_key(stage, config, here))
    done = [c for c in contexts if records.done(c)]
    pending = [c for c in contexts if not records.done(c)]
    if done:
        log.info("%s: %d of %d scans of shard %04d already done by an interrupted run; resuming at the next",
                 stage_name, len(done), len(contexts), shard)
        done_rows = [records.read(c)[1] for c in done]
        stage.resumed(pd.concat(done_rows, ignore_index=True) if done_rows else pd.DataFrame())
    for context, (result, seconds) in zip(pending, stage.run_batch(pending) if pending else []):
        if isinstance(result, BaseException):
            log.debug("".join(traceback.format_exception(result)))
            status = {"status": "failed", "error": _format_error(stage_name, context.scan_id, result)}
            result = None
        else:
            status = {"status": "ok", "error": ""}
        status.update(seconds=seconds, device=stage.device or "", gpu_model=stage.gpu_model)
        records.write(context, status, result)
        context.release()

    # The shard's files are assembled from the records, in manifest order, whether or not the job
    # was interrupted: a resumed shard is written exactly as an uninterrupted one.
    statuses, parts = [], []
    for context in contexts:
        status, result = records.read(context)
        statuses.append({"scan_id": context.scan_id, **status})
        if len(result):
            parts.append(result)
    provenance = make_provenance(config, stage.models(), created_by)
    status_frame = pd.DataFrame(statuses, columns=STATUS_COLUMNS + DEVICE_COLUMNS)
    rows_frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"scan_id": pd.Series(dtype=str)})
    here.mkdir(parents=True, exist_ok=True)
    # Rows first, status last: the status file is the rule's declared output, so a killed job
    # never leaves a shard that looks complete.
    write_table(rows_frame, here / f"{stage_name}.parquet", provenance)
    write_table(status_frame, here / f"{stage_name}.status.parquet", provenance)
    records.clear()


def _resume_key(stage: Stage, config: Mapping[str, Any], here: Path) -> str:
    """What a scan's result depends on besides its manifest row: the stage's config (less
    RESUME_IGNORED_KEYS), the weights and the earlier stages' files of the shard. A record made under
    another key (the config or an earlier stage changed since the interrupted run) is not used."""
    upstream = ([f"{stage.after}.status.parquet"] if stage.after else []) + [f"{n}.parquet" for n in stage.needs_rows_of]
    key = {"stage": stage.name, "config": {k: v for k, v in config.items() if k not in RESUME_IGNORED_KEYS},
           "models": stage.models(),
           "upstream": {name: sha256_file(here / name) if (here / name).exists() else None for name in upstream}}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


class ScanRecords:
    """One file per finished scan of a stage job (``<folder>/<scan_id>.parquet``): the scan's rows,
    with its status, seconds and device in the file metadata. Written atomically as each scan
    finishes, so they survive a killed job (they are not the rule's declared output, which
    Snakemake removes before re-running a job)."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = folder, key

    def _path(self, context: ScanContext) -> Path:
        return self.folder / f"{context.scan_id}.parquet"

    def _scan_key(self, context: ScanContext) -> str:
        row = json.dumps(context.row, sort_keys=True, default=str)
        return hashlib.sha256(f"{self.key}\n{row}".encode("utf-8", "surrogatepass")).hexdigest()

    def done(self, context: ScanContext) -> bool:
        path = self._path(context)
        if not path.exists():
            return False
        try:
            meta = pq.read_schema(path).metadata or {}
        except (OSError, pa.ArrowException):  # unreadable: the scan is run again
            return False
        return meta.get(b"scan_key", b"").decode() == self._scan_key(context)

    def write(self, context: ScanContext, status: Mapping[str, Any], rows: pd.DataFrame | None) -> None:
        if rows is None or not len(rows):
            rows = pd.DataFrame({"scan_id": pd.Series(dtype=str)})
        write_table(rows, self._path(context), {"scan_key": self._scan_key(context),
                                                "scan_status": json.dumps(dict(status), sort_keys=True)})

    def read(self, context: ScanContext) -> tuple[dict[str, Any], pd.DataFrame]:
        table = pq.read_table(self._path(context))
        status = json.loads((table.schema.metadata or {})[b"scan_status"])
        return status, table.to_pandas()

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()  # partial/, when no other stage of the shard has records
        except OSError:
            pass



def run_in_process(config: Mapping[str, Any], manifest_file: str | Path, created_by: str | None = None) -> dict[str, Path]:
    """Every stage over every shard in this process (``spinecohort predict`` and tests)."""
    from ..manifest import n_shards

    from ..manifest import write_shard_manifest

    count = n_shards(len(read_manifest(manifest_file)), int(config["shard_size"]))
    for shard in range(count):  # as the Snakemake run lays out work/ (the ingest job writes them)
        write_shard_manifest(manifest_file, shard, int(config["shard_size"]),
                             shard_dir(config["outdir"], shard) / "manifest.csv")
    for stage in stage_order():
        for shard in range(count):
            run_shard_stage(stage, config, manifest_file, shard, created_by)
    for shard in range(count):  # QC pictures (config qc) and the end of the shard's intermediates
        render_shard_qc(config, manifest_file, shard)
    return write_cohort_tables(config, manifest_file, count, created_by=created_by)

