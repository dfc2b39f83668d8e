"""Labelling evaluation: the mode that simulates a detector missing the sacrum."""
from __future__ import annotations

from spinecohort.detect import Detector
import math

from spinecohort.evaluation.labelling import evaluate_scan, gt_from_polys, level_ordinal
from spinecohort.label import Labeller
from spinecohort.shipped import default_model_path
from spinecohort.synthetic import generate_scan


def test_end2end_no_sacrum_drops_only_the_detections_below_the_lowest_annotated_body():
    scan = generate_scan(6, fov="lumbar", contrast="T2", n_slices=9, rows=256)
    sp = (scan.pixel_spacing_mm, scan.pixel_spacing_mm)
    # annotated as on public-lumbar: the lumbar bodies only, the sacrum visible but unannotated
    gt = [gt_from_polys(v.level, v.polygons, v.centroid, sp, v.partial) for v in scan.vertebrae
          if v.level.startswith("L")]
    assert any(v.level == "S1" for v in scan.vertebrae)
    labeller = Labeller.load(default_model_path("appearance"), default_model_path("context"))
    res = evaluate_scan(scan.volume, sp, scan.slice_spacing_mm, gt, labeller,
                        Detector.load(default_model_path("detector")), modes=("end2end", "end2end-no-sacrum"))
    full, cut = res["end2end"], res["end2end-no-sacrum"]
    assert "S1" in full["labels"] and "S1" not in cut["labels"]
    assert cut["n_detections"] < full["n_detections"]
    # every annotated body is still detected: only the sacrum went
    assert cut["detected"] == full["detected"] == full["n"]


def test_level_ordinal_places_transitional_and_sacral_labels_between_their_neighbours():
    assert level_ordinal("S1") == 0.0 and level_ordinal("L5") == 1.0
    assert level_ordinal("L6") == 0.5          # between S1 and L5
    assert level_ordinal("T13") == 5.5         # between L1 and T12
    assert level_ordinal("S2") == -1.0 and level_ordinal("C1") == 24.0
    assert math.isnan(level_ordinal(None)) and math.isnan(level_ordinal("X9"))
