"""DICOM / NIfTI ingestion on DICOMs the tests build themselves."""
from __future__ import annotations

import os
import zipfile

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from spinecohort.dicom_writer import SeriesHeader, write_series
from spinecohort.ingest import IngestError, ingest, load_series, save_series


def _volume(rng, shape=(6, 40, 32)):
    return rng.integers(0, 3000, size=shape).astype(np.float32)


def _write(folder, volume, rng, **kwargs):
    header = SeriesHeader(pixel_spacing_mm=kwargs.pop("spacing", (0.8, 0.7)), slice_spacing_mm=kwargs.pop("slice_spacing", 4.0),
                          origin_mm=(12.0, -90.0, 150.0), **kwargs)
    return write_series(volume, folder, header, rng)


def test_round_trip_shuffled_names_and_affine(tmp_path):
    rng = np.random.default_rng(1)
    volume = _volume(rng)
    paths = _write(tmp_path / "scan", volume, rng)
    assert all(p.suffix == "" for p in paths)  # random names without extensions
    series = ingest(tmp_path / "scan", "s1")
    np.testing.assert_array_equal(series.volume, volume)
    assert series.meta["pixel_spacing_mm"] == [0.8, 0.7]
    assert series.meta["slice_spacing_mm"] == pytest.approx(4.0)
    # slice 0 row 0 col 0 is the first slice's ImagePositionPatient; steps follow the cosines
    np.testing.assert_allclose(series.to_patient([0, 0, 0])[0], [12.0, -90.0, 150.0])
    np.testing.assert_allclose(series.to_patient([1, 2, 3])[0], [12.0 - 4.0, -90.0 + 3 * 0.7, 150.0 - 2 * 0.8])
    np.testing.assert_allclose(series.to_index(series.to_patient([[2.5, 7, 9]])), [[2.5, 7, 9]])


def test_sorted_by_position_not_instance_number(tmp_path):
    rng = np.random.default_rng(2)
    volume = _volume(rng)
    paths = _write(tmp_path / "scan", volume, rng)
    # Scramble InstanceNumber against position: order must still follow the geometry.
    for path, number in zip(paths, rng.permutation(len(paths))[::-1]):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = int(number) + 1
        ds.save_as(path)
    np.testing.assert_array_equal(ingest(tmp_path / "scan", "s").volume, volume)


def test_nested_folders_junk_and_localiser(tmp_path):
    rng = np.random.default_rng(3)
    sagittal = _volume(rng)
    _write(tmp_path / "scan" / "a" / "b", sagittal, rng, series_description="SAG T2")
    _write(tmp_path / "scan" / "loc", _volume(rng, (3, 32, 32)), rng, series_description="LOCALISER",
           orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    (tmp_path / "scan" / "README.txt").write_text("not dicom")
    (tmp_path / "scan" / "DICOMDIR_junk").write_bytes(os.urandom(300))
    series = ingest(tmp_path / "scan", "s")
    np.testing.assert_array_equal(series.volume, sagittal)
    assert "non-DICOM" in " ".join(series.meta["warnings"])


def test_prefers_t2_and_honours_selector(tmp_path):
    rng = np.random.default_rng(4)
    t1, t2 = _volume(rng), _volume(rng)
    _write(tmp_path / "scan" / "x", t1, rng, series_description="SAG T1 TSE", echo_time_ms=12, repetition_time_ms=500)
    _write(tmp_path / "scan" / "y", t2, rng, series_description="sag tse", echo_time_ms=100, repetition_time_ms=3500)
    series = ingest(tmp_path / "scan", "s")
    np.testing.assert_array_equal(series.volume, t2)
    assert "T2" in series.meta["series_choice"]
    chosen = ingest(tmp_path / "scan", "s", series="t1 tse")
    np.testing.assert_array_equal(chosen.volume, t1)
    by_uid = ingest(tmp_path / "scan", "s", series=chosen.meta["series_uid"])
    np.testing.assert_array_equal(by_uid.volume, t1)
    with pytest.raises(IngestError, match="no series matches selector 'FLAIR'"):
        ingest(tmp_path / "scan", "s", series="FLAIR")


def test_no_sagittal_series_is_a_clear_error(tmp_path):
    rng = np.random.default_rng(5)
    _write(tmp_path / "scan", _volume(rng), rng, orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), series_description="AX T2")
    with pytest.raises(IngestError, match=r"scan s7: no sagittal series.*'AX T2'"):
        ingest(tmp_path / "scan", "s7")


def test_oblique_sagittal_within_30_degrees(tmp_path):
    rng = np.random.default_rng(6)
    angle = np.radians(20)
    orientation = (0.0, np.cos(angle), np.sin(angle), 0.0, 0.0, -1.0)
    _write(tmp_path / "scan", _volume(rng), rng, orientation=orientation)
    assert ingest(tmp_path / "scan", "s").volume.shape == (6, 40, 32)


def test_truncated_file_names_scan_and_file(tmp_path):
    rng = np.random.default_rng(7)
    paths = _write(tmp_path / "scan", _volume(rng), rng)
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) - 500])
    with pytest.raises(IngestError) as error:
        ingest(tmp_path / "scan", "scanX")
    message = str(error.value)
    assert message.startswith("scan scanX: file ") and paths[2].name in message and "\n" not in message


def test_missing_geometry_tags_are_reported(tmp_path):
    rng = np.random.default_rng(8)
    paths = _write(tmp_path / "scan", _volume(rng), rng)
    for path in paths:
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.save_as(path)
    with pytest.raises(IngestError, match="missing tag.*ImagePositionPatient"):
        ingest(tmp_path / "scan", "s")


def test_inconsistent_matrix_names_file(tmp_path):
    rng = np.random.default_rng(9)
    paths = _write(tmp_path / "scan", _volume(rng), rng)
    ds = pydicom.dcmread(paths[0])
    ds.Rows, ds.Columns = 32, 40
    ds.save_as(paths[0])
    with pytest.raises(IngestError, match=paths[0].name):
        ingest(tmp_path / "scan", "s")


def test_duplicates_and_missing_slices_warn(tmp_path):
    rng = np.random.default_rng(10)
    volume = _volume(rng, (8, 20, 20))
    paths = _write(tmp_path / "scan", volume, rng)
    copy = pydicom.dcmread(paths[1])
    copy.save_as(tmp_path / "scan" / "copy_of_one")  # same instance twice
    ordered = sorted(paths, key=lambda p: -float(pydicom.dcmread(p).ImagePositionPatient[0]))
    ordered[4].unlink()  # a hole in the stack
    series = ingest(tmp_path / "scan", "s")
    warnings = " ".join(series.meta["warnings"])
    assert "duplicate" in warnings and "missing" in warnings
    np.testing.assert_array_equal(series.volume, np.delete(volume, 4, axis=0))


def test_rescale_slope_intercept(tmp_path):
    rng = np.random.default_rng(11)
    volume = rng.uniform(-50.5, 800.25, size=(5, 16, 16)).astype(np.float32)
    _write(tmp_path / "scan", volume, rng)
    np.testing.assert_allclose(ingest(tmp_path / "scan", "s").volume, volume, atol=0.01)


def test_compressed_transfer_syntax(tmp_path):
    rng = np.random.default_rng(12)
    volume = _volume(rng)
    for path in _write(tmp_path / "scan", volume, rng):
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)
    assert pydicom.dcmread(next((tmp_path / "scan").iterdir())).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(ingest(tmp_path / "scan", "s").volume, volume)


def test_enhanced_multiframe(tmp_path):
    rng = np.random.default_rng(13)
    volume = _volume(rng, (5, 24, 20))
    paths = sorted(_write(tmp_path / "single", volume, rng), key=lambda p: -float(pydicom.dcmread(p).ImagePositionPatient[0]))
    frames = [pydicom.dcmread(p) for p in paths]
    enhanced = pydicom.dcmread(paths[0])
    enhanced.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR Image Storage
    enhanced.NumberOfFrames = len(frames)
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        delattr(enhanced, tag)
    shared = pydicom.Dataset()
    orientation = pydicom.Dataset()
    orientation.ImageOrientationPatient = frames[0].ImageOrientationPatient
    measures = pydicom.Dataset()
    measures.PixelSpacing = frames[0].PixelSpacing
    measures.SliceThickness = frames[0].SliceThickness
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelMeasuresSequence = [measures]
    enhanced.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    # Frames stored in reverse spatial order: ingestion must still sort by position.
    for ds in frames[::-1]:
        item, position = pydicom.Dataset(), pydicom.Dataset()
        position.ImagePositionPatient = ds.ImagePositionPatient
        item.PlanePositionSequence = [position]
        per_frame.append(item)
    enhanced.PerFrameFunctionalGroupsSequence = per_frame
    enhanced.PixelData = b"".join(ds.PixelData for ds in frames[::-1])
    (tmp_path / "enh").mkdir()
    enhanced.save_as(tmp_path / "enh" / "multi.dcm")
    np.testing.assert_array_equal(ingest(tmp_path / "enh", "s").volume, volume)


def test_zip_input(tmp_path):
    rng = np.random.default_rng(14)
    volume = _volume(rng)
    paths = _write(tmp_path / "scan", volume, rng)
    archive = tmp_path / "scan.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in paths:
            handle.write(path, f"nested/dir/{path.name}")
        handle.writestr("../../escape.txt", "zip members never leave the archive")
    np.testing.assert_array_equal(ingest(archive, "s").volume, volume)
    assert not (tmp_path.parent / "escape.txt").exists()


def test_single_slice_series_is_a_one_slice_volume(tmp_path):
    """A 2-D export (one sagittal slice) is ingested as what it is: one slice, no padding."""
    rng = np.random.default_rng(16)
    image = _volume(rng, (1, 40, 32))
    _write(tmp_path / "scan", image, rng, slice_spacing=5.0, slice_thickness_mm=4.0)
    series = ingest(tmp_path / "scan", "s")
    assert series.volume.shape == (1, 40, 32) and series.meta["n_slices"] == 1
    np.testing.assert_array_equal(series.volume, image)
    # no neighbour to measure the step from: SpacingBetweenSlices (else SliceThickness) scales the slice axis
    assert series.meta["slice_spacing_mm"] == pytest.approx(5.0)
    np.testing.assert_allclose(series.to_patient([0, 2, 3])[0], [12.0, -90.0 + 3 * 0.7, 150.0 - 2 * 0.8])
    assert not any("missing" in w for w in series.meta["warnings"])


def test_two_dimensional_nifti_is_one_slice(tmp_path):
    rng = np.random.default_rng(17)
    data = rng.uniform(0, 1000, size=(30, 40)).astype(np.float32)  # (A-P, S-I) of one sagittal plane
    affine = np.array([[0, 0, 4.0, -12], [0.8, 0, 0, -20], [0, 0.7, 0, -30], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "slice.nii.gz")
    series = ingest(tmp_path / "slice.nii.gz", "s")
    assert series.volume.shape == (1, 40, 30) and series.meta["n_slices"] == 1
    assert series.meta["pixel_spacing_mm"] == pytest.approx([0.7, 0.8])
    ras_index = np.array([12, 25, 0])
    lps = np.diag([-1, -1, 1]) @ (affine[:3, :3] @ ras_index + affine[:3, 3])
    sagittal_index = np.rint(series.to_index(lps)[0]).astype(int)
    assert series.volume[tuple(sagittal_index)] == pytest.approx(data[12, 25])


def test_nifti_input_reoriented_to_sagittal_layout(tmp_path):
    rng = np.random.default_rng(15)
    # RAS array: axis 0 = x (left-right, 4 mm), axis 1 = y (posterior->anterior), axis 2 = z (inferior->superior)
    data = rng.uniform(0, 1000, size=(7, 30, 40)).astype(np.float32)
    affine = np.diag([4.0, 0.8, 0.7, 1.0])
    affine[:3, 3] = [-12, -20, -30]
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "scan.nii.gz")
    series = ingest(tmp_path / "scan.nii.gz", "s")
    assert series.volume.shape == (7, 40, 30)  # slices, rows (S-I), cols (A-P)
    assert series.meta["pixel_spacing_mm"] == pytest.approx([0.7, 0.8])
    # rows run toward the feet, cols toward the back, slices toward the left (LPS +x)
    directions = series.affine[:3, :3]
    assert directions[2, 1] < 0 and directions[1, 2] > 0 and directions[0, 0] > 0
    # every voxel keeps its patient position: compare through the two affines
    ras_index = np.array([3, 12, 25])
    lps = (np.diag([-1, -1, 1]) @ (affine[:3, :3] @ ras_index + affine[:3, 3]))
    sagittal_index = np.rint(series.to_index(lps)[0]).astype(int)
    assert series.volume[tuple(sagittal_index)] == pytest.approx(data[tuple(ras_index)])


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(IngestError, match="does not exist"):
        ingest(tmp_path / "nope", "s")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(IngestError, match="no readable DICOM image"):
        ingest(tmp_path / "empty", "s")


def test_no_phi_in_metadata_or_saved_series(tmp_path):
    rng = np.random.default_rng(16)
    _write(tmp_path / "scan", _volume(rng), rng, patient_name="Doe^Jane", patient_id="MRN-123456")
    series = ingest(tmp_path / "scan", "s")
    save_series(series, tmp_path / "s.npz")
    blob = (tmp_path / "s.npz").read_bytes() + repr(series.meta).encode()
    for phi in (b"Doe", b"MRN-123456", b"19700101", b"SYN0000"):
        assert phi not in blob
    reloaded = load_series(tmp_path / "s.npz")
    np.testing.assert_array_equal(reloaded.volume, series.volume)
    np.testing.assert_array_equal(reloaded.affine, series.affine)
