"""Hostile and odd input (issue 15): one scan never stops, hangs or slows the cohort; every
failure is named; outputs are group-readable and typed the same whatever fails."""
from __future__ import annotations

import os
import stat
import struct
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pydicom
import pytest

from spinecohort import ingest as ingest_mod
from spinecohort.config import ConfigError, resolve_config
from spinecohort.dicom_writer import SeriesHeader, write_series
from spinecohort.ingest import IngestError, ingest, load_series, save_series, series_key
from spinecohort.manifest import ManifestError, read_manifest
from spinecohort.provenance import atomic_write_bytes
from spinecohort.stats import _read_table, label_warnings


def _series(folder: Path, seed: int = 0, **header) -> list[Path]:
    rng = np.random.default_rng(seed)
    volume = rng.integers(0, 2000, (6, 48, 40)).astype(np.float32)
    return write_series(volume, folder, SeriesHeader((0.7, 0.7), 4.0, **header), rng)


def _nifti(path: Path, srow: float | None = None, data: np.ndarray | None = None) -> Path:
    """A NIfTI file; ``srow`` set: its sform (the affine nibabel reads) holds only that value."""
    data = np.ones((5, 30, 20), np.float32) if data is None else data
    nib.save(nib.Nifti1Image(data, np.diag([4.0, 0.7, 0.7, 1.0])), path)
    if srow is not None:
        raw = bytearray(path.read_bytes())
        struct.pack_into("<hh", raw, 252, 0, 1)  # qform_code 0, sform_code 1
        struct.pack_into("<12f", raw, 280, *([srow] * 12))  # srow_x, srow_y, srow_z
        path.write_bytes(raw)
    return path


def _one_line_naming(message: str, scan: str) -> None:
    assert message.startswith(f"scan {scan}: ") and "\n" not in message and len(message) > len(scan) + 12, message


# ----------------------------------------------------------------------------- finding 1
@pytest.mark.parametrize("value", [0.0, float("nan")])
def test_nifti_with_zero_or_nan_affine_is_a_named_failure(tmp_path, value):
    path = _nifti(tmp_path / "scan.nii", srow=value)
    with pytest.raises(IngestError, match=r"scan z: file .*scan\.nii: NIfTI affine .* not a valid") as error:
        ingest(path, "z")
    _one_line_naming(str(error.value), "z")


# ----------------------------------------------------------------------------- finding 2
def test_fifo_and_dev_zero_link_are_refused_not_read(tmp_path):
    _series(tmp_path / "scan")
    os.mkfifo(tmp_path / "scan" / "pipe")
    (tmp_path / "scan" / "zero").symlink_to("/dev/zero")
    series = ingest(tmp_path / "scan", "s")  # would read forever before
    assert series.volume.shape == (6, 48, 40)
    assert any("refused 2 file(s)" in w and "not a regular file" in w for w in series.meta["warnings"])
    for target in ("pipe", "zero"):  # a manifest path that is itself such a file
        with pytest.raises(IngestError, match=f"scan s: file .*{target}: not a regular file"):
            ingest(tmp_path / "scan" / target, "s")


def test_a_read_past_its_time_bound_is_stopped_and_named(tmp_path, monkeypatch):
    _series(tmp_path / "scan")

    def stuck(self, stop_before_pixels):  # noqa: ARG001 - stands in for a reader that never returns
        while True:
            pass

    monkeypatch.setattr(ingest_mod, "FILE_SECONDS", 0.2)
    monkeypatch.setattr(ingest_mod._Source, "read", stuck)
    with pytest.raises(IngestError, match=r"scan s: file \S+: reading did not finish within 0.2 s"):
        ingest(tmp_path / "scan", "s")


def test_files_over_the_byte_bounds_are_refused(tmp_path, monkeypatch):
    paths = _series(tmp_path / "scan")
    big = tmp_path / "scan" / "huge.bin"
    big.write_bytes(b"\0" * 4096)
    monkeypatch.setattr(ingest_mod, "MAX_FILE_BYTES", 3000)  # the slices are ~4 kB too: only the count matters
    with pytest.raises(IngestError, match="no readable DICOM image.*over the 0 MiB bound per file"):
        ingest(tmp_path / "scan", "s")
    monkeypatch.setattr(ingest_mod, "MAX_FILE_BYTES", 1 << 20)
    monkeypatch.setattr(ingest_mod, "MAX_SCAN_BYTES", sum(p.stat().st_size for p in paths))
    with pytest.raises(IngestError, match="scan s: file .*: scan holds more than"):
        ingest(tmp_path / "scan", "s")


# ----------------------------------------------------------------------------- finding 3
def test_zip_bomb_members_are_refused_unread(tmp_path, monkeypatch):
    paths = _series(tmp_path / "scan")
    archive = tmp_path / "scan.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        for path in paths:
            handle.write(path, f"series/{path.name}")
        for name in ("zeros1", "zeros2"):
            handle.writestr(name, b"\0" * (6 << 20))  # compresses ~1000:1
        handle.writestr("zz_truncated.zip", archive.read_bytes()[:100])
        handle.writestr("zz_inner.zip", b"PK\x03\x04" + bytes(200))
    read = []
    original = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: read.append(getattr(name, "filename", name)) or original(self, name, *a, **k))
    series = ingest(archive, "s")
    assert series.volume.shape == (6, 48, 40)
    assert not {"zeros1", "zeros2"} & set(read)
    warning = next(w for w in series.meta["warnings"] if w.startswith("refused"))
    assert "refused 4 file(s), first: scan.zip!zeros1: compressed" in warning and ":1, over the 100:1 bound" in warning
    with zipfile.ZipFile(tmp_path / "outer.zip", "w") as handle:
        handle.write(archive, "inner.zip")
    with pytest.raises(IngestError, match="outer.zip: no readable DICOM .* outer.zip!inner.zip: a zip inside the zip is not read"):
        ingest(tmp_path / "outer.zip", "s")
    monkeypatch.setattr(ingest_mod, "MAX_FILE_BYTES", 5 << 20)  # the declared size alone also refuses
    assert "declares" in next(w for w in ingest(archive, "s").meta["warnings"] if w.startswith("refused"))
    monkeypatch.setattr(ingest_mod, "MAX_ZIP_BYTES", 10_000)  # members are held in memory: bounded together
    with pytest.raises(IngestError, match=r"scan s: file scan\.zip!\S+: zip members hold more than"):
        ingest(archive, "s")


# ----------------------------------------------------------------------------- finding 4
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_outputs_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "out" / "table.parquet", b"data")
        atomic_write_bytes(tmp_path / "out" / "table.parquet", b"replaced")  # rewriting keeps working
    finally:
        os.umask(old)
    target = tmp_path / "out" / "table.parquet"
    assert stat.S_IMODE(target.stat().st_mode) == mode and target.read_bytes() == b"replaced"
    assert [p.name for p in target.parent.iterdir()] == ["table.parquet"]  # no temporary file left


# ----------------------------------------------------------------------------- finding 6
def _manifest(tmp_path: Path, text: str | bytes, name: str = "manifest.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_manifest_errors_are_named(tmp_path):
    cases = {
        "": "file is empty",
        "scan_id,subject_id,path\n": "no scans",
        f"scan_id,subject_id,path\n{'a' * 245},p,x\n": r"row 2 \(scan_id\).*too long",
        "scan_id,subject_id,path\nAbc,p,x\nabc,q,y\n": r"row 3: scan_id 'abc' differs from 'Abc' \(row 2\) only in case",
        b"scan_id,subject_id,path\ns\xe9,p,x\n": "not a readable UTF-8 CSV",
        "scan_id,subject_id,path,rows,seconds_x\ns,p,x,1,2\n": "column\\(s\\) rows, seconds_x are names the pipeline writes",
    }
    for text, message in cases.items():
        with pytest.raises(ManifestError, match=f"manifest .*manifest.csv: {message}"):
            read_manifest(_manifest(tmp_path, text))
    assert list(read_manifest(_manifest(tmp_path, f"scan_id,subject_id,path\n{'a' * 128},p,x\n"))["scan_id"]) == ["a" * 128]
    bom = read_manifest(_manifest(tmp_path, "\ufeffscan_id,subject_id,path\ns1,p,x\n"))  # spreadsheet export
    assert list(bom["scan_id"]) == ["s1"]


def test_config_refuses_root_outdir_and_validates_keep_series_uid(tmp_path):
    for outdir in ("/", "/.", "//"):
        with pytest.raises(ConfigError, match="config key outdir: .* is the file-system root"):
            resolve_config({"outdir": outdir, "shard_size": 1})
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="config key outdir: .* exists and is not a folder"):
        resolve_config({"outdir": str(tmp_path / "file"), "shard_size": 1})
    with pytest.raises(ConfigError, match="config key keep_series_uid"):
        resolve_config({"outdir": str(tmp_path), "shard_size": 1, "keep_series_uid": "maybe"})
    assert resolve_config({"outdir": str(tmp_path), "shard_size": 1})["keep_series_uid"] is False


def test_ct_is_not_graded_as_mr(tmp_path):
    paths = _series(tmp_path / "ct")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.Modality = "CT"
        ds.save_as(path)
    with pytest.raises(IngestError, match="scan c: file .*ct: no MR series \\(Modality CT\\)"):
        ingest(tmp_path / "ct", "c")
    _series(tmp_path / "ct" / "mr", seed=1, series_description="SAG T2")  # an MR series beside it is chosen
    assert ingest(tmp_path / "ct", "c").meta["series_description"] == "SAG T2"
    for path in paths:  # secondary-capture exports are graded, with a word
        ds = pydicom.dcmread(path)
        ds.Modality = "OT"
        ds.save_as(path)
    assert any("Modality OT, not MR" in w for w in ingest(tmp_path / "ct", "c", series=pydicom.dcmread(paths[0]).SeriesInstanceUID).meta["warnings"])


def test_huge_header_and_absurd_nifti_dimensions_are_named(tmp_path):
    paths = _series(tmp_path / "big")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.Rows = ds.Columns = 60000
        ds.save_as(path)
    with pytest.raises(IngestError, match=r"scan b: file .*big: no readable DICOM image .*image size 60000x60000 outside"):
        ingest(tmp_path / "big", "b")
    path = _nifti(tmp_path / "absurd.nii")
    raw = bytearray(path.read_bytes())
    struct.pack_into("<8h", raw, 40, 3, 30000, 30000, 30000, 1, 1, 1, 1)  # dim[]
    path.write_bytes(raw)
    with pytest.raises(IngestError, match=r"scan n: file .*absurd.nii: .*30000x30000x30000 has \d+ voxels, over the bound"):
        ingest(path, "n")


def test_absurd_spacing_is_named_before_a_model_tries_to_allocate_for_it(tmp_path):
    rng = np.random.default_rng(0)
    write_series(rng.integers(0, 2000, (6, 48, 40)).astype(np.float32), tmp_path / "scan", SeriesHeader((1e6, 1e6), 4.0), rng)
    with pytest.raises(IngestError, match=r"scan s: file \S+: imaged box 24 x 4.8e\+07 x 4e\+07 mm is over 2000 mm a side"):
        ingest(tmp_path / "scan", "s")


def test_non_finite_voxels_are_zeroed_with_a_warning(tmp_path):
    data = np.ones((5, 30, 20), np.float32)
    data[0, 0, :3] = [np.nan, np.inf, -np.inf]
    series = ingest(_nifti(tmp_path / "scan.nii", data=data), "s")
    assert np.isfinite(series.volume).all() and "3 non-finite voxel value(s) set to 0" in series.meta["warnings"]


def test_series_key_replaces_the_uid_in_files_and_messages(tmp_path):
    _series(tmp_path / "scan")
    series = ingest(tmp_path / "scan", "s")
    uid = series.meta["series_uid"]
    assert series.meta["series_key"] == series_key(uid) and len(series_key(uid)) == 16 and uid not in series_key(uid)
    save_series(series, tmp_path / "s.npz")
    assert uid.encode() not in (tmp_path / "s.npz").read_bytes()
    assert "series_uid" not in load_series(tmp_path / "s.npz").meta
    assert ingest(tmp_path / "scan", "s", series=series_key(uid)).meta["series_key"] == series_key(uid)  # the key selects
    with pytest.raises(IngestError) as error:
        ingest(tmp_path / "scan", "s", series="FLAIR")
    assert series_key(uid) in str(error.value) and uid not in str(error.value)


def test_label_problems_are_counted(tmp_path):
    labels = pd.DataFrame({"scan_id": ["s1", "s1", "s1", "ghost"], "level": ["L4-L5", "L9-L10", "l5/s1", "L4-L5"],
                           "Pfirrmann": ["severe", "3", "7", "2"], "Modic": ["1", "2", "0", "1"]})
    warnings = label_warnings(labels, ["s1", "s2"])
    text = " | ".join(warnings)
    assert "1 column(s) match no task and were ignored: Modic" in text
    assert "1 Pfirrmann grade(s) are not numbers ('severe')" in text
    assert "1 Pfirrmann grade(s) outside the scale" in text
    assert "1 row(s) with a disc level that does not exist (L9-L10)" in text
    assert "1 row(s) for scan_id(s) not in the manifest (ghost)" in text
    empty = tmp_path / "labels.csv"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="labels .*labels.csv: not a readable table"):
        _read_table(empty, "labels")
    from spinecohort.stats import run_agreement

    discs = tmp_path / "discs.csv"
    discs.write_text("scan_id,level,Pfirrmann\ns1,L4-L5,3\n")
    empty.write_text("scan_id,Pfirrmann\ns1,3\n")
    with pytest.raises(ValueError, match=r"agreement of .*discs.csv with .*labels.csv: labels needs a 'level' column"):
        run_agreement(discs, empty, tmp_path / "agreement.parquet", n_bootstrap=0)


# ----------------------------------------------------------------------------- whole cohort, in process
def _hostile_cohort(root: Path) -> Path:
    """Good scans beside hostile ones: (scan_id, path) -> manifest."""
    _series(root / "good", seed=0)
    _series(root / "good_with_junk", seed=1)
    os.mkfifo(root / "good_with_junk" / "fifo")
    (root / "good_with_junk" / "zero").symlink_to("/dev/zero")
    os.mkfifo(os.path.join(os.fsencode(root / "good_with_junk"), b"a\xff"))  # not UTF-8; sorts first, so named
    _nifti(root / "zero_affine.nii", srow=0.0)
    (root / "devzero.dcm").symlink_to("/dev/zero")
    (root / "empty").mkdir()
    truncated = _series(root / "truncated", seed=2)
    truncated[0].write_bytes(truncated[0].read_bytes()[:-900])
    rows = ["good", "good_with_junk", "zero_affine.nii", "devzero.dcm", "empty", "truncated"]
    manifest = root / "manifest.csv"
    manifest.write_text("scan_id,subject_id,path,age\n" + "".join(f"h{i},sub{i},{p},{40 + i}\n" for i, p in enumerate(rows)))
    return manifest


def test_hostile_cohort_in_process_typed_tables_and_qc_isolation(tmp_path, monkeypatch):
    from spinecohort import qc as qc_mod
    from spinecohort.pipeline import render_shard_qc, run_in_process, write_cohort_tables

    manifest = _hostile_cohort(tmp_path / "cohort")
    config = resolve_config({"outdir": str(tmp_path / "out"), "shard_size": 6, "manifest": str(manifest), "tta": 1})
    old = os.umask(0o027)
    try:
        paths = run_in_process(config, manifest, created_by="test")
    finally:
        os.umask(old)
    scans = pd.read_parquet(paths["scans"]).set_index("scan_id")
    assert list(scans.loc[["h0", "h1"], "status"]) == ["ok", "ok"], scans["error"]
    failed = scans[scans["status"] != "ok"]
    assert set(failed.index) == {"h2", "h3", "h4", "h5"}
    for scan_id, error in failed["error"].items():
        _one_line_naming(error, scan_id)
    assert "not a valid" in scans.loc["h2", "error"] and "not a regular file" in scans.loc["h3", "error"]
    assert "refused 3 file(s), first: a\\xff: not a regular file" in scans.loc["h1", "ingest_warnings"]
    assert "series_uid" not in scans.columns and scans.loc["h0", "series_key"] != ""
    for path in (tmp_path / "out").rglob("*"):  # group-readable where the umask allows, nothing more
        if path.is_file() and ".snakemake" not in path.parts:
            assert stat.S_IMODE(path.stat().st_mode) == 0o640, path

    # A QC picture that cannot be drawn fails its scan, not the tables.
    real = qc_mod.render_qc

    def render_qc(series, vertebrae, discs, target, title=""):
        if title == "h1":
            raise ZeroDivisionError("float division by zero")  # what a zero spacing did before ingest refused it
        return real(series, vertebrae, discs, target, title=title)

    monkeypatch.setattr(qc_mod, "render_qc", render_qc)
    render_shard_qc(config, manifest, 0)
    again = pd.read_parquet(write_cohort_tables(config, manifest, 1, created_by="test")["scans"]).set_index("scan_id")
    assert again.loc["h1", "status"] == "failed" and again.loc["h1", "failed_stage"] == "qc"
    assert again.loc["h1", "error"] == "scan h1: qc: ZeroDivisionError: float division by zero"
    assert again.loc["h0", "status"] == "ok"

    # Finding 5: a run where every scan succeeds has the same column types; both read as one dataset.
    good = tmp_path / "good.csv"
    good.write_text(f"scan_id,subject_id,path,age\ng0,subG,{tmp_path / 'cohort' / 'good'},61\n")
    clean = run_in_process(resolve_config({"outdir": str(tmp_path / "clean"), "shard_size": 3, "qc": False, "tta": 1}), good)
    for kind in ("scans", "vertebrae", "discs"):
        dataset = pads.dataset([str(paths[kind]), str(clean[kind])], format="parquet")
        schemas = [pads.dataset(str(p)).schema.remove_metadata() for p in (paths[kind], clean[kind])]
        assert schemas[0] == schemas[1], kind
        table = dataset.to_table()
        assert table.num_rows == sum(pd.read_parquet(p).shape[0] for p in (paths[kind], clean[kind]))
    schema = pads.dataset(str(paths["scans"])).schema
    for column in ("n_slices", "rows", "cols", "n_vertebrae", "n_discs"):
        assert schema.field(column).type == pa.int64(), column
    assert schema.field("age").type == pa.float64() and schema.field("ingest_warnings").type == pa.string()
    assert str(pd.read_parquet(paths["scans"])["n_slices"].dtype) == "Int64"


# ----------------------------------------------------------------------------- property-based
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# Examples per property: enough to reach the odd cases each run (the database keeps failures), few
# enough that the three properties take seconds.
_PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_CELL = st.one_of(st.text(max_size=12), st.sampled_from(["s1", "S1", "a" * 200, "../x", "-1", "1e400", "nan", " ", '"', "\r", "a\x00b"]))


@st.composite
def _csv_text(draw) -> bytes:
    columns = draw(st.lists(st.sampled_from(["scan_id", "subject_id", "path", "series", "site", "visit", "age", "", "scan_id "]),
                            max_size=7))
    rows = draw(st.lists(st.lists(_CELL, min_size=len(columns), max_size=len(columns) + 1), max_size=5))
    sep = draw(st.sampled_from([",", "\t", ";"]))
    text = "\n".join(sep.join(row) for row in [columns, *rows])
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    return text.encode(encoding, errors="replace") if draw(st.booleans()) else draw(st.binary(max_size=200))


@_PROPERTY
@given(raw=_csv_text(), suffix=st.sampled_from([".csv", ".tsv"]))
def test_property_manifests_are_read_or_refused_by_name(tmp_path, raw, suffix):
    path = tmp_path / f"manifest{suffix}"
    path.write_bytes(raw)
    try:
        frame = read_manifest(path)
    except ManifestError as error:
        assert str(error).startswith(f"manifest {path}: ") and "\n" not in str(error)
        return
    assert len(frame) and frame["scan_id"].str.fullmatch(r"[A-Za-z0-9._-]{1,128}").all()
    assert not frame["scan_id"].str.lower().duplicated().any()


@_PROPERTY
@given(columns=st.lists(st.sampled_from(["scan_id", "level", "reader", "Pfirrmann", "Narrowing", "Herniation", "junk"]),
                        unique=True, max_size=6),
       cells=st.lists(st.one_of(_CELL, st.integers(-3, 9).map(str), st.sampled_from(["L4-L5", "l5/s1", "L9-L10", "severe"])),
                      min_size=42, max_size=42))
def test_property_label_files_give_counted_warnings_never_a_crash(tmp_path, columns, cells):
    from spinecohort.stats import compute_agreement

    path = tmp_path / "labels.csv"
    pd.DataFrame({c: cells[i * 7:(i + 1) * 7] for i, c in enumerate(columns)}).to_csv(path, index=False)
    try:
        labels = _read_table(path, "labels")
    except ValueError as error:
        assert str(error).startswith(f"labels {path}: ")
        return
    assert all(isinstance(w, str) and w.startswith("labels: ") for w in label_warnings(labels, ["s1"]))
    predictions = pd.DataFrame({"scan_id": ["s1"], "level": ["L4-L5"], "Pfirrmann": [3], "Narrowing": [2], "Herniation": [0]})
    if {"scan_id", "level"} <= set(labels.columns):
        agreement, _ = compute_agreement(predictions, labels, n_bootstrap=0)
        assert agreement["comparison"].str.contains("_vs_").all()


@pytest.fixture(scope="module")
def good_series(tmp_path_factory) -> list[Path]:
    return _series(tmp_path_factory.mktemp("good") / "scan", seed=7)


_TAGS = ["Rows", "Columns", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "NumberOfFrames",
         "BitsAllocated", "BitsStored", "SamplesPerPixel", "PixelRepresentation", "RescaleSlope", "Modality",
         "PhotometricInterpretation", "SeriesInstanceUID", "PixelData", "EchoTime"]
_VALUES = st.one_of(st.integers(-(2 ** 31), 2 ** 31), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=7), st.binary(max_size=64), st.none())


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the values it is given
@_PROPERTY
@given(damage=st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["truncate", "bytes", "tag", "delete"]),
                                 st.integers(0, 10 ** 6), st.sampled_from(_TAGS), _VALUES, st.binary(min_size=1, max_size=16)),
                       min_size=1, max_size=4))
def test_property_damaged_dicom_headers_are_ingested_or_named(tmp_path, good_series, damage):
    import shutil
    import uuid

    folder = tmp_path / uuid.uuid4().hex
    folder.mkdir()
    paths = [Path(shutil.copy(p, folder / p.name)) for p in good_series]
    for index, kind, offset, tag, value, junk in damage:
        path = paths[index]
        raw = path.read_bytes()
        if kind == "truncate":
            path.write_bytes(raw[:offset % (len(raw) + 1)])
        elif kind == "bytes":
            at = offset % max(len(raw), 1)
            path.write_bytes(raw[:at] + junk + raw[at + len(junk):])
        else:
            try:
                ds = pydicom.dcmread(path, force=True)
                if kind == "delete":
                    delattr(ds, tag) if tag in ds else None
                else:
                    setattr(ds, tag, value)
                ds.save_as(path)
            except Exception:  # noqa: BLE001 - pydicom refuses to write some values: the file stays as it was
                path.write_bytes(raw)
    try:
        series = ingest(folder, "p")
    except IngestError as error:
        _one_line_naming(str(error), "p")
        return
    assert series.volume.ndim == 3 and np.isfinite(series.volume).all() and np.isfinite(series.affine).all()
    assert all(s > 0 for s in series.meta["pixel_spacing_mm"]) and series.meta["slice_spacing_mm"] > 0


def test_unreadable_file_is_refused_by_name(tmp_path, monkeypatch):
    _series(tmp_path / "scan")
    (tmp_path / "scan" / "locked").write_bytes(b"x")  # root reads anything: the refusal is simulated
    real = ingest_mod._Source.read

    def read(self, stop_before_pixels):
        if self.label == "locked":
            raise PermissionError(13, "Permission denied")
        return real(self, stop_before_pixels)

    monkeypatch.setattr(ingest_mod._Source, "read", read)
    assert "refused 1 file(s), first: locked: cannot be read (Permission denied)" in ingest(tmp_path / "scan", "s").meta["warnings"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom: the description is over-long on purpose
def test_file_count_bound_counts_refused_entries_and_descriptions_stay_one_line(tmp_path, monkeypatch):
    _series(tmp_path / "scan", series_description="SAG T2\n" + "x" * 300)
    series = ingest(tmp_path / "scan", "s")
    assert "\n" not in series.meta["series_description"] and len(series.meta["series_description"]) == 203
    for index in range(3):
        os.mkfifo(tmp_path / "scan" / f"pipe{index}")
    monkeypatch.setattr(ingest_mod, "MAX_FILES", 8)  # 6 slices + 3 pipes
    with pytest.raises(IngestError, match=r"scan s: file \S+: more than 8 files in one scan"):
        ingest(tmp_path / "scan", "s")


def test_a_truncated_dicom_header_is_named_not_counted_as_junk(tmp_path):
    paths = _series(tmp_path / "scan")
    paths[0].write_bytes(paths[0].read_bytes()[:300])  # preamble and DICM kept, header cut
    warnings = ingest(tmp_path / "scan", "s").meta["warnings"]
    assert any(w.startswith(f"1 damaged DICOM file(s) ignored, first: {paths[0].name}: damaged DICOM (") for w in warnings), warnings
