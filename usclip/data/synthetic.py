"""Synthetic B-mode ultrasound scans with lesion masks, labels, scan-area boxes and captions.

Each image is built the way a scanner forms one, in "beam space" (rows = depth, columns = scan lines):

1. a layered tissue echogenicity map (skin, fat with septa, fibroglandular tissue with streaks, muscle, deep
   tissue; or the thyroid's strap muscles and gland) with wavy layer boundaries;
2. a lesion whose appearance follows the BI-RADS / TI-RADS descriptors: benign = oval, circumscribed, parallel
   (wider-than-tall), homogeneously hypoechoic with posterior acoustic enhancement; malignant = irregular or
   spiculated, non-parallel (taller-than-wide), heterogeneous with posterior acoustic shadowing (Stavros et al.,
   Radiology 1995; ACR BI-RADS Atlas, 5th ed., 2013);
3. fully developed speckle: the envelope of a complex Gaussian scatterer field blurred by an anisotropic point
   spread function, which is Rayleigh distributed (Burckhardt, IEEE Trans. Sonics Ultrason. 1978);
4. depth attenuation with imperfect time-gain compensation, log compression to 8 bits;
5. scan conversion to a linear (rectangular) or curvilinear / phased (sector) field of view on a black screen,
   with burnt-in text, a grey bar, depth ticks and focus marker outside the scan area and caliper marks inside.

The lesion mask is drawn in image space, so it is exact; ``box`` is the tight bounding box of the scan area
(scan pixels are never 0, the screen around it is 0 except for the UI marks, which stay outside the box).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from usclip._io import write_text_atomic

log = logging.getLogger(__name__)

__all__ = ["LABEL_NAMES", "SyntheticSample", "check_synthetic_root", "generate_sample", "write_synthetic_dataset"]

LABEL_NAMES = ("benign", "malignant")
_GEOMETRIES = ("sector", "linear", "random")
_VERSION = 1  # bump when the generated pixels change, so cached datasets are not reused
_MIN_SIZE = 32
_FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass(frozen=True)
class SyntheticSample:
    """One synthetic scan.

    Attributes:
        image: H x W uint8 grayscale B-mode image (black screen, scan area, UI marks).
        mask: H x W uint8 lesion mask with values in {0, 255}, inside ``box``.
        label: 0 (benign) or 1 (malignant); names in ``LABEL_NAMES``.
        box: ``(x0, y0, x1, y1)`` of the scan area, end exclusive; every scan pixel lies inside it.
        caption: a report-like sentence describing the lesion, consistent with ``label``.
        geometry: field of view, ``"sector"`` (fan) or ``"linear"`` (rectangle).
    """

    image: np.ndarray
    mask: np.ndarray
    label: int
    box: tuple[int, int, int, int]
    caption: str
    geometry: Literal["sector", "linear"]


@dataclass
class _Scan:
    """Scan conversion between image space (H x W) and beam space (depth rows x scan-line columns)."""

    region: np.ndarray  # H x W bool, the scan area
    depth_frac: np.ndarray  # H x W float32, 0 at the transducer, 1 at the deepest row
    to_beam: tuple[np.ndarray, np.ndarray]  # H x W float32 (column, row) in beam space, for cv2.remap
    to_image: tuple[np.ndarray, np.ndarray]  # Hb x Wb float32 (x, y) in image space
    lateral: np.ndarray  # Wb float32 in [-1, 1], scan-line position across the field of view


def _parse_size(size: int | tuple[int, int]) -> tuple[int, int]:
    hw = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(hw) != 2 or not all(isinstance(v, (int, np.integer)) and v >= _MIN_SIZE for v in hw):
        raise ValueError(f"size must be an int or an (H, W) pair of ints >= {_MIN_SIZE}, got {size!r}")
    return int(hw[0]), int(hw[1])


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def _smooth_noise(rng: np.random.Generator, h: int, w: int, sy: float, sx: float) -> np.ndarray:
    """Zero-mean, unit-std random field with correlation lengths of about ``sy`` x ``sx`` pixels."""
    low = rng.standard_normal((max(2, round(h / sy) + 2), max(2, round(w / sx) + 2)), dtype=np.float32)
    field = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    return field / (float(field.std()) + 1e-6)


def _make_scan(rng: np.random.Generator, h: int, w: int, geometry: str) -> _Scan:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    if geometry == "linear":
        x0, x1 = round(w * rng.uniform(0.08, 0.2)), round(w * (1 - rng.uniform(0.08, 0.2)))
        y0, y1 = round(h * rng.uniform(0.09, 0.15)), round(h * (1 - rng.uniform(0.03, 0.09)))
        region = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
        depth_frac = (ys - y0) / (y1 - 1 - y0)
        hb, wb = y1 - y0, x1 - x0
        bys, bxs = np.mgrid[0:hb, 0:wb].astype(np.float32)
        lateral = np.linspace(-1, 1, wb, dtype=np.float32)
        return _Scan(region, depth_frac, (xs - x0, ys - y0), (bxs + x0, bys + y0), lateral)
    # Sector: apex (cx, ya) above the top row (curvilinear) or near it (phased array); angle from the vertical.
    y_top, y_bot = h * rng.uniform(0.08, 0.14), h * (1 - rng.uniform(0.02, 0.06))
    rho, theta = rng.uniform(0.05, 0.4), math.radians(rng.uniform(28, 42))
    for _ in range(8):  # narrow the fan until it fits the width
        r1 = (y_bot - y_top) / (1 - rho * math.cos(theta))
        if r1 * math.sin(theta) <= 0.43 * w or theta < math.radians(15):
            break
        theta = max(math.radians(14), math.asin(min(1.0, 0.43 * w / r1)) * 0.98)
    r0 = rho * r1
    cx, ya = w / 2 + rng.uniform(-0.03, 0.03) * w, y_top - r0 * math.cos(theta)
    r = np.hypot(xs - cx, ys - ya)
    ang = np.arctan2(xs - cx, ys - ya)
    region = (r >= r0) & (r <= r1) & (np.abs(ang) <= theta) & (ys >= 0)
    hb, wb = math.ceil(r1 - r0) + 1, math.ceil(2 * theta * r1) + 1
    to_beam = ((ang + theta) * r1, r - r0)
    radii = (r0 + np.arange(hb, dtype=np.float32))[:, None]
    beam_ang = (np.arange(wb, dtype=np.float32) / r1 - theta)[None, :]
    to_image = (cx + radii * np.sin(beam_ang), ya + radii * np.cos(beam_ang))
    lateral = beam_ang[0] / theta
    return _Scan(region, (r - r0) / (r1 - r0), to_beam, to_image, lateral.astype(np.float32))


# Per-layer tissue parameters: (thickness as a fraction of depth (lo, hi), echo level, mottle, septa, streaks).
_LAYERS = {
    "breast": [
        ((0.015, 0.03), 1.9, 0.1, 0.0, 0.0),  # skin
        ((0.1, 0.22), 0.35, 0.3, 1.2, 0.0),  # subcutaneous fat with Cooper's ligaments
        ((0.35, 0.5), 0.9, 0.5, 0.0, 1.6),  # fibroglandular tissue
        ((0.1, 0.16), 0.55, 0.15, 0.0, 0.6),  # pectoralis muscle
        ((0.015, 0.03), 1.5, 0.1, 0.0, 0.0),  # fascia / pleura line
        ((1.0, 1.0), 0.35, 0.3, 0.3, 0.0),  # chest wall, rest of the depth
    ],
    "thyroid": [
        ((0.015, 0.03), 1.8, 0.1, 0.0, 0.0),  # skin
        ((0.04, 0.08), 0.6, 0.2, 0.5, 0.0),  # subcutaneous tissue
        ((0.08, 0.14), 0.45, 0.1, 0.0, 0.7),  # strap muscles
        ((0.45, 0.6), 1.0, 0.2, 0.0, 0.15),  # thyroid gland, fine homogeneous texture
        ((1.0, 1.0), 0.4, 0.3, 0.2, 0.3),  # deep neck
    ],
}


def _tissue(rng: np.random.Generator, hb: int, wb: int, organ: str, s: float) -> tuple[np.ndarray, float, float]:
    """Echogenicity (amplitude) map in beam space, plus the depth fractions spanned by the main tissue layer."""
    layers = _LAYERS[organ]
    thick = np.array([rng.uniform(*t) for t, *_ in layers[:-1]])
    bounds = np.cumsum(thick) * hb  # (K-1,) mean depth of each layer's lower boundary
    wobble = _smooth_noise(rng, len(bounds), wb, 1, wb / 3) * (0.025 * hb)  # (K-1, Wb) wavy boundaries
    rows = np.arange(hb, dtype=np.float32)[None, :, None]
    idx = (rows >= (bounds[:, None] + wobble)[:, None, :]).sum(0)  # (K-1, Hb, Wb) -> (Hb, Wb) layer index
    level, mottle, septa_w, streak_w = (np.array([layer[i] for layer in layers], np.float32) for i in range(1, 5))
    septa = np.exp(-((_smooth_noise(rng, hb, wb, 12 * s, 16 * s) / 0.15) ** 2))
    streaks = np.exp(-((_smooth_noise(rng, hb, wb, 6 * s, 30 * s) / 0.25) ** 2))
    blotch = _smooth_noise(rng, hb, wb, 16 * s, 24 * s)
    echo = level[idx] * np.clip(1 + mottle[idx] * blotch, 0.2, None) + septa_w[idx] * septa + streak_w[idx] * streaks
    main = 2 if organ == "breast" else 3
    return echo.astype(np.float32), float(bounds[main - 1] / hb), float(bounds[main] / hb)


def _lesion_outline(rng: np.random.Generator, label: int) -> tuple[np.ndarray, dict[str, str]]:
    """Unit-area-ish lesion outline (N x 2, x right / y down) and descriptors for the caption."""
    phi = np.linspace(0, 2 * np.pi, 240, endpoint=False)
    radius = np.ones_like(phi)
    if label == 0:
        lobulated = rng.random() < 0.3
        for k in (2, 3):
            amp = rng.uniform(0.03, 0.08) if lobulated else rng.uniform(0, 0.025)
            radius += amp * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
        aspect = rng.uniform(1.4, 2.1)  # width / height
        desc = {"margin": "lobulated" if lobulated else "circumscribed"}
    else:
        for k in range(2, 7):
            radius += rng.uniform(0.02, 0.12) / math.sqrt(k) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
        spiculated = rng.random() < 0.65
        if spiculated:  # narrow triangular spikes
            for _ in range(rng.integers(6, 14)):
                d = np.angle(np.exp(1j * (phi - rng.uniform(0, 2 * np.pi))))
                radius += rng.uniform(0.2, 0.55) * np.clip(1 - np.abs(d) / rng.uniform(0.05, 0.11), 0, None) ** 1.3
        else:  # angular / microlobulated margin
            for k in rng.integers(8, 16, size=3):
                radius += rng.uniform(0.04, 0.08) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
        aspect = 1 / rng.uniform(1.2, 1.7)
        desc = {"margin": "spiculated" if spiculated else str(rng.choice(["angular", "microlobulated", "indistinct"]))}
    tilt = math.radians(rng.uniform(-10, 10))
    x, y = radius * np.cos(phi) * math.sqrt(aspect), radius * np.sin(phi) / math.sqrt(aspect)
    pts = np.stack([x * math.cos(tilt) - y * math.sin(tilt), x * math.sin(tilt) + y * math.cos(tilt)], 1)
    return (pts / math.sqrt(cv2.contourArea(pts.astype(np.float32)))).astype(np.float32), desc


def _place_lesion(
    rng: np.random.Generator, scan: _Scan, outline: np.ndarray, layer_span: tuple[float, float], s: float
) -> np.ndarray:
    """Scale and position the outline inside the scan area; returns image-space vertices."""
    h, w = scan.region.shape
    area = float(np.exp(rng.uniform(math.log(0.03), math.log(0.15)))) * float(scan.region.sum())
    near_edge = rng.random() < 0.15
    margin = 1 if near_edge else max(2, round(4 * s))
    inner = cv2.erode(scan.region.astype(np.uint8), np.ones((2 * margin + 1,) * 2, np.uint8)).astype(bool)
    allowed = inner & (scan.depth_frac > 0.05) & (scan.depth_frac < 0.85)
    lo, hi = max(0.22, layer_span[0] + 0.05), min(0.58, max(0.3, layer_span[1] - 0.05))
    scale = math.sqrt(area)
    for attempt in range(60):
        if attempt % 10 == 9:
            scale *= 0.85
        lat = rng.uniform(0.55, 0.95) * rng.choice([-1, 1]) if near_edge else rng.uniform(-0.6, 0.6)
        col = int(np.argmin(np.abs(scan.lateral - lat)))
        row = min(scan.to_image[0].shape[0] - 1, round(rng.uniform(lo, hi) * (scan.to_image[0].shape[0] - 1)))
        cx, cy = float(scan.to_image[0][row, col]), float(scan.to_image[1][row, col])
        pts = outline * scale + np.array([cx, cy], np.float32)
        xi, yi = np.round(pts[:, 0]).astype(int), np.round(pts[:, 1]).astype(int)
        if xi.min() >= 0 and yi.min() >= 0 and xi.max() < w and yi.max() < h and allowed[yi, xi].all():
            return pts
    # Fallback (tiny or odd fields of view): a small lesion at the centre of the allowed area.
    ys, xs = np.nonzero(allowed if allowed.any() else scan.region)
    return outline * max(2.0, 0.5 * scale) + np.array([xs.mean(), ys.mean()], np.float32)


def _render_lesion(
    rng: np.random.Generator, echo: np.ndarray, soft: np.ndarray, label: int, s: float, desc: dict[str, str]
) -> np.ndarray:
    """Put the lesion (soft beam-space mask ``soft``) and its posterior features into the echo map."""
    hb, wb = echo.shape
    inside = soft > 0.5
    rows, cols = np.nonzero(inside)
    if rows.size == 0:
        return echo
    r0, r1 = rows.min(), rows.max() + 1
    c0, c1 = max(0, 2 * cols.min() - cols.max()), min(wb, 2 * cols.max() - cols.min() + 1)
    around = echo[r0:r1, c0:c1][~inside[r0:r1, c0:c1]]
    ref = float(around.mean()) if around.size else float(echo.mean())
    if label == 0:
        lesion = rng.uniform(0.22, 0.42) * ref * (1 + 0.06 * _smooth_noise(rng, hb, wb, 8 * s, 8 * s))
        desc["echo"] = "hypoechoic"
    else:
        het = _smooth_noise(rng, hb, wb, 5 * s, 5 * s)
        lesion = rng.uniform(0.2, 0.35) * ref * np.clip(1 + rng.uniform(0.35, 0.6) * het, 0.15, 2.5)
        desc["echo"] = "heterogeneous"
    out = echo * (1 - soft) + lesion * soft
    ring = np.clip(cv2.GaussianBlur(soft, (0, 0), 2.5 * s) - soft, 0, 1) * 2
    if label == 1 and rng.random() < 0.5:
        out *= 1 + rng.uniform(0.4, 0.9) * ring  # echogenic halo
        desc["halo"] = "yes"
    if label == 1 and rng.random() < 0.4:  # microcalcifications: a few bright specks
        flat = np.flatnonzero(soft.ravel() > 0.9)
        if flat.size:
            out.ravel()[rng.choice(flat, size=min(flat.size, int(rng.integers(3, 9))))] = 4 * ref
            desc["calcifications"] = "yes"
    # Posterior features: every scan line through the lesion is brightened (benign) or shadowed (malignant)
    # below the lesion's deepest point, in proportion to the lesion's thickness on that line.
    thickness = inside.sum(0).astype(np.float32)
    weight = cv2.GaussianBlur((thickness / thickness.max()) ** 0.6, (0, 0), max(0.8, 1.5 * s)).ravel()
    bottom = hb - 1 - np.argmax(inside[::-1], 0)
    dist = np.arange(hb, dtype=np.float32)[:, None] - bottom[None, :]
    below = (dist > 0) & (thickness > 0)[None, :]
    if label == 0:
        decay = np.exp(-np.maximum(dist, 0) / (rng.uniform(0.35, 0.8) * hb))
        factor = 1 + rng.uniform(0.6, 1.0) * weight[None, :] * decay * below
    else:
        onset = 1 - np.exp(-np.maximum(dist, 0) / max(1.0, 2 * s))
        factor = 1 - rng.uniform(0.5, 0.75) * weight[None, :] * onset * below
    return (out * factor).astype(np.float32)


def _speckle(rng: np.random.Generator, echo: np.ndarray, s: float) -> np.ndarray:
    """Envelope of a complex scatterer field weighted by ``echo`` and blurred by the PSF (Rayleigh speckle)."""
    sx, sy = max(0.7, rng.uniform(1.8, 2.6) * s), max(0.5, rng.uniform(0.8, 1.1) * s)
    kx, ky = cv2.getGaussianKernel(2 * math.ceil(3 * sx) + 1, sx), cv2.getGaussianKernel(2 * math.ceil(3 * sy) + 1, sy)
    norm = math.sqrt(2 * float((kx**2).sum()) * float((ky**2).sum()))  # rms of the blurred unit complex noise
    re = cv2.sepFilter2D(echo * rng.standard_normal(echo.shape, dtype=np.float32), -1, kx, ky)
    im = cv2.sepFilter2D(echo * rng.standard_normal(echo.shape, dtype=np.float32), -1, kx, ky)
    # Mild incoherent smoothing, as spatial compounding and persistence do on scanners: fills speckle nulls.
    return cv2.GaussianBlur(cv2.magnitude(re, im), (0, 0), max(0.5, 0.8 * s)) / norm


def _draw_calipers(rng: np.random.Generator, canvas: np.ndarray, pts: np.ndarray, s: float) -> None:
    arm, value = max(2, round(3 * s)), int(rng.integers(200, 256))
    ends = [(pts[:, 0].argmin(), pts[:, 0].argmax())] if rng.random() < 0.7 else []
    if rng.random() < 0.4:
        ends.append((pts[:, 1].argmin(), pts[:, 1].argmax()))
    for k, (a, b) in enumerate(ends):
        pa, pb = pts[a], pts[b]
        for p in (pa, pb):
            x, y = round(float(p[0])), round(float(p[1]))
            if k == 0:
                cv2.line(canvas, (x - arm, y), (x + arm, y), value, 1)
                cv2.line(canvas, (x, y - arm), (x, y + arm), value, 1)
            else:
                cv2.line(canvas, (x - arm, y - arm), (x + arm, y + arm), value, 1)
                cv2.line(canvas, (x - arm, y + arm), (x + arm, y - arm), value, 1)
        if rng.random() < 0.5:  # dotted measurement line
            n = max(2, int(np.hypot(*(pb - pa)) / max(3, 4 * s)))
            for t in np.linspace(0, 1, n)[1:-1]:
                q = pa + t * (pb - pa)
                canvas[min(canvas.shape[0] - 1, round(float(q[1]))), min(canvas.shape[1] - 1, round(float(q[0])))] = (
                    value
                )


def _draw_ui(
    rng: np.random.Generator,
    canvas: np.ndarray,
    box: tuple[int, int, int, int],
    organ: str,
    depth_cm: float,
    geometry: str,
) -> None:
    """Burnt-in text, grey bar, depth ticks and focus marker on the black screen (cleared inside ``box`` later)."""
    h, w = canvas.shape
    x0, y0, x1, y1 = box
    fs = max(0.15, 0.3 * min(h, w) / 256)
    (_, th), base = cv2.getTextSize("0", _FONT, fs, 1)
    line = th + base + 1
    value = int(rng.integers(180, 256))
    side = str(rng.choice(["LEFT", "RIGHT", "LT", "RT"]))
    left_lines = {
        "breast": [
            f"{side} BREAST",
            f"{rng.integers(1, 13)}:00 {rng.integers(1, 8)}CM FN",
            "RADIAL" if rng.random() < 0.5 else "ANTI-RAD",
        ],
        "thyroid": [
            f"THYROID {side}",
            str(rng.choice(["TRANS", "LONG", "SAG"])),
            "ISTHMUS" if rng.random() < 0.3 else "",
        ],
    }[organ]
    probe = str(rng.choice(["L12-5", "L18-4", "14L5", "ML6-15"] if geometry == "linear" else ["C5-1", "C9-2", "P4-2"]))
    right_lines = [
        f"{probe} {rng.integers(5, 15)}MHz",
        f"MI {rng.uniform(0.3, 1.4):.1f} TIs {rng.uniform(0.1, 0.9):.1f}",
    ]
    right_lines.append(f"{rng.integers(2015, 2024)}/{rng.integers(1, 13):02d}/{rng.integers(1, 29):02d}")
    n_lines = min(3 if h >= 200 else 2, max(1, (y0 - 2) // line))
    aa = cv2.LINE_AA if min(h, w) >= 200 else cv2.LINE_8  # anti-aliasing halos would crowd tiny screens
    for i, text in enumerate(left_lines[:n_lines]):
        cv2.putText(canvas, text, (2, (i + 1) * line - base), _FONT, fs, value, 1, aa)
    for i, text in enumerate(right_lines[:n_lines]):
        tw = cv2.getTextSize(text, _FONT, fs, 1)[0][0]
        cv2.putText(canvas, text, (max(2, w - tw - 2), (i + 1) * line - base), _FONT, fs, value, 1, aa)
    # Grey bar in the left margin and depth ticks (every cm, labelled) in the right margin.
    bw = max(2, round(0.02 * w))
    if x0 - bw - 4 >= 1:
        bx, by0, by1 = x0 - bw - 3, y0 + round(0.05 * h), y0 + round(0.3 * h)
        canvas[by0:by1, bx : bx + bw] = np.linspace(255, 20, by1 - by0, dtype=np.float32)[:, None].astype(np.uint8)
    px_cm = (y1 - y0) / depth_cm
    if w - x1 >= 4:
        tx = x1 + 2
        for k in range(int(depth_cm) + 1):
            y = round(y0 + k * px_cm)
            if y < h:
                canvas[y, tx : tx + 2] = value
                if k % 2 == 0 and w - tx - 4 >= th and y + th // 2 < h:
                    cv2.putText(canvas, str(k), (tx + 3, y + th // 2), _FONT, fs * 0.8, value, 1, aa)
        fy = round(y0 + rng.uniform(0.3, 0.6) * (y1 - y0))  # focus marker: a small left-pointing triangle
        tri = np.array([[tx, fy], [tx + 3, fy - 2], [tx + 3, fy + 2]], np.int32)
        cv2.fillPoly(canvas, [tri], value)
    if h - y1 >= line + 1 and h >= 200:
        text = f"D {depth_cm:.1f}cm  G{rng.integers(40, 70)}  FR{rng.integers(15, 45)}"
        cv2.putText(canvas, text, (2, h - base - 1), _FONT, fs, value, 1, aa)


def _caption(
    rng: np.random.Generator, label: int, organ: str, desc: dict[str, str], size_cm: tuple[float, float]
) -> str:
    noun = str(rng.choice(["mass", "lesion"] if organ == "breast" else ["nodule", "lesion"]))
    place = {"breast": "the breast", "thyroid": "the thyroid"}[organ]
    if label == 0:
        shape = str(rng.choice(["an oval", "an oval", "an ellipsoid", "a round-to-oval"]))
        margin = {
            "circumscribed": str(rng.choice(["circumscribed", "smooth, well-defined", "sharply marginated"])),
            "lobulated": "gently lobulated but circumscribed",
        }[desc["margin"]]
        orient = str(rng.choice(["parallel", "wider-than-tall", "parallel (wider-than-tall)"]))
        echo = str(rng.choice(["hypoechoic", "homogeneously hypoechoic", "uniformly hypoechoic"]))
        post = str(
            rng.choice(
                [
                    "with posterior acoustic enhancement",
                    "showing posterior acoustic enhancement",
                    "with posterior enhancement (increased through-transmission)",
                ]
            )
        )
        extra = str(
            rng.choice(
                [
                    "",
                    "",
                    " Findings favour a benign lesion such as a fibroadenoma."
                    if organ == "breast"
                    else " Findings favour a benign colloid or follicular nodule.",
                ]
            )
        )
    else:
        shape = str(rng.choice(["an irregular", "an irregularly shaped"]))
        margin = {
            "spiculated": str(rng.choice(["spiculated", "spiculated, not circumscribed"])),
            "angular": "angular",
            "microlobulated": "microlobulated",
            "indistinct": "indistinct",
        }[desc["margin"]]
        orient = str(rng.choice(["non-parallel (taller-than-wide)", "taller-than-wide", "non-parallel"]))
        echo = str(rng.choice(["heterogeneous", "heterogeneously hypoechoic", "mixed-echogenicity"]))
        post = str(
            rng.choice(
                ["with posterior acoustic shadowing", "casting a posterior acoustic shadow", "with posterior shadowing"]
            )
        )
        if desc.get("halo"):
            post += " and an echogenic halo"
        if desc.get("calcifications"):
            post += ", containing echogenic foci (microcalcifications)"
        extra = str(rng.choice(["", "", " Findings are suspicious for malignancy."]))
    opening = str(
        rng.choice(
            [
                f"Ultrasound of {place} shows",
                f"B-mode ultrasound of {place} demonstrates",
                f"Sonographic image of {place} with",
                f"{place.split()[1].capitalize()} ultrasound: there is",
            ]
        )
    )
    size = f" measuring about {size_cm[0]:.1f} x {size_cm[1]:.1f} cm" if rng.random() < 0.5 else ""
    return f"{opening} {shape}, {margin}, {orient} {echo} {noun}{size} {post}.{extra}"


def generate_sample(
    seed: int, label: int, size: int | tuple[int, int] = 256, geometry: Literal["sector", "linear", "random"] = "random"
) -> SyntheticSample:
    """Generate one synthetic B-mode scan; a pure function of its arguments.

    Args:
        seed: seed of ``np.random.default_rng``; the same arguments give identical arrays and caption.
        label: 0 (benign: oval, parallel, hypoechoic, posterior enhancement) or 1 (malignant: irregular or
            spiculated, taller-than-wide, heterogeneous, posterior shadowing).
        size: image size, ``H`` for a square image or ``(H, W)``; each side at least 32.
        geometry: ``"sector"`` (fan), ``"linear"`` (rectangle) or ``"random"`` (either, drawn from ``seed``).

    Returns:
        The sample: image, mask, label, scan-area box, caption and geometry.

    Raises:
        ValueError: if ``label``, ``size`` or ``geometry`` is not one of the allowed values.
    """
    if isinstance(label, bool) or label not in (0, 1):
        raise ValueError(f"label must be 0 (benign) or 1 (malignant), got {label!r}")
    h, w = _parse_size(size)
    if geometry not in _GEOMETRIES:
        raise ValueError(f"geometry must be one of {_GEOMETRIES}, got {geometry!r}")
    _check_seed(seed)
    rng = np.random.default_rng(seed)
    kind: Literal["sector", "linear"] = (
        geometry if geometry != "random" else ("sector" if rng.random() < 0.5 else "linear")
    )
    organ = "breast" if rng.random() < 0.7 else "thyroid"
    s = min(h, w) / 256
    scan = _make_scan(rng, h, w, kind)
    hb, wb = scan.to_image[0].shape
    echo, top, bottom = _tissue(rng, hb, wb, organ, s)

    outline, desc = _lesion_outline(rng, label)
    pts = _place_lesion(rng, scan, outline, (top, bottom), s)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 255, cv2.LINE_8, shift=4)
    mask[~scan.region] = 0
    soft = cv2.remap((mask > 0).astype(np.float32), *scan.to_image, cv2.INTER_LINEAR)
    soft = cv2.GaussianBlur(soft, (0, 0), max(0.4, (0.6 if label == 0 else 1.2) * s))
    echo = _render_lesion(rng, echo, soft, label, s, desc)

    # Depth attenuation left over after time-gain compensation, a wobbly TGC curve, weaker edge scan lines.
    depth = np.linspace(0, 1, hb, dtype=np.float32)[:, None]
    gain = np.exp(-rng.uniform(0.6, 1.1) * depth) * (1 + 0.12 * _smooth_noise(rng, hb, 1, hb / 4, 1))
    echo *= gain * (1 - 0.3 * np.abs(scan.lateral) ** 4)[None, :]
    envelope = _speckle(rng, echo, s)
    dyn_range, top_db = rng.uniform(45, 55), rng.uniform(17, 22)
    gray = (20 * np.log10(envelope + 1e-6) - top_db + dyn_range) * (255 / dyn_range)
    image = cv2.remap(gray, *scan.to_beam, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    image = np.where(scan.region, np.clip(image, 1, 255), 0).astype(np.uint8)

    ys, xs = np.nonzero(scan.region)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    depth_cm = rng.uniform(3.0, 5.5) if kind == "linear" else rng.uniform(4.0, 8.0)
    marks = np.zeros_like(image)
    _draw_calipers(rng, marks, pts, s)
    image = np.maximum(image, np.where(scan.region, marks, 0).astype(np.uint8))
    ui = np.zeros_like(image)
    _draw_ui(rng, ui, box, organ, depth_cm, kind)
    ui[max(0, box[1] - 1) : box[3] + 1, max(0, box[0] - 1) : box[2] + 1] = 0
    image = np.maximum(image, ui)

    px_cm = (box[3] - box[1]) / depth_cm
    extent = (float(np.ptp(pts[:, 0])) / px_cm, float(np.ptp(pts[:, 1])) / px_cm)
    caption = _caption(rng, label, organ, desc, extent)
    return SyntheticSample(image=image, mask=mask, label=int(label), box=box, caption=caption, geometry=kind)


_OUR_FILES = ("labels.csv", "captions.csv", "boxes.csv", "groups.csv", "README.md", "synthetic.json")
_PARTIAL = ".synthetic_incomplete.json"


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _is_complete(root: Path, params: dict[str, object], num_samples: int) -> bool:
    if _read_json(root / "synthetic.json") != params:
        return False
    ids = [f"syn_{i:05d}" for i in range(num_samples)]
    files = [root / name for name in _OUR_FILES] + [root / d / f"{i}.png" for d in ("images", "masks") for i in ids]
    return all(f.is_file() for f in files)


def _clear(root: Path) -> None:
    """Remove what an earlier call wrote; refuse if ``images/`` or ``masks/`` hold files we did not write."""
    for sub in ("images", "masks"):
        foreign = [p.name for p in (root / sub).glob("*") if not (p.name.startswith("syn_") and p.suffix == ".png")]
        if foreign:
            raise FileExistsError(
                f"{root / sub} holds files not written by write_synthetic_dataset ({foreign[:3]}); "
                "overwrite=True only replaces synthetic files: move them away or choose another root"
            )
    for name in ("synthetic.json", *_OUR_FILES, _PARTIAL):  # synthetic.json first: the folder stops looking complete
        (root / name).unlink(missing_ok=True)
    for sub in ("images", "masks"):
        shutil.rmtree(root / sub, ignore_errors=True)


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _write_json_atomic(path: Path, data: dict[str, object]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _params(num_samples: int, size: int, seed: int, malignant_fraction: float, geometry: str) -> dict[str, object]:
    """What ``synthetic.json`` records: a dataset is reused only when these match."""
    return {
        "generator": "usclip.data.synthetic",
        "version": _VERSION,
        "num_samples": int(num_samples),
        "size": int(size),
        "seed": int(seed),
        "malignant_fraction": float(malignant_fraction),
        "geometry": geometry,
    }


def _root_problem(root: Path, params: dict[str, object], overwrite: bool, how_to_overwrite: str) -> str | None:
    """Why the dataset ``params`` cannot be written into ``root`` (``how_to_overwrite`` names the switch), or None."""
    if root.exists() and not root.is_dir():
        return f"root {root} exists and is not a folder; choose a folder path"
    if not root.exists() or not any(root.iterdir()) or _is_complete(root, params, int(str(params["num_samples"]))):
        return None
    if _read_json(root / _PARTIAL) == params:  # an interrupted run with the same parameters: finished on write
        return None
    if not overwrite:
        found = _read_json(root / "synthetic.json")
        held = (
            f"holds a synthetic dataset made with other settings ({_differences(found, params)})"
            if isinstance(found, dict)
            else "holds no synthetic dataset"
        )
        return (
            f"{root} is not empty and {held}; {how_to_overwrite} to replace a synthetic dataset, or choose an empty "
            "or new folder"
        )
    for sub in ("images", "masks"):  # overwrite replaces synthetic files only
        foreign = [p.name for p in (root / sub).glob("*") if not (p.name.startswith("syn_") and p.suffix == ".png")]
        if foreign:
            return (
                f"{root / sub} holds files not written by write_synthetic_dataset ({foreign[:3]}); "
                "overwrite only replaces synthetic files: move them away or choose another root"
            )
    return None


def _differences(found: dict[str, object], wanted: dict[str, object]) -> str:
    keys = [k for k in wanted if found.get(k) != wanted[k]]
    return ", ".join(f"{k}={found.get(k)!r}, now {wanted[k]!r}" for k in keys) or "incomplete"


def check_synthetic_root(
    root: str | Path,
    num_samples: int = 200,
    size: int = 256,
    seed: int = 0,
    malignant_fraction: float = 0.5,
    geometry: Literal["sector", "linear", "random"] = "random",
    overwrite: bool = False,
    how_to_overwrite: str = "pass overwrite=True",
) -> None:
    """Raise now what :func:`write_synthetic_dataset` would raise for ``root`` (no file is read beyond the folder).

    For callers that write later (``BaseDataModule`` writes in ``prepare_data``) and want the error at construction,
    with ``how_to_overwrite`` naming their own switch (``set data.synthetic.overwrite: true``).

    Raises:
        FileExistsError: if ``root`` holds something other than this dataset (``overwrite`` False), or files that
            ``overwrite`` would not replace.
    """
    problem = _root_problem(
        Path(root), _params(num_samples, size, seed, malignant_fraction, geometry), overwrite, how_to_overwrite
    )
    if problem:
        raise FileExistsError(problem)


def write_synthetic_dataset(
    root: str | Path,
    num_samples: int = 200,
    size: int = 256,
    seed: int = 0,
    malignant_fraction: float = 0.5,
    geometry: Literal["sector", "linear", "random"] = "random",
    overwrite: bool = False,
) -> Path:
    """Write a synthetic dataset in the generic folder layout, or reuse an identical one already there.

    Layout: ``images/<id>.png`` and ``masks/<id>.png`` (8-bit grayscale, masks 0/255), ``labels.csv``
    (``id,label`` with names from ``LABEL_NAMES``), ``captions.csv`` (``id,caption,label``), ``boxes.csv``
    (``id,x0,y0,x1,y1``, scan-area box, end exclusive), ``groups.csv`` (``id,group``, one group per image),
    ``README.md`` and ``synthetic.json`` (the parameters). Ids are ``syn_00000``, ``syn_00001``, ...; exactly
    ``round(num_samples * malignant_fraction)`` samples are malignant, in an order shuffled by ``seed``.

    ``synthetic.json`` is written last and atomically, so an interrupted run never looks complete; calling
    again with the same parameters finishes it. A complete dataset with the same parameters is reused as is.

    Args:
        root: output folder (created if missing).
        num_samples: number of images, at least 1.
        size: side of the square images in pixels, at least 32.
        seed: dataset seed; per-sample seeds and the label order derive from it.
        malignant_fraction: fraction of malignant samples, in [0, 1].
        geometry: ``"sector"``, ``"linear"`` or ``"random"`` (per sample).
        overwrite: replace a dataset written with other parameters. Files this function did not write are
            never deleted: a folder holding other data raises even with ``overwrite=True``.

    Returns:
        ``root`` as a ``Path``.

    Raises:
        ValueError: if an argument is out of range.
        FileExistsError: if ``root`` holds something other than this dataset and ``overwrite`` is False.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < _MIN_SIZE:
        raise ValueError(f"size must be an int >= {_MIN_SIZE} (side of the square images), got {size!r}")
    if not 0.0 <= float(malignant_fraction) <= 1.0:
        raise ValueError(f"malignant_fraction must be in [0, 1], got {malignant_fraction!r}")
    if geometry not in _GEOMETRIES:
        raise ValueError(f"geometry must be one of {_GEOMETRIES}, got {geometry!r}")
    _check_seed(seed)
    root = Path(root)
    params = _params(num_samples, size, seed, malignant_fraction, geometry)
    if _is_complete(root, params, num_samples):
        log.info("reusing the synthetic dataset in %s (same parameters)", root)
        return root
    problem = _root_problem(root, params, overwrite, "pass overwrite=True")
    if problem:
        raise FileExistsError(problem)
    if root.exists() and any(root.iterdir()):
        _clear(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    _write_json_atomic(root / _PARTIAL, params)

    n_mal = round(num_samples * float(malignant_fraction))
    labels = np.array([1] * n_mal + [0] * (num_samples - n_mal))
    np.random.default_rng(seed).shuffle(labels)
    seeds = np.random.SeedSequence([seed, _VERSION]).generate_state(num_samples, np.uint64)
    rows: dict[str, list[list[object]]] = {"labels": [], "captions": [], "boxes": [], "groups": []}
    for i, (label, sample_seed) in enumerate(zip(labels.tolist(), seeds.tolist(), strict=True)):
        sid = f"syn_{i:05d}"
        sample = generate_sample(int(sample_seed), label, size, geometry)
        for sub, array in (("images", sample.image), ("masks", sample.mask)):
            if not cv2.imwrite(str(root / sub / f"{sid}.png"), array):
                raise RuntimeError(f"could not write {root / sub / sid}.png")
        name = LABEL_NAMES[label]
        rows["labels"].append([sid, name])
        rows["captions"].append([sid, sample.caption, name])
        rows["boxes"].append([sid, *sample.box])
        rows["groups"].append([sid, f"g{i:05d}"])
    _write_csv(root / "labels.csv", ["id", "label"], rows["labels"])
    _write_csv(root / "captions.csv", ["id", "caption", "label"], rows["captions"])
    _write_csv(root / "boxes.csv", ["id", "x0", "y0", "x1", "y1"], rows["boxes"])
    _write_csv(root / "groups.csv", ["id", "group"], rows["groups"])
    (root / "README.md").write_text(
        "# Synthetic B-mode ultrasound (generated, not real patient data)\n\n"
        "Written by `usclip.data.synthetic.write_synthetic_dataset` with "
        f"seed={seed}, num_samples={num_samples}, size={size}, malignant_fraction={malignant_fraction}, "
        f"geometry={geometry!r} (generator version {_VERSION}); {n_mal} malignant, {num_samples - n_mal} benign.\n\n"
        "Images mimic B-mode scans (speckle, attenuation, sector or linear field of view on a black screen with "
        "burnt-in text and calipers). Lesions follow textbook descriptors: benign = oval, circumscribed, "
        "wider-than-tall, hypoechoic, posterior enhancement; malignant = irregular or spiculated, taller-than-wide, "
        "heterogeneous, posterior shadowing. Useful for tests and demos only; no clinical meaning.\n\n"
        "Files: images/, masks/ (0/255), labels.csv, captions.csv, boxes.csv (scan area x0,y0,x1,y1, end "
        "exclusive), groups.csv (one group per image), synthetic.json (parameters; written last).\n"
    )
    _write_json_atomic(root / "synthetic.json", params)
    (root / _PARTIAL).unlink(missing_ok=True)
    log.info("wrote %d synthetic samples (%d malignant) to %s", num_samples, n_mal, root)
    return root
