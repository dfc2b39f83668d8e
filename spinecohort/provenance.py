"""Provenance attached to every output, and atomic Parquet writing.

Tables carry file-level metadata (contract): ``pipeline_version``, ``config_sha256``,
``models`` (id and sha256 of each weight file) and ``created_by``.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .config_keys import EXECUTION_KEYS, TRAINING_KEYS


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def config_sha256(config: Mapping[str, Any]) -> str:
    """Hash of the scientific config as canonical JSON (key order and formatting do not matter)."""
    science = {k: v for k, v in config.items() if k not in EXECUTION_KEYS + TRAINING_KEYS}
    canonical = json.dumps(science, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def make_provenance(
    config: Mapping[str, Any] | None = None,
    models: Mapping[str, str] | None = None,
    created_by: str | None = None,
) -> dict[str, str]:
    """Metadata for one output. ``models`` maps model id to the sha256 of its weight file."""
    return {
        "pipeline_version": __version__,
        "config_sha256": config_sha256(config or {}),
        "models": json.dumps(dict(sorted((models or {}).items()))),
        "created_by": created_by or " ".join(["spinecohort", *sys.argv[1:]]),
    }


def current_umask() -> int:
    """The process umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file whose content becomes ``path`` when the block ends without an error: written
    to a temporary file beside it and renamed, so a killed job never leaves a partial file.
    (Writers that stream, such as ``torch.save`` of a large checkpoint, need not hold the whole
    file in memory as :func:`atomic_write_bytes` does.)

    The file gets the mode ``open()`` would give it (0666 less the umask): mkstemp creates 0600,
    which would hide results from colleagues sharing a project folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_output`)."""
    with atomic_output(path) as handle:
        handle.write(data)


def typed_frame(df: pd.DataFrame, types: Mapping[str, pa.DataType]) -> tuple[pd.DataFrame, pa.Schema]:
    """``df`` with the given Arrow type per column, and the schema to write it with.

    Integer columns become pandas' nullable ``Int64`` (a blank count of a failed scan stays an
    integer column rather than turning it into doubles); a column not in ``types`` keeps the type
    Arrow infers, except that an all-blank one is written as string rather than Arrow's ``null``
    type, so tables written with and without failures read back as one dataset."""
    df = df.copy()
    fields = []
    for column in df.columns:
        wanted = types.get(column)
        if wanted is None:
            wanted = pa.Table.from_pandas(df[[column]], preserve_index=False).schema.field(column).type
            if pa.types.is_null(wanted) or pa.types.is_large_string(wanted):
                wanted = pa.string()  # pandas' str dtype infers large_string: one text type for all
        if pa.types.is_integer(wanted):
            df[column] = pd.to_numeric(df[column]).astype("Int64")
        elif pa.types.is_floating(wanted):
            df[column] = pd.to_numeric(df[column]).astype("float64")
        elif pa.types.is_string(wanted):
            df[column] = pd.Series([None if _blank(v) else str(v) for v in df[column]], index=df.index, dtype=object)
        fields.append(pa.field(str(column), wanted))
    return df, pa.schema(fields)


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value) or value is pd.NA


def write_table(
    df: pd.DataFrame,
    path: str | os.PathLike,
    provenance: Mapping[str, str],
    schema: pa.Schema | None = None,
    types: Mapping[str, pa.DataType] | None = None,
) -> None:
    """Write ``df`` as Parquet with provenance in the file metadata, atomically. ``types`` fixes
    the Arrow type of the columns it names (:func:`typed_frame`)."""
    if types is not None:
        df, schema = typed_frame(df, types)
    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    metadata = dict(table.schema.metadata or {})
    metadata.update({k.encode(): str(v).encode() for k, v in provenance.items()})
    table = table.replace_schema_metadata(metadata)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def read_provenance(path: str | os.PathLike) -> dict[str, str]:
    """The provenance keys of a Parquet file written by :func:`write_table`."""
    meta = pq.read_schema(path).metadata or {}
    keys = ("pipeline_version", "config_sha256", "models", "created_by")
    return {k: meta[k.encode()].decode() for k in keys if k.encode() in meta}
