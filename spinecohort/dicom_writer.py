"""Write a volume as a sagittal MR DICOM series with realistic headers.

Used for the synthetic demo cohort and by tests that build their own DICOMs. UIDs come from a
seeded generator so a cohort is reproducible; file names are random and carry no order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, PYDICOM_IMPLEMENTATION_UID, generate_uid

# Standard sagittal orientation: columns run anterior -> posterior (+y), rows superior -> inferior (-z).
SAGITTAL_ORIENTATION = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


@dataclass
class SeriesHeader:
    """What a writer needs beyond the pixels. Identifiers are synthetic, never a real patient's."""

    pixel_spacing_mm: tuple[float, float]
    slice_spacing_mm: float
    slice_thickness_mm: float | None = None
    orientation: tuple[float, ...] = SAGITTAL_ORIENTATION
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    series_description: str = "SAG T2"
    echo_time_ms: float | None = None
    repetition_time_ms: float | None = None
    inversion_time_ms: float | None = None
    patient_name: str = "Synthetic^Phantom"
    patient_id: str = "SYNTHETIC"
    series_number: int = 1
    study_uid: str | None = None
    field_strength_t: float = 1.5


def uid_from(rng: np.random.Generator) -> str:
    return generate_uid(entropy_srcs=[str(int(v)) for v in rng.integers(0, 2**62, size=4)])


def build_dataset(pixels: np.ndarray, header: SeriesHeader, *, series_uid: str, study_uid: str,
                  frame_uid: str, sop_uid: str, slice_index: int, instance_number: int,
                  rescale: tuple[float, float] | None = None) -> FileDataset:
    """One slice as a DICOM dataset. ``pixels`` are stored values (uint16 or int16)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.Modality = "MR"
    ds.Manufacturer = "spinecohort-synthetic"
    ds.PatientName = header.patient_name
    ds.PatientID = header.patient_id
    ds.PatientBirthDate = "19700101"
    ds.AccessionNumber = "SYN0000"
    ds.StudyDate = "20260101"
    ds.SeriesDescription = header.series_description
    ds.SeriesNumber = header.series_number
    ds.InstanceNumber = instance_number
    ds.MagneticFieldStrength = header.field_strength_t
    ds.ScanningSequence = "SE"
    if header.echo_time_ms is not None:
        ds.EchoTime = header.echo_time_ms
    if header.repetition_time_ms is not None:
        ds.RepetitionTime = header.repetition_time_ms
    if header.inversion_time_ms is not None:
        ds.InversionTime = header.inversion_time_ms
    orientation = np.asarray(header.orientation, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    position = np.asarray(header.origin_mm, dtype=float) + normal * header.slice_spacing_mm * slice_index
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.SliceLocation = f"{float(position @ normal):.4f}"
    ds.PixelSpacing = [f"{header.pixel_spacing_mm[0]:.6f}", f"{header.pixel_spacing_mm[1]:.6f}"]
    ds.SliceThickness = f"{(header.slice_thickness_mm or header.slice_spacing_mm):.4f}"
    ds.SpacingBetweenSlices = f"{header.slice_spacing_mm:.4f}"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    if rescale is not None:
        ds.RescaleSlope = f"{rescale[0]:.8g}"
        ds.RescaleIntercept = f"{rescale[1]:.8g}"
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def to_stored(volume: np.ndarray) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Float volume -> uint16 stored values, with a rescale when the values are not integers."""
    volume = np.asarray(volume, dtype=np.float64)
    rounded = np.round(volume)
    if np.allclose(volume, rounded) and volume.min() >= 0 and volume.max() <= 65535:
        return rounded.astype(np.uint16), None
    low, high = float(volume.min()), float(volume.max())
    slope = (high - low) / 65535.0 or 1.0
    return np.round((volume - low) / slope).astype(np.uint16), (slope, low)


def write_series(volume: np.ndarray, folder: str | os.PathLike, header: SeriesHeader,
                 rng: np.random.Generator, *, shuffle_names: bool = True) -> list[Path]:
    """Write ``volume`` (slices, rows, cols) as one DICOM file per slice into ``folder``.

    Slice ``k`` lies at ``origin + k * slice_spacing * normal``. Returns the written paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stored, rescale = to_stored(volume)
    series_uid, frame_uid = uid_from(rng), uid_from(rng)
    study_uid = header.study_uid or uid_from(rng)
    order = rng.permutation(len(stored)) if shuffle_names else np.arange(len(stored))
    paths = []
    for slice_index in range(len(stored)):
        ds = build_dataset(stored[slice_index], header, series_uid=series_uid, study_uid=study_uid,
                           frame_uid=frame_uid, sop_uid=uid_from(rng), slice_index=slice_index,
                           instance_number=int(order[slice_index]) + 1, rescale=rescale)
        name = f"{rng.integers(0, 16**12):012x}" if shuffle_names else f"IM{slice_index:04d}.dcm"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
