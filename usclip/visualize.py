"""Overlay pictures in the paper's colours (Fig. 4).

Red = ground truth only (missed lesion), green = false positive, yellow = true positive.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TP_COLOUR = (255, 255, 0)
FP_COLOUR = (0, 255, 0)
FN_COLOUR = (255, 0, 0)


def overlay(image: np.ndarray, pred: np.ndarray, target: np.ndarray | None = None, alpha: float = 0.5) -> np.ndarray:
    """Blend prediction (and ground truth) onto an image.

    Args:
        image: ``(H, W)`` grayscale or ``(H, W, 3)`` RGB, uint8, or float in [0, 1].
        pred: ``(H, W)`` predicted lesion mask (non-zero = lesion).
        target: ``(H, W)`` ground-truth mask; ``None`` colours every predicted pixel as a true positive (yellow).
        alpha: opacity of the colours.

    Returns:
        ``(H, W, 3)`` uint8 RGB image.

    Raises:
        ValueError: if the shapes differ.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8)
    rgb = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
    p = np.asarray(pred) > 0
    t = np.asarray(target) > 0 if target is not None else p
    if p.shape != rgb.shape[:2] or t.shape != rgb.shape[:2]:
        raise ValueError(f"image {rgb.shape[:2]}, pred {p.shape} and target {t.shape} must have the same H x W")
    out = rgb.astype(np.float32)
    for region, colour in ((p & t, TP_COLOUR), (p & ~t, FP_COLOUR), (~p & t, FN_COLOUR)):
        out[region] = (1.0 - alpha) * out[region] + alpha * np.asarray(colour, dtype=np.float32)
    return out.round().astype(np.uint8)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Save a uint8 array as PNG, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path
