"""Snakemake entry point; the work is in spinecohort.entry.report."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the checkout, for conda envs
from spinecohort.entry import report  # noqa: E402

report(snakemake)  # noqa: F821
