"""Pictures of results: overlays in the paper's colours (Fig. 4), overlay grids, ROC curves, confusion matrices.

Overlays: red = ground truth only (missed lesion), green = false positive, yellow = true positive. Everything is
drawn with PIL (already a dependency) rather than matplotlib: the pictures are simple, and a test run then needs no
plotting stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from usclip._io import atomic_path

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
    """Save a uint8 array as PNG, creating the parent folder; atomically (temporary file, then rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path


# one colour per ROC curve (class 1 first for two classes); colour-blind-safe Okabe-Ito hues
CURVE_COLOURS = ((0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def overlay_grid(
    cells: Sequence[Sequence[np.ndarray | None]],
    row_titles: Sequence[str] = (),
    col_titles: Sequence[str] = (),
    pad: int = 4,
    title_height: int = 18,
    size: int | None = None,
) -> np.ndarray:
    """Tile pictures into a labelled grid (e.g. rows = test images, columns = methods).

    Args:
        cells: rows of ``(H, W, 3)`` or ``(H, W)`` uint8 pictures; ``None`` leaves a blank cell.
        row_titles: one title per row, written above the row's first picture (optional).
        col_titles: one title per column, written above the first row (optional).
        pad: gap between pictures in pixels.
        title_height: height of a title strip.
        size: side of each (square) cell; default: the largest picture's height.

    Returns:
        ``(H, W, 3)`` uint8 RGB grid on a white background.

    Raises:
        ValueError: if there are no pictures or the titles do not match the rows / columns.
    """
    pictures = [c for row in cells for c in row if c is not None]
    if not pictures:
        raise ValueError("overlay_grid: cells holds no picture")
    n_rows, n_cols = len(cells), max(len(r) for r in cells)
    if row_titles and len(row_titles) != n_rows:
        raise ValueError(f"row_titles has {len(row_titles)} titles for {n_rows} rows")
    if col_titles and len(col_titles) != n_cols:
        raise ValueError(f"col_titles has {len(col_titles)} titles for {n_cols} columns")
    side = size or max(p.shape[0] for p in pictures)
    head = title_height if col_titles else 0
    row_head = title_height if row_titles else 0
    width = n_cols * side + (n_cols + 1) * pad
    height = head + n_rows * (side + row_head) + (n_rows + 1) * pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(max(title_height - 5, 8))
    for c, title in enumerate(col_titles):
        draw.text((pad + c * (side + pad), 2), title, fill=(0, 0, 0), font=font)
    for r, row in enumerate(cells):
        top = head + pad + r * (side + row_head + pad)
        if row_titles:
            draw.text((pad, top + 1), row_titles[r], fill=(80, 80, 80), font=font)
        for c, picture in enumerate(row):
            if picture is None:
                continue
            img = Image.fromarray(picture).convert("RGB")
            if img.size != (side, side):
                img = img.resize((side, side), Image.Resampling.NEAREST)
            canvas.paste(img, (pad + c * (side + pad), top + row_head))
    return np.asarray(canvas)


def confusion_matrix(
    target: Sequence[int] | np.ndarray, pred: Sequence[int] | np.ndarray, num_classes: int
) -> np.ndarray:
    """Counts ``(C, C)``: row = true class, column = predicted class.

    Raises:
        ValueError: if the lengths differ or a label is outside ``[0, num_classes)``.
    """
    t, p = np.asarray(target, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    if t.shape != p.shape:
        raise ValueError(f"target {t.shape} and pred {p.shape} must have the same length")
    for name, v in (("target", t), ("pred", p)):
        if v.size and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{name} labels must be in [0, {num_classes}), got {v.min()}..{v.max()}")
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (t, p), 1)
    return matrix


def draw_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], cell: int = 90) -> np.ndarray:
    """Picture of a confusion matrix: counts and row percentages, cells shaded by the row fraction (recall).

    Returns:
        ``(H, W, 3)`` uint8 RGB picture.
    """
    n = matrix.shape[0]
    margin = 110
    canvas = Image.new("RGB", (margin + n * cell + 10, margin + n * cell + 10), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font, small = _font(14), _font(12)
    rows = matrix.sum(1, keepdims=True).clip(min=1)
    for i in range(n):
        for j in range(n):
            frac = float(matrix[i, j] / rows[i, 0])
            shade = tuple(int(255 - frac * (255 - c)) for c in CURVE_COLOURS[0])
            x0, y0 = margin + j * cell, margin + i * cell
            draw.rectangle((x0, y0, x0 + cell, y0 + cell), fill=shade, outline=(120, 120, 120))
            ink = (255, 255, 255) if frac > 0.5 else (0, 0, 0)
            draw.text((x0 + cell // 2, y0 + cell // 2 - 8), str(int(matrix[i, j])), fill=ink, font=font, anchor="mm")
            draw.text((x0 + cell // 2, y0 + cell // 2 + 10), f"{frac:.0%}", fill=ink, font=small, anchor="mm")
    for k, name in enumerate(class_names):
        draw.text((margin + k * cell + cell // 2, margin - 12), name[:12], fill=(0, 0, 0), font=small, anchor="mm")
        draw.text((margin - 6, margin + k * cell + cell // 2), name[:12], fill=(0, 0, 0), font=small, anchor="rm")
    draw.text((margin + n * cell // 2, margin - 34), "predicted", fill=(0, 0, 0), font=font, anchor="mm")
    draw.text((8, margin - 30), "true", fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def draw_roc(curves: Sequence[tuple[np.ndarray, np.ndarray, str]], size: int = 420, title: str = "ROC") -> np.ndarray:
    """Picture of ROC curves: false positive rate on x, true positive rate on y, chance diagonal in grey.

    Args:
        curves: ``(fpr, tpr, label)`` per curve; fpr and tpr in [0, 1], e.g. from :func:`usclip.metrics.roc_curve`.
        size: side of the plot area in pixels.
        title: text above the plot.

    Returns:
        ``(H, W, 3)`` uint8 RGB picture.
    """
    left, top, right, bottom = 56, 34, 16, 48
    canvas = Image.new("RGB", (left + size + right, top + size + bottom), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font, small = _font(14), _font(12)

    def xy(fx: float, fy: float) -> tuple[float, float]:
        return left + fx * size, top + (1.0 - fy) * size

    for k in range(11):  # grid every 0.1, ticks every 0.2
        v = k / 10
        grid = (235, 235, 235)
        draw.line((xy(v, 0), xy(v, 1)), fill=grid)
        draw.line((xy(0, v), xy(1, v)), fill=grid)
        if k % 2 == 0:
            draw.text((xy(v, 0)[0], top + size + 12), f"{v:.1f}", fill=(0, 0, 0), font=small, anchor="mm")
            draw.text((left - 6, xy(0, v)[1]), f"{v:.1f}", fill=(0, 0, 0), font=small, anchor="rm")
    steps = 40  # dashed chance line
    for k in range(0, steps, 2):
        draw.line((xy(k / steps, k / steps), xy((k + 1) / steps, (k + 1) / steps)), fill=(150, 150, 150), width=1)
    draw.rectangle((left, top, left + size, top + size), outline=(0, 0, 0))
    for k, (fpr, tpr, label) in enumerate(curves):
        colour = CURVE_COLOURS[k % len(CURVE_COLOURS)]
        points = [xy(float(x), float(y)) for x, y in zip(np.asarray(fpr), np.asarray(tpr), strict=True)]
        draw.line(points, fill=colour, width=3, joint="curve")
        ly = top + size - 18 - 18 * (len(curves) - 1 - k)
        draw.line((left + size - 170, ly, left + size - 150, ly), fill=colour, width=3)
        draw.text((left + size - 144, ly), label, fill=(0, 0, 0), font=small, anchor="lm")
    draw.text(
        (left + size / 2, top + size + 34),
        "false positive rate (1 - specificity)",
        fill=(0, 0, 0),
        font=font,
        anchor="mm",
    )
    draw.text((left + size / 2, top / 2), title, fill=(0, 0, 0), font=font, anchor="mm")
    ylabel = Image.new("RGB", (size, 18), (255, 255, 255))
    ImageDraw.Draw(ylabel).text(
        (size / 2, 9), "true positive rate (sensitivity)", fill=(0, 0, 0), font=font, anchor="mm"
    )
    canvas.paste(ylabel.rotate(90, expand=True), (2, top))
    return np.asarray(canvas)
