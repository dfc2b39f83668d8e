"""The networks' canonical view and its mapping back to the stored pixel grid."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from spinecohort.ingest import Series
from spinecohort.stages import canonical_flips, canonical_volume, flip_points, flip_polygons

CANONICAL = np.array([[4.0, 0, 0], [0, 0, -0.7], [0, 0.7, 0]]).T  # columns: slice, row, col directions (LPS)


@pytest.mark.parametrize("signs", list(itertools.product([1, -1], repeat=3)))
def test_canonical_view_round_trip(signs):
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(5, 7, 6)).astype(np.float32)
    affine = np.eye(4)
    affine[:3, :3] = CANONICAL * np.array(signs)
    series = Series(volume=volume, affine=affine, meta={})
    assert canonical_flips(series) == tuple(s < 0 for s in signs)
    canonical = canonical_volume(series)
    # A voxel seen in the canonical view sits at the same patient position as its stored twin.
    point = np.array([1.0, 2.0, 4.0])
    stored = flip_points(series, point)[0]
    assert canonical[tuple(point.astype(int))] == volume[tuple(stored.astype(int))]
    np.testing.assert_allclose(flip_points(series, stored), [point])
    reference = Series(volume=canonical, affine=np.eye(4), meta={})
    reference.affine[:3, :3] = CANONICAL
    reference.affine[:3, 3] = series.to_patient(flip_points(series, [0, 0, 0]))[0]
    np.testing.assert_allclose(reference.to_patient(point), series.to_patient(stored))
    polygon = {2: np.array([[1.0, 1.0], [1.0, 4.0], [3.0, 4.0], [3.0, 1.0]])}
    back = flip_polygons(series, flip_polygons(series, polygon))
    np.testing.assert_allclose(back[2], polygon[2])
