"""What a stage sees and the files it works in: :class:`ScanContext`, the :class:`Stage` base, the
work paths (stored series, shard folders) and the status-file columns every shard job writes.

Nothing here imports :mod:`spinecohort.stages` (which subclasses :class:`Stage` and lists the
stages in order), so the stages can import this module without a cycle.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import pandas as pd

from .. import ingest as ingest_mod
from ..orientation import CanonicalView

log = logging.getLogger("spinecohort")

STATUS_COLUMNS = ["scan_id", "status", "error", "seconds"]
# A stage's status rows also say where its scans ran ("cpu" or "cuda"; "" for a stage without a
# model) and on which GPU (torch's device name; "" on the CPU).
DEVICE_COLUMNS = ["device", "gpu_model"]


@dataclass
class ScanContext:
    """What a stage sees of one scan."""

    scan_id: str
    row: Mapping[str, Any]
    workdir: Path
    previous: dict[str, pd.DataFrame] = field(default_factory=dict)  # stage name -> this scan's rows
    _series: ingest_mod.Series | None = None
    _canonical: CanonicalView | None = None

    @property
    def series_path(self) -> Path:
        return series_path(self.workdir, self.scan_id)

    @property
    def series(self) -> ingest_mod.Series:
        if self._series is None:
            self._series = scan_series(self.workdir, self.row)
        return self._series

    @property
    def canonical(self) -> CanonicalView:
        """The series in the networks' canonical view, made once for the scan: the stage's network
        reads its volume and the stage maps the results back to the stored grid with it."""
        if self._canonical is None:
            self._canonical = CanonicalView.of(self.series)
        return self._canonical

    def release(self) -> None:
        """Drop the scan's series and canonical view once the stage is done with the scan: the shard
        job keeps every scan's context to the end, and would otherwise hold every volume."""
        self._series = self._canonical = None


def series_path(workdir: Path, scan_id: str) -> Path:
    return Path(workdir) / "series" / f"{scan_id}.npz"


def scan_series(workdir: str | Path, row: Mapping[str, Any]) -> ingest_mod.Series:
    """A scan's ingested series: the stored intermediate, or, where it was removed (config
    ``keep_intermediates: false``), the scan read again, which gives the same series (ingestion is
    deterministic and the stored copy is lossless)."""
    path = series_path(Path(workdir), row["scan_id"])
    if path.exists():
        return ingest_mod.load_series(path)
    return ingest_mod.ingest(row["path"], row["scan_id"], row.get("series") or None)


def remove_intermediates(outdir: str | Path, scan_ids: list[str]) -> int:
    """Remove the given scans' stored series (work/series); returns the bytes freed. Disc volumes
    (work/ivv) stay: they are the grading and `train_grader` inputs, and compact."""
    freed = 0
    for scan_id in scan_ids:
        path = series_path(Path(outdir) / "work", scan_id)
        try:
            freed += path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            pass
    return freed


def shard_dir(outdir: str | Path, shard: int) -> Path:
    return Path(outdir) / "work" / "shards" / f"{shard:04d}"


class Stage:
    """A pipeline stage. Subclasses set ``name``/``after`` and implement :meth:`run_scan`."""

    name: str = ""
    after: str | None = None  # stage whose ok scans this one processes
    needs_rows_of: tuple[str, ...] = ()  # earlier stages whose rows a scan needs

    #: the torch device the stage's models run on ("cpu", "cuda"), set by model stages; None = no model
    device: str | None = None
    gpu_model: str = ""

    def __init__(self, config: Mapping[str, Any]):
        self.config = config  # only the keys the stage reads (config_keys.config_for)

    def models(self) -> dict[str, str]:
        """Model id -> sha256 of the weights this stage used (provenance)."""
        return {}

    def run_scan(self, scan: ScanContext) -> pd.DataFrame | None:
        raise NotImplementedError

    def resumed(self, rows: pd.DataFrame) -> None:
        """Called before the remaining scans of a resumed shard with the rows of the scans already
        done, for a stage whose output depends on what came earlier in the shard."""

    def run_batch(self, scans: list[ScanContext]) -> Iterator[tuple[pd.DataFrame | None | BaseException, float]]:
        """(rows or the error, seconds) per scan, yielded as each scan finishes (it is recorded at
        once, for resuming). Model stages may override this to batch inference."""
        for scan in scans:
            started = time.perf_counter()
            try:
                outcome: pd.DataFrame | None | BaseException = self.run_scan(scan)
            except Exception as error:  # noqa: BLE001 - one bad scan never stops the shard
                outcome = error
            yield outcome, time.perf_counter() - started


def _read_optional(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.exists() else None


def _format_error(stage: str, scan_id: str, error: BaseException) -> str:
    # one line of writable text: a non-UTF-8 file name in a message would fail the Parquet write
    text = str(error).encode("utf-8", "backslashreplace").decode("utf-8").strip()
    message = text.splitlines()[0] if text else type(error).__name__
    if message.startswith(f"scan {scan_id}"):
        return message
    return f"scan {scan_id}: {stage}: {type(error).__name__}: {message}"

