# The synthetic demo cohort, built only when no manifest is configured.
if DEMO:

    rule demo_cohort:
        output:
            manifest=MANIFEST,
            labels=str(demo_paths(CFG)["labels"]),
            truth=str(demo_paths(CFG)["truth"]),
        log:
            f"{OUT}/logs/demo_cohort.log",
        conda:
            "../../envs/spinecohort.yaml"
        container:
            CONTAINER
        params:
            n_scans=CFG["demo"]["n_scans"],
            seed=CFG["demo"]["seed"],
            # the cohort folder is the one the manifest is written to
            root=lambda wildcards, output: str(Path(output.manifest).parent),
        script:
            "../../scripts/demo_cohort.py"
