"""A single sagittal slice (2-D export, key image) from DICOM to grades and agreement: one slice
is processed as one slice, never padded or replicated into a pretend volume."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spinecohort import synthetic
from spinecohort.config import resolve_config
from spinecohort.dicom_writer import SeriesHeader, write_series
from spinecohort.discs import N_SLICES
from spinecohort.pipeline import run_in_process
from spinecohort.schemes import label_columns, parse_reading_schemes
from spinecohort.stats import compute_agreement
from spinecohort.tasks import DEFAULT_GRADED_DISCS, LUMBAR_DISCS, TASK_NAMES


@pytest.fixture(scope="module")
def single_slice_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    scan = synthetic.generate_scan(3, fov="lumbar", contrast="T2")
    spacing = float(scan.pixel_spacing_mm)
    n_rows, n_cols = scan.volume.shape[1:]
    header = SeriesHeader(pixel_spacing_mm=(spacing, spacing), slice_spacing_mm=float(scan.slice_thickness_mm),
                          origin_mm=(0.0, -spacing * n_cols / 2, spacing * n_rows / 2))
    # the phantom's mid-sagittal slice, alone: what SPIDER-like exports hold
    write_series(scan.volume[scan.midline_slice][None], tmp / "dicom", header, np.random.default_rng(0))
    (tmp / "manifest.csv").write_text("scan_id,subject_id,path\nslice1,subA,dicom\n")
    labels = pd.DataFrame([{"scan_id": "slice1", "level": d.level, **d.grades} for d in scan.discs
                           if d.level in DEFAULT_GRADED_DISCS])
    config = resolve_config({"outdir": str(tmp / "out"), "manifest": str(tmp / "manifest.csv"), "tta": 1,
                             "device": "cpu", "threads": 2, "hotspots": "report", "hotspot_tasks": ["Herniation"]})
    paths = run_in_process(config, tmp / "manifest.csv", created_by="test")
    return tmp, paths, labels


def test_single_slice_runs_to_grades(single_slice_run, torch_threads):
    tmp, paths, _ = single_slice_run
    scans = pd.read_parquet(paths["scans"]).set_index("scan_id")
    row = scans.loc["slice1"]
    assert row["status"] == "ok", row["error"]
    assert row["n_slices"] == 1 and row["grading_slices"] == 1
    vertebrae = pd.read_parquet(paths["vertebrae"])
    assert {"L5", "L4", "L3", "L2", "L1"} <= set(vertebrae["level"].dropna())
    assert (vertebrae["slice_min"] == 0).all() and (vertebrae["slice_max"] == 0).all()
    discs = pd.read_parquet(paths["discs"])
    assert set(LUMBAR_DISCS) <= set(discs["level"]) <= set(DEFAULT_GRADED_DISCS)
    assert (discs["grading_slices"] == 1).all() and (discs["centre_slice"] == 0).all()
    for task in TASK_NAMES:
        assert discs[task].notna().all(), task
    # each disc volume holds the one source slice at its centre; nothing else is filled
    with np.load(tmp / "out" / "work" / "ivv" / "slice1.npz") as ivvs:
        centre = N_SLICES // 2
        assert (ivvs["slices"][:, centre] == 0).all()
        assert (np.delete(ivvs["slices"], centre, axis=1) == -1).all()
        volumes = ivvs["volumes"].astype(np.float32)
        assert (volumes[:, centre].reshape(len(volumes), -1).max(axis=1) > 0).all()
        assert not np.delete(volumes, centre, axis=1).any()
    assert (tmp / "out" / "report" / "qc" / "slice1.png").exists()
    # one example disc, the task under review only, its one slice drawn large enough to read
    from PIL import Image

    montages = sorted((tmp / "out" / "report" / "hotspots").glob("*.png"))
    assert [p.name for p in montages] == [f"slice1_{discs['level'][0]}_Herniation.png"]
    assert Image.open(montages[0]).size[0] >= 800


def test_single_slice_grades_reach_agreement(single_slice_run):
    _, paths, labels = single_slice_run
    agreement, _ = compute_agreement(pd.read_parquet(paths["discs"]), labels, n_bootstrap=0)
    pooled = agreement[(agreement["level"] == "all") & (agreement["site"] == "all")
                       & (agreement["task"] == "Pfirrmann")].set_index("metric")
    assert pooled.loc["n_missing_model", "estimate"] == 0
    assert pooled.loc["accuracy", "n_discs"] == len(labels)
    assert np.isfinite(pooled.loc["accuracy", "estimate"])


SPIDER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "spider-midsagittal"


@pytest.mark.skipif(not (SPIDER / "make_cohort.py").is_file(),
                    reason="../shared/data/spider-midsagittal is absent (a fresh clone has no shared data)")
def test_a_real_spider_slice_runs_to_grades_and_its_columns_map(tmp_path, torch_threads):
    """One real SPIDER mid-sagittal slice, written by the data set's own make_cohort.py (into
    tmp_path, never the repository), through every stage; its labels' columns are all read."""
    subprocess.run([sys.executable, str(SPIDER / "make_cohort.py"), str(tmp_path / "cohort"),
                    "--sequences", "t2_SPACE"], check=True, capture_output=True, timeout=300)
    manifest = pd.read_csv(tmp_path / "cohort" / "manifest.csv").head(1)
    manifest.to_csv(tmp_path / "cohort" / "one.csv", index=False)  # paths resolve against its folder
    config = resolve_config({"outdir": str(tmp_path / "out"), "manifest": str(tmp_path / "cohort" / "one.csv"),
                             "tta": 1, "device": "cpu", "threads": 2, "hotspots": "none", "qc": False})
    paths = run_in_process(config, tmp_path / "cohort" / "one.csv", created_by="test")
    scans = pd.read_parquet(paths["scans"])
    assert scans.loc[0, "status"] == "ok", scans.loc[0, "error"]
    assert scans.loc[0, "n_slices"] == 1 and scans.loc[0, "grading_slices"] == 1
    discs = pd.read_parquet(paths["discs"])
    assert len(discs) >= 3 and discs["Pfirrmann"].notna().all()
    labels = pd.read_csv(tmp_path / "cohort" / "labels.csv")
    status = {e["column"]: e["status"] for e in label_columns(labels.columns, discs.columns, parse_reading_schemes(None))}
    assert status["SPIDER_Narrowing"] == status["SPIDER_Modic"] == "scheme"
    assert status["SPIDER_Bulging"] == "unknown" and status["Pfirrmann"] == "task"
    agreement, _ = compute_agreement(discs, labels[labels["scan_id"] == scans.loc[0, "scan_id"]], n_bootstrap=0)
    assert {"Narrowing>1", "Marrow(any)", "Pfirrmann"} <= set(agreement["task"])
