"""Quantitative spine phenotypes from the detector's corner landmarks (``tables/morphometry.parquet``,
``tables/change.parquet``).

Everything here is a pure function of the four corners of each vertebral body, superior-anterior
(SA), superior-posterior (SP), inferior-posterior (IP), inferior-anterior (IA) as (row, col),
and the pixel spacing (row, col) in mm. Corners are converted to mm first, so anisotropic pixels
are honoured. Each body is measured on one sagittal slice, its mid-sagittal slice: the slice of
its polygons nearest its centroid slice (recorded per row in ``slice``). The corners are the
vertebrae table's, which the detect stage has already moved across their endplates onto the
image's edge profile (:func:`spinecohort.detect.refine_endplates`), so no image is read here.
A body whose measured polygon has a corner outside the image (cut by the field of view: the
detector extrapolated that corner) is not measured: its measures are NaN and ``note`` says why,
and so are a disc's or the lordosis when a corner they use lies outside.

Vertebral body (six-point morphometry reduced to the four corners the detector gives):

- ``height_anterior_mm`` Ha = |SA - IA|, ``height_posterior_mm`` Hp = |SP - IP|,
  ``height_middle_mm`` Hm = distance between the midpoints of the superior (SA-SP) and inferior
  (IA-IP) endplates. With corners only, an endplate depression between the corners (biconcave
  deformity) is not seen; Hm measures the chord between the endplate midpoints.
- ``depth_mm`` = mean length of the superior and inferior endplates.
- ``wedge_ratio`` Ha/Hp; ``concavity_ratio`` Hm/Hp; ``crush_ratio`` Hp / mean Hp of the labelled
  neighbours above and below (within the graded range), ``crush_ratio_above``/``_below`` Hp / Hp
  of each neighbour alone.
- ``height_loss`` = max(1 - Ha/Hp, 1 - Hm/Hp, 1 - crush_ratio, 0) and ``height_loss_kind``
  (wedge, biconcave, crush): the largest reduction of one height against its reference, the
  quantitative reading of Genant's semi-quantitative method (Genant HK, Wu CY, van Kuijk C,
  Nevitt MC. Vertebral fracture assessment using a semiquantitative technique. J Bone Miner Res
  1993;8:1137-1148): ``genant_grade`` 0 below 20 %, 1 for 20-25 %, 2 for 25-40 %, 3 above 40 %.
  Graded for T4-L5 only (Genant's range, with L5); ``morphometric_fracture`` = grade >= 1. It is
  a morphometric finding from landmarks, not a diagnosis (no check of endplate integrity, no
  distinction from developmental short bodies or Scheuermann wedging).

Disc (between the upper body's inferior endplate IA_u-IP_u and the lower body's superior
endplate SA_l-SP_l):

- ``height_anterior_mm`` |IA_u - SA_l|, ``height_posterior_mm`` |IP_u - SP_l|,
  ``height_middle_mm`` between the two endplate midpoints; ``depth_mm`` mean length of the two
  endplates.
- ``disc_height_index`` = (anterior + posterior disc height) / disc depth: Farfan's index
  (Farfan HF. Mechanical Disorders of the Low Back. Lea & Febiger, 1973), the depth taken as the
  mean length of the two endplates bounding the disc, so it is normalised by the adjacent bodies.
- ``endplate_angle_deg``: angle between the two endplates, positive when the disc opens
  anteriorly (lordotic).
- ``slip_mm``: displacement of the upper body's posterior-inferior corner relative to the lower
  body's posterior-superior corner, along the lower superior endplate, positive anteriorly
  (anterolisthesis), negative for retrolisthesis; ``slip_pct`` = 100 * slip / lower superior
  endplate depth; ``meyerding_grade`` (Meyerding HW. Spondylolisthesis. Surg Gynecol Obstet
  1932;54:371-377) on |slip_pct|: 1 up to 25 %, 2 to 50 %, 3 to 75 %, 4 to 100 %, 5 beyond
  (spondyloptosis); 0 below SLIP_NONE_PCT.

Scan: ``lordosis_deg``, the Cobb angle between the superior endplates of L1 and S1 (Cobb JR.
Outline for the study of scoliosis. Instr Course Lect 1948;5:261-275), positive for lordosis;
NaN with the reason in ``note`` when L1 or S1 is not in view. ``in_view`` lists the labelled
levels, cranial to caudal.

Angles and slip directions are taken from the named corners, so a series stored mirrored (cols
running posterior -> anterior, or rows inferior -> superior) gives the same signs.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .geometry import mid_slice, outside_image, signed_area
from .tasks import LEVEL_INDEX, TASK_NAMES

SA, SP, IP, IA = 0, 1, 2, 3

#: Genant grade thresholds on the fractional height loss (grade 1 from 20 %, 2 from 25 %, 3 above 40 %).
GENANT_THRESHOLDS = (0.20, 0.25, 0.40)
#: Levels graded by height loss: Genant's T4-L4 plus L5 (C-spine and sacrum have other shapes).
GENANT_LEVELS = frozenset(["T4", "T5", "T6", "T7", "T8", "T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5"])
#: Below this |slip| (% of the lower endplate depth, about 2 mm on a lumbar body) the offset is
#: within corner-landmark noise and no Meyerding grade is given.
SLIP_NONE_PCT = 5.0
MORPHOMETRIC_NOTE = "morphometric (landmark height loss), not a diagnosis"
CUT_NOTE = "cut by the image border (a corner outside the image): not measured"
#: Sacral segments are fused to the one below: S1's "inferior endplate" is at most a remnant line,
#: so a body height (and depth, which averages it in) is not defined; their superior endplates still
#: serve the L5-S1 disc, the slip of L5 and lordosis.
SACRAL_LEVELS = frozenset(["S1", "S2", "S3", "S4", "S5"])
SACRAL_NOTE = "sacral segment fused to the one below (no inferior endplate): body not measured"
#: A body the detector found only on its lower-threshold look below the column (``found_at_low_threshold``,
#: a weak S1): it names the levels, but its outline is a weak decoding that the endplate refinement
#: did not touch, so no measure uses its corners.
WEAK_NOTE = "found only at the detector's lower threshold (s1_weakly_detected): its outline is not measured"

#: Columns of tables/morphometry.parquet and their fixed dtypes (whatever fails).
MORPHOMETRY_DTYPES: dict[str, str] = {
    "scan_id": "string", "subject_id": "string", "site": "string", "visit": "string",
    "kind": "string",                # vertebra | disc | scan
    "level": "string",               # "L3", "L3-L4", or "L1-S1" for the scan's lordosis row
    "vertebra_id": "Int64",          # vertebra rows; disc rows: the upper body
    "lower_vertebra_id": "Int64",    # disc rows: the lower body
    "slice": "Int64",                # mid-sagittal slice measured (disc rows: shared by both bodies)
    "slice_lower": "Int64",          # disc rows: the lower body's slice (differs when no shared slice)
    "height_anterior_mm": "float64", "height_middle_mm": "float64", "height_posterior_mm": "float64",
    "depth_mm": "float64",
    "wedge_ratio": "float64", "concavity_ratio": "float64", "crush_ratio": "float64",
    "crush_ratio_above": "float64", "crush_ratio_below": "float64",
    "height_loss": "float64", "height_loss_kind": "string",
    "genant_grade": "Int64", "morphometric_fracture": "boolean",
    "disc_height_index": "float64", "endplate_angle_deg": "float64",
    "slip_mm": "float64", "slip_pct": "float64", "meyerding_grade": "Int64",
    "lordosis_deg": "float64", "in_view": "string", "note": "string",
}
MORPHOMETRY_COLUMNS = list(MORPHOMETRY_DTYPES)

#: Continuous measures whose change between visits goes into tables/change.parquet.
CHANGE_MEASURES = ("height_anterior_mm", "height_middle_mm", "height_posterior_mm", "depth_mm", "wedge_ratio",
                   "height_loss", "disc_height_index", "endplate_angle_deg", "slip_mm", "slip_pct", "lordosis_deg")
CHANGE_GRADES = ("genant_grade", "meyerding_grade")
#: Manifest columns read as the visit date (first present wins); carried into tables/scans.parquet.
DATE_COLUMNS = ("visit_date", "scan_date", "study_date", "acquisition_date", "date")


# ----------------------------------------------------------------------------- geometry
def to_mm(corners: Any, pixel_spacing_mm: Sequence[float]) -> np.ndarray:
    """(4, 2) (row, col) pixel corners -> mm (row spacing, col spacing honoured)."""
    q = np.asarray(corners, dtype=np.float64).reshape(4, 2)
    return q * np.asarray([float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1])])


def _dist(a: np.ndarray, b: np.ndarray) -> float:
    return float(math.hypot(a[0] - b[0], a[1] - b[1]))


def handedness(quad: np.ndarray) -> float:
    """+1 for a body drawn in the standard orientation (rows down, cols anterior -> posterior),
    -1 when mirrored: the sign of SA -> SP -> IP -> IA's turning (negative signed area = +1)."""
    return 1.0 if signed_area(quad) <= 0 else -1.0


def lordotic_angle(upper_a: np.ndarray, upper_p: np.ndarray, lower_a: np.ndarray, lower_p: np.ndarray,
                   hand: float = 1.0) -> float:
    """Angle (degrees) between an upper and a lower endplate line, each given by its anterior and
    posterior points (mm, (row, col)); positive when the lines open anteriorly (lordosis).
    ``hand`` is :func:`handedness` of a body in the same image."""
    eu, el = upper_p - upper_a, lower_p - lower_a
    cross = el[1] * eu[0] - el[0] * eu[1]
    dot = float(eu @ el)
    return float(math.degrees(math.atan2(hand * cross, dot)))


def body_measures(quad_mm: np.ndarray) -> dict[str, float]:
    """Heights, depth and ratios of one vertebral body from its corners in mm."""
    q = quad_mm
    ha, hp = _dist(q[SA], q[IA]), _dist(q[SP], q[IP])
    hm = _dist((q[SA] + q[SP]) / 2, (q[IA] + q[IP]) / 2)
    depth = (_dist(q[SA], q[SP]) + _dist(q[IA], q[IP])) / 2
    return {"height_anterior_mm": ha, "height_middle_mm": hm, "height_posterior_mm": hp, "depth_mm": depth,
            "wedge_ratio": ha / hp if hp > 0 else math.nan, "concavity_ratio": hm / hp if hp > 0 else math.nan}


def disc_measures(upper_mm: np.ndarray, lower_mm: np.ndarray) -> dict[str, float]:
    """Disc heights, height index, endplate angle and slip between two bodies' corners (mm)."""
    u, lo = upper_mm, lower_mm
    ha, hp = _dist(u[IA], lo[SA]), _dist(u[IP], lo[SP])
    hm = _dist((u[IA] + u[IP]) / 2, (lo[SA] + lo[SP]) / 2)
    lower_depth = _dist(lo[SA], lo[SP])
    depth = (_dist(u[IA], u[IP]) + lower_depth) / 2
    angle = lordotic_angle(u[IA], u[IP], lo[SA], lo[SP], handedness(lo))
    slip = slip_mm(u, lo)
    pct = 100.0 * slip / lower_depth if lower_depth > 0 else math.nan
    return {"height_anterior_mm": ha, "height_middle_mm": hm, "height_posterior_mm": hp, "depth_mm": depth,
            "disc_height_index": (ha + hp) / depth if depth > 0 else math.nan, "endplate_angle_deg": angle,
            "slip_mm": slip, "slip_pct": pct, "meyerding_grade": meyerding_grade(pct)}


def slip_mm(upper_mm: np.ndarray, lower_mm: np.ndarray) -> float:
    """Slip of the upper body on the lower (mm, positive anterior): the lower body's
    posterior-superior corner minus the upper's posterior-inferior corner, along the lower
    superior endplate (pointing posteriorly)."""
    axis = lower_mm[SP] - lower_mm[SA]
    norm = float(np.hypot(*axis))
    if norm <= 0:
        return math.nan
    return float((lower_mm[SP] - upper_mm[IP]) @ axis / norm)


def meyerding_grade(slip_pct: float) -> float:
    """Meyerding 1932 grade of |slip| in % of the lower endplate depth (NaN stays NaN)."""
    if not np.isfinite(slip_pct):
        return math.nan
    s = abs(slip_pct)
    if s < SLIP_NONE_PCT:
        return 0
    return 1 if s <= 25 else 2 if s <= 50 else 3 if s <= 75 else 4 if s <= 100 else 5


def genant_grade(height_loss: float) -> float:
    """Genant 1993 semi-quantitative grade of a fractional height loss (NaN stays NaN)."""
    if not np.isfinite(height_loss):
        return math.nan
    g1, g2, g3 = GENANT_THRESHOLDS
    return 0 if height_loss < g1 else 1 if height_loss < g2 else 2 if height_loss <= g3 else 3


def height_loss(wedge_ratio: float, concavity_ratio: float, crush_ratio: float) -> tuple[float, str]:
    """(largest fractional height loss, its kind): anterior vs posterior (wedge), middle vs
    posterior (biconcave), posterior vs the neighbours' (crush). NaN ratios are skipped."""
    losses = {"wedge": 1 - wedge_ratio, "biconcave": 1 - concavity_ratio, "crush": 1 - crush_ratio}
    losses = {k: v for k, v in losses.items() if np.isfinite(v)}
    if not losses:
        return math.nan, ""
    kind = max(losses, key=lambda k: losses[k])
    loss = max(losses[kind], 0.0)
    return loss, kind if loss > 0 else ""


# ----------------------------------------------------------------------------- one scan
def polygons_of(polygons: Any) -> dict[int, np.ndarray]:
    """The vertebrae table's ``polygons`` cell (list of ``{slice, corners}``) -> slice -> (4, 2)."""
    out: dict[int, np.ndarray] = {}
    if polygons is None:
        return out
    for item in polygons:
        corners = np.asarray(item["corners"], dtype=np.float64)
        if corners.size == 8 and np.all(np.isfinite(corners)):
            out[int(item["slice"])] = corners.reshape(4, 2)
    return out


def scan_morphometry(vertebrae: Iterable[Mapping[str, Any]], pixel_spacing_mm: Sequence[float],
                     image_shape: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Morphometry rows of one scan (vertebra, disc and one scan row) from its vertebra records:
    ``vertebra_id``, ``level`` (None when unlabelled), ``centroid_slice`` and ``polygons`` (slice
    -> (4, 2) pixel corners, or the table's list form). Discs, slips and neighbour ratios need
    labelled, adjacent levels; unlabelled bodies get their own heights only. ``image_shape``
    (rows, cols), when known, leaves bodies cut by the image border unmeasured."""
    bodies = []
    for v in vertebrae:
        polys = v["polygons"] if isinstance(v["polygons"], Mapping) else polygons_of(v["polygons"])
        s = mid_slice(polys, float(v.get("centroid_slice", math.nan)))
        if s is None:
            continue
        level = v.get("level")
        level = level if isinstance(level, str) and level else None
        bodies.append({"vertebra_id": int(v["vertebra_id"]), "level": level, "slice": s,
                       "centroid_slice": float(v.get("centroid_slice", s)), "polygons": polys,
                       "quad": to_mm(polys[s], pixel_spacing_mm), "cut": outside_image(polys[s], image_shape),
                       "weak": true_cell(v.get("found_at_low_threshold"))})
    rows: list[dict[str, Any]] = []
    by_level = {b["level"]: b for b in bodies if b["level"] in LEVEL_INDEX}
    measures = {id(b): dict.fromkeys(body_measures(b["quad"]), math.nan)
                if b["cut"] or b["weak"] or b["level"] in SACRAL_LEVELS else body_measures(b["quad"]) for b in bodies}

    def neighbour(level: str, step: int) -> dict | None:
        index = LEVEL_INDEX[level] + step
        return next((b for b in by_level.values() if LEVEL_INDEX[b["level"]] == index), None)

    # cranial first; unlabelled bodies and labels outside C2-S1 (S2, S3, ...) after, by detection order
    for b in sorted(bodies, key=lambda b: (b["level"] not in LEVEL_INDEX, -LEVEL_INDEX.get(b["level"], 0), b["vertebra_id"])):
        m = dict(measures[id(b)])
        crush, sides = math.nan, [math.nan, math.nan]
        graded = b["level"] in GENANT_LEVELS
        if graded:
            for k, n in enumerate((neighbour(b["level"], 1), neighbour(b["level"], -1))):
                if n is not None and n["level"] in GENANT_LEVELS and measures[id(n)]["height_posterior_mm"] > 0:
                    sides[k] = m["height_posterior_mm"] / measures[id(n)]["height_posterior_mm"]
            refs = [m["height_posterior_mm"] / r for r in sides if np.isfinite(r)]  # the neighbours' Hp
            if refs:
                crush = m["height_posterior_mm"] / float(np.mean(refs))
        loss, kind = height_loss(m["wedge_ratio"], m["concavity_ratio"], crush) if graded else (math.nan, "")
        grade = genant_grade(loss)
        rows.append({"kind": "vertebra", "level": b["level"], "vertebra_id": b["vertebra_id"], "slice": b["slice"],
                     **m, "crush_ratio": crush, "crush_ratio_above": sides[0], "crush_ratio_below": sides[1],
                     "height_loss": loss, "height_loss_kind": kind,
                     "genant_grade": grade,
                     "morphometric_fracture": (grade >= 1) if np.isfinite(grade) else None,
                     "note": CUT_NOTE if b["cut"] else WEAK_NOTE if b["weak"] else
                     SACRAL_NOTE if b["level"] in SACRAL_LEVELS else
                     MORPHOMETRIC_NOTE if np.isfinite(grade) and grade >= 1 else
                     ("" if graded or b["level"] is None else f"{b['level']}: outside the height-loss graded range T4-L5")})
    # discs, cranial first: each labelled body with the labelled body directly below it
    for upper in sorted(by_level.values(), key=lambda b: -LEVEL_INDEX[b["level"]]):
        lower = neighbour(upper["level"], -1)
        if lower is None:
            continue
        shared = sorted(set(upper["polygons"]) & set(lower["polygons"]))
        note = ""
        if shared:
            centre = (upper["centroid_slice"] + lower["centroid_slice"]) / 2
            s = min(shared, key=lambda k: (abs(k - centre), k))
            su, sl = s, s
            qu, ql = to_mm(upper["polygons"][s], pixel_spacing_mm), to_mm(lower["polygons"][s], pixel_spacing_mm)
        else:  # parallel sagittal slices share in-plane coordinates; measured across them, noted
            su, sl, qu, ql = upper["slice"], lower["slice"], upper["quad"], lower["quad"]
            note = "upper and lower bodies have no slice in common: measured across their mid slices"
        disc = disc_measures(qu, ql)
        if outside_image(np.concatenate([np.asarray(upper["polygons"][su])[[IP, IA]],
                                         np.asarray(lower["polygons"][sl])[[SA, SP]]]), image_shape):
            disc, note = dict.fromkeys(disc, math.nan), CUT_NOTE
        elif upper["weak"] or lower["weak"]:
            disc, note = dict.fromkeys(disc, math.nan), WEAK_NOTE
        rows.append({"kind": "disc", "level": f"{upper['level']}-{lower['level']}", "vertebra_id": upper["vertebra_id"],
                     "lower_vertebra_id": lower["vertebra_id"], "slice": su, "slice_lower": sl, **disc, "note": note})
    rows.append(lordosis_row(by_level, image_shape))
    return rows


def true_cell(value: Any) -> bool:
    """A table's boolean cell: absent, null or NaN count as False."""
    return isinstance(value, (bool, np.bool_)) and bool(value)


def _in_view(levels: Iterable[str]) -> str:
    return ",".join(sorted(levels, key=lambda lv: -LEVEL_INDEX[lv]))


def lordosis_row(by_level: Mapping[str, Mapping[str, Any]], image_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """The scan row: lumbar lordosis (L1 superior to S1 superior endplate, Cobb) and what was in
    view; NaN with the reason when L1 or S1 is missing or that endplate is cut by the image border."""
    row = {"kind": "scan", "level": "L1-S1", "in_view": _in_view(by_level), "lordosis_deg": math.nan}
    missing = [lv for lv in ("L1", "S1") if lv not in by_level]
    if missing:
        row["note"] = f"lordosis not measured: {' and '.join(missing)} not in view" if by_level else \
            "lordosis not measured: no labelled vertebrae"
        return row
    l1, s1 = by_level["L1"], by_level["S1"]
    cut = [lv for lv, b in (("L1", l1), ("S1", s1)) if outside_image(np.asarray(b["polygons"][b["slice"]])[[SA, SP]], image_shape)]
    if cut:
        row["note"] = f"lordosis not measured: the superior endplate of {' and '.join(cut)} is cut by the image border"
        return row
    if l1["weak"] or s1["weak"]:
        row["note"] = "lordosis not measured: S1 " + WEAK_NOTE
        return row
    row["lordosis_deg"] = lordotic_angle(l1["quad"][SA], l1["quad"][SP], s1["quad"][SA], s1["quad"][SP],
                                         handedness(s1["quad"]))
    row["slice"], row["slice_lower"] = l1["slice"], s1["slice"]
    row["vertebra_id"], row["lower_vertebra_id"] = l1["vertebra_id"], s1["vertebra_id"]
    row["note"] = ""
    return row


# ----------------------------------------------------------------------------- cohort tables
def typed(rows: list[Mapping[str, Any]] | pd.DataFrame, dtypes: Mapping[str, str]) -> pd.DataFrame:
    """A frame with exactly ``dtypes``' columns in that order and types (missing -> null)."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    out = {}
    for column, dtype in dtypes.items():
        values = frame[column] if column in frame.columns else pd.Series([None] * len(frame), dtype=object)
        if dtype in ("Int64", "boolean"):
            values = pd.array([None if _missing(v) else v for v in values.tolist()], dtype=dtype)
        elif dtype == "string":
            values = pd.array([None if _missing(v) else str(v) for v in values.tolist()], dtype="string")
        else:
            values = pd.to_numeric(values, errors="coerce").astype(dtype)
        out[column] = pd.Series(values, index=range(len(frame)))
    return pd.DataFrame(out, columns=list(dtypes))


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _spacing(value: Any) -> tuple[float, float] | None:
    try:
        row, col = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (row, col) if row > 0 and col > 0 else None


def _shape(scan: Any) -> tuple[int, int] | None:
    """The scan's (rows, cols) from the scans table (ingest), None when not recorded."""
    rows, cols = getattr(scan, "rows", None), getattr(scan, "cols", None)
    if _missing(rows) or _missing(cols):
        return None
    return int(rows), int(cols)


def cohort_morphometry(scans: pd.DataFrame, vertebrae: pd.DataFrame) -> pd.DataFrame:
    """``tables/morphometry.parquet`` from the cohort's scans and vertebrae tables: every ``ok``
    scan gets its rows; a scan that cannot be measured gets one scan row whose ``note`` names the
    scan and the problem (the cohort's other scans are unaffected)."""
    rows: list[dict[str, Any]] = []
    by_scan = {sid: part for sid, part in vertebrae.groupby("scan_id", sort=False)} if len(vertebrae) else {}
    ok = scans[scans["status"] == "ok"]
    for scan in ok.itertuples(index=False):
        keys = {"scan_id": scan.scan_id, "subject_id": scan.subject_id,
                "site": getattr(scan, "site", None), "visit": getattr(scan, "visit", None)}
        spacing = _spacing(getattr(scan, "pixel_spacing_mm", None))
        part = by_scan.get(scan.scan_id)
        if spacing is None:
            rows.append({**keys, "kind": "scan", "level": "L1-S1", "lordosis_deg": math.nan,
                         "note": f"scan {scan.scan_id}: morphometry: no valid pixel spacing"})
            continue
        if part is None:
            rows.append({**keys, **lordosis_row({})})
            continue
        try:
            columns = ["vertebra_id", "level", "centroid_slice", "polygons"]
            if "found_at_low_threshold" in part.columns:  # absent in tables written before the search
                columns.append("found_at_low_threshold")
            records = part[columns].to_dict("records")
            rows += [{**keys, **r} for r in scan_morphometry(records, spacing, _shape(scan))]
        except Exception as error:  # noqa: BLE001 - one scan's bad landmarks never stop the cohort table
            rows.append({**keys, "kind": "scan", "level": "L1-S1", "lordosis_deg": math.nan,
                         "note": f"scan {scan.scan_id}: morphometry: {type(error).__name__}: {error}"})
    return typed(rows, MORPHOMETRY_DTYPES)


# ----------------------------------------------------------------------------- change over visits
def _natural_key(text: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(text)))


def _date_column(scans: pd.DataFrame) -> str | None:
    return next((c for c in DATE_COLUMNS if c in scans.columns and scans[c].astype(str).str.strip().ne("").any()), None)


def change_dtypes() -> dict[str, str]:
    dtypes = {"subject_id": "string", "site": "string", "kind": "string", "level": "string",
              "visit_from": "string", "visit_to": "string", "scan_id_from": "string", "scan_id_to": "string",
              "interval_days": "Int64"}
    for m in CHANGE_MEASURES:
        dtypes.update({f"{m}_from": "float64", f"{m}_to": "float64", f"delta_{m}": "float64"})
    for g in CHANGE_GRADES + TASK_NAMES:
        dtypes.update({f"{g}_from": "Int64", f"{g}_to": "Int64", f"delta_{g}": "Int64"})
    dtypes["incident_fracture"] = "boolean"
    return dtypes


CHANGE_DTYPES = change_dtypes()


def visit_pairs(scans: pd.DataFrame) -> tuple[list[tuple[pd.Series, pd.Series]], str | None]:
    """Consecutive (earlier, later) scan rows per subject, over ``ok`` scans with a visit: ordered
    by the manifest's date column when it has one (else by visit name, v2 before v10). Several ok
    scans of one subject and visit: the first in manifest order stands for the visit."""
    if "visit" not in scans.columns:
        return [], None
    date_col = _date_column(scans)
    ok = scans[(scans["status"] == "ok") & scans["visit"].astype(str).str.strip().ne("") & scans["visit"].notna()]
    ok = ok.drop_duplicates(["subject_id", "visit"], keep="first").copy()
    ok["_date"] = pd.to_datetime(ok[date_col], errors="coerce") if date_col else pd.NaT
    pairs = []
    for _, visits in ok.groupby("subject_id", sort=True):
        if len(visits) < 2:
            continue
        order = sorted(visits.index, key=lambda i: (pd.isna(visits.at[i, "_date"]),
                                                    visits.at[i, "_date"] if not pd.isna(visits.at[i, "_date"]) else 0,
                                                    _natural_key(visits.at[i, "visit"])))
        pairs += [(visits.loc[a], visits.loc[b]) for a, b in zip(order, order[1:])]
    return pairs, date_col


def cohort_change(scans: pd.DataFrame, morphometry: pd.DataFrame, discs: pd.DataFrame | None = None) -> pd.DataFrame:
    """``tables/change.parquet``: per subject, consecutive visit pair and level (matched by label,
    never by index), the morphometry and grades at both visits and their change (later minus
    earlier); ``interval_days`` when the manifest has a date column. Empty (typed) when no subject
    has two visits."""
    pairs, _ = visit_pairs(scans)
    rows: list[dict[str, Any]] = []
    morph = morphometry[morphometry["level"].notna()]
    by_scan = {sid: part.drop_duplicates(["kind", "level"]).set_index(["kind", "level"])
               for sid, part in morph.groupby("scan_id", sort=False)}
    tasks = [t for t in TASK_NAMES if discs is not None and t in discs.columns]
    grades = ({sid: part.drop_duplicates("level").set_index("level") for sid, part in discs.groupby("scan_id", sort=False)}
              if tasks and len(discs) else {})
    for early, late in pairs:
        a, b = by_scan.get(early["scan_id"]), by_scan.get(late["scan_id"])
        if a is None or b is None:
            continue
        days = None
        if not (pd.isna(early["_date"]) or pd.isna(late["_date"])):
            days = int((late["_date"] - early["_date"]).days)
        for key in [k for k in a.index if k in b.index]:
            kind, level = key
            ra, rb = a.loc[key], b.loc[key]
            row: dict[str, Any] = {"subject_id": early["subject_id"], "site": late.get("site"), "kind": kind,
                                   "level": level, "visit_from": early["visit"], "visit_to": late["visit"],
                                   "scan_id_from": early["scan_id"], "scan_id_to": late["scan_id"], "interval_days": days}
            for m in CHANGE_MEASURES:
                x, y = float(ra[m]) if pd.notna(ra[m]) else math.nan, float(rb[m]) if pd.notna(rb[m]) else math.nan
                row.update({f"{m}_from": x, f"{m}_to": y, f"delta_{m}": y - x})
            for g in CHANGE_GRADES:
                _grade_change(row, g, ra[g], rb[g])
            if kind == "disc":
                ga, gb = grades.get(early["scan_id"]), grades.get(late["scan_id"])
                for t in tasks:
                    _grade_change(row, t, ga.at[level, t] if ga is not None and level in ga.index else None,
                                  gb.at[level, t] if gb is not None and level in gb.index else None)
            if kind == "vertebra" and pd.notna(ra["genant_grade"]) and pd.notna(rb["genant_grade"]):
                row["incident_fracture"] = bool(ra["genant_grade"] == 0 and rb["genant_grade"] >= 1)
            rows.append(row)
    return typed(rows, CHANGE_DTYPES)


def _grade_change(row: dict[str, Any], name: str, before: Any, after: Any) -> None:
    x = int(before) if before is not None and pd.notna(before) else None
    y = int(after) if after is not None and pd.notna(after) else None
    row.update({f"{name}_from": x, f"{name}_to": y, f"delta_{name}": (y - x) if x is not None and y is not None else None})
