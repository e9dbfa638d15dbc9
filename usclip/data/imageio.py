"""Reading images and masks into uint8 arrays, with a clear error or a logged fix for every bad input.

Images become H x W uint8 grayscale (B-mode is grey; colour overlays keep their luminance):

- 8-bit grey (``L``), RGB, palette and 1-bit files are converted with PIL's ITU-R 601 luminance;
- RGBA / LA are composited onto black first (transparent = no echo), with an info note;
- 16-bit (and 32-bit integer) files are scaled from their bit depth to 8 bits (the smallest of 8, 10, 12, 14, 16 or
  32 bits that holds all but at most :data:`HOT_PIXEL_FRACTION` of the pixels, at least one, so images of one
  scanner keep one scale and a single hot pixel does not darken the image 16-fold); the few pixels above that range
  saturate at 255 (a warning names the file and their count), with an info note;
- DICOM files go through :mod:`usclip.data.dicom` (needs ``pydicom``), with the same pixel limit checked from
  ``Rows x Columns`` in their header;
- ``colour="replace"`` fills the coloured pixels of colour files (colour Doppler, coloured calipers) with the median
  of their grey neighbours (:mod:`usclip.data.colour`); ``keep`` (the default) leaves their luminance;
- unreadable, truncated and empty (0-byte) files raise :class:`ImageReadError` naming the file;
- images of more than ``max_pixels`` pixels (default :data:`MAX_IMAGE_PIXELS`, 64 million: 8000 x 8000) raise
  :class:`ImageReadError` from the size in the file's header, before any pixel is decoded: a decompression bomb (a
  small PNG that decodes to gigapixels) or a 20,000 x 20,000 scan never reaches memory. Reading an image of ``P``
  pixels holds at most about ``12 P`` bytes (measured: 3 for 8-bit grey, 6 for 16-bit grey, 7 for RGB, 10 for
  RGBA, 12 for 32-bit integer; docs/data.md), so the default bounds one read to about 770 MB (190 MB for 8-bit
  grey).

Masks are binarised to {0, 1} (see :func:`read_mask` for the rules on 0/1, anti-aliased and class-index masks).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    from usclip.data.colour import ColourMode

log = logging.getLogger(__name__)

_NOTED: set[tuple[str, str]] = set()  # (what, path): one note per file and process, however often it is read

#: default largest image read, in pixels (64 million: 8000 x 8000); ``None`` lifts the limit
MAX_IMAGE_PIXELS = 64_000_000

#: share of pixels allowed above a 16-bit image's chosen bit depth (saturated at 255), and at least one pixel
HOT_PIXEL_FRACTION = 1e-4

_PIL_LIMIT_LOCK = threading.Lock()

#: PIL modes without colour: ``colour="replace"`` has nothing to do
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


class ImageReadError(ValueError):
    """An image or mask file that cannot be used; the message names the file and the fix."""


def _note_once(what: str, path: Path | str, message: str, *args: object, level: int = logging.INFO) -> None:
    key = (what, str(path))
    if key not in _NOTED:
        _NOTED.add(key)
        log.log(level, message, *args)


def deep_bit_depth(a: np.ndarray) -> tuple[int, int]:
    """The bit depth a 16- or 32-bit image is scaled from, and how many pixels lie above it.

    The smallest of 8, 10, 12, 14, 16 and 32 bits that holds all pixels but at most :data:`HOT_PIXEL_FRACTION` of
    them (and at least one): a 12-bit scan with one hot pixel at 65535 stays on the 12-bit scale, with that pixel
    saturated, instead of being darkened 16-fold.

    Returns:
        ``(bits, number of pixels above 2**bits - 1)``.
    """
    allowed = max(1, int(a.size * HOT_PIXEL_FRACTION))
    for bits in (8, 10, 12, 14, 16):
        above = int(np.count_nonzero(a > 2**bits - 1))
        if above <= allowed:
            return bits, above
    return 32, 0


def _deep_to_uint8(a: np.ndarray, mode: str, path: Path) -> np.ndarray:
    if a.dtype.kind == "i" and int(a.min()) < 0:
        raise ImageReadError(f"{path}: signed {mode} image with negative values; expected unsigned 8 or 16 bit")
    bits, above = deep_bit_depth(a)
    _note_once("16bit", path, "%s: %s image scaled from %d to 8 bits", path, mode, bits)
    if above:
        _note_once(
            "hot",
            path,
            "%s: %d pixels above the %d-bit range (max %d) saturated at 255",
            path,
            above,
            bits,
            int(a.max()),
            level=logging.WARNING,
        )
    if bits <= 16 and int(a.max()) < 2**16:
        # a lookup table: no float copy of the image (memory stays ~ 3 bytes per pixel on top of the decode)
        lut = np.minimum(np.round(np.arange(2**16) * (255.0 / (2**bits - 1))), 255).astype(np.uint8)
        return lut[a.astype(np.uint16, copy=False)]
    # 32-bit data: float64 in blocks of rows, so memory stays ~ 1 byte per pixel on top of the decode
    out = np.empty(a.shape, np.uint8)
    step = max(1, 2**20 // max(1, a.shape[-1]))
    for r in range(0, a.shape[0], step):
        out[r : r + step] = np.minimum(np.round(a[r : r + step] * (255.0 / (2**bits - 1))), 255)
    return out


def _to_uint8_gray(im: Image.Image, path: Path) -> np.ndarray:
    mode = im.mode
    if mode == "L":
        return np.asarray(im)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return _deep_to_uint8(np.asarray(im), mode, path)
    if mode == "F":
        raise ImageReadError(f"{path}: floating-point image (mode F); export it as 8- or 16-bit PNG")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        _note_once("alpha", path, "%s: %s image composited onto black (alpha = echo present)", path, mode)
        rgba = im if mode == "RGBA" else im.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"))
        gray = np.asarray(rgba.convert("L")).astype(np.uint16)  # ITU-R 601 luminance of the colour channels
        gray *= alpha  # <= 255 * 255: fits 16 bits
        del alpha
        # round(gray * alpha / 255) in integers: (x + 127) // 255 (x / 255 is never exactly n + 0.5)
        gray += 127
        gray //= 255
        return gray.astype(np.uint8)
    return np.asarray(im.convert("L"))


def open_header(path: str | Path) -> Image.Image:
    """``Image.open`` without PIL's own decompression-bomb check: reads the header, decodes nothing.

    PIL warns above ``Image.MAX_IMAGE_PIXELS`` (89.5 million) and refuses twice that, from ``Image.open``, before
    the size can be read. Lifting it while opening lets usclip apply ``max_pixels`` itself (naming the size and its
    own limit), and lets a user who raises ``max_image_pixels`` read larger images. Callers check the size before
    decoding.
    """
    with _PIL_LIMIT_LOCK:
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def check_max_pixels(max_pixels: int | None, name: str = "max_image_pixels") -> int | None:
    """Validate a pixel limit (``None`` or a positive integer) and return it.

    Raises:
        ValueError: naming ``name`` and the value received.
    """
    if max_pixels is not None and (isinstance(max_pixels, bool) or int(max_pixels) != max_pixels or max_pixels < 1):
        raise ValueError(f"{name} must be a positive number of pixels or null (no limit), got {max_pixels!r}")
    return None if max_pixels is None else int(max_pixels)


def too_many_pixels(path: Path | str, width: int, height: int, max_pixels: int) -> ImageReadError:
    """The error for an image larger than ``max_pixels``, found from its header (PNG, JPEG, ..., DICOM alike)."""
    return ImageReadError(
        f"{path}: image of {width} x {height} = {width * height:,} pixels, more than the limit of "
        f"{max_pixels:,} (data.max_image_pixels); not decoded. A decompression bomb or a huge scan: "
        "downscale it, or raise data.max_image_pixels (memory: up to 12 bytes per pixel)"
    )


def read_image(path: str | Path, max_pixels: int | None = MAX_IMAGE_PIXELS, colour: ColourMode = "keep") -> np.ndarray:
    """Read an image file as an H x W uint8 grayscale array.

    Args:
        path: the image file.
        max_pixels: largest width x height read; checked from the file's header before decoding. ``None``: no
            limit (memory then grows with the image: up to about 12 bytes per pixel).
        colour: ``keep`` the luminance of coloured pixels, or ``replace`` them by the median of their grey
            neighbours (colour Doppler, coloured calipers; see :mod:`usclip.data.colour`).

    Raises:
        FileNotFoundError: if the file does not exist.
        ImageReadError: if it is empty, truncated, not an image, larger than ``max_pixels`` or of an unsupported
            kind (names the file).
    """
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        from usclip.data.dicom import read_dicom

        # the whole frame: no region is chosen or left out
        return read_dicom(path, regions="all", colour=colour, max_pixels=max_pixels).image
    from usclip.data.colour import check_colour_mode

    check_colour_mode(colour)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes); re-export it or remove it with its mask and CSV rows")
    try:
        with open_header(path) as im:
            width, height = im.size
            if max_pixels is not None and width * height > max_pixels:
                raise too_many_pixels(path, width, height, max_pixels)
            im.load()  # decode now: a truncated file fails here, not later in a worker
            out = gray_from_pil(im, path, colour)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as err:  # PIL checks again in some decoders (GIF frames) while loading
        raise ImageReadError(f"{path}: {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(
            f"{path}: cannot read the image ({err}); the file is truncated or not an image. "
            "Re-export it, or remove it together with its mask and CSV rows"
        ) from err
    if out.ndim != 2 or min(out.shape) == 0:
        raise ImageReadError(f"{path}: expected a 2-D image, got shape {out.shape}")
    return np.ascontiguousarray(out)


def gray_from_pil(im: Image.Image, where: str | Path, colour: ColourMode = "keep") -> np.ndarray:
    """A decoded PIL image as H x W uint8 grey, by the rules of :func:`read_image` (which calls it for every file).

    Args:
        im: a loaded PIL image (any mode :func:`read_image` accepts).
        where: the file (or a description of the image) for messages.
        colour: ``keep`` or ``replace`` coloured pixels (see :func:`read_image`).

    Raises:
        ImageReadError: for a floating-point (mode ``F``) image.
    """
    from usclip.data.colour import coloured_pixels, replace_coloured

    out = _to_uint8_gray(im, Path(where))
    if colour == "replace" and im.mode not in _GREY_MODES:
        out = replace_coloured(out, coloured_pixels(np.asarray(im.convert("RGB"))), where)
    return out


def load_grayscale(
    path: str | Path, max_pixels: int | None = MAX_IMAGE_PIXELS, colour: ColourMode = "keep"
) -> np.ndarray:
    """Load an image file as an H x W uint8 array (alias of :func:`read_image`, kept for the tasks)."""
    return read_image(path, max_pixels, colour)


def binarise_mask(mask: np.ndarray, path: str | Path) -> np.ndarray:
    """Turn a mask array into {0, 1}, fixing harmless encodings and refusing ambiguous ones.

    - {0, 255}, {0, v} for one value v (e.g. 0/1, 0/128) or all zero: lesion = non-zero (0/1 is noted once);
    - more than two values, all below 16: a class-index map (0/1/2 ...): an error, usclip segments one lesion
      class; merge the classes into one mask;
    - more than two values otherwise: anti-aliased or resampled edges: thresholded at half the maximum (128 for
      0..255), with a warning naming the file.

    Raises:
        ImageReadError: for a class-index mask.
    """
    values = np.unique(mask)
    if len(values) <= 2:
        if len(values) == 2 and values[1] != 255:  # one note per folder: a whole dataset is usually stored alike
            folder = Path(path).parent
            message = "%s: masks stored as 0/%d (first: %s), read as binary (non-zero = lesion)"
            _note_once("binary", folder, message, folder, values[1], Path(path).name)
        return (mask > 0).astype(np.uint8)
    if int(values[-1]) < 16:
        raise ImageReadError(
            f"{path}: mask holds the class indices {values.tolist()}; usclip segments one lesion class, so the mask "
            "must be binary (0/255 or 0/1). Merge the classes (mask > 0) or export one lesion class"
        )
    half = (int(values[-1]) + 1) // 2
    _note_once(
        "antialiased",
        path,
        "%s: mask has %d grey levels (anti-aliased or resampled); thresholded at %d",
        path,
        len(values),
        half,
        level=logging.WARNING,
    )
    return (mask >= half).astype(np.uint8)


def read_mask(
    paths: str | Path | Sequence[Path],
    shape: tuple[int, int] | None = None,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Read one mask, or several OR-merged (multi-lesion BUSI masks), as an H x W {0, 1} uint8 array.

    Args:
        paths: the mask file or files.
        shape: ``(H, W)`` of the image; every mask must match it.
        max_pixels: largest mask read (see :func:`read_image`).

    Raises:
        FileNotFoundError: if a mask file does not exist.
        ImageReadError: if a mask is unreadable, of another size than the image, or a class-index map.
    """
    files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not files:
        raise ValueError("read_mask: no mask file given")
    out: np.ndarray | None = None
    for p in files:
        m = binarise_mask(read_image(p, max_pixels), p)
        if shape is not None and m.shape != tuple(shape):
            raise ImageReadError(
                f"{p}: mask is {m.shape[1]}x{m.shape[0]} but its image is {shape[1]}x{shape[0]} (W x H); "
                "masks must have the image's size (resize with nearest-neighbour interpolation)"
            )
        if out is not None and m.shape != out.shape:
            raise ImageReadError(f"{p}: mask is {m.shape[::-1]} but {files[0].name} is {out.shape[::-1]} (W x H)")
        out = m if out is None else np.maximum(out, m)
    assert out is not None
    return out
