rule cohort_tables:
    input:
        manifest=MANIFEST,
        status=[f"{WORK}/{shard}/{stage}.status.parquet" for stage in STAGES for shard in SHARDS],
        qc=all_shards(f"{WORK}/{{shard}}/qc.done") if CFG["qc"] else [],
    output:
        scans=f"{OUT}/tables/scans.parquet",
        vertebrae=f"{OUT}/tables/vertebrae.parquet",
        discs=f"{OUT}/tables/discs.parquet",
        morphometry=f"{OUT}/tables/morphometry.parquet",
        change=f"{OUT}/tables/change.parquet",
    params:
        config=PIPELINE_CFG,
        n_shards=len(SHARDS),
    log:
        f"{OUT}/logs/cohort_tables.log",
    conda:
        "../../envs/spinecohort.yaml"
    script:
        "../../scripts/cohort_tables.py"
