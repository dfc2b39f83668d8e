# Each shard's rows as its own file: the shard's jobs depend on it, not on the manifest, so a row
# added or changed elsewhere in the manifest re-runs none of them. The job re-runs when the
# fingerprint of its rows (a param) changes; the manifest's own timestamp is ignored (ancient).
# The demo manifest is made by a rule, so there its timestamp counts.
rule shard_manifest:
    input:
        manifest=MANIFEST if DEMO else ancient(MANIFEST),
    output:
        f"{WORK}/{{shard}}/manifest.csv",
    log:
        f"{OUT}/logs/shard_manifest/{{shard}}.log",
    localrule: True
    conda:
        "../../envs/spinecohort.yaml"
    container:
        CONTAINER
    params:
        rows=shard_key,
        shard_size=CFG["shard_size"],
    script:
        "../../scripts/shard_manifest.py"


# One job per (stage, shard): models load once per job and every scan of the shard is processed.
for _stage in STAGES:

    rule:
        name:
            _stage
        input:
            manifest=f"{WORK}/{{shard}}/manifest.csv",
            previous=previous_status(_stage),
        output:
            f"{WORK}/{{shard}}/{_stage}.status.parquet",
        log:
            f"{OUT}/logs/{_stage}/{{shard}}.log",
        conda:
            "../../envs/spinecohort.yaml"
        container:
            CONTAINER
        threads: CFG["threads"]
        params:
            stage=_stage,
            config=stage_config(PIPELINE_CFG, _stage),
        script:
            "../../scripts/run_stage.py"


# QC pictures, and the end of the shard's per-scan intermediates (config keep_intermediates).
rule qc:
    input:
        manifest=f"{WORK}/{{shard}}/manifest.csv",
        last=f"{WORK}/{{shard}}/{LAST_STAGE}.status.parquet",
    output:
        touch(f"{WORK}/{{shard}}/qc.done"),
    log:
        f"{OUT}/logs/qc/{{shard}}.log",
    conda:
        "../../envs/spinecohort.yaml"
    container:
        CONTAINER
    params:
        config=PIPELINE_CFG,
    script:
        "../../scripts/render_qc.py"
