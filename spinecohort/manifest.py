"""The cohort manifest: reading, validation, path resolution and sharding."""
from __future__ import annotations

import math
from pathlib import Path

import jsonschema
import pandas as pd

from .config import load_schema

REQUIRED = ("scan_id", "subject_id", "path")
OPTIONAL = ("series", "site", "visit")
# Columns the pipeline writes into tables/scans.parquet beside the manifest's: an extra manifest
# column of one of these names would be overwritten or split in two (rows_x, rows_y).
RESERVED = ("status", "failed_stage", "error", "series_key", "series_uid", "series_description", "series_choice",
            "n_slices", "rows", "cols", "pixel_spacing_mm", "slice_spacing_mm", "fov", "n_vertebrae", "n_discs",
            "ingest_warnings")


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
    for index, values in enumerate(zip(*(frame[c] for c in columns))):
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
    frame["path"] = [str((path.parent / p).resolve()) if not Path(p).is_absolute() else p for p in frame["path"]]
    return frame.reset_index(drop=True)


def n_shards(n_scans: int, shard_size: int) -> int:
    return max(1, math.ceil(n_scans / shard_size))


def shard_rows(manifest: pd.DataFrame, shard: int, shard_size: int) -> pd.DataFrame:
    """Rows of one shard: contiguous blocks in manifest order, so shards are stable across runs."""
    return manifest.iloc[shard * shard_size:(shard + 1) * shard_size]
