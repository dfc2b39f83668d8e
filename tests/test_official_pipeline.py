"""The whole pipeline with the official SpineNetV2 family (issue 8): recipe-weight checkpoint folders
in the official layout, a tiny demo cohort, every table and the report.

Three folders share the appearance, context and grading files (hard links) and differ only in
``detect-vfr/ckpt435.pt``, always the exact official layout (strict loading passes):

* ``recipe``: the equivalence recipe's random weights (shared ``spinenet-equivalence.md`` section 2).
  Their output is garbage (in practice: nothing detected); only completion and well-formed tables
  are checked, never accuracy.
* ``silent``: the recipe with the output conv's heatmap channels set to -10 (threshold 0.6): no
  detections whatever the input. The reference package crashes there; the pipeline must not.
* ``dots``: the recipe with the last up-block and output conv replaced so the network passes the
  normalised input through to the five heatmaps and emits constant corner -> centroid arrows. On
  a phantom of bright dots at a vertebra's centroid and corners this yields exact detections, so
  the official labeller and grader run inside the pipeline too (on recipe weights: levels and
  grades are garbage, only the tables' form is checked).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from spinecohort import synthetic
from spinecohort.config import resolve_config
from spinecohort.demo import write_demo_scan
from spinecohort.dicom_writer import SeriesHeader, write_series
from spinecohort.nets.checkpoints import SUBFOLDERS, sha256_file, write_recipe_folder
from spinecohort.pipeline import SCAN_COLUMNS, run_in_process, stage_order
from spinecohort.provenance import read_provenance
from spinecohort.report import build_report
from spinecohort.stats import run_agreement
from spinecohort.tasks import LEVELS, TASK_NAMES, TASKS, disc_name

REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (REF / "spinenet-official-checkpoints.json").is_file(),
                       reason=f"shared reference (official checkpoint manifest, weight recipe) not found at {REF}"),
    pytest.mark.usefixtures("torch_threads"),
]

NET_MM = 260.0 / 224.0  # the official detector's pixel size: the phantom is not resampled
HALF_ROWS, HALF_COLS, STEP = 8, 10, 28  # phantom body half-height / half-width, body spacing (px)
N_BODIES = 2
VERTEBRA_COLUMNS = ["scan_id", "subject_id", "vertebra_id", "level", "level_probability", "slice_min",
                    "slice_max", "centroid_slice", "centroid_row", "centroid_col", "centroid_x_mm",
                    "centroid_y_mm", "centroid_z_mm", "polygons"]
DISC_COLUMNS = ["scan_id", "subject_id", "site", "level", "upper_vertebra_id", "lower_vertebra_id",
                "centre_slice", "centre_row", "centre_col",
                *[c for t in TASK_NAMES for c in (t, f"{t}_probs")], "model_id"]
ALL_DISCS = [disc_name(LEVELS[i + 1], LEVELS[i]) for i in range(len(LEVELS) - 1)]


# --------------------------------------------------------------------------- checkpoint folders
def _silent(state: dict) -> dict:
    state = dict(state)
    weight, bias = state["out.weight"].clone(), state["out.bias"].clone()
    weight[:5] = 0.0  # channels 0-3 corners, 4 centroid
    bias[:5] = -10.0
    state["out.weight"], state["out.bias"] = weight, bias
    return state


def _dots(state: dict) -> dict:
    """Heatmaps = normalised input (through the raw-input skip of the last up-block), arrows constant."""
    state = dict(state)
    block = "up_blocks.4."

    def zeros(key: str) -> torch.Tensor:
        state[key] = torch.zeros_like(state[key])
        return state[key]

    zeros(block + "upsample.1.weight")  # the deep path contributes nothing
    zeros(block + "upsample.1.bias")
    zeros(block + "conv_block_1.conv.weight")[0, 64, 1, 1] = 1.0  # input channel 64: the raw-input skip
    zeros(block + "conv_block_2.conv.weight")[0, 0, 1, 1] = 1.0
    for conv_block in ("conv_block_1.", "conv_block_2."):  # no bias, identity BatchNorm
        zeros(block + conv_block + "conv.bias")
        zeros(block + conv_block + "bn.weight")[:] = 1.0
        zeros(block + conv_block + "bn.bias")
        zeros(block + conv_block + "bn.running_mean")
        zeros(block + conv_block + "bn.running_var")[:] = 1.0
    weight = torch.zeros_like(state["out.weight"])
    weight[:5, 0] = 1.0
    bias = torch.zeros_like(state["out.bias"])
    # channel c holds corner SP, IP, IA, SA (rows down, cols anterior -> posterior); its arrows
    # (x: channel 5 + c, y: 9 + c) point from the corner to the centroid
    for c, (dy, dx) in enumerate([(HALF_ROWS, -HALF_COLS), (-HALF_ROWS, -HALF_COLS),
                                  (-HALF_ROWS, HALF_COLS), (HALF_ROWS, HALF_COLS)]):
        bias[9 + c], bias[5 + c] = dy, dx
    state["out.weight"], state["out.bias"] = weight, bias
    return state


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{variant: (folder, {model id: sha256})}; about 2 GB, removed after the module."""
    root = tmp_path_factory.mktemp("official")
    recipe = write_recipe_folder(root / "recipe")  # fp32, as the official files are
    spec = SUBFOLDERS["detector"]
    state = torch.load(recipe["detector"], map_location="cpu", weights_only=True, mmap=True)[spec.state_dict_key]
    ids = {name: f"spinenet-official/{path.parent.name}/{path.name}" for name, path in recipe.items()}
    shas = {ids[name]: sha256_file(path) for name, path in recipe.items()}
    out = {"recipe": (root / "recipe", shas)}
    for variant, make in (("silent", _silent), ("dots", _dots)):
        folder = root / variant
        for name in ("appearance", "context", "grading"):  # shared: same files, same sha256
            _link(recipe[name], folder / recipe[name].relative_to(root / "recipe"))
        path = folder / spec.folder / spec.official_file
        path.parent.mkdir(parents=True)
        torch.save({spec.state_dict_key: make(state), **spec.extra}, path)
        out[variant] = (folder, {**shas, ids["detector"]: sha256_file(path)})
    del state
    yield out
    shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- the cohort
def _phantom(n_slices: int = 3, size: int = 96) -> np.ndarray:
    """Dots at the centroid and corners of N_BODIES bodies, the same on every slice."""
    image = np.zeros((size, size), np.float32)
    rr, cc = np.mgrid[-2:3, -2:3]
    dot = np.exp(-(rr**2 + cc**2) / 2.0) * (rr**2 + cc**2 <= 4)
    top = (size - (N_BODIES - 1) * STEP) // 2
    for k in range(N_BODIES):
        row, col = top + k * STEP, size // 2
        for dr, dc in [(0, 0), (-HALF_ROWS, -HALF_COLS), (-HALF_ROWS, HALF_COLS), (HALF_ROWS, HALF_COLS),
                       (HALF_ROWS, -HALF_COLS)]:
            image[row + dr - 2:row + dr + 3, col + dc - 2:col + dc + 3] += 1000.0 * dot
    return np.repeat(image[None], n_slices, axis=0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A demo scan (small synthetic phantom, 3 slices) and the dot phantom; two simulated reads."""
    root = tmp_path_factory.mktemp("cohort")
    scan = synthetic.generate_scan(3, fov="cervical", n_slices=3, rows=80)
    write_demo_scan(scan, root / "scans" / "demo0000", np.random.default_rng(3), "Phantom^Subject0000",
                    "PHANTOM-0000", with_localiser=False)
    header = SeriesHeader(pixel_spacing_mm=(NET_MM, NET_MM), slice_spacing_mm=4.0,
                          patient_name="Phantom^Subject0001", patient_id="PHANTOM-0001")
    write_series(_phantom(), root / "scans" / "dots", header, np.random.default_rng(1))
    manifest = pd.DataFrame([
        {"scan_id": "demo0000", "subject_id": "sub0000", "path": "scans/demo0000", "site": "site-A", "visit": "v1"},
        {"scan_id": "dots", "subject_id": "sub0001", "path": "scans/dots", "site": "site-B", "visit": "v1"},
    ])
    manifest.to_csv(root / "manifest.csv", index=False)
    manifest[manifest["scan_id"] == "dots"].to_csv(root / "dots.csv", index=False)
    # one task only: the report's agreement figures are the slow part of a run
    reads = [{"scan_id": s, "level": level, "reader": reader, "Pfirrmann": grade}
             for s, level, grades in [("demo0000", "L4-L5", (3, 3)), ("dots", "L3-L4", (2, 3)),
                                      ("dots", "L4-L5", (4, 4))]
             for reader, grade in zip(("R1", "R2"), grades)]
    pd.DataFrame(reads).to_csv(root / "labels.csv", index=False)
    return root


def _run(folder: Path, cohort: Path, out: Path, manifest: str = "manifest.csv", **overrides) -> dict[str, Path]:
    """The rules of the Snakefile in process: stages, QC, cohort tables, agreement, report."""
    config = resolve_config({"outdir": str(out), "manifest": str(cohort / manifest),
                             "labels": str(cohort / "labels.csv"),
                             "shard_size": 2, "threads": 2, "device": "cpu", "tta": 1, "hotspots": "none",
                             "agreement": {"bootstrap": 20, "seed": 0},
                             "models": {"family": "spinenet-official", "dir": str(folder)}, **overrides})
    paths = run_in_process(config, cohort / manifest, created_by="test")
    paths["agreement"], paths["confusion"] = run_agreement(
        paths["discs"], cohort / "labels.csv", out / "tables" / "agreement.parquet",
        n_bootstrap=20, seed=0, created_by="test")
    paths["report"] = out / "report" / "validation.html"
    build_report(config, scans=paths["scans"], discs=paths["discs"], agreement=paths["agreement"],
                 labels=cohort / "labels.csv", out=paths["report"])
    return paths


def _check_tables(paths: dict[str, Path], models: dict[str, str], scan_ids: list[str]) -> dict[str, pd.DataFrame]:
    """Every table written, every scan ok, the contract's columns, official provenance."""
    tables = {k: pd.read_parquet(paths[k]) for k in ("scans", "vertebrae", "discs", "agreement", "confusion")}
    scans = tables["scans"]
    assert list(scans["scan_id"]) == scan_ids
    assert (scans["status"] == "ok").all(), scans[["scan_id", "failed_stage", "error"]]
    assert list(scans.columns[:len(SCAN_COLUMNS)]) == SCAN_COLUMNS
    assert {f"seconds_{s}" for s in stage_order()} <= set(scans.columns)
    assert list(tables["vertebrae"].columns[:len(VERTEBRA_COLUMNS)]) == VERTEBRA_COLUMNS
    assert list(tables["discs"].columns[:9]) == DISC_COLUMNS[:9] and set(DISC_COLUMNS) <= set(tables["discs"].columns)
    for kind in ("vertebrae", "discs"):  # counts in the scans table agree with the rows
        counts = tables[kind].groupby("scan_id").size()
        assert [int(counts.get(s, 0)) for s in scan_ids] == scans[f"n_{kind}"].astype(int).tolist()
    vertebrae, discs = tables["vertebrae"], tables["discs"]
    for column in ("vertebra_id", "slice_min", "slice_max"):
        assert pd.api.types.is_integer_dtype(vertebrae[column]), column
    for column in ("level_probability", "centroid_slice", "centroid_row", "centroid_col", "centroid_z_mm"):
        assert pd.api.types.is_float_dtype(vertebrae[column]), column
    for column in ("centre_slice", "centre_row", "centre_col"):
        assert pd.api.types.is_float_dtype(discs[column]), column
    for task in TASK_NAMES:
        assert pd.api.types.is_integer_dtype(discs[task]), task
    # provenance: the official family, each checkpoint file the stages loaded and its sha256
    for kind in ("scans", "vertebrae", "discs", "agreement"):
        provenance = read_provenance(paths[kind])
        assert json.loads(provenance["models"]) == models, kind
    assert set(tables["agreement"]["comparison"]) >= {"model_vs_R1", "R1_vs_R2"}
    html = paths["report"].read_text()
    assert all(scan_id in html for scan_id in scan_ids)
    assert all(sha in html for sha in models.values())
    assert "<img" in html
    for scan_id in scan_ids:
        assert (paths["scans"].parents[1] / "report" / "qc" / f"{scan_id}.png").is_file()
    return tables


# --------------------------------------------------------------------------- the runs
def test_recipe_weights_run_writes_every_table(folders, cohort, tmp_path):
    folder, models = folders["recipe"]
    assert sorted(models) == ["spinenet-official/appearance/ckpt187.pt", "spinenet-official/context/ckpt16.pt",
                              "spinenet-official/detect-vfr/ckpt435.pt", "spinenet-official/grading/ckpt1.pt"]
    _check_tables(_run(folder, cohort, tmp_path / "out"), models, ["demo0000", "dots"])


def test_zero_detections_complete_with_empty_typed_tables(folders, cohort, tmp_path):
    folder, models = folders["silent"]
    detector = "spinenet-official/detect-vfr/ckpt435.pt"
    assert models[detector] != folders["recipe"][1][detector]
    # the dot phantom: the scan the "dots" detector finds (next test); one scan keeps this quick
    tables = _check_tables(_run(folder, cohort, tmp_path / "out", manifest="dots.csv"), models, ["dots"])
    scans = tables["scans"]
    assert (scans["n_vertebrae"] == 0).all() and (scans["n_discs"] == 0).all()
    assert len(tables["vertebrae"]) == 0 and len(tables["discs"]) == 0
    # readers still compare with each other; the model comparisons say why they are empty
    agreement = tables["agreement"]
    assert agreement.loc[agreement["comparison"] == "R1_vs_R2", "estimate"].notna().any()
    assert (agreement.loc[agreement["comparison"] == "model_vs_R1", "note"].str.len() > 0).all()


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_detections_run_through_official_labeller_and_grader(folders, cohort, tmp_path, precision):
    folder, models = folders["dots"]
    run = _run(folder, cohort, tmp_path / "out", graded_discs=ALL_DISCS,
               models={"family": "spinenet-official", "dir": str(folder), "precision": precision})
    tables = _check_tables(run, models, ["demo0000", "dots"])
    vertebrae = tables["vertebrae"].query("scan_id == 'dots'").sort_values("vertebra_id")
    # the dots come back exactly, caudal first, in the stored grid (all 3 slices)
    assert len(vertebrae) == N_BODIES
    top = (96 - (N_BODIES - 1) * STEP) // 2
    rows = [top + k * STEP for k in reversed(range(N_BODIES))]
    np.testing.assert_allclose(vertebrae["centroid_row"], rows, atol=0.5)
    np.testing.assert_allclose(vertebrae["centroid_col"], 48, atol=0.5)
    assert (vertebrae["slice_min"] == 0).all() and (vertebrae["slice_max"] == 2).all()
    for polygons in vertebrae["polygons"]:
        corners = np.asarray(polygons[0]["corners"]).reshape(4, 2)
        assert np.ptp(corners[:, 0]) == pytest.approx(2 * HALF_ROWS, abs=0.5)
        assert np.ptp(corners[:, 1]) == pytest.approx(2 * HALF_COLS, abs=0.5)
    assert vertebrae["level"].notna().all()  # the official labeller named both
    discs = tables["discs"].query("scan_id == 'dots'")
    assert len(discs) >= 1  # and the official grader graded the disc between them
    assert (discs["model_id"] == "spinenet-official/grading/ckpt1.pt").all()
    for task in TASKS:
        assert discs[task.name].isin(task.grades).all(), task.name
        for probs in discs[f"{task.name}_probs"]:
            assert len(probs) == task.n_classes and sum(probs) == pytest.approx(1.0, abs=1e-5)
