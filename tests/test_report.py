"""The validation report: self-contained, complete, robust to missing inputs, and it renders."""
from __future__ import annotations

import os
import re
from pathlib import Path
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from spinecohort.provenance import make_provenance
from spinecohort.report import fmt, fmt_ci, render_report
from spinecohort.stats import compute_agreement
from spinecohort.tasks import CCS_BINARY, LUMBAR_DISCS

TASKS = ["Pfirrmann", "CentralCanalStenosis", "Herniation"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI (.ci/run) installs Chromium and sets this, so that the browser test cannot silently skip there.
REQUIRE_CHROMIUM = os.environ.get("SPINECOHORT_REQUIRE_CHROMIUM") == "1"


def _tables(n_subjects=30, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subjects):
        for lv in LUMBAR_DISCS[2:]:
            rows.append({"scan_id": f"scan{s:03d}", "subject_id": f"sub{s:03d}",
                         "site": "AB"[s % 2], "level": lv})
    base = pd.DataFrame(rows)
    truth = {"Pfirrmann": rng.integers(1, 6, len(base)),
             "CentralCanalStenosis": rng.integers(1, 5, len(base)),
             "Herniation": rng.integers(0, 2, len(base))}

    def rater(p):
        df = base.copy()
        for task, g in truth.items():
            lo, hi = (0, 2) if task == "Herniation" else (1, 6 if task == "Pfirrmann" else 5)
            df[task] = np.where(rng.random(len(g)) < p, rng.integers(lo, hi, len(g)), g)
        return df

    discs = rater(0.3).iloc[2:].reset_index(drop=True)  # two levels not found
    labels = pd.concat([rater(0.15).assign(reader="R1"), rater(0.15).assign(reader="R1-repeat")],
                       ignore_index=True).drop(columns=["subject_id", "site"])
    scans = base.drop_duplicates("scan_id")[["scan_id", "subject_id", "site"]].assign(
        status="ok", failed_stage=None, error=None, n_slices=15, rows=512, cols=512,
        pixel_spacing_mm=0.6, slice_spacing_mm=4.0, fov="300x300", seconds_detect=1.5)
    scans = pd.concat([scans, pd.DataFrame([{
        "scan_id": "broken01", "subject_id": "sub999", "site": "A", "status": "failed",
        "failed_stage": "ingest", "error": "broken01/IM1.dcm: <script>alert(1)</script> no pixels"}])],
        ignore_index=True)
    return scans, discs, labels


@pytest.fixture(scope="module")
def tables():
    scans, discs, labels = _tables()
    agreement, confusion = compute_agreement(discs, labels, n_bootstrap=100,
                                             tasks=TASKS + [CCS_BINARY])
    return scans, discs, labels, agreement, confusion


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    import matplotlib.pyplot as plt

    path = tmp_path_factory.mktemp("img") / "scan000.png"
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.imshow(np.linspace(0, 1, 64 * 64).reshape(64, 64), cmap="gray")
    ax.axis("off")
    fig.savefig(path)
    plt.close(fig)
    return path


@pytest.fixture(scope="module")
def report(tables, png, tmp_path_factory):
    scans, discs, labels, agreement, confusion = tables
    prov = make_provenance(config={"a": 1}, models={"spinenet-grading": "f" * 64},
                           created_by="pytest")
    prov["agreement_n_bootstrap"] = "100"
    out = tmp_path_factory.mktemp("report") / "report" / "validation.html"
    render_report(out, scans=scans, discs=discs, agreement=agreement, confusion=confusion,
                  labels=labels, provenance=prov, qc_images={"scan000": png},
                  hotspot_images=[png], notes=["Synthetic cohort for tests."])
    return out, out.read_text(encoding="utf-8")


def test_report_is_self_contained(report):
    _, html = report
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "<script" not in html.lower().replace("&lt;script", "")
    assert "<link" not in html.lower() and "@import" not in html
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', html))


def test_report_has_the_key_sections(report, tables):
    _, html = report
    for anchor in ("summary", "failures", "agreement", "per-level", "per-site", "confusion",
                   "grades", "qc", "hotspots", "provenance"):
        assert f'id="{anchor}"' in html, anchor
    for text in ("Cohort summary", "Failures", "Agreement with radiologists",
                 "Confusion matrices", "Grade distributions", "QC thumbnails", "Provenance",
                 "model_vs_R1", "R1_vs_R1-repeat", "CentralCanalStenosisBinary",
                 "spinenet-grading", "f" * 64, "Synthetic cohort for tests.",
                 "broken01", "Discs graded by a reader but not by the model"):
        assert text in html, text
    # the failure message is escaped, not executed
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # numbers: three decimals, CI as [low, high]
    assert re.search(r">\d\.\d{3}<span class=\"sub\">\[-?\d\.\d{3}, -?\d\.\d{3}\]", html)
    # forest plots: one per task (incl. the derived binary CCS), plus level plot and histograms
    assert html.count('alt="forest plot') == len(TASKS) + 1
    assert 'alt="agreement per level"' in html and 'alt="grade distributions"' in html
    # missing-model counts are shown: two reader-graded discs have no prediction
    agreement = tables[3]
    miss = agreement[(agreement.metric == "n_missing_model") & (agreement.level == "all")
                     & (agreement.site == "all")]
    assert (miss.estimate == 2).all()
    assert "of 120 (1.7%)" in html


def test_report_without_labels_and_without_discs(tmp_path):
    scans, _, _ = _tables(n_subjects=4)
    out = render_report(tmp_path / "v.html", scans=scans, discs=pd.DataFrame(), agreement=None,
                        confusion=None, labels=None, provenance={}, qc_images=None,
                        hotspot_images=None, notes=None)
    html = out.read_text()
    assert "No radiologist labels were configured" in html
    assert "agreement with readers was not computed" in html
    assert "No graded discs to show." in html
    assert 'id="confusion"' not in html
    # nothing at all still renders
    out = render_report(tmp_path / "w.html", scans=pd.DataFrame(), discs=None, agreement=None,
                        confusion=None, labels=None, provenance=None)
    assert "No scan failed." in out.read_text()


def test_report_with_labels_but_nothing_matched(tmp_path, tables):
    scans, discs, labels, agreement, confusion = tables
    out = render_report(tmp_path / "v.html", scans=scans, discs=discs,
                        agreement=agreement.iloc[:0], confusion=confusion.iloc[:0],
                        labels=labels, provenance={})
    assert "no disc could be matched" in out.read_text()


def test_missing_qc_image_is_noted(tmp_path, tables):
    scans, discs, labels, agreement, confusion = tables
    out = render_report(tmp_path / "v.html", scans=scans, discs=discs, agreement=None,
                        confusion=None, labels=None, provenance={},
                        qc_images={"scan000": tmp_path / "missing.png"})
    assert "QC image for scan000 not found" in out.read_text()


def test_formatting_helpers():
    assert fmt(0.12345) == "0.123" and fmt(float("nan")) == "\u2014" and fmt(None) == "\u2014"
    assert fmt_ci(0.1, 0.25) == "[0.100, 0.250]" and fmt_ci(float("nan"), 1) == ""


@pytest.mark.skipif(CHROMIUM is None and not REQUIRE_CHROMIUM, reason="chromium not installed")
def test_report_renders_in_headless_chromium(report, tmp_path):
    import matplotlib.image as mpimg

    assert CHROMIUM, "SPINECOHORT_REQUIRE_CHROMIUM=1 but no chromium or chromium-browser on PATH"
    path, html = report
    assert path.name == "validation.html"
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", "--dump-dom", "--window-size=1400,4000", path.resolve().as_uri()]
    run = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
    # the page the browser built: every section and every embedded image of the file
    dom = run.stdout
    for anchor in ("summary", "failures", "agreement", "per-level", "per-site", "confusion",
                   "grades", "qc", "hotspots", "provenance"):
        assert f'id="{anchor}"' in dom, anchor
    assert dom.count("<img") == html.count("<img") > 0
    img = mpimg.imread(shot)
    assert img.shape[:2] == (4000, 1400)
    ink = (img[..., :3] < 0.9).any(axis=2)
    assert ink.mean() > 0.02  # text and figures were drawn, not a blank page
    assert ink[3000:].any()  # content reaches far down the page


# --------------------------------------------------------------------------- the first screen tells the truth


def _shipped_models():
    import json

    from spinecohort.shipped import DEFAULT_MODELS, MODELS_DIR

    return {Path(f).stem: json.loads((MODELS_DIR / f"{Path(f).stem}.json").read_text())["sha256"]
            for f in DEFAULT_MODELS.values()}


def _first_screen(html):
    return html[:html.index('id="summary"')]


def test_first_screen_names_each_models_training_data(tmp_path, png):
    from spinecohort.provenance import sha256_file
    from spinecohort.shipped import default_model

    import json

    from spinecohort.shipped import MODELS_DIR

    models = _shipped_models()
    grader = default_model("grader").stem
    assert models[grader] == sha256_file(default_model("grader"))  # the record is these weights'
    # a run graded with the synthetic-only grader says so as loudly
    models["grader-cpu-v3"] = json.loads((MODELS_DIR / "grader-cpu-v3.json").read_text())["sha256"]
    scans, discs, _ = _tables(n_subjects=4)
    scans["level_flags"] = [["no_sacrum_in_view", "low_confidence"], [], None, "", ""]
    out = render_report(tmp_path / "v.html", scans=scans, discs=discs, provenance={"models": models},
                        qc_images={"scan000": png})
    first = _first_screen(out.read_text())
    assert "What the models were trained on" in first
    for model in models:
        assert model in first
    # synthetic vs real, which data, which figures
    assert "synthetic only" in first and "synthetic + real" in first
    assert "1600 synthetic phantoms" in first and "public-lumbar training split" in first
    assert "held-out synthetic" in first and "public-lumbar validation" in first
    assert "trained on synthetic phantoms only" in first and "never seen a real disc" in first
    # the scans whose levels are flagged, with their QC picture
    assert "Scans whose levels are flagged" in first
    assert "scan000</b>: no_sacrum_in_view, low_confidence" in first and 'alt="QC scan000"' in first
    assert "scan001</b>" not in first


def test_unmatched_or_unknown_weights_are_not_given_a_record(tmp_path):
    scans, discs, _ = _tables(n_subjects=4)
    models = {**_shipped_models(), "grader-cpu-v3": "0" * 64, "someone-elses-model": "1" * 64}
    html = render_report(tmp_path / "v.html", scans=scans, discs=discs,
                         provenance={"models": models}).read_text()
    first = _first_screen(html)
    assert "sha256 mismatch" in first and "describes other weights" in first
    assert "someone-elses-model" in first and "no record" in first
    assert "Scans whose levels are flagged" not in html  # no level_flags column: no list


def test_intervals_not_computed_say_why_and_undefined_metrics_say_undefined(tmp_path):
    scans, discs, labels = _tables(n_subjects=4)  # fewer subjects than a bootstrap CI needs
    labels = labels[labels["reader"] == "R1"].assign(Herniation=0, SPIDER_Bulging=1)
    agreement, confusion = compute_agreement(discs, labels, n_bootstrap=50, tasks=["Pfirrmann", "Herniation"])
    html = render_report(tmp_path / "v.html", scans=scans, discs=discs, agreement=agreement,
                         confusion=confusion, labels=labels, provenance={}).read_text()
    assert "No bootstrap confidence intervals in the pooled tables and plots below: CI not computed: 4 subject(s) &lt; 10" in html
    assert "estimates only, no interval (CI not computed: 4 subject(s) &lt; 10)" in html
    assert "with 95% subject-clustered bootstrap intervals" not in html
    # analytic disc-level intervals are labelled as such
    assert "analytic, discs independent (FCE)" in html
    # balanced accuracy with no positive reference disc: undefined, with the reason in view
    assert '>undefined<span class="sub">no positive disc in the reference</span>' in html
    # a labels column that nothing reads is listed, not dropped
    assert "SPIDER_Bulging" in html and "matches no model task and no reading scheme (config reading_schemes); not compared" in html


def test_hotspots_are_grouped_by_task(tmp_path, png):
    shutil.copy(png, tmp_path / "scan001_L4-L5_Herniation.png")
    shutil.copy(png, tmp_path / "scan_7_L5-S1.png")  # an older montage: Pfirrmann's
    html = render_report(tmp_path / "v.html", scans=None, hotspot_images=sorted(tmp_path.glob("*.png")),
                         provenance={}).read_text()
    assert 'id="hotspots-Herniation"' in html and 'id="hotspots-Pfirrmann"' in html
    assert "scan001 L4-L5 &middot; Herniation" in html
