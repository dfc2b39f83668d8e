"""Snakemake entry point; the work is in spinecohort.entry.grader_cv."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the checkout, for conda envs
from spinecohort.entry import grader_cv  # noqa: E402

grader_cv(snakemake)  # noqa: F821
