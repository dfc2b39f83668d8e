rule cohort_tables:
    input:
        manifest=MANIFEST,
        status=[
            f"{WORK}/{shard}/{stage}.status.parquet"
            for stage in STAGES
            for shard in SHARDS
        ],
        # every shard's qc job: its pictures (config qc) are drawn and its intermediates removed
        qc=all_shards(f"{WORK}/{{shard}}/qc.done"),
    output:
        scans=f"{OUT}/tables/scans.parquet",
        vertebrae=f"{OUT}/tables/vertebrae.parquet",
        discs=f"{OUT}/tables/discs.parquet",
        morphometry=f"{OUT}/tables/morphometry.parquet",
        change=f"{OUT}/tables/change.parquet",
    log:
        f"{OUT}/logs/cohort_tables.log",
    conda:
        "../../envs/spinecohort.yaml"
    container:
        CONTAINER
    params:
        config=config_for(CFG, "cohort_tables"),
        n_shards=len(SHARDS),
    script:
        "../../scripts/cohort_tables.py"
