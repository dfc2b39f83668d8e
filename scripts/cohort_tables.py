"""Snakemake entry point; the work is in spinecohort.entry.cohort_tables."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the checkout, for conda envs
from spinecohort.entry import cohort_tables  # noqa: E402

cohort_tables(snakemake)  # noqa: F821
