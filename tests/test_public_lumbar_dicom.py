"""The public-lumbar ivd_* cases written to DICOM and ingested again give the same arrays and spacing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spinecohort.dicom_writer import SeriesHeader, write_series
from spinecohort.ingest import ingest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "public-lumbar"
CASES = sorted(DATA.glob("ivd_*.npz")) if DATA.exists() else []


@pytest.mark.skipif(not CASES, reason="../shared/data/public-lumbar is absent (a fresh clone has no shared data)")
@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_ivd_case_round_trip(case, tmp_path):
    with np.load(case, allow_pickle=False) as data:
        image = data["image"]  # (rows, cols, slices)
        spacing = [float(v) for v in data["spacing_mm"]]
    volume = np.transpose(image, (2, 0, 1)).astype(np.float32)
    header = SeriesHeader(pixel_spacing_mm=(spacing[0], spacing[1]), slice_spacing_mm=spacing[2])
    write_series(volume, tmp_path / case.stem, header, np.random.default_rng(0))
    series = ingest(tmp_path / case.stem, case.stem)
    np.testing.assert_array_equal(series.volume, volume)
    assert series.meta["pixel_spacing_mm"] == pytest.approx(spacing[:2])
    assert series.meta["slice_spacing_mm"] == pytest.approx(spacing[2])


VB2_CASE = DATA / "vb2_02.npz"


@pytest.mark.skipif(not VB2_CASE.exists(), reason="../shared/data/public-lumbar is absent (a fresh clone has no shared data)")
def test_pipeline_levels_on_a_real_case_stored_upright_and_flipped_equal_the_labellers(tmp_path):
    """The pipeline (DICOM in, tables out) gives a real scan the levels the evaluated labeller gives
    it, however the series is stored, and names the annotated L5 "L5"."""
    import pandas as pd

    from spinecohort import publiclumbar as pl
    from spinecohort.config import resolve_config
    from spinecohort.detect import Detector
    from spinecohort.label import Labeller
    from spinecohort.orientation import CanonicalView
    from spinecohort.pipeline import run_in_process
    from spinecohort.shipped import default_model_path

    case = pl.load_case(VB2_CASE)
    rng = np.random.default_rng(0)
    stored = {"upright": (case.volume, (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)),
              # feet up and front right: the same voxels read with both in-plane directions reversed
              "flipped": (case.volume[:, ::-1, ::-1], (0.0, -1.0, 0.0, 0.0, 0.0, 1.0))}
    for name, (volume, orientation) in stored.items():
        header = SeriesHeader(pixel_spacing_mm=tuple(case.pixel_spacing_mm), slice_spacing_mm=case.slice_spacing_mm,
                              orientation=orientation)
        write_series(np.ascontiguousarray(volume), tmp_path / name, header, rng)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("scan_id,subject_id,path\nupright,a,upright\nflipped,a,flipped\n")
    paths = run_in_process(resolve_config({"outdir": str(tmp_path / "out"), "manifest": str(manifest)}), manifest,
                           created_by="test")
    vertebrae = pd.read_parquet(paths["vertebrae"])
    detector = Detector.load(default_model_path("detector"))
    labeller = Labeller.load(default_model_path("appearance"), default_model_path("context"))
    l5 = next(v for v in case.vertebrae if v.level == "L5")
    for name in stored:
        series = ingest(tmp_path / name, name)
        view = CanonicalView.of(series)
        found = detector.detect(view.volume, view.pixel_spacing_mm)
        labels, _ = labeller.label_scan(view.volume, view.pixel_spacing_mm, series.slice_spacing_mm, found)
        direct = [level for _, level in sorted(((d.centroid[1], level) for d, (level, _) in zip(found, labels)
                                                if level is not None), reverse=True)]
        rows = vertebrae[vertebrae.scan_id == name].sort_values("centroid_z_mm")
        assert [level for level in rows["level"] if isinstance(level, str)] == direct
        # the body nearest the annotated L5 (in the canonical view, mm) is called L5
        centres = np.array([view.from_stored_points([r.centroid_slice, r.centroid_row, r.centroid_col])[0]
                            for r in rows.itertuples()])
        nearest = int(np.argmin(np.hypot(centres[:, 1] - l5.centroid[1], centres[:, 2] - l5.centroid[2])))
        assert rows["level"].iloc[nearest] == "L5"
