"""The synthetic-only recipe of grader-cpu-v3: phantom cohorts with simulated reads, training,
and evaluation against the reader's own repeat agreement."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from ...discs import extract_ivvs, save_ivvs, vertebrae_from_synthetic
from ...shipped import default_model_path
from ...tasks import LUMBAR_DISCS, TASKS
from .cards import evaluation_table_markdown, write_model_card
from .recipe import TASK_NAMES, TrainConfig, fit, load_ivv_arrays, make_targets, predict_probs

__all__ = ["build_synthetic_cohort", "evaluate_against_readers", "train_synthetic"]

# the synthetic-only recipe's output: grader-cpu-v3 (no longer the default grader, so it is named
# here rather than taken from shipped.DEFAULT_MODELS, which would overwrite v4 with a 3-D model)
DEFAULT_OUT = default_model_path("grader").parent / "grader-cpu-v3.pt"
DEFAULT_DATA_DIR = Path("/tmp/grader_data")
SYNTH_TRAIN_SEEDS = (100_000, 101_600)  # [start, stop)
SYNTH_STEPS = 8800  # phase-A steps of the synthetic-only grader-cpu-v3 (twice a team run's default)
SYNTH_TEST_SEEDS = (900_000, 900_250)
READS_SEED = {"train": 11, "test": 12}


def _synthetic_fov(seed: int) -> str:
    """Lumbar for 4 seeds in 5, whole spine otherwise (cervical scans hold no graded lumbar disc)."""
    return "whole" if seed % 5 == 0 else "lumbar"


def _one_synthetic(args: tuple[int, str, tuple[str, ...]]) -> list[dict]:
    seed, out_dir, levels = args
    from ...synthetic import generate_scan

    scan_id = f"syn{seed:06d}"
    path = Path(out_dir) / "ivv" / f"{scan_id}.npz"
    side = path.with_suffix(".json")
    if path.exists() and side.exists():  # cached by an interrupted earlier run
        return json.loads(side.read_text())
    scan = generate_scan(seed, fov=_synthetic_fov(seed))
    keep = {d.level: d for d in scan.discs if d.level in levels and not d.partial}
    ivvs = [v for v in extract_ivvs(scan.volume, scan.pixel_spacing_mm, vertebrae_from_synthetic(scan), levels)
            if v.level in keep]
    save_ivvs(path, ivvs)
    rows = [{"scan_id": scan_id, "subject_id": scan_id, "level": v.level, "path": str(path),
             "contrast": scan.contrast, "fov": scan.fov, **{t: int(keep[v.level].grades[t]) for t in TASK_NAMES}}
            for v in ivvs]
    side.write_text(json.dumps(rows))
    return rows


def build_synthetic_cohort(out_dir: str | Path, seeds: Sequence[int], reads_seed: int,
                           levels: Sequence[str] = LUMBAR_DISCS, workers: int = 1,
                           log: Callable[[str], None] = print) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Synthetic scans -> per-scan IVV files (from the truth polygons; discs cut by the field of
    view skipped), ``ivv_table.csv``, ``truth.csv`` and ``labels.csv`` (two simulated reads, R1
    and R1-repeat, seeded ``reads_seed``) under ``out_dir``. Cached: the tables are reused when
    ``cohort.json`` matches the seeds, and each scan's IVVs and truth (``ivv/<scan_id>.npz`` /
    ``.json``) whenever present."""
    from ...synthetic import simulate_reads

    out_dir = Path(out_dir)
    done = out_dir / "ivv_table.csv"
    seeds = [int(s) for s in seeds]
    key = {"seeds_sha": hashlib.sha256(json.dumps(seeds).encode()).hexdigest(), "n_scans": len(seeds),
           "reads_seed": int(reads_seed), "levels": list(levels)}
    key_file = out_dir / "cohort.json"
    if done.exists() and key_file.exists() and json.loads(key_file.read_text()) == key:
        return pd.read_csv(done), pd.read_csv(out_dir / "truth.csv"), pd.read_csv(out_dir / "labels.csv")
    (out_dir / "ivv").mkdir(parents=True, exist_ok=True)
    jobs = [(s, str(out_dir), tuple(levels)) for s in seeds]
    rows: list[dict] = []
    t0 = time.time()
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for i, r in enumerate(pool.imap(_one_synthetic, jobs, chunksize=4)):
                rows.extend(r)
                if (i + 1) % 50 == 0:
                    log(f"synthetic {i + 1}/{len(jobs)} scans, {time.time() - t0:.0f} s")
    else:
        for i, job in enumerate(jobs):
            rows.extend(_one_synthetic(job))
            if (i + 1) % 50 == 0:
                log(f"synthetic {i + 1}/{len(jobs)} scans, {time.time() - t0:.0f} s")
    full = pd.DataFrame(rows)
    table = full[["scan_id", "subject_id", "level", "path", "contrast", "fov"]]
    truth = full[["scan_id", "level", *TASK_NAMES]]
    labels = simulate_reads(truth, reads_seed)
    truth.to_csv(out_dir / "truth.csv", index=False)
    labels.to_csv(out_dir / "labels.csv", index=False)
    table.to_csv(done, index=False)
    key_file.write_text(json.dumps(key))
    return table, truth, labels


def evaluate_against_readers(preds: pd.DataFrame, labels: pd.DataFrame, n_bootstrap: int = 200,
                             seed: int = 0, reader: str = "R1", repeat: str = "R1-repeat") -> pd.DataFrame:
    """Pooled balanced accuracy, model vs ``reader`` beside ``reader`` vs ``repeat``, per task
    (with :func:`spinecohort.stats.compute_agreement`; bootstrap percentile CIs)."""
    from ...stats import compute_agreement

    agr, _ = compute_agreement(preds, labels, n_bootstrap=n_bootstrap, seed=seed, by_level=False, by_site=False)
    agr = agr[(agr["level"] == "all") & (agr["site"] == "all") & (agr["metric"] == "balanced_accuracy")]
    agr = agr[agr["ci_method"].isin(["bootstrap_percentile", "none"])]
    out = []
    a_b = f"{reader}_vs_{repeat}" if reader < repeat else f"{repeat}_vs_{reader}"
    for task in agr["task"].unique():
        m = agr[(agr["task"] == task) & (agr["comparison"] == f"model_vs_{reader}")]
        r = agr[(agr["task"] == task) & (agr["comparison"] == a_b)]
        if m.empty or r.empty:
            continue
        m, r = m.iloc[0], r.iloc[0]
        out.append({"task": task, "n_discs": int(m["n_discs"]),
                    "model_vs_R1": float(m["estimate"]), "model_ci_low": float(m["ci_low"]), "model_ci_high": float(m["ci_high"]),
                    "R1_vs_R1repeat": float(r["estimate"]), "reader_ci_low": float(r["ci_low"]), "reader_ci_high": float(r["ci_high"]),
                    "difference": float(m["estimate"] - r["estimate"]),
                    "within_3_points": bool(m["estimate"] >= r["estimate"] - 0.03)})
    return pd.DataFrame(out)


def train_synthetic(out: str | Path = DEFAULT_OUT, data_dir: str | Path = DEFAULT_DATA_DIR,
                    config: TrainConfig | None = None, train_seeds: tuple[int, int] = SYNTH_TRAIN_SEEDS,
                    test_seeds: tuple[int, int] = SYNTH_TEST_SEEDS, workers: int = 1,
                    n_bootstrap: int = 200, log: Callable[[str], None] = print,
                    readers: Sequence[str] = ("R1", "R1-repeat"), command: str | None = None) -> dict[str, Any]:
    """Build (or reuse) the synthetic training and held-out cohorts, train, evaluate, save.

    Writes ``out`` and its model card ``out.with_suffix('.md')``; the summary (returned), the
    evaluation table and the test predictions go to ``data_dir/eval/<stem>.eval.json``,
    ``.eval.csv`` and ``.test_predictions.parquet``."""
    import torch

    from ...grade import grades_frame, save_grader
    from ...provenance import sha256_file

    cfg = config or TrainConfig()
    if set(range(*train_seeds)) & set(range(*test_seeds)):
        raise ValueError("training and test seeds overlap")
    data_dir = Path(data_dir)
    t0 = time.time()
    tab_tr, _, lab_tr = build_synthetic_cohort(data_dir / "train", range(*train_seeds), READS_SEED["train"], workers=workers, log=log)
    tab_te, truth_te, lab_te = build_synthetic_cohort(data_dir / "test", range(*test_seeds), READS_SEED["test"], workers=workers, log=log)
    t_data = time.time() - t0
    log(f"data: {len(tab_tr)} training discs, {len(tab_te)} test discs ({t_data:.0f} s)")
    X, keys = load_ivv_arrays(tab_tr)
    targets = make_targets(keys, lab_tr, readers)
    t1 = time.time()
    net = fit(X, targets, cfg, log=log)
    t_train = time.time() - t1
    del X
    Xt, keys_t = load_ivv_arrays(tab_te)
    probs = predict_probs(net, Xt, tta=cfg.tta_eval)
    preds = grades_frame(keys_t.to_dict("records"), [{t.name: probs[j][i] for j, t in enumerate(TASKS)} for i in range(len(Xt))])
    table = evaluate_against_readers(preds, lab_te, n_bootstrap=n_bootstrap, seed=cfg.seed)
    truth_ba = evaluate_against_readers(preds, truth_te.assign(reader="truth").pipe(
        lambda d: pd.concat([d, lab_te[lab_te["reader"] == "R1"]], ignore_index=True)), n_bootstrap=0,
        reader="truth", repeat="R1")
    meta = {
        "model": Path(out).stem, "trained_on": "synthetic phantoms only (spinecohort.synthetic); NOT for research on real scans",
        "train_seeds": list(train_seeds), "test_seeds": list(test_seeds), "reads_seed": READS_SEED,
        "train_readers": list(readers), "n_train_discs": int(len(keys)), "n_test_discs": int(len(keys_t)),
        "config": asdict(cfg), "train_seconds": round(t_train, 1), "data_seconds": round(t_data, 1),
        "torch": str(torch.__version__), "threads": torch.get_num_threads(),
    }
    out = Path(out)
    save_grader(out, net, meta, half=True)
    summary = {"path": str(out), "sha256": sha256_file(out), "bytes": out.stat().st_size, **meta,
               "evaluation": table.to_dict("records"),
               "model_vs_truth_balanced_accuracy": {r["task"]: r["model_vs_R1"] for r in truth_ba.to_dict("records")}}
    summary["n_bootstrap"] = n_bootstrap
    aux = data_dir / "eval"  # evaluation artefacts stay beside the data, not in models/
    aux.mkdir(parents=True, exist_ok=True)
    table.to_csv(aux / f"{out.stem}.eval.csv", index=False)
    (aux / f"{out.stem}.eval.json").write_text(json.dumps(summary, indent=1, default=str))
    preds.to_parquet(aux / f"{out.stem}.test_predictions.parquet", index=False)
    write_model_card(summary, out.with_suffix(".md"), command or
                     f".venv/bin/python -m spinecohort.training.grader --synthetic --out {out} --data-dir {data_dir}")
    log("\n" + evaluation_table_markdown(table))
    log(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB, sha256 {summary['sha256']})")
    return summary
