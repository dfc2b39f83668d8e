"""Snakemake rule entry points: each takes the ``snakemake`` object a ``script:`` rule receives."""
from __future__ import annotations

import logging
import shlex
import sys
from contextlib import contextmanager
from typing import Any, Iterator


@contextmanager
def _job_logging(smk: Any) -> Iterator[None]:
    """Log to the rule's log file; an uncaught error is logged there too before it propagates."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if smk.log:
        handlers.append(logging.FileHandler(str(smk.log[0]), mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers, force=True)
    try:
        yield
    except Exception:
        logging.getLogger("spinecohort").exception("rule %s failed", smk.rule)
        raise


def _created_by(smk: Any) -> str:
    return shlex.join(["snakemake", f"rule={smk.rule}", *[f"{k}={v}" for k, v in dict(smk.wildcards).items()]])


def run_stage(smk: Any) -> None:
    from .manifest import read_manifest, write_shard_manifest
    from .pipeline import run_shard_stage

    # torch threads = the CPUs the job was given (set-threads in the SLURM profiles)
    config = {**smk.params.config, "threads": int(smk.threads)}
    shard = int(smk.wildcards.shard)
    with _job_logging(smk):
        if "manifest" in smk.output.keys():  # the first stage: the shard's rows as their own file
            write_shard_manifest(smk.input.manifest, shard, int(config["shard_size"]), smk.output.manifest)
            rows = read_manifest(smk.output.manifest)
        else:  # input.manifest is the shard's own manifest: its rows are the shard
            rows = read_manifest(smk.input.manifest)
        run_shard_stage(smk.params.stage, config, smk.input.manifest, shard, _created_by(smk), rows=rows)


def render_qc(smk: Any) -> None:
    from .manifest import read_manifest
    from .pipeline import render_shard_qc

    with _job_logging(smk):
        render_shard_qc(smk.params.config, smk.input.manifest, int(smk.wildcards.shard),
                        rows=read_manifest(smk.input.manifest))


def cohort_tables(smk: Any) -> None:
    from .pipeline import write_cohort_tables

    with _job_logging(smk):
        write_cohort_tables(smk.params.config, smk.input.manifest, int(smk.params.n_shards), created_by=_created_by(smk))


def report(smk: Any) -> None:
    from .report.stage import build_report

    with _job_logging(smk):
        build_report(smk.params.config, scans=smk.input.scans, discs=smk.input.discs,
                     agreement=smk.input.agreement[0] if smk.input.agreement else None,
                     labels=smk.input.labels[0] if smk.input.labels else None, out=smk.output[0],
                     morphometry=getattr(smk.input, "morphometry", None), change=getattr(smk.input, "change", None),
                     vertebrae=getattr(smk.input, "vertebrae", None), manifest=getattr(smk.input, "manifest", None))


def demo_cohort(smk: Any) -> None:
    from .demo import build_demo_cohort

    with _job_logging(smk):
        build_demo_cohort(smk.params.root, int(smk.params.n_scans), int(smk.params.seed), created_by=_created_by(smk))


def agreement(smk: Any) -> None:
    from .stats import run_agreement

    with _job_logging(smk):
        run_agreement(smk.input.discs, smk.input.labels, smk.output.agreement, n_bootstrap=int(smk.params.bootstrap),
                      seed=int(smk.params.seed), created_by=_created_by(smk),
                      reading_schemes=smk.params.reading_schemes)


# ----------------------------------------------------------------------------- train_grader target
def grader_ivv_table(smk: Any) -> None:
    from .training.grader import write_ivv_table

    with _job_logging(smk):
        write_ivv_table(smk.params.outdir, smk.input.manifest, int(smk.params.n_shards), smk.input.labels,
                        smk.output.table, smk.output.missing, readers=smk.params.readers, created_by=_created_by(smk))


def grader_cv(smk: Any) -> None:
    from .training.grader import run_cv

    config = {**smk.params.config, "threads": int(smk.threads)}
    with _job_logging(smk):
        run_cv(config, smk.input.ivv_table, smk.input.labels, smk.output.oof, smk.output.folds,
               created_by=_created_by(smk))


def grader_final(smk: Any) -> None:
    from .training.grader import run_final

    config = {**smk.params.config, "threads": int(smk.threads)}
    with _job_logging(smk):
        run_final(config, smk.input.ivv_table, smk.input.labels, smk.output.weights, created_by=_created_by(smk))


def grader_card(smk: Any) -> None:
    from .training.grader import write_cv_model_card

    with _job_logging(smk):
        write_cv_model_card(smk.params.config, smk.input.weights, smk.input.ivv_table, smk.input.missing,
                            smk.input.oof, smk.input.agreement, smk.output.json, smk.output.md)
