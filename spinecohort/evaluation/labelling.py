"""Evaluation of vertebra labelling (``spinecohort evaluate labelling``).

Identification rate (IDR): the fraction of ground-truth vertebral bodies that are detected AND
given the right level; IDR+-1: detected and given a level at most one step away (S2 and L6 / T13
count as half steps beside their neighbours, C1 one step above C2). A detection matches a
ground-truth body when its in-plane centroid lies within half the body's height (mm) of the body's
centroid; matching is one-to-one, nearest pairs first. Bodies cut by the image border
(``partial``) are not counted (their detections are not penalised either).

Datasets:

- ``public-lumbar``: the VALIDATION split of ``../shared/data/public-lumbar`` (case number
  divisible by 5). Ground truth = the annotated bodies (L1-L5 of the vb3 cases; L2-L5 between
  the annotated discs of the ivd cases). Detections of the visible but unannotated S1 / T12 are
  neither rewarded nor penalised.
- ``synthetic-lumbar`` / ``synthetic-whole`` / ``synthetic-cervical``: phantoms
  ``generate_scan(seed_base + k, fov=...)`` with seeds disjoint from training (training uses
  0 .. n_synthetic-1; the default base here is 1 000 000, a separate base per field of view).

``lab|det`` (``label_acc_detected``) is the labelling accuracy among detected bodies: IDR / detected.

Modes per dataset: ``end2end`` (the shipped detector, then the labeller on its detections),
``truth`` (the labeller alone on the ground-truth polygons), ``perturbed`` (the labeller on
the ground-truth polygons jittered like a detector's, each body dropped with p = 0.1, seeded by
the scan name: labelling robustness to missed detections independent of the detector) and
``end2end-no-sacrum`` (as ``end2end`` with every detection below the lowest annotated body
removed: on public-lumbar, where L5 is the lowest annotated body, a detector that misses the
sacrum, as on unfamiliar scanners; on phantoms, whose sacrum is annotated, the same as
``end2end``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..shipped import default_model_path
from ..tasks import LEVEL_INDEX

__all__ = ["level_ordinal", "match_bodies", "gt_from_polys", "evaluate_scan", "evaluate_labelling", "main"]

SEED_BASE = {"lumbar": 1_000_000, "whole": 2_000_000, "cervical": 3_000_000}
#: positions of the labels outside LEVELS on the LEVEL_INDEX scale (S1 = 0 ... C2 = 23)
_EXTRA_ORDINAL = {"S2": -1.0, "L6": 0.5, "T13": 5.5, "C1": 24.0}



def level_ordinal(name: str | None) -> float:
    """Position of a level name on the caudal -> cranial axis (S1 = 0 ... C2 = 23)."""
    if name is None:
        return float("nan")
    if name in LEVEL_INDEX:
        return float(LEVEL_INDEX[name])
    return _EXTRA_ORDINAL.get(name, float("nan"))


@dataclass
class GTBody:
    level: str
    centre_mm: tuple[float, float]        # (row, col) in mm
    height_mm: float
    partial: bool = False
    polygons: dict = field(default_factory=dict, repr=False)
    centroid: tuple[float, float, float] = (0.0, 0.0, 0.0)


def match_bodies(gt: Sequence[GTBody], det_centres_mm: np.ndarray) -> dict[int, int]:
    """Ground-truth index -> detection index (one-to-one, nearest pairs first, within half the
    ground-truth body's height)."""
    pairs = []
    for i, g in enumerate(gt):
        for j, c in enumerate(det_centres_mm):
            d = math.hypot(c[0] - g.centre_mm[0], c[1] - g.centre_mm[1])
            if d <= max(0.5 * g.height_mm, 4.0):
                pairs.append((d, i, j))
    pairs.sort()
    out, used = {}, set()
    for d, i, j in pairs:
        if i in out or j in used:
            continue
        out[i] = j
        used.add(j)
    return out


def gt_from_polys(level, polygons, centroid, spacing, partial=False) -> GTBody:
    from ..label import vertebra_geometry

    g = vertebra_geometry(polygons, centroid)
    h = (g.bottom - g.top) * spacing[0]
    return GTBody(level, (g.centroid[1] * spacing[0], g.centroid[2] * spacing[1]), max(h, 4.0), partial,
                  polygons, g.centroid)


def evaluate_scan(volume, spacing, slice_spacing, gt: Sequence[GTBody], labeller, detector=None,
                  modes: Sequence[str] = ("end2end", "truth"), name: str = "", drop_p: float = 0.1
                  ) -> dict[str, dict[str, Any]]:
    """Per-mode counts for one scan: n (counted bodies), detected, correct, within1, and details."""
    res = {}
    counted = [i for i, g in enumerate(gt) if not g.partial]
    detected = None  # (detections, seconds): one detector run serves both end-to-end modes
    for mode in modes:
        t0 = time.perf_counter()
        if mode in ("end2end", "end2end-no-sacrum"):
            if detector is None:
                continue
            if detected is None:
                detected = (detector.detect(volume, spacing), time.perf_counter() - t0)
            dets, seconds = detected
            t0 = time.perf_counter() - seconds  # detect_s: the detector's time in either mode
            if mode == "end2end-no-sacrum" and gt:
                # a detector that misses the sacrum: nothing below the lowest annotated body is kept
                low = max(gt, key=lambda g: g.centre_mm[0])
                limit = low.centre_mm[0] + 0.5 * low.height_mm
                dets = [d for d in dets if d.centroid[1] * spacing[0] <= limit]
            verts = dets  # label_scan reads polygons, centroid and found_at_low_threshold off each
            centres = np.array([[d.centroid[1] * spacing[0], d.centroid[2] * spacing[1]] for d in dets]).reshape(-1, 2)
        elif mode == "perturbed":
            from ..label import vertebra_geometry
            from ..geometry import jitter_polygons

            rng = np.random.default_rng([zlib.crc32(str(name).encode()), 5])
            verts, cl = [], []
            for g in gt:
                if rng.random() < drop_p:
                    continue
                jp = jitter_polygons(g.polygons, rng, 1.0)
                geo = vertebra_geometry(jp, None)
                verts.append({"polygons": jp, "centroid": geo.centroid})
                cl.append((geo.centroid[1] * spacing[0], geo.centroid[2] * spacing[1]))
            centres = np.array(cl).reshape(-1, 2)
        else:
            verts = [{"polygons": g.polygons, "centroid": g.centroid} for g in gt]
            centres = np.array([g.centre_mm for g in gt]).reshape(-1, 2)
        t1 = time.perf_counter()
        labels, summary, maps = labeller.label_scan(volume, spacing, slice_spacing, verts, with_maps=True)
        t2 = time.perf_counter()
        match = match_bodies(gt, centres)
        det = cor = w1 = 0
        detail, p_ok, p_bad, calib_bodies = [], [], [], []
        for i in counted:
            j = match.get(i)
            pred = labels[j][0] if j is not None else None
            if j is not None and pred is not None:
                (p_ok if pred == gt[i].level else p_bad).append(float(labels[j][1]))
            ok = pred == gt[i].level
            ok1 = j is not None and pred is not None and abs(level_ordinal(pred) - level_ordinal(gt[i].level)) <= 1.0
            det += j is not None
            cor += bool(ok)
            w1 += bool(ok1)
            detail.append((gt[i].level, pred))
            if j is not None and pred is not None:
                calib_bodies.append((maps["rank_of"][j], pred == gt[i].level))
        # the lowest counted body (L5 in a lumbar field of view): the anchor every disc name hangs on
        bottom = max(counted, key=lambda i: gt[i].centre_mm[0]) if counted else None
        bottom_ok = None
        if bottom is not None:
            j = match.get(bottom)
            bottom_ok = bool(j is not None and labels[j][0] == gt[bottom].level)
        res[mode] = {"n": len(counted), "detected": det, "correct": cor, "within1": w1, "bottom_ok": bottom_ok,
                     "level_confidence": summary.confidence, "level_flags": summary.flags_text,
                     "n_detections": len(verts), "detect_s": t1 - t0, "label_s": t2 - t1,
                     "p_correct": p_ok, "p_wrong": p_bad, "calibration": _calibration_record(maps, calib_bodies),
                     "pairs": detail, "labels": [lab for lab, _ in labels]}
    return res


def _calibration_record(maps: dict, bodies: Sequence[tuple[int, bool]]) -> dict[str, Any]:
    """What :func:`spinecohort.label.fit_probability_calibration` learns from: the matched bodies'
    raw probabilities and correctness, and whether the scan was flagged."""
    if "raw_probabilities" not in maps or not bodies:
        return {"correct": [], "raw": [], "flagged": False}
    group_of = {r: gi for gi, members in enumerate(maps["groups"]) for r in members}
    return {"correct": [bool(ok) for _, ok in bodies],
            "raw": [float(maps["raw_probabilities"][group_of[r]]) for r, _ in bodies],
            "flagged": bool(maps["summary"].flags)}


def calibration_rows(scans: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw probability, scan flagged, correct) per labelled body of ``scans`` (rows of
    :func:`evaluate_labelling`'s ``scans``)."""
    raw, flagged, ok = [], [], []
    for r in scans:
        c = r.get("calibration") or {}
        raw += c.get("raw", [])
        ok += c.get("correct", [])
        flagged += [bool(c.get("flagged"))] * len(c.get("raw", []))
    return np.array(raw, float), np.array(flagged, bool), np.array(ok, bool)


def _public_split_of(name: str) -> str | None:
    """'train' / 'val' of a public-lumbar case name (``vb3_08``), None if it has no number."""
    from ..publiclumbar import split_of

    num = name.rsplit("_", 1)[-1]
    return split_of(int(num)) if num.isdigit() else None


def _public_lumbar_scans(root=None, split: str | None = "val", source: str | None = None
                        ) -> Iterable[tuple[str, Any, tuple, float, list[GTBody]]]:
    from ..publiclumbar import list_cases, load_case

    for ref in list_cases(root, split=split, source=source):
        case = load_case(ref)
        gt = [gt_from_polys(v.level, v.polygons, v.centroid, case.pixel_spacing_mm)
              for v in case.vertebrae if v.polygons and v.level in LEVEL_INDEX]
        gt.sort(key=lambda g: -g.centre_mm[0])
        yield ref.name, case.volume, case.pixel_spacing_mm, case.slice_spacing_mm, gt


def _synthetic_scans(fov: str, n: int, seed_base: int | None = None):
    from ..synthetic import generate_scan

    base = SEED_BASE[fov] if seed_base is None else seed_base
    for k in range(n):
        seed = base + k
        scan = generate_scan(seed, fov=fov)
        sp = (scan.pixel_spacing_mm, scan.pixel_spacing_mm)
        gt = [gt_from_polys(v.level, v.polygons, v.centroid, sp, v.partial) for v in scan.vertebrae]
        yield f"synthetic-{fov}-{seed}", scan.volume, sp, scan.slice_spacing_mm, gt


RELIABILITY_BINS = (0.0, 0.5, 0.7, 0.9, 0.97, 1.0)


def reliability(p_correct: Sequence[float], p_wrong: Sequence[float],
                bins: Sequence[float] = RELIABILITY_BINS) -> dict[str, Any]:
    """Reliability of ``level_probability``: per probability bin the number of labelled bodies,
    their mean probability and the fraction labelled right, and the expected calibration error
    (bin-size weighted mean |accuracy - mean probability|)."""
    p = np.array(list(p_correct) + list(p_wrong), float)
    ok = np.array([True] * len(p_correct) + [False] * len(p_wrong))
    rows, ece = [], 0.0
    for lo, hi in zip(bins[:-1], bins[1:]):
        sel = (p >= lo) & ((p < hi) if hi < bins[-1] else (p <= hi))
        if not sel.any():
            rows.append({"bin": f"{lo:.2f}-{hi:.2f}", "n": 0, "mean_p": float("nan"), "accuracy": float("nan")})
            continue
        mean_p, acc = float(p[sel].mean()), float(ok[sel].mean())
        ece += sel.sum() / len(p) * abs(acc - mean_p)
        rows.append({"bin": f"{lo:.2f}-{hi:.2f}", "n": int(sel.sum()), "mean_p": mean_p, "accuracy": acc})
    return {"bins": rows, "ece": float(ece) if len(p) else float("nan")}


def _summary(rows: list[dict]) -> dict[str, Any]:
    n = sum(r["n"] for r in rows)
    out = {"scans": len(rows), "bodies": n}
    if n:
        out["detected"] = sum(r["detected"] for r in rows) / n
        out["IDR"] = sum(r["correct"] for r in rows) / n
        out["IDR_within1"] = sum(r["within1"] for r in rows) / n
        det = sum(r["detected"] for r in rows)
        out["label_acc_detected"] = sum(r["correct"] for r in rows) / det if det else float("nan")
        out["scans_all_correct"] = float(np.mean([r["correct"] == r["n"] for r in rows]))
        bottoms = [r["bottom_ok"] for r in rows if r.get("bottom_ok") is not None]
        out["bottom_level_right"] = float(np.mean(bottoms)) if bottoms else float("nan")
        out["label_s_median"] = float(np.median([r["label_s"] for r in rows]))
        pc = [p for r in rows for p in r["p_correct"]]
        pw = [p for r in rows for p in r["p_wrong"]]
        out["mean_probability_correct"] = float(np.mean(pc)) if pc else float("nan")
        out["mean_probability_wrong"] = float(np.mean(pw)) if pw else float("nan")
        out["reliability"] = reliability(pc, pw)
        # does the scan-level doubt point a reviewer at the scans that are wrong?
        wrong = [r for r in rows if r["correct"] < r["detected"]]
        out["scans_flagged"] = float(np.mean([bool(r["level_flags"]) for r in rows]))
        out["wrong_scans_flagged"] = (float(np.mean([bool(r["level_flags"]) for r in wrong])) if wrong
                                      else float("nan"))
    return out


def evaluate_labelling(labeller, detector=None, *, public_root=None, n_lumbar: int = 40, n_whole: int = 20,
                       n_cervical: int = 20, datasets: Sequence[str] | None = None,
                       modes: Sequence[str] = ("end2end", "truth", "perturbed"), log=None,
                       public_split: str = "val") -> dict[str, Any]:
    """IDR / IDR+-1 per dataset and mode. Returns {"<dataset>/<mode>": summary, ...,
    "scans": [per-scan rows]}. ``detector=None`` skips the end-to-end mode.

    ``public-lumbar:<site>`` (``vb2``, ``vb3``, ``ivd``) takes one site's cases; ``public_split``
    ``"all"`` takes both splits (for a site a leave-one-site-out model never saw)."""
    datasets = list(datasets or ["public-lumbar", "synthetic-lumbar", "synthetic-whole", "synthetic-cervical"])
    sources = []
    for ds in datasets:
        if ds == "public-lumbar" or ds.startswith("public-lumbar:"):
            try:
                from ..publiclumbar import list_cases

                list_cases(public_root)
            except FileNotFoundError as e:
                if log:
                    log(f"skipping public-lumbar: {e}")
                continue
            site = ds.split(":", 1)[1] if ":" in ds else None
            split = None if public_split == "all" else public_split
            sources.append((ds, _public_lumbar_scans(public_root, split, site)))
        elif ds.startswith("synthetic-"):
            fov = ds.split("-", 1)[1]
            n = {"lumbar": n_lumbar, "whole": n_whole, "cervical": n_cervical}[fov]
            sources.append((ds, _synthetic_scans(fov, n)))
        else:
            raise ValueError(f"unknown dataset {ds!r}")
    per: dict[str, list[dict]] = {}
    scans = []
    for ds, it in sources:
        for name, vol, sp, ssp, gt in it:
            r = evaluate_scan(vol, sp, ssp, gt, labeller, detector, modes, name=name)
            for mode, row in r.items():
                per.setdefault(f"{ds}/{mode}", []).append(row)
                scans.append({"dataset": ds, "mode": mode, "scan": name,
                              **{k: v for k, v in row.items() if k not in ("pairs", "labels", "p_correct", "p_wrong")},
                              "public_split": _public_split_of(name) if ds.startswith("public-lumbar") else None,
                              "errors": [f"{g}->{p}" for g, p in row["pairs"] if g != p]})
            if log:
                log(f"{ds} {name}: " + ", ".join(f"{m} {row['correct']}/{row['n']}" for m, row in r.items()))
    out: dict[str, Any] = {k: _summary(v) for k, v in per.items()}
    out["scans"] = scans
    return out


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'dataset/mode':34s} {'scans':>5s} {'bodies':>6s} {'detected':>8s} {'IDR':>7s} {'IDR+-1':>7s} "
             f"{'lab|det':>7s} {'scans ok':>8s} {'bottom':>7s}"]
    for k, v in result.items():
        if k == "scans" or not isinstance(v, dict) or "IDR" not in v:
            continue
        lines.append(f"{k:34s} {v['scans']:5d} {v['bodies']:6d} {100 * v['detected']:7.1f}% "
                     f"{100 * v['IDR']:6.1f}% {100 * v['IDR_within1']:6.1f}% {100 * v['label_acc_detected']:6.1f}% "
                     f"{100 * v['scans_all_correct']:7.1f}% {100 * v.get('bottom_level_right', float('nan')):6.1f}%")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spinecohort evaluate labelling",
                                description="IDR / IDR+-1 of detection + labelling and of labelling alone")
    p.add_argument("--detector", default=str(default_model_path("detector")))
    p.add_argument("--appearance", default=str(default_model_path("appearance")))
    p.add_argument("--context", default=str(default_model_path("context")))
    p.add_argument("--public-lumbar", default=None, help="public-lumbar folder (default ../shared/...)")
    p.add_argument("--datasets", nargs="*", default=None,
                   help="public-lumbar (or public-lumbar:vb2 / :vb3 / :ivd, one site) synthetic-lumbar "
                        "synthetic-whole synthetic-cervical (default all)")
    p.add_argument("--modes", nargs="*", default=["end2end", "truth", "perturbed"],
                   help="end2end (detector + labeller), truth (labeller on truth polygons), perturbed "
                        "(truth polygons jittered like a detector, each body dropped with p = 0.1), "
                        "end2end-no-sacrum (end2end without the detections below the lowest annotated body)")
    p.add_argument("--public-split", choices=["val", "train", "all"], default="val",
                   help="public-lumbar cases to score (all: for a site a leave-one-site-out model never saw)")
    p.add_argument("--n-lumbar", type=int, default=40)
    p.add_argument("--n-whole", type=int, default=20)
    p.add_argument("--n-cervical", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the full result (JSON) here")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--calibrate-from", nargs="+", default=None, metavar="JSON",
                   help="instead of evaluating: from earlier --out results (the leave-one-site-out runs), "
                        "fit BeamConfig.probability_calibration on the public-lumbar TRAINING-split scans "
                        "and print reliability before / after on each split")
    args = p.parse_args(argv)
    if args.calibrate_from:
        from ..label import calibrated_probabilities, fit_probability_calibration

        # the pipeline's own path (detector + labeller) is what level_probability must describe
        scans = [r for f in args.calibrate_from for r in json.loads(Path(f).read_text())["scans"]
                 if r.get("mode") == "end2end"]
        fit = calibration_rows([r for r in scans if r.get("public_split") == "train"])
        if not len(fit[0]):
            print("no public-lumbar training-split scans with calibration records in these files", file=sys.stderr)
            return 1
        coef = fit_probability_calibration(*fit)
        print(f"probability_calibration (fitted on {len(fit[0])} training-split bodies): "
              + " ".join(f"{c:.4f}" for c in coef))
        for part in ("train", "val", None):
            raw, flagged, ok = calibration_rows([r for r in scans if part is None or r.get("public_split") == part])
            if not len(raw):
                continue
            cal = np.concatenate([calibrated_probabilities([p], f, coef) for p, f in zip(raw, flagged)])
            for name, p in (("raw", raw), ("calibrated", cal)):
                rel = reliability(p[ok], p[~ok])
                bins = "; ".join(f"{b['bin']}: n {b['n']}" + (f", mean {b['mean_p']:.2f}, right {b['accuracy']:.2f}"
                                                             if b["n"] else "") for b in rel["bins"])
                print(f"{part or 'all'} split, {len(raw)} bodies, {name}: ECE {rel['ece']:.3f} | {bins}")
        return 0
    import torch

    from ..label import Labeller

    torch.set_num_threads(max(1, args.threads))
    labeller = Labeller.load(args.appearance, args.context)
    detector = None
    if {"end2end", "end2end-no-sacrum"} & set(args.modes):
        if Path(args.detector).exists():
            from ..detect import Detector

            detector = Detector.load(args.detector)
        else:
            print(f"detector {args.detector} not found: end-to-end mode skipped", file=sys.stderr)
    log = None if args.quiet else (lambda m: print(m, flush=True))
    t0 = time.time()
    res = evaluate_labelling(labeller, detector, public_root=args.public_lumbar, n_lumbar=args.n_lumbar,
                             n_whole=args.n_whole, n_cervical=args.n_cervical, datasets=args.datasets,
                             modes=args.modes, log=log, public_split=args.public_split)
    print(format_table(res))
    print(f"({time.time() - t0:.0f} s)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
