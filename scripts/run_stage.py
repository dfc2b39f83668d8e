"""Snakemake entry point; the work is in spinecohort.entry.run_stage."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the checkout, for conda envs
from spinecohort.entry import run_stage  # noqa: E402

run_stage(snakemake)  # noqa: F821
