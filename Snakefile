# spinecohort: sagittal spinal MRI cohort -> vertebra, disc and grading phenotypes.
# Logic lives in the `spinecohort` package; rules only wire files together.
from spinecohort.config import (
    resolve_config,
    manifest_path,
    labels_path,
    demo_paths,
)
from spinecohort.manifest import read_manifest, shard_keys


configfile: "config/config.yaml"


CFG = resolve_config(config)
OUT = CFG["outdir"]
DEMO = not CFG["manifest"]
MANIFEST = str(manifest_path(CFG))
LABELS = labels_path(CFG)
# Shard name -> fingerprint of its rows: a shard's jobs re-run only when its own rows change.
SHARD_KEYS = shard_keys(
    None if DEMO else read_manifest(MANIFEST), CFG["shard_size"], CFG["demo"]
)
SHARDS = list(SHARD_KEYS)
WORK = f"{OUT}/work/shards"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/stages.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/train.smk"


rule all:
    input:
        f"{OUT}/tables/scans.parquet",
        f"{OUT}/report/validation.html",
