"""Snakemake entry point; the work is in spinecohort.entry.render_qc."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the checkout, for conda envs
from spinecohort.entry import render_qc  # noqa: E402

render_qc(snakemake)  # noqa: F821
