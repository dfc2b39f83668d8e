"""Ingestion: a manifest ``path`` (DICOM folder, ``.zip`` or NIfTI) -> one sagittal volume
(a single sagittal slice, DICOM or 2-D NIfTI, is a volume of one slice).

The volume is float32 ``(slices, rows, cols)``: slices ordered by increasing position along the
slice normal (never by file name or InstanceNumber), rows and cols as stored. ``affine`` maps
``(slice, row, col, 1)`` to DICOM patient coordinates (LPS, mm). Metadata holds no PHI: only an
allow-list of acquisition fields is copied.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import signal
import stat
import threading
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from .provenance import atomic_write_bytes

# A series counts as sagittal when its slice normal lies within this angle of patient left-right.
SAGITTAL_MAX_ANGLE_DEG = 30.0
# Slices closer than this along the normal are duplicates of one position.
DUPLICATE_POSITION_MM = 0.01
# A gap this many times the typical spacing means slices are missing.
MISSING_SLICE_GAP_FACTOR = 1.5

# Bounds on what one scan may make ingestion read, so that a hostile or broken export (a link to
# /dev/zero, a zip bomb, a 60000x60000 header) fails with a named reason instead of stalling or
# exhausting the shard. Generous for real spinal MRI: a whole enhanced multi-frame series is one file.
MAX_FILE_BYTES = 2 << 30        # one DICOM file, zip member or NIfTI file
MAX_SCAN_BYTES = 8 << 30        # every file of one scan together
MAX_ZIP_BYTES = 2 << 30         # a zip's members together, uncompressed: they are held in memory
MAX_FILES = 50_000              # files (or zip members) looked at for one scan
MAX_ZIP_RATIO = 100             # uncompressed / compressed size of a zip member; DICOM compresses < 20x
ZIP_RATIO_MIN_BYTES = 4 << 20   # tiny members may compress further without being a bomb
MAX_IMAGE_SIDE = 8192           # rows or cols of one image
MAX_SLICES = 4096
MAX_VOXELS = 1 << 28            # 1 GiB of float32
MAX_EXTENT_MM = 2000.0          # one side of the imaged box: a whole body; beyond, the spacing is wrong
FILE_SECONDS = 120.0            # reading (and decoding) one file
SCAN_SECONDS = 900.0            # reading one scan

# The only header fields that leave ingestion (no identifiers, no dates).
_SAFE_FIELDS = (
    "SeriesDescription", "Modality", "Manufacturer", "ManufacturerModelName",
    "MagneticFieldStrength", "EchoTime", "RepetitionTime", "InversionTime", "FlipAngle",
    "ScanningSequence", "SequenceVariant", "SliceThickness",
)


class IngestError(Exception):
    """A scan that cannot be ingested; the message names the scan, the file and the problem."""


def series_key(uid: str) -> str:
    """Non-identifying, stable key of a series: a hash of its SeriesInstanceUID, so a team holding
    the images can trace a row back to its series, while the UID itself (a DICOM identifier,
    replaced under PS3.15 Annex E) never leaves the pipeline unless config keep_series_uid opts in."""
    return hashlib.sha256(f"spinecohort-series:{uid}".encode()).hexdigest()[:16] if uid else ""


class _Overtime(BaseException):
    """Raised by the alarm inside a read that ran past its time bound. A BaseException, so that a
    reader's own ``except Exception`` cannot swallow it."""


class _Budget:
    """Time and byte bounds of one scan's ingestion."""

    def __init__(self, scan: str):
        self.scan = scan
        self.deadline = time.monotonic() + SCAN_SECONDS
        self.bytes = 0
        self.files = 0

    def count(self, label: str, size: int) -> None:
        """Count one file looked at (refused ones too: walking a huge tree is bounded as well)."""
        self.files += 1
        self.bytes += size
        if time.monotonic() > self.deadline:
            raise IngestError(f"scan {self.scan}: file {label}: reading the scan took over {SCAN_SECONDS:g} s")
        if self.files > MAX_FILES:
            raise IngestError(f"scan {self.scan}: file {label}: more than {MAX_FILES} files in one scan")
        if self.bytes > MAX_SCAN_BYTES:
            raise IngestError(f"scan {self.scan}: file {label}: scan holds more than {MAX_SCAN_BYTES >> 30} GiB")

    @contextmanager
    def reading(self, label: str) -> Iterator[None]:
        """Bound one read to FILE_SECONDS and what is left of SCAN_SECONDS."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise IngestError(f"scan {self.scan}: file {label}: reading the scan took over {SCAN_SECONDS:g} s")
        limit = min(FILE_SECONDS, left)
        # SIGALRM can interrupt a read stuck inside a library; it exists only in a main thread on
        # POSIX. Elsewhere the bytes bound still caps each read and the deadline is checked between reads.
        armed = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
        if armed:
            def on_alarm(signum, frame):  # noqa: ARG001
                raise _Overtime()

            previous = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            yield
        except _Overtime:
            raise IngestError(f"scan {self.scan}: file {label}: reading did not finish within {limit:g} s") from None
        finally:
            if armed:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)


@dataclass
class Series:
    volume: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def pixel_spacing_mm(self) -> tuple[float, float]:
        return tuple(self.meta["pixel_spacing_mm"])  # type: ignore[return-value]

    @property
    def slice_spacing_mm(self) -> float:
        return float(self.meta["slice_spacing_mm"])

    def to_patient(self, points: np.ndarray) -> np.ndarray:
        """``(n, 3)`` (slice, row, col) -> ``(n, 3)`` patient LPS mm."""
        points = np.atleast_2d(np.asarray(points, dtype=float))
        return points @ self.affine[:3, :3].T + self.affine[:3, 3]

    def to_index(self, patient_mm: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_patient`."""
        patient_mm = np.atleast_2d(np.asarray(patient_mm, dtype=float))
        return np.linalg.solve(self.affine[:3, :3], (patient_mm - self.affine[:3, 3]).T).T


# ----------------------------------------------------------------------------- file discovery
@dataclass
class _Source:
    """One DICOM file, on disk or a member of a zip."""

    label: str  # what error messages call it: a path relative to the scan, or zip!member
    path: Path | None = None
    data: bytes | None = None

    def is_dicom_file(self) -> bool:
        """Whether it starts as a DICOM file does (128-byte preamble, then DICM)."""
        if self.data is not None:
            return self.data[128:132] == b"DICM"
        with open(self.path, "rb") as handle:  # a regular file: _iter_sources checked
            return handle.read(132)[128:] == b"DICM"

    def read(self, stop_before_pixels: bool) -> pydicom.Dataset:
        handle: Any = io.BytesIO(self.data) if self.data is not None else str(self.path)
        try:
            return pydicom.dcmread(handle, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError:
            # Files written without the 128-byte preamble are still DICOM; junk is rejected
            # below by requiring the tags a slice needs.
            handle = io.BytesIO(self.data) if self.data is not None else str(self.path)
            return pydicom.dcmread(handle, stop_before_pixels=stop_before_pixels, force=True)


def _printable(name: str) -> str:
    """A file name as text that can be written anywhere: bytes that are not UTF-8 (which Python
    keeps as lone surrogates) are shown as escapes instead of failing the Parquet write."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _regular_size(path: Path) -> tuple[int | None, str]:
    """(size, "") of a regular file (links followed), else (None, why it is refused)."""
    try:
        info = os.stat(path)
    except OSError as error:
        return None, f"cannot be examined ({error.strerror or error})"
    if not stat.S_ISREG(info.st_mode):
        # a FIFO, a device such as /dev/zero or a socket: reading it may never end
        return None, "not a regular file"
    if info.st_size > MAX_FILE_BYTES:
        return None, f"{info.st_size} bytes, over the {MAX_FILE_BYTES >> 20} MiB bound per file"
    return info.st_size, ""


def _iter_sources(path: Path, budget: _Budget, refused: list[str]) -> Iterator[_Source]:
    """The scan's candidate files; anything refused is noted in ``refused`` as 'label: why'."""
    if path.is_dir():
        def unreadable(error: OSError) -> None:
            where = Path(error.filename).relative_to(path) if error.filename else path
            refused.append(f"{_printable(str(where))}: folder cannot be read ({error.strerror})")

        for root, dirs, files in os.walk(path, onerror=unreadable):
            dirs.sort()
            for name in sorted(files):
                full = Path(root) / name
                label = _printable(str(full.relative_to(path)))
                size, why = _regular_size(full)
                budget.count(label, size or 0)
                if size is None:
                    refused.append(f"{label}: {why}")
                    continue
                yield _Source(label=label, path=full)
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            # Members are read into memory, never extracted, so no member name can write anywhere.
            for info in sorted(archive.infolist(), key=lambda i: i.filename):
                if info.is_dir():
                    continue
                label = _printable(f"{path.name}!{info.filename}")
                if info.file_size > MAX_FILE_BYTES:
                    refused.append(f"{label}: declares {info.file_size} bytes, over the {MAX_FILE_BYTES >> 20} MiB bound per file")
                    continue
                if info.file_size > ZIP_RATIO_MIN_BYTES and info.file_size > MAX_ZIP_RATIO * max(info.compress_size, 1):
                    refused.append(f"{label}: compressed {info.file_size // max(info.compress_size, 1)}:1, over the {MAX_ZIP_RATIO}:1 bound (zip bomb?)")
                    continue
                budget.count(label, info.file_size)
                if budget.bytes > MAX_ZIP_BYTES:
                    raise IngestError(f"scan {budget.scan}: file {label}: zip members hold more than {MAX_ZIP_BYTES >> 30} GiB uncompressed")
                try:
                    with budget.reading(label), archive.open(info) as member:
                        # the declared size bounds the read even if the header lies
                        data = member.read(info.file_size + 1)
                except IngestError:
                    raise
                except Exception as error:  # noqa: BLE001 - encrypted, unsupported method, bad CRC ...
                    refused.append(f"{label}: member unreadable ({type(error).__name__}: {' '.join(str(error).split())})")
                    continue
                if len(data) > info.file_size:
                    refused.append(f"{label}: holds more than the {info.file_size} bytes it declares")
                    continue
                if data[:4] == b"PK\x03\x04":  # unpacking nested archives is how zip bombs multiply
                    refused.append(f"{label}: a zip inside the zip is not read; give the inner one as the path")
                    continue
                yield _Source(label=label, data=data)
    else:
        budget.count(path.name, path.stat().st_size)
        yield _Source(label=_printable(path.name), path=path)


# ----------------------------------------------------------------------------- geometry helpers
@dataclass
class _Frame:
    """One 2D image of a series: a single-frame file or one frame of an enhanced file."""

    source: _Source
    frame_index: int | None
    position: np.ndarray  # ImagePositionPatient
    row_cos: np.ndarray   # direction of increasing column index
    col_cos: np.ndarray   # direction of increasing row index
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    rows: int
    cols: int
    instance_uid: str
    acquisition_order: float
    slope: float = 1.0
    intercept: float = 0.0

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cos, self.col_cos)


def _float_list(value: Any, n: int, what: str) -> np.ndarray:
    array = np.asarray([float(v) for v in value], dtype=float)
    if array.shape != (n,) or not np.all(np.isfinite(array)):
        raise ValueError(f"{what} must hold {n} finite numbers")
    return array


def _spacing(value: Any) -> tuple[float, float]:
    spacing = _float_list(value, 2, "PixelSpacing")
    if not np.all(spacing > 0):
        raise ValueError(f"PixelSpacing {spacing.tolist()} must be positive")
    return (float(spacing[0]), float(spacing[1]))


def _orientation(value: Any) -> tuple[np.ndarray, np.ndarray]:
    cosines = _float_list(value, 6, "ImageOrientationPatient")
    # zero or parallel directions leave no slice normal to sort by
    if np.linalg.norm(np.cross(cosines[:3], cosines[3:])) < 0.5:
        raise ValueError(f"ImageOrientationPatient {cosines.tolist()} is not two perpendicular directions")
    return cosines[:3], cosines[3:]


def _matrix(ds: pydicom.Dataset) -> tuple[int, int]:
    rows, cols = int(ds.Rows), int(ds.Columns)
    if not (0 < rows <= MAX_IMAGE_SIDE and 0 < cols <= MAX_IMAGE_SIDE):
        raise ValueError(f"image size {rows}x{cols} outside 1..{MAX_IMAGE_SIDE} pixels per side")
    return rows, cols


def _frames_of(ds: pydicom.Dataset, source: _Source) -> list[_Frame]:
    uid = str(ds.get("SOPInstanceUID", source.label))
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames > MAX_SLICES:
        raise ValueError(f"NumberOfFrames {n_frames} over the bound of {MAX_SLICES}")
    if n_frames > 1 and "PerFrameFunctionalGroupsSequence" in ds:
        return _enhanced_frames(ds, source, uid)
    missing = [t for t in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns") if t not in ds]
    if missing:
        raise ValueError(f"missing tag(s) {', '.join(missing)}")
    row_cos, col_cos = _orientation(ds.ImageOrientationPatient)
    rows, cols = _matrix(ds)
    return [_Frame(
        source=source, frame_index=None,
        position=_float_list(ds.ImagePositionPatient, 3, "ImagePositionPatient"),
        row_cos=row_cos, col_cos=col_cos,
        pixel_spacing=_spacing(ds.PixelSpacing),
        rows=rows, cols=cols, instance_uid=uid,
        acquisition_order=float(ds.get("InstanceNumber", 0) or 0),
        slope=float(ds.get("RescaleSlope", 1.0) or 1.0), intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
    )]


def _enhanced_frames(ds: pydicom.Dataset, source: _Source, uid: str) -> list[_Frame]:
    """Frames of an enhanced multi-frame MR object (functional groups, PS3.3 C.7.6.16)."""
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else pydicom.Dataset()

    def group(item: pydicom.Dataset, name: str) -> pydicom.Dataset | None:
        for container in (item, shared):
            if name in container and len(container[name].value):
                return container[name].value[0]
        return None

    frames = []
    rows, cols = _matrix(ds)
    for index, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        position = group(item, "PlanePositionSequence")
        orientation = group(item, "PlaneOrientationSequence")
        measures = group(item, "PixelMeasuresSequence")
        if position is None or orientation is None or measures is None:
            raise ValueError(f"frame {index + 1} lacks plane position, orientation or pixel measures")
        transform = group(item, "PixelValueTransformationSequence")
        row_cos, col_cos = _orientation(orientation.ImageOrientationPatient)
        frames.append(_Frame(
            source=source, frame_index=index,
            position=_float_list(position.ImagePositionPatient, 3, "ImagePositionPatient"),
            row_cos=row_cos, col_cos=col_cos,
            pixel_spacing=_spacing(measures.PixelSpacing),
            rows=rows, cols=cols, instance_uid=f"{uid}#{index}",
            acquisition_order=float(index),
            slope=float(getattr(transform, "RescaleSlope", 1.0) or 1.0) if transform else float(ds.get("RescaleSlope", 1.0) or 1.0),
            intercept=float(getattr(transform, "RescaleIntercept", 0.0) or 0.0) if transform else float(ds.get("RescaleIntercept", 0.0) or 0.0),
        ))
    return frames


@dataclass
class _SeriesGroup:
    uid: str
    header: pydicom.Dataset
    frames: list[_Frame] = field(default_factory=list)

    @property
    def description(self) -> str:
        # one line of reasonable length: it lands in error messages and the scans table
        text = " ".join(str(self.header.get("SeriesDescription", "") or "").split())
        return text if len(text) <= 200 else text[:200] + "..."

    @property
    def key(self) -> str:
        return series_key(self.uid)

    @property
    def modality(self) -> str:
        return str(self.header.get("Modality", "") or "").strip().upper()

    def normal(self) -> np.ndarray:
        return self.frames[0].normal

    def is_sagittal(self) -> bool:
        normal = self.normal()
        cosine = abs(normal[0]) / (np.linalg.norm(normal) or 1.0)
        return cosine >= math.cos(math.radians(SAGITTAL_MAX_ANGLE_DEG))


# ----------------------------------------------------------------------------- series choice
def _t2_score(group: _SeriesGroup) -> tuple[int, str]:
    """How T2-like a series is, from its description, then EchoTime/RepetitionTime."""
    text = group.description.upper().replace(" ", "")
    te, tr = _number(group.header, "EchoTime"), _number(group.header, "RepetitionTime")
    if "T2" in text and "STIR" not in text and "T2*" not in text:
        return 3, f"SeriesDescription '{group.description}' names T2"
    if te >= 60 and tr >= 1500 and "STIR" not in text and "TIRM" not in text:
        return 2, f"EchoTime {te:g} ms / RepetitionTime {tr:g} ms are T2-weighted"
    if "T1" in text or (0 < te < 30 and 0 < tr < 1000):
        return 1, "T1-weighted"
    return 0, "contrast not recognised"


def _number(header: pydicom.Dataset, key: str) -> float:
    try:
        value = float(header.get(key, 0) or 0)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) else 0.0


# Modalities taken as MR: secondary-capture exports ("OT") and files without the tag are graded
# with a warning; any other modality (CT, PT, ...) is never graded as MR.
_MR_LIKE = ("MR", "OT", "")


def _choose_series(groups: list[_SeriesGroup], selector: str | None, scan: str, path: Path) -> tuple[_SeriesGroup, str]:
    other = [g for g in groups if g.modality not in _MR_LIKE]
    if selector:
        wanted = selector.strip()
        chosen = ([g for g in groups if wanted in (g.uid, g.key)]
                  or [g for g in groups if wanted.lower() in g.description.lower()])
        if not chosen:
            # series named by key and description: error messages land in the tables
            known = "; ".join(f"{g.key} '{g.description}'" for g in groups)
            raise IngestError(f"scan {scan}: no series matches selector '{wanted}' (series found: {known})")
        if chosen[0].modality not in _MR_LIKE:
            raise IngestError(f"scan {scan}: file {path}: series '{chosen[0].description}' is Modality {chosen[0].modality}, not MR: the models grade MR only")
        if len(chosen) > 1:
            chosen.sort(key=lambda g: (-len(g.frames), g.uid))
            return chosen[0], f"manifest series '{wanted}' matched {len(chosen)} series; took the one with most slices"
        return chosen[0], f"manifest series '{wanted}'"
    if other and len(other) == len(groups):
        found = ", ".join(sorted({g.modality for g in other}))
        raise IngestError(f"scan {scan}: file {path}: no MR series (Modality {found}): the models grade MR only")
    groups = [g for g in groups if g.modality in _MR_LIKE]
    sagittal = [g for g in groups if g.is_sagittal()]
    if not sagittal:
        described = "; ".join(f"'{g.description}' normal {np.round(g.normal(), 2).tolist()}" for g in groups)
        raise IngestError(f"scan {scan}: no sagittal series (slice normal within {SAGITTAL_MAX_ANGLE_DEG:g} deg of left-right): {described}")
    if len(sagittal) == 1:
        return sagittal[0], "only sagittal series"
    scored = sorted(sagittal, key=lambda g: (-_t2_score(g)[0], -len(g.frames), g.uid))
    best = scored[0]
    return best, f"{len(sagittal)} sagittal series; chose '{best.description}': {_t2_score(best)[1]}"


# ----------------------------------------------------------------------------- public entry
def ingest(path: str | os.PathLike, scan_id: str, series: str | None = None) -> Series:
    """Read one scan. Raises :class:`IngestError` with a one-line reason on any failure."""
    path = Path(path)
    budget = _Budget(scan_id)
    try:
        if not path.exists():
            raise IngestError(f"scan {scan_id}: file {path}: does not exist")
        if not path.is_dir():
            size, why = _regular_size(path)
            if size is None:
                raise IngestError(f"scan {scan_id}: file {path}: {why}")
        name = path.name.lower()
        if path.is_file() and (name.endswith(".nii") or name.endswith(".nii.gz")):
            return _ingest_nifti(path, scan_id, budget)
        return _ingest_dicom(path, scan_id, series, budget)
    except IngestError:
        raise
    except _Overtime:  # the alarm fired between a read's end and its disarming
        raise IngestError(f"scan {scan_id}: file {path}: reading did not finish within {FILE_SECONDS:g} s") from None
    except MemoryError as error:
        raise IngestError(f"scan {scan_id}: file {path}: too large to hold in memory (MemoryError)") from error
    except Exception as error:  # noqa: BLE001 - whatever a damaged file raises, the reason names it
        detail = " ".join(str(error).split()) or "no detail"
        raise IngestError(f"scan {scan_id}: file {path}: {type(error).__name__}: {detail}") from error


def _is_image_storage(ds: pydicom.Dataset) -> bool:
    """Whether the SOP class (file meta included) is an image (MR Image Storage, ...), not a
    DICOMDIR, structured report or other non-image object that may sit beside a series."""
    meta = getattr(ds, "file_meta", None)
    sop = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    return "Image Storage" in str(getattr(sop, "name", "") or "")


def _ingest_dicom(path: Path, scan_id: str, selector: str | None, budget: _Budget) -> Series:
    groups: dict[str, _SeriesGroup] = {}
    skipped: list[str] = []
    broken: list[str] = []
    refused: list[str] = []
    damaged: list[str] = []
    for source in _iter_sources(path, budget, refused):
        try:
            with budget.reading(source.label):
                ds = source.read(stop_before_pixels=True)
        except IngestError:
            raise
        except PermissionError as error:
            refused.append(f"{source.label}: cannot be read ({error.strerror})")
            continue
        except Exception as error:  # noqa: BLE001 - anything unreadable is junk beside the series
            # a damaged DICOM (truncated header) is named; other junk is only counted
            if source.is_dicom_file():
                damaged.append(f"{source.label}: damaged DICOM ({' '.join(str(error).split()) or type(error).__name__})")
            else:
                skipped.append(source.label)
            continue
        if "SeriesInstanceUID" not in ds or "Rows" not in ds:
            if _is_image_storage(ds):  # an image whose header was cut short
                damaged.append(f"{source.label}: damaged DICOM (image header ends before SeriesInstanceUID or Rows)")
            else:
                skipped.append(source.label)
            continue
        try:
            frames = _frames_of(ds, source)
        except Exception as error:  # noqa: BLE001 - damaged headers raise many types
            broken.append(f"{source.label}: {' '.join(str(error).split()) or type(error).__name__}")
            continue
        uid = str(ds.SeriesInstanceUID)
        group = groups.setdefault(uid, _SeriesGroup(uid=uid, header=ds))
        group.frames.extend(frames)
    if not groups:
        problems = damaged + broken + refused
        detail = f"; {problems[0]}" if problems else ""
        raise IngestError(f"scan {scan_id}: file {path}: no readable DICOM image found ({len(skipped) + len(refused) + len(damaged)} other file(s)){detail}")
    chosen, reason = _choose_series(sorted(groups.values(), key=lambda g: g.uid), selector, scan_id, path)
    warnings = [f"ignored {len(skipped)} non-DICOM or non-image file(s)"] if skipped else []
    if refused:
        warnings.append(f"refused {len(refused)} file(s), first: {refused[0]}")
    if damaged:
        warnings.append(f"{len(damaged)} damaged DICOM file(s) ignored, first: {damaged[0]}")
    if broken:
        warnings.append(f"{len(broken)} file(s) with unusable geometry ignored, first: {broken[0]}")
    if chosen.modality != "MR":
        warnings.append(f"Modality {chosen.modality or 'missing'}, not MR; graded as MR")
    frames, sort_warnings = _sort_and_check(chosen, scan_id)
    if len(frames) > MAX_SLICES:
        raise IngestError(f"scan {scan_id}: file {frames[0].source.label}: {len(frames)} slices, over the bound of {MAX_SLICES}")
    _check_size(scan_id, frames[0].source.label, (len(frames), frames[0].rows, frames[0].cols))
    affine = _affine(frames, _single_slice_mm(chosen.header))
    first = frames[0]
    _check_extent(scan_id, first.source.label, (len(frames), first.rows, first.cols),
                  np.array([np.linalg.norm(affine[:3, 0]), *first.pixel_spacing]))
    volume = _read_pixels(frames, scan_id, budget)
    warnings += _finite(volume)
    meta: dict[str, Any] = {
        # the UID stays in memory (a selector may name it); save_series never writes it
        "series_uid": chosen.uid,
        "series_key": chosen.key,
        "series_description": chosen.description,
        "series_choice": reason,
        "source_format": "dicom",
        "n_slices": int(volume.shape[0]),
        "rows": int(volume.shape[1]),
        "cols": int(volume.shape[2]),
        "pixel_spacing_mm": [float(first.pixel_spacing[0]), float(first.pixel_spacing[1])],
        "slice_spacing_mm": float(np.linalg.norm(affine[:3, 0])),
        "warnings": warnings + sort_warnings,
    }
    for key in _SAFE_FIELDS:
        value = chosen.header.get(key)
        if value not in (None, ""):
            meta.setdefault(_snake(key), _plain(value))  # series_description is set above, cleaned
    return Series(volume=volume, affine=affine, meta=meta)


def _check_size(scan: str, label: str, shape: tuple[int, ...]) -> None:
    """Refuse, by name, a volume too large to allocate (rather than a bare MemoryError)."""
    n_voxels = math.prod(int(n) for n in shape)
    if n_voxels > MAX_VOXELS:
        raise IngestError(f"scan {scan}: file {label}: volume {'x'.join(map(str, shape))} has {n_voxels} voxels, over the bound of {MAX_VOXELS}")


def _check_extent(scan: str, label: str, shape: tuple[int, ...], spacing: np.ndarray) -> None:
    """Refuse a spacing that makes the volume kilometres wide: the models resample to a mm grid,
    which would try to allocate terabytes."""
    extent = np.asarray(shape, dtype=float) * np.asarray(spacing, dtype=float)
    if not np.all(extent <= MAX_EXTENT_MM):
        sizes = " x ".join(f"{e:.4g}" for e in extent)
        raise IngestError(f"scan {scan}: file {label}: imaged box {sizes} mm is over {MAX_EXTENT_MM:g} mm a side "
                          f"(spacing {np.round(spacing, 4).tolist()} mm is wrong)")


def _finite(volume: np.ndarray) -> list[str]:
    """Set NaN/inf voxels (float pixel data, overflowing rescale) to 0, in place; a warning says how many."""
    bad = ~np.isfinite(volume)
    n_bad = int(bad.sum())
    if not n_bad:
        return []
    volume[bad] = 0.0
    return [f"{n_bad} non-finite voxel value(s) set to 0"]


def _sort_and_check(group: _SeriesGroup, scan: str) -> tuple[list[_Frame], list[str]]:
    frames = group.frames
    ref = frames[0]
    normal = ref.normal / np.linalg.norm(ref.normal)
    for frame in frames[1:]:
        if (frame.rows, frame.cols) != (ref.rows, ref.cols):
            raise IngestError(f"scan {scan}: file {frame.source.label}: {frame.rows}x{frame.cols} pixels, series has {ref.rows}x{ref.cols}")
        if not np.allclose(frame.pixel_spacing, ref.pixel_spacing, atol=1e-3):
            raise IngestError(f"scan {scan}: file {frame.source.label}: pixel spacing {frame.pixel_spacing} differs from {ref.pixel_spacing}")
        if not (np.allclose(frame.row_cos, ref.row_cos, atol=1e-3) and np.allclose(frame.col_cos, ref.col_cos, atol=1e-3)):
            raise IngestError(f"scan {scan}: file {frame.source.label}: orientation differs from the rest of the series")
    warnings: list[str] = []
    unique: dict[str, _Frame] = {}
    for frame in frames:
        unique.setdefault(frame.instance_uid, frame)
    if len(unique) < len(frames):
        warnings.append(f"{len(frames) - len(unique)} duplicate file(s) of one instance dropped")
    # Position along the normal decides the order; InstanceNumber only breaks exact ties.
    ordered = sorted(unique.values(), key=lambda f: (float(f.position @ normal), f.acquisition_order, f.instance_uid))
    kept = [ordered[0]]
    for frame in ordered[1:]:
        if float((frame.position - kept[-1].position) @ normal) < DUPLICATE_POSITION_MM:
            warnings.append(f"two images at one position ({frame.source.label}); kept the first")
            continue
        kept.append(frame)
    if len(kept) < 2:
        # A single sagittal slice (2-D export, key image) is a 1-slice series, processed as such.
        return kept, warnings
    steps = np.diff([float(f.position @ normal) for f in kept])
    typical = float(np.median(steps))
    gaps = np.flatnonzero(steps > MISSING_SLICE_GAP_FACTOR * typical)
    for gap in gaps:
        n_missing = int(round(steps[gap] / typical)) - 1
        warnings.append(f"{n_missing} slice(s) missing after slice {gap} ({kept[gap].source.label}); spacing {steps[gap]:.2f} mm vs {typical:.2f} mm")
    return kept, warnings


def _single_slice_mm(header: pydicom.Dataset) -> float:
    """Nominal slice step of a one-slice series: SpacingBetweenSlices, else SliceThickness, else 1."""
    for key in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            value = float(header.get(key) or 0)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value) and value > 0:
            return value
    return 1.0


def _read_pixels(frames: list[_Frame], scan: str, budget: _Budget) -> np.ndarray:
    volume = np.empty((len(frames), frames[0].rows, frames[0].cols), dtype=np.float32)
    cache: dict[str, np.ndarray] = {}
    for index, frame in enumerate(frames):
        try:
            with budget.reading(frame.source.label):
                if frame.frame_index is None:
                    pixels = frame.source.read(stop_before_pixels=False).pixel_array
                else:
                    key = frame.source.label
                    if key not in cache:
                        cache[key] = frame.source.read(stop_before_pixels=False).pixel_array
                    pixels = cache[key][frame.frame_index]
        except IngestError:
            raise
        except Exception as error:  # noqa: BLE001 - decoder errors come in many types
            detail = " ".join(str(error).split())
            raise IngestError(f"scan {scan}: file {frame.source.label}: pixel data unreadable ({type(error).__name__}: {detail})") from error
        if pixels.shape != volume.shape[1:]:
            raise IngestError(f"scan {scan}: file {frame.source.label}: pixel array {pixels.shape} does not match {volume.shape[1:]} (colour or truncated image)")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes inf, zeroed by _finite
            volume[index] = pixels.astype(np.float32) * frame.slope + frame.intercept
    return volume


def _affine(frames: list[_Frame], single_slice_mm: float = 1.0) -> np.ndarray:
    """``single_slice_mm``: the step along the normal when there is one slice (no neighbour to
    measure it from; the slice thickness, else 1 mm): it only scales the slice axis of a grid
    with one slice, so it never places anything."""
    first, last = frames[0], frames[-1]
    n = len(frames)
    normal = first.normal / np.linalg.norm(first.normal)
    if n == 1:
        slice_step = normal * single_slice_mm
    else:
        slice_step = (last.position - first.position) / (n - 1)
    # Keep only the component along the normal: a sheared stack is treated as its nominal grid.
    slice_step = normal * float(slice_step @ normal)
    affine = np.eye(4)
    affine[:3, 0] = slice_step
    affine[:3, 1] = first.col_cos * first.pixel_spacing[0]
    affine[:3, 2] = first.row_cos * first.pixel_spacing[1]
    affine[:3, 3] = first.position
    return affine


def _ingest_nifti(path: Path, scan_id: str, budget: _Budget) -> Series:
    import nibabel as nib

    try:
        with budget.reading(path.name):
            image = nib.load(str(path))
            # the header's dimensions decide what reading the data would allocate
            _check_size(scan_id, str(path), tuple(int(n) for n in image.shape))
            data = np.asarray(image.dataobj, dtype=np.float32)
    except IngestError:
        raise
    except Exception as error:  # noqa: BLE001
        detail = " ".join(str(error).split()) or type(error).__name__
        raise IngestError(f"scan {scan_id}: file {path}: not a readable NIfTI image ({detail})") from error
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:  # a 2-D slice: its affine's third column is the slice normal
        data = data[..., None]
    if data.ndim != 3:
        raise IngestError(f"scan {scan_id}: file {path}: NIfTI image has {data.ndim} dimensions, expected 2 or 3")
    if not all(data.shape):
        raise IngestError(f"scan {scan_id}: file {path}: NIfTI image of shape {data.shape} holds no voxels")
    # NIfTI is RAS; DICOM patient space is LPS.
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
    # An all-zero or NaN affine would give spacing 0 or NaN, which every later stage divides by.
    with np.errstate(all="ignore"):
        spacings = np.linalg.norm(affine[:3, :3], axis=0)
        degenerate = not (np.all(np.isfinite(affine)) and np.all(spacings > 1e-6)
                          and abs(np.linalg.det(affine[:3, :3] / spacings)) > 1e-3)
    if degenerate:
        raise IngestError(f"scan {scan_id}: file {path}: NIfTI affine (sform/qform) is not a valid voxel-to-mm mapping "
                          f"(voxel sizes {np.round(spacings, 4).tolist()} mm)")
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    # Slice axis: closest to left-right; row axis: closest to superior-inferior; col: the other.
    # A single slice's one-voxel axis is its slice axis whatever the affine says.
    singleton = [a for a in range(3) if data.shape[a] == 1]
    slice_axis = singleton[0] if len(singleton) == 1 else int(np.argmax(np.abs(directions[0])))
    rest = [a for a in range(3) if a != slice_axis]
    row_axis = max(rest, key=lambda a: abs(directions[2, a]))
    col_axis = next(a for a in rest if a != row_axis)
    order = [slice_axis, row_axis, col_axis]
    volume = np.transpose(data, order)
    index_affine = np.eye(4)
    index_affine[:3, :3] = affine[:3, order]
    index_affine[:3, 3] = affine[:3, 3]
    # NIfTI has no "as stored" display convention: flip so slices run along +x (left), rows run
    # toward the feet and cols toward the back, as a sagittal DICOM series is usually stored.
    wanted_sign = [(0, +1), (2, -1), (1, +1)]  # (patient axis, sign) for slice, row, col
    for axis, (patient_axis, sign) in enumerate(wanted_sign):
        if np.sign(index_affine[patient_axis, axis]) != sign:
            volume = np.flip(volume, axis=axis)
            extent = volume.shape[axis] - 1
            index_affine[:3, 3] = index_affine[:3, 3] + index_affine[:3, axis] * extent
            index_affine[:3, axis] = -index_affine[:3, axis]
    spacing = np.linalg.norm(index_affine[:3, :3], axis=0)
    _check_extent(scan_id, str(path), volume.shape, spacing)
    volume = np.ascontiguousarray(volume, dtype=np.float32)
    warnings = _finite(volume)
    meta = {
        "series_uid": "",
        "series_key": "",
        "series_description": "",
        "series_choice": "NIfTI file",
        "source_format": "nifti",
        "n_slices": int(volume.shape[0]),
        "rows": int(volume.shape[1]),
        "cols": int(volume.shape[2]),
        "pixel_spacing_mm": [float(spacing[1]), float(spacing[2])],
        "slice_spacing_mm": float(spacing[0]),
        "warnings": warnings,
    }
    return Series(volume=volume, affine=index_affine, meta=meta)


def _snake(name: str) -> str:
    out = []
    for i, char in enumerate(name):
        if char.isupper() and i and (not name[i - 1].isupper() or (i + 1 < len(name) and name[i + 1].islower())):
            out.append("_")
        out.append(char.lower())
    return "".join(out)


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


# ----------------------------------------------------------------------------- persistence
def compact_volume(volume: np.ndarray) -> np.ndarray:
    """The smallest integer type that holds every voxel exactly (DICOM pixel data is integer; the
    rescaled values usually are too), else the volume as it is: stored losslessly."""
    if volume.size and np.issubdtype(volume.dtype, np.floating):
        low, high = float(volume.min()), float(volume.max())
        for dtype in (np.uint8, np.int8, np.uint16, np.int16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= low and high <= info.max:
                candidate = volume.astype(dtype)
                if np.array_equal(candidate, volume):
                    return candidate
                break
    return volume


def save_series(series: Series, path: str | os.PathLike) -> None:
    """Store an ingested series for the next stage (atomic; no pickle): the volume in its compact
    integer type (:func:`compact_volume`) and compressed; :func:`load_series` gives back the same
    volume, in its own dtype (float32 for an ingested scan)."""
    buffer = io.BytesIO()
    meta = {k: v for k, v in series.meta.items() if k != "series_uid"}  # a DICOM identifier: kept out of files
    np.savez_compressed(buffer, volume=compact_volume(series.volume), dtype=np.array(series.volume.dtype.str),
                        affine=series.affine, meta=np.array(json.dumps(meta)))
    atomic_write_bytes(path, buffer.getvalue())


def load_series(path: str | os.PathLike) -> Series:
    with np.load(path, allow_pickle=False) as data:
        volume = data["volume"]
        if "dtype" in data:  # stored compactly (save_series): back to the series' own type
            volume = volume.astype(np.dtype(str(data["dtype"])), copy=False)
        return Series(volume=volume, affine=data["affine"], meta=json.loads(str(data["meta"])))
