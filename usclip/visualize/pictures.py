"""Per-image pictures drawn with PIL: overlays in the paper's colours (Fig. 4) or a colour-blind-safe palette.

Overlays: by default red = ground truth only (missed lesion), green = false positive, yellow = true positive (the
paper's Fig. 4). ``usclip test`` writes one per test image, so they stay PIL and numpy (a blend and a PNG write,
milliseconds each); the figures a paper uses (ROC, confusion matrix, overlay grids with legend and scale bar) are
drawn with matplotlib in :mod:`usclip.visualize.figures`.

A palette (:data:`PALETTES`) names the overlay colours, the curve colours and the confusion matrix's colour:
``paper`` (the paper's red/green/yellow) or ``okabe-ito`` (Okabe & Ito 2008, the palette of Wong 2011, Nature
Methods 8:441: vermillion/sky blue/yellow, told apart with every common colour-vision deficiency, where the paper's
red and green are not).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from usclip._io import atomic_path

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Palette:
    """The colours of one palette.

    Attributes:
        name: its key in :data:`PALETTES`.
        true_positive: overlay colour of lesion pixels found.
        false_positive: overlay colour of pixels predicted but not lesion.
        missed: overlay colour of lesion pixels not predicted (false negatives).
        curves: one colour per ROC curve, in order.
        matrix: the confusion matrix's colour at a row fraction of 1 (white at 0).
    """

    name: str
    true_positive: RGB
    false_positive: RGB
    missed: RGB
    curves: tuple[RGB, ...]
    matrix: RGB


_OKABE_ITO = ((0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233))
#: ``paper``: the paper's overlay colours, matplotlib's default curve colours; ``okabe-ito``: colour-blind-safe
PALETTES: dict[str, Palette] = {
    "paper": Palette(
        "paper",
        true_positive=(255, 255, 0),
        false_positive=(0, 255, 0),
        missed=(255, 0, 0),
        curves=((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)),
        matrix=(31, 119, 180),
    ),
    "okabe-ito": Palette(
        "okabe-ito",
        true_positive=(240, 228, 66),
        false_positive=(86, 180, 233),
        missed=(213, 94, 0),
        curves=_OKABE_ITO,
        matrix=(0, 114, 178),
    ),
}
#: legend text of the overlay colours, in the order the legend shows them
OVERLAY_LABELS = {"true_positive": "true positive", "false_positive": "false positive", "missed": "missed lesion"}

TP_COLOUR = PALETTES["paper"].true_positive
FP_COLOUR = PALETTES["paper"].false_positive
FN_COLOUR = PALETTES["paper"].missed

#: PNG text keys of a test overlay: its palette's name, and ``"<row> <column>"`` pixel spacing in mm when known
PNG_PALETTE_KEY = "usclip:palette"
PNG_SPACING_KEY = "usclip:spacing_mm"


def get_palette(palette: str | Palette) -> Palette:
    """The :class:`Palette` of a name in :data:`PALETTES` (a :class:`Palette` is returned as is).

    Raises:
        ValueError: naming the palette received and the known ones.
    """
    if isinstance(palette, Palette):
        return palette
    if palette not in PALETTES:
        raise ValueError(f"palette must be one of {sorted(PALETTES)}, got {palette!r}")
    return PALETTES[palette]


def overlay(
    image: np.ndarray,
    pred: np.ndarray,
    target: np.ndarray | None = None,
    alpha: float = 0.5,
    palette: str | Palette = "paper",
) -> np.ndarray:
    """Blend prediction (and ground truth) onto an image.

    Args:
        image: ``(H, W)`` grayscale or ``(H, W, 3)`` RGB, uint8, or float in [0, 1].
        pred: ``(H, W)`` predicted lesion mask (non-zero = lesion).
        target: ``(H, W)`` ground-truth mask; ``None`` colours every predicted pixel as a true positive (yellow).
        alpha: opacity of the colours.
        palette: a name in :data:`PALETTES` (``paper``: red missed, green false positive, yellow true positive;
            ``okabe-ito``: vermillion, sky blue, yellow) or a :class:`Palette`.

    Returns:
        ``(H, W, 3)`` uint8 RGB image.

    Raises:
        ValueError: if the shapes differ or the palette is unknown.
    """
    colours = get_palette(palette)
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8)
    rgb = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
    p = np.asarray(pred) > 0
    t = np.asarray(target) > 0 if target is not None else p
    if p.shape != rgb.shape[:2] or t.shape != rgb.shape[:2]:
        raise ValueError(f"image {rgb.shape[:2]}, pred {p.shape} and target {t.shape} must have the same H x W")
    out = rgb.astype(np.float32)
    regions = ((p & t, colours.true_positive), (p & ~t, colours.false_positive), (~p & t, colours.missed))
    for region, colour in regions:
        out[region] = (1.0 - alpha) * out[region] + alpha * np.asarray(colour, dtype=np.float32)
    return out.round().astype(np.uint8)


def save_png(array: np.ndarray, path: str | Path, text: Mapping[str, str] | None = None) -> Path:
    """Save a uint8 array as PNG, creating the parent folder; atomically (temporary file, then rename).

    Args:
        array: ``(H, W)`` or ``(H, W, 3)`` uint8.
        path: the file.
        text: PNG text chunks (``tEXt``) to store, e.g. :data:`PNG_SPACING_KEY`; read back with
            :func:`read_png_text`.
    """
    path = Path(path)
    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", pnginfo=info)
    return path


def overlay_text(palette: str | Palette, spacing: Sequence[float] | None) -> dict[str, str]:
    """The PNG text of a test overlay: the palette's name and, when finite, the ``(row, column)`` spacing in mm."""
    text = {PNG_PALETTE_KEY: get_palette(palette).name}
    if spacing is not None and all(np.isfinite(float(v)) and float(v) > 0 for v in spacing):
        text[PNG_SPACING_KEY] = " ".join(repr(float(v)) for v in spacing)
    return text


def read_overlay(path: str | Path) -> tuple[np.ndarray, str | None, tuple[float, float] | None]:
    """A test overlay: ``(H, W, 3)`` uint8 RGB, its palette's name and its ``(row, column)`` spacing in mm.

    The name and spacing are ``None`` for pictures without them (written by hand, or before they were stored).
    """
    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}) or {})
        array = np.asarray(im.convert("RGB"))
    spacing = None
    if PNG_SPACING_KEY in text:
        row, col = (float(v) for v in text[PNG_SPACING_KEY].split())
        spacing = (row, col)
    return array, text.get(PNG_PALETTE_KEY), spacing


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
