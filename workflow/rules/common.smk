# Shared helpers for the rules.
from spinecohort.pipeline import stage_order, STAGE_CLASSES

STAGES = stage_order()
LAST_STAGE = STAGES[-1]


def previous_status(stage):
    after = STAGE_CLASSES[stage].after
    return [] if after is None else [f"{WORK}/{{shard}}/{after}.status.parquet"]


def all_shards(pattern):
    return expand(pattern, shard=SHARDS)
