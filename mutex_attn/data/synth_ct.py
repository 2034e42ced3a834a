"""Procedural synthetic 2-D axial chest-CT slices: the project's built-in default dataset.

SYNTHETIC, NOT MEDICAL DATA. Nothing here comes from a patient; the images only imitate the
look of lung-windowed chest CT so that the training / evaluation code can run end to end where
real scans cannot ship. Do not use them to judge a medical method.

    from mutex_attn.data.synth_ct import generate_dataset
    generate_dataset("data/synth-ct", patients=120, slices_per_patient=8, size=256, seed=0)

writes the COVID-CT layout (``Images-processed/CT_COVID|CT_NonCOVID/*.png``, ``Data-split/...``,
the two MetaInfo CSVs) plus ``synth_info.json`` (arguments, counts, per-image findings).

Simulation (all in Hounsfield units, HU, then the lung window [-1250, 250] HU -> 0..255):

* Body: a super-ellipse (flatter back) of subcutaneous fat (-100) over chest-wall muscle (+45),
  air (-1000) outside, a curved CT couch below. Ribs (cortex +700, marrow +250; costal
  cartilage +130 anteriorly) are arcs around the thoracic cavity whose angular positions drift
  with z (ribs slope); sternum in front, a vertebra (body, canal, arch, processes) behind.
* Mediastinum (fat -85) with the heart (+40, epicardial fat) in the lower slices, ascending /
  descending aorta, aortic arch, pulmonary trunk, SVC, trachea (air) above the carina, main
  bronchi just below it, oesophagus; the liver / spleen domes at the lung bases.
* Lungs (parenchyma -875 +- 15, up to +35 denser posteriorly; about -850 with the vessels)
  fill the cavity around the mediastinum; their cross-section is computed per slice, so it
  grows and shrinks along z (small towards the apex). A 3-D space-filling vessel tree (+40 HU,
  thick at the hilum, fading out towards the pleura) and the bronchi beside its larger branches
  (air lumen, thin wall) are cut by each slice's slab: vessels running through the slice show as
  dots, those in its plane as branching lines; bronchi are drawn where cut across (rings).
* Scanner: per-patient HU calibration (scale 0.95..1.05 about air, offset +-20 HU), small
  rotation / translation, Gaussian noise (10..30 HU std after smoothing), mild blur.

Findings are 3-D blobs in lung-relative coordinates (angle around the lung, fraction of the
lung radius, height z), so they persist over neighbouring slices with a changing cross-section:

* COVID (label 1): bilateral (88% of patients), peripheral / subpleural, multifocal ground-glass
  opacities ("ggo": -630..-400 HU, soft irregular edges, patchy, vessels visible through them,
  each ~10-27% of the image long along the pleura, so visible at 96-128 px), mild / moderate /
  severe (2..8 per lung, size, density), some with consolidation cores ("consolidation":
  -100..+30 HU) and some with a crazy-paving reticular network ("crazy_paving"). Every COVID
  slice shows at least one lesion (in each involved lung).
* Non-COVID (label 0): 40% of patients normal; the rest one look-alike disease: lobar /
  segmental consolidation ("lobar": one lung, large, dense, air bronchograms), nodules
  ("nodule": few, small, round, sharp, dense), bronchopneumonia ("bronchopneumonia":
  peribronchial clusters of small nodular opacities in a haze, more central, mostly one lung),
  emphysema ("emphysema": darker lungs with low-attenuation holes), dependent atelectasis
  ("atelectasis": thin dense posterior subpleural bands); 15% of them also a faint central,
  one-sided GGO ("ggo"). A non-COVID finding shows only on the slices that cut it; slices
  that show none are tagged "normal". All other parameters have the same distribution in both
  classes, so neither body size, pose, calibration nor noise gives the class away.

Everything is deterministic from ``seed``: patient i draws from ``default_rng([seed, i])``, so
the output is byte-identical whatever the number of worker processes (on one machine and
numpy / scipy / Pillow version; float rounding may differ elsewhere).
"""
from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import operator
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["generate_dataset", "simulate_patient", "window_to_uint8", "GENERATOR_VERSION"]

GENERATOR_VERSION = "1.0"
WINDOW_HU = (-1250.0, 250.0)

# Tissue values (HU).
AIR, FAT, MED_FAT, MUSCLE, BLOOD = -1000.0, -100.0, -85.0, 45.0, 40.0
CORTEX, MARROW, CARTILAGE, LIVER = 700.0, 250.0, 130.0, 55.0
VESSEL, AIRWAY_WALL = 40.0, 0.0

# Lung-relative coordinates: (u, v) in the unit disc (u points medially, v posteriorly) is mapped
# onto the lung cross-section of the slice; z in [0, 1] runs from the lung base to the apex. For
# 3-D geometry (vessel branching, lesion extent) a unit of u/v is ~LUNG_R image widths and a unit
# of z ~LUNG_H image widths.
LUNG_R, LUNG_H = 0.14, 0.7
SLAB_HALF = 0.007  # half the slice thickness, in z units (~1.75 mm: 3.5 mm slices)
Z_RANGE = (0.25, 0.85)  # slices are taken between the domes and the apex

NONCOVID_PATTERNS = ("normal", "lobar", "bronchopneumonia", "nodule", "emphysema", "atelectasis")
NONCOVID_P = (0.40, 0.18, 0.18, 0.12, 0.06, 0.06)
COVID_PATTERNS = ("covid_mild", "covid_moderate", "covid_severe")
COVID_P = (0.30, 0.40, 0.30)

_SPLIT_TAG = 0x53504C54  # "SPLT": the class / split draw, separate from every patient's stream
_NAME_RE = re.compile(r"^synth_p\d+_s\d+\.png$")
SPLITS = ("train", "val", "test")
_CLASS_DIRS = {1: ("CT_COVID", "COVID"), 0: ("CT_NonCOVID", "NonCOVID")}


# --- small helpers ------------------------------------------------------------------------------

def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _superellipse_level(x, y, ax, ay_ant, ay_post, p_ant, p_post):
    """Level 1 on the outline; homogeneous of degree 1, so |r| (L - 1) / L is the radial
    distance outside the outline. y < 0 is anterior."""
    ay = np.where(y < 0, ay_ant, ay_post)
    p = np.where(y < 0, p_ant, p_post)
    return ((np.abs(x) / ax) ** p + (np.abs(y) / ay) ** p) ** (1.0 / p)


def _ellipse_d(x, y, cx, cy, ax, ay, ang):
    c, s = math.cos(ang), math.sin(ang)
    dx, dy = x - cx, y - cy
    return np.hypot((dx * c + dy * s) / ax, (-dx * s + dy * c) / ay)


def _smooth_fields(rng, size, sigmas, pairs=2):
    """`pairs` independent sets of periodic Gaussian random fields (unit std), one per sigma
    (pixels); made by FFT so any sigma costs the same."""
    k = np.fft.fftfreq(size)[:, None] ** 2 + np.fft.rfftfreq(size)[None, :] ** 2
    out = []
    for _ in range(pairs):
        spec = np.fft.rfft2(rng.standard_normal((size, size)))
        fields = []
        for s in sigmas:
            f = np.fft.irfft2(spec * np.exp(-2.0 * math.pi ** 2 * s * s * k), s=(size, size))
            f -= f.mean()
            fields.append((f / (f.std() + 1e-12)).astype(np.float32))
        out.append(fields)
    return out


def window_to_uint8(hu, window=WINDOW_HU):
    """Lung window: window[0] HU -> 0, window[1] HU -> 255, clipped, rounded."""
    lo, hi = window
    return np.clip(np.rint((np.asarray(hu, np.float64) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _splat(n_bins, size, px, py, w, bins):
    """Bilinear splat of weights w at pixel positions (px, py) into n_bins images."""
    out = np.zeros(n_bins * size * size, np.float32)
    if px.size == 0:
        return out.reshape(n_bins, size, size)
    x0, y0 = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
    fx, fy = px - x0, py - y0
    base = bins * (size * size)
    idx, wts = [], []
    corners = ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy))
    for dx, dy, ww in corners:
        xi, yi = x0 + dx, y0 + dy
        ok = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
        idx.append((base + yi * size + xi)[ok])
        wts.append((w * ww)[ok])
    out += np.bincount(np.concatenate(idx), np.concatenate(wts), minlength=out.size)
    return out.reshape(n_bins, size, size)


def _sample_segments(ax, ay, bx, by, mass, step=0.5):
    """Points every `step` pixels along 2-D segments, each segment's mass spread evenly."""
    length = np.hypot(bx - ax, by - ay)
    n = np.maximum(1, np.ceil(length / step).astype(np.int64))
    seg = np.repeat(np.arange(n.size), n)
    first = np.repeat(np.cumsum(n) - n, n)
    t = (np.arange(seg.size) - first + 0.5) / n[seg]
    return ax[seg] + t * (bx - ax)[seg], ay[seg] + t * (by - ay)[seg], (mass / n)[seg], seg


# Blur widths (pixels) that thin tubes are binned into: one Gaussian filter per bin and slice.
_SIGMA_BINS = np.array([0.45, 0.65, 0.9, 1.25])
_THICK_PX = 1.5  # tubes thicker than this (radius, pixels) are drawn exactly, with crisp edges


def _render_tubes(size, ax, ay, bx, by, radius_px):
    """Soft occupancy (0..1) of 2-D capsules from (ax, ay) to (bx, by), radius in pixels.
    Thin ones: the capsule area is splatted along its axis and blurred with sigma ~ radius / 1.2,
    which gives a peak of ~1 across a line and ~0.7 on a dot (partial volume). Thick ones (few):
    the exact capsule, anti-aliased over a pixel."""
    out = np.zeros((size, size), np.float32)
    thin = radius_px <= _THICK_PX
    if thin.any():
        tax, tay, tbx, tby, r = ax[thin], ay[thin], bx[thin], by[thin], radius_px[thin]
        mass = 2.0 * r * np.hypot(tbx - tax, tby - tay) + math.pi * r ** 2
        sig = np.clip(r / 1.2, _SIGMA_BINS[0], _SIGMA_BINS[-1])
        b = np.abs(np.log(sig)[:, None] - np.log(_SIGMA_BINS)[None, :]).argmin(axis=1)
        px, py, w, seg = _sample_segments(tax, tay, tbx, tby, mass)
        used = np.unique(b)
        remap = np.full(_SIGMA_BINS.size, -1)
        remap[used] = np.arange(used.size)
        imgs = _splat(used.size, size, px, py, w, remap[b[seg]])
        for i, bi in enumerate(used):
            out += ndimage.gaussian_filter(imgs[i], _SIGMA_BINS[bi], truncate=3.0)
    for x0, y0, x1, y1, r in zip(ax[~thin], ay[~thin], bx[~thin], by[~thin], radius_px[~thin]):
        r0, r1 = max(0, int(min(y0, y1) - r - 1)), min(size, int(max(y0, y1) + r + 2))
        c0, c1 = max(0, int(min(x0, x1) - r - 1)), min(size, int(max(x0, x1) + r + 2))
        if r1 <= r0 or c1 <= c0:
            continue
        yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float32)
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / max(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
        d = np.hypot(xx - x0 - t * dx, yy - y0 - t * dy)
        box = out[r0:r1, c0:c1]
        np.maximum(box, np.clip(r - d + 0.5, 0.0, 1.0), out=box)
    return np.minimum(out, 1.0)


# --- 3-D trees ----------------------------------------------------------------------------------

def _vessel_tree(rng, hilum, n_tips, r_tip=0.0005, power=0.42, r_max=0.012):
    """A space-filling vascular tree in lung-relative (u, v, z): tips spread evenly through the
    lung, joined level by level from the hilum by splitting every group of tips in two (mostly
    along its widest extent); a branch heads part-way towards the centre of its tips. Radius (image widths)
    grows with the number of tips fed (~n^0.42, near Murray's law n^(1/3)), so vessels are thick at
    the hilum and fade out towards the pleura. Returns start (n, 3), end (n, 3), radius (n,),
    tips fed (n,)."""
    scale = np.array([LUNG_R, LUNG_R, LUNG_H])
    ang = rng.uniform(0, 2 * math.pi, n_tips)
    rho = 0.93 * np.sqrt(rng.uniform(0, 1, n_tips))
    tips = np.stack([rho * np.cos(ang), rho * np.sin(ang), rng.uniform(0.02, 0.98, n_tips)], 1) * scale
    pts = tips.copy()  # reordered in place: every group is a contiguous run
    starts = np.array([0])
    parent = (np.asarray(hilum, float) * scale)[None]
    out_s, out_e, out_n = [], [], []
    while starts.size:
        stops = np.append(starts[1:], len(pts))
        n = stops - starts
        centre = np.add.reduceat(pts, starts, axis=0) / n[:, None]
        leaf = n == 1
        node = np.where(leaf[:, None], centre,
                        parent + rng.uniform(0.35, 0.6, n.size)[:, None] * (centre - parent))
        out_s.append(parent), out_e.append(node), out_n.append(n)
        if leaf.all():
            break
        # Split each group in two across a random direction favouring its widest extent, at a
        # random quantile: fixed median planes would leave vessel-poor "seams" at fixed heights.
        spread = np.maximum(np.add.reduceat(pts ** 2, starts, axis=0) / n[:, None] - centre ** 2, 0)
        direction = rng.standard_normal(spread.shape) * np.sqrt(spread)
        group = np.repeat(np.arange(n.size), n)
        order = np.lexsort(((pts * direction[group]).sum(1), group))
        pts = pts[order]
        keep = ~leaf
        half = starts + np.clip(np.rint(n * rng.uniform(0.35, 0.65, n.size)), 1, n - 1).astype(np.int64)
        new_starts = np.stack([starts[keep], half[keep]], 1).ravel()
        parent = np.repeat(node[keep], 2, axis=0)
        done = np.repeat(leaf, n)  # tips of finished (one-tip) groups leave the array
        starts = new_starts - np.cumsum(done)[new_starts]
        pts = pts[~done]
    start, end, count = np.concatenate(out_s), np.concatenate(out_e), np.concatenate(out_n)
    # Bend every branch a little at a jittered midpoint.
    length = np.linalg.norm(end - start, axis=1, keepdims=True)
    mid = 0.5 * (start + end) + rng.normal(0, 0.12, start.shape) * length
    start, end = np.concatenate([start, mid]), np.concatenate([mid, end])
    count = np.concatenate([count, count])
    return start / scale, end / scale, np.minimum(r_tip * count ** power, r_max), count


# --- findings -----------------------------------------------------------------------------------

@dataclass
class _Lesion:
    tag: str
    layer: str  # "haze": added density, vessels stay visible; "dense": replaces; "dark": darker
    lung: int  # 0: patient's right (image left), 1: left
    psi: float  # angle in the lung: 0 lateral, +pi/2 posterior, -pi/2 anterior, pi medial
    rho: float  # fraction of the lung radius
    zc: float
    rz: float  # half extent along z (z units)
    a_t: float = 0.0  # half size along the pleura (image widths)
    a_r: float = 0.0  # half size across it
    hu: float = -600.0
    soft: float = 0.5  # edge width, as a fraction of the size
    irregular: float = 0.0  # outline wobble
    patchy: float = 0.0  # density texture inside
    crazy: bool = False  # crazy-paving network
    bronchogram: bool = False  # air bronchograms drawn through it
    sector: tuple | None = None  # lobar: (half angle, rho_in, z_lo, z_hi, psi drift per z)

    def scale_at(self, z):
        """Cross-section scale at height z (0: not cut)."""
        if self.sector is not None:
            _, _, lo, hi, _ = self.sector
            return float(_smoothstep((z - lo) / 0.04) * _smoothstep((hi - z) / 0.04))
        q = 1.0 - ((z - self.zc) / self.rz) ** 2
        return math.sqrt(q) if q > 0 else 0.0


def _uv(psi, rho):
    return -rho * math.cos(psi), rho * math.sin(psi)


def _psi_rho(u, v):
    return math.atan2(v, -u), math.hypot(u, v)


def _covid_lesions(rng, pattern, zs):
    sev = pattern.split("_")[1]
    n_lo, n_hi = {"mild": (2, 4), "moderate": (3, 6), "severe": (4, 8)}[sev]
    size_lo, size_hi = {"mild": (0.055, 0.085), "moderate": (0.065, 0.105), "severe": (0.075, 0.135)}[sev]
    hu_lo, hu_hi = {"mild": (-630, -500), "moderate": (-610, -440), "severe": (-590, -400)}[sev]
    p_cons = {"mild": 0.1, "moderate": 0.3, "severe": 0.55}[sev]
    crazy = rng.random() < (0.2 if sev == "mild" else 0.35)
    lungs = [0, 1] if rng.random() < 0.88 else [int(rng.integers(2))]
    z_lo, z_hi = zs.min() - 0.04, zs.max() + 0.04

    def lesion(lung, zc):
        psi = rng.uniform(-1.5, 2.3)  # anterior .. lateral .. posterior, rarely medial
        rho = rng.uniform(0.8, 0.95) if rng.random() < 0.85 else rng.uniform(0.55, 0.8)
        a_t = rng.uniform(size_lo, size_hi)
        a_r = a_t * rng.uniform(0.4, 0.75)  # flattened along the pleura
        rz = max(a_t, a_r) / LUNG_H * rng.uniform(0.9, 1.7)
        out = [_Lesion("ggo", "haze", lung, psi, rho, zc, rz, a_t, a_r, rng.uniform(hu_lo, hu_hi),
                       soft=rng.uniform(0.35, 0.7), irregular=rng.uniform(0.1, 0.35),
                       patchy=rng.uniform(0.1, 0.35), crazy=bool(crazy and rng.random() < 0.6))]
        if rng.random() < p_cons:  # a denser core, on the pleural side
            f = rng.uniform(0.35, 0.6)
            out.append(_Lesion("consolidation", "dense", lung, psi, min(rho + 0.04, 0.96), zc, rz * 0.75,
                               a_t * f, a_r * f, rng.uniform(-100, 30), soft=rng.uniform(0.15, 0.3),
                               irregular=0.2, patchy=0.05))
        return out

    lesions = []
    for lung in lungs:
        for _ in range(int(rng.integers(n_lo, n_hi + 1))):
            lesions += lesion(lung, rng.uniform(z_lo, z_hi))
    # Every slice must show a lesion in every involved lung: fill the gaps.
    for z in zs:
        for lung in lungs:
            if not any(les.lung == lung and les.tag == "ggo" and les.scale_at(z) > 0.6 for les in lesions):
                new = lesion(lung, 0.0)
                new[0].zc = z + rng.uniform(-0.3, 0.3) * new[0].rz
                for les in new[1:]:
                    les.zc = new[0].zc
                lesions += new
    return lesions


def _noncovid_lesions(rng, pattern, zs):
    lesions = []

    def near_slice(spread):
        return float(rng.choice(zs)) + rng.uniform(-spread, spread)

    if pattern == "lobar":
        lung = int(rng.integers(2))
        lobes = ["lower", "upper", "middle"] if lung == 0 else ["lower", "upper"]
        lobe = lobes[int(rng.integers(len(lobes)))]
        if lobe == "lower":
            psi, hw, lo, hi = rng.uniform(1.0, 1.6), rng.uniform(0.7, 1.1), 0.0, rng.uniform(0.45, 0.6)
        elif lobe == "upper":
            psi, hw, lo, hi = rng.uniform(-1.4, -0.6), rng.uniform(0.6, 1.0), rng.uniform(0.45, 0.6), 1.0
        else:
            psi, hw, lo, hi = rng.uniform(-1.0, -0.3), rng.uniform(0.4, 0.7), 0.3, 0.5
        rho_in = rng.uniform(0.1, 0.35)
        if rng.random() < 0.4:  # segmental: a narrower, peripheral wedge
            hw, rho_in = hw * 0.55, rng.uniform(0.45, 0.65)
        if hi < zs.min() + 0.03 or lo > zs.max() - 0.03:  # make sure the slab cuts it
            mid, half = near_slice(0.0), rng.uniform(0.1, 0.2)
            lo, hi = mid - half, mid + half
        lesions.append(_Lesion("lobar", "dense", lung, psi, 0.0, 0.5 * (lo + hi), 1.0,
                               hu=rng.uniform(-60, 40), soft=0.1, irregular=0.12, patchy=0.05,
                               bronchogram=True, sector=(hw, rho_in, lo, hi, rng.uniform(-0.6, 0.6))))
    elif pattern == "nodule":
        for _ in range(int(rng.integers(1, 4))):
            r = rng.uniform(0.008, 0.022)
            rz = r / LUNG_H * rng.uniform(1.0, 1.4)
            lesions.append(_Lesion("nodule", "dense", int(rng.integers(2)), rng.uniform(-math.pi, math.pi),
                                   rng.uniform(0.2, 0.85), near_slice(0.5 * rz), rz, r,
                                   r * rng.uniform(0.85, 1.0), rng.uniform(-10, 80), soft=0.08))
    elif pattern == "bronchopneumonia":
        lungs = [int(rng.integers(2))] if rng.random() < 0.7 else [0, 1]
        for _ in range(int(rng.integers(1, 4))):
            lung = lungs[int(rng.integers(len(lungs)))]
            psi, rho = rng.uniform(0.3, 2.2), rng.uniform(0.25, 0.6)
            zc, big = near_slice(0.03), rng.uniform(0.04, 0.07)
            lesions.append(_Lesion("bronchopneumonia", "haze", lung, psi, rho, zc, big * 1.6 / LUNG_H,
                                   big * 1.1, big * 1.1, rng.uniform(-720, -620), soft=0.7, irregular=0.3,
                                   patchy=0.2))
            u0, v0 = _uv(psi, rho)
            for _ in range(int(rng.integers(8, 19))):  # centrilobular / peribronchial nodules
                u = u0 + rng.normal(0, big / 2) / LUNG_R
                v = v0 + rng.normal(0, big / 2) / LUNG_R
                p2, r2 = _psi_rho(u, v)
                r = rng.uniform(0.008, 0.018)
                lesions.append(_Lesion("bronchopneumonia", "dense", lung, p2, min(r2, 0.92),
                                       zc + rng.normal(0, big / 2 / LUNG_H * 1.5), r * 1.8 / LUNG_H, r, r,
                                       rng.uniform(-300, 0), soft=0.4, irregular=0.1))
    elif pattern == "emphysema":
        for _ in range(int(rng.integers(200, 350))):
            r = rng.uniform(0.012, 0.035)
            lesions.append(_Lesion("emphysema", "dark", int(rng.integers(2)), rng.uniform(-math.pi, math.pi),
                                   math.sqrt(rng.uniform(0.02, 0.85)),
                                   rng.uniform(zs.min() - 0.05, zs.max() + 0.05), r / LUNG_H, r, r,
                                   rng.uniform(-1000, -985), soft=0.25))
        for _ in range(int(rng.integers(0, 3))):  # subpleural bullae
            r = rng.uniform(0.025, 0.045)
            lesions.append(_Lesion("emphysema", "dark", int(rng.integers(2)), rng.uniform(-1.5, 1.5), 0.9,
                                   near_slice(0.02), r * 1.3 / LUNG_H, r, r * 0.8, -995.0, soft=0.15))
    elif pattern == "atelectasis":
        lungs = [0, 1] if rng.random() < 0.5 else [int(rng.integers(2))]
        for lung in lungs:
            lesions.append(_Lesion("atelectasis", "dense", lung, rng.uniform(1.3, 1.9), 0.94,
                                   near_slice(0.05), rng.uniform(0.2, 0.4), rng.uniform(0.05, 0.09),
                                   rng.uniform(0.012, 0.022), rng.uniform(-300, -50), soft=0.35,
                                   irregular=0.15))
    if pattern != "normal" and rng.random() < 0.15:  # a faint, central, one-sided GGO
        a = rng.uniform(0.03, 0.05)
        lesions.append(_Lesion("ggo", "haze", int(rng.integers(2)), rng.uniform(-math.pi, math.pi),
                               rng.uniform(0.15, 0.45), near_slice(0.02), rng.uniform(0.05, 0.1), a,
                               a * rng.uniform(0.6, 1.0), rng.uniform(-760, -660), soft=0.7, irregular=0.25,
                               patchy=0.2))
    return lesions


# --- a patient ----------------------------------------------------------------------------------

class _Patient:
    """All patient-level parameters (drawn once from default_rng([seed, index])) and the
    renderer of its slices."""

    def __init__(self, seed, index, label, size, n_slices, pattern=None):
        rng = np.random.default_rng([seed, index])
        self.size, self.label = size, label
        if pattern is None:
            names, probs = (COVID_PATTERNS, COVID_P) if label == 1 else (NONCOVID_PATTERNS, NONCOVID_P)
            pattern = names[int(rng.choice(len(names), p=probs))]
        else:
            rng.random()  # keep the stream aligned with the drawn case
        if (label == 1) != pattern.startswith("covid"):
            raise ValueError(f"pattern {pattern!r} does not fit label {label}")
        self.pattern = pattern
        u = rng.uniform
        self.noise_seed = int(rng.integers(2 ** 62))

        # Body and chest wall (image widths; x to the patient's left = image right, y posterior).
        self.bx = u(0.39, 0.46)
        self.by_a = self.bx * u(0.58, 0.70)
        self.by_p = self.by_a * u(1.0, 1.12)
        self.yc = u(-0.03, 0.0)
        self.p_a, self.p_p = u(2.0, 2.5), u(2.6, 3.4)
        self.t_fat, self.t_m, self.rib_th = u(0.01, 0.05), u(0.02, 0.035), u(0.016, 0.024)
        self.bxc = self.bx - self.t_fat - self.t_m - self.rib_th - 0.004
        self.byc_a = self.by_a - 0.8 * self.t_fat - self.t_m - self.rib_th
        self.byc_p = self.by_p - 0.5 * self.t_fat - 0.085
        self.fat_wobble = (u(0.2, 0.6), u(0, 2 * math.pi))
        # Ribs: angular period, phase, slope (phase drift with z), right/left offset; per-rib
        # jitter of position, arc length and thickness.
        self.rib = (u(0.36, 0.46), u(0, 1), u(2.0, 4.0), u(0, 1))
        self.rib_jit = (rng.uniform(-0.2, 0.2, 16), rng.uniform(0.12, 0.24, 16), rng.uniform(0.8, 1.15, 16))
        # Spine and mediastinum.
        self.r_vb = u(0.03, 0.038)
        self.y_vb = self.yc + self.byc_p - 0.7 * self.r_vb
        self.w_med = u(0.035, 0.05)
        self.heart = (u(0.04, 0.07), self.yc + u(-0.07, -0.04), u(0.11, 0.14), u(0.08, 0.1), -u(0.3, 0.7))
        self.z_heart = u(0.5, 0.58)
        self.z_car = u(0.6, 0.66)
        self.z_arch = u(0.68, 0.73)
        self.r_ao = u(0.022, 0.028)
        # Lungs: density, posterior gradient, outline wobble (two harmonics per lung).
        self.lung_hu = u(-890, -860) - (15.0 if pattern == "emphysema" else 0.0)
        self.lung_grad = u(5, 35)
        self.lung_wobble = [(u(0, 0.05), u(0, 2 * math.pi), u(0, 0.04), u(0, 2 * math.pi)) for _ in range(2)]
        # Scan: pose, calibration, noise, blur, couch.
        self.rot = u(-0.08, 0.08)
        self.shift = (u(-0.03, 0.03), u(-0.03, 0.02))
        self.cal = (u(0.95, 1.05), u(-20, 20))
        self.noise_hu = u(10, 30)
        self.blur = u(0.5, 0.8)
        self.couch = (u() < 0.8, u(0.015, 0.04), u(0.2, 0.6))
        # Slices: a slab of n_slices heights.
        extent = u(0.3, 0.5) if n_slices > 1 else 0.0
        z0 = u(Z_RANGE[0], Z_RANGE[1] - extent)
        self.zs = z0 + extent * np.arange(n_slices) / max(1, n_slices - 1)
        # Vessel and airway trees, one per lung (u medial, v posterior).
        self.trees = []
        for _ in range(2):
            hilum = (0.6, u(-0.1, 0.1), self.z_car - 0.06)
            s_, e_, r_, n_ = _vessel_tree(rng, hilum, int(rng.integers(2500, 3500)))
            a = u(0, 2 * math.pi)  # the bronchus runs beside its artery
            off = np.array([math.cos(a), math.sin(a), 0.0])[None] * (2.0 * r_ / LUNG_R)[:, None]
            self.trees.append((s_, e_, r_, n_, off))
        # Findings.
        self.lesions = (_covid_lesions if label == 1 else _noncovid_lesions)(rng, pattern, self.zs)
        # Texture fields, [pair][sigma]: lesion outline wobble, patchiness, lung heterogeneity;
        # plus a band-pass pair for crazy paving.
        self.fields = _smooth_fields(rng, size, (0.03 * size, 0.012 * size, 0.008 * size))
        if any(les.crazy for les in self.lesions):
            a, b = _smooth_fields(rng, size, (0.01 * size, 0.03 * size))
            self.band = (a[0] - 0.6 * a[1], b[0] - 0.6 * b[1])
        self._build_grid()

    # Geometry ------------------------------------------------------------------------------------

    def _build_grid(self):
        n = self.size
        c = (np.arange(n) + 0.5) / n - 0.5
        xi, yi = np.meshgrid(c, c)
        self.ca, self.sa = math.cos(self.rot), math.sin(self.rot)
        tx, ty = self.shift
        # Patient coordinates of each pixel (float32: all per-pixel work follows this dtype).
        self.X = (self.ca * (xi - tx) + self.sa * (yi - ty)).astype(np.float32)
        self.Y = (-self.sa * (xi - tx) + self.ca * (yi - ty)).astype(np.float32)
        self._xi, self._yi = xi, yi
        self.base = self._body()

    def to_px(self, x, y):
        xi = self.ca * x - self.sa * y + self.shift[0]
        yi = self.sa * x + self.ca * y + self.shift[1]
        return (xi + 0.5) * self.size - 0.5, (yi + 0.5) * self.size - 0.5

    def box(self, x, y, rad):
        col, row = self.to_px(x, y)
        r = rad * self.size + 2
        n = self.size
        r0, r1 = max(0, int(row - r)), min(n, int(math.ceil(row + r)) + 1)
        c0, c1 = max(0, int(col - r)), min(n, int(math.ceil(col + r)) + 1)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))

    def _paint_ellipse(self, hu, cx, cy, ax, ay, ang, value, edge_px=0.8):
        sl = self.box(cx, cy, max(ax, ay))
        d = _ellipse_d(self.X[sl], self.Y[sl], cx, cy, ax, ay, ang)
        a = np.clip(0.5 + (1.0 - d) * min(ax, ay) * self.size / edge_px, 0.0, 1.0)
        hu[sl] += a * (value - hu[sl])

    def _cavity_level(self, x, y):
        return _superellipse_level(x, y - self.yc, self.bxc, self.byc_a, self.byc_p, self.p_a, self.p_p)

    def _body(self):
        """The z-independent part: air, couch, fat, muscle, cavity fat, sternum, spine."""
        X, Y = self.X, self.Y
        hu = np.full((self.size, self.size), AIR, np.float32)
        present, gap, curve = self.couch
        if present:  # the couch stays level in the image while the patient is posed on it
            xi, yi = self._xi, self._yi
            top = self.shift[1] + self.yc + self.by_p + gap - curve * xi ** 2
            dy = (yi - top) * self.size
            on = np.abs(xi) < 0.47
            foam = on & (dy > 0) & (dy < 0.025 * self.size)
            hu[foam] = -700.0
            for off in (0.0, 0.025 * self.size):
                hu += on * np.clip(1.2 - np.abs(dy - off), 0, 1) * (150.0 - hu)
        yr = Y - self.yc
        lb = _superellipse_level(X, yr, self.bx, self.by_a, self.by_p, self.p_a, self.p_p)
        rb = np.hypot(X, yr)
        db = rb * (lb - 1.0) / np.maximum(lb, 1e-6)  # signed radial distance to the skin
        phi = np.arctan2(yr, np.abs(X))
        amp, ph = self.fat_wobble
        t_fat = self.t_fat * (1.0 + amp * np.cos(2 * phi + ph))
        px = 1.0 / self.size
        hu += np.clip(0.5 - db / px, 0, 1) * (FAT - hu)
        hu += np.clip(0.5 - (db + t_fat) / px, 0, 1) * (MUSCLE - hu)
        lc = self._cavity_level(X, Y)
        rc = np.hypot(X, yr)
        self.dc = rc * (lc - 1.0) / np.maximum(lc, 1e-6)  # radial distance outside the cavity
        self.phi = phi
        hu += np.clip(0.5 - self.dc / px, 0, 1) * (MED_FAT - hu)
        # Rib band pixels, for the per-slice ribs.
        band = (self.dc > -0.003) & (self.dc < self.rib_th + 0.004)
        self.rib_idx = np.flatnonzero(band)
        # Sternum.
        ys = self.yc - self.byc_a - 0.5 * self.rib_th
        self._paint_ellipse(hu, 0.0, ys, 0.03, 0.011, 0.0, CORTEX)
        self._paint_ellipse(hu, 0.0, ys, 0.024, 0.006, 0.0, MARROW)
        # Vertebra: body (cortex + marrow), canal, arch, spinous and transverse processes.
        rv, yv = self.r_vb, self.y_vb
        yk = yv + rv + 0.016
        for sx in (-1, 1):
            self._paint_ellipse(hu, sx * 0.034, yk - 0.002, 0.024, 0.007, sx * 0.35, CORTEX)
        self._paint_ellipse(hu, 0.0, yk + 0.032, 0.007, 0.022, 0.0, CORTEX)
        self._paint_ellipse(hu, 0.0, yk, 0.026, 0.024, 0.0, CORTEX)
        self._paint_ellipse(hu, 0.0, yk, 0.015, 0.014, 0.0, 25.0)
        self._paint_ellipse(hu, 0.0, yv, rv, rv * 0.92, 0.0, CORTEX)
        self._paint_ellipse(hu, 0.0, yv, rv - 0.005, rv * 0.92 - 0.005, 0.0, MARROW)
        return hu

    def _structures(self, z):
        """Mediastinal structures cut at height z: (cx, cy, ax, ay, angle, HU, keeps lung out)."""
        s = []
        yc, yv, rv = self.yc, self.y_vb, self.r_vb
        ytr = yv - rv - 0.035
        desc = (rv + 0.022, yv - 0.3 * rv)
        asc = (-0.03, yc - 0.05)
        hx, hy, hax, hay, hang = self.heart
        if z < self.z_heart:
            f = min(1.0, (self.z_heart - z) / 0.12) ** 0.5
            s.append((hx, hy, hax * f + 0.012, hay * f + 0.012, hang, MED_FAT, True))  # epicardial fat
            s.append((hx, hy, hax * f, hay * f, hang, BLOOD, True))
        if z < self.z_arch:
            s.append((*desc, self.r_ao, self.r_ao, 0.0, BLOOD, True))
        if self.z_heart - 0.05 < z < self.z_arch:
            s.append((*asc, 0.03, 0.03, 0.0, BLOOD, True))
        if self.z_heart - 0.04 < z < self.z_heart + 0.05:
            s.append((0.035, yc - 0.075, 0.028, 0.028, 0.0, BLOOD, True))  # pulmonary trunk
        if self.z_heart - 0.03 < z < 0.85:
            s.append((-0.065, yc - 0.035, 0.018, 0.018, 0.0, BLOOD, True))  # SVC
        if self.z_arch <= z < self.z_arch + 0.06:
            mx, my = 0.5 * (asc[0] + desc[0]), 0.5 * (asc[1] + desc[1])
            half = 0.5 * math.hypot(desc[0] - asc[0], desc[1] - asc[1])
            ang = math.atan2(desc[1] - asc[1], desc[0] - asc[0])
            s.append((mx, my, half + 0.026, 0.026, ang, BLOOD, True))
        elif z >= self.z_arch + 0.06:  # supra-aortic branches
            for cx, cy, r in ((-0.035, yc - 0.04, 0.015), (0.0, yc - 0.05, 0.012), (0.03, yc - 0.03, 0.014)):
                s.append((cx, cy, r, r, 0.0, BLOOD, True))
        s.append((0.022, ytr + 0.025, 0.011, 0.011, 0.0, 35.0, True))  # oesophagus
        if z >= self.z_car:
            s.append((0.0, ytr, 0.03, 0.028, 0.0, AIRWAY_WALL, True))
            s.append((0.0, ytr, 0.026, 0.024, 0.0, AIR, False))
        elif z > self.z_car - 0.1:  # main bronchi, running out to the hila
            t = (self.z_car - z) / 0.1
            r = 0.018 * (1.0 - 0.3 * t)
            for sx in (-1, 1):
                cx = sx * (0.015 + 0.07 * t)
                s.append((cx, ytr + 0.005, r + 0.003, r + 0.003, 0.0, AIRWAY_WALL, False))
                s.append((cx, ytr + 0.005, r, r, 0.0, AIR, False))
        return s

    def _domes(self, z):
        """Liver (right) and spleen (left) domes at the lung bases: (cx, cy, ax, ay)."""
        if z >= 0.32:
            return []
        f = ((0.32 - z) / 0.12) ** 0.7
        out = []
        for side, k in ((0, 1.0), (1, 0.7)):
            cx, cy = self.lung_centre(side)
            sx = 1 if side == 0 else -1
            out.append((cx + sx * 0.06, cy - 0.09, 0.2 * f * k, 0.15 * f * k))
        return out

    def lung_centre(self, side):
        sx = -1 if side == 0 else 1  # the patient's right lung is on the image left
        return sx * (self.w_med + 0.48 * (self.bxc - self.w_med)), self.yc + 0.02

    def _lung_region(self, x, y, z, structs, domes):
        ok = (self._cavity_level(x, y) < 0.985) & (np.abs(x) > self.w_med)
        for cx, cy, ax, ay, ang, _, excl in structs:
            if excl:
                ok &= _ellipse_d(x, y, cx, cy, ax + 0.008, ay + 0.008, ang) > 1.0
        ok &= ~((np.abs(x) < self.r_vb + 0.012) & (y > self.y_vb - 0.6 * self.r_vb))
        for cx, cy, ax, ay in domes:
            ok &= _ellipse_d(x, y, cx, cy, ax, ay, 0.0) > 1.0
        return ok

    def _lung_radius(self, side, z, structs, domes, n_theta=120, n_t=100, t_max=0.36):
        """Radius r(theta) of the star-shaped lung outline around its centre at height z."""
        cx, cy = self.lung_centre(side)
        th = np.linspace(-math.pi, math.pi, n_theta, endpoint=False)
        t = (np.arange(n_t) + 1) * (t_max / n_t)
        x = cx + np.cos(th)[:, None] * t[None, :]
        y = cy + np.sin(th)[:, None] * t[None, :]
        ins = self._lung_region(x, y, z, structs, domes)
        first_out = np.where(ins.all(1), n_t, ins.argmin(1))
        r = first_out * (t_max / n_t)
        r = ndimage.convolve1d(r, np.array([1, 2, 3, 2, 1]) / 9.0, mode="wrap")  # round the corners
        a2, p2, a3, p3 = self.lung_wobble[side]
        r *= 1.0 - a2 * 0.5 * (1 + np.cos(2 * th + p2)) - a3 * 0.5 * (1 + np.cos(3 * th + p3))
        # Craniocaudal profile: full in the middle, small at the apex, a little smaller at the base.
        if z > 0.6:
            prof = 1.0 - 0.55 * ((z - 0.6) / 0.4) ** 1.5
        elif z < 0.3:
            prof = 1.0 - 0.25 * ((0.3 - z) / 0.3) ** 1.5
        else:
            prof = 1.0
        return th, np.maximum(r * prof, 0.0)

    # Rendering -----------------------------------------------------------------------------------

    def _uv_to_xy(self, lung, u, v):
        """Lung-relative (u, v) -> patient coordinates on this slice."""
        c, th, r = lung["centre"], lung["theta"], lung["r"]
        sx = 1.0 if lung["side"] == 0 else -1.0  # u points medially
        dx, dy = sx * u, v
        rr = np.interp(np.arctan2(dy, dx), th, r, period=2 * math.pi)
        return c[0] + rr * dx, c[1] + rr * dy

    def _lung_maps(self, side, z, structs, domes):
        th, r = self._lung_radius(side, z, structs, domes)
        cx, cy = self.lung_centre(side)
        sl = self.box(cx, cy, float(r.max()) + 0.01)
        dx, dy = self.X[sl] - cx, self.Y[sl] - cy
        ang = np.arctan2(dy, dx)
        dist = np.hypot(dx, dy)
        rp = np.interp(ang, th, r, period=2 * math.pi).astype(np.float32)
        mask = np.clip(0.5 + (rp - dist) * self.size, 0.0, 1.0)
        rho = dist / np.maximum(rp, 1e-6)
        psi = math.pi - ang if side == 0 else ang  # 0 lateral, +pi/2 posterior
        psi = (psi + math.pi) % (2 * math.pi) - math.pi
        return dict(side=side, centre=(cx, cy), theta=th, r=r, sl=sl, mask=mask, rho=rho, psi=psi)

    def _cut(self, lung, z, s, e, radius, off, scale=1.0, offset=0.0, max_len=None):
        """Cut 3-D segments (lung-relative coords) with the slab around z: 2-D pixel segments
        (ax, ay, bx, by, radius_px) to render; max_len (in radii) drops cuts longer than that,
        i.e. keeps only cross-sections."""
        hh = SLAB_HALF + radius / LUNG_H
        z0, z1 = s[:, 2], e[:, 2]
        vis = (np.maximum(z0, z1) >= z - hh) & (np.minimum(z0, z1) <= z + hh)
        if not vis.any():
            return (np.zeros(0),) * 5
        s, e, hh, rad = s[vis] + offset * off[vis], e[vis] + offset * off[vis], hh[vis], radius[vis] * scale
        dz = e[:, 2] - s[:, 2]
        flat = np.abs(dz) < 1e-9
        dzs = np.where(flat, 1.0, dz)
        ta, tb = (z - hh - s[:, 2]) / dzs, (z + hh - s[:, 2]) / dzs
        t0 = np.where(flat, 0.0, np.clip(np.minimum(ta, tb), 0, 1))
        t1 = np.where(flat, 1.0, np.clip(np.maximum(ta, tb), 0, 1))
        a = s + t0[:, None] * (e - s)
        b = s + t1[:, None] * (e - s)
        ax, ay = self.to_px(*self._uv_to_xy(lung, a[:, 0], a[:, 1]))
        bx, by = self.to_px(*self._uv_to_xy(lung, b[:, 0], b[:, 1]))
        if max_len is not None:
            short = np.hypot(bx - ax, by - ay) <= max_len * rad * self.size
            ax, ay, bx, by, rad = ax[short], ay[short], bx[short], by[short], rad[short]
        return ax, ay, bx, by, rad * self.size

    def _ribs(self, hu, z):
        """Rib cross-sections: arcs around the cavity, irregularly spaced and sized, drifting
        along the wall with z (ribs slope); longer posteriorly, cartilage anteriorly."""
        period, phase, slope, side_shift = self.rib
        centre_jit, half_w, thick = self.rib_jit
        idx = self.rib_idx
        dc, phi = self.dc.ravel()[idx], self.phi.ravel()[idx]
        x = self.X.ravel()[idx]
        q = phi / period + phase + slope * z + np.where(x < 0, 0.0, side_shift)
        i = np.floor(q).astype(np.int64) % 16
        posterior = np.clip(phi / 1.2, 0, 1)  # posterior ribs run in-plane: longer arcs
        hw = half_w[i] * (1.0 + 0.8 * posterior)
        dist = np.abs(q - np.floor(q) - 0.5 - centre_jit[i])
        ang_w = period * self.size * 0.25  # pixels per unit of q, roughly
        keep = _smoothstep((phi + math.pi / 2 - 0.35) / 0.1) * _smoothstep((math.pi / 2 - 0.28 - phi) / 0.1)
        a_ang = np.clip(0.5 + (hw - dist) * ang_w, 0, 1) * keep
        a_ang_in = np.clip(0.5 + (hw - dist) * ang_w - 1.5, 0, 1) * keep
        px = 1.0 / self.size
        th = self.rib_th * thick[i]
        a_rad = np.clip(0.5 + np.minimum(dc - 0.001, th + 0.001 - dc) / px, 0, 1)
        a_in = np.clip(0.5 + np.minimum(dc - 0.001, th + 0.001 - dc) / px - 1.5, 0, 1)
        cart = phi < -0.9  # costal cartilage anteriorly
        flat = hu.ravel()
        vals = flat[idx]
        vals += a_rad * a_ang * (np.where(cart, CARTILAGE, CORTEX) - vals)
        vals += a_in * a_ang_in * ~cart * (MARROW - vals)
        flat[idx] = vals

    def _lesion_alpha(self, les, lung, z, F, G):
        """Soft occupancy of one finding on its lung's box (or None when the slice misses it)."""
        scale = les.scale_at(z)
        if scale <= 0:
            return None
        sl = lung["sl"]
        if les.sector is not None:
            hw, rho_in, _, hi, drift = les.sector
            dpsi = np.abs((lung["psi"] - les.psi - drift * (z - hi) + math.pi) % (2 * math.pi) - math.pi)
            wob = 1.0 + les.irregular * F[sl]
            a = _smoothstep((hw * wob - dpsi) / 0.12) * _smoothstep((lung["rho"] * wob - rho_in) / 0.08)
            return sl, a * scale
        u, v = _uv(les.psi, les.rho)
        cx, cy = self._uv_to_xy(lung, np.array([u]), np.array([v]))
        cx, cy = float(cx[0]), float(cy[0])
        floor = 1.2 / self.size  # at least ~a pixel, so a cut lesion always shows
        a_t, a_r = max(les.a_t * scale, floor), max(les.a_r * scale, floor)
        box = self.box(cx, cy, max(a_t, a_r) * (1.0 + les.irregular) + les.soft * max(a_t, a_r))
        r0, r1 = max(box[0].start, sl[0].start), min(box[0].stop, sl[0].stop)
        c0, c1 = max(box[1].start, sl[1].start), min(box[1].stop, sl[1].stop)
        if r1 <= r0 or c1 <= c0:
            return None
        fsl = (slice(r0, r1), slice(c0, c1))
        X, Y = self.X[fsl], self.Y[fsl]
        lcx, lcy = lung["centre"]
        nx, ny = cx - lcx, cy - lcy
        nn = math.hypot(nx, ny) or 1.0
        nx, ny = nx / nn, ny / nn  # radial (towards the pleura) and tangential axes
        dx, dy = X - cx, Y - cy
        d = np.hypot((dx * ny - dy * nx) / a_t, (dx * nx + dy * ny) / a_r)
        if les.irregular:
            d = d * (1.0 + les.irregular * F[fsl])
        edge = max(les.soft, 0.8 / (min(a_t, a_r) * self.size))
        a = _smoothstep((1.0 - d) / edge)
        if les.patchy:
            a = a * np.clip(1.0 + les.patchy * G[fsl], 0.0, 1.0)
        local = (slice(r0 - sl[0].start, r1 - sl[0].start), slice(c0 - sl[1].start, c1 - sl[1].start))
        return fsl, a, local

    def render(self, k, masks=False):
        """Slice k: dict with "hu" (final HU, float32), "image" (uint8), "z", "findings", and with
        masks=True also "hu_clean" (before calibration / noise), "lung" (0 none, 1 right, 2 left),
        "lesion", "ggo", "consolidation" (bool)."""
        n, z = self.size, float(self.zs[k])
        hu = self.base.copy()
        self._ribs(hu, z)
        structs, domes = self._structures(z), self._domes(z)
        w = 2 * math.pi * z / 0.25  # texture fields rotate with z: smooth change between slices
        cw, sw = math.cos(w), math.sin(w)
        (F1, G1, H1), (F2, G2, H2) = self.fields
        F, G, H = cw * F1 + sw * F2, cw * G1 + sw * G2, cw * H1 + sw * H2

        lungs = [self._lung_maps(side, z, structs, domes) for side in (0, 1)]
        m = np.zeros((n, n), np.float32)
        for lg in lungs:
            m[lg["sl"]] = np.maximum(m[lg["sl"]], lg["mask"])
        # Liver / spleen domes, then parenchyma with a posterior (dependent) density gradient.
        for cx, cy, ax, ay in domes:
            self._paint_ellipse(hu, cx, cy, ax, ay, 0.0, LIVER)
        lung_hu = self.lung_hu + self.lung_grad * np.clip((self.Y - self.yc) / 0.25 + 0.5, 0, 1) + 6.0 * H
        hu += m * (lung_hu - hu)

        # Findings.
        # Added / subtracted HU, dense-layer alpha and target, bronchogram alpha, and for the
        # masks: any lesion, ground glass, consolidation.
        zeros = [np.zeros((n, n), np.float32) for _ in range(8)]
        haze, dark, dense_a, dense_hu, bg_a, any_a, ggo_a, cons_a = zeros
        found = {}
        for les in self.lesions:
            lung = lungs[les.lung]
            res = self._lesion_alpha(les, lung, z, F, G)
            if res is None:
                continue
            if les.sector is not None:
                fsl, a = res
                lm = lung["mask"]
            else:
                fsl, a, local = res
                lm = lung["mask"][local]
            a = a * lm
            if les.layer == "haze":
                delta = a * (les.hu - self.lung_hu)
                if les.crazy:
                    # Thickened septa: the zero lines of a band-pass field form a polygonal net.
                    net = np.exp(-(self.band[0][fsl] * cw + self.band[1][fsl] * sw) ** 2 / 0.03)
                    delta = delta + a * 350.0 * net
                haze[fsl] = np.maximum(haze[fsl], delta)
            elif les.layer == "dark":
                dark[fsl] = np.minimum(dark[fsl], a * (les.hu - self.lung_hu))
            else:
                sel = a > dense_a[fsl]
                dense_hu[fsl] = np.where(sel, les.hu, dense_hu[fsl])
                dense_a[fsl] = np.maximum(dense_a[fsl], a)
                if les.bronchogram:
                    bg_a[fsl] = np.maximum(bg_a[fsl], a)
            if les.tag in ("ggo", "bronchopneumonia") and les.layer == "haze":
                ggo_a[fsl] = np.maximum(ggo_a[fsl], a)
            if les.tag == "consolidation":
                cons_a[fsl] = np.maximum(cons_a[fsl], a)
            any_a[fsl] = np.maximum(any_a[fsl], a)
            seen = int((a > 0.3).sum())
            if seen:
                found[les.tag] = found.get(les.tag, 0) + seen
                if les.crazy:
                    found["crazy_paving"] = found.get("crazy_paving", 0) + seen
        hu += haze + dark

        # Vessels and airways, per lung; vessels stay visible through ground glass.
        cuts = {"ves": [], "outer": [], "inner": [], "bron": []}
        for lg, (s, e, r, cnt, off) in zip(lungs, self.trees):
            cuts["ves"].append(self._cut(lg, z, s, e, r, off))
            aw = cnt >= 100  # bronchi down to a few generations
            # Airways only where cut across (rings): along their length they blend in.
            cuts["outer"].append(self._cut(lg, z, s[aw], e[aw], r[aw], off[aw], 0.8, 1.0, max_len=2.5))
            cuts["inner"].append(self._cut(lg, z, s[aw], e[aw], r[aw], off[aw], 0.62, 1.0, max_len=3.2))
            if bg_a[lg["sl"]].max(initial=0.0) > 0:
                bw = cnt >= 6
                cuts["bron"].append(self._cut(lg, z, s[bw], e[bw], r[bw], off[bw], 0.6, 1.0))
        ves, outer, inner, bron = (
            _render_tubes(n, *(np.concatenate(c) for c in zip(*cuts[key]))) if cuts[key]
            else np.zeros((n, n), np.float32) for key in ("ves", "outer", "inner", "bron"))
        wall, lumen = np.clip(outer - inner, 0, 1), inner
        ves = np.minimum(ves, 1.0) * m
        hu += ves * (VESSEL - hu)
        solid = 1.0 - dense_a
        hu += 0.7 * np.minimum(wall, 1.0) * m * solid * (AIRWAY_WALL - hu)  # thin: partial volume
        hu += np.minimum(lumen, 1.0) * m * (AIR + 30.0 - hu)
        hu += dense_a * (dense_hu + 20.0 * G - hu)
        hu += np.minimum(bron + lumen, 1.0) * bg_a * (-920.0 - hu)  # air bronchograms

        for cx, cy, ax, ay, ang, val, _ in structs:  # mediastinum on top
            self._paint_ellipse(hu, cx, cy, ax, ay, ang, val)

        # Scanner: calibration about air, correlated noise, mild blur.
        scale, offset = self.cal
        clean = hu
        rng = np.random.default_rng([self.noise_seed, k])
        gain = 2.0 * math.sqrt(math.pi) * self.blur  # std lost to the blur, roughly
        noise = rng.standard_normal((n, n), np.float32) * (self.noise_hu * gain)
        noisy = (hu - AIR) * scale + AIR + offset + noise
        final = ndimage.gaussian_filter(noisy, self.blur, truncate=3.0).astype(np.float32)

        lung_lab = np.zeros((n, n), np.uint8)
        for lg in lungs:
            lung_lab[lg["sl"]][lg["mask"] >= 0.5] = lg["side"] + 1
        lesion = (any_a >= 0.3) & (lung_lab > 0)
        if self.label == 1 and not lesion.any():
            raise RuntimeError(f"internal error: COVID slice {k} without a lesion")
        findings = sorted(found) or ["normal"]
        out = dict(hu=final, image=window_to_uint8(final), z=z, findings=findings)
        if masks:
            out.update(hu_clean=clean.astype(np.float32), lung=lung_lab, lesion=lesion,
                       ggo=(ggo_a >= 0.5) & (dense_a < 0.1) & (lung_lab > 0),
                       consolidation=(cons_a >= 0.5) & (lung_lab > 0))
        return out


def simulate_patient(patient_index, *, seed=0, label=1, size=256, slices_per_patient=8, pattern=None,
                     masks=True):
    """The slices of one synthetic patient, as `generate_dataset` draws them for this seed and
    index (given the same label). Returns (info, slices): info = {"pattern", "label", "z"} and a
    list of per-slice dicts (see `_Patient.render`). `pattern` forces the case (e.g. "normal",
    "lobar", "covid_severe") instead of drawing it; for tests and figures."""
    p = _Patient(seed, patient_index, label, size, slices_per_patient, pattern)
    info = dict(pattern=p.pattern, label=label, z=p.zs.tolist())
    return info, [p.render(k, masks=masks) for k in range(slices_per_patient)]


# --- the dataset --------------------------------------------------------------------------------

def _int_arg(name, value, minimum):
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _fraction_arg(name, value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value}")
    return value


def _plan(patients, seed, covid_fraction, val_fraction, test_fraction):
    """Labels and patient-level splits, stratified by class, from the seed alone."""
    n_covid = int(round(patients * covid_fraction))
    counts = {1: n_covid, 0: patients - n_covid}
    sizes = {}
    for c, n in counts.items():
        n_test, n_val = max(1, round(n * test_fraction)), max(1, round(n * val_fraction))
        if n - n_test - n_val < 1:
            raise ValueError(
                f"patients={patients} is too few for covid_fraction={covid_fraction}, "
                f"val_fraction={val_fraction}, test_fraction={test_fraction}: each of train/val/test needs "
                f"at least one COVID and one non-COVID patient, but there would be {counts[1]} COVID and "
                f"{counts[0]} non-COVID patients")
        sizes[c] = (n - n_test - n_val, n_val, n_test)
    rng = np.random.default_rng([seed, _SPLIT_TAG, 1])
    labels = np.zeros(patients, np.int64)
    labels[rng.permutation(patients)[:n_covid]] = 1
    split = [""] * patients
    for c in (1, 0):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train, n_val, _ = sizes[c]
        for j, i in enumerate(idx):
            split[i] = "train" if j < n_train else "val" if j < n_train + n_val else "test"
    return labels.tolist(), split


def _name(i, k, width):
    return f"synth_p{i:0{width}d}_s{k:02d}.png"


def _work(task):
    """One patient: render its slices and write the PNGs (module level: picklable for spawn)."""
    seed, i, label, size, n_slices, out_dir, width = task
    p = _Patient(seed, i, label, size, n_slices)
    folder = Path(out_dir) / "Images-processed" / _CLASS_DIRS[label][0]
    rows = []
    for k in range(n_slices):
        sl = p.render(k)
        name = _name(i, k, width)
        buf = io.BytesIO()
        Image.fromarray(sl["image"], mode="L").save(buf, format="PNG", compress_level=1)  # speed
        _write_atomic(folder / name, buf.getvalue())
        rows.append((name, k, round(float(sl["z"]), 4), sl["findings"]))
    return i, p.pattern, rows


def _write_atomic(path, data):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    os.replace(tmp, path)


def generate_dataset(out_dir, *, patients: int = 120, slices_per_patient: int = 8, size: int = 256,
                     seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.25,
                     covid_fraction: float = 0.5, workers: int = 1, progress: bool = True) -> dict:
    """Write a synthetic chest-CT dataset in the COVID-CT layout under out_dir (see the module
    docstring) and return a summary: {"out_dir", "seconds", "slices" and "patients" per split and
    class, "total_slices", "total_patients"}.

    Same arguments -> byte-identical files, whatever `workers` (processes) is; synth_info.json
    therefore records every argument but `workers` and `progress` (and no timing). Images are written
    first and the split / meta / info files last, each atomically, so a crash never leaves a split
    file naming a missing image; old split files are removed first, and PNGs of a previous run
    (named synth_p*_s*.png) that this run does not write are deleted at the end.
    """
    t_start = time.perf_counter()
    patients = _int_arg("patients", patients, 1)
    slices_per_patient = _int_arg("slices_per_patient", slices_per_patient, 1)
    size = _int_arg("size", size, 32)
    if size > 4096:
        raise ValueError(f"size must be <= 4096, got {size}")
    seed = _int_arg("seed", seed, 0)
    workers = _int_arg("workers", workers, 1)
    val_fraction = _fraction_arg("val_fraction", val_fraction)
    test_fraction = _fraction_arg("test_fraction", test_fraction)
    covid_fraction = _fraction_arg("covid_fraction", covid_fraction)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    if slices_per_patient > 100:
        raise ValueError(f"slices_per_patient must be <= 100, got {slices_per_patient}")
    labels, split = _plan(patients, seed, covid_fraction, val_fraction, test_fraction)

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir {str(out)!r} exists and is not a directory")
    split_files = [out / "Data-split" / d / f"{s}CT_{d}.txt" for d in ("COVID", "NonCOVID") for s in SPLITS]
    meta_files = [out / "COVID-CT-MetaInfo.csv", out / "NonCOVID-CT-MetaInfo.csv", out / "synth_info.json"]
    for f in split_files + meta_files:  # never let old lists point into a half-written set
        if f.exists():
            f.unlink()
    for c in (0, 1):
        (out / "Images-processed" / _CLASS_DIRS[c][0]).mkdir(parents=True, exist_ok=True)
        (out / "Data-split" / _CLASS_DIRS[c][1]).mkdir(parents=True, exist_ok=True)

    width = max(4, len(str(patients - 1)))
    tasks = [(seed, i, labels[i], size, slices_per_patient, str(out), width) for i in range(patients)]
    results = {}
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=patients, desc="synthetic CT", unit="patient")
        except ImportError:
            bar = None
    n_proc = min(workers, patients)
    if n_proc > 1:
        with multiprocessing.get_context().Pool(n_proc) as pool:
            for i, pattern, rows in pool.imap_unordered(_work, tasks):
                results[i] = (pattern, rows)
                if bar is not None:
                    bar.update(1)
    else:
        for task in tasks:
            i, pattern, rows = _work(task)
            results[i] = (pattern, rows)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    # Lists and metadata, last.
    lists = {(c, s): [] for c in (0, 1) for s in SPLITS}
    meta = {0: [], 1: []}
    info_patients, info_images = {}, {}
    written = {0: set(), 1: set()}
    for i in range(patients):
        pattern, rows = results[i]
        pid, c = f"synth_p{i:0{width}d}", labels[i]
        info_patients[pid] = dict(label=c, split=split[i], pattern=pattern)
        for name, k, z, findings in rows:
            lists[c, split[i]].append(name)
            meta[c].append((name, pid))
            written[c].add(name)
            info_images[name] = dict(patient=pid, label=c, split=split[i], slice=k, z=z, findings=findings)
    for c in (0, 1):
        folder, short = _CLASS_DIRS[c]
        for s in SPLITS:
            _write_atomic(out / "Data-split" / short / f"{s}CT_{short}.txt",
                          "".join(f"{name}\n" for name in lists[c, s]))
        buf = io.StringIO()
        wr = csv.writer(buf, lineterminator="\n")
        wr.writerow(["File name", "Patient ID"] if c == 1 else ["image name", "patient id"])
        wr.writerows(meta[c])
        meta_name = "COVID-CT-MetaInfo.csv" if c == 1 else "NonCOVID-CT-MetaInfo.csv"
        _write_atomic(out / meta_name, buf.getvalue())
    counts = {s: {cls: dict(patients=sum(1 for i in range(patients) if split[i] == s and labels[i] == c),
                            slices=len(lists[c, s])) for c, cls in ((1, "covid"), (0, "noncovid"))}
              for s in SPLITS}
    info = dict(
        generator="mutex_attn.data.synth_ct", version=GENERATOR_VERSION,
        note="synthetic images imitating lung-windowed chest CT; not medical data",
        window_hu=list(WINDOW_HU),
        arguments=dict(patients=patients, slices_per_patient=slices_per_patient, size=size, seed=seed,
                       val_fraction=val_fraction, test_fraction=test_fraction, covid_fraction=covid_fraction),
        counts=counts, patients=info_patients, images=info_images,
    )
    _write_atomic(out / "synth_info.json", json.dumps(info, indent=1, sort_keys=True) + "\n")
    for c in (0, 1):  # PNGs of an earlier, larger run that no list names any more
        for f in (out / "Images-processed" / _CLASS_DIRS[c][0]).iterdir():
            if _NAME_RE.match(f.name) and f.name not in written[c]:
                f.unlink()

    def per_split(key):
        return {s: {cls: counts[s][cls][key] for cls in ("covid", "noncovid")} for s in SPLITS}

    return dict(out_dir=str(out), seconds=round(time.perf_counter() - t_start, 3),
                slices=per_split("slices"), patients=per_split("patients"),
                total_slices=patients * slices_per_patient, total_patients=patients)
