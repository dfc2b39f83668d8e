"""Model cards: grader-cpu-v3's (:func:`write_model_card`) and the card of a grader trained on a
cohort's own labels by ``snakemake train_grader`` (:func:`write_cv_model_card`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from ...tasks import TASKS
from .recipe import read_frame

__all__ = ["evaluation_table_markdown", "write_model_card", "write_cv_model_card"]


def evaluation_table_markdown(df: pd.DataFrame) -> str:
    """:func:`~spinecohort.training.grader.synthetic.evaluate_against_readers`' table in Markdown."""
    lines = ["| task | discs | model vs R1 (95% CI) | R1 vs R1-repeat (95% CI) | difference | within 3 points |",
             "|---|---:|---|---|---:|:---:|"]
    for _, r in df.iterrows():
        lines.append(f"| {r['task']} | {r['n_discs']} | {r['model_vs_R1']:.3f} ({r['model_ci_low']:.3f}-{r['model_ci_high']:.3f}) "
                     f"| {r['R1_vs_R1repeat']:.3f} ({r['reader_ci_low']:.3f}-{r['reader_ci_high']:.3f}) "
                     f"| {r['difference']:+.3f} | {'yes' if r['within_3_points'] else 'NO'} |")
    return "\n".join(lines)


_POOL_CARD_TEXT = {
    "global": "1x1x1 projection to 256 channels, global average + max pooling",
    "quadrants": "1x1x1 projection to 64 channels, average + max pooling over each quadrant of the (rows, cols) plane",
    "hybrid": ("1x1x1 projection to 128 channels, global average + max pooling of all of them plus average + max"
               " pooling over each quadrant of the (rows, cols) plane of the first 32"),
}


def write_model_card(summary: dict[str, Any], path: str | Path, command: str) -> Path:
    """``models/grader-cpu-v2.md`` from :func:`train_synthetic`'s summary."""
    cfg = summary["config"]
    table = pd.DataFrame(summary["evaluation"])
    truth = summary.get("model_vs_truth_balanced_accuracy", {})
    n_pass = int(table["within_3_points"].sum()) if len(table) else 0
    lines = [
        f"# {Path(summary['path']).stem}: CPU-default disc grading network",
        "",
        "> **Synthetic-trained. Not for research on real scans.** These weights have only ever seen",
        "> synthetic phantoms (`spinecohort.synthetic`). They exist so that the pipeline, its tests",
        "> and the demo run end to end on a CPU, and as a starting point for fine-tuning on a team's",
        f"> own labelled scans (`spinecohort train grader --init-weights models/{Path(summary['path']).name}`).",
        "> Grades they produce on real MRI are meaningless.",
        "",
        "| | |",
        "|---|---|",
        f"| file | `models/{Path(summary['path']).name}` ({summary['bytes'] / 1e6:.2f} MB, fp16 weights) |",
        f"| sha256 | `{summary['sha256']}` |",
        "| format | `torch.load(weights_only=True)` dict: `format=spinecohort-grader`, `arch`, `state_dict`, `meta` |",
        "| loader | `spinecohort.grade.Grader.load(path)` |",
        "| input | IVV (9, 112, 224) = (slices, rows, cols) from `spinecohort.discs.extract_ivvs` |",
        "| output | 11 tasks in SpineNet order, class probabilities on the contract scale |",
        f"| torch | {summary.get('torch')} ({summary.get('threads')} thread) |",
        "",
        "## Architecture",
        "",
        "`spinecohort.nets.grader_cpu.GraderCPU`: 3-D convolution stem (kernel 3x4x4, stride 1x4x4),",
        "three residual blocks (32/64/128 channels) with in-plane and slice striding, "
        + _POOL_CARD_TEXT[cfg["arch"].get("pool", "global")],
        "-> 512-d feature, one 2-layer MLP head per task",
        f"(512 -> {cfg['arch']['head_hidden']} -> classes). Arch: `{json.dumps(cfg['arch'])}`.",
        "",
        "## Data",
        "",
        f"- Training: synthetic scans with seeds {summary['train_seeds'][0]}..{summary['train_seeds'][1] - 1}"
        f" ({summary['n_train_discs']} discs T12-L1..L5-S1; 4 in 5 lumbar field of view, 1 in 5 whole spine;",
        "  T1/T2/STIR as drawn by the generator). Discs cut by the field of view are skipped.",
        "- IVVs are extracted from the *truth* vertebra polygons with `spinecohort.discs.extract_ivvs`.",
        f"- Labels: the simulated reads (`simulate_reads(truth, seed={summary['reads_seed']['train']})`), readers"
        f" {', '.join(summary['train_readers'])}; the reads of a disc are averaged into a soft target",
        "  (what a team with a repeat-read subset has). Truth grades are never used for training.",
        f"- Held-out test cohort: seeds {summary['test_seeds'][0]}..{summary['test_seeds'][1] - 1} (disjoint),"
        f" {summary['n_test_discs']} discs, reads with seed {summary['reads_seed']['test']}.",
        "",
        "## Recipe",
        "",
        f"Phase A (whole network): {cfg['steps']} AdamW steps, batch {cfg['batch_size']}, lr {cfg['lr']}"
        f" (warm-up {cfg['warmup_frac']:.0%}, cosine), weight decay {cfg['weight_decay']}, class weights"
        f" (1/frequency)^{cfg['balance_power_backbone']}; augmentation (ranges x {cfg['aug_strength']}):"
        f" rotation +-8 deg, scale 0.9-1.1, shifts +-8 rows / +-16 cols (p {cfg['affine_p']}), intensity"
        f" scale +-15 % and curve x(1+a(1-x)), |a| <= 0.3, noise s.d. <= 0.03 (p {cfg['noise_p']}); slice-window jitter +-1"
        f" (p {cfg['slice_jitter_p']}); left-right mirroring (p 0.5) with the foraminal labels swapped.",
        f"Phase B (heads on the frozen backbone): features of {cfg['head_views']} views per disc,"
        f" {cfg['head_epochs']} epochs, lr {cfg['head_lr']}, fully class-balanced cross-entropy"
        f" (weights (1/frequency)^{cfg['balance_power_heads']}). Seed {cfg['seed']}; deterministic with"
        " one thread.",
        "",
        f"Training time: {summary['train_seconds'] / 60:.1f} min (phases A+B, 1 torch thread, on the shared"
        " 2-core development machine while other jobs ran); building the synthetic cohorts:"
        f" {summary['data_seconds'] / 60:.1f} min (0 when cached).",
        "",
        "Reproduce:",
        "",
        "```",
        command,
        "```",
        "",
        "(`spinecohort train grader ...` takes the same arguments. The cohorts are cached under",
        "`--data-dir`; with one torch thread the run is deterministic for a given machine.)",
        "",
        "## Evaluation (held-out synthetic cohort)",
        "",
        f"Balanced accuracy with TTA {cfg['tta_eval']}, from `spinecohort.stats.compute_agreement`"
        " (pooled over levels; 95 % subject-bootstrap percentile intervals,"
        f" {summary.get('n_bootstrap', 200)} resamples). Reference: the simulated reader's own repeat agreement"
        " (R1 vs R1-repeat, R1-repeat as reference). Criterion: model vs R1 at least the reader's"
        f" repeat agreement minus 0.03. **{n_pass}/{len(table)} rows meet it.**",
        "",
        evaluation_table_markdown(table) if len(table) else "(no evaluation)",
        "",
    ]
    if truth:
        lines += ["Balanced accuracy against the synthetic truth (for information; a team never has it): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in truth.items()) + ".", ""]
    lines += [
        "## Limitations",
        "",
        "- Synthetic anatomy, contrasts and findings only; no real-scan validation of any kind.",
        "- IVVs from truth polygons; detector/labeller errors in the pipeline are not part of this evaluation.",
        "- Rare grades (central canal stenosis 3-4, spondylolisthesis) have few training examples;"
        " their balanced-accuracy intervals are wide.",
        "",
    ]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path


def write_cv_model_card(config: Mapping[str, Any], weights: str | Path, ivv_table: str | Path, missing: str | Path,
                        oof: str | Path, agreement: str | Path, json_out: str | Path, md_out: str | Path) -> Path:
    """Rule ``grader_card``: ``grader.json`` (everything below, machine-readable) and ``grader.md``
    (the model card) beside the final model: data, recipe, starting weights, and the
    cross-validated agreement of the fold models' out-of-fold predictions with each reader (the
    estimate of how the final model grades scans it has not seen), beside reader-vs-reader
    agreement where the labels have several readers."""
    import torch

    from ...provenance import atomic_write_bytes, sha256_file

    weights = Path(weights)
    payload = torch.load(weights, map_location="cpu", weights_only=True)
    meta = dict(payload.get("meta") or {})
    table = read_frame(ivv_table)
    missing = pd.read_csv(missing, dtype=str)
    predictions = pd.read_parquet(oof)
    agr = pd.read_parquet(agreement)
    pooled = agr[(agr["level"] == "all") & (agr["site"] == "all") & (agr["metric"] == "balanced_accuracy")
                 & agr["ci_method"].isin(["bootstrap_percentile", "none"])]
    comparisons = sorted(pooled["comparison"].unique(), key=lambda c: (not c.startswith("model_vs_"), c))
    evaluation = []
    for task in [t.name for t in TASKS if t.name in set(pooled["task"])]:
        row: dict[str, Any] = {"task": task}
        for comp in comparisons:
            hit = pooled[(pooled["task"] == task) & (pooled["comparison"] == comp)]
            if len(hit):
                r = hit.iloc[0]
                row[comp] = {k: (None if pd.isna(r[k]) else float(r[k])) for k in ("estimate", "ci_low", "ci_high")}
                row[comp]["n_discs"] = int(r["n_discs"])
        evaluation.append(row)
    settings = config["grader_training"]
    summary = {
        "model": weights.stem, "path": str(weights), "sha256": sha256_file(weights), "bytes": weights.stat().st_size,
        "loader": "spinecohort.grade.Grader.load(path)", "meta": meta,
        "data": {"n_labelled_discs_with_ivv": int(len(table)), "n_scans": int(table["scan_id"].nunique()),
                 "n_subjects": int(table["subject_id"].nunique()),
                 "n_labelled_discs_without_ivv": int(len(missing)),
                 "without_ivv_by_reason": {str(k): int(v) for k, v in missing.groupby("reason").size().items()}
                 if len(missing) else {}},
        "cross_validation": {"k": int(settings["k"]), "seed": int(settings["seed"]), "tta": int(config["tta"]),
                             "n_predictions": int(len(predictions)),
                             "folds": {str(f): int(n) for f, n in predictions.groupby("fold").size().items()},
                             "metric": "balanced_accuracy (pooled over levels and sites)",
                             "bootstrap": int(config["agreement"]["bootstrap"]),
                             "evaluation": evaluation},
    }
    atomic_write_bytes(json_out, json.dumps(summary, indent=1, default=str).encode())

    cfg = meta.get("config") or {}
    init = meta.get("init_weights")
    started = "random initialisation" if not init else "`{}` (sha256 `{}...`)".format(init["id"], init["sha256"][:16])
    header = "| task | " + " | ".join(f"{c} (95% CI)" for c in comparisons) + " |"
    lines_eval = [header, "|---|" + "---|" * len(comparisons)]
    for row in evaluation:
        cells = []
        for comp in comparisons:
            v = row.get(comp)
            if v is None or v["estimate"] is None:
                cells.append("" if v is None else f"n/a, n={v['n_discs']}")
                continue
            ci = "no CI" if v["ci_low"] is None else f"{v['ci_low']:.3f}-{v['ci_high']:.3f}"
            cells.append(f"{v['estimate']:.3f} ({ci}), n={v['n_discs']}")
        lines_eval.append(f"| {row['task']} | " + " | ".join(cells) + " |")
    lines = [
        f"# {weights.stem}: disc grader trained on this cohort's labels",
        "",
        "| | |",
        "|---|---|",
        f"| file | `{weights.name}` ({summary['bytes'] / 1e6:.2f} MB, fp16 weights) |",
        f"| sha256 | `{summary['sha256']}` |",
        "| format | `torch.load(weights_only=True)` dict: `format=spinecohort-grader`, `arch`, `state_dict`, `meta` |",
        "| loader | `spinecohort.grade.Grader.load(path)` |",
        f"| started from | {started} |",
        f"| trained | {meta.get('train_seconds', '?')} s on {meta.get('device', '?')} (torch {meta.get('torch', '?')}) |",
        "",
        "## Data",
        "",
        f"- {summary['data']['n_labelled_discs_with_ivv']} labelled discs from {summary['data']['n_scans']} scans of"
        f" {summary['data']['n_subjects']} subjects, as the pipeline extracted them (its own detection, labelling and"
        " disc volumes: what the model will see on the rest of the cohort).",
        f"- Targets: the reads of {', '.join(settings['readers']) if settings.get('readers') else 'every reader'}"
        " (a disc's reads averaged into a soft target).",
        f"- Labelled discs without a disc volume (not used): {summary['data']['n_labelled_discs_without_ivv']}"
        + "".join(f"; {n}: {r}" for r, n in summary["data"]["without_ivv_by_reason"].items()) + " (`missing_discs.csv`).",
        "",
        "## Recipe",
        "",
        f"SpineNetV2-style fine-tuning (`spinecohort.training.grader`): phase A, the whole network, {cfg.get('steps')}"
        f" AdamW steps of batch {cfg.get('batch_size')} (learning rate x {cfg.get('finetune_lr_factor')} when"
        f" fine-tuning); phase B, the heads on the frozen backbone, {cfg.get('head_epochs')} epochs, class-balanced."
        f" Seed {cfg.get('seed')}.",
        "",
        "## Cross-validated agreement",
        "",
        f"{settings['k']}-fold cross-validation at subject level (seed {settings['seed']}; all scans of a subject in"
        " one fold): every labelled disc is predicted once, by the model of the fold that did not train on its"
        " subject (`oof_predictions.parquet`), with the same recipe and starting weights as this model; TTA"
        f" {config['tta']}. Balanced accuracy pooled over levels and sites, 95 % subject-bootstrap intervals"
        f" ({config['agreement']['bootstrap']} resamples); every metric, level and site is in `agreement.parquet`,"
        " the confusion matrices in `confusion.parquet`. These figures estimate how this model (trained on all of"
        " the labelled discs) grades scans it has not seen from the same cohort.",
        "",
        *lines_eval,
        "",
        ("\"no CI\": too few subjects for the subject bootstrap (the `note` column of `agreement.parquet`). "
         if any(v is not None and v.get("ci_low") is None for row in evaluation for v in
                [row.get(c) for c in comparisons]) else "")
        + "The estimate includes the pipeline's own detection and labelling errors on these discs; labelled"
        " discs it did not extract (above) are not in it.",
        "",
        "## Use",
        "",
        "Grade the rest of the cohort with this file as the grading model (README, *Training the grader on your own"
        " labels*).",
        "",
    ]
    atomic_write_bytes(md_out, "\n".join(lines).encode())
    return Path(md_out)
