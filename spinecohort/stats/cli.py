"""The ``spinecohort agreement`` command (its arguments: :func:`spinecohort.cli.add_agreement_arguments`)."""
from __future__ import annotations

import argparse
from typing import Sequence

from .io import run_agreement


def agreement_command(args: argparse.Namespace, created_by: str | None = None) -> int:
    out, conf = run_agreement(args.discs, args.labels, args.out, args.bootstrap, args.seed,
                              confusion_path=args.confusion, created_by=created_by)
    print(f"wrote {out} and {conf}")
    return 0


def agreement_cli(argv: Sequence[str] | None = None) -> int:
    """``spinecohort agreement`` from Python: ``DISCS LABELS -o OUT.parquet [--bootstrap N]
    [--seed S] [--confusion PATH]``."""
    from ..cli import add_agreement_arguments

    parser = argparse.ArgumentParser(prog="spinecohort agreement",
                                     description="Agreement of predicted disc grades with readers.")
    return agreement_command(add_agreement_arguments(parser).parse_args(argv))
