"""Colour in a grey ultrasound scan: which pixels are coloured, their share of the scan area, and replacing them.

B-mode ultrasound is grey. Colour in a scan comes from colour or power Doppler boxes, coloured calipers and
measurement marks, or a tinted background outside the scan. Converted to luminance it becomes blobs of another
brightness that a segmentation model can take for tissue.

A pixel is *coloured* when its channels, on the 8-bit scale, differ by more than :data:`COLOUR_TOLERANCE`:
``max(R, G, B) - min(R, G, B) > 24``. Grey pixels of lossless files differ by 0, and Doppler and caliper colours are
saturated (a spread of 50 to 255): in the lossless real scans checked (docs/data.md) the share is the same at any
tolerance from 0 to 24. Lossy copies add chroma noise around colour: the lossy JPEG 2000 copy of an RGB scan counts
5.9 % coloured pixels at 24 against 5.2 % in the original (7.9 % at a tolerance of 8).

``colour="replace"`` fills each coloured pixel with the median of its grey 8-neighbours, working inwards ring by ring
from the edge of each coloured area. A filled pixel is therefore never brighter than the brightest grey pixel next
to the area, nor darker than the darkest one. DICOM files are filled inside their 2-D ultrasound regions, other
files everywhere. ``colour="keep"`` (the default) leaves the luminance as it is.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, cast

import numpy as np

from usclip.data.crop import Box, crop_box_for
from usclip.data.imageio import _GREY_MODES, MAX_IMAGE_PIXELS, open_header, read_image

log = logging.getLogger(__name__)

ColourMode = Literal["keep", "replace"]
#: what to do with coloured pixels: ``keep`` their luminance, or ``replace`` them by the median of grey neighbours
COLOUR_MODES: tuple[ColourMode, ...] = ("keep", "replace")

#: largest channel spread, on the 8-bit scale, of a pixel that still counts as grey
COLOUR_TOLERANCE = 24

#: above this share of coloured pixels the image is a tinted B-mode (a colour map), not grey with overlays:
#: ``replace`` leaves it as it is, with a warning
MAX_REPLACE_SHARE = 0.5

# the 8 neighbours of a pixel, as (row, column) offsets
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def check_colour_mode(colour: str, name: str = "colour") -> ColourMode:
    """Validate a colour mode and return it.

    Raises:
        ValueError: naming ``name``, the value received and the modes allowed.
    """
    if colour not in COLOUR_MODES:
        raise ValueError(f"{name} must be one of {COLOUR_MODES}, got {colour!r}")
    return cast(ColourMode, colour)


def coloured_pixels(rgb: np.ndarray, tolerance: int = COLOUR_TOLERANCE) -> np.ndarray:
    """The coloured pixels of an H x W x 3 uint8 image: channels differ by more than ``tolerance``.

    Returns:
        H x W bool.
    """
    if rgb.ndim != 3 or rgb.shape[-1] < 3 or rgb.dtype != np.uint8:
        raise ValueError(f"coloured_pixels expects an H x W x 3 uint8 array, got {rgb.dtype} {rgb.shape}")
    channels = rgb[..., :3]
    spread = channels.max(axis=-1)
    spread -= channels.min(axis=-1)  # max >= min: no uint8 wrap-around
    return spread > tolerance


def colour_share(coloured: np.ndarray | None, box: Box | None = None) -> float:
    """The share of coloured pixels in ``box`` (``(x0, y0, x1, y1)``, end exclusive; ``None``: the whole image).

    ``coloured`` is a :func:`coloured_pixels` mask; ``None`` (a grey file) gives 0.
    """
    if coloured is None:
        return 0.0
    x0, y0, x1, y1 = box if box is not None else (0, 0, coloured.shape[1], coloured.shape[0])
    area = coloured[y0:y1, x0:x1]
    return float(area.mean()) if area.size else 0.0


def replace_coloured(gray: np.ndarray, coloured: np.ndarray, where: str | Path = "image") -> np.ndarray:
    """Fill the coloured pixels of a grey image with the median of their grey neighbours.

    Pixels are filled ring by ring from the edge of each coloured area inwards: each coloured pixel with at least
    one grey (or already filled) 8-neighbour takes the median of those neighbours, rounded half up. An image with
    more than :data:`MAX_REPLACE_SHARE` coloured pixels (a tinted B-mode), or with no grey pixel at all, is
    returned unchanged with a warning naming ``where``.

    Args:
        gray: H x W uint8, the luminance of the image.
        coloured: H x W bool, the pixels to replace (:func:`coloured_pixels`).
        where: the file, for the warning.

    Returns:
        A new H x W uint8 array; ``gray`` is not changed.
    """
    if gray.shape != coloured.shape:
        raise ValueError(f"replace_coloured: gray {gray.shape} and coloured {coloured.shape} differ in shape")
    out = gray.copy()
    count = int(coloured.sum())
    if count == 0:
        return out
    if count > MAX_REPLACE_SHARE * coloured.size:
        log.warning(
            "%s: %.0f %% of the pixels are coloured (a tinted B-mode?); colour 'replace' leaves the image as it is",
            where,
            100.0 * count / coloured.size,
        )
        return out
    # one pixel of padding: neighbours outside the image are never known
    values = np.pad(gray, 1).astype(np.int16)
    known = np.pad(~coloured, 1)
    ys, xs = np.nonzero(coloured)
    ys, xs = ys + 1, xs + 1
    sentinel = np.int16(1 << 12)  # sorts after every uint8 value
    while ys.size:
        # (n, 8): the neighbours of every pixel still to fill, and which of them are known
        near = np.stack([values[ys + dy, xs + dx] for dy, dx in _NEIGHBOURS], axis=1)
        ok = np.stack([known[ys + dy, xs + dx] for dy, dx in _NEIGHBOURS], axis=1)
        k = ok.sum(axis=1)
        ring = k > 0
        if not ring.any():  # coloured areas with no grey pixel around them: nothing to take a median of
            log.warning("%s: %d coloured pixels have no grey neighbour and are kept", where, ys.size)
            break
        near, k = np.sort(np.where(ok[ring], near[ring], sentinel), axis=1), k[ring]
        rows = np.arange(near.shape[0])
        median = (near[rows, (k - 1) // 2] + near[rows, k // 2] + 1) // 2
        values[ys[ring], xs[ring]] = median  # the whole ring at once: a pixel's median never sees its ring
        known[ys[ring], xs[ring]] = True
        ys, xs = ys[~ring], xs[~ring]
    out[...] = values[1:-1, 1:-1]
    return out


def image_colour_mask(path: str | Path) -> np.ndarray | None:
    """The :func:`coloured_pixels` of a (non-DICOM) image file, or ``None`` when its mode has no colour.

    Call it after :func:`usclip.data.imageio.read_image` accepted the file (the size is not checked again).
    """
    with open_header(path) as im:
        if im.mode in _GREY_MODES:
            return None
        return coloured_pixels(np.asarray(im.convert("RGB")))


def scan_area_colour_share(
    path: str | Path, image: np.ndarray | None = None, max_pixels: int | None = MAX_IMAGE_PIXELS
) -> float | None:
    """The share of coloured pixels in a file's scan area, or ``None`` for a file without colour samples.

    The scan area of a DICOM file is its ultrasound region (:func:`usclip.data.dicom.read_dicom`), all its tissue
    regions together when it holds several (a dual view); without a region, and for other files, it is the area
    ``crop="auto"`` finds (:func:`usclip.data.crop.crop_box_for`).

    Args:
        path: an image or DICOM file.
        image: its grey image when already read (spares a decode); ``None`` reads it.
        max_pixels: largest image read (see :func:`usclip.data.imageio.read_image`); ``None``: no limit.

    Raises:
        ImageReadError: if the file cannot be read.
    """
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        from usclip.data.dicom import _import_pydicom, read_dicom

        pydicom = _import_pydicom()  # without pydicom: "pip install 'usclip[dicom]'"
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        if str(getattr(header, "PhotometricInterpretation", "MONOCHROME2")).upper().startswith("MONOCHROME"):
            return None  # a grey file: not decoded again
        d = read_dicom(path, regions="all", max_pixels=max_pixels)  # every region: none is left out, no warning
        if d.coloured is None:
            return None
        if len(d.regions) > 1:
            areas = [r.area for r in d.regions]
            shares = [colour_share(d.coloured, r.box) for r in d.regions]
            return sum(a * s for a, s in zip(areas, shares, strict=True)) / sum(areas)
        return colour_share(d.coloured, d.region or crop_box_for(d.image, "auto", where=str(path)))
    gray = image if image is not None else read_image(path, max_pixels)  # checks the size before decoding
    coloured = image_colour_mask(path)
    if coloured is None:
        return None
    return colour_share(coloured, crop_box_for(gray, "auto", where=str(path)))
