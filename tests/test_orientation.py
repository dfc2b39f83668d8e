"""The networks' canonical view and its mapping back to the stored pixel grid."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from spinecohort.ingest import Series
from spinecohort.orientation import CanonicalView, canonical_flips

CANONICAL = np.array([[4.0, 0, 0], [0, 0, -0.7], [0, 0.7, 0]]).T  # columns: slice, row, col directions (LPS)


@pytest.mark.parametrize("turned", [False, True])
@pytest.mark.parametrize("signs", list(itertools.product([1, -1], repeat=3)))
def test_canonical_view_round_trip(signs, turned):
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(5, 7, 6)).astype(np.float32)
    affine = np.eye(4)
    # turned: the stored rows run front-back and the cols head-feet (images lying on their side)
    directions = CANONICAL[:, [0, 2, 1]] if turned else CANONICAL
    spacing = np.array([4.0, 0.6, 0.9]) if turned else np.array([4.0, 0.9, 0.6])
    affine[:3, :3] = directions / np.abs(directions).sum(0) * spacing * np.array(signs)
    series = Series(volume=volume, affine=affine, meta={"pixel_spacing_mm": list(spacing[1:])})
    view = CanonicalView.of(series)
    assert view.turned is turned
    assert view.flips == (signs[0] < 0, (signs[2] if turned else signs[1]) < 0, (signs[1] if turned else signs[2]) < 0)
    canonical = view.volume
    assert canonical.shape == ((5, 6, 7) if turned else (5, 7, 6))
    assert view.pixel_spacing_mm == (0.9, 0.6)  # the view's rows always run head-feet
    # A voxel seen in the canonical view sits at the same patient position as its stored twin.
    point = np.array([1.0, 2.0, 4.0])
    stored = view.to_stored_points(point)[0]
    assert canonical[tuple(point.astype(int))] == volume[tuple(stored.astype(int))]
    np.testing.assert_allclose(view.from_stored_points(stored), [point])
    # ... and the view's axes run as the canonical frame says: rows toward the feet, cols backwards
    step = series.to_patient(view.to_stored_points([[1, 3, 2], [1, 4, 2], [1, 3, 3]]))
    assert step[1, 2] - step[0, 2] < 0 and step[2, 1] - step[0, 1] > 0
    polygon = {2: np.array([[1.0, 1.0], [1.0, 4.0], [3.0, 4.0], [3.0, 1.0]])}
    back = view.from_stored_polygons(view.to_stored_polygons(polygon))
    np.testing.assert_allclose(back[2], polygon[2])
    assert canonical_flips(series) == view.flips


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
