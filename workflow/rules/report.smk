if LABELS is not None:

    rule agreement:
        input:
            discs=f"{OUT}/tables/discs.parquet",
            labels=str(LABELS),
        output:
            agreement=f"{OUT}/tables/agreement.parquet",
            confusion=f"{OUT}/tables/confusion.parquet",
        log:
            f"{OUT}/logs/agreement.log",
        conda:
            "../../envs/spinecohort.yaml"
        container:
            CONTAINER
        params:
            bootstrap=CFG["agreement"]["bootstrap"],
            seed=CFG["agreement"]["seed"],
            reading_schemes=CFG["reading_schemes"],
        script:
            "../../scripts/agreement.py"


rule report:
    input:
        scans=f"{OUT}/tables/scans.parquet",
        # where each scan is: fracture crops re-read a scan whose intermediates were removed
        manifest=MANIFEST,
        discs=f"{OUT}/tables/discs.parquet",
        vertebrae=f"{OUT}/tables/vertebrae.parquet",
        morphometry=f"{OUT}/tables/morphometry.parquet",
        change=f"{OUT}/tables/change.parquet",
        agreement=[f"{OUT}/tables/agreement.parquet"] if LABELS is not None else [],
        labels=[str(LABELS)] if LABELS is not None else [],
    output:
        f"{OUT}/report/validation.html",
    log:
        f"{OUT}/logs/report.log",
    conda:
        "../../envs/spinecohort.yaml"
    container:
        CONTAINER
    params:
        config=config_for(CFG, "report"),
    script:
        "../../scripts/report.py"
