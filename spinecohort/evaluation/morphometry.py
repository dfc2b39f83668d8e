"""Accuracy of the morphometry: vertebral body heights and depth from the shipped detector's
corners (with the endplate refinement the pipeline stores, :func:`spinecohort.detect.refine_endplates`,
as the checkpoint's ``refine_endplates`` says) against the same quantities from a reference
(``spinecohort evaluate morphometry`` or ``python -m spinecohort.evaluation.morphometry``).

- Real scans: the public-lumbar validation cases (case number divisible by 5). Reference: the
  expert vertebral-body mask of each body, turned into corners by
  :func:`spinecohort.publiclumbar.quad_from_mask` (per slice, the mask pixels furthest along the
  body's diagonals, on its minimal-area rectangle) and measured with the very same formulas
  (:func:`spinecohort.morphometry.body_measures`). The ivd cases have disc masks only; their
  bodies are the spaces between consecutive annotated discs (reported apart, ``derived``).
- Phantoms (:mod:`spinecohort.synthetic`): reference = the exact corners the phantom was drawn
  from, measured with the same formulas.

A body counts when exactly one detection contains its annotated centroid on its mid slice (the
detection evaluation's SpineNet criterion). As in the morphometry table, a body whose detected
polygon has a corner outside the image (cut by the field of view) is not measured: it is counted
(``n_cut``) and left out of the agreement; sacral segments are not measured either (the table
gives them no body measures: fused, S1 has no inferior endplate). Two pairings are reported: ``end_to_end`` (each side
on its own mid-sagittal slice, the pipeline's choice from its detection and the reference's from
the mask centroid, as a user would get them) and ``same_slice`` (the reference re-measured on the
pipeline's slice: landmark error alone). Figures: mean absolute difference (MAD) and Bland-Altman
bias and 95 % limits of agreement (bias +- 1.96 SD of pipeline minus reference), in mm.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..geometry import mid_slice, outside_image
from ..morphometry import SACRAL_LEVELS, body_measures, height_loss, to_mm
from ..shipped import default_model

__all__ = ["agreement", "measure_pairs", "evaluate", "main"]

QUANTITIES = ("height_anterior_mm", "height_middle_mm", "height_posterior_mm", "depth_mm")
HEIGHTS = QUANTITIES[:3]


def agreement(diffs: Sequence[float]) -> dict[str, float]:
    """n, mean absolute difference, Bland-Altman bias, SD and 95 % limits of agreement."""
    d = np.asarray(list(diffs), dtype=float)
    d = d[np.isfinite(d)]
    if not len(d):
        return {"n": 0, "mad": float("nan"), "bias": float("nan"), "sd": float("nan"),
                "loa_low": float("nan"), "loa_high": float("nan")}
    bias = float(d.mean())
    sd = float(d.std(ddof=1)) if len(d) > 1 else 0.0
    return {"n": int(len(d)), "mad": float(np.abs(d).mean()), "bias": bias, "sd": sd,
            "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd}


def measure_pairs(detections: Sequence, case, derived: Iterable[str] = ()) -> list[dict[str, Any]]:
    """One record per matched annotated body: the pipeline's and the reference's measures
    (end-to-end and same-slice), the slices used and the level."""
    from .detection import contains_centroid

    derived = set(derived)
    spacing = case.pixel_spacing_mm
    out = []
    for body in case.bodies:
        hits = [d for d in detections if contains_centroid(d, body)]
        if len(hits) != 1 or not body.polygons or body.level in SACRAL_LEVELS:  # the table does not measure them
            continue
        det = hits[0]
        s_pipe = mid_slice(det.polygons, det.centroid[0])
        s_ref = body.mid()
        if s_ref not in body.polygons:
            continue
        pipe = body_measures(to_mm(det.polygons[s_pipe], spacing))
        cut = outside_image(det.polygons[s_pipe], case.volume.shape[1:])
        if cut:
            pipe = dict.fromkeys(pipe, float("nan"))
        ref = body_measures(to_mm(body.polygons[s_ref], spacing))
        same = body_measures(to_mm(body.polygons[s_pipe], spacing)) if s_pipe in body.polygons else None
        out.append({"case": case.name, "source": case.source, "level": body.level, "derived": body.level in derived,
                    "slice_pipeline": int(s_pipe), "slice_reference": int(s_ref), "cut": cut,
                    "pipeline": pipe, "reference": ref, "reference_same_slice": same})
    return out


def _summaries(records: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"n_bodies": len(records), "n_cut": sum(r.get("cut", False) for r in records),
                           "slice_agrees": float(np.mean([r["slice_pipeline"] == r["slice_reference"] for r in records]))
                           if records else float("nan")}
    for pairing, key in (("end_to_end", "reference"), ("same_slice", "reference_same_slice")):
        block: dict[str, Any] = {}
        for q in QUANTITIES:
            block[q] = agreement([r["pipeline"][q] - r[key][q] for r in records if r[key] is not None])
        block["heights_pooled"] = agreement([r["pipeline"][q] - r[key][q] for r in records if r[key] is not None
                                             for q in HEIGHTS])
        block["heights_and_depth_pooled"] = agreement([r["pipeline"][q] - r[key][q] for r in records
                                                       if r[key] is not None for q in QUANTITIES])
        # ratios are unitless; the flags use the within-body losses only (crush needs the levels' neighbours),
        # of the bodies the pipeline measured
        block["wedge_ratio"] = agreement([r["pipeline"]["wedge_ratio"] - r[key]["wedge_ratio"] for r in records
                                          if r[key] is not None])
        block["flagged_pipeline"], block["flagged_reference"] = (
            sum(_flagged(r[k]) for r in records if r[key] is not None and not r.get("cut")) for k in ("pipeline", key))
        out[pairing] = block
    return out


def _flagged(measures: dict[str, float]) -> bool:
    """Height loss >= 20 % (Genant grade >= 1) by wedging or middle-height loss."""
    return bool(height_loss(measures["wedge_ratio"], measures["concavity_ratio"], float("nan"))[0] >= 0.20)


def _run(detector, cases, derived_of, batch: int, log) -> list[dict[str, Any]]:
    records = []
    for i in range(0, len(cases), batch):
        chunk = cases[i:i + batch]
        dets = detector.detect_batch([c.volume for c in chunk], [c.pixel_spacing_mm for c in chunk], search_below=False)
        for c, d in zip(chunk, dets):
            got = measure_pairs(d, c, derived_of(c))
            records += got
            if log:
                log(f"{c.name}: {len(got)} of {len(c.bodies)} bodies measured")
    return records


def evaluate(detector, *, public_root=None, split: str = "val", n_synthetic: int = 0, seed: int = 0,
             fov: str | None = "lumbar", batch: int = 2, log=None) -> dict[str, Any]:
    """Public-lumbar (``public_root``: None = the default folder, False = skip) and
    ``n_synthetic`` held-out phantoms; returns the summaries and every record."""
    from .detection import public_lumbar_detection_cases, synthetic_detection_cases

    result: dict[str, Any] = {}
    t0 = time.perf_counter()
    if public_root is not False:
        from .. import publiclumbar as pl

        cases = public_lumbar_detection_cases(public_root or None, split)
        derived = {}
        for ref in pl.list_cases(public_root or None, split=split):
            loaded = pl.load_case(ref)
            derived[ref.name] = {s.level for s in loaded.vertebrae if s.derived}
        records = _run(detector, cases, lambda c: derived.get(c.name, set()), batch, log)
        masks = [r for r in records if not r["derived"]]
        result["public_lumbar"] = {
            "split": split, "n_scans": len(cases),
            "mask_bodies": _summaries(masks),
            "disc_derived_bodies": _summaries([r for r in records if r["derived"]]),
            "by_source": {s: _summaries([r for r in masks if r["source"] == s])
                          for s in sorted({r["source"] for r in masks})},
            "records": records,
        }
    if n_synthetic > 0:
        cases = synthetic_detection_cases(n_synthetic, seed, fov)
        records = _run(detector, cases, lambda c: set(), batch, log)
        result["synthetic"] = {"n_scans": len(cases), "seed": seed, "fov": fov or "mixed",
                               **_summaries(records), "records": records}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _line(name: str, s: dict[str, float]) -> str:
    return (f"  {name:22s} n {s['n']:4d}  MAD {s['mad']:.2f} mm  bias {s['bias']:+.2f} mm  "
            f"LoA [{s['loa_low']:+.2f}, {s['loa_high']:+.2f}] mm")


def format_summary(title: str, summary: dict[str, Any]) -> str:
    lines = [f"{title}: {summary['n_bodies']} bodies ({summary['n_cut']} cut by the image border, not measured); "
             f"pipeline and reference on the same mid slice for {100 * summary['slice_agrees']:.0f} %"]
    for pairing in ("end_to_end", "same_slice"):
        lines.append(f" {pairing}:")
        for q in (*QUANTITIES, "heights_pooled", "heights_and_depth_pooled"):
            lines.append(_line(q, summary[pairing][q]))
        w = summary[pairing]["wedge_ratio"]
        lines.append(f"  {'wedge_ratio (Ha/Hp)':22s} n {w['n']:4d}  MAD {w['mad']:.3f}  bias {w['bias']:+.3f}  "
                     f"LoA [{w['loa_low']:+.3f}, {w['loa_high']:+.3f}]; bodies with >= 20 % wedge/middle height loss: "
                     f"pipeline {summary[pairing]['flagged_pipeline']}, reference {summary[pairing]['flagged_reference']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spinecohort evaluate morphometry",
                                description="Body heights/depth from the detector vs expert masks and phantom geometry.")
    from .detection import add_detector_case_arguments

    add_detector_case_arguments(p)
    p.add_argument("--fov", default="lumbar", help="phantom field of view (lumbar, whole, cervical, mixed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the summaries and per-body records here")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    if a.public_lumbar is None and a.synthetic <= 0:
        p.error("nothing to evaluate: give --public-lumbar [DIR] and/or --synthetic N")
    import torch

    from ..detect import Detector

    torch.set_num_threads(a.threads)
    model = a.model or str(default_model("detector"))
    result = evaluate(Detector.load(model), public_root=False if a.public_lumbar is None else (a.public_lumbar or None),
                      split=a.split, n_synthetic=a.synthetic, seed=a.seed,
                      fov=None if a.fov == "mixed" else a.fov,
                      log=(lambda m: print("  " + m, flush=True)) if a.verbose else None)
    result["model"] = model
    if "public_lumbar" in result:
        pl = result["public_lumbar"]
        print(format_summary(f"public-lumbar {a.split} ({pl['n_scans']} scans), expert vertebral-body masks", pl["mask_bodies"]))
        for source, s in pl["by_source"].items():
            print(format_summary(f"  {source}", s))
        if pl["disc_derived_bodies"]["n_bodies"]:
            print(format_summary("public-lumbar bodies between annotated discs (ivd)", pl["disc_derived_bodies"]))
    if "synthetic" in result:
        sy = result["synthetic"]
        print(format_summary(f"phantoms ({sy['n_scans']} scans, fov {sy['fov']}, seed {sy['seed']}), exact geometry", sy))
    print(f"seconds {result['seconds']}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
