"""The validation report (``report/validation.html``).

- :mod:`.stage`: the ``report`` rule step: read the cohort tables, call :func:`render_report`
  (:func:`build_report`, run by :func:`spinecohort.entry.report`).
- :mod:`.validation`: context assembly and rendering of ``templates/validation.html.j2``
  (:func:`render_report`).
- :mod:`.agreement`: the agreement section (tables, forest and per-level plots, confusion matrices).
- :mod:`.formatting`: numbers, cells, figures as data URIs, task/level order, colours.
- :mod:`.morphometry`: the morphometry and change sections (``templates/morphometry.html.j2``).

The names below are re-exported for callers outside the package (tests, older imports); code
inside spinecohort imports from the submodules.
"""
from __future__ import annotations

from .morphometry import change_context, fracture_crop, morphometry_context
from .stage import build_report
from .formatting import fmt, fmt_ci
from .validation import (
    TEMPLATE,
    TEMPLATE_DIR,
    device_hours,
    flagged_level_scans,
    input_warnings,
    render_report,
)

__all__ = [
    "TEMPLATE",
    "TEMPLATE_DIR",
    "build_report",
    "change_context",
    "device_hours",
    "flagged_level_scans",
    "fmt",
    "fmt_ci",
    "fracture_crop",
    "input_warnings",
    "morphometry_context",
    "render_report",
]
