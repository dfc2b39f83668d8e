"""Reading the predictions and labels tables, and writing the agreement and confusion tables."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pandas as pd

from ..provenance import make_provenance, read_provenance, write_table
from ..tasks import CCS_BINARY, TASKS, disc_levels
from .agreement import compute_agreement, normalise_level

log = logging.getLogger(__name__)

# Label columns that are not grades.
LABEL_KEY_COLUMNS = ("scan_id", "level", "reader", "subject_id", "site", "visit")


def label_warnings(labels: pd.DataFrame, scan_ids: Iterable[str] | None = None) -> list[str]:
    """Counted problems of a labels table that the agreement would otherwise pass over without a
    word: grades that are not numbers (``severe``) or off the task's scale, disc levels that do not
    exist (``L9-L10``), ``scan_id``s not in the cohort and columns that match no task."""
    out: list[str] = []
    known_tasks = [t.name for t in TASKS] + [CCS_BINARY]
    ignored = [str(c) for c in labels.columns if c not in known_tasks and c not in LABEL_KEY_COLUMNS]
    if ignored:
        out.append(f"labels: {len(ignored)} column(s) match no task and were ignored: {', '.join(ignored[:10])}")
    scales = {t.name: t.grades for t in TASKS} | {CCS_BINARY: (0, 1)}
    for task in [c for c in known_tasks if c in labels.columns]:
        text = labels[task].astype("string").str.strip()
        given = text.notna() & (text != "")
        numbers = pd.to_numeric(text.where(given), errors="coerce")
        not_number = given & numbers.isna()
        if not_number.any():
            examples = ", ".join(repr(v) for v in pd.unique(text[not_number])[:3])
            out.append(f"labels: {int(not_number.sum())} {task} grade(s) are not numbers ({examples}); treated as not graded")
        off_scale = numbers.notna() & ~numbers.isin(scales[task])
        if off_scale.any():
            out.append(f"labels: {int(off_scale.sum())} {task} grade(s) outside the scale {scales[task]}; treated as not graded")
    if "level" in labels.columns:
        levels = normalise_level(labels["level"].dropna())
        unknown = levels[~levels.isin(disc_levels())]
        if len(unknown):
            examples = ", ".join(pd.unique(unknown)[:3])
            out.append(f"labels: {len(unknown)} row(s) with a disc level that does not exist ({examples}); ignored")
    if scan_ids is not None and "scan_id" in labels.columns:
        ids = labels["scan_id"].dropna().astype(str).str.strip()
        unknown = ids[~ids.isin(set(map(str, scan_ids)))]
        if len(unknown):
            examples = ", ".join(pd.unique(unknown)[:3])
            out.append(f"labels: {len(unknown)} row(s) for scan_id(s) not in the manifest ({examples}); ignored")
    return out


def _read_table(path: str | Path, kind: str) -> pd.DataFrame:
    """A predictions or labels table; an unreadable one raises ``ValueError`` naming the file."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix.lower() == ".gz" else path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        else:
            sep = "\t" if suffix in (".tsv", ".tab", ".tsv.gz") else ","
            text_cols = {"scan_id": str, "subject_id": str, "level": str, "reader": str, "site": str}
            # utf-8-sig: a spreadsheet's byte-order mark would otherwise rename the first column
            df = pd.read_csv(path, sep=sep, dtype=text_cols, keep_default_na=True, encoding="utf-8-sig")
    except (OSError, ValueError) as error:  # empty, undecodable or malformed files are ValueErrors
        detail = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"{kind} {path}: not a readable table ({detail})") from None
    df.columns = [str(c).strip() for c in df.columns]
    log.info("%s: %d rows from %s", kind, len(df), path)
    return df


def default_confusion_path(out_path: str | Path) -> Path:
    """``.../agreement.parquet`` -> ``.../confusion.parquet``; ``x.parquet`` -> ``x_confusion.parquet``."""
    out = Path(out_path)
    if "agreement" in out.stem:
        return out.with_name(out.stem.replace("agreement", "confusion") + out.suffix)
    return out.with_name(f"{out.stem}_confusion{out.suffix or '.parquet'}")


def run_agreement(
    discs_path: str | Path,
    labels_path: str | Path,
    out_path: str | Path,
    n_bootstrap: int = 2000,
    seed: int = 0,
    *,
    confusion_path: str | Path | None = None,
    provenance: dict[str, str] | None = None,
    tasks: Sequence[str] | None = None,
    created_by: str | None = None,
    reading_schemes: Mapping[str, Mapping] | None = None,
) -> tuple[Path, Path]:
    """Read predictions + labels, write agreement and confusion Parquet; returns both paths.

    Provenance: ``provenance`` if given, else the discs table's own Parquet metadata (so model
    ids and config hash carry over) with ``created_by`` set to this command; ``n_bootstrap`` and
    ``seed`` are added as ``agreement_n_bootstrap`` / ``agreement_seed`` metadata keys.
    """
    discs = _read_table(discs_path, "predictions")
    labels = _read_table(labels_path, "labels")
    for warning in label_warnings(labels):  # the report adds scan_ids missing from the manifest
        log.warning("%s", warning)
    try:
        agreement, confusion = compute_agreement(discs, labels, n_bootstrap=n_bootstrap, seed=seed,
                                                 tasks=tasks, reading_schemes=reading_schemes)
    except ValueError as error:  # a missing key column: name the files, not only the table's role
        raise ValueError(f"agreement of {discs_path} with {labels_path}: {error}") from None
    if provenance is None:
        prov = make_provenance(created_by=created_by)
        if str(discs_path).lower().endswith((".parquet", ".pq")):
            try:
                prov.update({k: v for k, v in read_provenance(discs_path).items()
                             if k != "created_by"})
            except Exception:  # provenance is best effort; the tables matter
                log.warning("could not read provenance from %s", discs_path)
    else:
        prov = dict(provenance)
    prov["agreement_n_bootstrap"] = str(int(n_bootstrap))
    prov["agreement_seed"] = str(int(seed))
    out = Path(out_path)
    conf_out = Path(confusion_path) if confusion_path else default_confusion_path(out)
    write_table(agreement, out, prov)
    write_table(confusion, conf_out, prov)
    return out, conf_out
