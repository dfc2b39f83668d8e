"""The networks' canonical view and its mapping back to the stored pixel grid."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from spinecohort.ingest import Series
from spinecohort.orientation import CanonicalView, canonical_flips

CANONICAL = np.array([[4.0, 0, 0], [0, 0, -0.7], [0, 0.7, 0]]).T  # columns: slice, row, col directions (LPS)


@pytest.mark.parametrize("signs", list(itertools.product([1, -1], repeat=3)))
def test_canonical_view_round_trip(signs):
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(5, 7, 6)).astype(np.float32)
    affine = np.eye(4)
    affine[:3, :3] = CANONICAL * np.array(signs)
    series = Series(volume=volume, affine=affine, meta={})
    assert canonical_flips(series) == tuple(s < 0 for s in signs)
    view = CanonicalView.of(series)
    canonical = view.volume
    # A voxel seen in the canonical view sits at the same patient position as its stored twin.
    point = np.array([1.0, 2.0, 4.0])
    stored = view.flip_points(point)[0]
    assert canonical[tuple(point.astype(int))] == volume[tuple(stored.astype(int))]
    np.testing.assert_allclose(view.flip_points(stored), [point])
    reference = Series(volume=canonical, affine=np.eye(4), meta={})
    reference.affine[:3, :3] = CANONICAL
    reference.affine[:3, 3] = series.to_patient(view.flip_points([0, 0, 0]))[0]
    np.testing.assert_allclose(reference.to_patient(point), series.to_patient(stored))
    polygon = {2: np.array([[1.0, 1.0], [1.0, 4.0], [3.0, 4.0], [3.0, 1.0]])}
    back = view.flip_polygons(view.flip_polygons(polygon))
    np.testing.assert_allclose(back[2], polygon[2])


def test_a_scan_context_makes_its_canonical_view_once(tmp_path, monkeypatch):
    from spinecohort import ingest, orientation
    from spinecohort.pipeline import ScanContext, series_path

    affine = np.eye(4)
    affine[:3, :3] = CANONICAL * np.array([-1, 1, -1])
    series = Series(volume=np.arange(5 * 7 * 6, dtype=np.float32).reshape(5, 7, 6), affine=affine,
                    meta={"pixel_spacing_mm": [0.7, 0.7], "slice_spacing_mm": 4.0})
    ingest.save_series(series, series_path(tmp_path, "s0"))
    made = []
    make = orientation.CanonicalView.of
    monkeypatch.setattr(orientation.CanonicalView, "of", classmethod(lambda cls, s: made.append(s) or make(s)))
    scan = ScanContext(scan_id="s0", row={"scan_id": "s0", "path": "unused"}, workdir=tmp_path)
    assert scan.canonical is scan.canonical and len(made) == 1
    np.testing.assert_array_equal(scan.canonical.volume, series.volume[::-1, :, ::-1])
    scan.release()  # the shard job is done with the scan: its volumes go
    assert scan._series is None and scan._canonical is None
