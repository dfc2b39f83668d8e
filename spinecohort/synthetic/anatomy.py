"""Anatomy: adult dimension tables, per-subject parameters and the S5..C2 chain of
vertebral bodies in the mid-sagittal plane (mm)."""
from __future__ import annotations

import math

import numpy as np

from ..tasks import LEVELS, disc_name


# --------------------------------------------------------------------------- anatomy tables
# Adult dimensions in mm.  h: body height at mid-depth, w: antero-posterior depth,
# W: left-right width, wedge: anterior minus posterior height, canal: bony canal AP
# (posterior wall to lamina), ipd: interpedicular distance, pw/ph: pedicle width/height,
# sp: spinous process (length, height, downward angle in degrees).
_VERT = {
    #        h     w     W   wedge canal  ipd   pw    ph   spL  spH  spA
    "S5": (10.0, 13.0, 20.0, -2.0, 5.0, 12.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "S4": (13.0, 18.0, 26.0, -3.0, 6.0, 16.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "S3": (17.0, 24.0, 32.0, -4.0, 8.0, 20.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "S2": (21.0, 31.0, 38.0, -5.0, 11.0, 24.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "S1": (28.0, 38.0, 46.0, -3.0, 15.0, 30.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "L5": (27.0, 35.0, 50.0, 3.5, 18.0, 27.0, 13.0, 13.0, 24.0, 15.0, 5.0),
    "L4": (27.5, 35.0, 48.0, 1.5, 18.0, 25.0, 11.0, 14.0, 29.0, 19.0, 8.0),
    "L3": (27.5, 34.0, 46.0, 0.0, 18.0, 24.0, 10.0, 14.0, 31.0, 20.0, 8.0),
    "L2": (27.0, 33.0, 44.0, -0.5, 18.0, 23.0, 9.0, 14.0, 31.0, 20.0, 10.0),
    "L1": (26.0, 32.0, 42.0, -1.5, 18.0, 22.0, 8.0, 14.0, 30.0, 19.0, 14.0),
    "T12": (24.0, 30.0, 39.0, -1.5, 17.0, 21.0, 8.0, 13.0, 30.0, 14.0, 22.0),
    "T11": (23.0, 28.5, 37.0, -1.5, 16.0, 19.0, 7.5, 12.0, 32.0, 11.0, 32.0),
    "T10": (22.0, 27.0, 34.0, -1.6, 15.5, 18.0, 7.0, 12.0, 35.0, 9.0, 42.0),
    "T9": (21.0, 26.0, 32.0, -1.6, 15.0, 17.5, 6.5, 11.5, 38.0, 8.0, 50.0),
    "T8": (20.5, 25.0, 30.0, -1.6, 15.0, 17.0, 6.0, 11.0, 40.0, 8.0, 55.0),
    "T7": (20.0, 24.0, 29.0, -1.6, 15.0, 17.0, 5.5, 11.0, 40.0, 8.0, 55.0),
    "T6": (19.5, 23.0, 28.0, -1.6, 15.0, 17.0, 5.0, 10.5, 40.0, 8.0, 55.0),
    "T5": (19.0, 22.0, 27.0, -1.4, 15.0, 17.0, 5.0, 10.0, 38.0, 8.0, 50.0),
    "T4": (18.5, 20.0, 26.0, -1.2, 15.0, 17.0, 5.5, 10.0, 36.0, 8.0, 45.0),
    "T3": (18.0, 18.5, 26.0, -0.8, 15.0, 18.0, 6.0, 10.0, 34.0, 8.0, 40.0),
    "T2": (17.5, 17.0, 27.0, -0.5, 15.0, 19.0, 7.0, 10.0, 34.0, 9.0, 32.0),
    "T1": (16.5, 16.0, 28.0, 0.0, 15.0, 21.0, 8.0, 9.0, 36.0, 10.0, 25.0),
    "C7": (15.0, 16.0, 26.0, 0.0, 15.0, 24.0, 6.0, 7.0, 34.0, 10.0, 20.0),
    "C6": (14.5, 16.0, 24.0, 0.0, 15.0, 24.0, 6.0, 7.0, 22.0, 8.0, 20.0),
    "C5": (14.0, 15.5, 22.0, 0.0, 15.0, 24.0, 6.0, 7.0, 18.0, 8.0, 18.0),
    "C4": (14.0, 15.5, 21.0, 0.0, 15.0, 24.0, 6.0, 7.0, 16.0, 8.0, 15.0),
    "C3": (14.0, 15.0, 20.0, 0.0, 15.5, 24.0, 6.0, 7.0, 16.0, 8.0, 15.0),
    "C2": (21.0, 16.0, 20.0, 0.0, 17.0, 24.0, 7.0, 8.0, 28.0, 14.0, 15.0),
}
# Chain order caudal -> cranial (S5 .. C2); the 24 recorded levels are S1 .. C2.
_CHAIN = ("S5", "S4", "S3", "S2") + LEVELS
_SACRAL = ("S5", "S4", "S3", "S2")

# Disc heights (anterior, posterior) in mm, keyed by disc name (upper-lower).
_DISC = {
    "L5-S1": (15.0, 6.0), "L4-L5": (13.5, 7.5), "L3-L4": (12.5, 8.0), "L2-L3": (11.5, 8.5),
    "L1-L2": (10.5, 8.5), "T12-L1": (8.0, 7.0), "T11-T12": (6.5, 6.0), "T10-T11": (6.0, 5.5),
    "T9-T10": (5.5, 5.0), "T8-T9": (5.0, 5.0), "T7-T8": (4.8, 4.8), "T6-T7": (4.6, 4.6),
    "T5-T6": (4.4, 4.4), "T4-T5": (4.2, 4.2), "T3-T4": (4.0, 4.0), "T2-T3": (4.0, 4.0),
    "T1-T2": (4.2, 4.0), "C7-T1": (5.0, 4.5), "C6-C7": (5.5, 4.3), "C5-C6": (5.5, 4.0),
    "C4-C5": (5.5, 4.0), "C3-C4": (5.3, 4.0), "C2-C3": (5.0, 4.0),
}

_R_MAX = 0.9  # bodies are drawn (and recorded) where |dx| < 0.9 * W/2

# Disc height factor per Narrowing grade.
_NARROW = {1: 1.0, 2: 0.75, 3: 0.55, 4: 0.35}


# --------------------------------------------------------------------------- geometry
def _dirs(phi: float):
    """Cranial axis t and anterior normal n (row, col) for an axis tilted phi rad anteriorly."""
    c, s = math.cos(phi), math.sin(phi)
    return np.array([-c, -s]), np.array([s, -c])


class _V:
    """One vertebral body (or sacral segment) in the mid-sagittal plane, mm."""

    def __init__(self, level: str, c, phi: float, a: dict):
        self.level = level
        self.a = a
        self.h, self.w, self.W, self.wedge = a["h"], a["w"], a["W"], a["wedge"]
        self.set_pose(c, phi)
        self.xc = 0.0

    def set_pose(self, c, phi):
        self.c = np.asarray(c, float)
        self.phi = float(phi)
        self.t, self.n = _dirs(self.phi)

    def pt(self, u, v):
        return self.c + self.t * u + self.n * v

    def corners(self, dx: float = 0.0):
        r = abs(dx) / (self.W / 2.0)
        if r >= _R_MAX:
            return None
        p = self.a["p_lat"]
        fd = (1.0 - r ** p) ** (1.0 / p)
        fh = 1.0 - 0.06 * r * r
        va = -0.25 * self.w
        v_ant = va + (self.w / 2 - va) * fd
        v_post = va + (-self.w / 2 - va) * fd
        ha = (self.h + self.wedge * v_ant / self.w) * fh
        hp = (self.h + self.wedge * v_post / self.w) * fh
        return np.array([self.pt(ha / 2, v_ant), self.pt(hp / 2, v_post),
                         self.pt(-hp / 2, v_post), self.pt(-ha / 2, v_ant)])


def _endplate_normal(a, b):
    """Unit vector along a->b and its normal rotated +90 deg (cranial for a posterior-pointing edge)."""
    e = (b - a) / np.hypot(*(b - a))
    return e, np.array([-e[1], e[0]])


def _angle_of(tvec) -> float:
    return math.atan2(-tvec[1], -tvec[0])


def _build_chain(params: dict, psi_s1: float) -> dict[str, _V]:
    """Place S5..C2 from S1 upward (discs) and downward (fused sacral segments)."""
    A = params["dims"]
    verts: dict[str, _V] = {}
    a = A["S1"]
    beta = math.atan(a["wedge"] / (2 * a["w"]))
    verts["S1"] = _V("S1", (0.0, 0.0), psi_s1 + beta, a)
    # upward
    for i in range(LEVELS.index("S1") + 1, len(LEVELS)):
        lo, up = verts[LEVELS[i - 1]], LEVELS[i]
        dname = disc_name(up, lo.level)
        da, dp = params["disc_h"][dname]
        C = lo.corners(0.0)
        e, nl = _endplate_normal(C[0], C[1])
        psi = _angle_of(nl)
        delta = math.atan((da - dp) / lo.w)
        au = A[up]
        phi = psi - delta - math.atan(au["wedge"] / (2 * au["w"]))
        t, n = _dirs(phi)
        ip = C[1] + nl * dp
        c = ip + n * au["w"] / 2 + t * (au["h"] - au["wedge"] / 2) / 2
        c = c - e * params["slip"].get(dname, 0.0)
        verts[up] = _V(up, c, phi, au)
    # downward (sacrum)
    for lvl in ("S2", "S3", "S4", "S5"):
        up = verts[_CHAIN[_CHAIN.index(lvl) + 1]]
        al = A[lvl]
        C = up.corners(0.0)
        e, nu = _endplate_normal(C[3], C[2])
        psi = _angle_of(nu)
        phi = psi + math.atan(al["wedge"] / (2 * al["w"]))
        t, n = _dirs(phi)
        spp = C[2] - nu * params["sacral_gap"]
        c = spp + n * al["w"] / 2 - t * (al["h"] - al["wedge"] / 2) / 2
        verts[lvl] = _V(lvl, c, phi, al)
    return verts


def _subject_params(rng: np.random.Generator, grades: dict[str, dict], scale: float) -> dict:
    """Per-subject dimensions, disc heights (with narrowing) and slips."""
    lord = rng.uniform(0.8, 1.35)
    kyph = rng.uniform(0.7, 1.35)
    cerv = rng.uniform(0.3, 1.3)
    dims = {}
    for lvl in _CHAIN:
        h, w, W, wedge, canal, ipd, pw, ph, spl, sph, spa = _VERT[lvl]
        jit = 1.0 + rng.normal(0.0, 0.03)
        reg = lvl[0]
        fac = {"L": lord, "T": kyph, "C": 1.0, "S": 1.0}[reg]
        dims[lvl] = dict(
            h=h * scale * jit, w=w * scale * (1.0 + rng.normal(0.0, 0.03)), W=W * scale * jit,
            wedge=(wedge * fac + rng.normal(0.0, 0.4)) * scale, canal=canal * scale * (1.0 + rng.normal(0.0, 0.06)),
            ipd=ipd * scale, pw=pw * scale, ph=ph * scale, sp_len=spl * scale * (1.0 + rng.normal(0.0, 0.08)),
            sp_h=sph * scale, sp_ang=math.radians(spa + rng.normal(0.0, 4.0)),
            p_lat={"L": 2.8, "S": 2.8, "T": 2.2, "C": 2.4}[reg], region=reg,
        )
    disc_h, slip = {}, {}
    for i in range(1, len(LEVELS)):
        dname = disc_name(LEVELS[i], LEVELS[i - 1])
        da, dp = _DISC[dname]
        reg = LEVELS[i][0]
        fac = {"L": lord, "T": kyph, "C": cerv}[reg] if dname != "L5-S1" else lord
        if reg == "T" and dname == "T12-L1":
            fac = 1.0
        m, diff = (da + dp) / 2, (da - dp) * fac + rng.normal(0.0, 0.5)
        g = grades[dname]
        nf = _NARROW[g["Narrowing"]] * (1.0 + rng.normal(0.0, 0.05))
        if g["Pfirrmann"] == 5:
            nf *= 0.9
        m = m * nf * scale
        diff = diff * (0.5 + 0.5 * nf) * scale
        diff = float(np.clip(diff, -1.5 * m, 1.5 * m))
        disc_h[dname] = (max(m + diff / 2, 0.8), max(m - diff / 2, 0.8))
        frac = rng.uniform(0.12, 0.28)  # drawn for every disc: stable random stream
        if g["Spondylolisthesis"]:
            slip[dname] = frac * dims[LEVELS[i - 1]]["w"]
    return dict(dims=dims, disc_h=disc_h, slip=slip, sacral_gap=1.8 * scale)


def _rescale(params: dict, fac: float) -> dict:
    """All lengths of a subject's parameters multiplied by fac (angles kept)."""
    dims = {}
    for lvl, a in params["dims"].items():
        b = dict(a)
        for k in ("h", "w", "W", "wedge", "canal", "ipd", "pw", "ph", "sp_len", "sp_h"):
            b[k] = a[k] * fac
        dims[lvl] = b
    return dict(dims=dims, disc_h={k: (v[0] * fac, v[1] * fac) for k, v in params["disc_h"].items()},
                slip={k: v * fac for k, v in params["slip"].items()}, sacral_gap=params["sacral_gap"] * fac)

