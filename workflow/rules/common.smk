# Shared helpers for the rules (functions live here, rules in the other files).
import os
from pathlib import Path

from snakemake.exceptions import WorkflowError

from spinecohort.config_keys import config_for
from spinecohort.pipeline import stage_classes, stage_order

STAGES = stage_order()
LAST_STAGE = STAGES[-1]
# The Apptainer image for `--software-deployment-method apptainer`, built from
# containers/spinecohort.def (docs/cluster.md); SPINECOHORT_CONTAINER names another image.
CONTAINER = os.environ.get(
    "SPINECOHORT_CONTAINER",
    str(Path(workflow.basedir) / "containers" / "spinecohort.sif"),
)


def previous_status(stage):
    after = stage_classes()[stage].after
    return [] if after is None else [f"{WORK}/{{shard}}/{after}.status.parquet"]


def all_shards(pattern):
    return expand(pattern, shard=SHARDS)


def shard_key(wildcards):
    return SHARD_KEYS[wildcards.shard]


def training_labels(wildcards):
    if LABELS is None:
        raise WorkflowError(
            "train_grader needs radiologist labels: give the labels CSV (scan_id, level, <task columns>, "
            "optional reader) with --config labels=reads.csv"
        )
    return str(LABELS)
