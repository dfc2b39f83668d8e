"""Snakemake entry point; the work is in spinecohort.entry.demo_cohort."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the checkout, for conda envs
from spinecohort.entry import demo_cohort  # noqa: E402

demo_cohort(snakemake)  # noqa: F821
