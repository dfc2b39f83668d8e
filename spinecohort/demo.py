"""The built-in synthetic demo cohort: phantoms written as DICOM, a manifest, two simulated reads
and the exact truth (``spinecohort demo-cohort OUT --n-scans N --seed S``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import synthetic
from .dicom_writer import SeriesHeader, uid_from, write_series
from .provenance import atomic_write_bytes, make_provenance, write_table
from .tasks import DEFAULT_GRADED_DISCS, TASK_NAMES

SERIES_DESCRIPTIONS = {"T1": "SAG T1 TSE", "T2": "SAG T2 TSE", "STIR": "SAG STIR"}
SITES = ("site-A", "site-B", "site-C")
# Share of scans that also carry an axial localiser, so ingestion has to choose the sagittal series.
LOCALISER_SHARE = 0.25


def _flip_polygons(vertebra: synthetic.SyntheticVertebra, n_slices: int) -> list[dict]:
    """Truth polygons in the ingested slice order (see :func:`write_demo_scan`)."""
    return [{"slice": n_slices - 1 - int(s), "corners": [float(v) for v in np.asarray(c, float).reshape(-1)]}
            for s, c in sorted(vertebra.polygons.items(), key=lambda item: n_slices - 1 - item[0])]


def write_demo_scan(scan: synthetic.SyntheticScan, folder: Path, rng: np.random.Generator,
                    patient_name: str, patient_id: str, with_localiser: bool) -> None:
    """Write one phantom as a DICOM series (plus, optionally, a localiser) into ``folder``.

    The phantom's slices run right -> left (increasing patient x); a standard sagittal
    orientation has its normal along -x, so slices are written in reverse to keep anatomy on the
    correct side, and the truth is mapped to the ingested order the same way.
    """
    n_slices, n_rows, n_cols = scan.volume.shape
    spacing = float(scan.pixel_spacing_mm)
    slice_spacing = float(getattr(scan, "slice_spacing_mm", None) or scan.slice_thickness_mm)
    origin = (slice_spacing * (n_slices - 1) / 2.0, -spacing * n_cols / 2.0,
              spacing * n_rows / 2.0 + float(rng.uniform(-40, 40)))
    study_uid = uid_from(rng)
    header = SeriesHeader(
        pixel_spacing_mm=(spacing, spacing), slice_spacing_mm=slice_spacing,
        slice_thickness_mm=float(scan.slice_thickness_mm), origin_mm=origin,
        series_description=SERIES_DESCRIPTIONS[scan.contrast], echo_time_ms=scan.echo_time_ms,
        repetition_time_ms=scan.repetition_time_ms, inversion_time_ms=scan.inversion_time_ms,
        patient_name=patient_name, patient_id=patient_id, series_number=3, study_uid=study_uid,
    )
    write_series(scan.volume[::-1], folder / "sag", header, rng)
    if with_localiser:
        # Three axial slices through the middle of the FOV, in the same study.
        axial = np.stack([scan.volume[:, r, :].T for r in np.linspace(n_rows * 0.3, n_rows * 0.7, 3).astype(int)])
        localiser = SeriesHeader(
            pixel_spacing_mm=(spacing, slice_spacing), slice_spacing_mm=spacing * n_rows * 0.2,
            orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), origin_mm=origin, series_description="LOCALISER",
            patient_name=patient_name, patient_id=patient_id, series_number=1, study_uid=study_uid,
        )
        write_series(axial, folder / "loc", localiser, rng)


def build_demo_cohort(out: str | Path, n_scans: int, seed: int, created_by: str | None = None) -> dict[str, Path]:
    """Write ``n_scans`` phantoms, ``manifest.csv``, ``labels.csv`` and ``truth.parquet`` into ``out``."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    n_subjects = max(1, int(np.ceil(n_scans * 0.8)))
    manifest_rows, truth_rows, grade_rows = [], [], []
    for index in range(n_scans):
        scan_seed = int(rng.integers(0, 2**31 - 1))
        # Roughly every fifth subject comes back for a second visit.
        subject = index if index < n_subjects else int(rng.integers(0, n_subjects))
        visit = "v1" if index < n_subjects else "v2"
        scan_id = f"demo{index:04d}"
        scan = synthetic.generate_scan(scan_seed)
        scan_rng = np.random.default_rng(scan_seed)
        write_demo_scan(scan, out / "scans" / scan_id, scan_rng,
                        patient_name=f"Phantom^Subject{subject:04d}", patient_id=f"PHANTOM-{subject:04d}",
                        with_localiser=bool(scan_rng.random() < LOCALISER_SHARE))
        n_slices = scan.volume.shape[0]
        manifest_rows.append({
            "scan_id": scan_id, "subject_id": f"sub{subject:04d}", "path": f"scans/{scan_id}",
            "site": SITES[subject % len(SITES)], "visit": visit, "fov_class": scan.fov,
            "contrast": scan.contrast, "age": int(round(scan.age)), "sex": "FM"[subject % 2],
        })
        for vertebra in scan.vertebrae:
            s, r, c = vertebra.centroid
            truth_rows.append({
                "scan_id": scan_id, "kind": "vertebra", "level": vertebra.level,
                "centroid_slice": float(n_slices - 1 - s), "centroid_row": float(r), "centroid_col": float(c),
                "partial": bool(getattr(vertebra, "partial", False)),
                "polygons": _flip_polygons(vertebra, n_slices),
            })
        for disc in scan.discs:
            s, r, c = disc.centre
            truth_rows.append({
                "scan_id": scan_id, "kind": "disc", "level": disc.level,
                "centroid_slice": float(n_slices - 1 - s), "centroid_row": float(r), "centroid_col": float(c),
                "partial": False, "polygons": None, **{t: int(disc.grades[t]) for t in TASK_NAMES},
            })
            if disc.level in DEFAULT_GRADED_DISCS and not getattr(disc, "partial", False):
                grade_rows.append({"scan_id": scan_id, "level": disc.level, **{t: int(disc.grades[t]) for t in TASK_NAMES}})
    manifest = pd.DataFrame(manifest_rows)
    truth = pd.DataFrame(truth_rows)
    grades = pd.DataFrame(grade_rows, columns=["scan_id", "level", *TASK_NAMES])
    labels = synthetic.simulate_reads(grades, seed=seed)
    labels[list(TASK_NAMES)] = labels[list(TASK_NAMES)].astype("Int64")  # blank cell = not graded
    paths = {"manifest": out / "manifest.csv", "labels": out / "labels.csv", "truth": out / "truth.parquet"}
    atomic_write_bytes(paths["manifest"], manifest.to_csv(index=False).encode())
    atomic_write_bytes(paths["labels"], labels.to_csv(index=False).encode())
    write_table(truth, paths["truth"], make_provenance({"n_scans": n_scans, "seed": seed}, None, created_by))
    return paths
