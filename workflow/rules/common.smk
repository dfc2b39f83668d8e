# Shared helpers for the rules.
from spinecohort.pipeline import stage_classes, stage_config, stage_order

STAGES = stage_order()
LAST_STAGE = STAGES[-1]


def previous_status(stage):
    after = stage_classes()[stage].after
    return [] if after is None else [f"{WORK}/{{shard}}/{after}.status.parquet"]


def all_shards(pattern):
    return expand(pattern, shard=SHARDS)
