"""The shard runner and cohort tables, in process: failures recorded, never fatal; no PHI out."""
from __future__ import annotations

import numpy as np
import pandas as pd

from spinecohort.config import resolve_config
from spinecohort.dicom_writer import SeriesHeader, write_series
from spinecohort.pipeline import run_in_process
from spinecohort.provenance import read_provenance


def test_cohort_with_a_bad_scan(tmp_path):
    rng = np.random.default_rng(0)
    header = SeriesHeader(pixel_spacing_mm=(0.7, 0.7), slice_spacing_mm=4.0, patient_name="Secret^Person",
                          patient_id="PID-998877")
    write_series(rng.integers(0, 2000, (6, 48, 40)).astype(np.float32), tmp_path / "good", header, rng)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.bin").write_bytes(b"not an image")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("scan_id,subject_id,path,site,age\nok1,subA,good,north,55\nbad1,subB,junk,south,61\nlost,subC,missing,south,70\n")
    config = resolve_config({"outdir": str(tmp_path / "out"), "shard_size": 2, "manifest": str(manifest)})
    paths = run_in_process(config, manifest, created_by="test")
    scans = pd.read_parquet(paths["scans"]).set_index("scan_id")
    assert list(scans.index) == ["ok1", "bad1", "lost"]
    assert scans.loc["ok1", "status"] == "ok" and scans.loc["ok1", "n_slices"] == 6
    assert scans.loc["ok1", "age"] == 55.0 and scans.loc["bad1", "site"] == "south"
    assert scans.loc["bad1", "status"] == "failed" and scans.loc["bad1", "failed_stage"] == "ingest"
    assert scans.loc["bad1", "error"].startswith("scan bad1: file ") and "no readable DICOM" in scans.loc["bad1", "error"]
    assert "does not exist" in scans.loc["lost", "error"]
    assert np.isfinite(scans.loc["ok1", "seconds_ingest"])
    assert (tmp_path / "out" / "report" / "qc" / "ok1.png").exists()
    provenance = read_provenance(paths["scans"])
    assert set(provenance) == {"pipeline_version", "config_sha256", "models", "created_by"}
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert b"Secret" not in blob and b"PID-998877" not in blob, path


def test_label_stage_drops_a_weak_body_the_labeller_did_not_keep():
    from spinecohort.stages import drop_unlabelled_weak_bodies

    rows = pd.DataFrame({"vertebra_id": [2, 0, 1], "level": ["L4", None, "L5"],
                         "found_at_low_threshold": [False, True, False]})
    kept = drop_unlabelled_weak_bodies(rows)
    assert kept["level"].tolist() == ["L5", "L4"] and kept["vertebra_id"].tolist() == [0, 1]
    read_as_s1 = rows.assign(level=["L4", "S1", "L5"])
    assert drop_unlabelled_weak_bodies(read_as_s1)["level"].tolist() == ["S1", "L5", "L4"]
    older = rows.drop(columns="found_at_low_threshold")  # rows of a detect stage without the search
    assert drop_unlabelled_weak_bodies(older) is older


def test_a_series_stored_turned_by_90_degrees_gets_the_same_levels_and_patient_positions(tmp_path):
    """Some archives store sagittal images lying on their side (cols running head-feet): the
    networks see them upright, and the tables give positions in the stored grid."""
    from spinecohort.synthetic import generate_scan

    scan = generate_scan(31, fov="lumbar", contrast="T2", n_slices=7, rows=256)
    rng = np.random.default_rng(1)
    spacing = (float(scan.pixel_spacing_mm), float(scan.pixel_spacing_mm))
    upright = SeriesHeader(pixel_spacing_mm=spacing, slice_spacing_mm=4.0)
    write_series(scan.volume, tmp_path / "upright", upright, rng)
    # the same voxels stored with rows running front-back and cols head-feet; that orientation's
    # slice normal points the other way, so the slices are stored in reverse from the far end
    n = scan.volume.shape[0]
    turned = SeriesHeader(pixel_spacing_mm=spacing, slice_spacing_mm=4.0, orientation=(0.0, 0.0, -1.0, 0.0, 1.0, 0.0),
                          origin_mm=(-4.0 * (n - 1), 0.0, 0.0))
    write_series(np.ascontiguousarray(scan.volume[::-1].transpose(0, 2, 1)), tmp_path / "turned", turned, rng)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("scan_id,subject_id,path\nup,s1,upright\nside,s2,turned\n")
    config = resolve_config({"outdir": str(tmp_path / "out"), "manifest": str(manifest)})
    paths = run_in_process(config, manifest, created_by="test")
    scans = pd.read_parquet(paths["scans"]).set_index("scan_id")
    assert list(scans["status"]) == ["ok", "ok"]
    assert (scans.loc["side", "rows"], scans.loc["side", "cols"]) == (scans.loc["up", "cols"], scans.loc["up", "rows"])
    vertebrae = pd.read_parquet(paths["vertebrae"])
    up = vertebrae[vertebrae.scan_id == "up"].sort_values("centroid_z_mm").reset_index(drop=True)
    side = vertebrae[vertebrae.scan_id == "side"].sort_values("centroid_z_mm").reset_index(drop=True)
    truth = sorted(v.level for v in scan.vertebrae if not v.partial)
    assert len(up) >= len(truth) - 1 and list(side["level"]) == list(up["level"])
    for axis in ("x", "y", "z"):
        np.testing.assert_allclose(side[f"centroid_{axis}_mm"], up[f"centroid_{axis}_mm"], atol=1e-3)
    # stored-grid coordinates: the turned series' row is the upright one's col
    np.testing.assert_allclose(side["centroid_row"], up["centroid_col"], atol=1e-3)
    np.testing.assert_allclose(side["centroid_col"], up["centroid_row"], atol=1e-3)
    discs = pd.read_parquet(paths["discs"]).set_index(["scan_id", "level"]).sort_index()
    assert list(discs.loc["side"].index) == list(discs.loc["up"].index)
    # the same disc volumes, so the same grades and sizes
    for column in ("Pfirrmann", "Narrowing", "CentralCanalStenosis", "width_mm", "height_mm", "angle_deg"):
        np.testing.assert_allclose(discs.loc["side", column].astype(float), discs.loc["up", column].astype(float), atol=1e-6)
