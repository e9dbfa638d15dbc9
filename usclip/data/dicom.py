"""Ultrasound DICOM input: the image, the scan region and the pixel spacing in millimetres.

Ultrasound DICOM files describe their imaging regions in ``SequenceOfUltrasoundRegions`` (DICOM PS3.3 C.8.5.5):
each item gives a pixel rectangle (``RegionLocationMinX0``, ``MinY0``, ``MaxX1``, ``MaxY1``, inclusive), its
spatial format, its data type and its physical size per pixel (``PhysicalDeltaX``/``Y`` in the units of
``PhysicalUnitsX``/``YDirection``; 3 = cm). With ``crop="auto"`` the dataset crops exactly to the largest 2-D
tissue region instead of detecting the scan area, and samples carry the spacing, so that HD95 and ASD can be
reported in millimetres (see :func:`usclip.data.crop.resized_spacing`).

A file may hold several tissue regions (a dual view: two B-mode panes side by side). ``regions`` says what
happens then (:data:`REGIONS_MODES`): ``largest`` uses the largest (the first of equal ones) and warns once per
file naming the regions left out, ``all`` keeps every one (the dataset makes each its own sample, ids
``<stem>@r0``, ``<stem>@r1`` ... in the order of the sequence; see :func:`region_id`), ``error`` refuses the file.
Tissue regions are numbered ``r0``, ``r1`` ... in the order of ``SequenceOfUltrasoundRegions``, counting only
2-D tissue regions (a spectral Doppler strip or a graphics region is not numbered).

Needs ``pydicom`` (``pip install 'usclip[dicom]'``); compressed transfer syntaxes also need pydicom's pixel-data
plugins (e.g. ``pylibjpeg``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from usclip.data.crop import Box
from usclip.data.imageio import ImageReadError, _note_once

log = logging.getLogger(__name__)

_UNITS_TO_MM = {3: 10.0}  # PhysicalUnits code -> millimetres per unit (3 = cm; others are not lengths)
_SPATIAL_2D = 1  # RegionSpatialFormat: 2-D (tissue or flow)
_TISSUE = 1  # RegionDataType: tissue

RegionsMode = Literal["largest", "all", "error"]
#: what a file with several tissue regions gives: the largest (warned), all of them, or an error
REGIONS_MODES = ("largest", "all", "error")
#: separator of a region sample's id: ``<file id>@r<k>`` (safe in file names, URLs, CSV and split files)
REGION_ID_SEPARATOR = "@r"


def region_id(file_id: str, k: int) -> str:
    """The sample id of tissue region ``k`` of the file with id ``file_id``: ``<file id>@r<k>``.

    ``@`` is allowed in file names on Linux, macOS and Windows, needs no quoting in shells, URLs (paths), CSV or
    YAML (inside a word), and is not the comment character of split files (``#``).
    """
    return f"{file_id}{REGION_ID_SEPARATOR}{k}"


def check_regions_mode(regions: str, name: str = "regions") -> RegionsMode:
    """``regions`` if it is one of :data:`REGIONS_MODES`.

    Raises:
        ValueError: naming ``name``, the value and the choices.
    """
    if regions not in REGIONS_MODES:
        raise ValueError(f"{name} must be one of {REGIONS_MODES}, got {regions!r}")
    return regions  # type: ignore[return-value]


@dataclass(frozen=True)
class UltrasoundRegion:
    """A 2-D region of ``SequenceOfUltrasoundRegions``.

    Attributes:
        box: ``(x0, y0, x1, y1)`` in pixels of the frame, end exclusive, clipped to the frame.
        spacing: ``(row, column)`` pixel spacing in millimetres (``PhysicalDeltaY``, ``PhysicalDeltaX``); ``None``
            when not given in cm.
        tissue: whether ``RegionDataType`` is 1 (tissue).
        item: position of the region in ``SequenceOfUltrasoundRegions`` (0-based, all items counted).
    """

    box: Box
    spacing: tuple[float, float] | None
    tissue: bool
    item: int

    @property
    def area(self) -> int:
        """Pixels in the box."""
        x0, y0, x1, y1 = self.box
        return (x1 - x0) * (y1 - y0)

    def describe(self, k: int) -> str:
        """``r<k> box (x0, y0, x1, y1), spacing 0.383 x 0.383 mm`` (row x column)."""
        spacing = "unknown spacing" if self.spacing is None else "spacing {:.4g} x {:.4g} mm".format(*self.spacing)
        return f"r{k} box {self.box}, {spacing}"


@dataclass
class DicomImage:
    """An ultrasound DICOM frame.

    Attributes:
        image: H x W uint8 grayscale (the first frame of a cine loop).
        region: ``(x0, y0, x1, y1)`` of the largest 2-D tissue region (the first of equal ones; without tissue
            regions the largest 2-D region), end exclusive; ``None`` without regions.
        spacing: ``(row, column)`` pixel spacing in millimetres of that region; ``None`` when not given in cm.
        regions: every 2-D tissue region, numbered ``r0``, ``r1`` ... in this order (the order of the file's
            sequence; identical boxes listed twice count once); empty without tissue regions.
    """

    image: np.ndarray
    region: Box | None
    spacing: tuple[float, float] | None
    regions: tuple[UltrasoundRegion, ...] = ()


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


def _usable_regions(ds: Any, shape: tuple[int, int]) -> list[UltrasoundRegion]:
    """The 2-D regions of ``SequenceOfUltrasoundRegions`` with a location inside the frame, in file order."""
    found = []
    for item, r in enumerate(getattr(ds, "SequenceOfUltrasoundRegions", []) or []):
        if int(getattr(r, "RegionSpatialFormat", 0) or 0) != _SPATIAL_2D:
            continue
        try:
            x0, y0 = int(r.RegionLocationMinX0), int(r.RegionLocationMinY0)
            x1, y1 = int(r.RegionLocationMaxX1) + 1, int(r.RegionLocationMaxY1) + 1  # inclusive -> exclusive
        except (AttributeError, TypeError, ValueError):
            continue
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(shape[1], x1), min(shape[0], y1)
        if x1 <= x0 or y1 <= y0:
            continue
        spacing = None
        ux = int(getattr(r, "PhysicalUnitsXDirection", 0) or 0)
        uy = int(getattr(r, "PhysicalUnitsYDirection", 0) or 0)
        dx, dy = getattr(r, "PhysicalDeltaX", None), getattr(r, "PhysicalDeltaY", None)
        if ux in _UNITS_TO_MM and uy in _UNITS_TO_MM and dx is not None and dy is not None:
            spacing = (abs(float(dy)) * _UNITS_TO_MM[uy], abs(float(dx)) * _UNITS_TO_MM[ux])
        tissue = int(getattr(r, "RegionDataType", 0) or 0) == _TISSUE
        found.append(UltrasoundRegion(box=(x0, y0, x1, y1), spacing=spacing, tissue=tissue, item=item))
    return found


def _tissue_regions(usable: list[UltrasoundRegion]) -> tuple[UltrasoundRegion, ...]:
    """The tissue regions, in file order; a box listed twice counts once (its first item)."""
    seen: set[Box] = set()
    out = []
    for r in usable:
        if r.tissue and r.box not in seen:
            seen.add(r.box)
            out.append(r)
    return tuple(out)


def _region(
    ds: Any, shape: tuple[int, int], path: Path, regions: RegionsMode = "largest"
) -> tuple[Box | None, tuple[float, float] | None, tuple[UltrasoundRegion, ...]]:
    """The chosen region's box and spacing, and every tissue region (see :class:`DicomImage`).

    Raises:
        ImageReadError: with ``regions="error"``, for a file with several tissue regions (naming them).
    """
    usable = _usable_regions(ds, shape)
    tissue = _tissue_regions(usable)
    candidates = tissue or tuple(usable)  # tissue regions first; without any, the largest 2-D region
    if not candidates:
        if getattr(ds, "SequenceOfUltrasoundRegions", None):
            log.warning("%s: no usable 2-D region in SequenceOfUltrasoundRegions", path)
        return None, None, ()
    k, best = max(enumerate(candidates), key=lambda kr: (kr[1].area, -kr[0]))  # the first of equal areas
    if len(tissue) > 1 and regions != "all":
        if regions == "error":
            raise ImageReadError(
                f"{path}: {len(tissue)} tissue regions ({'; '.join(r.describe(i) for i, r in enumerate(tissue))}) "
                "and regions='error' refuses such files; use regions='largest' (the largest region only) or "
                "regions='all' (each region one sample)"
            )
        left_out = "; ".join(r.describe(i) for i, r in enumerate(tissue) if i != k)
        _note_once(
            "dicom-regions",
            path,
            "%s: %d tissue regions; using the largest, %s, and leaving out %s (regions='all' makes each region a "
            "sample, regions='error' refuses such files)",
            path,
            len(tissue),
            best.describe(k),
            left_out,
            level=logging.WARNING,
        )
    return best.box, best.spacing, tissue


def dicom_regions(path: str | Path) -> tuple[UltrasoundRegion, ...]:
    """The 2-D tissue regions of a DICOM file, from its header alone (no pixel is decoded), in file order.

    The same regions, in the same order, as :attr:`DicomImage.regions` of :func:`read_dicom`.

    Raises:
        ImportError: if pydicom is not installed.
        FileNotFoundError: if the file does not exist.
        ImageReadError: if the file is not DICOM or has no image size (``Rows``, ``Columns``).
    """
    path = Path(path)
    pydicom = _import_pydicom()
    if not path.is_file():
        raise FileNotFoundError(f"DICOM file {path} does not exist")
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        shape = (int(ds.Rows), int(ds.Columns))
    except Exception as err:  # pydicom raises InvalidDicomError, OSError, EOFError, ValueError; AttributeError
        raise ImageReadError(f"{path}: not a readable DICOM image header ({err})") from err
    return _tissue_regions(_usable_regions(ds, shape))


def read_dicom(path: str | Path, regions: RegionsMode = "largest") -> DicomImage:
    """Read an ultrasound DICOM file: first frame as uint8 grayscale, the largest 2-D region and its spacing.

    A cine loop (``NumberOfFrames`` > 1) gives its first frame, decoded alone (the rest of the loop is not decoded);
    one sample per file keeps the 8:1:1 split per scan. Colour data (RGB, YCbCr, palette) becomes ITU-R 601
    luminance.

    Args:
        path: the file.
        regions: a file with several tissue regions: ``largest`` warns once naming the regions left out,
            ``all`` leaves the choice to the caller (every region is in :attr:`DicomImage.regions`), ``error``
            raises. ``region`` and ``spacing`` are the largest region's in every mode.

    Raises:
        ValueError: if ``regions`` is not one of :data:`REGIONS_MODES`.
        ImportError: if pydicom is not installed.
        FileNotFoundError: if the file does not exist.
        ImageReadError: if the file is not DICOM, has no pixel data, or its pixels cannot be decoded (naming the
            file and, for compressed data, the transfer syntax); with ``regions="error"``, if it holds several
            tissue regions (naming them).
    """
    check_regions_mode(regions)
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
    region, spacing, tissue = _region(ds, image.shape, path, regions)
    return DicomImage(image=image, region=region, spacing=spacing, regions=tissue)
