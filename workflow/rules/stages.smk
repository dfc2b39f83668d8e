# One job per (stage, shard): models load once per job and every scan of the shard is processed.
# The first stage also writes the shard's rows as their own file, the input of the shard's later
# jobs, so a row added or changed elsewhere in the manifest re-runs none of them. It re-runs when
# the fingerprint of its rows (a param) changes; the manifest's timestamp is ignored (ancient),
# except the demo manifest's, which is made by a rule.
rule:
    name:
        STAGES[0]
    input:
        manifest=MANIFEST if DEMO else ancient(MANIFEST),
    output:
        status=f"{WORK}/{{shard}}/{STAGES[0]}.status.parquet",
        manifest=f"{WORK}/{{shard}}/manifest.csv",
    log:
        f"{OUT}/logs/{STAGES[0]}/{{shard}}.log",
    conda:
        "../../envs/spinecohort.yaml"
    container:
        CONTAINER
    threads: CFG["threads"]
    params:
        stage=STAGES[0],
        config=config_for(CFG, STAGES[0]),
        rows=shard_key,
    script:
        "../../scripts/run_stage.py"


for _stage in STAGES[1:]:

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
            config=config_for(CFG, _stage),
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
        config=config_for(CFG, "qc"),
    script:
        "../../scripts/render_qc.py"
