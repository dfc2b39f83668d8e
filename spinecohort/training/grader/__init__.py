"""Training the disc grader (``spinecohort train grader``, ``snakemake train_grader``).

- :mod:`~spinecohort.training.grader.recipe`: the recipe (:class:`TrainConfig`, targets from
  reads, augmentation, :func:`fit`, :func:`predict_probs`);
- :mod:`~spinecohort.training.grader.cv`: ``cross_validate(ivv_table, labels, k=5, seed=0,
  init_weights=None)``, patient-level k-fold CV on a team's data: out-of-fold predictions in the
  discs-table format (``scan_id, level, <Task>, <Task>_probs``, plus ``subject_id``, ``fold``)
  that go straight into :func:`spinecohort.stats.compute_agreement`, and the fold models;
- :mod:`~spinecohort.training.grader.steps`: ``snakemake --cores N train_grader``
  (workflow/rules/train.smk), the same on the pipeline's own disc volumes, one function per rule:
  :func:`write_ivv_table` (the labelled discs the extract_discs stage wrote), :func:`run_cv`
  (out-of-fold predictions in the discs-table layout, then the agreement stage's code),
  :func:`run_final`; settings from the config's ``grader_training`` keys, outputs under
  ``<outdir>/grader_cv/``;
- :mod:`~spinecohort.training.grader.cards`: the model cards (:func:`write_cv_model_card` is the
  last rule);
- :mod:`~spinecohort.training.grader.synthetic`: ``train_synthetic(out, data_dir, ...)``,
  grader-cpu-v3 (synthetic only): synthetic scans -> IVVs from the truth polygons -> labels = the
  two simulated reads (R1, R1-repeat), evaluated on a held-out synthetic cohort against R1,
  beside R1 vs R1-repeat;
- :mod:`~spinecohort.training.grader.cli`: ``main(argv)``, ``spinecohort train grader
  --ivv-table T --labels L --out DIR [--k 5 --seed S --init-weights W --steps N --final]`` (the
  rule steps on a table of disc volumes) or ``--synthetic --out models/grader-cpu-v3.pt``.
"""
from __future__ import annotations

from .cards import write_cv_model_card, write_model_card
from .cli import build_parser, main
from .cv import cross_validate, load_init_state, patient_folds
from .recipe import (
    TrainConfig,
    augment_batch,
    class_weights,
    fit,
    load_ivv_arrays,
    make_targets,
    predict_probs,
)
from .steps import (
    CV_DIR,
    IVV_STAGE,
    IVV_TABLE_COLUMNS,
    build_ivv_table,
    init_weights_path,
    labelled_discs,
    run_cv,
    run_final,
    train_config,
    write_ivv_table,
)
from .synthetic import (
    READS_SEED,
    SYNTH_TEST_SEEDS,
    SYNTH_TRAIN_SEEDS,
    build_synthetic_cohort,
    evaluate_against_readers,
    train_synthetic,
)

# private helpers the tests exercise, under the names they had in training/grader.py
from .cv import load_init_state as _load_init  # noqa: E402
from .recipe import _PFIRRMANN, _batches_of, _ordinal_loss  # noqa: E402

__all__ = [
    "CV_DIR",
    "IVV_STAGE",
    "IVV_TABLE_COLUMNS",
    "TrainConfig",
    "load_ivv_arrays",
    "make_targets",
    "class_weights",
    "augment_batch",
    "fit",
    "predict_probs",
    "patient_folds",
    "load_init_state",
    "cross_validate",
    "build_synthetic_cohort",
    "train_synthetic",
    "evaluate_against_readers",
    "write_model_card",
    "init_weights_path",
    "train_config",
    "labelled_discs",
    "build_ivv_table",
    "write_ivv_table",
    "run_cv",
    "run_final",
    "write_cv_model_card",
    "build_parser",
    "main",
]
