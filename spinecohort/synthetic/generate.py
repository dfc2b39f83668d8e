"""Public entry points: the drawn protocol of a seed and one phantom scan."""
from __future__ import annotations

import numpy as np

from .scene import _TISSUE, _Scene
from .truth import SyntheticScan


def _protocol_draws(rng: np.random.Generator) -> tuple[str, str]:
    f, c = rng.random(), rng.random()
    fov = "lumbar" if f < 0.7 else ("whole" if f < 0.85 else "cervical")
    contrast = "T1" if c < 0.4 else ("T2" if c < 0.85 else "STIR")
    return fov, contrast


def draw_protocol(seed: int) -> tuple[str, str]:
    """The (fov, contrast) that ``generate_scan(seed)`` uses when they are not given (cheap)."""
    return _protocol_draws(np.random.default_rng(seed))


def generate_scan(seed: int, fov: str | None = None, contrast: str | None = None,
                  n_slices: int | None = None, rows: int | None = None,
                  cols: int | None = None) -> SyntheticScan:
    """One synthetic sagittal spine series with exact vertebra/disc truth and disc grades.

    ``fov``/``contrast`` default to draws from ``seed`` (lumbar/whole/cervical ~70/15/15 %,
    T1/T2/STIR ~40/45/15 %).  ``cols`` defaults to ``rows`` (lumbar, cervical) or about
    0.55 * ``rows`` (whole spine, rectangular FOV).
    """
    rng = np.random.default_rng(seed)
    f_draw, c_draw = _protocol_draws(rng)
    fov = fov or f_draw
    contrast = contrast or c_draw
    if fov not in ("lumbar", "whole", "cervical"):
        raise ValueError(f"fov must be lumbar, whole or cervical, not {fov!r}")
    if contrast not in _TISSUE:
        raise ValueError(f"contrast must be T1, T2 or STIR, not {contrast!r}")
    if n_slices is not None and n_slices < 1:
        raise ValueError("n_slices must be positive")
    scene = _Scene(rng, seed, fov, contrast, n_slices, rows, cols)
    vol = scene.finish(scene.render())
    verts, discs = scene.truth()
    return SyntheticScan(
        volume=vol, pixel_spacing_mm=float(scene.sp), slice_thickness_mm=float(scene.thk),
        fov=fov, contrast=contrast, echo_time_ms=float(round(scene.te, 1)),
        repetition_time_ms=float(round(scene.tr, 0)),
        inversion_time_ms=None if scene.ti is None else float(round(scene.ti, 0)),
        vertebrae=verts, discs=discs, seed=int(seed), slice_spacing_mm=float(scene.thk),
        magnetic_field_t=scene.field_t, age=float(round(scene.age, 1)), midline_slice=scene.mid,
    )
