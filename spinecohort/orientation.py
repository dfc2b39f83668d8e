"""The networks' canonical view of a series, and the mapping of its points back to the stored grid.

Canonical: slices run toward patient left, rows head -> feet, cols front -> back (LPS +x, -z, +y).
The networks see every series that way; their results are mapped back to the stored grid, which is
what the tables report. A scan's view is made once (:attr:`pipeline.context.ScanContext.canonical`)
and every stage reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .ingest import Series


def canonical_flips(series: Series) -> tuple[bool, bool, bool]:
    """Whether slices / rows / cols must be flipped for the canonical view."""
    slice_direction, row_direction, col_direction = (series.affine[:3, k] for k in range(3))
    return bool(slice_direction[0] < 0), bool(row_direction[2] > 0), bool(col_direction[1] < 0)


@dataclass(frozen=True, eq=False)
class CanonicalView:
    """A series' volume in the canonical view, and the flips that map points between the view and
    the stored grid (the same flips both ways)."""

    volume: np.ndarray
    flips: tuple[bool, bool, bool]

    @classmethod
    def of(cls, series: Series) -> CanonicalView:
        flips = canonical_flips(series)
        axes = tuple(axis for axis, flip in enumerate(flips) if flip)
        # a copy, not np.ascontiguousarray: numpy calls a flip of a length-1 axis (a one-slice
        # series) contiguous and keeps its negative stride, which torch rejects
        volume = np.flip(series.volume, axis=axes).copy() if axes else np.ascontiguousarray(series.volume)
        return cls(volume=volume, flips=flips)

    def flip_points(self, points: np.ndarray) -> np.ndarray:
        """(n, 3) (slice, row, col) between the canonical view and the stored grid (self-inverse)."""
        points = np.array(points, dtype=float, copy=True).reshape(-1, 3)
        for axis, flip in enumerate(self.flips):
            if flip:
                points[:, axis] = self.volume.shape[axis] - 1 - points[:, axis]
        return points

    def flip_polygons(self, polygons: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
        """{slice: (4, 2) (row, col)} between the canonical view and the stored grid (self-inverse)."""
        flipped = {}
        for slice_index, corners in polygons.items():
            corners = np.asarray(corners, dtype=float).reshape(4, 2)
            points = np.column_stack([np.full(4, float(slice_index)), corners])
            moved = self.flip_points(points)
            flipped[int(round(moved[0, 0]))] = moved[:, 1:]
        return flipped
