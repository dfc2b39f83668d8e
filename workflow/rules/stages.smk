# One job per (stage, shard): models load once per job and every scan of the shard is processed.
for _stage in STAGES:

    rule:
        name:
            _stage
        input:
            manifest=MANIFEST,
            previous=previous_status(_stage),
        output:
            f"{WORK}/{{shard}}/{_stage}.status.parquet",
        params:
            stage=_stage,
            config=stage_config(PIPELINE_CFG, _stage),
        log:
            f"{OUT}/logs/{_stage}/{{shard}}.log",
        threads: CFG["threads"]
        conda:
            "../../envs/spinecohort.yaml"
        script:
            "../../scripts/run_stage.py"


rule qc:
    input:
        manifest=MANIFEST,
        last=f"{WORK}/{{shard}}/{LAST_STAGE}.status.parquet",
    output:
        touch(f"{WORK}/{{shard}}/qc.done"),
    params:
        config=PIPELINE_CFG,
    log:
        f"{OUT}/logs/qc/{{shard}}.log",
    conda:
        "../../envs/spinecohort.yaml"
    script:
        "../../scripts/render_qc.py"
