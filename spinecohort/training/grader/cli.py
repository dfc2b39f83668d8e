"""Training the disc grader (``spinecohort train grader``): the synthetic-only grader-cpu-v3 (the
shipped default until grader-cpu-v4, :mod:`spinecohort.training.grader_real`), and a team's own
data with patient-level k-fold cross-validation and fine-tuning.

``--ivv-table T --labels L --out DIR`` runs the steps of ``snakemake train_grader``
(:func:`~spinecohort.training.grader.steps.run_cv`, and with ``--final``
:func:`~spinecohort.training.grader.steps.run_final`) on a table of disc volumes, plus the
out-of-fold agreement; ``--synthetic`` reproduces grader-cpu-v3
(:func:`~spinecohort.training.grader.synthetic.train_synthetic`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .. import ProgressLog
from .recipe import TrainConfig, read_frame
from .steps import run_cv, run_final
from .synthetic import DEFAULT_DATA_DIR, SYNTH_STEPS, SYNTH_TEST_SEEDS, SYNTH_TRAIN_SEEDS, train_synthetic

__all__ = ["build_parser", "main"]

DEFAULT_LOG = Path("/tmp/grader_train.log")


def _config_from_args(args) -> TrainConfig:
    cfg = TrainConfig(seed=args.seed)
    if args.steps is not None:
        cfg.steps = args.steps
    if args.head_epochs is not None:
        cfg.head_epochs = args.head_epochs
    if args.batch_size is not None:
        cfg.batch_size = args.batch_size
    cfg.tta_eval = args.tta
    if args.pool is not None:
        cfg.arch["pool"] = args.pool
    return cfg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spinecohort train grader", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ivv-table", help="CSV/Parquet: scan_id, subject_id, level, path (per-scan IVV .npz)")
    p.add_argument("--labels", help="labels CSV/Parquet: scan_id, level, <Task>..., optional reader")
    p.add_argument("--out", required=True, help="output folder (CV) or .pt file (--synthetic)")
    p.add_argument("--k", type=int, default=5, help="folds (patient level)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-weights", default=None, help="grader checkpoint to fine-tune from (e.g. the shipped one in models/)")
    p.add_argument("--readers", default=None, help="comma-separated readers whose reads are the targets (default all)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"phase-A steps per model (default {TrainConfig.steps}; {SYNTH_STEPS} with --synthetic)")
    p.add_argument("--head-epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--tta", type=int, default=4)
    p.add_argument("--pool", choices=["global", "quadrants", "hybrid"], default=None,
                   help="feature pooling of a new network (spinecohort.nets.grader_cpu; default: DEFAULT_ARCH's)")
    p.add_argument("--final", action="store_true", help="after CV, also train on all labelled discs -> OUT/grader.pt")
    p.add_argument("--synthetic", action="store_true", help="reproduce the synthetic-only grader-cpu-v3 (--out models/grader-cpu-v3.pt)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="synthetic cohort cache (with --synthetic)")
    p.add_argument("--workers", type=int, default=1, help="processes generating synthetic scans")
    p.add_argument("--train-seeds", type=int, nargs=2, default=list(SYNTH_TRAIN_SEEDS), metavar=("START", "STOP"),
                   help="synthetic training scan seeds [START, STOP) (with --synthetic)")
    p.add_argument("--test-seeds", type=int, nargs=2, default=list(SYNTH_TEST_SEEDS), metavar=("START", "STOP"),
                   help="held-out synthetic scan seeds [START, STOP) (with --synthetic)")
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--log", default=str(DEFAULT_LOG))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(max(1, args.threads))
    log = ProgressLog(args.log)

    cfg = _config_from_args(args)
    readers = args.readers.split(",") if args.readers else None
    if args.synthetic:
        if args.steps is None:
            cfg.steps = SYNTH_STEPS
        command = ".venv/bin/python -m spinecohort.training.grader " + " ".join(list(sys.argv[1:] if argv is None else argv))
        train_synthetic(args.out, args.data_dir, cfg, train_seeds=tuple(args.train_seeds),
                        test_seeds=tuple(args.test_seeds), workers=args.workers, n_bootstrap=args.bootstrap, log=log,
                        readers=readers or ("R1", "R1-repeat"), command=command)
        return 0
    if not args.ivv_table or not args.labels:
        print("spinecohort train grader: --ivv-table and --labels are required (or --synthetic)", file=sys.stderr)
        return 2
    import pandas as pd

    from ...stats import compute_agreement

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the settings in the layout of the pipeline config, so that the rule steps run unchanged
    config = {"grader_training": {"k": args.k, "seed": args.seed, "init_weights": args.init_weights,
                                  "readers": readers, "final": args.final},
              "tta": args.tta, "device": "cpu", "threads": max(1, args.threads)}
    oof = run_cv(config, args.ivv_table, args.labels, out / "oof_predictions.parquet", out, recipe=cfg, log=log)
    agr, conf = compute_agreement(pd.read_parquet(oof), read_frame(args.labels), n_bootstrap=args.bootstrap,
                                  seed=args.seed)
    agr.to_parquet(out / "oof_agreement.parquet", index=False)
    conf.to_parquet(out / "oof_confusion.parquet", index=False)
    log(f"wrote {out / 'oof_predictions.parquet'} and {out / 'oof_agreement.parquet'}")
    if args.final:
        run_final(config, args.ivv_table, args.labels, out / "grader.pt", recipe=cfg, log=log)
    return 0
