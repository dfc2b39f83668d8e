"""Reading schemes: a labels column read on another scale than the model's, mapped onto a binary
view of model tasks so that the agreement stage can compare them.

A scheme (config key ``reading_schemes``, keyed by the labels column) declares

* ``task``: the name its agreement rows carry (e.g. ``Narrowing>1``);
* ``values``: the column's scale; any other value is "not graded" (with a warning);
* ``positive``: the values that count as the finding (the reader's binary view);
* ``model_tasks`` and ``model_above``: the model calls the finding when *any* of these tasks'
  grades exceeds ``model_above`` (one task: a threshold; several: "any of them").

The defaults (``spinecohort/defaults.yaml``) map the columns ``make_cohort.py`` of the SPIDER data writes:
``SPIDER_Narrowing`` (0/1, any narrowing) onto ``Narrowing>1`` (model Narrowing grade > 1) and
``SPIDER_Modic`` (Modic type 0-3) onto ``Marrow(any)`` (model UpperMarrow or LowerMarrow; a Modic
change of any type is a marrow change above or below the disc). ``SPIDER_Bulging`` has no model
counterpart and is reported as such.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .config import DEFAULTS
from .tasks import CCS_BINARY, TASK_BY_NAME, TASK_NAMES

#: Columns of a labels file that are keys or covariates, never grades.
KEY_COLUMNS = ("scan_id", "level", "reader", "subject_id", "site", "visit")

@dataclass(frozen=True)
class ReadingScheme:
    column: str  # labels column
    task: str  # name of the agreement rows
    values: tuple[float, ...]
    positive: tuple[float, ...]
    model_tasks: tuple[str, ...]
    model_above: float

    def describe(self) -> str:
        model = " or ".join(self.model_tasks)
        values = "/".join(f"{v:g}" for v in self.values)
        positive = ", ".join(f"{v:g}" for v in self.positive)
        return (f"{self.column} ({values}; positive: {positive}) vs model {model} > {self.model_above:g}"
                f" \u2192 {self.task}")


def parse_reading_schemes(mapping: Mapping[str, Mapping[str, Any]] | None) -> list[ReadingScheme]:
    """Schemes from the config mapping (``None``: the defaults, config key ``reading_schemes``).
    Raises ``ValueError`` naming the column for what the JSON schema cannot check."""
    mapping = DEFAULTS["reading_schemes"] if mapping is None else mapping
    schemes, names = [], set()
    for column, spec in mapping.items():
        where = f"reading_schemes.{column}"
        values = tuple(float(v) for v in spec["values"])
        positive = tuple(float(v) for v in spec["positive"])
        if not set(positive) <= set(values) or not positive or set(positive) == set(values):
            raise ValueError(f"{where}: positive {list(spec['positive'])} must be some, not all, of values {list(spec['values'])}")
        unknown = [t for t in spec["model_tasks"] if t not in TASK_BY_NAME]
        if unknown or not spec["model_tasks"]:
            raise ValueError(f"{where}: model_tasks {unknown or '[]'} are not model tasks ({', '.join(TASK_NAMES)})")
        task = str(spec["task"])
        if task in TASK_BY_NAME or task == CCS_BINARY or task in names:
            raise ValueError(f"{where}: task name {task!r} is already a model task or another scheme's name")
        names.add(task)
        schemes.append(ReadingScheme(str(column), task, values, positive, tuple(spec["model_tasks"]),
                                     float(spec["model_above"])))
    return schemes


def label_columns(label_cols: Iterable[str], pred_cols: Iterable[str] | None,
                  schemes: Iterable[ReadingScheme]) -> list[dict[str, str]]:
    """How the agreement stage reads each grade column of a labels file: one dict per column
    with ``column``, ``status`` (``task``, ``scheme``, ``unknown``, ``unmappable``) and
    ``detail``. ``pred_cols`` None: the predictions' columns are not known (assume the model's)."""
    preds = set(TASK_NAMES) if pred_cols is None else set(pred_cols)
    by_column = {s.column: s for s in schemes}
    out = []
    for column in label_cols:
        column = str(column)
        if column in KEY_COLUMNS:
            continue
        if column in TASK_BY_NAME or column == CCS_BINARY:
            source = "CentralCanalStenosis" if column == CCS_BINARY and CCS_BINARY not in preds else column
            if source in preds:
                out.append({"column": column, "status": "task", "detail": f"compared with the model's {column}"})
            else:
                out.append({"column": column, "status": "unmappable",
                            "detail": f"the predictions have no {column} column; not compared"})
        elif column in by_column:
            scheme = by_column[column]
            missing = [t for t in scheme.model_tasks if t not in preds]
            if missing:
                out.append({"column": column, "status": "unmappable",
                            "detail": f"reading scheme needs model task(s) {', '.join(missing)}, absent from the predictions; not compared"})
            else:
                out.append({"column": column, "status": "scheme", "detail": scheme.describe()})
        else:
            out.append({"column": column, "status": "unknown",
                        "detail": "matches no model task and no reading scheme (config reading_schemes); not compared"})
    return out
