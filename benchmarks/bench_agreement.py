#!/usr/bin/env python
"""Time ``spinecohort.stats.compute_agreement`` on a large synthetic cohort.

Default: 100,000 discs (16,667 subjects x 6 levels, 3 sites), every contract task (11 + the
derived CentralCanalStenosisBinary), one reader (one ``model_vs_R1`` comparison), 2,000
subject-clustered bootstrap resamples. Prints the seconds for

* ``pooled``: the pooled stratum only (level = site = all), and
* ``full``: pooled + per-level + per-site strata (what the pipeline emits),

each including input shaping, confusion tables and the analytic intervals.

    python benchmarks/bench_agreement.py [--discs 100000] [--bootstrap 2000] [--skip-full]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from spinecohort.stats import compute_agreement
from spinecohort.tasks import LUMBAR_DISCS, TASKS


def synthetic(n_discs: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    levels = np.array(LUMBAR_DISCS)
    n_subj = -(-n_discs // len(levels))
    subj = np.repeat(np.arange(n_subj), len(levels))[:n_discs]
    base = pd.DataFrame({
        "scan_id": pd.Series(subj).map("scan{:06d}".format),
        "subject_id": pd.Series(subj).map("sub{:06d}".format),
        "site": np.array(["A", "B", "C"])[subj % 3],
        "level": np.tile(levels, n_subj)[:n_discs],
    })
    preds, labels = base.copy(), base[["scan_id", "level"]].copy()
    for task in TASKS:
        grades = np.asarray(task.grades)
        truth = rng.choice(grades, n_discs)
        noisy = np.where(rng.random(n_discs) < 0.3, rng.choice(grades, n_discs), truth)
        preds[task.name] = noisy
        labels[task.name] = truth.astype(float)
    labels["reader"] = "R1"
    return preds, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--discs", type=int, default=100_000)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-full", action="store_true", help="time the pooled stratum only")
    args = ap.parse_args()

    preds, labels = synthetic(args.discs, args.seed)
    n_subj = preds["subject_id"].nunique()
    print(f"discs={len(preds)} subjects={n_subj} tasks={len(TASKS)}+1 derived "
          f"bootstrap={args.bootstrap}")
    t0 = time.perf_counter()
    agreement, _ = compute_agreement(preds, labels, n_bootstrap=args.bootstrap, seed=args.seed,
                                     by_level=False, by_site=False)
    t1 = time.perf_counter()
    print(f"pooled: {t1 - t0:.2f} s ({len(agreement)} rows)")
    if not args.skip_full:
        t0 = time.perf_counter()
        agreement, _ = compute_agreement(preds, labels, n_bootstrap=args.bootstrap,
                                         seed=args.seed)
        t1 = time.perf_counter()
        n_strata = agreement[["level", "site"]].drop_duplicates().shape[0]
        print(f"full ({n_strata} strata): {t1 - t0:.2f} s ({len(agreement)} rows)")


if __name__ == "__main__":
    main()
