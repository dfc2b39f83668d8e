"""Official checkpoint folders: layout, strict loading, clear failures, recipe round trip."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch

from spinecohort.nets.checkpoints import (
    SUBFOLDERS,
    CheckpointError,
    load_official_checkpoint,
    load_official_folder,
    recipe_state_dict,
    select_checkpoint,
    write_recipe_folder,
)
from spinecohort.nets.official import (
    GRADING_CLASSES,
    GRADING_HEADS,
    NETWORK_FACTS,
    OFFICIAL_NAMES,
    build_official,
    official_template,
)

MANIFEST = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "spinenet-official-checkpoints.json"
pytestmark = pytest.mark.usefixtures("torch_threads")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- layout ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OFFICIAL_NAMES)
def test_state_dict_entry_counts(name):
    model = official_template(name)
    assert not model.training
    assert len(model.state_dict()) == NETWORK_FACTS[name]["state_dict_entries"]


@pytest.mark.parametrize("name", ["appearance", "context"])
def test_build_official_is_usable(name):
    model = build_official(name)
    assert not model.training
    assert all(t.device.type == "cpu" and torch.isfinite(t).all() for t in model.state_dict().values())
    x = torch.rand(1, 1, 224, 224, 16) if name == "appearance" else torch.rand(1, 1, 64, 24)
    with torch.inference_mode():
        y = model(x)
    assert y.shape == ((1, 24) if name == "appearance" else (1, 1, 64, 24))


@pytest.mark.skipif(not MANIFEST.is_file(), reason=f"manifest not found at {MANIFEST}")
def test_layout_matches_manifest():
    manifest = json.loads(MANIFEST.read_text())
    for name in OFFICIAL_NAMES:
        net = manifest["networks"][name]
        model = official_template(name)
        sd = model.state_dict()
        got = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()]
        want = [(e["name"], e["shape"], e["dtype"]) for e in net["state_dict"]]
        assert got == want, name
        assert sum(p.numel() for p in model.parameters()) == net["param_count"], name
        assert sum(b.numel() for b in model.buffers()) == net["buffer_element_count"], name
        ck = net["checkpoint"]
        spec = SUBFOLDERS[name]
        assert ck["weights_dir"].rsplit("/", 1)[-1] == spec.folder
        assert ck["state_dict_key"] == spec.state_dict_key
        assert ck["official_file"] == spec.official_file
        assert ck["excluded_if_name_contains"] == spec.exclude_substring
        assert net["class"] == NETWORK_FACTS[name]["class"]
    facts = {f["name"]: f["value"] for f in manifest["pipeline_facts"]}
    assert list(GRADING_HEADS) == facts["grading heads order"]
    assert GRADING_CLASSES == facts["grading class counts"]


def test_grading_returns_heads_in_order():
    model = official_template("grading")
    for i, head in enumerate(GRADING_HEADS):  # materialise only the heads: bias = head index
        fc = getattr(model, f"fc_{head}").to_empty(device="cpu")
        torch.nn.init.zeros_(fc.weight)
        torch.nn.init.constant_(fc.bias, float(i))
    with torch.inference_mode():
        out = model.classify(torch.rand(3, 512))
    assert isinstance(out, tuple) and len(out) == 11
    for i, (o, head) in enumerate(zip(out, GRADING_HEADS)):
        assert o.shape == (3, GRADING_CLASSES[head])
        assert torch.all(o == i)


# --- round trip ------------------------------------------------------------------------------
def test_recipe_folder_round_trip(tmp_path):
    files = write_recipe_folder(tmp_path)
    assert {n: p.relative_to(tmp_path).as_posix() for n, p in files.items()} == {
        "detector": "detect-vfr/ckpt435.pt",
        "appearance": "appearance/ckpt187.pt",
        "context": "context/ckpt16.pt",
        "grading": "grading/ckpt1.pt",
    }
    loaded = load_official_folder(tmp_path)
    assert list(loaded) == list(OFFICIAL_NAMES)
    assert loaded.networks == dict(loaded)
    assert loaded.files == files
    for name, model in loaded.items():
        assert not model.training, name
        assert loaded.models_sha256[name] == _sha(files[name]), name
        blob = torch.load(files[name], map_location="cpu", weights_only=True)
        key = SUBFOLDERS[name].state_dict_key
        assert set(blob) == {key, *SUBFOLDERS[name].extra}
        saved, got = blob[key], model.state_dict()
        assert list(saved) == list(got)
        assert all(torch.equal(saved[k], got[k]) for k in got), name
        del blob, saved
    for name in ("appearance", "context"):  # cheap ones: the file holds exactly the recipe
        recipe = recipe_state_dict(name)
        assert all(torch.equal(recipe[k], v) for k, v in loaded[name].state_dict().items())
    # sha256 differs between networks and is stable across a rewrite
    assert len(set(loaded.models_sha256.values())) == 4
    again = write_recipe_folder(tmp_path / "again", names=["context"])
    assert _sha(again["context"]) == loaded.models_sha256["context"]


# --- failures --------------------------------------------------------------------------------
def _context_file(tmp_path: Path) -> Path:
    return write_recipe_folder(tmp_path, names=["context"])["context"]


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_official_folder(tmp_path / "nope")
    _context_file(tmp_path)
    # full load: the missing detector sub-folder is reported before anything is loaded
    with pytest.raises(CheckpointError, match="detect-vfr"):
        load_official_folder(tmp_path)
    (tmp_path / "grading").mkdir()
    with pytest.raises(CheckpointError, match=r"no \*\.pt checkpoint in .*grading"):
        load_official_folder(tmp_path, names=["context", "grading"])


def test_renamed_key_names_file_and_tensor(tmp_path):
    path = _context_file(tmp_path)
    blob = torch.load(path, weights_only=True)
    sd = blob["net"]
    blob["net"] = {("conv5.kernel" if k == "conv5.weight" else k): v for k, v in sd.items()}
    torch.save(blob, path)
    with pytest.raises(CheckpointError) as info:
        load_official_folder(tmp_path, names=["context"])
    msg = str(info.value)
    assert str(path) in msg
    assert "missing tensor 'conv5.weight'" in msg and "(64, 128, 5, 3)" in msg
    assert "conv5.kernel" in msg


def test_unexpected_key(tmp_path):
    path = _context_file(tmp_path)
    blob = torch.load(path, weights_only=True)
    blob["net"]["extra.weight"] = torch.zeros(3, 2)
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'extra\.weight' shape \(3, 2\)") as info:
        load_official_folder(tmp_path, names=["context"])
    assert str(path) in str(info.value)


def test_wrong_shape_names_both_shapes(tmp_path):
    path = _context_file(tmp_path)
    blob = torch.load(path, weights_only=True)
    blob["net"]["bnrm6.running_var"] = torch.ones(31)
    torch.save(blob, path)
    with pytest.raises(CheckpointError) as info:
        load_official_folder(tmp_path, names=["context"])
    msg = str(info.value)
    assert str(path) in msg and "'bnrm6.running_var'" in msg
    assert "(31,)" in msg and "(32,)" in msg


def test_wrong_network_and_wrong_key(tmp_path):
    path = _context_file(tmp_path)
    # a context checkpoint where the appearance net is expected
    with pytest.raises(CheckpointError, match=r"missing tensor 'conv1\.weight'|shape") as info:
        load_official_checkpoint(path, "appearance")
    assert str(path) in str(info.value)
    # grading files keep their weights under 'model_weights', not 'net'
    with pytest.raises(CheckpointError, match="model_weights"):
        load_official_checkpoint(path, "grading")
    # garbage file
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_official_checkpoint(bad, "context")


def test_selection_rule(tmp_path):
    sub = tmp_path / "detect-vfr"
    sub.mkdir()
    for n in ("ckpt10.pt", "ckpt99_encrypted.pt", "notes.txt", "ckpt.pt", "ckpt2.pt"):  # ckpt2 newest
        (sub / n).write_bytes(b"x")
        time.sleep(0.02)
    # default: highest checkpoint number; names containing 'encrypted' ignored for the detector
    assert select_checkpoint(sub, "detector").name == "ckpt10.pt"
    # the official rule: newest by ctime
    assert select_checkpoint(sub, "detector", select="ctime").name == "ckpt2.pt"
    sub_ctx = tmp_path / "context"
    sub_ctx.mkdir()
    (sub_ctx / "ckpt16_encrypted.pt").write_bytes(b"x")  # context does not exclude 'encrypted'
    assert select_checkpoint(sub_ctx, "context").name == "ckpt16_encrypted.pt"
    with pytest.raises(ValueError):
        select_checkpoint(sub, "detector", select="newest")
