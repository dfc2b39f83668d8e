"""Grading: shipped weights load, probabilities on the contract scale, TTA determinism, the
official wrapper's mapping, hotspots, the discs-table format, and a tiny CV smoke run."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

from spinecohort.discs import IVV_SHAPE
from spinecohort.grade import (TTA_SHIFTS, Grader, grades_frame, hotspot_montage, save_grader, shift_volume,
                               tta_shifts)
from spinecohort.shipped import default_model_path
from spinecohort.tasks import TASKS

MODEL = default_model_path("grader")


def fake_ivvs(n=3, seed=0):
    """Disc-like IVVs: two bright bodies, a darker disc band with a bright nucleus, noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        v = np.zeros(IVV_SHAPE, np.float32)
        v[:, :40, 50:175] = 0.5
        v[:, 72:, 50:175] = 0.5
        v[:, 40:72, 50:175] = 0.2
        v[2:7, 48:64, 90:140] = rng.uniform(0.4, 0.9)
        v += rng.normal(0, 0.03, v.shape).astype(np.float32)
        out.append(np.clip(v, 0, 1))
    return out


@pytest.fixture(scope="module")
def grader():
    torch.set_num_threads(1)  # shared CI machines: no OpenMP spinning
    return Grader.load(MODEL)


def test_shipped_weights_load_and_card(grader):
    assert MODEL.stat().st_size < 8 * 1024 * 1024
    assert grader.kind == "cpu" and grader.model_id == MODEL.stem
    # the default's training data are recorded (v4: SPIDER + synthetic phantoms)
    trained_on = str(grader.meta.get("trained_on", ""))
    assert "synthetic" in trained_on or ("spider" in trained_on.lower() and "phantom" in trained_on)
    card = MODEL.with_suffix(".md").read_text()
    from spinecohort.provenance import sha256_file

    assert sha256_file(MODEL) in card
    # the card states the model's limits (v3: synthetic-only warning; v4: its shortfalls section)
    assert "not for research on real scans" in card.lower() or "## where it falls short" in card.lower()


def test_grade_shapes_and_probabilities(grader):
    ivvs = fake_ivvs(3)
    out = grader.grade(ivvs, tta=4)
    assert len(out) == 3
    for probs in out:
        assert list(probs) == [t.name for t in TASKS]
        for t in TASKS:
            p = probs[t.name]
            assert p.shape == (t.n_classes,)
            assert np.all(p >= 0) and p.sum() == pytest.approx(1.0, abs=1e-5)
    assert grader.grade([], tta=4) == []
    with pytest.raises(ValueError):
        grader.grade([np.zeros((9, 112, 112), np.float32)])


def test_tta_is_deterministic_and_batch_independent(grader):
    ivvs = fake_ivvs(3, seed=1)
    a = grader.grade(ivvs, tta=4)
    b = grader.grade(ivvs, tta=4, batch_size=5)
    c = grader.grade(ivvs[1:2], tta=4)
    for t in TASKS:
        np.testing.assert_array_equal(a[0][t.name], grader.grade(ivvs, tta=4)[0][t.name])
        np.testing.assert_allclose(a[1][t.name], b[1][t.name], atol=1e-5)
        np.testing.assert_allclose(a[1][t.name], c[0][t.name], atol=1e-5)
    one = grader.grade(ivvs[:1], tta=1)[0]
    assert any(not np.allclose(one[t.name], a[0][t.name]) for t in TASKS)
    assert tta_shifts(1) == [(0, 0, 0)] and len(tta_shifts(4)) == 4
    with pytest.raises(ValueError):
        tta_shifts(0)
    with pytest.raises(ValueError):
        tta_shifts(len(TTA_SHIFTS) + 1)


def test_shift_volume_zero_fills():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4) + 1
    y = shift_volume(x, (1, 0, -1))
    assert torch.all(y[0] == 0)
    assert torch.equal(y[1, :, :3], x[0, :, 1:])
    assert torch.all(y[1, :, 3] == 0)


def test_hotspots_shape_nonnegative_deterministic(grader, tmp_path):
    ivv = fake_ivvs(1, seed=2)[0]
    h = grader.hotspots(ivv, "Pfirrmann", n_aug=3)
    assert h.shape == IVV_SHAPE and h.dtype == np.float32
    assert np.all(np.isfinite(h)) and h.min() >= 0.0 and h.max() > 0.0
    np.testing.assert_array_equal(h, grader.hotspots(ivv, "Pfirrmann", n_aug=3))
    h1 = grader.hotspots(ivv, "Herniation", n_aug=1)
    assert h1.shape == IVV_SHAPE and h1.min() >= 0.0
    with pytest.raises(ValueError):
        grader.hotspots(ivv, "NoSuchTask")
    png = hotspot_montage(ivv, h, tmp_path / "hot" / "disc.png", title="L4-L5 Pfirrmann")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _FakeOfficial(nn.Module):
    """Stands in for the official GradingModel: 11 heads with the official class counts
    (spondylolisthesis 3); records the input it saw."""

    def __init__(self):
        super().__init__()
        self.counts = (5, 4, 4, 3, 2, 2, 2, 2, 2, 2, 2)
        self.w = nn.Parameter(torch.ones(1))
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        m = x.mean(dim=(1, 2, 3, 4))[:, None] * self.w
        return tuple(m * torch.arange(k, dtype=torch.float32)[None] for k in self.counts)


def test_official_wrapper_maps_spondylolisthesis_and_halves_input():
    fake = _FakeOfficial()
    g = Grader.official(fake)
    ivv = np.full(IVV_SHAPE, 0.8, np.float32)
    out = g.grade([ivv], tta=1)[0]
    assert torch.allclose(fake.seen, torch.full((1, 1, *IVV_SHAPE), 0.4))
    logits = 0.4 * torch.arange(3, dtype=torch.float32)
    p3 = torch.softmax(logits, 0).numpy()
    np.testing.assert_allclose(out["Spondylolisthesis"], [p3[0], p3[1] + p3[2]], rtol=1e-5)
    assert out["Pfirrmann"].shape == (5,)
    h = g.hotspots(ivv, "Spondylolisthesis", n_aug=2)
    assert h.shape == IVV_SHAPE and h.min() >= 0


def test_grades_frame_feeds_agreement(grader):
    from spinecohort.stats import compute_agreement

    ivvs = fake_ivvs(2, seed=3)
    probs = grader.grade(ivvs, tta=2)
    keys = [{"scan_id": "s1", "level": "L4-L5"}, {"scan_id": "s1", "level": "L5-S1"}]
    df = grades_frame(keys, probs, MODEL.stem)
    for t in TASKS:
        assert df[t.name].between(min(t.grades), max(t.grades)).all()
        assert all(len(p) == t.n_classes for p in df[f"{t.name}_probs"])
    labels = df[["scan_id", "level"] + [t.name for t in TASKS]].copy()
    agr, _ = compute_agreement(df, labels, n_bootstrap=0)
    acc = agr[(agr.metric == "accuracy") & (agr.level == "all") & (agr.comparison == "model_vs_R1")]
    assert np.allclose(acc["estimate"], 1.0)


def test_cross_validate_smoke(tmp_path):
    from spinecohort.discs import IVV, save_ivvs
    from spinecohort.training.grader import TrainConfig, cross_validate, patient_folds

    rows, labels = [], []
    rng = np.random.default_rng(0)
    for s in range(4):
        vols = fake_ivvs(2, seed=10 + s)
        ivvs = [IVV(level=lv, upper=lv.split("-")[0], lower=lv.split("-")[1], volume=v, centre=(0, 0, 0),
                    angle_rad=0.0, width_px=1, height_px=0.5, box_corners=np.zeros((4, 2)), slices=list(range(9)))
                for lv, v in zip(("L4-L5", "L5-S1"), vols)]
        path = save_ivvs(tmp_path / f"s{s}.npz", ivvs)
        for v in ivvs:
            rows.append({"scan_id": f"s{s}", "subject_id": f"p{s // 2}", "level": v.level, "path": str(path)})
            labels.append({"scan_id": f"s{s}", "level": v.level, **{t.name: int(rng.choice(t.grades)) for t in TASKS}})
    import pandas as pd

    cfg = TrainConfig(steps=2, batch_size=2, head_epochs=1, head_views=1, head_batch=4, log_every=1)
    oof, models = cross_validate(pd.DataFrame(rows), pd.DataFrame(labels), k=2, seed=0, config=cfg, tta=1,
                                 log=lambda m: None)
    assert len(models) == 2 and len(oof) == 8
    assert set(oof["fold"]) == {0, 1}
    # patient level: both scans of a subject are in the same fold
    assert oof.groupby(oof["scan_id"].str[1:].astype(int) // 2)["fold"].nunique().max() == 1
    folds = patient_folds(["a", "a", "b", "c"], 2, 0)
    assert folds[0] == folds[1]
    # fine-tuning from saved weights (phase A from them, then the heads), via the loader CV uses
    from spinecohort.training.grader import _load_init, fit, load_ivv_arrays, make_targets

    save_grader(tmp_path / "init.pt", models[0].net)
    X, keys = load_ivv_arrays(pd.DataFrame(rows))
    targets = make_targets(keys, pd.DataFrame(labels))
    net = fit(X[:4], [t[:4] for t in targets], cfg, init_state=_load_init(tmp_path / "init.pt"), log=lambda m: None)
    assert not net.training
    assert Grader(net).grade([X[0] / 255.0], tta=1)[0]["Pfirrmann"].shape == (5,)


def test_grade_stage_uses_a_team_grader_from_the_config(grader, tmp_path):
    from spinecohort.config import resolve_config
    from spinecohort.provenance import sha256_file
    from spinecohort.stages import GradeStage

    custom = tmp_path / "grader.pt"
    save_grader(custom, grader.net)
    stage = GradeStage(resolve_config({"outdir": str(tmp_path / "out"), "models": {"grader": str(custom)}}))
    assert stage.model_id == "custom/grader.pt"
    assert stage.models() == {"custom/grader.pt": sha256_file(custom)}
    shipped = GradeStage(resolve_config({"outdir": str(tmp_path / "out")}))
    assert shipped.model_id == MODEL.stem
    with pytest.raises(FileNotFoundError, match="models.grader"):
        GradeStage(resolve_config({"outdir": str(tmp_path / "out"), "models": {"grader": str(tmp_path / "none.pt")}}))


@pytest.mark.parametrize("pool", ["global", "quadrants", "hybrid"])
def test_feature_pooling_options(pool):
    """Every pooling gives the 512-d feature; the quadrant parts tell where a finding is: the same
    bright blob in the upper-posterior or the lower-anterior quadrant pools differently."""
    from spinecohort.nets.grader_cpu import FEATURE_DIM, build_cpu_grader

    torch.manual_seed(0)
    net = build_cpu_grader(pool=pool).eval()
    upper_posterior = torch.zeros(1, 1, *IVV_SHAPE)
    upper_posterior[..., 10:30, 150:190] = 1.0
    lower_anterior = torch.zeros(1, 1, *IVV_SHAPE)
    lower_anterior[..., 82:102, 34:74] = 1.0
    with torch.no_grad():
        a, b = net.features(upper_posterior), net.features(lower_anterior)
    assert a.shape == (1, FEATURE_DIM)
    whole = 2 * net.project[0].out_channels  # global average + max block (absent for quadrants)
    if pool == "quadrants":
        assert not torch.allclose(a, b, atol=1e-3)
    elif pool == "hybrid":
        assert not torch.allclose(a[:, whole:], b[:, whole:], atol=1e-3)
    with pytest.raises(ValueError):
        build_cpu_grader(pool="nonsense")
