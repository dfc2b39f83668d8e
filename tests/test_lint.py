"""The workflow's own code style: `snakemake --lint` and `snakefmt --check` report nothing
(`make test` checks both)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEFILES = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]


def test_snakemake_lint_is_clean():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--snakefile", str(REPO / "Snakefile")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Lints for" not in output, output[-4000:]


def test_snakefmt_check_is_clean():
    snakefmt = shutil.which("snakefmt", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if snakefmt is None:
        pytest.skip("snakefmt is not installed (pip install -e '.[test]' installs it)")
    result = subprocess.run([snakefmt, "--check", "--diff", *map(str, SNAKEFILES)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
