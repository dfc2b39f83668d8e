"""The slice-pooled grader (spinecohort.nets.grader_slices) and the SPIDER data matching of
spinecohort.training.grader_real: fast, no shared data needed."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from spinecohort.discs import IVV_SHAPE
from spinecohort.grade import Grader, save_grader
from spinecohort.nets.grader_cpu import GraderCPU
from spinecohort.nets.grader_slices import (GraderEnsemble, GraderSlices, build_grader_net, first_member, init_from_3d,
                                            valid_slices)
from spinecohort.tasks import TASKS


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return GraderSlices().eval()


def _slice(seed=0):
    return torch.from_numpy(np.random.default_rng(seed).random(IVV_SHAPE[1:], dtype=np.float32))


def test_one_slice_output_does_not_depend_on_zero_slices(net):
    img = _slice(1)
    a = torch.zeros(IVV_SHAPE)
    a[4] = img  # what a 1-slice series gives: the centre slice only
    b = torch.zeros(IVV_SHAPE)
    b[0] = img  # the same slice elsewhere, the rest zero
    other = torch.rand(IVV_SHAPE)  # a 9-slice neighbour in the batch must not matter either
    with torch.inference_mode():
        out_a = net(a[None, None])
        out_b = net(torch.stack([other, b])[:, None])
    for la, lb in zip(out_a, out_b):
        torch.testing.assert_close(la[0], lb[1], rtol=1e-5, atol=1e-5)
    assert valid_slices(a[None]).tolist() == [[False] * 4 + [True] + [False] * 4]


def test_nine_slices_shapes_and_pooling(net):
    x = torch.rand(3, 1, *IVV_SHAPE)
    x[1, 0, :4] = 0  # partial volume (slices outside the detected range)
    with torch.inference_mode():
        out = net(x)
        f = net.features(x)
    assert [o.shape for o in out] == [(3, t.n_classes) for t in TASKS]
    assert f.shape == (3, net.feature_dim)
    assert torch.isfinite(f).all()
    # an IVV without any slice gets the zero feature, not NaN
    with torch.inference_mode():
        assert net.features(torch.zeros(1, 1, *IVV_SHAPE)).abs().max() == 0


def test_load_through_grader_weights_only(net, tmp_path):
    path = save_grader(tmp_path / "g.pt", net, {"test": True})
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["arch"]["name"] == "slices2d"
    g = Grader.load(path)
    assert isinstance(g.net, GraderSlices)
    ivv = np.zeros(IVV_SHAPE, np.float32)
    ivv[4] = np.random.default_rng(2).random(IVV_SHAPE[1:])
    probs = g.grade([ivv, np.random.default_rng(3).random(IVV_SHAPE).astype(np.float32)], tta=4)
    for p in probs:
        for t in TASKS:
            assert p[t.name].shape == (t.n_classes,)
            assert abs(float(p[t.name].sum()) - 1.0) < 1e-4
    heat = g.hotspots(ivv, "Pfirrmann", n_aug=2)
    assert heat.shape == IVV_SHAPE
    assert np.all(heat[[0, 1, 2, 3, 5, 6, 7, 8]] == 0)  # padding slices stay padding
    assert heat[4].max() > 0


def test_ensemble_is_the_geometric_mean_of_its_members_and_round_trips(net, tmp_path):
    torch.manual_seed(1)
    other = GraderSlices().eval()
    from spinecohort.training.grader_real import combine_graders

    a = save_grader(tmp_path / "a.pt", net, {"trained_on": {"spider": "x"}}, half=False)
    b = save_grader(tmp_path / "b.pt", other, half=False)
    path = tmp_path / "ens.pt"
    combined = combine_graders([a, b], path)
    assert isinstance(combined, GraderEnsemble)
    g = Grader.load(path)
    assert isinstance(g.net, GraderEnsemble) and len(g.net.members) == 2
    assert [m["file"] for m in g.meta["members"]] == ["a.pt", "b.pt"] and g.meta["trained_on"] == {"spider": "x"}
    with pytest.raises(ValueError):
        combine_graders([a], tmp_path / "one.pt")
    ivv = np.random.default_rng(4).random(IVV_SHAPE).astype(np.float32)
    p_ens = g.grade([ivv], tta=1)[0]
    p_a = Grader(net).grade([ivv], tta=1)[0]
    p_b = Grader(other).grade([ivv], tta=1)[0]
    for t in TASKS:  # normalised geometric mean of the members' class probabilities
        geo = np.sqrt(p_a[t.name] * p_b[t.name])
        np.testing.assert_allclose(p_ens[t.name], geo / geo.sum(), rtol=2e-3, atol=1e-4)  # fp16 weights
    assert g.hotspots(ivv, "Herniation", n_aug=1).shape == IVV_SHAPE
    # fine-tuning from an ensemble starts from its first member
    payload = torch.load(path, map_location="cpu", weights_only=True)
    arch, state = first_member(payload["arch"], payload["state_dict"])
    assert arch == net.arch
    for k, v in net.state_dict().items():
        torch.testing.assert_close(state[k].to(v.dtype), v, rtol=1e-3, atol=1e-3)  # stored as fp16
    with pytest.raises(ValueError):
        build_grader_net({"name": "ensemble", "members": []})
    with pytest.raises(ValueError):
        build_grader_net({"name": "ensemble", "members": [payload["arch"]]})


def test_old_arch_still_builds_the_3d_grader():
    assert isinstance(build_grader_net({"pool": "quadrants"}), GraderCPU)
    with pytest.raises(ValueError):
        build_grader_net({"name": "no-such-net"})


def test_init_from_3d_copies_the_matching_tensors():
    torch.manual_seed(0)
    src = GraderCPU(pool="quadrants")
    dst = GraderSlices()
    copied = init_from_3d(dst, src.state_dict())
    assert "stem.0.weight" in copied and "heads.0.0.weight" in copied
    torch.testing.assert_close(dst.state_dict()["stem.0.weight"], src.state_dict()["stem.0.weight"].sum(2))


def test_augment_keeps_empty_slices_empty():
    from spinecohort.training.grader import augment_batch

    x = torch.rand(4, *IVV_SHAPE)
    x[:, [0, 1, 2, 3, 5, 6, 7, 8]] = 0
    tg = [torch.zeros(4, t.n_classes) for t in TASKS]
    y, _ = augment_batch(x, tg, torch.Generator().manual_seed(0), noise_p=1.0, slice_jitter_p=0.0,
                         keep_empty_slices=True)
    assert (y[:, [0, 1, 2, 3, 5, 6, 7, 8]] == 0).all()
    assert (y[:, 4].flatten(1).amax(1) > 0).all()


def test_spider_labels_and_match_grades():
    from spinecohort.training.grader_real import match_grades, spider_labels

    grades = pd.DataFrame({
        "patient": [1, 1, 2], "ivd_label": [1, 2, 1], "level": ["L5-S1", "L4-L5", "L5-S1"],
        "Pfirrmann": [3, 4, 2], "Modic": [0, 2, 0], "UpperEndplate": [0, 1, 0], "LowerEndplate": [0, 0, 0],
        "Spondylolisthesis": [0, 0, 1], "Herniation": [1, 0, 0], "Narrowing": [1, 0, 0], "Bulging": [1, 1, 0]})
    series = pd.DataFrame({"series": ["1_t1", "1_t2", "2_t2"], "patient": [1, 1, 2]})
    labels = spider_labels(grades, series)
    assert len(labels) == 5  # patient 1's two discs in both series, patient 2's one disc
    row = labels[(labels["scan_id"] == "1_t2") & (labels["level"] == "L4-L5")].iloc[0]
    assert row["Pfirrmann"] == 4 and row["UpperEndplateDefect"] == 1 and row["SPIDER_Modic"] == 1
    assert row["subject_id"] == "1" and row["SPIDER_Narrowing"] == 0
    ivvs = pd.DataFrame({"scan_id": ["1_t1", "1_t1", "1_t2", "1_t2"], "level": ["L5-S1", "L4-L5", "L4-L5", "L3-L4"],
                         "path": ["a.npz", "a.npz", "b.npz", "b.npz"]})
    matched, missing = match_grades(ivvs, labels)
    assert sorted(zip(matched["scan_id"], matched["level"])) == [("1_t1", "L4-L5"), ("1_t1", "L5-S1"), ("1_t2", "L4-L5")]
    assert set(matched["subject_id"]) == {"1"}
    reasons = dict(zip(zip(missing["scan_id"], missing["level"]), missing["reason"]))
    assert reasons == {("1_t2", "L5-S1"): "no IVV at this level (level not found)",
                       ("2_t2", "L5-S1"): "no IVV in this scan (nothing detected or labelled)"}


def test_fit_with_task_mask_and_aux_is_deterministic():
    from spinecohort.training.grader import fit, predict_probs
    from spinecohort.training.grader_real import slices_config

    rng = np.random.default_rng(0)
    n = 8
    X = (rng.random((n, *IVV_SHAPE)) * 255).astype(np.uint8)
    X[4:, [0, 1, 2, 3, 5, 6, 7, 8]] = 0
    targets = []
    for t in TASKS:
        a = np.zeros((n, t.n_classes), np.float32)
        a[np.arange(n), rng.integers(0, t.n_classes, n)] = 1
        a[4:] = 0 if t.name != "Pfirrmann" else a[4:]  # "SPIDER" rows: only some tasks graded
        targets.append(a)
    aux = np.full((n, 2), np.nan, np.float32)
    aux[4:] = rng.integers(0, 2, (4, 2))
    cfg = slices_config(seed=1, steps=2)
    cfg.batch_size, cfg.head_epochs, cfg.head_views, cfg.head_batch = 4, 1, 1, 8
    torch.set_num_threads(1)
    p1 = predict_probs(fit(X, targets, cfg, aux=aux, log=lambda m: None), X[:2], tta=1)
    p2 = predict_probs(fit(X, targets, cfg, aux=aux, log=lambda m: None), X[:2], tta=1)
    for a, b in zip(p1, p2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ensemble", [False, True])
def test_team_cv_fine_tunes_a_slice_pooled_checkpoint(net, tmp_path, ensemble):
    """`snakemake train_grader` with init_weights = a slice-pooled checkpoint (e.g. the shipped one,
    an ensemble: its first member): cross_validate takes the architecture from the checkpoint, and
    the fold models keep it."""
    from spinecohort.training.grader import TrainConfig, cross_validate

    init = save_grader(tmp_path / "init.pt", GraderEnsemble([net.arch, net.arch]) if ensemble else net)
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for i in range(4):
        vols = (rng.random((2, *IVV_SHAPE)) * 0.8).astype(np.float32)
        vols[1, [0, 1, 2, 3, 5, 6, 7, 8]] = 0  # a single-slice disc beside a 9-slice one
        path = tmp_path / f"s{i}.npz"
        np.savez(path, volumes=vols, levels=np.array(["L4-L5", "L5-S1"]))
        for lvl in ("L4-L5", "L5-S1"):
            rows.append({"scan_id": f"s{i}", "subject_id": f"p{i}", "level": lvl, "path": str(path)})
            labels.append({"scan_id": f"s{i}", "level": lvl, "Pfirrmann": int(rng.integers(1, 6)),
                           "Herniation": int(rng.integers(0, 2))})
    cfg = TrainConfig(steps=1, batch_size=4, head_epochs=1, head_views=1, head_batch=4)
    torch.set_num_threads(1)
    oof, models = cross_validate(pd.DataFrame(rows), pd.DataFrame(labels), k=2, init_weights=init, config=cfg,
                                 tta=1, log=lambda m: None)
    assert len(oof) == 8 and set(oof["fold"]) == {0, 1}
    assert all(isinstance(g.net, GraderSlices) for g in models)


def test_ordinal_pfirrmann_term_grows_with_grade_distance():
    """The expected-grade L1 term charges a 1-vs-5 confusion more than a 1-vs-2 one and ignores
    discs without a Pfirrmann grade."""
    from spinecohort.training.grader import _PFIRRMANN, _ordinal_loss

    k = TASKS[_PFIRRMANN].n_classes
    logits = [torch.zeros(3, t.n_classes) for t in TASKS]
    logits[_PFIRRMANN] = torch.tensor([[9.0, 0, 0, 0, 0]] * 3)  # confidently grade 1
    weights = [torch.ones(t.n_classes) for t in TASKS]

    def loss(grade):
        tg = [torch.zeros(3, t.n_classes) for t in TASKS]
        tg[_PFIRRMANN][0, grade] = 1.0  # rows 1-2 unlabelled
        return float(_ordinal_loss(logits, tg, weights))

    assert k == 5
    assert loss(0) < 0.01 < loss(1) < loss(4)
    assert loss(4) == pytest.approx(1.0, abs=0.01)


def test_group_share_batches():
    """``group_share`` draws that share of each batch from the marked rows; uniform when off."""
    from spinecohort.training.grader import _batches_of

    group = np.r_[np.ones(20, bool), np.zeros(60, bool)]
    it = _batches_of(80, 16, np.random.default_rng(0), group, 0.75)
    for _ in range(5):
        b = next(it)
        assert len(np.unique(b)) == 16 and group[b].sum() == 12
    it = _batches_of(80, 16, np.random.default_rng(0), group, 0.0)
    seen = np.concatenate([next(it) for _ in range(5)])
    assert len(np.unique(seen)) == 80


def test_default_decision_rule_for_a_new_grader():
    from spinecohort.training.grader_real import PHANTOM_ONLY_TASKS, REPORT_TASKS, default_decision

    def figures(ba, kappa=0.5):
        return {t: {"balanced_accuracy": {"estimate": ba.get(t, 0.6)}, "kappa": {"estimate": kappa}} for t in REPORT_TASKS}

    def rep(new_ba, new_kappa, phantom_new=0.8):
        return {"models": {"cv": {"all_graded_levels": figures(new_ba, new_kappa)},
                           "baseline": {"all_graded_levels": figures({"Pfirrmann": 0.48}, 0.50)}},
                "synthetic": {"new": {t: {"estimate": phantom_new} for t in PHANTOM_ONLY_TASKS},
                              "baseline": {t: {"estimate": 0.8} for t in PHANTOM_ONLY_TASKS}}}

    assert default_decision(rep({"Pfirrmann": 0.52}, 0.55))["make_default"]
    # Pfirrmann must improve on both measures
    assert not default_decision(rep({"Pfirrmann": 0.52}, 0.49))["make_default"]
    # another SPIDER task may not fall by more than 0.02, a phantom-only task not by more than 0.03
    assert default_decision(rep({"Pfirrmann": 0.52, "Herniation": 0.585}, 0.55))["make_default"]
    assert not default_decision(rep({"Pfirrmann": 0.52, "Herniation": 0.57}, 0.55))["make_default"]
    assert not default_decision(rep({"Pfirrmann": 0.52}, 0.55, phantom_new=0.76))["make_default"]
