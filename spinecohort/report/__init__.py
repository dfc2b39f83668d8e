"""The validation report (``report/validation.html``).

- :mod:`.validation`: context assembly and rendering of ``templates/validation.html.j2``
  (:func:`render_report`).

The names below are re-exported for callers outside the package (tests, older imports); code
inside spinecohort imports from the submodules.
"""
from __future__ import annotations

from .validation import (
    TEMPLATE,
    TEMPLATE_DIR,
    device_hours,
    flagged_level_scans,
    fmt,
    fmt_ci,
    input_warnings,
    render_report,
)

__all__ = [
    "TEMPLATE",
    "TEMPLATE_DIR",
    "device_hours",
    "flagged_level_scans",
    "fmt",
    "fmt_ci",
    "input_warnings",
    "render_report",
]
