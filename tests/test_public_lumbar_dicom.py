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
