# Training the disc grader on the cohort's own labels:
#   snakemake --cores N train_grader --config manifest=cohort.csv labels=reads.csv outdir=out
# The stages up to disc extraction are the cohort's own jobs (shared with `snakemake`, so neither
# run redoes them for the other). Then, under <outdir>/grader_cv/: the labelled discs' volumes,
# patient-level k-fold cross-validation with out-of-fold predictions in the discs-table layout,
# their agreement with the readers (the agreement stage's code) and, with grader_training: final,
# one model trained on every labelled disc with its model card. Settings: config grader_training.
from spinecohort.training.grader_rules import CV_DIR, IVV_STAGE, init_weights_path

GT = CFG["grader_training"]
CV = f"{OUT}/{CV_DIR}"
GRADER_INIT = init_weights_path(GT["init_weights"])


rule train_grader:
    input:
        f"{CV}/agreement.parquet",
        f"{CV}/confusion.parquet",
        [f"{CV}/grader.pt", f"{CV}/grader.json", f"{CV}/grader.md"]
        if GT["final"]
        else [],


rule grader_ivv_table:
    input:
        manifest=MANIFEST,
        labels=training_labels,
        extracted=all_shards(f"{WORK}/{{shard}}/{IVV_STAGE}.status.parquet"),
    output:
        table=f"{CV}/ivv_table.parquet",
        missing=f"{CV}/missing_discs.csv",
    log:
        f"{OUT}/logs/grader_ivv_table.log",
    conda:
        "../../envs/spinecohort.yaml"
    container:
        CONTAINER
    params:
        # <outdir>/work/shards/<shard>/extract_discs.status.parquet
        outdir=lambda wildcards, input: str(Path(input.extracted[0]).parents[3]),
        n_shards=len(SHARDS),
        readers=GT["readers"],
    script:
        "../../scripts/grader_ivv_table.py"


rule grader_cv:
    input:
        ivv_table=f"{CV}/ivv_table.parquet",
        labels=training_labels,
        init=[str(GRADER_INIT)] if GRADER_INIT is not None else [],
    output:
        oof=f"{CV}/oof_predictions.parquet",
        # a folder, not one file per fold: a rule's output list must not depend on k, or Snakemake
        # would not re-run the CV when k changes
        folds=directory(f"{CV}/folds"),
    log:
        f"{OUT}/logs/grader_cv.log",
    conda:
        "../../envs/spinecohort.yaml"
    container:
        CONTAINER
    threads: CFG["threads"]
    params:
        config=config_for(CFG, "grader_cv"),
    script:
        "../../scripts/grader_cv.py"


rule grader_cv_agreement:
    input:
        discs=f"{CV}/oof_predictions.parquet",
        labels=training_labels,
    output:
        agreement=f"{CV}/agreement.parquet",
        confusion=f"{CV}/confusion.parquet",
    log:
        f"{OUT}/logs/grader_cv_agreement.log",
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


rule grader_final:
    input:
        ivv_table=f"{CV}/ivv_table.parquet",
        labels=training_labels,
        init=[str(GRADER_INIT)] if GRADER_INIT is not None else [],
    output:
        weights=f"{CV}/grader.pt",
    log:
        f"{OUT}/logs/grader_final.log",
    conda:
        "../../envs/spinecohort.yaml"
    container:
        CONTAINER
    threads: CFG["threads"]
    params:
        config=config_for(CFG, "grader_final"),
    script:
        "../../scripts/grader_final.py"


rule grader_card:
    input:
        weights=f"{CV}/grader.pt",
        ivv_table=f"{CV}/ivv_table.parquet",
        missing=f"{CV}/missing_discs.csv",
        oof=f"{CV}/oof_predictions.parquet",
        agreement=f"{CV}/agreement.parquet",
    output:
        json=f"{CV}/grader.json",
        md=f"{CV}/grader.md",
    log:
        f"{OUT}/logs/grader_card.log",
    conda:
        "../../envs/spinecohort.yaml"
    container:
        CONTAINER
    params:
        config=config_for(CFG, "grader_card"),
    script:
        "../../scripts/grader_card.py"
