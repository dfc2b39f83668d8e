"""Reading schemes: labels on another scale mapped onto a binary view of model tasks, checked
against agreement computed by hand; unknown label columns are reported, not dropped silently."""
from __future__ import annotations

import logging

import pandas as pd
import pytest

from spinecohort.config import ConfigError, resolve_config
from spinecohort.schemes import label_columns, parse_reading_schemes
from spinecohort.stats import compute_agreement

# eight discs of four subjects; the model grades Narrowing 1-4 and each marrow side 0/1
PREDICTIONS = pd.DataFrame({
    "scan_id": [f"s{i // 2}" for i in range(8)],
    "level": ["L4-L5", "L5-S1"] * 4,
    "Narrowing": [1, 2, 3, 1, 2, 4, 1, 1],
    "UpperMarrow": [0, 0, 1, 0, 0, 1, 1, 0],
    "LowerMarrow": [0, 1, 0, 0, 0, 1, 0, 0],
})
# SPIDER's scales: binary narrowing, Modic type 0-3 (5 is off the scale: not graded), bulging
LABELS = PREDICTIONS[["scan_id", "level"]].assign(
    reader="R1",
    SPIDER_Narrowing=[0, 1, 1, 1, 0, 1, 0, None],
    SPIDER_Modic=[0, 2, 0, 1, 0, 3, 0, 5],
    SPIDER_Bulging=[1, 0, 0, 1, 0, 1, 0, 0],
    Foo=["x"] * 8,
)


def _pooled(agreement, task, comparison="model_vs_R1"):
    rows = agreement[(agreement["task"] == task) & (agreement["level"] == "all") & (agreement["site"] == "all")
                     & (agreement["comparison"] == comparison) & (agreement["ci_method"] == "none")]
    return rows.set_index("metric")


def test_spider_schemes_against_hand_computed_agreement(caplog):
    with caplog.at_level(logging.WARNING):
        agreement, confusion = compute_agreement(PREDICTIONS, LABELS, n_bootstrap=0)
    assert {"Narrowing>1", "Marrow(any)"} <= set(agreement["task"])
    # Narrowing>1: reader 0/1 vs model Narrowing > 1 on discs 1-7 (disc 8 not read):
    # (r, m) = 00 11 11 10 01 11 00 -> TP 3, FN 1, FP 1, TN 2
    n = _pooled(agreement, "Narrowing>1")
    assert n.loc["accuracy", "n_discs"] == 7 and n.loc["n_missing_model", "estimate"] == 0
    assert n.loc["accuracy", "estimate"] == pytest.approx(5 / 7)
    assert n.loc["sensitivity", "estimate"] == pytest.approx(3 / 4)
    assert n.loc["specificity", "estimate"] == pytest.approx(2 / 3)
    assert n.loc["balanced_accuracy", "estimate"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert n.loc["cohen_kappa", "estimate"] == pytest.approx((5 / 7 - 25 / 49) / (1 - 25 / 49))
    assert "kappa_linear" not in n.index  # a binary view: binary metrics only
    # Marrow(any): Modic > 0 vs UpperMarrow or LowerMarrow; Modic 5 is off the scale
    # (r, m) = 00 11 01 10 00 11 01 -> TP 2, FN 1, FP 2, TN 2
    m = _pooled(agreement, "Marrow(any)")
    assert m.loc["accuracy", "n_discs"] == 7
    assert m.loc["sensitivity", "estimate"] == pytest.approx(2 / 3)
    assert m.loc["specificity", "estimate"] == pytest.approx(2 / 4)
    assert m.loc["prevalence_reader", "estimate"] == pytest.approx(3 / 7)
    assert m.loc["prevalence_model", "estimate"] == pytest.approx(4 / 7)
    cells = confusion[(confusion["task"] == "Marrow(any)") & (confusion["level"] == "all")]
    counts = {(r, g): c for r, g, c in zip(cells["reader_grade"], cells["model_grade"], cells["count"])}
    assert counts == {(0, 0): 2, (0, 1): 2, (1, 0): 1, (1, 1): 2}
    # columns that match nothing are named in the log, with why
    text = caplog.text
    assert "SPIDER_Bulging" in text and "Foo" in text and "no reading scheme" in text
    assert "SPIDER_Modic: 1 value(s) outside" in text


def test_reader_pairs_use_the_readers_view_on_both_sides():
    second = LABELS.assign(reader="R2")
    second.loc[0, "SPIDER_Narrowing"] = 1  # one disagreement; disc 8 is read by neither
    agreement, _ = compute_agreement(PREDICTIONS, pd.concat([LABELS, second]), n_bootstrap=0)
    pair = _pooled(agreement, "Narrowing>1", "R1_vs_R2")
    assert pair.loc["accuracy", "n_discs"] == 7
    assert pair.loc["accuracy", "estimate"] == pytest.approx(6 / 7)
    assert _pooled(agreement, "Marrow(any)", "R1_vs_R2").loc["accuracy", "estimate"] == 1.0


def test_schemes_passed_replace_the_defaults_and_unknown_columns_are_listed():
    schemes = {"PF_high": {"task": "Pfirrmann>3", "values": [0, 1], "positive": [1],
                           "model_tasks": ["Pfirrmann"], "model_above": 3}}
    preds = PREDICTIONS.assign(Pfirrmann=[1, 4, 5, 2, 3, 4, 1, 2])
    labels = LABELS.assign(PF_high=[0, 1, 1, 0, 1, 1, 0, 0])
    agreement, _ = compute_agreement(preds, labels, n_bootstrap=0, reading_schemes=schemes)
    assert "Narrowing>1" not in set(agreement["task"])
    assert _pooled(agreement, "Pfirrmann>3").loc["accuracy", "estimate"] == pytest.approx(7 / 8)
    status = {e["column"]: e["status"] for e in label_columns(labels.columns, preds.columns,
                                                               parse_reading_schemes(schemes))}
    assert status == {"SPIDER_Narrowing": "unknown", "SPIDER_Modic": "unknown", "SPIDER_Bulging": "unknown",
                      "Foo": "unknown", "PF_high": "scheme"}
    # a scheme whose model tasks the predictions lack cannot be mapped, and says so
    default = {e["column"]: e for e in label_columns(LABELS.columns, ["scan_id", "level", "Narrowing"],
                                                      parse_reading_schemes(None))}
    assert default["SPIDER_Narrowing"]["status"] == "scheme"
    assert default["SPIDER_Modic"]["status"] == "unmappable" and "UpperMarrow" in default["SPIDER_Modic"]["detail"]


def test_config_validates_reading_schemes():
    config = resolve_config({})
    assert config["reading_schemes"]["SPIDER_Modic"]["task"] == "Marrow(any)"
    bad = {"X": {"task": "x", "values": [0, 1], "positive": [2], "model_tasks": ["Narrowing"], "model_above": 1}}
    with pytest.raises(ConfigError, match="reading_schemes.X: positive"):
        resolve_config({"reading_schemes": bad})
    with pytest.raises(ConfigError, match="reading_schemes/X"):
        resolve_config({"reading_schemes": {"X": {"task": "x"}}})
