"""Reading images and masks into uint8 arrays, with a clear error or a logged fix for every bad input.

Images become H x W uint8 grayscale (B-mode is grey; colour overlays keep their luminance):

- 8-bit grey (``L``), RGB, palette and 1-bit files are converted with PIL's ITU-R 601 luminance;
- RGBA / LA are composited onto black first (transparent = no echo), with an info note;
- 16-bit (and 32-bit integer) files are scaled from their bit depth to 8 bits (the smallest of 8, 10, 12, 14 or 16
  bits that holds the image's maximum, so images of one scanner keep one scale), with an info note;
- DICOM files go through :mod:`usclip.data.dicom` (needs ``pydicom``);
- unreadable or truncated files raise :class:`ImageReadError` naming the file.

Masks are binarised to {0, 1} (see :func:`read_mask` for the rules on 0/1, anti-aliased and class-index masks).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

_NOTED: set[tuple[str, str]] = set()  # (what, path): one note per file and process, however often it is read


class ImageReadError(ValueError):
    """An image or mask file that cannot be used; the message names the file and the fix."""


def _note_once(what: str, path: Path | str, message: str, *args: object, level: int = logging.INFO) -> None:
    key = (what, str(path))
    if key not in _NOTED:
        _NOTED.add(key)
        log.log(level, message, *args)


def _to_uint8_gray(im: Image.Image, path: Path) -> np.ndarray:
    mode = im.mode
    if mode == "L":
        return np.asarray(im)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im).astype(np.int64)
        if a.min() < 0:
            raise ImageReadError(f"{path}: signed {mode} image with negative values; expected unsigned 8 or 16 bit")
        top = int(a.max())
        bits = next((b for b in (8, 10, 12, 14, 16, 32) if top < 2**b), 32)
        _note_once("16bit", path, "%s: %s image scaled from %d to 8 bits", path, mode, bits)
        return np.round(a * (255.0 / (2**bits - 1))).astype(np.uint8)
    if mode == "F":
        raise ImageReadError(f"{path}: floating-point image (mode F); export it as 8- or 16-bit PNG")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        _note_once("alpha", path, "%s: %s image composited onto black (alpha = echo present)", path, mode)
        rgba = np.asarray(im.convert("RGBA")).astype(np.float32)
        gray = np.asarray(Image.fromarray(rgba[..., :3].astype(np.uint8)).convert("L")).astype(np.float32)
        return np.round(gray * rgba[..., 3] / 255.0).astype(np.uint8)
    return np.asarray(im.convert("L"))


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as an H x W uint8 grayscale array.

    Raises:
        FileNotFoundError: if the file does not exist.
        ImageReadError: if it is empty, truncated, not an image, or of an unsupported kind (names the file).
    """
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        from usclip.data.dicom import read_dicom

        return read_dicom(path).image
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes); re-export it or remove it with its mask and CSV rows")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later in a worker
            out = _to_uint8_gray(im, path)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(
            f"{path}: cannot read the image ({err}); the file is truncated or not an image. "
            "Re-export it, or remove it together with its mask and CSV rows"
        ) from err
    if out.ndim != 2 or min(out.shape) == 0:
        raise ImageReadError(f"{path}: expected a 2-D image, got shape {out.shape}")
    return np.ascontiguousarray(out)


def load_grayscale(path: str | Path) -> np.ndarray:
    """Load an image file as an H x W uint8 array (alias of :func:`read_image`, kept for the tasks)."""
    return read_image(path)


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


def read_mask(paths: str | Path | Sequence[Path], shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read one mask, or several OR-merged (multi-lesion BUSI masks), as an H x W {0, 1} uint8 array.

    Args:
        paths: the mask file or files.
        shape: ``(H, W)`` of the image; every mask must match it.

    Raises:
        FileNotFoundError: if a mask file does not exist.
        ImageReadError: if a mask is unreadable, of another size than the image, or a class-index map.
    """
    files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not files:
        raise ValueError("read_mask: no mask file given")
    out: np.ndarray | None = None
    for p in files:
        m = binarise_mask(read_image(p), p)
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
