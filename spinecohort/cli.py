"""The ``spinecohort`` command."""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from . import __version__


def _created_by(argv: list[str]) -> str:
    return shlex.join(["spinecohort", *argv])


def _demo_cohort(args: argparse.Namespace, argv: list[str]) -> int:
    from .demo import build_demo_cohort

    paths = build_demo_cohort(args.out, args.n_scans, args.seed, created_by=_created_by(argv))
    print(f"wrote {args.n_scans} synthetic scans; manifest {paths['manifest']}")
    return 0


def _agreement(args: argparse.Namespace, argv: list[str]) -> int:
    from .stats.cli import agreement_command

    return agreement_command(args, created_by=_created_by(argv))


def add_agreement_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``agreement`` command's arguments (also :func:`spinecohort.stats.agreement_cli`'s)."""
    parser.add_argument("discs", help="predictions table (Parquet, CSV or TSV) with scan_id, level, <task> columns")
    parser.add_argument("labels", help="radiologist labels (CSV, TSV or Parquet): scan_id, level, <task columns>, "
                                       "optional reader")
    parser.add_argument("-o", "--out", required=True, help="agreement Parquet to write")
    parser.add_argument("--confusion", default=None, help="confusion Parquet (default: beside OUT)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _predict(args: argparse.Namespace, argv: list[str]) -> int:
    import pandas as pd

    from .config import load_config
    from .pipeline import run_in_process
    from .provenance import atomic_write_bytes

    outdir = Path(args.out).resolve()
    overrides = {"outdir": str(outdir), "shard_size": 1, "manifest": str(outdir / "manifest.csv")}
    if args.family:
        overrides["models"] = {"family": args.family, "dir": args.models_dir}
    if args.precision:
        overrides.setdefault("models", {})["precision"] = args.precision
    config = load_config(args.config, overrides)
    scan_id = args.scan_id or "scan"
    manifest = pd.DataFrame([{"scan_id": scan_id, "subject_id": scan_id, "path": str(Path(args.path).resolve()),
                              "series": args.series or ""}])
    atomic_write_bytes(outdir / "manifest.csv", manifest.to_csv(index=False).encode())
    paths = run_in_process(config, outdir / "manifest.csv", created_by=_created_by(argv))
    scans = pd.read_parquet(paths["scans"])
    row = scans.iloc[0]
    if row["status"] != "ok":
        print(f"failed at {row['failed_stage']}: {row['error']}", file=sys.stderr)
        return 1
    print(f"{scan_id}: {int(row['n_vertebrae'])} vertebrae, {int(row['n_discs'])} discs; tables in {outdir / 'tables'}")
    return 0


# Sub-tools with their own argument parsers: (command, target) -> module whose main(argv) runs it.
DELEGATED = {
    ("train", "detector"): "spinecohort.training.detector",
    ("train", "labeller"): "spinecohort.training.labeller",
    ("train", "grader"): "spinecohort.training.grader",
    ("evaluate", "detection"): "spinecohort.evaluation.detection",
    ("evaluate", "labelling"): "spinecohort.evaluation.labelling",
    ("evaluate", "morphometry"): "spinecohort.evaluation.morphometry",
}


def _delegate(args: argparse.Namespace, argv: list[str]) -> int:
    import importlib

    module = importlib.import_module(DELEGATED[(args.command, args.target)])
    return int(module.main(list(args.rest)) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spinecohort", description=__doc__)
    parser.add_argument("--version", action="version", version=f"spinecohort {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo-cohort", help="write a synthetic DICOM cohort with manifest, labels and truth")
    demo.add_argument("out")
    demo.add_argument("--n-scans", type=int, default=12)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_demo_cohort)

    agreement = sub.add_parser("agreement", help="agreement of predicted grades with radiologist labels")
    add_agreement_arguments(agreement).set_defaults(handler=_agreement)

    predict = sub.add_parser("predict", help="run every stage on one scan without Snakemake")
    predict.add_argument("path", help="DICOM folder, .zip or NIfTI file")
    predict.add_argument("-o", "--out", required=True)
    predict.add_argument("--scan-id", default=None)
    predict.add_argument("--series", default=None, help="SeriesInstanceUID or SeriesDescription substring")
    predict.add_argument("--config", default=None, help="a config YAML (defaults otherwise)")
    predict.add_argument("--family", choices=["cpu-default", "spinenet-official"], default=None)
    predict.add_argument("--models-dir", default=None, help="official checkpoint folder (with --family spinenet-official)")
    predict.add_argument("--precision", choices=["float32", "bfloat16"], default=None,
                         help="arithmetic of the official networks (config models.precision)")
    predict.set_defaults(handler=_predict)

    for command, help_text in (("train", "train a model (see `spinecohort train TARGET --help`)"),
                               ("evaluate", "evaluate a stage (see `spinecohort evaluate TARGET --help`)")):
        tool = sub.add_parser(command, help=help_text)
        tool.add_argument("target", choices=sorted(t for c, t in DELEGATED if c == command))
        tool.add_argument("rest", nargs=argparse.REMAINDER, help="the target's own arguments")
        tool.set_defaults(handler=_delegate)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args.handler(args, argv) or 0)
    except (ValueError, OSError) as error:
        print(f"spinecohort {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
