"""How much of SPIDER's Pfirrmann grade do simple image measurements carry, beside the grader?

Pfirrmann grades are defined by the disc's signal against the vertebrae, its homogeneity and its
height (Pfirrmann et al., Spine 26(17), 2001). This measures them on each IVV's centre slice (disc
band against the two bodies, its percentiles and spread, the central profile's contrast and
bright width, the IVV's disc height and depth in mm) and fits a class-balanced logistic regression
per cross-validation fold of the grader's run (same patients held out), alone and stacked on the
grader's out-of-fold log-probabilities. Prints balanced accuracy and linear kappa; a check of
where the grader's Pfirrmann figure stands, not a model the pipeline uses.

Run (after ``spinecohort.training.grader_real`` has built the SPIDER IVVs and the CV predictions):
  .venv/bin/python benchmarks/pfirrmann_features.py --spider ../shared/data/spider-midsagittal \
      --ivv-table WORK/spider/ivv_table.csv --oof WORK/oof_v4.parquet
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from spinecohort.stats.metrics import confusion_metrics
from spinecohort.training.grader_real import spider_labels

GRADES = [1, 2, 3, 4, 5]
COLS = slice(72, 152)  # the central 80 of the IVV's 224 columns: the disc and bodies, no soft tissue


def disc_measurements(ivv: np.ndarray, height_mm: float, width_mm: float) -> list[float]:
    """Measurements of one IVV (9, 112, 224): the centre slice's disc band (rows 46-66) and bodies
    (rows 8-32 and 80-104), intensities relative to the bodies' median."""
    s = ivv[4].astype(np.float64)
    disc, bodies = s[46:66, COLS], np.concatenate([s[8:32, COLS].ravel(), s[80:104, COLS].ravel()])
    ref = float(np.median(bodies))
    profile = s[20:92, COLS].mean(axis=1)
    half = (profile.max() + profile.min()) / 2
    return [disc.mean() - ref, np.percentile(disc, 90) - ref, np.median(disc) - ref, disc.std(),
            s[50:62, 96:128].mean() - ref, s[46:66, COLS].mean(axis=1).max() - ref,
            profile.max() - profile.min(), float((profile > half).sum()),
            height_mm, width_mm, height_mm / max(width_mm, 1e-3), s.mean(), s.std(), np.percentile(s, 99)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spider", required=True, help="SPIDER mid-sagittal folder (grades.csv, series.csv)")
    p.add_argument("--ivv-table", required=True, help="grader_real's ivv_table.csv (paths of the series' IVV files)")
    p.add_argument("--oof", required=True, help="out-of-fold predictions (Pfirrmann_probs, fold) of a CV run")
    args = p.parse_args()
    spider = Path(args.spider)
    labels = spider_labels(spider / "grades.csv", spider / "series.csv")[["scan_id", "level", "Pfirrmann"]]
    labels = labels.rename(columns={"Pfirrmann": "reader_pfirrmann"})
    oof = pd.read_parquet(args.oof)
    oof["scan_id"] = oof["scan_id"].astype(str)
    rows = oof.merge(labels.dropna(), on=["scan_id", "level"])
    paths = pd.read_csv(args.ivv_table).drop_duplicates("scan_id").set_index("scan_id")["path"]
    feats, cache = [], {}
    for r in rows.itertuples():
        if r.scan_id not in cache:
            with np.load(paths[r.scan_id]) as z:
                cache[r.scan_id] = {k: z[k] for k in ("volumes", "levels", "heights_mm", "widths_mm")}
        z = cache[r.scan_id]
        i = list(z["levels"]).index(r.level)
        feats.append(disc_measurements(z["volumes"][i], float(z["heights_mm"][i]), float(z["widths_mm"][i])))
    F = np.asarray(feats)
    context = np.hstack([pd.get_dummies(rows["sequence"]).to_numpy(float), pd.get_dummies(rows["level"]).to_numpy(float)])
    logp = np.log(np.clip(np.stack(rows["Pfirrmann_probs"].to_numpy()), 1e-6, 1.0))
    y = rows["reader_pfirrmann"].to_numpy(int)
    folds = rows["fold"].to_numpy()

    def score(pred: np.ndarray) -> str:
        conf = np.zeros((5, 5))
        np.add.at(conf, (y - 1, pred - 1), 1)
        m = confusion_metrics(conf, GRADES)
        return f"balanced accuracy {float(m['balanced_accuracy']):.3f}, linear kappa {float(m['kappa_linear']):.3f}"

    def cross_validated(X: np.ndarray) -> np.ndarray:
        pred = np.zeros(len(y), int)
        for f in np.unique(folds):
            tr, te = folds != f, folds == f
            sc = StandardScaler().fit(X[tr])
            clf = LogisticRegression(class_weight="balanced", max_iter=2000).fit(sc.transform(X[tr]), y[tr])
            pred[te] = clf.predict(sc.transform(X[te]))
        return pred

    print(f"{len(y)} graded discs with an IVV, {rows['subject_id'].nunique()} patients, {len(np.unique(folds))} folds")
    print(f"grader (argmax of its CV probabilities):      {score(logp.argmax(axis=1) + 1)}")
    print(f"measurements + sequence + level:              {score(cross_validated(np.hstack([F, context])))}")
    print(f"grader log-probabilities stacked:             {score(cross_validated(logp))}")
    print(f"grader + measurements + sequence + level:     {score(cross_validated(np.hstack([logp, F, context])))}")


if __name__ == "__main__":
    main()
