"""Evaluation of the pipeline's stages against annotations (``spinecohort evaluate ...``).

Detection (:func:`evaluate_detection`) follows SpineNet's criterion: a ground-truth vertebral
body is *found* when its centroid lies inside exactly one detected quadrilateral on the body's
mid slice; a detection is a *false positive* when it contains no annotated centroid and overlaps
no visible-but-unannotated body (public-lumbar: detections above the top or below the bottom
annotated body are not counted; synthetic: partial bodies cut by the field of view are ignored).
Localisation error is the distance (mm) between the annotated and the detected centroid.

Functions here are self-contained per stage; other stages' evaluations live beside them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..geometry import centroid_mid_slice, point_in_quad, polygon_iou, side_of_line
from ..shipped import default_model

__all__ = [
    "EvalBody",
    "DetectionCase",
    "public_lumbar_detection_cases",
    "synthetic_case",
    "synthetic_detection_cases",
    "contains_centroid",
    "match_detections",
    "evaluate_detection",
    "detection_main",
    "main",
]


# ---------------------------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------------------------
@dataclass
class EvalBody:
    centroid: tuple[float, float, float]                 # (slice, row, col)
    polygons: dict[int, np.ndarray] = field(default_factory=dict)
    level: str | None = None
    mid_slice: int | None = None

    def mid(self) -> int:
        if self.mid_slice is not None:
            return int(self.mid_slice)
        return centroid_mid_slice(self.polygons, self.centroid[0])


@dataclass
class DetectionCase:
    """One scan with its annotated bodies for detection evaluation."""

    name: str
    volume: np.ndarray                                   # (slices, rows, cols)
    pixel_spacing_mm: tuple[float, float]
    slice_spacing_mm: float
    bodies: list[EvalBody]                               # annotated: must be found
    ignored: list[EvalBody] = field(default_factory=list)  # visible, unannotated: never FP
    counted: Callable[[np.ndarray], np.ndarray] | None = None  # (n,2) (row,col) -> bool: counts?
    fov: str = "unknown"
    source: str = ""
    contrast: str = ""


def public_lumbar_detection_cases(root=None, split: str = "val") -> list[DetectionCase]:
    """Public-lumbar cases of one split: vb3 (mask-derived bodies L1-L5) and ivd (bodies L2-L5
    between annotated discs). Detections above the top / below the bottom annotated body are not
    counted."""
    from .. import publiclumbar as pl

    cases = []
    for ref in pl.list_cases(root, split=split):
        case = pl.load_case(ref)
        verts = [v for v in case.vertebrae if v.polygons]
        if not verts:
            continue
        lines = pl.annotated_extent_lines(verts, margin_px=2.0)

        def counted(points, lines=lines):
            return ~pl.outside_annotated(points, lines)

        bodies = [EvalBody(v.centroid, v.polygons, v.level, v.mid_slice) for v in verts]
        cases.append(DetectionCase(case.name, case.volume, case.pixel_spacing_mm, case.slice_spacing_mm,
                                   bodies, [], counted, "lumbar", f"public-lumbar/{case.source}",
                                   "T1-water" if case.source == "vb3" else "T2"))
    return cases


def synthetic_case(scan, name: str | None = None, count_below_s1: bool = False) -> DetectionCase:
    """A :class:`DetectionCase` from a :class:`spinecohort.synthetic.SyntheticScan`.

    Partial bodies (cut by the field of view) are ignored. The phantoms draw the sacral segments
    below S1 (S2..S5) without annotating them, so, as for public-lumbar's unlabelled neighbours,
    detections below S1's inferior endplate are not counted unless ``count_below_s1``."""
    ps = scan.pixel_spacing_mm
    spacing = (float(ps[0]), float(ps[1])) if np.ndim(ps) else (float(ps), float(ps))
    bodies, ignored = [], []
    for v in scan.vertebrae:
        polys = {int(s): np.asarray(q, float) for s, q in v.polygons.items()}
        b = EvalBody(tuple(float(x) for x in v.centroid), polys, getattr(v, "level", None))
        (ignored if getattr(v, "partial", False) else bodies).append(b)
    thick = float(getattr(scan, "slice_spacing_mm", None) or getattr(scan, "slice_thickness_mm", 1.0))
    counted = None
    s1 = next((b for b in bodies if b.level == "S1" and b.polygons), None)
    if s1 is not None and not count_below_s1:
        q = s1.polygons[s1.mid()]
        p0, p1 = q[3] + [2.0, 0.0], q[2] + [2.0, 0.0]  # S1's inferior edge, 2 px lower

        def counted(points, p0=p0, p1=p1):
            return side_of_line(points, p0, p1) <= 0

    return DetectionCase(name or f"synthetic-{scan.fov}-{scan.contrast}", np.asarray(scan.volume, np.float32),
                         spacing, thick, bodies, ignored, counted, str(scan.fov), "synthetic", str(scan.contrast))


def synthetic_detection_cases(n: int, seed: int = 0, fov: str | None = None,
                              contrast: str | None = None, base_seed: int = 10_000_000,
                              count_below_s1: bool = False) -> list[DetectionCase]:
    """``n`` held-out synthetic scans (seeds ``base_seed + 1000 * seed + i``, disjoint from the
    training seeds), cycling through fields of view and contrasts unless fixed."""
    from .. import synthetic

    fovs = ("lumbar", "whole", "cervical")
    contrasts = ("T1", "T2", "STIR")
    cases = []
    for i in range(n):
        f = fov or fovs[i % len(fovs)]
        c = contrast or contrasts[(i // len(fovs)) % len(contrasts)]
        sc = synthetic.generate_scan(base_seed + 1000 * seed + i, fov=f, contrast=c)
        cases.append(synthetic_case(sc, f"synthetic-{i}-{sc.fov}-{sc.contrast}", count_below_s1))
    return cases


def contains_centroid(det, body: EvalBody) -> bool:
    """Whether the detection's polygon on the body's mid slice (or one slice away) contains the
    body's centroid: SpineNet's criterion for a detection of that body."""
    q = det.polygon_near(body.mid(), 1)
    return q is not None and point_in_quad(body.centroid[1:], q)


def _overlaps(det, body: EvalBody) -> bool:
    if contains_centroid(det, body):
        return True
    for s, q in body.polygons.items():
        if s in det.polygons and polygon_iou(det.polygons[s], q) > 0.0:
            return True
    return False


def match_detections(detections: Sequence, case: DetectionCase) -> dict[str, Any]:
    """Per-case matching under SpineNet's criterion; returns counts, errors and per-detection
    status (``tp``, ``fp`` or ``ignored``)."""
    sr, sc = case.pixel_spacing_mm
    ss = case.slice_spacing_mm
    found, errors, errors_2d, missed = 0, [], [], []
    for b in case.bodies:
        hits = [d for d in detections if contains_centroid(d, b)]
        if len(hits) == 1:
            found += 1
            d = hits[0]
            dz, dr, dc = (np.subtract(d.centroid, b.centroid)) * np.array([ss, sr, sc])
            errors.append(float(np.sqrt(dz * dz + dr * dr + dc * dc)))
            errors_2d.append(float(np.hypot(dr, dc)))
        else:
            missed.append({"level": b.level, "centroid": [round(x, 1) for x in b.centroid], "hits": len(hits)})
    status = []
    for d in detections:
        if any(contains_centroid(d, b) for b in case.bodies):
            status.append("tp")
        elif any(_overlaps(d, b) for b in case.ignored):
            status.append("ignored")
        elif case.counted is not None and not bool(case.counted(np.array([d.centroid[1:]]))[0]):
            status.append("ignored")
        else:
            status.append("fp")
    return {"n_gt": len(case.bodies), "found": found, "tp": status.count("tp"), "fp": status.count("fp"),
            "ignored": status.count("ignored"), "errors_mm": errors, "errors_inplane_mm": errors_2d,
            "missed": missed, "status": status}


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n_gt = sum(r["n_gt"] for r in rows)
    found = sum(r["found"] for r in rows)
    tp = sum(r["tp"] for r in rows)
    fp = sum(r["fp"] for r in rows)
    err = [e for r in rows for e in r["errors_mm"]]
    err2 = [e for r in rows for e in r["errors_inplane_mm"]]
    return {
        "n_scans": len(rows),
        "n_gt": n_gt,
        "found": found,
        "detections_tp": tp,
        "detections_fp": fp,
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": found / n_gt if n_gt else float("nan"),
        "loc_error_mm_mean": float(np.mean(err)) if err else float("nan"),
        "loc_error_mm_median": float(np.median(err)) if err else float("nan"),
        "loc_error_inplane_mm_mean": float(np.mean(err2)) if err2 else float("nan"),
        "loc_error_mm_p95": float(np.percentile(err, 95)) if err else float("nan"),
    }


def evaluate_detection(detector, cases: Iterable[DetectionCase], batch: int = 4,
                       progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Precision, recall and localisation error of ``detector`` (a
    :class:`spinecohort.detect.Detector`) over ``cases``, overall and per field of view and
    source. Scans are run ``batch`` at a time through ``detector.detect_batch``."""
    cases = list(cases)
    rows = []
    t0 = time.perf_counter()
    for i in range(0, len(cases), max(1, batch)):
        chunk = cases[i:i + batch]
        dets = detector.detect_batch([c.volume for c in chunk], [c.pixel_spacing_mm for c in chunk], search_below=False)
        for c, d in zip(chunk, dets):
            m = match_detections(d, c)
            m.update({"name": c.name, "fov": c.fov, "source": c.source, "contrast": c.contrast,
                      "n_detections": len(d)})
            rows.append(m)
            if progress:
                progress(f"{c.name}: gt {m['n_gt']} found {m['found']} fp {m['fp']} dets {len(d)}")
    result: dict[str, Any] = {"overall": _summary(rows), "seconds": round(time.perf_counter() - t0, 1)}
    for key in ("fov", "source", "contrast"):
        groups: dict[str, list] = {}
        for r in rows:
            groups.setdefault(r[key], []).append(r)
        result[f"by_{key}"] = {k: _summary(v) for k, v in sorted(groups.items())}
    result["cases"] = [{k: v for k, v in r.items() if k not in ("status",)} for r in rows]
    return result


def _fmt(s: dict[str, Any]) -> str:
    return (f"scans {s['n_scans']:3d}  bodies {s['n_gt']:4d}  precision {100 * s['precision']:6.2f} %  "
            f"recall {100 * s['recall']:6.2f} %  loc.err {s['loc_error_mm_mean']:.2f} mm "
            f"(in-plane {s['loc_error_inplane_mm_mean']:.2f}, median {s['loc_error_mm_median']:.2f}, "
            f"p95 {s['loc_error_mm_p95']:.2f})  FP {s['detections_fp']}")


def add_detector_case_arguments(p: argparse.ArgumentParser) -> None:
    """The options every evaluation of the detector's output shares: which detector, which
    public-lumbar split, how many held-out phantoms of which seed, threads, output."""
    p.add_argument("--model", default=None, help="detector checkpoint (default: the shipped one in models/)")
    p.add_argument("--public-lumbar", nargs="?", const="", default=None, metavar="DIR",
                   help="evaluate on public-lumbar (default folder ../shared/data/public-lumbar)")
    p.add_argument("--split", default="val", choices=("val", "train"))
    p.add_argument("--synthetic", type=int, default=0, metavar="N", help="N held-out phantoms")
    p.add_argument("--seed", type=int, default=0)


def detection_main(argv: Sequence[str] | None = None) -> int:
    """``spinecohort evaluate detection``."""
    p = argparse.ArgumentParser(prog="spinecohort evaluate detection",
                                description="Detection precision/recall/localisation error (SpineNet criterion).")
    add_detector_case_arguments(p)
    p.add_argument("--fov", default=None, choices=("lumbar", "whole", "cervical"))
    p.add_argument("--contrast", default=None, choices=("T1", "T2", "STIR"))
    p.add_argument("--count-below-s1", action="store_true",
                   help="synthetic: count detections of the unannotated sacral segments below S1 as false positives")
    p.add_argument("--json", default=None, help="write the full result here")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    import torch

    from ..detect import Detector

    torch.set_num_threads(a.threads)
    model = a.model or str(default_model("detector"))
    det = Detector.load(model)
    if a.public_lumbar is None and a.synthetic <= 0:
        p.error("nothing to evaluate: give --public-lumbar [DIR] and/or --synthetic N")
    results = {"model": model}
    log = (lambda m: print("  " + m, flush=True)) if a.verbose else None
    if a.public_lumbar is not None:
        cases = public_lumbar_detection_cases(a.public_lumbar or None, a.split)
        results["public_lumbar"] = evaluate_detection(det, cases, progress=log)
        print(f"public-lumbar {a.split}: " + _fmt(results["public_lumbar"]["overall"]))
        for k, v in results["public_lumbar"]["by_source"].items():
            print(f"  {k:22s} " + _fmt(v))
    if a.synthetic > 0:
        cases = synthetic_detection_cases(a.synthetic, a.seed, a.fov, a.contrast, count_below_s1=a.count_below_s1)
        results["synthetic"] = evaluate_detection(det, cases, progress=log)
        rule = "counted" if a.count_below_s1 else "not counted"
        print(f"synthetic (n={a.synthetic}, seed={a.seed}; detections below S1 {rule}): "
              + _fmt(results["synthetic"]["overall"]))
        for k, v in results["synthetic"]["by_fov"].items():
            print(f"  fov {k:18s} " + _fmt(v))
        for k, v in results["synthetic"]["by_contrast"].items():
            print(f"  contrast {k:13s} " + _fmt(v))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=1, default=float))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``spinecohort evaluate detection ...``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "detection":
        return detection_main(argv[1:])
    return detection_main(argv)


if __name__ == "__main__":
    sys.exit(main())
