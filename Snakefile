# spinecohort: sagittal spinal MRI cohort -> vertebra, disc and grading phenotypes.
# Logic lives in the `spinecohort` package; rules only wire files together.
from spinecohort.config import resolve_config, manifest_path, labels_path, demo_paths, pipeline_config
from spinecohort.manifest import read_manifest, n_shards

configfile: "config/config.yaml"


CFG = resolve_config(config)
# What the cohort's jobs see: without the training-only keys (grader_training), so changing those
# re-runs none of them.
PIPELINE_CFG = pipeline_config(CFG)
OUT = CFG["outdir"]
DEMO = not CFG["manifest"]
MANIFEST = str(manifest_path(CFG))
LABELS = labels_path(CFG)
N_SCANS = CFG["demo"]["n_scans"] if DEMO else len(read_manifest(MANIFEST))
SHARDS = [f"{k:04d}" for k in range(n_shards(N_SCANS, CFG["shard_size"]))]
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
