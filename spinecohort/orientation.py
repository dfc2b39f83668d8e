"""The networks' canonical view of a series, and the mapping of its points back to the stored grid.

Canonical: slices run toward patient left, rows head -> feet, cols front -> back (LPS +x, -z, +y).
The networks see every series that way, a series stored with its images turned by 90 degrees
(cols running head-feet) included; their results are mapped back to the stored grid, which is
what the tables report. A scan's view is made once (:attr:`pipeline.context.ScanContext.canonical`)
and every stage reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .ingest import Series


def in_plane_turned(series: Series) -> bool:
    """Whether the stored images are turned by 90 degrees: their cols, not their rows, run closest to
    head-feet (a sagittal series stored lying on its side). The view swaps rows and cols then."""
    row_direction, col_direction = (series.affine[:3, k] / max(np.linalg.norm(series.affine[:3, k]), 1e-12)
                                    for k in (1, 2))
    return bool(abs(col_direction[2]) > abs(row_direction[2]))


def canonical_flips(series: Series) -> tuple[bool, bool, bool]:
    """Whether slices / rows / cols of the (turned back, :func:`in_plane_turned`) grid must be
    flipped for the canonical view."""
    order = [0, 2, 1] if in_plane_turned(series) else [0, 1, 2]
    slice_direction, row_direction, col_direction = (series.affine[:3, k] for k in order)
    return bool(slice_direction[0] < 0), bool(row_direction[2] > 0), bool(col_direction[1] < 0)


@dataclass(frozen=True, eq=False)
class CanonicalView:
    """A series' volume in the canonical view, and the mapping of points between the view and the
    stored grid: rows and cols swapped when the stored images are turned by 90 degrees
    (``turned``), then axes flipped (``flips``, in the turned-back grid)."""

    volume: np.ndarray
    flips: tuple[bool, bool, bool]
    #: (row, col) pixel spacing of the view, mm (the stored one, swapped when turned)
    pixel_spacing_mm: tuple[float, float]
    turned: bool = False

    @classmethod
    def of(cls, series: Series) -> CanonicalView:
        turned = in_plane_turned(series)
        flips = canonical_flips(series)
        axes = tuple(axis for axis, flip in enumerate(flips) if flip)
        volume = series.volume.transpose(0, 2, 1) if turned else series.volume
        # a copy, not np.ascontiguousarray: numpy calls a flip of a length-1 axis (a one-slice
        # series) contiguous and keeps its negative stride, which torch rejects
        volume = np.flip(volume, axis=axes).copy() if axes else np.ascontiguousarray(volume)
        spacing = series.meta.get("pixel_spacing_mm")
        if spacing is None:
            spacing = [float(np.linalg.norm(series.affine[:3, k])) for k in (1, 2)]
        spacing = (float(spacing[1]), float(spacing[0])) if turned else (float(spacing[0]), float(spacing[1]))
        return cls(volume=volume, flips=flips, turned=turned, pixel_spacing_mm=spacing)

    def _flip(self, points: np.ndarray) -> np.ndarray:
        for axis, flip in enumerate(self.flips):
            if flip:
                points[:, axis] = self.volume.shape[axis] - 1 - points[:, axis]
        return points

    def to_stored_points(self, points: np.ndarray) -> np.ndarray:
        """(n, 3) (slice, row, col) in the view -> the stored grid."""
        points = self._flip(np.array(points, dtype=float, copy=True).reshape(-1, 3))
        return points[:, [0, 2, 1]] if self.turned else points

    def from_stored_points(self, points: np.ndarray) -> np.ndarray:
        """(n, 3) (slice, row, col) in the stored grid -> the view."""
        points = np.array(points, dtype=float, copy=True).reshape(-1, 3)
        return self._flip(points[:, [0, 2, 1]] if self.turned else points)

    def to_stored_quad(self, slice_index: int, corners: np.ndarray) -> tuple[int, np.ndarray]:
        """One (4, 2) (row, col) quadrilateral on a view slice -> (stored slice, corners)."""
        return self._map_quad(slice_index, corners, self.to_stored_points)

    def from_stored_quad(self, slice_index: int, corners: np.ndarray) -> tuple[int, np.ndarray]:
        """One (4, 2) (row, col) quadrilateral on a stored slice -> (view slice, corners)."""
        return self._map_quad(slice_index, corners, self.from_stored_points)

    @staticmethod
    def _map_quad(slice_index: int, corners: np.ndarray, to_points) -> tuple[int, np.ndarray]:
        corners = np.asarray(corners, dtype=float).reshape(4, 2)
        moved = to_points(np.column_stack([np.full(4, float(slice_index)), corners]))
        return int(round(moved[0, 0])), moved[:, 1:]

    def to_stored_polygons(self, polygons: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
        """{slice: (4, 2) (row, col)} in the view -> the stored grid (corner order kept)."""
        return dict(self.to_stored_quad(s, q) for s, q in polygons.items())

    def from_stored_polygons(self, polygons: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
        """{slice: (4, 2) (row, col)} in the stored grid -> the view (corner order kept)."""
        return dict(self.from_stored_quad(s, q) for s, q in polygons.items())
