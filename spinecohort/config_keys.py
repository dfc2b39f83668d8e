"""Which config keys each job reads, and :func:`config_for`, the part of a config a stage or rule gets.

A job sees only the keys it reads: Snakemake re-runs a job whose params changed, and a stage job's
resume records are keyed by its config, so changing another key re-runs none of its jobs. Keys are
``"key"`` or ``"key.subkey"``.
"""
from __future__ import annotations

from typing import Any, Mapping

#: Where and how fast a run happens: they change no result, so config_sha256 leaves them out.
EXECUTION_KEYS = ("outdir", "threads", "shard_size", "keep_intermediates")
#: Read only by `snakemake train_grader`: they change none of the cohort's tables, so the cohort's
#: jobs do not see them and config_sha256 leaves them out (the training outputs record them in
#: their own metadata).
TRAINING_KEYS = ("grader_training",)

#: Every stage job's: where outputs go, which scans, the compute it may use.
STAGE_COMMON_KEYS = ("outdir", "shard_size", "device", "threads")
#: The model stages' networks.
MODEL_KEYS = ("models.family", "models.dir", "models.precision")
#: Stage -> the keys it reads besides STAGE_COMMON_KEYS: changing another key (tta,
#: models.grader) re-runs no job of that stage. Every stage of stages.STAGES has its entry.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "ingest": ("keep_series_uid",),
    "detect": MODEL_KEYS,
    "label": MODEL_KEYS,
    "extract_discs": ("graded_discs",),
    "grade": (*MODEL_KEYS, "models.grader", "tta", "hotspots", "hotspot_tasks"),
}
#: Stage-job keys a scan's result does not depend on: a resumed job reuses the scans an
#: interrupted run did under another thread count.
RESUME_IGNORED_KEYS = ("threads",)

#: Rule (that takes the config as its ``config`` param) -> the keys it does not see; it reads every
#: other key. Each training rule leaves out the settings it does not use: changing ``final``
#: re-runs neither, changing ``k`` not the final model.
RULE_UNSEEN_KEYS: dict[str, tuple[str, ...]] = {
    "qc": TRAINING_KEYS,
    "cohort_tables": TRAINING_KEYS,
    "report": TRAINING_KEYS,
    "grader_cv": ("grader_training.final",),
    "grader_final": ("grader_training.final", "grader_training.k"),
    "grader_card": (),
}


def config_for(config: Mapping[str, Any], reader: str) -> dict[str, Any]:
    """The part of ``config`` that ``reader``, a stage (:data:`STAGE_KEYS`) or a rule
    (:data:`RULE_UNSEEN_KEYS`), reads. The rules pass it as the job's params; a stage job also runs
    on it, so a key a stage reads but does not declare fails loudly."""
    if reader in STAGE_KEYS:
        return _only(config, STAGE_COMMON_KEYS + STAGE_KEYS[reader])
    return _without(config, RULE_UNSEEN_KEYS[reader])


def _only(config: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in keys:
        head, _, sub = key.partition(".")
        if head not in config:
            continue
        if not sub:
            out[head] = config[head]
        elif sub in config[head]:
            out.setdefault(head, {})[sub] = config[head][sub]
    return out


def _without(config: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for head, value in config.items():
        if head in keys:
            continue
        unseen = {key.partition(".")[2] for key in keys if key.partition(".")[0] == head}
        out[head] = {k: v for k, v in value.items() if k not in unseen} if unseen else value
    return out
