"""Manifest and config validation: a bad manifest stops with a message naming the row."""
from __future__ import annotations

import pytest

from spinecohort.config import ConfigError, load_config, resolve_config
from spinecohort.manifest import ManifestError, n_shards, read_manifest, shard_rows


def _manifest(tmp_path, text, name="m.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_csv_and_tsv_and_resolves_relative_paths(tmp_path):
    frame = read_manifest(_manifest(tmp_path, "scan_id,subject_id,path,age\na.1,s1,scans/a,50\nb_2,s1,/abs/b,61\n"))
    assert list(frame["scan_id"]) == ["a.1", "b_2"]
    assert frame.loc[0, "path"] == str((tmp_path / "scans" / "a").resolve())
    assert frame.loc[1, "path"] == "/abs/b"
    assert list(frame["age"]) == ["50", "61"]  # covariates carried unchanged
    assert {"series", "site", "visit"} <= set(frame.columns)
    tsv = read_manifest(_manifest(tmp_path, "scan_id\tsubject_id\tpath\nx\ty\tz\n", "m.tsv"))
    assert tsv.loc[0, "scan_id"] == "x"


@pytest.mark.parametrize("text, match", [
    ("scan_id,subject_id,path\na,s,p\na,s,q\n", r"row 3: duplicate scan_id 'a'"),
    ("scan_id,subject_id,path\nok,s,p\nbad id,s,q\n", r"row 3 \(scan_id\)"),
    ("scan_id,subject_id,path\n../x,s,p\n", r"row 2 \(scan_id\)"),
    ("scan_id,subject_id,path\nok,,p\n", r"row 2"),
    ("scan_id,path\na,p\n", r"missing required column\(s\) subject_id"),
])
def test_bad_manifests_name_the_row(tmp_path, text, match):
    with pytest.raises(ManifestError, match=match):
        read_manifest(_manifest(tmp_path, text))


def test_shards_are_contiguous_and_cover_everything(tmp_path):
    rows = "".join(f"s{i},p{i},x\n" for i in range(23))
    frame = read_manifest(_manifest(tmp_path, "scan_id,subject_id,path\n" + rows))
    count = n_shards(len(frame), 5)
    assert count == 5
    ids = [sid for k in range(count) for sid in shard_rows(frame, k, 5)["scan_id"]]
    assert ids == list(frame["scan_id"])


def test_config_defaults_and_validation(tmp_path):
    config = resolve_config({"outdir": "x"})
    assert config["shard_size"] == 25 and config["models"]["family"] == "cpu-default"
    with pytest.raises(ConfigError, match="shard_size"):
        resolve_config({"shard_size": 0})
    with pytest.raises(ConfigError, match="unknown_key|Additional properties"):
        resolve_config({"unknown_key": 1})
    path = tmp_path / "c.yaml"
    path.write_text("outdir: out\nmodels: {family: spinenet-official, dir: /w}\n")
    assert load_config(path)["models"] == {"family": "spinenet-official", "dir": "/w", "grader": None,
                                           "precision": "float32"}
    with pytest.raises(ConfigError, match="models/precision"):
        resolve_config({"models": {"precision": "float16"}})
    path.write_text("outdir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception, match="could not determine a constructor|ConstructorError"):
        load_config(path)  # safe loader: nothing in a config is executed


def test_config_file_holds_the_defaults():
    # config/config.yaml (read by the Snakefile) is a link to the package's defaults.yaml, which
    # config.DEFAULTS (the Python entry points' start) is read from: the two cannot drift apart.
    from pathlib import Path

    import yaml

    from spinecohort.config import DEFAULTS

    config_file = Path(__file__).resolve().parents[1] / "config" / "config.yaml"
    assert yaml.safe_load(config_file.read_text()) == DEFAULTS


def test_each_job_sees_only_the_keys_it_reads():
    from spinecohort.config_keys import config_for
    from spinecohort.provenance import config_sha256

    config = resolve_config({})
    assert config_for(config, "detect") == {"outdir": "results", "shard_size": 25, "device": "auto", "threads": 2,
                                            "models": {"family": "cpu-default", "dir": None, "precision": "float32"}}
    assert "tta" in config_for(config, "grade") and "tta" not in config_for(config, "detect")
    # the cohort's jobs never see the training settings; each training rule the settings it uses
    assert "grader_training" not in config_for(config, "report")
    assert set(config_for(config, "grader_cv")["grader_training"]) == set(config["grader_training"]) - {"final"}
    assert set(config_for(config, "grader_final")["grader_training"]) == set(config["grader_training"]) - {"final", "k"}
    assert config_for(config, "grader_card") == config
    # where and how fast a run happens, and the training settings, leave config_sha256 alone
    assert config_sha256(config) == config_sha256({**config, "threads": 8, "outdir": "elsewhere",
                                                   "grader_training": {"k": 3}})
    assert config_sha256(config) != config_sha256({**config, "tta": 2})
