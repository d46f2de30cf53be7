#!/usr/bin/env python3
"""Synthetic surface-inspection images with exact defect masks.

Classes (index order): ok, scratch, spot, crack.

    make_defects.py --out DIR --count N --seed S [--size 128] [--ok-count M]

writes
    DIR/images/<class>/<NNNN>.png   RGB, size x size
    DIR/masks/<class>/<NNNN>.png    L, 0 or 255 (defect classes only; `ok` has no mask)

N images per defect class and M (default N) `ok` images. Only numpy and Pillow are used.
Every image is drawn from its own generator, numpy.random.default_rng([seed, class, index]),
so the same seed gives byte-identical files, and image k of a class does not depend on --count.

Surfaces (chosen at random per image): brushed metal, wood grain, woven fabric, cast/painted
surface. Each has a random colour, scale, orientation, lighting gradient and sensor noise.

Defects (one per image):
  scratch  a straight or gently curved stroke, 5-9 px wide, 35-110 px long, brighter (65 %)
           or darker than the surface, with streaks along its length and soft (1 px) edges;
  spot     a blob (stain, rust, paint drop) with an irregular outline, an ellipse of mean
           radius 4-10 px squashed to 0.65-1 of that across; the deposit hides 60-100 % of
           the surface texture under a smoother film with a fine grain of its own, and is
           darker, lighter or rust-tinted, shaded from centre to rim;
  crack    a jagged random walk of 8-19 steps of 4-6.5 px (half of them with one branch),
           5.5-8 px wide at its widest, tapering to 4.5 px at the ends, dark with a lighter
           rim on one side.
Widths are in pixels at --size 128 and scale with the size.
The mask is exactly the set of pixels whose defect opacity is >= 0.5 (for strokes: distance
to the centre line <= half the width; for spots: inside the outline). The opacity falls
linearly over 1 px around that boundary, so the visible edge and the mask agree to a pixel.
Contrast, size, position and orientation are random per image; contrast ranges from subtle
(about the amplitude of the texture) to strong.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("ok", "scratch", "spot", "crack")
# stroke widths in px at 128x128 (scaled with --size)
SCRATCH_WIDTH = (5.0, 9.0)
CRACK_WIDTH = (5.5, 8.0)   # widest point; the ends taper to CRACK_END_WIDTH
CRACK_END_WIDTH = 4.5
SPOT_RADIUS = (4.0, 10.0)  # mean radius before the ellipse squash (0.65-1) and the outline wobble
SURFACES = ("metal", "wood", "fabric", "cast")


# ----------------------------------------------------------------------------- helpers

def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a cells x cells random grid upsampled bicubically."""
    g = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(g, mode="F").resize((size, size), Image.BICUBIC)
    a = np.asarray(img, dtype=np.float32)
    return a / (np.abs(a).max() + 1e-6)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (reflect padding), float32."""
    r = max(1, int(math.ceil(3 * sigma)))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-x * x / (2 * sigma * sigma))
    k = (k / k.sum()).astype(np.float32)
    p = np.pad(a.astype(np.float32), r, mode="reflect")
    n0, n1 = a.shape
    rows = sum(k[i] * p[:, i:i + n1] for i in range(2 * r + 1))
    return sum(k[i] * rows[i:i + n0, :] for i in range(2 * r + 1)).astype(np.float32)


def _rotate_crop(a: np.ndarray, angle_deg: float, size: int) -> np.ndarray:
    """Rotate a square float array (side >= size*1.5) and take the central size x size."""
    img = Image.fromarray(a.astype(np.float32), mode="F").rotate(angle_deg, resample=Image.BILINEAR)
    b = np.asarray(img, dtype=np.float32)
    o = (b.shape[0] - size) // 2
    return b[o:o + size, o:o + size]


def _lighting(rng, size: int) -> np.ndarray:
    """A soft linear gradient plus a broad highlight, multiplicative, around 1."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    th = rng.uniform(0, 2 * math.pi)
    grad = (np.cos(th) * xx + np.sin(th) * yy) * rng.uniform(0.0, 0.3)
    cx, cy = rng.uniform(-0.5, 0.5, 2)
    hl = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * rng.uniform(0.15, 0.4) ** 2))
    return 1.0 + grad + hl * rng.uniform(0.0, 0.2)


def _tint(rng, base: float, sat: float) -> np.ndarray:
    """An RGB colour of brightness ~base with a random hue of saturation sat."""
    h = rng.uniform(0, 2 * math.pi)
    c = np.array([math.cos(h), math.cos(h - 2.094), math.cos(h + 2.094)], np.float32)
    return base * (1.0 + sat * c)


# ----------------------------------------------------------------------------- surfaces

def surface(rng: np.random.Generator, size: int, kind: str) -> tuple[np.ndarray, float]:
    """Returns (RGB float image in ~[0,1], texture amplitude used to scale defect contrast)."""
    big = int(size * 1.5) + 2
    s = size / 128.0
    if kind == "metal":
        n = rng.standard_normal((big, big)).astype(np.float32)
        L = max(3, int(rng.uniform(12, 40) * s))
        k = np.ones(L, np.float32) / L
        # box blur along x by cumulative sums (wraps: fine for noise)
        c = np.cumsum(np.concatenate([n[:, -L:], n], axis=1), axis=1)
        streak = (c[:, L:] - c[:, :-L]) * math.sqrt(L) / L
        streak = _rotate_crop(streak, rng.uniform(0, 180), size)
        fine = _blur(rng.standard_normal((size, size)).astype(np.float32), 0.6)
        lum = rng.uniform(0.45, 0.72) + rng.uniform(0.03, 0.07) * streak + 0.015 * fine
        lum = lum + 0.04 * _smooth_noise(rng, size, 4)
        col = _tint(rng, 1.0, rng.uniform(0.0, 0.06))
        amp = 0.06
        rgb = lum[..., None] * col
    elif kind == "wood":
        yy, xx = np.mgrid[0:big, 0:big].astype(np.float32) * (128.0 / size)
        turb = _smooth_noise(rng, big, 5) * rng.uniform(4, 12) + _smooth_noise(rng, big, 12) * 1.5
        period = rng.uniform(6, 14)
        phase = (yy + turb + rng.uniform(0, 2) * np.sin(xx / rng.uniform(15, 40))) / period
        rings = 0.5 + 0.5 * np.sin(2 * math.pi * phase)
        rings = rings ** rng.uniform(1.0, 3.0)
        grain = _blur(rng.standard_normal((big, big)).astype(np.float32), 0.7)
        t = _rotate_crop(rings, rng.uniform(-30, 30) + rng.choice([0, 90]), size)
        g = _rotate_crop(grain, 0.0, size)
        light = _tint(rng, rng.uniform(0.55, 0.75), 0.0) * np.array([1.0, 0.78, 0.55], np.float32)
        dark = light * rng.uniform(0.6, 0.8)
        mix = np.clip(t * rng.uniform(0.6, 1.0) + 0.04 * g, 0, 1)[..., None]
        rgb = light * (1 - mix) + dark * mix
        amp = float(np.mean(light - dark))
    elif kind == "fabric":
        yy, xx = np.mgrid[0:big, 0:big].astype(np.float32)
        p = rng.uniform(3.0, 6.0) * s
        wx = np.sin(2 * math.pi * xx / p)
        wy = np.sin(2 * math.pi * yy / p)
        checker = np.sign(np.sin(math.pi * xx / p) * np.sin(math.pi * yy / p))
        weave = 0.5 * (wx * (checker > 0) + wy * (checker <= 0))
        wob = _smooth_noise(rng, big, 8)
        pat = weave * (0.7 + 0.3 * wob) + 0.3 * _blur(rng.standard_normal((big, big)).astype(np.float32), 0.5)
        pat = _rotate_crop(pat, rng.uniform(0, 90), size)
        col = _tint(rng, rng.uniform(0.35, 0.65), rng.uniform(0.1, 0.4))
        k = rng.uniform(0.05, 0.10)
        rgb = col * (1 + k * pat[..., None] / 0.5)
        amp = float(k * np.mean(col))
    else:  # cast / painted: mottled speckle
        m = _smooth_noise(rng, size, 10) * 0.5 + _smooth_noise(rng, size, 24) * 0.3
        sp = _blur(rng.standard_normal((size, size)).astype(np.float32), rng.uniform(0.5, 1.2))
        col = _tint(rng, rng.uniform(0.4, 0.7), rng.uniform(0.0, 0.25))
        lum = 1 + rng.uniform(0.05, 0.12) * m + rng.uniform(0.03, 0.07) * sp
        rgb = col * lum[..., None]
        amp = float(0.08 * np.mean(col))
    rgb = rgb * _lighting(rng, size)[..., None]
    return rgb.astype(np.float32), max(amp, 0.03)


# ----------------------------------------------------------------------------- geometry

def _stroke_distance(size: int, pts: np.ndarray, widths: np.ndarray):
    """For a polyline pts[K,2] (x,y) with per-vertex widths, return (d - w/2) per pixel and the
    arc-length parameter t in [0,1] of the nearest point (both [size,size])."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    best = np.full((size, size), np.inf, np.float32)
    tpar = np.zeros((size, size), np.float32)
    seg_len = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg_len)])
    total = max(cum[-1], 1e-6)
    for i in range(len(pts) - 1):
        (x0, y0), (x1, y1) = pts[i], pts[i + 1]
        dx, dy = x1 - x0, y1 - y0
        l2 = dx * dx + dy * dy + 1e-9
        u = np.clip(((xx - x0) * dx + (yy - y0) * dy) / l2, 0.0, 1.0)
        px, py = x0 + u * dx, y0 + u * dy
        d = np.sqrt((xx - px) ** 2 + (yy - py) ** 2)
        w = widths[i] + u * (widths[i + 1] - widths[i])
        sd = d - w / 2.0
        better = sd < best
        best = np.where(better, sd, best)
        tpar = np.where(better, (cum[i] + u * seg_len[i]) / total, tpar)
    return best, tpar


def _side(size: int, pts: np.ndarray) -> np.ndarray:
    """Signed side (+1/-1) of each pixel w.r.t. the nearest segment's direction (for rims)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    best = np.full((size, size), np.inf, np.float32)
    side = np.zeros((size, size), np.float32)
    for i in range(len(pts) - 1):
        (x0, y0), (x1, y1) = pts[i], pts[i + 1]
        dx, dy = x1 - x0, y1 - y0
        l2 = dx * dx + dy * dy + 1e-9
        u = np.clip(((xx - x0) * dx + (yy - y0) * dy) / l2, 0.0, 1.0)
        d = (xx - x0 - u * dx) ** 2 + (yy - y0 - u * dy) ** 2
        cross = np.sign(dx * (yy - y0) - dy * (xx - x0))
        better = d < best
        best = np.where(better, d, best)
        side = np.where(better, cross, side)
    return side


def _alpha_from_sd(sd: np.ndarray) -> np.ndarray:
    """Opacity 1 inside, 0 outside, linear over 1 px; >= 0.5 exactly where sd <= 0."""
    return np.clip(0.5 - sd, 0.0, 1.0)


def _place(rng, size: int, margin: float) -> np.ndarray:
    return rng.uniform(margin, size - margin, 2)


def _contrast(rng, amp: float) -> float:
    """Defect contrast: from about the texture amplitude (subtle) to several times it."""
    return float(amp * rng.uniform(1.6, 4.5) + rng.uniform(0.03, 0.08))


# ----------------------------------------------------------------------------- defects

def draw_scratch(rng, img: np.ndarray, amp: float):
    size = img.shape[0]
    s = size / 128.0
    length = rng.uniform(35, 110) * s
    width = rng.uniform(*SCRATCH_WIDTH) * s
    th = rng.uniform(0, math.pi)
    c = _place(rng, size, 14 * s)
    d = np.array([math.cos(th), math.sin(th)])
    p0, p1 = c - d * length / 2, c + d * length / 2
    # keep it inside the frame (shift, then clip)
    lo, hi = 6 * s, size - 6 * s
    for p in (p0, p1):
        np.clip(p, lo, hi, out=p)
    bend = rng.uniform(-0.12, 0.12) * length  # gentle curve: quadratic Bezier
    nrm = np.array([-d[1], d[0]])
    ctrl = (p0 + p1) / 2 + nrm * bend
    t = np.linspace(0, 1, 12)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl + t ** 2 * p1
    widths = np.full(len(pts), width)
    widths[0] = widths[-1] = max(SCRATCH_WIDTH[0] * s, width * 0.75)
    sd, tpar = _stroke_distance(size, pts, widths)
    alpha = _alpha_from_sd(sd)
    # streaks along the stroke
    k = rng.standard_normal(64).astype(np.float32)
    k = np.convolve(k, np.ones(5) / 5, mode="same")
    streak = np.interp(tpar * 63, np.arange(64), k).astype(np.float32)
    sign = 1.0 if rng.uniform() < 0.65 else -1.0  # mostly bright (specular) scratches
    ctr = _contrast(rng, amp) * (0.85 + 0.15 * np.clip(streak, -1, 1))
    base = img.mean(axis=2, keepdims=True)
    if sign > 0:
        target = img + ctr[..., None] * (0.6 + 0.4 * base)
    else:
        target = img * (1 - np.clip(ctr[..., None] * 1.3, 0, 0.8))
    out = img * (1 - alpha[..., None]) + target * alpha[..., None]
    return out, sd <= 0


def draw_spot(rng, img: np.ndarray, amp: float):
    size = img.shape[0]
    s = size / 128.0
    R = rng.uniform(*SPOT_RADIUS) * s
    ecc = rng.uniform(0.65, 1.0)
    rot = rng.uniform(0, math.pi)
    c = _place(rng, size, R + 6 * s)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    X, Y = xx - c[0], yy - c[1]
    U = X * math.cos(rot) + Y * math.sin(rot)
    V = (-X * math.sin(rot) + Y * math.cos(rot)) / ecc
    r = np.sqrt(U * U + V * V)
    ang = np.arctan2(V, U)
    rad = np.ones_like(r)
    for h in range(2, 6):
        rad += rng.uniform(0, 0.12 / (h - 1)) * np.cos(h * ang + rng.uniform(0, 2 * math.pi))
    rad *= R
    # signed distance approximation scaled to pixels along the radial direction
    sd = (r - rad) * np.clip(np.sqrt((U * U + (V * ecc) ** 2) / (r * r + 1e-6)), ecc, 1.0)
    alpha = _alpha_from_sd(sd)
    rho = np.clip(r / (rad + 1e-6), 0, 1)
    shade = (1.0 - rng.uniform(0.0, 0.5) * rho ** 2) if rng.uniform() < 0.5 else (0.7 + 0.3 * rho ** 3)
    ctr = _contrast(rng, amp)
    kind = rng.integers(0, 3)
    # the deposit covers the surface: its texture is (partly) hidden under a smoother film
    # with a fine grain of its own
    smooth = np.stack([_blur(img[..., ch], 2.0) for ch in range(3)], axis=-1)
    cover = rng.uniform(0.6, 1.0)
    grain = _blur(rng.standard_normal((size, size)).astype(np.float32), 0.7) * amp * rng.uniform(0.3, 0.8)
    base = img * (1 - cover) + smooth * cover + grain[..., None]
    if kind == 0:    # dark stain
        target = base * (1 - np.clip(1.4 * ctr * shade, 0, 0.85))[..., None]
    elif kind == 1:  # rust / tinted
        tint = np.array([0.55, 0.3, 0.15], np.float32) * rng.uniform(0.7, 1.2)
        f = np.clip(1.6 * ctr * shade, 0, 0.9)[..., None]
        target = base * (1 - f) + tint * f
    else:            # light (paint / dried drop)
        target = base + (ctr * shade)[..., None] * rng.uniform(0.8, 1.1)
    out = img * (1 - alpha[..., None]) + target * alpha[..., None]
    return out, sd <= 0


def _crack_walk(rng, start, heading, steps, step_len, jitter):
    pts = [np.array(start, np.float64)]
    h = heading
    for _ in range(steps):
        h += rng.uniform(-jitter, jitter)
        h = heading + np.clip(h - heading, -0.9, 0.9)  # keeps an overall direction
        pts.append(pts[-1] + step_len * rng.uniform(0.7, 1.3) * np.array([math.cos(h), math.sin(h)]))
    return np.array(pts)


def draw_crack(rng, img: np.ndarray, amp: float):
    size = img.shape[0]
    s = size / 128.0
    steps = int(rng.integers(8, 20))
    step_len = rng.uniform(4.0, 6.5) * s
    heading = rng.uniform(0, 2 * math.pi)
    span = steps * step_len
    c = _place(rng, size, 16 * s)
    start = c - 0.5 * span * np.array([math.cos(heading), math.sin(heading)])
    start = np.clip(start, 8 * s, size - 8 * s)
    pts = _crack_walk(rng, start, heading, steps, step_len, 0.7)
    pts = np.clip(pts, 5 * s, size - 5 * s)
    wmax = rng.uniform(*CRACK_WIDTH) * s
    tt = np.linspace(0, 1, len(pts))
    widths = CRACK_END_WIDTH * s + (wmax - CRACK_END_WIDTH * s) * np.sin(math.pi * tt) ** 0.7 * rng.uniform(0.8, 1.0, len(pts))
    sd, _ = _stroke_distance(size, pts, widths)
    side = _side(size, pts)
    if rng.uniform() < 0.5:  # one branch from an interior vertex
        j = int(rng.integers(2, len(pts) - 2))
        bh = heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)
        bpts = _crack_walk(rng, pts[j], bh, int(rng.integers(3, 7)), step_len, 0.6)
        bpts = np.clip(bpts, 5 * s, size - 5 * s)
        bw = np.linspace(widths[j] * 0.9, CRACK_END_WIDTH * s, len(bpts))
        bsd, _ = _stroke_distance(size, bpts, bw)
        sd = np.minimum(sd, bsd)
    alpha = _alpha_from_sd(sd)
    ctr = _contrast(rng, amp)
    depth = np.clip(-sd / 2.0, 0, 1)  # darker towards the centre line
    dark = np.clip((1.2 + 0.8 * depth) * ctr, 0.1, 0.85)
    rim = (side > 0) & (sd > -1.5)    # lit edge on one side
    f = dark * np.where(rim, 0.35, 1.0)
    target = img * (1 - f[..., None])
    target = np.where(rim[..., None], target + 0.4 * ctr, target)
    out = img * (1 - alpha[..., None]) + target * alpha[..., None]
    return out, sd <= 0


DRAW = {"scratch": draw_scratch, "spot": draw_spot, "crack": draw_crack}


# ----------------------------------------------------------------------------- images

def make_image(seed: int, cls: str, index: int, size: int):
    """Returns (uint8 RGB [size,size,3], mask bool [size,size] or None)."""
    rng = np.random.default_rng([seed, CLASSES.index(cls), index])
    kind = SURFACES[int(rng.integers(0, len(SURFACES)))]
    img, amp = surface(rng, size, kind)
    mask = None
    if cls != "ok":
        img, mask = DRAW[cls](rng, img, amp)
    # mild optics + sensor noise, applied after the defect so it affects both alike
    img = img + rng.uniform(0.005, 0.02) * rng.standard_normal(img.shape).astype(np.float32)
    img = img * rng.uniform(0.9, 1.1)
    u8 = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    return u8, mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--count", required=True, type=int, help="images per defect class")
    ap.add_argument("--ok-count", type=int, default=None, help="`ok` images (default: --count)")
    ap.add_argument("--seed", required=True, type=int)
    ap.add_argument("--size", type=int, default=128)
    a = ap.parse_args()
    counts = {c: a.count for c in CLASSES[1:]}
    counts["ok"] = a.count if a.ok_count is None else a.ok_count
    for cls in CLASSES:
        (a.out / "images" / cls).mkdir(parents=True, exist_ok=True)
        if cls != "ok":
            (a.out / "masks" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(counts[cls]):
            rgb, mask = make_image(a.seed, cls, i, a.size)
            name = f"{i:04d}.png"
            Image.fromarray(rgb, mode="RGB").save(a.out / "images" / cls / name, optimize=False)
            if mask is not None:
                m = (mask.astype(np.uint8) * 255)
                Image.fromarray(m, mode="L").save(a.out / "masks" / cls / name, optimize=False)


if __name__ == "__main__":
    main()
