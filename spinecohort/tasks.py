"""Grading tasks, their scales, and vertebra / disc level names, as the contract fixes them.

Task names and class counts follow SpineNet (Jamaludin et al. 2017; Windsor et al. 2022).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    grades: tuple[int, ...]  # the values a grade takes on the contract's scale
    ordinal: bool

    @property
    def n_classes(self) -> int:
        return len(self.grades)

    @property
    def binary(self) -> bool:
        return len(self.grades) == 2


# SpineNet's head order; the grading network's outputs follow it.
TASKS: tuple[Task, ...] = (
    Task("Pfirrmann", (1, 2, 3, 4, 5), True),
    Task("Narrowing", (1, 2, 3, 4), True),
    Task("CentralCanalStenosis", (1, 2, 3, 4), True),
    Task("Spondylolisthesis", (0, 1), False),
    Task("UpperEndplateDefect", (0, 1), False),
    Task("LowerEndplateDefect", (0, 1), False),
    Task("UpperMarrow", (0, 1), False),
    Task("LowerMarrow", (0, 1), False),
    Task("ForaminalStenosisLeft", (0, 1), False),
    Task("ForaminalStenosisRight", (0, 1), False),
    Task("Herniation", (0, 1), False),
)
TASK_BY_NAME = {t.name: t for t in TASKS}
TASK_NAMES = tuple(t.name for t in TASKS)

# Derived binary view of central canal stenosis (contract: grade > 1).
CCS_BINARY = "CentralCanalStenosisBinary"

# Vertebra levels from caudal to cranial: index 0 is S1 as in SpineNetV2's labelling order.
LEVELS: tuple[str, ...] = (
    "S1", "L5", "L4", "L3", "L2", "L1",
    "T12", "T11", "T10", "T9", "T8", "T7", "T6", "T5", "T4", "T3", "T2", "T1",
    "C7", "C6", "C5", "C4", "C3", "C2",
)
LEVEL_INDEX = {name: i for i, name in enumerate(LEVELS)}
# Extra labels the labeller may emit beyond the 24 classes (second sacral segment).
EXTRA_LEVELS = ("S2",)


def disc_name(upper: str, lower: str) -> str:
    """Disc between two vertebrae, named cranial-first as radiologists write it (``L5-S1``)."""
    return f"{upper}-{lower}"


def disc_levels() -> tuple[str, ...]:
    """Every disc name between consecutive levels, caudal first (``L5-S1``, ``L4-L5``, ...)."""
    return tuple(disc_name(LEVELS[i + 1], LEVELS[i]) for i in range(len(LEVELS) - 1))


#: The discs of a lumbar study.
LUMBAR_DISCS = ("T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
#: The pipeline's default ``graded_discs``: the lumbar discs and the lower thoracic ones readers of
#: lumbar series also grade where in view (SPIDER's readers grade up to T9-T10; a reader-graded disc
#: that the pipeline does not grade counts as missing in the agreement table).
DEFAULT_GRADED_DISCS = ("T9-T10", "T10-T11", "T11-T12") + LUMBAR_DISCS
