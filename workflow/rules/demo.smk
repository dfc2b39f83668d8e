# The synthetic demo cohort, built only when no manifest is configured.
if DEMO:

    rule demo_cohort:
        output:
            manifest=MANIFEST,
            labels=str(demo_paths(CFG)["labels"]),
            truth=str(demo_paths(CFG)["truth"]),
        params:
            n_scans=CFG["demo"]["n_scans"],
            seed=CFG["demo"]["seed"],
            root=str(demo_paths(CFG)["root"]),
        log:
            f"{OUT}/logs/demo_cohort.log",
        conda:
            "../../envs/spinecohort.yaml"
        script:
            "../../scripts/demo_cohort.py"
