"""Ultrasound DICOM input: the image, the scan region and the pixel spacing in millimetres.

Ultrasound DICOM files describe their imaging regions in ``SequenceOfUltrasoundRegions`` (DICOM PS3.3 C.8.5.5):
each item gives a pixel rectangle (``RegionLocationMinX0``, ``MinY0``, ``MaxX1``, ``MaxY1``, inclusive), its
spatial format, its data type and its physical size per pixel (``PhysicalDeltaX``/``Y`` in the units of
``PhysicalUnitsX``/``YDirection``; 3 = cm). With ``crop="auto"`` the dataset crops exactly to the largest 2-D
tissue region instead of detecting the scan area, and samples carry the spacing, so that HD95 and ASD can be
reported in millimetres (see :func:`usclip.data.crop.resized_spacing`).

Needs ``pydicom`` (``pip install 'usclip[dicom]'``); compressed transfer syntaxes also need pydicom's pixel-data
plugins (e.g. ``pylibjpeg``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from usclip.data.crop import Box
from usclip.data.imageio import ImageReadError, _note_once

log = logging.getLogger(__name__)

_UNITS_TO_MM = {3: 10.0}  # PhysicalUnits code -> millimetres per unit (3 = cm; others are not lengths)
_SPATIAL_2D = 1  # RegionSpatialFormat: 2-D (tissue or flow)
_TISSUE = 1  # RegionDataType: tissue


@dataclass
class DicomImage:
    """An ultrasound DICOM frame.

    Attributes:
        image: H x W uint8 grayscale (the first frame of a cine loop).
        region: ``(x0, y0, x1, y1)`` of the largest 2-D region, end exclusive; ``None`` without regions.
        spacing: ``(row, column)`` pixel spacing in millimetres of that region; ``None`` when not given in cm.
    """

    image: np.ndarray
    region: Box | None
    spacing: tuple[float, float] | None


def _import_pydicom() -> Any:
    try:
        import pydicom
        import pydicom.pixels  # the pixel_array function (pydicom >= 3)
    except ImportError as err:
        raise ImportError("reading DICOM files needs pydicom: pip install 'usclip[dicom]'") from err
    return pydicom


def _to_gray_uint8(ds: Any, frame: np.ndarray, path: Path) -> np.ndarray:
    """One decoded frame -> uint8 grayscale.

    ``frame`` comes from pydicom 3's pixel decoding, which already converts YCbCr data (``YBR_FULL``,
    ``YBR_FULL_422``, ...) to RGB but leaves ``PhotometricInterpretation`` as written: a 3-sample frame is therefore
    RGB whatever the header says, and converting it again would shift the grey values (a YBR_FULL pixel of
    luminance 91 read as 171).
    """
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        frame = apply_color_lut(frame, ds)
    if frame.ndim == 3:
        rgb = frame[..., :3].astype(np.float64)
        frame = rgb @ np.array([0.299, 0.587, 0.114])  # ITU-R 601 luminance, as PIL's convert("L")
    frame = np.asarray(frame)
    bits = int(getattr(ds, "BitsStored", 8))
    if frame.dtype.kind == "i" and frame.min() < 0:
        raise ImageReadError(f"{path}: signed pixel data with negative values is not an ultrasound image")
    top = 2**bits - 1 if photometric.startswith("MONOCHROME") else 255
    if top != 255:
        _note_once("dicom-bits", path, "%s: %d-bit DICOM pixels scaled to 8 bits", path, bits)
    gray = np.clip(np.round(frame.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    return 255 - gray if photometric == "MONOCHROME1" else gray  # MONOCHROME1: 0 is white


def _region(ds: Any, shape: tuple[int, int], path: Path) -> tuple[Box | None, tuple[float, float] | None]:
    regions = list(getattr(ds, "SequenceOfUltrasoundRegions", []) or [])
    best: Any = None
    best_area = 0
    box: Box = (0, 0, shape[1], shape[0])
    for r in regions:
        if int(getattr(r, "RegionSpatialFormat", 0)) != _SPATIAL_2D:
            continue
        try:
            x0, y0 = int(r.RegionLocationMinX0), int(r.RegionLocationMinY0)
            x1, y1 = int(r.RegionLocationMaxX1) + 1, int(r.RegionLocationMaxY1) + 1  # inclusive -> exclusive
        except AttributeError:
            continue
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(shape[1], x1), min(shape[0], y1)
        # tissue regions first, then the largest
        area = (x1 - x0) * (y1 - y0) + (1 << 40 if int(getattr(r, "RegionDataType", 0)) == _TISSUE else 0)
        if x1 > x0 and y1 > y0 and area > best_area:
            best, best_area, box = r, area, (x0, y0, x1, y1)
    if best is None:
        if regions:
            log.warning("%s: no usable 2-D region in SequenceOfUltrasoundRegions", path)
        return None, None
    spacing = None
    ux, uy = int(getattr(best, "PhysicalUnitsXDirection", 0)), int(getattr(best, "PhysicalUnitsYDirection", 0))
    dx, dy = getattr(best, "PhysicalDeltaX", None), getattr(best, "PhysicalDeltaY", None)
    if ux in _UNITS_TO_MM and uy in _UNITS_TO_MM and dx is not None and dy is not None:
        spacing = (abs(float(dy)) * _UNITS_TO_MM[uy], abs(float(dx)) * _UNITS_TO_MM[ux])
    return box, spacing


def read_dicom(path: str | Path) -> DicomImage:
    """Read an ultrasound DICOM file: first frame as uint8 grayscale, the largest 2-D region and its spacing.

    A cine loop (``NumberOfFrames`` > 1) gives its first frame, decoded alone (the rest of the loop is not decoded);
    one sample per file keeps the 8:1:1 split per scan. Colour data (RGB, YCbCr, palette) becomes ITU-R 601
    luminance.

    Raises:
        ImportError: if pydicom is not installed.
        FileNotFoundError: if the file does not exist.
        ImageReadError: if the file is not DICOM, has no pixel data, or its pixels cannot be decoded (naming the
            file and, for compressed data, the transfer syntax).
    """
    path = Path(path)
    pydicom = _import_pydicom()
    if not path.is_file():
        raise FileNotFoundError(f"DICOM file {path} does not exist")
    try:
        ds = pydicom.dcmread(path)
    except Exception as err:  # pydicom raises InvalidDicomError, OSError, EOFError, ValueError ...
        raise ImageReadError(f"{path}: not a readable DICOM file ({err})") from err
    if "PixelData" not in ds:
        raise ImageReadError(f"{path}: DICOM file without pixel data")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    try:
        # index=0 decodes only the first frame of a cine loop; YCbCr is converted to RGB (as_rgb, the default)
        pixels = pydicom.pixels.pixel_array(ds, index=0 if frames > 1 else None)
    except Exception as err:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        raise ImageReadError(
            f"{path}: cannot decode the pixel data (transfer syntax {syntax}: {err}); compressed files need "
            "pydicom's pixel-data plugins (e.g. pip install pylibjpeg pylibjpeg-libjpeg)"
        ) from err
    samples = int(getattr(ds, "SamplesPerPixel", 1))
    if frames > 1:
        _note_once("dicom-frames", path, "%s: cine loop of %d frames; using the first", path, frames)
    if pixels.ndim != (2 if samples == 1 else 3):
        raise ImageReadError(f"{path}: unexpected pixel array shape {pixels.shape}")
    image = np.ascontiguousarray(_to_gray_uint8(ds, pixels, path))
    region, spacing = _region(ds, image.shape, path)
    return DicomImage(image=image, region=region, spacing=spacing)
