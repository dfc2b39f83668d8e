"""The phantom scene: acquisition, subject, geometry and textures of one series, painted
slice by slice into a volume, with the vertebra/disc truth it was drawn from."""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from ..tasks import LEVELS, disc_name
from .anatomy import _CHAIN, _SACRAL, _V, _build_chain, _rescale, _subject_params
from .canvas import (
    _box_corners,
    _Canvas,
    _coverage,
    _edge_dists,
    _edge_param,
    _edges,
    _paint_bone,
    _paint_ellipse,
    _paint_ring_bone,
    _rounded_sdf,
    _smooth_field,
    _smoothstep,
    _Upsampler,
)
from .degeneration import _draw_age, _draw_grades
from .truth import SyntheticDisc, SyntheticVertebra

# --------------------------------------------------------------------------- appearance tables
# Relative tissue intensities per contrast (scaled to the 12-bit range at the end).
_TISSUE = {
    "T1": dict(air=0.0, fat=1.0, muscle=0.30, marrow=0.62, cortex=0.05, csf=0.13, cord=0.46,
               annulus=0.30, nucleus=0.38, ligament=0.06, viscera=0.36, lung=0.03, vessel=0.06,
               brain=0.46, fluid=0.15, nerve=0.38, skin=0.45, notch=0.22),
    "T2": dict(air=0.0, fat=0.72, muscle=0.16, marrow=0.40, cortex=0.04, csf=1.0, cord=0.40,
               annulus=0.13, nucleus=0.92, ligament=0.05, viscera=0.38, lung=0.03, vessel=0.05,
               brain=0.42, fluid=0.95, nerve=0.30, skin=0.35, notch=0.55),
    "STIR": dict(air=0.0, fat=0.06, muscle=0.22, marrow=0.13, cortex=0.04, csf=1.0, cord=0.42,
                 annulus=0.16, nucleus=0.85, ligament=0.05, viscera=0.42, lung=0.03,
                 vessel=0.05, brain=0.48, fluid=1.0, nerve=0.42, skin=0.2, notch=0.6),
}
# Modic-like marrow change values: type 1 oedema, type 2 fat, type 3 sclerosis.
_MODIC = {
    "T1": {1: 0.22, 2: 0.95, 3: 0.10},
    "T2": {1: 0.78, 2: 0.66, 3: 0.10},
    "STIR": {1: 0.80, 2: 0.035, 3: 0.07},
}
# Pfirrmann appearance: nucleus contrast (fraction of the healthy nucleus-annulus
# difference), nucleus half-size (AP, height fractions), boundary softness,
# heterogeneity amplitude, intranuclear cleft depth.
_PF_K = {1: 1.0, 2: 0.75, 3: 0.45, 4: 0.2, 5: 0.0}
_PF_SIZE = {1: (0.34, 0.36), 2: (0.31, 0.33), 3: (0.28, 0.30), 4: (0.25, 0.27), 5: (0.2, 0.22)}
_PF_SOFT = {1: 0.18, 2: 0.25, 3: 0.5, 4: 0.7, 5: 0.7}
_PF_HET = {1: 0.0, 2: 0.05, 3: 0.14, 4: 0.18, 5: 0.1}
_PF_CLEFT = {1: 0.0, 2: 0.45, 3: 0.35, 4: 0.2, 5: 0.0}
_CCS_BULGE = {1: 0.0, 2: 3.0, 3: 6.0, 4: 9.0}  # extra posterior disc bulge (mm)
_CCS_FLAV = {1: 0.0, 2: 1.5, 3: 3.0, 4: 4.5}  # extra ligamentum flavum thickness (mm)


# --------------------------------------------------------------------------- scene
class _Scene:
    def __init__(self, rng, seed, fov, contrast, n_slices, rows, cols, overrides=None):
        self.rng = rng
        self.overrides = overrides or {}
        self.seed = seed
        self.fov = fov
        self.contrast = contrast
        self.tis = dict(_TISSUE[contrast])
        self._acquisition(n_slices, rows, cols)
        self._subject()
        self._geometry()
        self._centreline()
        self._textures()

    # ------------------------------------------------------------------ acquisition
    def _acquisition(self, n_slices, rows, cols):
        rng, fov = self.rng, self.fov
        if fov == "lumbar":
            self.rows = int(rows or rng.choice([320, 384, 448, 512]))
            self.fov_mm = rng.uniform(250.0, 300.0)
            self.thk = float(rng.choice([3.5, 4.0, 4.0, 4.5]))
            self.n = int(n_slices or rng.integers(12, 18))
        elif fov == "whole":
            self.rows = int(rows or 512)
            self.fov_mm = None  # fitted to the spine
            self.thk = float(rng.choice([3.5, 4.0, 4.5, 5.0]))
            self.n = int(n_slices or rng.integers(11, 16))
        else:
            self.rows = int(rows or rng.choice([256, 320, 384, 448, 512]))
            self.fov_mm = rng.uniform(220.0, 260.0)
            self.thk = float(rng.choice([3.0, 3.0, 3.5]))
            self.n = int(n_slices or rng.integers(10, 15))
        self.cols_req = cols
        self.col_frac = {"lumbar": rng.uniform(0.52, 0.64), "whole": rng.uniform(0.6, 0.7),
                         "cervical": rng.uniform(0.5, 0.6)}[fov]
        c = self.contrast
        self.field_t = float(rng.choice([1.5, 1.5, 3.0]))
        if c == "T1":
            self.tr, self.te, self.ti = rng.uniform(400, 700), rng.uniform(8, 15), None
        elif c == "T2":
            self.tr, self.te, self.ti = rng.uniform(2500, 5000), rng.uniform(80, 120), None
        else:
            self.tr, self.te = rng.uniform(3000, 6000), rng.uniform(30, 70)
            self.ti = rng.uniform(140, 170) if self.field_t < 2 else rng.uniform(200, 230)
        self.mid = self.n // 2
        self.x_off = rng.uniform(-0.3, 0.3) * self.thk

    # ------------------------------------------------------------------ subject
    def _subject(self):
        rng = self.rng
        self.age = _draw_age(rng)
        self.discs = [disc_name(LEVELS[i], LEVELS[i - 1]) for i in range(1, len(LEVELS))]
        g, z = _draw_grades(rng, self.age, self.discs)
        self.grades = dict(zip(self.discs, g))
        for dname, over in self.overrides.items():  # controlled scenes (tests, examples)
            self.grades[dname] = {**self.grades[dname], **over}
        self.degen = dict(zip(self.discs, z))
        self.scale = rng.uniform(0.9, 1.06)
        if self.fov == "whole":
            self.scale *= 0.92
        self.sacral_slope = math.radians(rng.uniform(28.0, 45.0))
        self.tilt = math.radians(rng.normal(0.0, 4.0))
        self.fat = rng.uniform(0.0, 1.0)  # adiposity
        self.findings = {}
        for d in self.discs:
            g = self.grades[d]
            f = {}
            f["modic_type"] = int(rng.choice([1, 2, 3], p=[0.3, 0.6, 0.1]))
            f["modic_depth"] = rng.uniform(0.2, 0.4)
            f["modic_ap"] = (rng.uniform(-0.95, -0.3), rng.uniform(0.3, 0.95))
            f["notch_pos"] = (rng.uniform(-0.35, 0.35), rng.uniform(-0.35, 0.35))
            f["notch_size"] = tuple(rng.uniform(3.0, 6.0, 4))
            f["notch_x"] = (rng.uniform(-5, 5), rng.uniform(-5, 5))
            f["hern_x"] = rng.uniform(-5, 5)
            f["hern_size"] = (rng.uniform(4.0, 7.0), rng.uniform(5.0, 9.0))
            f["hern_shift"] = rng.uniform(-0.25, 0.25)
            f["bulge"] = rng.uniform(0.5, 1.5) + 0.5 * max(g["Pfirrmann"] - 2, 0)
            f["flav"] = rng.uniform(2.0, 3.0)
            f["vacuum"] = bool(rng.random() < 0.4) and g["Pfirrmann"] == 5
            f["het_phase"] = rng.uniform(0, 2 * np.pi)
            self.findings[d] = f
        # marrow per vertebra and focal lesions (haemangiomas)
        self.vmarrow = {lvl: 1.0 + rng.normal(0.0, 0.04) for lvl in _CHAIN}
        self.haem = {}
        for lvl in _CHAIN:
            if rng.random() < 0.08:
                self.haem[lvl] = (rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(2.5, 5.0), rng.uniform(-8, 8))
        tis = self.tis
        age = self.age
        if self.contrast == "T1":
            tis["marrow"] = 0.50 + 0.004 * (age - 20)
        elif self.contrast == "T2":
            tis["marrow"] = 0.34 + 0.002 * (age - 20)
        else:
            tis["marrow"] = 0.19 - 0.001 * (age - 20)
        # Remnant disc lines between the fused sacral segments, which many adults keep (thickest
        # at S1-S2): drawn from their own stream so that every other draw of a seed (and so the
        # rest of the phantom) stays as it was.
        sac = np.random.default_rng([int(self.seed), 1729])
        kind = str(sac.choice(["none", "dark", "bright"], p=[0.35, 0.35, 0.3]))
        self.sacral_remnants = None if kind == "none" else dict(
            kind=kind, thick=float(sac.uniform(0.8, 2.0)), span=float(sac.uniform(0.4, 0.85)),
            lower=int(sac.integers(0, 4)))  # how many junctions below S1-S2 show one too

    # ------------------------------------------------------------------ geometry
    def _geometry(self):
        rng = self.rng
        params = _subject_params(rng, self.grades, self.scale)
        scoli_amp, scoli_len, scoli_ph = rng.uniform(0.0, 3.0), rng.uniform(250, 600), rng.uniform(0, 2 * np.pi)
        frac_v = rng.uniform(-1.0, 1.0)
        frac_h = rng.uniform(-1.0, 1.0)
        for _ in range(3):
            verts = _build_chain(params, self.sacral_slope)
            lo, hi = {"lumbar": ("S1", "L1"), "whole": ("S1", "C2"), "cervical": ("T1", "C2")}[self.fov]
            axis = verts[hi].c - verts[lo].c
            cur = math.atan2(-axis[1], -axis[0])  # angle of the axis from vertical, anterior +
            verts = _build_chain(params, self.sacral_slope - cur + self.tilt)
            if self.fov != "whole":
                break
            top = verts["C2"].pt(verts["C2"].h / 2 + 40.0 * self.scale, 0)[0]
            bot = verts["S3"].c[0]
            need = (bot - top) + 20.0
            if need <= self.rows * 1.18:
                break
            fac = self.rows * 1.15 / need
            self.scale *= fac
            params = _rescale(params, fac)
        self.params = params
        self.V = verts
        # pixel spacing and placement
        if self.fov == "whole":
            top = verts["C2"].pt(verts["C2"].h / 2 + 40.0 * self.scale, 0)[0]
            bot = verts["S3"].c[0]
            need = (bot - top) + 20.0
            self.sp = float(np.clip(need * rng.uniform(1.03, 1.12) / self.rows, 0.9, 1.2))
            height = self.rows * self.sp
            slack = max(height - (bot - top), 0.0)
            row0 = top - 0.5 * slack - frac_v * 0.3 * max(slack - 20.0, 0.0) / 2
            self.cols = int(self.cols_req or int(round(self.rows * rng.uniform(0.5, 0.62) / 16.0)) * 16)
            ref = np.mean([verts[l].pt(0, -verts[l].w / 2 - 8) for l in LEVELS], axis=0)
            col0 = ref[1] - self.col_frac * self.cols * self.sp
        else:
            self.sp = float(np.clip(self.fov_mm / self.rows, 0.4, 1.2))
            self.cols = int(self.cols_req or self.rows)
            height = self.rows * self.sp
            if self.fov == "lumbar":
                ref = verts["L3"].pt(0, -verts["L3"].w / 2 - 8)
                row0 = ref[0] - height * (0.49 + 0.05 * frac_v)
                # some sites frame lumbar series tightly: the image ends inside L5, the L5-S1 disc
                # or S1 (own stream: the other draws of the seed stay as they were)
                tight = np.random.default_rng([int(self.seed), 1730])
                if tight.random() < 0.3:
                    l5, s1 = verts["L5"], verts["S1"]
                    bottom = tight.uniform(l5.c[0] + 0.2 * l5.h, s1.c[0] + 0.5 * s1.h + 10.0 * self.scale)
                    row0 = bottom - height
            else:
                ref = verts["C4"].pt(0, -verts["C4"].w / 2 - 8)
                tip = verts["C2"].pt(verts["C2"].h / 2 + 16 * self.scale, 0)[0]
                row0 = tip - height * rng.uniform(0.2, 0.3)
            col0 = ref[1] - self.col_frac * self.cols * self.sp - 0.04 * frac_h * self.cols * self.sp
        shift = np.array([row0, col0])
        for v in verts.values():
            v.set_pose(v.c - shift, v.phi)
        # lateral centre (mild scoliosis), zero at the FOV centre
        rc = self.rows * self.sp / 2
        for v in verts.values():
            v.xc = scoli_amp * (math.sin(2 * np.pi * (v.c[0] - rc) / scoli_len + scoli_ph) - math.sin(scoli_ph))
        self.xs = [(k - self.mid) * self.thk + self.x_off for k in range(self.n)]
        self.f = max(1, int(math.ceil(1.5 / self.sp)))
        # levels close enough to the image to be drawn at all (culling)
        H, Wd, m = self.rows * self.sp, self.cols * self.sp, 90.0
        self.near = {l for l, v in verts.items() if -m < v.c[0] < H + m and -m < v.c[1] < Wd + m}

    # ------------------------------------------------------------------ canal centreline and (s, d) maps
    def _centreline(self):
        V, sp = self.V, self.sp
        pts, attrs = [], []
        s_marks = {}
        for lvl in _CHAIN:
            v = V[lvl]
            ca = v.a["canal"]
            for u in (-v.h / 2, 0.0, v.h / 2):
                pts.append(v.pt(u, -v.w / 2 - ca / 2))
                attrs.append(self._canal_attrs(v))
        top = V["C2"]
        ext_top = [top.pt(top.h / 2 + k, -top.w / 2 - top.a["canal"] / 2) for k in (15.0, 40.0, 400.0)]
        bot = V["S5"]
        ext_bot = [bot.pt(-bot.h / 2 - k, -bot.w / 2 - bot.a["canal"] / 2) for k in (300.0, 15.0)]
        pts = ext_bot + pts + ext_top
        attrs = [attrs[0]] * 2 + attrs + [attrs[-1]] * 3
        P = np.array(pts)
        seg = np.hypot(*np.diff(P, axis=0).T)
        S = np.concatenate([[0.0], np.cumsum(seg)])
        step = 0.5
        s_d = np.arange(0.0, S[-1], step)
        raw = np.stack([np.interp(s_d, S, P[:, 0]), np.interp(s_d, S, P[:, 1])], axis=1)
        keys = attrs[0].keys()
        A = {k: np.interp(s_d, S, np.array([a[k] for a in attrs])) for k in keys}
        # level landmarks in s (arc length of the vertebra centre point)
        for i, lvl in enumerate(_CHAIN):
            s_marks[lvl] = S[2 + 3 * i + 1]
        self.s_marks = s_marks
        self.s_disc = {}
        for i in range(1, len(LEVELS)):
            lo = _CHAIN.index(LEVELS[i - 1])
            # top point of the lower vertebra and bottom point of the upper one
            self.s_disc[disc_name(LEVELS[i], LEVELS[i - 1])] = (S[2 + 3 * lo + 2] + S[2 + 3 * (lo + 1)]) / 2
        self.cl_S = s_d
        # canal centreline (lightly smoothed) and body axis (heavily smoothed, for the skin,
        # fat and viscera, whose normals do not cross within the body)
        canal = self._curve(raw, 5.0 / step)
        body = self._curve(raw, 35.0 / step)
        self.cl_P, self.cl_T, self.cl_N = canal
        A.update(self._soft_attrs(s_d))
        A["dfront_s"] = ndimage.gaussian_filter1d(A["dfront"], 25.0 / step, mode="nearest")
        self.cl_A = A
        f = self.f
        crows, ccols = int(math.ceil(self.rows / f)), int(math.ceil(self.cols / f))
        self.crows, self.ccols = crows, ccols
        cY = ((np.arange(crows, dtype=np.float32) * f + (f - 1) / 2.0) * sp)[:, None]
        cX = ((np.arange(ccols, dtype=np.float32) * f + (f - 1) / 2.0) * sp)[None, :]
        cnear = self._nearest(canal[0], crows, ccols)
        cnear, self.cmap_d, _ = self._project(cY, cX, cnear, canal, 1)
        bnear = self._nearest(body[0], crows, ccols)
        bnear, self.cmap_db, _ = self._project(cY, cX, bnear, body, 2)
        self.cA = {k: A[k][bnear].astype(np.float32) for k in ("xc", "hw", "Dp", "dfront_s", "Dax", "fp", "fa",
                                                                 "w_abd", "w_pel", "w_tho", "w_neck", "w_head", "w_brain")}
        self.cA["dfront_c"] = A["dfront"][cnear].astype(np.float32)
        self.up = _Upsampler((self.rows, self.cols), (crows, ccols), f)
        Y = (np.arange(self.rows, dtype=np.float32) * sp)[:, None]
        X = (np.arange(self.cols, dtype=np.float32) * sp)[None, :]
        self.Y, self.X = Y, X
        # fine (s, d) only in a band around the canal, where the canal is painted
        cand = np.abs(self.cmap_d) < 22.0 * self.scale + 2.0 * f * sp
        cand = np.repeat(np.repeat(cand, f, axis=0), f, axis=1)[: self.rows, : self.cols]
        near = np.repeat(np.repeat(cnear, f, axis=0), f, axis=1)[: self.rows, : self.cols]
        ii, jj = np.nonzero(cand)
        bnear_f, bd, bs = self._project(Y[ii, 0], X[0, jj], near[ii, jj], canal, 2)
        keep = np.abs(bd) < 22.0 * self.scale
        self.band = (ii * self.cols + jj)[keep]
        self.band_d, self.band_s, ids = bd[keep], bs[keep], bnear_f[keep]
        self.bA = self._band_attrs(ids)

    def _band_attrs(self, ids):
        """Slice-independent canal attributes for the band pixels (float32)."""
        A = self.cl_A
        g = lambda k: A[k][ids].astype(np.float32)  # noqa: E731
        wh = g("w_head")
        no_head = 1.0 - wh
        s = self.band_s
        cis = 1.0 - _smoothstep((s - self.s_head - 14.0 * self.scale) / 8.0)
        sa, sp_ = g("sac_a"), g("sac_p")
        sp_ = sp_ - 5.0 * self.scale * wh  # cisterna magna behind the medulla
        B = dict(xc=g("xc"), lat_c=g("lat_c"), ca=g("ca"), no_head=no_head,
                 sac_lat=g("sac_lat") + 6.0 * wh, sac_mid=(sa + sp_) / 2,
                 sac_half=(sa - sp_) / 2 * g("sac_on") * cis,
                 cord_lat=np.maximum(g("cord_lat") * (1 + 0.6 * wh), 1e-3),
                 cord_h=g("cord_h") * g("cord_on") * (1 + 1.4 * wh),
                 cord_mid=(sa + g("sac_p")) / 2 + 0.3 + 2.0 * wh,
                 cauda=g("cauda"))
        flav, bulge = self._stenosis_profiles()
        B["flav"] = flav[ids].astype(np.float32) * g("flav_on")
        B["bulge"] = bulge[ids].astype(np.float32) * no_head
        self.has_cauda = bool(B["cauda"].max() > 0)
        return B

    @staticmethod
    def _curve(raw, sigma):
        P = ndimage.gaussian_filter1d(raw, sigma, axis=0, mode="nearest")
        T = np.gradient(P, axis=0)
        T /= np.hypot(T[:, 0], T[:, 1])[:, None] + 1e-12
        N = np.stack([-T[:, 1], T[:, 0]], axis=1)  # anterior normal
        return P, T, N

    def _nearest(self, P, crows, ccols):
        """Index of the nearest curve sample for every coarse cell (EDT on a padded grid)."""
        f, marg = self.f, 64
        gh, gw = crows + 2 * marg, ccols + 2 * marg
        gi = np.round((P / self.sp - (f - 1) / 2.0) / f).astype(int) + marg
        ok = (gi[:, 0] >= 0) & (gi[:, 0] < gh) & (gi[:, 1] >= 0) & (gi[:, 1] < gw)
        idimg = np.full((gh, gw), -1, np.int32)
        idimg[gi[ok, 0], gi[ok, 1]] = np.nonzero(ok)[0]
        ind = ndimage.distance_transform_edt(idimg < 0, return_distances=False, return_indices=True)
        return idimg[ind[0], ind[1]][marg:marg + crows, marg:marg + ccols]

    def _project(self, Y, X, near, curve, iters):
        Pd, T, N = curve
        s_d, step = self.cl_S, 0.5
        for _ in range(iters):
            q = Pd[near]
            ds = (Y - q[..., 0]) * T[near, 0] + (X - q[..., 1]) * T[near, 1]
            near = np.clip(near + np.round(ds / step).astype(np.int32), 0, len(s_d) - 1)
        q = Pd[near]
        dY, dX = Y - q[..., 0], X - q[..., 1]
        d = (dY * N[near, 0] + dX * N[near, 1]).astype(np.float32)
        s = (s_d[near] + dY * T[near, 0] + dX * T[near, 1]).astype(np.float32)
        return near.astype(np.int32), d, s

    def _canal_attrs(self, v: _V) -> dict:
        reg = v.a["region"]
        ca = v.a["canal"] / 2
        e_ant = {"L": 1.0, "S": 1.5, "T": 0.8, "C": 0.8}[reg]
        e_post = {"L": 3.0, "S": 3.0, "T": 1.8, "C": 1.2}[reg]
        if v.level in ("L5", "S1"):
            e_ant = 2.5
        cord_h = {"C": 4.0, "T": 3.4, "L": 3.6, "S": 0.0}[reg] * self.scale
        cord_lat = {"C": 6.5, "T": 4.5, "L": 4.5, "S": 0.0}[reg] * self.scale
        if v.level in ("T11", "T12"):
            cord_h, cord_lat = 4.0 * self.scale, 5.0 * self.scale
        return dict(ca=ca, sac_a=ca - e_ant, sac_p=-(ca - e_post), lat_c=v.a["ipd"] / 2,
                    sac_lat=v.a["ipd"] / 2 * 0.85, cord_h=cord_h, cord_lat=cord_lat,
                    xc=v.xc, dfront=ca + v.w)

    def _soft_attrs(self, s):
        m, fat, sc = self.s_marks, self.fat, self.scale
        V = self.V
        rng = self.rng
        s_pel = m["S1"] + V["S1"].h / 2
        s_dia = m["T11"]
        s_inlet = m["T1"] + V["T1"].h / 2
        s_head = m["C2"] + V["C2"].h / 2 + 22.0 * sc
        fat_l = (6 + 34 * fat) * sc
        fat_t = (5 + 20 * fat) * sc
        fat_n = (3 + 12 * fat) * sc
        # control points: (s, Dp, fp, Da_extra, fa, hw)
        ctrl = [
            (m["S5"] - 60, 35 + 1.4 * fat_l, 1.2 * fat_l, 120, 25 + fat_l, 170),
            (m["S3"], 28 + fat_l, fat_l, 120, 25 + fat_l, 170),
            (s_pel - 25, 40 + fat_l, fat_l, 120, 20 + fat_l, 170),
            (m["L3"], 50 * sc + fat_l, fat_l, (75 + 60 * fat) * sc, 10 + fat_l, 170),
            (s_dia, 46 * sc + fat_t, fat_t, 140 * sc, 8 + fat_t, 160),
            (m["T6"], 44 * sc + fat_t, fat_t, 150 * sc, 5 + fat_t, 160),
            (s_inlet + 10, 48 * sc + fat_n, fat_n, 45 * sc, 4 + fat_n, 62),
            (m["C4"], 50 * sc + fat_n, fat_n, 48 * sc, 3 + fat_n, 58),
            (s_head, 60 * sc + fat_n, fat_n, 60 * sc, 4 + fat_n, 70),
            (s_head + 35, 82 * sc, 4.0 + fat_n / 2, 110 * sc, 5.0, 80),
            (s_head + 80, 92 * sc, 4.0, 130 * sc, 5.0, 80),
            (s_head + 300, 92 * sc, 4.0, 130 * sc, 5.0, 80),
        ]
        ctrl.sort(key=lambda c: c[0])
        cs = np.array([c[0] for c in ctrl])
        out = {}
        for k, name in enumerate(("Dp", "fp", "Dax", "fa", "hw")):
            out[name] = np.interp(s, cs, np.array([c[k + 1] for c in ctrl]))
        w = 12.0
        out["w_pel"] = 1 - _smoothstep((s - s_pel + w) / (2 * w))
        out["w_head"] = _smoothstep((s - s_head + 4) / 8.0)
        out["w_brain"] = _smoothstep((s - s_head - 62.0 * sc) / 16.0)
        out["w_neck"] = _smoothstep((s - s_inlet + w) / (2 * w)) - out["w_head"]
        out["w_tho"] = _smoothstep((s - s_dia + w) / (2 * w)) - _smoothstep((s - s_inlet + w) / (2 * w))
        out["w_abd"] = 1 - out["w_pel"] - out["w_tho"] - out["w_neck"] - out["w_head"]
        out["cord_on"] = _smoothstep((s - (m["L1"] - rng.uniform(-12.0, 28.0) * sc)) / 14.0)
        out["sac_on"] = _smoothstep((s - m["S2"] + 6) / 12.0)
        out["flav_on"] = _smoothstep((s - m["S1"] - V["S1"].h / 2 + 4) / 8.0) * (1 - out["w_head"])
        out["cauda"] = out["sac_on"] * (1 - out["cord_on"])
        self.s_head = s_head
        return out

    # ------------------------------------------------------------------ textures
    def _textures(self):
        rng, sh = self.rng, (self.rows, self.cols)
        cell = 3.0 / self.sp
        self.F_marrow = (_smooth_field(rng, sh, cell), _smooth_field(rng, sh, cell))
        self.F_fine = _smooth_field(rng, sh, 1.2 / self.sp)
        csh = (self.crows, self.ccols)
        cs = self.sp * self.f
        self.F_visc = (_smooth_field(rng, csh, 9.0 / cs), _smooth_field(rng, csh, 9.0 / cs))
        self.F_cfine = _smooth_field(rng, csh, 2.0 / cs)
        self.F_bias = _smooth_field(rng, sh, 120.0 / self.sp)
        self.cauda_roots = [(rng.uniform(-0.85, 0.2), rng.uniform(-7, 7), rng.uniform(0.5, 0.9)) for _ in range(6)]

    def field(self, pair, k):
        th = 0.6 * k
        return math.cos(th) * pair[0] + math.sin(th) * pair[1]

    # ------------------------------------------------------------------ per-slice rendering
    def render(self) -> np.ndarray:
        vol = np.empty((self.n, self.rows, self.cols), np.float32)
        for k in range(self.n):
            vol[k] = self._render_slice(k)
        return vol

    def _render_slice(self, k: int) -> np.ndarray:
        x = self.xs[k]
        img = np.zeros((self.rows, self.cols), np.float32)
        cv = _Canvas(img, self.sp)
        self._fm = self.field(self.F_marrow, k)
        self._bulge_val = self.tis["annulus"] * 1.15
        marrow_tex = self.tis["marrow"] * (1.0 + 0.07 * self._fm + 0.04 * self.F_fine)
        self._soft_tissue(img, x, k)
        self._canal(img, x)
        self._foramina(cv, x)
        self._discs(cv, x, k)
        self._posterior(cv, x, marrow_tex)
        self._bodies(cv, x, marrow_tex)
        self._skull_base(cv, x, marrow_tex)
        return img

    # soft tissue ------------------------------------------------------
    def _soft_tissue(self, img, x, k):
        """Body outline, fat, muscle and viscera on the coarse grid, upsampled to the image."""
        A, D, tis = self.cA, self.cmap_db, self.tis
        sp = self.sp * self.f
        dx = x - A["xc"]
        hw = A["hw"]
        lat = np.sqrt(np.clip(1.0 - (dx / hw) ** 2, 0.05, 1.0))
        Dp = A["Dp"] * lat ** 0.4
        Da = (A["dfront_s"] + A["Dax"]) * lat
        fp, fa = A["fp"], A["fa"]
        body = np.clip(0.5 + (D + Dp) / sp, 0, 1) * np.clip(0.5 + (Da - D) / sp, 0, 1)
        fatw = np.clip(0.5 + (-Dp + fp - D) / sp, 0, 1) + np.clip(0.5 + (D - (Da - fa)) / sp, 0, 1)
        fatw = np.clip(fatw, 0, 1)
        tex = self.field(self.F_visc, k)
        val = tis["muscle"] * (1.0 + 0.05 * self.F_cfine) + (tis["fat"] - tis["muscle"]) * fatw
        wa, wp, wt, wn, wh = A["w_abd"], A["w_pel"], A["w_tho"], A["w_neck"], A["w_head"]
        adx = np.abs(dx)
        inner = np.clip(0.5 + (Da - fa - 12.0 * self.scale - D) / sp, 0, 1)
        rel = self.cmap_d - A["dfront_c"]  # distance in front of the vertebral bodies
        # abdomen / pelvis: bowel with gas, psoas laterally, thin retroperitoneal fat
        if (wa + wp).max() > 0:
            gas = np.clip((tex - 1.3) * 3.0, 0, 1)
            bowel = tis["viscera"] * (1.0 + 0.35 * self.field(self.F_visc, k + 3)) * (1 - gas)
            if self.contrast != "T1":
                bowel = bowel * 0.8 + 0.25 * np.clip(self.field(self.F_visc, k + 5) - 0.8, 0, 1)
            retro = np.clip(0.5 + (rel - 2.0) / sp, 0, 1) * inner
            ps = _smoothstep((adx - 12.0) / 10.0) * np.clip(0.5 + (28.0 - rel) / sp, 0, 1) * np.clip(0.5 + (rel + 30.0) / sp, 0, 1)
            fatband = 1 - _smoothstep((rel - 6.0) / 8.0)
            abd_val = bowel + (tis["fat"] * 0.9 - bowel) * fatband
            abd_val = abd_val + (tis["muscle"] - abd_val) * ps * (wa + 0.5 * wp)
            val = val + (abd_val - val) * (wa + wp) * np.maximum(retro, ps * (wa + 0.5 * wp))
        # thorax: lungs laterally, mediastinum in the midline
        if wt.max() > 0:
            lungw = _smoothstep((adx - 8.0) / 14.0)
            tho_in = np.clip(0.5 + (rel + 6.0 + 10.0 * lungw) / sp, 0, 1) * inner
            medi = tis["viscera"] * (0.8 + 0.3 * self.field(self.F_visc, k + 1))
            tho_val = medi + (tis["lung"] - medi) * lungw
            val = val + (tho_val - val) * wt * tho_in
        else:
            lungw = 0.0
        # neck (and upper thorax): prevertebral stripe then the airway in the midline
        if (wn + wt).max() > 0:
            air_lat = np.clip(1.0 - (dx / (9.0 * self.scale)) ** 2, 0, 1)
            airway = np.clip(0.5 + (rel - 6.0 * self.scale) / sp, 0, 1) * np.clip(0.5 + ((6 + 15 * np.sqrt(air_lat)) * self.scale - rel) / sp, 0, 1) * (air_lat > 0)
            val = val + (tis["air"] - val) * airway * (wn + 0.6 * wt * (1 - lungw))
        # head: brain behind the skull base, skull shell, nasopharynx/face in front
        if wh.max() > 0:
            wb = A["w_brain"]  # above the posterior fossa: brain inside the skull vault
            brain = np.clip(0.5 + (D + Dp - 11.0) / sp, 0, 1) * np.clip(0.5 - rel / sp, 0, 1) * wb
            skull = np.clip(0.5 + (D + Dp - 4.0) / sp, 0, 1) * (1 - brain) * wb
            bval = tis["brain"] * (1.0 + 0.06 * self.field(self.F_visc, k + 2))
            hv = val + (bval - val) * brain
            hv = hv + (tis["marrow"] * 0.9 - hv) * skull * 0.9
            face = np.clip(0.5 + (rel - 4.0) / sp, 0, 1) * inner
            hv = hv + (tis["viscera"] * (0.7 + 0.5 * tex) * np.clip(1.3 - tex, 0, 1) - hv) * face
            val = val + (hv - val) * wh
        # great vessels (flow voids): aorta left, IVC right, in front of the spine
        for xcen, r, wgt in ((11.0, 10.0, wa + wt), (-16.0, 11.0, wa)):
            if wgt.max() <= 0:
                continue
            half = np.sqrt(np.clip(r * r - (dx - xcen) ** 2, 0, None)) * self.scale
            ves = np.clip(0.5 + (half - np.abs(rel - 1.0 - r * self.scale)) / sp, 0, 1) * (half > 0)
            val = val + (tis["vessel"] - val) * ves * wgt
        skin = np.clip(0.5 + (D + Dp - 1.5) / sp, 0, 1) * np.clip(0.5 + (Da - 1.5 - D) / sp, 0, 1)
        val = tis["skin"] + (val - tis["skin"]) * skin
        coarse = (tis["air"] + (val - tis["air"]) * body).astype(np.float32)
        img[:] = self.up(coarse)

    # canal ------------------------------------------------------------
    def _canal(self, img, x):
        B, d, sp, tis = self.bA, self.band_d, self.sp, self.tis
        flat = img.reshape(-1)
        v = flat[self.band]
        dx = x - B["xc"]
        lat_c = B["lat_c"]
        lf = np.clip(1.0 - (dx / lat_c) ** 2, 0.0, 1.0)
        ca = B["ca"] * (0.55 + 0.45 * np.sqrt(lf))
        ad = np.abs(d)
        bony = np.clip(0.5 + (ca - ad) / sp, 0, 1) * (lf > 0) * B["no_head"]
        v += (tis["fat"] * 0.92 - v) * bony
        # dural sac (and the cisterns just above the foramen magnum)
        sf = np.sqrt(np.clip(1.0 - (dx / B["sac_lat"]) ** 2, 0.0, 1.0))
        mid = B["sac_mid"]
        half = B["sac_half"] * sf
        sac = np.clip(0.5 + (half - np.abs(d - mid)) / sp, 0, 1) * np.clip(2.0 * half / sp, 0, 1)
        v += (tis["csf"] - v) * sac
        # cord / conus, widening into the medulla above the foramen magnum
        cf = np.sqrt(np.clip(1.0 - (dx / B["cord_lat"]) ** 2, 0.0, 1.0))
        ch = B["cord_h"] * cf
        cord = np.clip(0.5 + (ch - np.abs(d - B["cord_mid"])) / sp, 0, 1) * np.clip(2.0 * ch / sp, 0, 1)
        v += (tis["cord"] - v) * cord
        # cauda equina roots (lie dependent, posteriorly, in supine subjects)
        cau = B["cauda"]
        if self.has_cauda:
            for frac, xr, rr in self.cauda_roots:
                cov = _coverage(x - xr, 0, 1.2 * rr, self.thk) * 1.6
                if cov <= 0:
                    continue
                dr = mid + frac * half
                root = np.clip(0.5 + (rr - np.abs(d - dr)) / sp, 0, 1) * cau * min(cov, 1.0) * (half > rr)
                v += (tis["nerve"] - v) * root * 0.8
        # ligamentum flavum (posterior canal wall) and disc bulge (anterior), both larger at
        # stenotic levels
        lat_f = np.abs(dx) < lat_c + 2.0
        fl = B["flav"]
        flav = (np.clip(0.5 + (-ca + fl - d) / sp, 0, 1) * np.clip(0.5 + (d + ca + 3.0) / sp, 0, 1)
                * np.clip(fl / sp, 0, 1) * lat_f)
        v += (tis["ligament"] - v) * flav
        bl = B["bulge"]
        bul = np.clip(0.5 + (d - (B["ca"] - bl)) / sp, 0, 1) * np.clip(bl / sp, 0, 1) * (lf > 0) * (d > 0)
        v += (self._bulge_val - v) * bul
        flat[self.band] = v

    def _stenosis_profiles(self):
        """Ligamentum flavum thickness and posterior disc bulge along the canal (mm).

        Central canal stenosis narrows the thecal sac at the disc level like an hourglass:
        the disc bulges into the canal from the front and the flavum thickens from behind.
        """
        s = self.cl_S
        flav = np.full_like(s, 1.2 * self.scale)
        bulge = np.zeros_like(s)
        for d in self.discs:
            sd = self.s_disc[d]
            f = self.findings[d]
            g = self.grades[d]["CentralCanalStenosis"]
            dh = sum(self.params["disc_h"][d]) / 2
            thick = (f["flav"] + _CCS_FLAV[g]) * self.scale
            flav = np.maximum(flav, thick * np.exp(-0.5 * ((s - sd + 2.0) / 6.0) ** 2))
            amp = (0.6 * f["bulge"] + _CCS_BULGE[g]) * self.scale
            sig = 0.5 * dh + 2.5 + 0.35 * _CCS_BULGE[g]
            bulge = np.maximum(bulge, amp * np.exp(-0.5 * ((s - sd) / sig) ** 2))
        return flav, bulge

    # discs ------------------------------------------------------------
    def _disc_quad(self, dname, dx):
        up, lo = dname.split("-")
        Cu = self.V[up].corners(dx - self.V[up].xc)
        Cl = self.V[lo].corners(dx - self.V[lo].xc)
        if Cu is None or Cl is None:
            return None
        return Cl[0], Cl[1], Cu[2], Cu[3]  # SA_L, SP_L, IP_U, IA_U

    def _discs(self, cv, x, k):
        tis = self.tis
        for dname in self.discs:
            up, lo = dname.split("-")
            if up not in self.near or lo not in self.near:
                continue
            q = self._disc_quad(dname, x)
            if q is None:
                continue
            sa, spp, ip, ia = q
            g = self.grades[dname]
            f = self.findings[dname]
            pf = g["Pfirrmann"]
            ov = 1.5 + 1.5 * self.scale
            bp = f["bulge"] * self.scale
            ba = 1.0 + 0.5 * max(pf - 2, 0)
            side = "ForaminalStenosisLeft" if x > 0 else "ForaminalStenosisRight"
            lo_v = self.V[dname.split("-")[1]]
            if g[side] and abs(x - lo_v.xc) > lo_v.a["ipd"] / 2 - 3:
                bp += 3.0 * self.scale
            got = cv.patch([sa, spp, ip, ia], max(bp, ba) + ov + 3 * cv.sp + 8.0)
            if got is None:
                continue
            sl, py, px = got
            eA, _, _, eN = _edges(np.array([sa, spp, ip, ia]))  # lower, posterior, upper, anterior
            Ed = _edge_dists(py, px, eA, eN)
            dl, dpo, du, dan = -Ed[0], -Ed[1], -Ed[2], -Ed[3]
            hh = np.maximum(dl + du, 0.3)
            t = dl / hh
            a = dpo / np.maximum(dan + dpo, 0.3)
            prof = np.sqrt(np.clip(1.0 - ((t - 0.5) / 0.5) ** 2, 0.0, 1.0))
            e = np.maximum(np.maximum(-dl - ov, -du - ov), np.maximum(-dan - ba * prof, -dpo - bp * prof))
            alpha = np.clip(0.5 - e / cv.sp, 0.0, 1.0)
            if not alpha.any():
                continue
            ann = tis["annulus"]
            nuc = ann + (tis["nucleus"] - ann) * _PF_K[pf]
            if self.contrast == "T1":
                nuc = tis["nucleus"] - 0.025 * (pf - 1)
                ann = ann - 0.015 * (pf - 1)
            ra, rt = _PF_SIZE[pf]
            ell = ((a - 0.45) / ra) ** 2 + ((t - 0.5) / rt) ** 2
            nf = _smoothstep((1.0 - ell) / _PF_SOFT[pf] + 0.5)
            cl = _PF_CLEFT[pf] * np.exp(-0.5 * ((t - 0.5) / 0.06) ** 2)
            het = _PF_HET[pf] * (self.F_fine[sl] + math.cos(f["het_phase"]) * self._fm[sl])
            val = ann * (1 + 0.15 * (1 - np.abs(2 * a - 1))) + (nuc - ann) * nf * (1 - cl) * (1 + 3 * het)
            if f["vacuum"]:
                vac = np.exp(-0.5 * ((t - 0.5) / 0.1) ** 2) * np.exp(-0.5 * ((a - 0.55) / 0.15) ** 2)
                val = val * (1 - 0.85 * vac)
            cv.blend(sl, alpha, val)
            # herniation: focal posterior protrusion of disc material
            if g["Herniation"]:
                cov = _coverage(x - f["hern_x"], 0, 7.0 * self.scale, self.thk) * 1.5
                if cov > 0:
                    pm = (spp + ip) / 2 + (ip - spp) * f["hern_shift"]
                    epost = eN[1]
                    hs, hl = f["hern_size"]
                    hs, hl = hs * self.scale, hl * self.scale
                    c = pm + epost * (bp + hs * 0.45)
                    hval = ann + 0.55 * (tis["nucleus"] - ann) if self.contrast != "T1" else tis["annulus"] + 0.03
                    _paint_ellipse(cv, c, epost, hs * 0.75 + bp * 0.5, hl / 2, hval, min(cov, 1.0))

    # foramina -----------------------------------------------------------
    def _foramina(self, cv, x):
        tis = self.tis
        for dname in self.discs:
            up, lo = dname.split("-")
            U, L = self.V[up], self.V[lo]
            if U.a["region"] == "S" or up not in self.near or lo not in self.near:
                continue
            dx = x - L.xc
            lo_x, hi_x = U.a["ipd"] / 2 - 1.0, U.a["ipd"] / 2 + U.a["pw"] + 3.0
            cov = _coverage(dx, lo_x, hi_x, self.thk)
            if cov <= 0:
                continue
            g = self.grades[dname]
            sten = g["ForaminalStenosisLeft" if dx > 0 else "ForaminalStenosisRight"]
            ca = U.a["canal"]
            top = U.pt(U.h / 2 - U.a["ph"] - 1.0, -U.w / 2 - ca * 0.45)
            bottom = L.pt(L.h / 2 - 1.0, -L.w / 2 - ca * 0.45)
            c = (top + bottom) / 2
            e1 = top - bottom
            hgt = np.hypot(*e1) / 2 + 2.0
            e1 = e1 / (np.hypot(*e1) + 1e-9)
            rap = ca * 0.42
            _paint_ellipse(cv, c, e1, hgt, rap, tis["fat"] * 0.95, cov)
            if sten:
                _paint_ellipse(cv, c, e1, hgt * 0.95, rap * 0.95, tis["ligament"] * 1.5 + 0.02, cov)
                _paint_ellipse(cv, c + e1 * hgt * 0.45, e1, hgt * 0.3, rap * 0.4, tis["fat"] * 0.8, cov)
                _paint_ellipse(cv, c + e1 * hgt * 0.5, e1, 2.0 * self.scale, 1.3 * self.scale, tis["nerve"], cov)
            else:
                _paint_ellipse(cv, c + e1 * hgt * 0.45, e1, 3.0 * self.scale, 2.6 * self.scale, tis["nerve"], cov)

    # posterior elements ---------------------------------------------------
    def _posterior(self, cv, x, marrow):
        tis, sc = self.tis, self.scale
        cortex = tis["cortex"]
        for i, lvl in enumerate(_CHAIN):
            if lvl not in self.near:
                continue
            v = self.V[lvl]
            a = v.a
            dx = x - v.xc
            reg = a["region"]
            ca, w, h = a["canal"], v.w, v.h
            vc = -w / 2 - ca
            below = _CHAIN[i - 1] if i > 0 else None
            above = _CHAIN[i + 1] if i + 1 < len(_CHAIN) else None
            dbel = self._disc_h(above=lvl, below=below)
            dab = self._disc_h(above=above, below=lvl)
            if reg == "S":
                # dorsal sacral plate (median crest) behind the sacral canal, wide laterally
                cov = _coverage(dx, 0, 0.55 * v.W + 6, self.thk)
                th = 0.3 * v.w + 2
                C = _box_corners(v.c, v.t, v.n, -h / 2 - 1.2, h / 2 + 1.2, vc - th, vc)
                _paint_bone(cv, C, 2.0, marrow, cortex, 1.2, cov)
                if lvl == "S1":
                    # superior articular processes of S1 (facets with L5)
                    cov = _coverage(dx, 10 * sc, 26 * sc, self.thk)
                    if cov > 0:
                        self._pillar(cv, v, vc + 2.0, 12.0 * sc, dab, None, marrow, cov)
                continue
            ipd, pw, ph = a["ipd"], a["pw"], a["ph"]
            # pedicle
            cov = _coverage(dx, ipd / 2, ipd / 2 + pw, self.thk)
            if cov > 0:
                C = _box_corners(v.c, v.t, v.n, h / 2 - ph - 1.0, h / 2 - 1.0, vc + 1.0, -w / 2 + 4.0)
                _paint_bone(cv, C, 2.5, marrow, cortex, 1.0, cov)
            # articular pillar: parallelogram between oblique facet joints (with the disc
            # levels above and below); the joint space holds a thin film of fluid
            cov = _coverage(dx, ipd / 2 - 3.0, ipd / 2 + pw + (6.0 if reg != "C" else 10.0), self.thk)
            if cov > 0:
                self._pillar(cv, v, vc, ca, dab, dbel, marrow, cov)
            # transverse process (lumbar/thoracic) further out
            if reg in ("L", "T"):
                cov = _coverage(dx, ipd / 2 + pw + 2.0, ipd / 2 + pw + (22.0 if reg == "L" else 18.0), self.thk)
                if cov > 0:
                    c = v.pt(h / 2 - ph / 2 - 1.0, vc - (2.0 if reg == "L" else 5.0 + 0.3 * (abs(dx) - ipd / 2 - pw)))
                    _paint_ring_bone(cv, c, v.t, 4.5 * sc, 4.0 * sc, marrow, cortex, 1.2, cov)
            # lamina
            cov = _coverage(dx, 0, ipd / 2 + 2.0, self.thk)
            if cov > 0:
                lt = 0.45 * ca if reg != "C" else 0.35 * ca
                u0, u1 = -h / 2 - 0.4 * dbel, h / 2 - 0.3 * h
                C = np.array([v.pt(u1, vc), v.pt(u1, vc - lt), v.pt(u0, vc - lt - 1.5), v.pt(u0, vc - 1.0)])
                _paint_bone(cv, C, 2.0, marrow, cortex, 1.0, cov)
            # spinous process
            half = (3.5 if reg == "L" else 3.0) * sc * (2.0 if lvl == "C2" else 1.0)
            cov = _coverage(dx, 0, half, self.thk)
            if cov > 0 and a["sp_len"] > 0:
                ang = a["sp_ang"]
                dirv = -v.n * math.cos(ang) - v.t * math.sin(ang)
                perp = np.array([-dirv[1], dirv[0]])
                o = v.pt(-0.15 * h, vc - 0.2 * ca)
                L, H = a["sp_len"], a["sp_h"]
                C = np.array([o + perp * H / 2, o + dirv * L + perp * H * 0.35,
                              o + dirv * L - perp * H * 0.35, o - perp * H / 2])
                _paint_bone(cv, C, min(3.0, H * 0.3), marrow, cortex, 1.2, cov)
            # ribs (thoracic): head at the costovertebral joint, then neck and shaft
            if reg == "T":
                self._rib(cv, v, lvl, dx, dab, marrow)

    def _pillar(self, cv, v, vc, ca, dab, dbel, marrow, cov):
        """Articular pillar of v; dbel None = no joint below (sacrum)."""
        reg = v.a["region"]
        pd_ = (0.85 * ca) if reg != "C" else 0.9 * ca
        va, vp = vc + 3.0, vc - pd_
        slant = math.radians(50.0 if reg != "C" else 40.0)
        k = (va - vp) / 2 * math.tan(slant)
        g = 0.7
        uj = v.h / 2 + 0.5 * dab + 0.12 * v.h
        ujb = (-v.h / 2 - 0.5 * dbel + 0.12 * v.h) if dbel is not None else -v.h / 2 + 2.0
        kb = k if dbel is not None else 0.0
        C = np.array([v.pt(uj + k - g, va), v.pt(uj - k - g, vp), v.pt(ujb - kb + g, vp), v.pt(ujb + kb + g, va)])
        tis = self.tis
        _paint_bone(cv, C, 2.0, marrow, tis["cortex"], 1.0, cov)

    def _rib(self, cv, v, lvl, dx, dab, marrow):
        sc, cortex = self.scale, self.tis["cortex"]
        ax = abs(dx)
        xh = v.W / 2 - 3.0
        if ax < xh - 2.0 or ax > xh + 50.0:
            return
        num = int(lvl[1:])
        u_h = v.h / 2 + dab / 2 if 2 <= num <= 9 else v.h / 2 - 5.0
        v_h = -v.w / 2 + 4.0
        v_tp = -v.w / 2 - v.a["canal"] - 3.0
        f = np.clip((ax - xh) / 22.0, 0.0, 1.0)
        vv = v_h + (v_tp - v_h) * f - max(ax - xh - 22.0, 0.0) * 0.15
        uu = u_h - 0.25 * max(ax - xh, 0.0)
        c = v.pt(uu, vv)
        r1 = (6.0 - 1.0 * f) * sc
        r2 = (5.0 - 1.0 * f) * sc
        cov = min(1.0, max(0.0, (ax - xh + 2.0) / 2.0))
        _paint_ring_bone(cv, c, v.t, r1, r2, marrow, cortex, 1.3, cov)

    def _disc_h(self, above, below):
        if above is None or below is None:
            return 3.0 * self.scale
        name = disc_name(above, below)
        if name in self.params["disc_h"]:
            return sum(self.params["disc_h"][name]) / 2
        return self.params["sacral_gap"]

    # vertebral bodies -------------------------------------------------------
    def _bodies(self, cv, x, marrow):
        tis, sc = self.tis, self.scale
        for i, lvl in enumerate(_CHAIN):
            if lvl not in self.near or lvl in _SACRAL:  # S2-S5 are drawn with S1, as one bone
                continue
            v = self.V[lvl]
            dx = x - v.xc
            C = v.corners(dx)
            if lvl == "S1":
                self._ala(cv, dx, marrow)
            if C is None:
                continue
            up_d = disc_name(_CHAIN[i + 1], lvl) if i + 1 < len(_CHAIN) and lvl != "C2" else None
            lo_d = disc_name(lvl, _CHAIN[i - 1]) if lvl != "S1" else None
            sacrum = self._sacral_pieces(x) if lvl == "S1" else []
            got = cv.patch(np.concatenate([C] + [q for q, _ in sacrum]), 3.0 + 2 * cv.sp)
            if got is None:
                continue
            sl, py, px = got
            eA, eD, eL, eN = _edges(C)
            edges = list(zip(eA, eD, eL, eN))
            E = _edge_dists(py, px, eA, eN)
            reg = v.a["region"]
            conc = {"L": 1.6, "T": 1.0, "C": 0.6, "S": 0.4}[reg] * sc
            for j in (0, 2):  # superior, inferior endplate concavity
                A, d, L, nrm = edges[j]
                tpar = _edge_param(py, px, A, d, L)
                E[j] = E[j] + conc * 4 * tpar * (1 - tpar)
            A, d, L, nrm = edges[3]
            tpar = _edge_param(py, px, A, d, L)
            E[3] = E[3] + 0.8 * sc * 4 * tpar * (1 - tpar)
            # endplate defects: notch into the body from the endplate next to the disc
            notches = []
            for dname, j, key, idx in ((up_d, 0, "LowerEndplateDefect", 1), (lo_d, 2, "UpperEndplateDefect", 0)):
                if dname is None or dname not in self.grades or not self.grades[dname][key]:
                    continue
                f = self.findings[dname]
                if abs(dx - f["notch_x"][idx]) > 7.0 * sc:
                    continue
                A, d, L, nrm = edges[j]
                pos = 0.5 + (f["notch_pos"][idx] if j == 0 else -f["notch_pos"][idx])
                cen = A + d * L * pos
                aw, ad = f["notch_size"][2 * idx] * sc, f["notch_size"][2 * idx + 1] * sc
                lat = math.sqrt(max(0.0, 1 - ((dx - f["notch_x"][idx]) / (7.0 * sc)) ** 2))
                ad = ad * lat + conc
                along = (py - cen[0]) * d[0] + (px - cen[1]) * d[1]
                inw = -((py - cen[0]) * nrm[0] + (px - cen[1]) * nrm[1])
                qn = np.sqrt((along / aw) ** 2 + (inw / ad) ** 2)
                notches.append((1.0 - qn) * min(aw, ad))
            sdf = _rounded_sdf(np.concatenate([E, np.stack(notches)]) if notches else E, 1.8 * sc if reg != "C" else 1.2 * sc)
            for q, r in sacrum:  # union: one marrow space inside one outer cortex
                qA, _, _, qN = _edges(q)
                sdf = np.minimum(sdf, _rounded_sdf(_edge_dists(py, px, qA, qN), r))
            alpha = np.clip(0.5 - sdf / cv.sp, 0.0, 1.0)
            if not alpha.any():
                continue
            ct = (1.1 if reg != "C" else 0.9) * sc
            inner = np.clip(0.5 + (-sdf - ct) / cv.sp, 0.0, 1.0)
            m = marrow[sl] * self.vmarrow[lvl]
            # Modic-like marrow change bands next to the endplates
            for dname, j, key in ((up_d, 0, "LowerMarrow"), (lo_d, 2, "UpperMarrow")):
                if dname is None or dname not in self.grades or not self.grades[dname][key]:
                    continue
                f = self.findings[dname]
                depth = f["modic_depth"] * v.h * (1 + 0.2 * self._fm[sl])
                A, d, L, nrm = edges[j]
                tpar = _edge_param(py, px, A, d, L)
                a0, a1 = f["modic_ap"]
                apos = 2 * tpar - 1 if j == 0 else 1 - 2 * tpar
                apw = _smoothstep((apos - a0) / 0.15) * _smoothstep((a1 - apos) / 0.15)
                band = np.clip(0.5 + (depth + E[j]) / 2.0, 0, 1) * apw
                mv = _MODIC[self.contrast][f["modic_type"]]
                m = m + (mv * (1 + 0.08 * self.F_fine[sl]) - m) * band
            if lvl in self.haem:
                hu, hv, hr, hx = self.haem[lvl]
                lat = max(0.0, 1 - ((dx - hx) / (hr * 1.5)) ** 2)
                if lat > 0:
                    c = v.pt(hu * v.h, hv * v.w)
                    q = np.hypot(py - c[0], px - c[1]) / (hr * math.sqrt(lat))
                    hval = {"T1": 0.9, "T2": 0.8, "STIR": 0.45}[self.contrast]
                    m = m + (hval - m) * np.clip(1.5 - q, 0, 1)
            val = tis["cortex"] + (m - tis["cortex"]) * inner
            if notches:
                nm = np.clip(0.5 + np.max(np.stack(notches), axis=0) / cv.sp, 0, 1)
                inside_box = np.clip(0.5 - _rounded_sdf(E, 1.8 * sc) / cv.sp, 0, 1)
                nm = nm * inside_box
                alpha = np.maximum(alpha, nm)
                val = val + (tis["notch"] - val) * nm
            # basivertebral vein: small notch in the posterior cortex at mid-height
            if abs(dx) < 2.5 * sc and reg in ("L", "T"):
                c = (C[1] + C[2]) / 2
                q = np.hypot(py - c[0], px - c[1]) / (2.2 * sc)
                bv = np.clip(1.2 - q, 0, 1)
                val = val + (tis["fat"] * 0.7 - val) * bv
            if sacrum and self.sacral_remnants:
                val = self._sacral_remnants(val, inner, [C] + [q for q, _ in sacrum[1::2]], py, px, m)
            cv.blend(sl, alpha, val)
            if lvl == "C2":
                self._dens(cv, v, dx, marrow)

    def _sacral_pieces(self, x):
        """(corners, corner radius) of S2..S5 and of the bridges that fuse each to the one above.

        A real sacrum is one bone below the L5-S1 disc: the segments share marrow and only the
        outer surface has a cortex, so S1 is the top of a long bone, not a body with another body
        (and a disc) below it, which is what an L5 looks like.
        """
        sc, pieces = self.scale, []
        upper = self.V["S1"]
        Cu = upper.corners(x - upper.xc)
        for lvl in ("S2", "S3", "S4", "S5"):
            low = self.V[lvl]
            Cl = low.corners(x - low.xc) if lvl in self.near else None
            if Cu is None or Cl is None:
                break
            into = 3.0 * sc  # the bridge reaches into both segments, past their rounded corners
            bridge = np.array([Cu[3] + upper.t * into, Cu[2] + upper.t * into,
                               Cl[1] - low.t * into, Cl[0] - low.t * into])
            pieces += [(bridge, 0.6 * sc), (Cl, 1.8 * sc)]
            upper, Cu = low, Cl
        return pieces

    def _sacral_remnants(self, val, inner, segments, py, px, marrow):
        """Thin lines of residual disc at the junctions of the fused segments (corners, S1 first),
        inside the marrow: short of the outer cortex, thinner and shorter further down."""
        r = self.sacral_remnants
        tis = self.tis
        target = (0.5 * tis["cortex"] + 0.5 * marrow) if r["kind"] == "dark" else (0.5 * tis["nucleus"] + 0.5 * marrow)
        for k, (upper, lower) in enumerate(zip(segments[:-1], segments[1:])):
            if k > r["lower"]:
                break
            shrink = 0.8 ** k
            centre = (upper[2] + upper[3] + lower[0] + lower[1]) / 4.0
            ap = (upper[3] - upper[2]) + (lower[0] - lower[1])
            ap = ap / (np.hypot(*ap) + 1e-9)
            along = (py - centre[0]) * ap[0] + (px - centre[1]) * ap[1]
            across = -(py - centre[0]) * ap[1] + (px - centre[1]) * ap[0]
            half_span = 0.5 * r["span"] * shrink * np.hypot(*(upper[3] - upper[2]))
            band = np.clip(0.5 + (r["thick"] * shrink / 2 - np.abs(across)) / self.sp, 0, 1)
            band = band * _smoothstep((half_span - np.abs(along)) / 1.5) * inner
            val = val + (target - val) * band
        return val

    def _ala(self, cv, dx, marrow):
        """Sacral ala / lateral sacral mass seen on parasagittal slices beyond the S1 body."""
        S1, S3 = self.V["S1"], self.V["S3"]
        ax = abs(dx)
        lo, hi = 0.4 * S1.W, 1.15 * S1.W
        if ax < lo or ax > hi:
            return
        f = (ax - lo) / (hi - lo)
        drop = (4.0 + 10.0 * f) * self.scale
        C = np.array([
            S1.pt(S1.h / 2 - drop, S1.w / 2 - 4.0 - 6.0 * f),
            S1.pt(S1.h / 2 - drop + 2.0, -S1.w / 2 - S1.a["canal"] - 6.0),
            S3.pt(-S3.h / 2, -S3.w / 2 - S3.a["canal"] - 4.0),
            S3.pt(-S3.h / 2, S3.w / 2 - 3.0),
        ])
        cov = min(1.0, (hi - ax) / 4.0)
        _paint_bone(cv, C, 5.0 * self.scale, marrow, self.tis["cortex"], 1.5, cov)

    def _dens(self, cv, v, dx, marrow):
        sc = self.scale
        cov = _coverage(dx, 0, 5.5 * sc, self.thk)
        if cov <= 0:
            return
        dh = 15.0 * sc
        C = _box_corners(v.c, v.t, v.n, v.h / 2 - 2.0, v.h / 2 + dh, -v.w / 2 + 2.0 * sc, -v.w / 2 + 12.0 * sc)
        _paint_bone(cv, C, 4.0 * sc, marrow, self.tis["cortex"], 1.0, cov)
        # the dens is fused to the body (no cortex or endplate between them in an adult): marrow
        # runs through the junction, so the dens does not look like a separate small vertebra
        ct = 1.0
        J = _box_corners(v.c, v.t, v.n, v.h / 2 - 4.0, v.h / 2 + 3.0, -v.w / 2 + 2.0 * sc + ct,
                         -v.w / 2 + 12.0 * sc - ct)
        got = cv.patch(J, 1.0 + 2 * cv.sp + 1.0)
        if got is not None:
            sl, py, px = got
            A, _, _, nrm = _edges(J)
            inside = np.clip(0.5 - _rounded_sdf(_edge_dists(py, px, A, nrm), 1.0) / cv.sp, 0.0, 1.0) * cov
            cv.blend(sl, inside, marrow if np.isscalar(marrow) else marrow[sl])

    def _skull_base(self, cv, x, marrow):
        """C1 arches / lateral masses, clivus and occipital bone above C2."""
        if "C2" not in self.near:
            return
        v = self.V["C2"]
        sc, cortex = self.scale, self.tis["cortex"]
        dx = x - v.xc
        top = v.h / 2 + 15.0 * sc
        ca = v.a["canal"]
        # C1 anterior arch and posterior arch
        cov = _coverage(dx, 0, 9.0 * sc, self.thk)
        _paint_ring_bone(cv, v.pt(top - 7.0 * sc, -v.w / 2 + 12.0 * sc + 6.0 * sc), v.t, 5.5 * sc, 3.8 * sc, marrow, cortex, 1.0, cov)
        cov = _coverage(dx, 0, 14.0 * sc, self.thk)
        _paint_ring_bone(cv, v.pt(top - 9.0 * sc, -v.w / 2 - ca - 5.0 * sc), v.t, 4.5 * sc, 5.5 * sc, marrow, cortex, 1.0, cov)
        # C1 lateral masses
        cov = _coverage(dx, 9.0 * sc, 24.0 * sc, self.thk)
        if cov > 0:
            C = _box_corners(v.c, v.t, v.n, v.h / 2 + 1.0, v.h / 2 + 15.0 * sc, -v.w / 2 - 3.0, v.w / 2 - 1.0)
            _paint_bone(cv, C, 3.0, marrow, cortex, 1.2, cov)
        # clivus: from the basion up and anteriorly
        cov = _coverage(dx, 0, 16.0 * sc, self.thk)
        if cov > 0:
            o = v.pt(top + 5.0 * sc, -v.w / 2 + 6.0 * sc)
            ang = math.radians(62.0)
            dirv = v.t * math.cos(ang) + v.n * math.sin(ang)
            perp = np.array([-dirv[1], dirv[0]])
            C = np.array([o - perp * 5 * sc, o + dirv * 45 * sc - perp * 6 * sc, o + dirv * 45 * sc + perp * 7 * sc, o + perp * 5 * sc])
            _paint_bone(cv, C, 3.0, marrow, cortex, 1.2, cov)
        # posterior fossa: cerebellum inside a curved occipital shell that starts at the
        # opisthion (posterior rim of the foramen magnum)
        O = v.pt(top + 9.0 * sc, -v.w / 2 - ca - 2.0 * sc)
        rho, th = 38.0 * sc, 6.0 * sc
        C = O + v.t * (0.9 * rho) + v.n * (0.4359 * rho)
        got = cv.patch([C], rho + th + 3.0)
        if got is None:
            return
        sl, py, px = got
        qy, qx = py - C[0], px - C[1]
        r = np.sqrt(qy * qy + qx * qx)
        ang = np.arctan2(qy * v.n[0] + qx * v.n[1], qy * v.t[0] + qx * v.t[1])
        # cerebellum: inside the circle, behind the medulla (canal centre at v = vcan)
        vcan = -v.w / 2 - ca / 2
        v_of = (qy * v.n[0] + qx * v.n[1]) + (C - v.c) @ v.n  # v coordinate in the C2 frame
        behind = np.clip(0.5 + ((vcan - 10.0 * sc) - v_of) / cv.sp, 0, 1)
        cer = np.clip(0.5 + (rho - r) / cv.sp, 0, 1) * behind
        folia = np.sin(r * (2 * np.pi / (3.5 * sc)) + 2.0 * self.F_fine[sl])
        bval = self.tis["brain"] * (1.0 + 0.05 * folia + 0.04 * self._fm[sl])
        cv.blend(sl, cer, bval)
        a0, a1 = math.radians(-154.0), math.radians(25.0)
        ring = np.abs(r - (rho + th / 2)) - th / 2
        excess = np.maximum(np.maximum(a0 - ang, ang - a1), 0.0) * r
        sdf = np.maximum(ring, excess)
        alpha = np.clip(0.5 - sdf / cv.sp, 0, 1)
        inner = np.clip(0.5 + (-sdf - 1.3) / cv.sp, 0, 1)
        m = marrow[sl] * 1.05
        cv.blend(sl, alpha, cortex + (m - cortex) * inner)

    # ------------------------------------------------------------------ final image formation
    def finish(self, vol: np.ndarray) -> np.ndarray:
        """Partial-volume blur, receive-coil bias, 12-bit scaling and Rician-like noise (in place)."""
        rng = self.rng
        sig = rng.uniform(0.45, 0.75)
        w1 = math.exp(-0.5 / (sig * sig))
        c0, c1 = np.float32(1.0 / (1.0 + 2.0 * w1)), np.float32(w1 / (1.0 + 2.0 * w1))
        # receive-coil bias: posterior (table) coil, smooth random modulation
        Lc = rng.uniform(90.0, 160.0)
        post = self.cols * self.sp
        bias = (0.45 + 0.55 * np.exp(-(post - self.X) / Lc)) * np.exp(0.12 * self.F_bias)
        bias = bias / np.percentile(bias, 95)
        gain = rng.uniform(1500.0, 2600.0)
        sigma = gain * rng.uniform(0.012, 0.03) * (1.3 if self.contrast == "STIR" else 1.0)
        scale = (bias * gain).astype(np.float32)
        # logistic noise with unit variance (close to Gaussian, cheaper to draw); the
        # quadrature channel reuses the draws mirrored in-plane (independent per pixel)
        u = rng.random(vol.shape, dtype=np.float32)
        np.clip(u, 1e-6, 1.0 - 1e-6, out=u)
        ns = np.float32(0.5513 * sigma)
        tmp = np.empty(vol.shape[1:], np.float32)
        for k in range(vol.shape[0]):
            img = vol[k]
            # separable 3-tap blur (edge pixels reflect)
            np.multiply(img, c0, out=tmp)
            tmp[1:] += c1 * img[:-1]
            tmp[:-1] += c1 * img[1:]
            tmp[0] += c1 * img[0]
            tmp[-1] += c1 * img[-1]
            np.multiply(tmp, c0, out=img)
            img[:, 1:] += c1 * tmp[:, :-1]
            img[:, :-1] += c1 * tmp[:, 1:]
            img[:, 0] += c1 * tmp[:, 0]
            img[:, -1] += c1 * tmp[:, -1]
            img *= scale
            img *= np.float32(1.0 - 0.004 * abs(self.xs[k]))
            uk = u[k]
            n1 = np.log(uk / (1.0 - uk))
            n1 *= ns
            img += n1
            img *= img
            n1 *= n1  # quadrature power: the mirrored squared draws
            img += n1[::-1, ::-1]
            np.sqrt(img, out=img)
        np.minimum(vol, np.float32(4095.0), out=vol)
        return vol

    # ------------------------------------------------------------------ truth
    def truth(self):
        sp = self.sp
        rows, cols = self.rows, self.cols
        x0 = self.xs[0]

        def inside(C):
            px = C / sp
            return bool(np.all(px[:, 0] >= 0) and np.all(px[:, 0] <= rows - 1) and np.all(px[:, 1] >= 0) and np.all(px[:, 1] <= cols - 1))

        def overlaps(C):
            # sample the quadrilateral interior (bilinear grid) and test for any point inside
            u = np.linspace(0, 1, 7)
            a, b = np.meshgrid(u, u)
            P = ((1 - a) * (1 - b))[..., None] * C[0] + (a * (1 - b))[..., None] * C[1] + (a * b)[..., None] * C[2] + ((1 - a) * b)[..., None] * C[3]
            P = P.reshape(-1, 2) / sp
            return bool(np.any((P[:, 0] >= 0) & (P[:, 0] <= rows - 1) & (P[:, 1] >= 0) & (P[:, 1] <= cols - 1)))

        verts, present = [], {}
        for lvl in LEVELS:
            v = self.V[lvl]
            C0 = v.corners(0.0)
            if not overlaps(C0):
                continue
            polys = {}
            for k, x in enumerate(self.xs):
                C = v.corners(x - v.xc)
                if C is not None:
                    polys[k] = (C / sp).astype(np.float64)
            if not polys:
                continue
            part = not inside(C0)
            cen = ((v.xc - x0) / self.thk, float(v.c[0] / sp), float(v.c[1] / sp))
            verts.append(SyntheticVertebra(lvl, polys, cen, part))
            present[lvl] = part
        discs = []
        for i in range(1, len(LEVELS)):
            up, lo = LEVELS[i], LEVELS[i - 1]
            if up not in present or lo not in present:
                continue
            name = disc_name(up, lo)
            U, L = self.V[up], self.V[lo]
            Cu, Cl = U.corners(0.0), L.corners(0.0)
            Q = np.array([Cl[0], Cl[1], Cu[2], Cu[3]])
            cen = Q.mean(0)
            xc = (U.xc + L.xc) / 2
            part = present[up] or present[lo] or not inside(Q)
            f = self.findings[name]
            g = self.grades[name]
            fnd = {"modic_type": f["modic_type"] if (g["UpperMarrow"] or g["LowerMarrow"]) else 0,
                   "slip_mm": float(self.params["slip"].get(name, 0.0)),
                   "height_ant_mm": float(self.params["disc_h"][name][0]),
                   "height_post_mm": float(self.params["disc_h"][name][1]),
                   "degeneration": float(self.degen[name])}
            discs.append(SyntheticDisc(name, up, lo, dict(g), ((xc - x0) / self.thk, float(cen[0] / sp), float(cen[1] / sp)), part, fnd))
        return verts, discs
