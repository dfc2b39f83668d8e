"""Render synthetic phantoms (mid-sagittal and parasagittal slices) to PNG for eyeballing.

    python benchmarks/show_phantoms.py OUTDIR [--seeds 1 2 3] [--fov lumbar] [--contrast T2]
                                         [--truth] [--all-contrasts]

One PNG per scan: the mid slice, a slice through the right foramina/pedicles and one
through the left ones (and the most lateral slice), with the truth polygons and disc
levels drawn on the mid slice when ``--truth`` is given.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spinecohort.synthetic import generate_scan  # noqa: E402


def render(scan, out: Path, truth: bool) -> None:
    vol = scan.volume
    n = vol.shape[0]
    mid = scan.midline_slice
    lateral = max(1, int(round(18.0 / scan.slice_thickness_mm)))
    picks = [mid, max(mid - lateral, 0), min(mid + lateral, n - 1), n - 1]
    titles = ["mid", "right parasagittal", "left parasagittal", "most left"]
    vmax = np.percentile(vol, 99.7)
    aspect = 1.0
    fig, axes = plt.subplots(1, 4, figsize=(4 * 4.2, 4.2 * vol.shape[1] / vol.shape[2] + 0.6))
    for ax, k, title in zip(axes, picks, titles):
        ax.imshow(vol[k], cmap="gray", vmin=0, vmax=vmax, aspect=aspect, interpolation="nearest")
        ax.set_title(f"{title} (slice {k})", fontsize=9)
        ax.axis("off")
        if truth:
            for v in scan.vertebrae:
                if k in v.polygons:
                    P = v.polygons[k]
                    ax.plot(np.r_[P[:, 1], P[0, 1]], np.r_[P[:, 0], P[0, 0]], "-", lw=0.6,
                            color="orange" if v.partial else "lime")
                    ax.plot(P[0, 1], P[0, 0], ".", ms=2.5, color="red")
                    if k == mid:
                        ax.text(P[:, 1].min() - 4, P[:, 0].mean(), v.level, color="yellow", fontsize=6, ha="right")
            if k == mid:
                for d in scan.discs:
                    g = d.grades
                    lab = f"P{g['Pfirrmann']}N{g['Narrowing']}C{g['CentralCanalStenosis']}" + "".join(
                        s for s, t in (("S", "Spondylolisthesis"), ("u", "UpperEndplateDefect"), ("l", "LowerEndplateDefect"),
                                       ("M", "UpperMarrow"), ("m", "LowerMarrow"), ("H", "Herniation"),
                                       ("L", "ForaminalStenosisLeft"), ("R", "ForaminalStenosisRight")) if g[t])
                    ax.text(d.centre[2] + 25 / scan.pixel_spacing_mm, d.centre[1], lab, color="cyan", fontsize=5, va="center")
    fig.suptitle(f"seed {scan.seed} {scan.fov} {scan.contrast} {vol.shape} sp={scan.pixel_spacing_mm:.2f} "
                 f"thk={scan.slice_thickness_mm} age={scan.age}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--fov", default=None)
    ap.add_argument("--contrast", default=None)
    ap.add_argument("--all-contrasts", action="store_true")
    ap.add_argument("--truth", action="store_true")
    a = ap.parse_args(argv)
    a.outdir.mkdir(parents=True, exist_ok=True)
    contrasts = ["T1", "T2", "STIR"] if a.all_contrasts else [a.contrast]
    for seed in a.seeds:
        for c in contrasts:
            t0 = time.perf_counter()
            scan = generate_scan(seed, fov=a.fov, contrast=c)
            dt = time.perf_counter() - t0
            name = f"phantom_{seed}_{scan.fov}_{scan.contrast}.png"
            render(scan, a.outdir / name, a.truth)
            print(f"{name}: {scan.volume.shape} generated in {dt:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
