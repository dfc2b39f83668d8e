"""The cohort manifest: reading, validation, path resolution and sharding."""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import jsonschema
import pandas as pd

from .config import load_schema

REQUIRED = ("scan_id", "subject_id", "path")
OPTIONAL = ("series", "site", "visit")
# Columns the pipeline writes into tables/scans.parquet beside the manifest's: an extra manifest
# column of one of these names would be overwritten or split in two (rows_x, rows_y).
RESERVED = ("status", "failed_stage", "error", "series_key", "series_uid", "series_description", "series_choice",
            "n_slices", "rows", "cols", "pixel_spacing_mm", "slice_spacing_mm", "fov", "n_vertebrae", "n_discs",
            "ingest_warnings", "gpu_model", "device_detect", "device_label", "device_grade")


class ManifestError(ValueError):
    pass


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read and validate a manifest; paths become absolute (relative ones resolve against its folder).

    Raises :class:`ManifestError` naming the row (1-based, header = row 1) and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest {path}: file does not exist")
    if not path.is_file():
        raise ManifestError(f"manifest {path}: not a regular file")
    if path.stat().st_size == 0:
        raise ManifestError(f"manifest {path}: file is empty (expected a header row: {', '.join(REQUIRED)})")
    sep = "\t" if path.suffix.lower() in {".tsv", ".tab"} else ","
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark, which would otherwise
        # glue itself to the first column's name
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, skipinitialspace=True,
                            encoding="utf-8-sig")
    except (OSError, ValueError) as error:  # parser, empty-data and decoding errors are ValueErrors
        detail = " ".join(str(error).split())
        raise ManifestError(f"manifest {path}: not a readable UTF-8 {'TSV' if sep == chr(9) else 'CSV'} file ({detail})") from None
    frame.columns = [c.strip() for c in frame.columns]
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise ManifestError(f"manifest {path}: missing required column(s) {', '.join(missing)}; columns are {', '.join(frame.columns)}")
    clashing = [c for c in frame.columns if c in RESERVED or c.startswith("seconds_")]
    if clashing:
        raise ManifestError(f"manifest {path}: column(s) {', '.join(clashing)} are names the pipeline writes in "
                            "tables/scans.parquet; rename them")
    frame = frame.apply(lambda col: col.str.strip())
    schema = load_schema("manifest")
    # One validator for all rows: jsonschema.validate() re-checks the schema on every call, which
    # made a 10,000-row manifest take a minute at every Snakefile parse.
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    columns = [c for c in frame.columns if c in REQUIRED + OPTIONAL]
    # jsonschema costs ~0.1 ms a row (10 s for 100,000 rows at every Snakefile parse): rows are
    # screened with the schema's own constraints, vectorised, and only the rows the screen cannot
    # pass go through jsonschema, which words the error.
    suspect = _suspect_rows(frame, columns, schema)
    checked = range(len(frame)) if suspect is None else suspect.nonzero()[0]
    for index in checked:
        values = [frame[c].iat[index] for c in columns]
        record = {k: (v if v != "" else None) for k, v in zip(columns, values)}
        record = {k: v for k, v in record.items() if v is not None or k not in REQUIRED}
        error = jsonschema.exceptions.best_match(validator.iter_errors(record))
        if error is not None:
            column = error.absolute_path[0] if error.absolute_path else ""
            raise ManifestError(f"manifest {path}: row {index + 2} ({column or 'row'}): {error.message}")
    if not len(frame):
        raise ManifestError(f"manifest {path}: no scans (only a header row)")
    duplicated = frame["scan_id"].duplicated(keep="first")
    if duplicated.any():
        first = int(duplicated.to_numpy().nonzero()[0][0])
        raise ManifestError(f"manifest {path}: row {first + 2}: duplicate scan_id '{frame['scan_id'].iloc[first]}'")
    # scan_ids name files: two that differ only in case are one file on macOS/Windows file systems
    folded = frame["scan_id"].str.lower()
    duplicated = folded.duplicated(keep="first")
    if duplicated.any():
        row = int(duplicated.to_numpy().nonzero()[0][0])
        other = int((folded == folded.iloc[row]).to_numpy().nonzero()[0][0])
        raise ManifestError(f"manifest {path}: row {row + 2}: scan_id '{frame['scan_id'].iloc[row]}' differs from "
                            f"'{frame['scan_id'].iloc[other]}' (row {other + 2}) only in case; they would share files")
    for column in OPTIONAL:
        if column not in frame.columns:
            frame[column] = ""
    frame["path"] = _resolve_paths(path.parent, frame["path"])
    return frame.reset_index(drop=True)


def _resolve_paths(base: Path, paths: pd.Series) -> list[str]:
    """Relative paths as ``(base / p).resolve()`` gives them, absolute ones as they are. Each
    folder is resolved once (resolving 100,000 paths one by one takes seconds of system calls); a
    last component that is a link (or ``..``) is resolved in full, as resolve() does."""
    folders: dict[str, str] = {}
    out = []
    for p in paths.tolist():
        if os.path.isabs(p):
            out.append(p)
            continue
        head, name = os.path.split(p)
        if name in ("", ".", ".."):
            out.append(str((base / p).resolve()))
            continue
        if head not in folders:
            folders[head] = str((base / head).resolve())
        target = os.path.join(folders[head], name)
        out.append(str(Path(target).resolve()) if os.path.islink(target) else target)
    return out


_SCREENED = {"type", "pattern", "minLength", "maxLength", "not", "description"}


def _suspect_rows(frame: pd.DataFrame, columns: list[str], schema: Mapping[str, Any]):
    """A boolean array, True for each row that may break ``schema`` (every row that does is
    True); None when the schema uses a keyword this screen does not implement (then every row is
    validated with jsonschema). Cells are text; a blank optional cell is null, a blank required one
    is missing."""
    import re

    import numpy as np

    if set(schema) - {"$schema", "title", "description", "type", "properties", "required"}:
        return None
    suspect = np.zeros(len(frame), dtype=bool)
    for column in columns:
        rule = schema.get("properties", {}).get(column, {})
        if set(rule) - _SCREENED or set(rule.get("not", {})) - {"enum"}:
            return None
        values = frame[column].astype(str)
        blank = (values == "").to_numpy()
        if column in schema.get("required", ()):
            suspect |= blank
        types = rule.get("type", [])
        types = {types} if isinstance(types, str) else set(types)
        if "string" not in types or not types <= {"string", "null"}:
            return None
        if "null" not in types and column not in schema.get("required", ()):
            suspect |= blank
        filled = ~blank
        lengths = values.str.len().to_numpy()
        if "minLength" in rule:
            suspect |= filled & (lengths < int(rule["minLength"]))
        if "maxLength" in rule:
            suspect |= filled & (lengths > int(rule["maxLength"]))
        if "pattern" in rule:  # jsonschema searches with Python's re, unanchored
            pattern = re.compile(rule["pattern"])
            suspect |= filled & ~np.array([pattern.search(v) is not None for v in values.tolist()], dtype=bool)
        if "enum" in rule.get("not", {}):
            suspect |= filled & values.isin([str(v) for v in rule["not"]["enum"]]).to_numpy()
    return suspect


def n_shards(n_scans: int, shard_size: int) -> int:
    return max(1, math.ceil(n_scans / shard_size))


def shard_rows(manifest: pd.DataFrame, shard: int, shard_size: int) -> pd.DataFrame:
    """Rows of one shard: contiguous blocks in manifest order, so shards are stable across runs."""
    return manifest.iloc[shard * shard_size:(shard + 1) * shard_size]


def shard_name(shard: int) -> str:
    return f"{shard:04d}"


def shard_keys(manifest: pd.DataFrame | None, shard_size: int, demo: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Shard name -> a fingerprint of that shard's rows (as :func:`read_manifest` returns them).

    The Snakefile gives it to each shard's first (``ingest``) job as a param, so Snakemake re-runs
    that job (and the shard's stages after it) only when the shard's own rows change: appending a
    wave of scans at the end of the manifest plans only the new (or last, unfilled) shard.
    ``manifest`` is None for the demo cohort, which does not exist yet when the workflow is
    planned: its rows follow from the ``demo`` settings, so they are the fingerprint."""
    if manifest is None:
        count = n_shards(int(demo["n_scans"]), shard_size)
        return {shard_name(k): _sha256(json.dumps({"demo": dict(demo), "shard": k, "shard_size": shard_size},
                                                  sort_keys=True)) for k in range(count)}
    # each row as one text: column name and cell, separated by control characters, so that no two
    # different shards give the same text
    text = pd.Series([""] * len(manifest), index=manifest.index, dtype=object)
    for column in manifest.columns:
        text = text + column + "\x1f" + manifest[column].astype(str) + "\x1e"
    keys = {}
    for k in range(n_shards(len(manifest), shard_size)):
        part = text.iloc[k * shard_size:(k + 1) * shard_size]
        keys[shard_name(k)] = _sha256("\x1d".join(part.tolist()))
    return keys


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def write_shard_manifest(manifest_file: str | Path, shard: int, shard_size: int, out: str | Path) -> Path:
    """The rows of one shard as their own CSV (paths already absolute): the per-shard input of the
    shard's jobs, so a row added or changed elsewhere in the manifest changes none of them."""
    from .provenance import atomic_write_bytes

    rows = shard_rows(read_manifest(manifest_file), shard, shard_size)
    atomic_write_bytes(out, rows.to_csv(index=False).encode("utf-8"))
    return Path(out)
