"""Snakemake entry point; the work is in spinecohort.entry.shard_manifest."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the checkout, for conda envs
from spinecohort.entry import shard_manifest  # noqa: E402

shard_manifest(snakemake)  # noqa: F821
