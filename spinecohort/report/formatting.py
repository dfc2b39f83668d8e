"""Formatting shared by the report's sections: numbers and intervals as text, table cells, figures
and image files as base64 data URIs, the report's task and level order, and its colours."""
from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..tasks import CCS_BINARY, TASKS, disc_levels  # noqa: E402

MODEL_COLOURS = ["#1f5fa8", "#d9731a", "#2a9d5b", "#9b3fb5", "#c23b3b"]
READER_COLOURS = ["#555555", "#8c8c8c", "#b0b0b0", "#3d3d3d"]


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers with ``digits`` decimals; NaN/None as an em dash."""
    if value is None:
        return "\u2014"
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(x):
        return "\u2014"
    return f"{x:.{digits}f}"


def fmt_ci(low: Any, high: Any, digits: int = 3) -> str:
    if low is None or high is None or not (_finite(low) and _finite(high)):
        return ""
    return f"[{fmt(low, digits)}, {fmt(high, digits)}]"


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _count(x: Any) -> str:
    return f"{int(x):,}" if _finite(x) else "\u2014"


def _cell(main: str, sub: str = "", title: str = "", cls: str = "") -> dict[str, str]:
    return {"main": main, "sub": sub, "title": title, "cls": cls}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
         ".webp": "image/webp", ".svg": "image/svg+xml"}


def _embed_file(path: str | Path) -> str | None:
    p = Path(path)
    mime = _MIME.get(p.suffix.lower())
    if mime is None or not p.is_file():
        return None
    return f"data:{mime};base64," + base64.b64encode(p.read_bytes()).decode("ascii")


# --------------------------------------------------------------------------- order


def _task_order(names: Iterable[str]) -> list[str]:
    order = []
    for t in TASKS:
        order.append(t.name)
        if t.name == "CentralCanalStenosis":
            order.append(CCS_BINARY)
    names = list(dict.fromkeys(names))
    return [n for n in order if n in names] + sorted(n for n in names if n not in order)


def _level_order(levels: Iterable[str]) -> list[str]:
    ranks = {name: i for i, name in enumerate(reversed(disc_levels()))}
    uniq = {str(lv) for lv in levels if str(lv) != "all"}
    return sorted(uniq, key=lambda lv: (lv not in ranks, ranks.get(lv, 0), lv))
