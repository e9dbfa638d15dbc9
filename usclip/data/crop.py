"""Crop ultrasound images to the imaging region and map predictions back to the original image.

Scanner screenshots carry a black screen with burnt-in text, a grey bar, depth ticks, logos and calipers around
the scan area (a rectangle for linear probes, a fan for curvilinear and phased probes). The paper crops these
non-imaging regions before resizing to 224 x 224 (Qu et al., arXiv:2506.08849). :func:`find_scan_box` finds the
scan area's bounding box; the box is kept with every sample (``crop_box``) so that :func:`paste_back` can put a
prediction made on the crop back into the original image.

Boxes are ``(x0, y0, x1, y1)`` in pixels of the original image, end exclusive (``image[y0:y1, x0:x1]``).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]
CropMode = Literal["auto", "boxes", "none"]
CROP_MODES = ("auto", "boxes", "none")


def full_box(image: np.ndarray) -> Box:
    """The box of the whole image."""
    return (0, 0, int(image.shape[1]), int(image.shape[0]))


def _odd(n: float, minimum: int) -> int:
    k = max(minimum, round(n))
    return k if k % 2 else k + 1


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the background regions that do not touch the image border (cysts, shadows enclosed by tissue)."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), np.uint8)
    padded[1:-1, 1:-1] = mask
    flood = padded.copy()
    cv2.floodFill(flood, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 1)
    return (padded | (1 - flood))[1:-1, 1:-1]


def _aligned(other: np.ndarray, main: np.ndarray, min_area: float) -> bool:
    """Whether a component continues the main one across a dark band.

    It does when it is as wide and in the same columns (a deep region below a black cyst or shadow), or as tall
    and in the same rows (a second pane of a dual view).
    """
    if other[cv2.CC_STAT_AREA] < min_area:
        return False
    for pos, size in ((cv2.CC_STAT_LEFT, cv2.CC_STAT_WIDTH), (cv2.CC_STAT_TOP, cv2.CC_STAT_HEIGHT)):
        lo, hi = max(other[pos], main[pos]), min(other[pos] + other[size], main[pos] + main[size])
        if other[size] >= 0.5 * main[size] and hi - lo >= 0.8 * other[size]:
            return True
    return False


def find_scan_box(image: np.ndarray, threshold: int = 8, min_area: float = 0.05) -> Box:
    """Bounding box of the scan area: the largest bright, speckled region, without the UI around it.

    No dependency does this: OpenCV and scikit-image give the primitives (filters, morphology, connected
    components) but no ultrasound-specific detector, and the published croppers are scanner-specific
    scripts with hard-coded pixel boxes. The steps, with sizes relative to the image's shorter side ``s``:

    1. a median filter (about ``s/100``) removes text strokes, dotted lines, caliper crosses and isolated
       dark speckle, and keeps the straight or curved edges of the scan area;
    2. pixels brighter than ``threshold`` are foreground; enclosed dark regions (cysts, shadows) are filled;
    3. a morphological opening (about ``s/50``) detaches what is left of labels, bars and ticks;
    4. the largest connected component is the scan area (below ``min_area`` of the image: nothing found),
       joined by components that continue it beyond a black band (a deep region under a cyst or a shadow that
       spans the image: as wide and in the same columns; a second pane: as tall and in the same rows);
    5. the component is regrown inside the unfiltered foreground for as many pixels as steps 1 and 3 may
       have eaten (fan tips, thin edges), which does not cross the gap that separates marks from the scan.

    Args:
        image: H x W (or H x W x C) uint8 image.
        threshold: grey level that separates the black screen from the scan area (after the median filter).
        min_area: smallest share of the image the scan area may cover; below it the whole image is returned.

    Returns:
        ``(x0, y0, x1, y1)``, end exclusive; the whole image when no scan area is found (logged).

    Raises:
        ValueError: if ``image`` is not a 2-D or 3-D uint8 array.
    """
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"find_scan_box: expected an H x W (x C) uint8 image, got {image.dtype} {image.shape}")
    gray = image if image.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
    h, w = gray.shape
    s = min(h, w)
    if s < 16:
        return full_box(gray)
    k_med = _odd(s / 100, 3)
    k_open = _odd(s / 50, 3)
    fg = _fill_holes((cv2.medianBlur(gray, k_med) > threshold).astype(np.uint8))
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k_open, k_open)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    if n <= 1 or areas.max() < min_area * h * w:
        log.debug("find_scan_box: no scan area found in a %dx%d image; keeping the whole image", w, h)
        return (0, 0, w, h)
    main = 1 + int(np.argmax(areas))
    keep = [main] + [c for c in range(1, n) if c != main and _aligned(stats[c], stats[main], min_area * h * w)]
    region = np.isin(labels, keep).astype(np.uint8)
    # Regrow the component inside the raw foreground (geodesic dilation) to recover what the filters ate: fan
    # tips, and deep rows as dark as the screen's noise (twice the median of the pixels away from the component:
    # 0 on a clean black screen; text is too sparse to move the median). Marks that are not connected to the
    # component and bright (text, ticks, bars: at least 128) are out of bounds, with a 2-pixel halo for the
    # ringing that resampling leaves around them.
    near = cv2.dilate(region, np.ones((2 * k_open + 1, 2 * k_open + 1), np.uint8))
    screen = gray[near == 0]
    level = min(threshold, 2 * int(np.median(screen))) if screen.size else threshold
    n_marks, marks = cv2.connectedComponents((gray > threshold).astype(np.uint8), connectivity=8)
    peak = np.zeros(n_marks, np.uint8)
    np.maximum.at(peak, marks.ravel().astype(np.intp), gray.ravel())
    is_mark = peak >= 128  # burnt-in text, ticks and bars are drawn bright; dim specks are dark scan corners
    is_mark[0] = False
    is_mark[np.unique(marks[region > 0])] = False
    detached = is_mark[marks].astype(np.uint8)
    blocked = cv2.dilate(detached, np.ones((5, 5), np.uint8))
    allowed = (((gray > level) & (blocked == 0)) | (region > 0)).astype(np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    for _ in range(max(k_med + k_open, s // 8)):
        grown = cv2.dilate(region, kernel) & allowed
        if np.array_equal(grown, region):
            break
        region = grown
    x, y, bw, bh = cv2.boundingRect(region)
    return (int(x), int(y), int(x + bw), int(y + bh))


def check_box(box: tuple[int, ...], size: tuple[int, int], where: str) -> Box:
    """Clip-free validation of a crop box against an image of ``size`` = (H, W).

    Raises:
        ValueError: if the box is not four integers with ``0 <= x0 < x1 <= W`` and ``0 <= y0 < y1 <= H``.
    """
    h, w = size
    if len(box) != 4:
        raise ValueError(f"{where}: a crop box is (x0, y0, x1, y1), got {box}")
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(
            f"{where}: crop box {(x0, y0, x1, y1)} does not fit the {w}x{h} image (W x H); "
            "expected 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H, end exclusive"
        )
    return (x0, y0, x1, y1)


def read_boxes_csv(path: str | Path) -> dict[str, Box]:
    """Read ``id,x0,y0,x1,y1`` rows (end exclusive, original-image pixels), e.g. synthetic ``boxes.csv``.

    Raises:
        ValueError: on a missing column, a non-integer value or a repeated id (naming the file and row).
    """
    path = Path(path)
    boxes: dict[str, Box] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        need = ["id", "x0", "y0", "x1", "y1"]
        if not set(need) <= set(reader.fieldnames or []):
            raise ValueError(f"{path}: expected a header with columns {need}, got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            try:
                box = tuple(int(row[k]) for k in need[1:])
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}, line {line}: box values must be integers, got {row}") from err
            if row["id"] in boxes:
                raise ValueError(f"{path}, line {line}: id {row['id']!r} appears twice")
            boxes[row["id"]] = box  # type: ignore[assignment]
    return boxes


def crop_box_for(
    image: np.ndarray, mode: CropMode, boxes: Mapping[str, Box] | None = None, sample_id: str = "", where: str = ""
) -> Box:
    """The crop box of one image for a crop ``mode`` (``auto``: :func:`find_scan_box`; ``boxes``: the given box).

    Raises:
        KeyError: if ``mode="boxes"`` and ``boxes`` has no entry for ``sample_id``.
        ValueError: on an unknown mode or a box outside the image.
    """
    if mode == "none":
        return full_box(image)
    if mode == "auto":
        return find_scan_box(image)
    if mode == "boxes":
        if boxes is None or sample_id not in boxes:
            raise KeyError(f"{where or sample_id}: crop='boxes' but boxes.csv has no row for id {sample_id!r}")
        return check_box(boxes[sample_id], image.shape[:2], where or sample_id)
    raise ValueError(f"crop must be one of {CROP_MODES}, got {mode!r}")


def paste_back(
    prediction: torch.Tensor,
    crop_box: torch.Tensor | tuple[int, int, int, int],
    orig_size: torch.Tensor | tuple[int, int],
    mode: Literal["bilinear", "nearest"] = "bilinear",
    fill: float = 0.0,
) -> torch.Tensor:
    """Map a prediction made on a crop back onto the original image.

    The prediction is resized to the crop's size and placed into a canvas of the original size filled with
    ``fill``. For two-class logits the default ``fill=0`` gives equal logits outside the crop, where
    ``argmax`` picks class 0 (background); for single-channel logits pass a large negative ``fill``.

    Args:
        prediction: ``(h, w)`` or ``(C, h, w)`` logits, probabilities or a mask at the model's input size.
        crop_box: ``(x0, y0, x1, y1)`` of the crop in original pixels (the sample's ``crop_box``).
        orig_size: ``(H, W)`` of the original image (the sample's ``orig_size``).
        mode: ``bilinear`` for logits and probabilities, ``nearest`` for hard masks and class maps.
        fill: value outside the crop.

    Returns:
        ``(H, W)`` or ``(C, H, W)`` tensor, the dtype of ``prediction`` (float for bilinear).

    Raises:
        ValueError: if the prediction is not 2-D or 3-D or the box does not fit ``orig_size``.
    """
    if prediction.ndim not in (2, 3):
        raise ValueError(f"paste_back: prediction must be (h, w) or (C, h, w), got shape {tuple(prediction.shape)}")
    height, width = (int(v) for v in orig_size)
    x0, y0, x1, y1 = check_box(tuple(int(v) for v in crop_box), (height, width), "paste_back")
    squeeze = prediction.ndim == 2
    x = prediction[None, None] if squeeze else prediction[None]  # (1, C, h, w)
    dtype = x.dtype
    if mode == "bilinear":
        x = F.interpolate(x.float(), size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
    else:
        x = F.interpolate(x.float(), size=(y1 - y0, x1 - x0), mode="nearest").to(dtype)
    canvas = torch.full((x.shape[1], height, width), fill, dtype=x.dtype, device=x.device)
    canvas[:, y0:y1, x0:x1] = x[0]
    return canvas[0] if squeeze else canvas


def resized_spacing(
    spacing: torch.Tensor | tuple[float, float], crop_box: torch.Tensor | tuple[int, ...], image_size: int
) -> tuple[float, float]:
    """Pixel spacing at the model's input size, from the original spacing (a sample's ``spacing``, in mm).

    A crop of ``w x h`` pixels resized to ``image_size x image_size`` stretches the spacing by ``h / image_size``
    in rows and ``w / image_size`` in columns; pass the result to HD95 / ASD for distances in millimetres.
    """
    x0, y0, x1, y1 = (int(v) for v in crop_box)
    sy, sx = (float(v) for v in spacing)
    return (sy * (y1 - y0) / image_size, sx * (x1 - x0) / image_size)
