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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from usclip.data.colour import ColourMode, check_colour_mode, coloured_pixels, replace_coloured
from usclip.data.crop import Box
from usclip.data.imageio import MAX_IMAGE_PIXELS, ImageReadError, _note_once, check_max_pixels, too_many_pixels

log = logging.getLogger(__name__)

_UNITS_TO_MM = {3: 10.0}  # PhysicalUnits code -> millimetres per unit (3 = cm; others are not lengths)
_SPATIAL_2D = 1  # RegionSpatialFormat: 2-D (tissue or flow)
_TISSUE = 1  # RegionDataType: tissue
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601 luminance, as PIL's convert("L")
_DEFER_BYTES = 1 << 16  # elements larger than this (the pixel data) are read from disk only when used
_GUARD_PIXELS = 1 << 20  # the grey-level guard counts levels on a strided view of at most about this many pixels
_PIP_NAMES = {"gdcm": "python-gdcm"}  # pydicom names modules; pip names some packages otherwise

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
        image: H x W uint8 grayscale (the first frame of a cine loop): the luminance of colour files, with coloured
            pixels inside its 2-D regions (every one of them, whatever ``regions`` says) replaced by the median of
            their grey neighbours with ``colour="replace"``.
        region: ``(x0, y0, x1, y1)`` of the largest 2-D tissue region (the first of equal ones; without tissue
            regions the largest 2-D region), end exclusive; ``None`` without regions.
        spacing: ``(row, column)`` pixel spacing in millimetres of that region; ``None`` when not given in cm.
        coloured: H x W bool, the pixels whose colour channels differ by more than
            :data:`usclip.data.colour.COLOUR_TOLERANCE` (colour Doppler, coloured calipers, tinted background), as
            stored in the file; ``None`` for a greyscale (MONOCHROME) file. See
            :func:`usclip.data.colour.colour_share`.
        regions: every 2-D tissue region, numbered ``r0``, ``r1`` ... in this order (the order of the file's
            sequence; identical boxes listed twice count once); empty without tissue regions.
    """

    image: np.ndarray
    region: Box | None
    spacing: tuple[float, float] | None
    coloured: np.ndarray | None = None
    regions: tuple[UltrasoundRegion, ...] = ()


def _import_pydicom() -> Any:
    try:
        import pydicom
        import pydicom.pixels  # the pixel_array function (pydicom >= 3)
    except ImportError as err:
        raise ImportError("reading DICOM files needs pydicom: pip install 'usclip[dicom]'") from err
    return pydicom


def _levels(a: np.ndarray) -> int:
    """The number of distinct values of an integer array (a histogram for 8 and 16 bits: no sort)."""
    if a.dtype.kind in "ui" and a.dtype.itemsize <= 2 and (a.dtype.kind == "u" or int(a.min()) >= 0):
        return int(np.count_nonzero(np.bincount(a.ravel().astype(np.uint16, copy=False))))
    return int(np.unique(a).size)


def _guard_view(a: np.ndarray) -> np.ndarray:
    """A strided view of at most about :data:`_GUARD_PIXELS` pixels (the first two axes are rows and columns)."""
    step = max(1, int(np.sqrt(a.shape[0] * a.shape[1] / _GUARD_PIXELS)))
    return a[::step, ::step]


def _warn_if_collapsed(source_levels: int, what: str, gray: np.ndarray, path: Path) -> None:
    """Warn when the grey image holds far fewer levels than the file: a decoding or scaling fault, not an image.

    The rule: the file holds at least 16 distinct values (or colours) and the 8-bit image fewer than
    ``min(source, 256) / 16`` grey levels. A faithful conversion keeps about ``min(source, 256)`` levels;
    reading a 16-bit palette on the 8-bit scale left 2 of 67 (the issue's ALOKA scan), a 10-bit image declared as
    16 bits stored keeps 4 of 1024.
    """
    levels = _levels(_guard_view(gray))
    if source_levels >= 16 and levels < min(source_levels, 256) / 16:
        _note_once(
            "collapsed",
            path,
            "%s: the 8-bit image holds %d grey levels but the file %d distinct %s: the conversion lost the image "
            "(check BitsStored and the palette, and report the file's header if they look right)",
            path,
            levels,
            source_levels,
            what,
            level=logging.WARNING,
        )


def _is_little_endian(ds: Any) -> bool:
    encoding = getattr(ds, "original_encoding", (None, None))[1]
    if encoding is not None:
        return bool(encoding)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return True if syntax is None else bool(syntax.is_little_endian)


def _palette_table(ds: Any, path: Path) -> tuple[np.ndarray, int]:
    """The palette as stored, an (entries, 3) float array, and its full-scale value from the LUTs' own bit depth.

    The full scale is 255 for 8-bit entries and 65535 for 16-bit ones (the descriptor's third value), except for
    8-bit values in 16-bit entries (all <= 255: read on the 8-bit scale) and the reverse, with a note.

    Plain LUT data is read here in the file's byte order (``pydicom.pixels.apply_color_lut`` reads 16-bit entries
    in the machine's order, which byte-swaps big-endian files); segmented LUTs are expanded by pydicom.
    """
    from pydicom.pixels import apply_color_lut

    try:
        entries, first, bits = (int(v) for v in ds.RedPaletteColorLookupTableDescriptor)
    except (AttributeError, TypeError, ValueError) as err:
        raise ImageReadError(f"{path}: PALETTE COLOR file without a usable palette descriptor ({err})") from err
    entries = entries or 1 << 16  # 0 stands for 65536 entries
    if bits not in (8, 16):
        raise ImageReadError(f"{path}: palette entries of {bits} bits; DICOM allows 8 or 16 (descriptor {bits})")
    if "RedPaletteColorLookupTableData" in ds:
        order = "<" if _is_little_endian(ds) else ">"
        channels = []
        for name in ("Red", "Green", "Blue"):
            raw = bytes(ds[f"{name}PaletteColorLookupTableData"].value)
            if len(raw) in (entries, entries + 1):  # one byte per entry (padded to an even length)
                channels.append(np.frombuffer(raw[:entries], np.uint8))
            elif len(raw) == 2 * entries:
                channels.append(np.frombuffer(raw, f"{order}u2"))
            else:
                raise ImageReadError(
                    f"{path}: {name.lower()} palette of {len(raw)} bytes for {entries} entries (descriptor); "
                    f"expected {entries} or {2 * entries} bytes"
                )
        table = np.stack(channels, axis=1).astype(np.float64)
    elif "SegmentedRedPaletteColorLookupTableData" in ds:
        try:
            table = apply_color_lut(np.arange(first, first + entries), ds)[:, :3].astype(np.float64)
        except Exception as err:  # pydicom raises ValueError, struct.error, ... for broken segments
            raise ImageReadError(f"{path}: cannot expand the segmented palette ({err})") from err
    else:
        raise ImageReadError(f"{path}: PALETTE COLOR file without palette lookup tables (0028,1201-1203 or 1221-1223)")
    top = float(table.max())
    if bits == 16 and 0 < top <= 255:
        # 8-bit values in 16-bit words: on the 16-bit scale the image would be black (<= 255 / 65535)
        _note_once("palette8in16", path, "%s: 16-bit palette holding 8-bit values; read on the 8-bit scale", path)
        bits = 8
    elif bits == 8 and top > 255:
        _note_once("palette16in8", path, "%s: 8-bit palette holding 16-bit values; read on the 16-bit scale", path)
        bits = 16
    return table, 2**bits - 1


def _palette_to_gray(ds: Any, frame: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Grey image and coloured-pixel mask of a palette frame, through per-value lookup tables (no float image)."""
    if frame.dtype.kind not in "ui" or frame.dtype.itemsize > 2:
        raise ImageReadError(f"{path}: palette indices of type {frame.dtype}; expected 8 or 16 bit integers")
    first = int(ds.RedPaletteColorLookupTableDescriptor[1])
    table, top = _palette_table(ds, path)
    values = np.arange(2 ** (8 * frame.dtype.itemsize))  # every stored value the frame can hold
    full = table[np.clip(values - first, 0, len(table) - 1)]  # below the first mapped value: entry 0; above: last
    scale = 255.0 / top
    gray_lut = np.clip(np.round(full @ _LUMA * scale), 0, 255).astype(np.uint8)
    rgb_lut = np.clip(np.round(full * scale), 0, 255).astype(np.uint8)
    coloured_lut = coloured_pixels(rgb_lut[None])[0]
    indices = frame.astype(np.uint16, copy=False) if frame.dtype.kind == "i" else frame
    gray = gray_lut[indices]
    used = np.bincount(_guard_view(indices).ravel(), minlength=len(values)) > 0
    # the colours the frame uses, as stored in the LUT (before any scaling, so a scale fault shows)
    _warn_if_collapsed(int(np.unique(full[used], axis=0).shape[0]), "palette colours", _guard_view(gray), path)
    return gray, coloured_lut[indices]


def _to_gray_uint8(ds: Any, frame: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """One decoded frame -> uint8 grayscale, and the mask of its coloured pixels (``None`` for MONOCHROME).

    ``frame`` comes from pydicom 3's pixel decoding, which already converts YCbCr data (``YBR_FULL``,
    ``YBR_FULL_422``, ...) to RGB but leaves ``PhotometricInterpretation`` as written: a 3-sample frame is therefore
    RGB whatever the header says, and converting it again would shift the grey values (a YBR_FULL pixel of
    luminance 91 read as 171). Palette frames go through their lookup tables on the tables' own bit depth (8 or 16
    bits, from the descriptor). Colour samples of more than 8 bits are scaled from ``BitsStored``. Every path
    ends in :func:`_warn_if_collapsed`.
    """
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if frame.dtype.kind == "i" and frame.min() < 0:
        raise ImageReadError(f"{path}: signed pixel data with negative values is not an ultrasound image")
    bits = int(getattr(ds, "BitsStored", 8))
    if photometric == "PALETTE COLOR" and frame.ndim == 2:
        return _palette_to_gray(ds, frame, path)
    if frame.ndim == 3:
        rgb = frame[..., :3]
        scale = 255.0 / (2**bits - 1)
        if bits != 8:
            _note_once("dicom-bits", path, "%s: %d-bit DICOM colour samples scaled to 8 bits", path, bits)
        gray = np.clip(np.round((rgb.astype(np.float64) @ _LUMA) * scale), 0, 255).astype(np.uint8)
        rgb8 = rgb if rgb.dtype == np.uint8 and bits == 8 else np.clip(np.round(rgb * scale), 0, 255).astype(np.uint8)
        view = _guard_view(rgb)
        _warn_if_collapsed(max(_levels(view[..., c]) for c in range(3)), "values per channel", _guard_view(gray), path)
        return gray, coloured_pixels(np.ascontiguousarray(rgb8))
    top = 2**bits - 1
    if top != 255:
        _note_once("dicom-bits", path, "%s: %d-bit DICOM pixels scaled to 8 bits", path, bits)
    gray = np.clip(np.round(frame.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    _warn_if_collapsed(_levels(_guard_view(frame)), "values", _guard_view(gray), path)
    return (255 - gray if photometric == "MONOCHROME1" else gray), None  # MONOCHROME1: 0 is white


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


def _scan_area(ds: Any, shape: tuple[int, ...]) -> np.ndarray:
    """H x W bool: the union of the file's 2-D ultrasound regions (tissue, colour flow), or everything without any.

    ``colour="replace"`` works inside it: a tinted background, colour bars and logos outside the scan stay as they
    are (the crop removes them), and only the scan's coloured pixels cost time. Every 2-D region counts, whatever
    ``regions`` chooses, so each region sample of ``regions="all"`` gets its own region's replaced pixels.
    """
    inside = np.zeros(shape[:2], bool)
    for r in _usable_regions(ds, (shape[0], shape[1])):
        x0, y0, x1, y1 = r.box
        inside[y0:y1, x0:x1] = True
    return inside if inside.any() else np.ones(shape[:2], bool)


def _read_header(pydicom: Any, path: Path) -> tuple[Any, bool]:
    """The data set with its pixel data left on disk, and whether the file has a file meta header.

    A file without the DICOM preamble and meta header (older ACR-NEMA style files, e.g. ``OT-PAL-8-face.dcm``) is
    read again with ``force=True`` and taken when it holds pixel data; its byte order gives the transfer syntax.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        return pydicom.dcmread(path, defer_size=_DEFER_BYTES), True
    except InvalidDicomError as err:
        not_dicom = ImageReadError(f"{path}: not a readable DICOM file ({err})")
        try:
            ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES, force=True)
            usable = "PixelData" in ds and "Rows" in ds and "Columns" in ds
        except Exception:  # pydicom raises many kinds of errors on data that is not DICOM
            usable = False
        if not usable:
            raise not_dicom from err
        implicit, little = ds.original_encoding
        syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        meta = getattr(ds, "file_meta", None)
        if meta is None or "TransferSyntaxUID" not in meta:
            ds.file_meta = meta if meta is not None else FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = syntax
        _note_once("no-meta", path, "%s: DICOM file without preamble and meta header; read as %s", path, syntax.name)
        return ds, False
    except Exception as err:  # pydicom raises OSError, EOFError, ValueError ... on broken files
        raise ImageReadError(f"{path}: not a readable DICOM file ({err})") from err


def _install_hint(missing: list[str]) -> str:
    """The plugins pydicom lists as missing, as pip commands, one per plugin.

    ``"pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"`` -> ``"pip install pylibjpeg
    pylibjpeg-libjpeg"``.
    """
    options = []
    for line in missing:
        plugin, _, needs = line.partition(" - requires ")
        names = [re.sub(r"[<>=!~;\[ ].*", "", part.strip()) for part in re.split(r", | and ", needs)]
        names = [_PIP_NAMES.get(n, n) for n in names if n and n != "numpy"]
        if plugin.strip() == "pillow":
            options.append("a Pillow built with this codec (pip install --upgrade pillow)")
        elif names:
            options.append("pip install " + " ".join(names))
    options.sort(key=lambda o: "gdcm" in o)  # the pure pip wheels first
    return "; or ".join(options) if options else "a pydicom pixel-data plugin for it"


def _syntax_label(syntax: Any) -> str:
    """``"JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)"``, or the bare UID of an unknown syntax."""
    name = str(getattr(syntax, "name", syntax))
    return f"{name} ({syntax})" if name != str(syntax) else str(syntax)


def _check_decoder(pydicom: Any, ds: Any, path: Path) -> None:
    """Refuse, before decoding, a transfer syntax that no installed pydicom plugin decodes, naming the package."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None:
        raise ImageReadError(f"{path}: DICOM file without a transfer syntax (0002,0010); cannot decode its pixels")
    try:
        decoder = pydicom.pixels.get_decoder(syntax)
    except NotImplementedError as err:
        raise ImageReadError(
            f"{path}: pixel data in transfer syntax {_syntax_label(syntax)}, which pydicom "
            f"{pydicom.__version__} cannot decode; convert the file (e.g. gdcmconv --raw, dcmdjpeg)"
        ) from err
    if not decoder.is_available:
        raise ImageReadError(
            f"{path}: pixel data compressed as {_syntax_label(syntax)} and no decoder for it is installed: "
            f"{_install_hint(list(decoder.missing_dependencies))}"
        )


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


def read_dicom(
    path: str | Path,
    *,
    regions: RegionsMode = "largest",
    colour: ColourMode = "keep",
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> DicomImage:
    """Read an ultrasound DICOM file: first frame as uint8 grayscale, the largest 2-D region and its spacing.

    A cine loop (``NumberOfFrames`` > 1) gives its first frame: only that frame is read from disk and decoded; one
    sample per file keeps the 8:1:1 split per scan. Colour data becomes ITU-R 601 luminance: RGB, YCbCr (converted
    to RGB by pydicom) and palette colour, whose 8- or 16-bit lookup tables (plain or segmented) are read on their
    own bit depth. A file whose 8-bit image keeps far fewer grey levels than the file holds is logged as a warning
    naming it (see :func:`_warn_if_collapsed`).

    Args:
        path: the ``.dcm`` file.
        regions: a file with several tissue regions: ``largest`` warns once naming the regions left out,
            ``all`` leaves the choice to the caller (every region is in :attr:`DicomImage.regions`), ``error``
            raises. ``region`` and ``spacing`` are the largest region's in every mode.
        colour: ``keep`` the luminance of coloured pixels (colour Doppler, coloured calipers), or ``replace`` those
            inside the file's 2-D ultrasound regions (everywhere without regions) by the median of their grey
            neighbours (:func:`usclip.data.colour.replace_coloured`). Greyscale files are not changed.
        max_pixels: largest ``Rows x Columns`` read, as for PNG (:func:`usclip.data.imageio.read_image`); checked
            from the header before any pixel is read. ``None``: no limit.

    Raises:
        ValueError: for an unknown ``regions`` (one of :data:`REGIONS_MODES`) or ``colour``, or a bad
            ``max_pixels``.
        ImportError: if pydicom is not installed.
        FileNotFoundError: if the file does not exist.
        ImageReadError: if the file is not DICOM, has no pixel data, is larger than ``max_pixels``, is compressed
            with a codec that no installed plugin decodes (naming the transfer syntax and the package to install),
            or its pixels cannot be decoded; with ``regions="error"``, if it holds several tissue regions (naming
            them).
    """
    check_regions_mode(regions)
    path = Path(path)
    check_colour_mode(colour)
    max_pixels = check_max_pixels(max_pixels, "max_pixels")
    pydicom = _import_pydicom()
    if not path.is_file():
        raise FileNotFoundError(f"DICOM file {path} does not exist")
    ds, has_meta = _read_header(pydicom, path)
    if len(ds) == 0:
        raise ImageReadError(f"{path}: DICOM file with a meta header but no data set after it (truncated?)")
    if "PixelData" not in ds:
        kind = next((k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
        detail = f"only {kind}: floating-point data, not an ultrasound image" if kind else "no (7FE0,0010) element"
        modality = getattr(ds, "Modality", "?")
        raise ImageReadError(
            f"{path}: DICOM file without pixel data ({detail}; modality {modality}); expected an ultrasound image"
        )
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as err:
        raise ImageReadError(f"{path}: DICOM pixel data without Rows and Columns ({err})") from err
    if max_pixels is not None and rows * columns > max_pixels:
        raise too_many_pixels(path, columns, rows, max_pixels)
    _check_decoder(pydicom, ds, path)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    try:
        # from the path, pydicom reads only the frame asked for; index=0 decodes the first frame of a cine loop;
        # YCbCr is converted to RGB (as_rgb, the default)
        pixels = pydicom.pixels.pixel_array(path if has_meta else ds, index=0 if frames > 1 else None)
    except Exception as err:
        syntax = ds.file_meta.TransferSyntaxUID
        raise ImageReadError(f"{path}: cannot decode the pixel data (transfer syntax {syntax.name}: {err})") from err
    samples = int(getattr(ds, "SamplesPerPixel", 1))
    if frames > 1:
        _note_once("dicom-frames", path, "%s: cine loop of %d frames; using the first", path, frames)
    if pixels.ndim != (2 if samples == 1 else 3):
        raise ImageReadError(f"{path}: unexpected pixel array shape {pixels.shape}")
    gray, coloured = _to_gray_uint8(ds, pixels, path)
    if colour == "replace" and coloured is not None:
        gray = replace_coloured(gray, coloured & _scan_area(ds, coloured.shape), path)
    image = np.ascontiguousarray(gray)
    region, spacing, tissue = _region(ds, image.shape, path, regions)
    return DicomImage(image=image, region=region, spacing=spacing, coloured=coloured, regions=tissue)
