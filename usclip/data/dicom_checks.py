"""What ``usclip data check`` lists for each DICOM file: its header, its ultrasound regions, and whether it decodes.

The header is read with pydicom alone (``stop_before_pixels``: no pixel is decoded), so a file whose pixels
cannot be decoded here still shows what it holds: photometric interpretation, bits, transfer syntax, frames,
samples per pixel and the items of ``SequenceOfUltrasoundRegions`` as written (DICOM PS3.3 C.8.5.5). Whether
the pixels decode is decided by :func:`usclip.data.dicom.read_dicom`, the reader training uses
(:func:`usclip.data.checks.check_dataset` records it). :func:`summarise` counts the files of each kind (per
photometric interpretation, transfer syntax, ...) and how many of them decode.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from usclip.data.crop import Box

#: RegionSpatialFormat (DICOM PS3.3 C.8.5.5.1.1)
REGION_SPATIAL_FORMATS = {0: "none", 1: "2-D", 2: "M-mode", 3: "spectral", 4: "waveform", 5: "graphics"}
#: RegionDataType (DICOM PS3.3 C.8.5.5.1.2)
REGION_DATA_TYPES = {
    0: "none",
    1: "tissue",
    2: "colour flow",
    3: "PW spectral Doppler",
    4: "CW spectral Doppler",
    5: "Doppler mean trace",
    6: "Doppler mode trace",
    7: "Doppler max trace",
    8: "volume trace",
    9: "d(volume)/dt trace",
    10: "ECG trace",
    11: "pulse trace",
    12: "phonocardiogram trace",
    13: "grey bar",
    14: "colour bar",
    15: "integrated backscatter",
    16: "area trace",
    17: "d(area)/dt trace",
    18: "other physiological input",
}
_CM = 3  # PhysicalUnitsX/YDirection code of centimetres

#: columns of :meth:`DicomFileInfo.row` (``usclip data check --dicom-csv``)
CSV_HEADER = (
    "file",
    "photometric_interpretation",
    "bits_allocated",
    "bits_stored",
    "transfer_syntax",
    "transfer_syntax_uid",
    "frames",
    "samples_per_pixel",
    "width",
    "height",
    "regions",
    "region_list",
    "decodes",
    "error",
    "colour_share",
)


def first_line(err: BaseException | str) -> str:
    """The first non-empty line of an error message (pydicom's messages list every plugin on further lines)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if lines:
        return lines[0]
    return type(err).__name__ if isinstance(err, BaseException) else ""


@dataclass
class DicomRegion:
    """One item of ``SequenceOfUltrasoundRegions``, as written in the file.

    Attributes:
        box: ``(x0, y0, x1, y1)``, end exclusive (the file's inclusive ``RegionLocationMaxX1 + 1``), not clipped
            to the image; ``None`` when the location is missing.
        spatial_format: ``RegionSpatialFormat`` code (1: 2-D), ``None`` when missing.
        data_type: ``RegionDataType`` code (1: tissue), ``None`` when missing.
        spacing: ``(row, column)`` pixel spacing in millimetres when both directions are given in cm, else ``None``.
        units: ``(PhysicalUnitsXDirection, PhysicalUnitsYDirection)`` codes (3: cm).
    """

    box: Box | None
    spatial_format: int | None
    data_type: int | None
    spacing: tuple[float, float] | None
    units: tuple[int | None, int | None] = (None, None)

    def describe(self, size: tuple[int, int] | None = None) -> str:
        """``(32, 24, 336, 416) 2-D/tissue, spacing 0.3827 x 0.3827 mm``; ``size`` (W, H) flags a box reaching out."""
        spatial = _name(REGION_SPATIAL_FORMATS, self.spatial_format)
        kind = _name(REGION_DATA_TYPES, self.data_type)
        text = f"{self.box if self.box is not None else 'no location'} {spatial}/{kind}"
        if self.box is not None and size is not None:
            x0, y0, x1, y1 = self.box
            if x0 < 0 or y0 < 0 or x1 > size[0] or y1 > size[1]:
                text += f" (reaches outside the {size[0]}x{size[1]} image: clipped)"
        if self.spacing is not None:
            text += f", spacing {self.spacing[0]:.4g} x {self.spacing[1]:.4g} mm"
        elif self.spatial_format == 1:
            text += f", no spacing in cm (units x {self.units[0]}, y {self.units[1]})"
        return text


@dataclass
class DicomFileInfo:
    """The header of one DICOM file and whether its pixels decode (``None``: not tried yet).

    Attributes hold ``None`` where the header lacks the field; ``header_error`` is set (and the rest is empty)
    when the header cannot be read at all. ``colour_share`` is the share of coloured pixels in the scan area of a
    file with colour samples (:func:`usclip.data.colour.scan_area_colour_share`), ``None`` for a grey one.
    """

    name: str
    photometric: str | None = None
    bits_allocated: int | None = None
    bits_stored: int | None = None
    transfer_syntax: str | None = None
    transfer_syntax_uid: str | None = None
    frames: int | None = None
    samples_per_pixel: int | None = None
    size: tuple[int, int] | None = None  # (W, H)
    regions: list[DicomRegion] = field(default_factory=list)
    header_error: str | None = None
    decodes: bool | None = None
    error: str | None = None
    colour_share: float | None = None  # share of coloured pixels in the scan area; None: grey or not decoded

    def decoded(self, error: BaseException | str | None = None) -> None:
        """Record the decoding result: ``None`` decoded, else the error (its first line is kept)."""
        self.decodes = error is None
        self.error = None if error is None else first_line(error)

    def describe(self) -> str:
        """One line: header fields; regions; whether it decodes (with the error's first line when not); colour share."""
        if self.header_error is not None:
            head = f"header not readable: {self.header_error}"
        else:
            size = f"{self.size[0]}x{self.size[1]}" if self.size else "?x?"
            frames = "? frames" if self.frames is None else f"{self.frames} frame{'s' if self.frames != 1 else ''}"
            spp = self.samples_per_pixel
            samples = f"{_text(spp)} sample{'' if spp == 1 else 's'}/pixel"
            head = (
                f"{_text(self.photometric)}, bits {_text(self.bits_allocated)}/{_text(self.bits_stored)}, "
                f"{_text(self.transfer_syntax)}, {frames}, {samples}, {size}"
            )
        if not self.regions:
            regions = "no regions"
        else:
            items = "; ".join(f"[{i}] {r.describe(self.size)}" for i, r in enumerate(self.regions, 1))
            regions = f"{len(self.regions)} region{'s' if len(self.regions) != 1 else ''}: {items}"
        decodes = {True: "decodes", False: f"does not decode: {self.error}", None: "not decoded"}[self.decodes]
        colour = "" if self.colour_share is None else f"; colour {100 * self.colour_share:.2f} % of the scan area"
        return f"{self.name}: {head}; {regions}; {decodes}{colour}"

    def row(self) -> list[object]:
        """The file as a row of :data:`CSV_HEADER` (empty cells for missing fields)."""
        return [
            self.name,
            self.photometric or "",
            _cell(self.bits_allocated),
            _cell(self.bits_stored),
            self.transfer_syntax or "",
            self.transfer_syntax_uid or "",
            _cell(self.frames),
            _cell(self.samples_per_pixel),
            _cell(self.size[0] if self.size else None),
            _cell(self.size[1] if self.size else None),
            len(self.regions),
            "; ".join(r.describe(self.size) for r in self.regions),
            "" if self.decodes is None else int(self.decodes),
            self.error or self.header_error or "",
            "" if self.colour_share is None else f"{self.colour_share:.6f}",
        ]


def _name(names: dict[int, str], code: int | None) -> str:
    return "?" if code is None else names.get(code, f"code {code}")


def _text(value: object) -> str:
    return "?" if value is None else str(value)


def _cell(value: int | None) -> object:
    return "" if value is None else value


def _int(ds: Any, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _regions(ds: Any) -> list[DicomRegion]:
    out = []
    for r in ds.get("SequenceOfUltrasoundRegions") or []:
        corners = [_int(r, k) for k in ("RegionLocationMinX0", "RegionLocationMinY0")]
        corners += [_int(r, k) for k in ("RegionLocationMaxX1", "RegionLocationMaxY1")]
        box = None
        if all(c is not None for c in corners):
            x0, y0, x1, y1 = (int(c) for c in corners)  # type: ignore[arg-type]
            box = (x0, y0, x1 + 1, y1 + 1)  # inclusive -> end exclusive
        units = (_int(r, "PhysicalUnitsXDirection"), _int(r, "PhysicalUnitsYDirection"))
        dx, dy = r.get("PhysicalDeltaX"), r.get("PhysicalDeltaY")
        spacing = None
        if units == (_CM, _CM) and dx is not None and dy is not None:
            spacing = (abs(float(dy)) * 10.0, abs(float(dx)) * 10.0)  # cm -> mm, (row, column)
        fmt, kind = _int(r, "RegionSpatialFormat"), _int(r, "RegionDataType")
        out.append(DicomRegion(box=box, spatial_format=fmt, data_type=kind, spacing=spacing, units=units))
    return out


def read_dicom_header(path: str | Path, name: str | None = None) -> DicomFileInfo:
    """Read the header of a DICOM file (no pixel is decoded) into a :class:`DicomFileInfo`.

    A file without the DICOM preamble and file meta information (older files, e.g. ACR-NEMA style) is read
    again with ``force=True``; its transfer syntax is then the encoding pydicom found, marked "(no file meta)".
    Never raises for a bad file: the reason goes to ``header_error``.

    Args:
        path: the file.
        name: how the file is named in the listing (default: its file name).
    """
    path = Path(path)
    info = DicomFileInfo(name=name or path.name)
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:
        info.header_error = "pydicom is not installed: pip install 'usclip[dicom]'"
        return info
    forced = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every odd element of a damaged file
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except InvalidDicomError:
                ds, forced = pydicom.dcmread(path, stop_before_pixels=True, force=True), True
    except Exception as err:  # pydicom raises InvalidDicomError, OSError, EOFError, ValueError ...
        info.header_error = first_line(err)
        return info
    if forced and "Rows" not in ds:
        info.header_error = "not a DICOM file (no DICOM header and no image attributes)"
        return info
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax:
        info.transfer_syntax, info.transfer_syntax_uid = str(syntax.name), str(syntax)
    elif getattr(ds, "original_encoding", None) is not None:
        implicit, little = ds.original_encoding
        vr, endian = "Implicit" if implicit else "Explicit", "Little" if little else "Big"
        info.transfer_syntax = f"{vr} VR {endian} Endian (no file meta)"
    photometric = ds.get("PhotometricInterpretation")
    info.photometric = str(photometric).strip() if photometric else None
    info.bits_allocated, info.bits_stored = _int(ds, "BitsAllocated"), _int(ds, "BitsStored")
    info.frames = _int(ds, "NumberOfFrames") or 1  # absent: a single frame
    info.samples_per_pixel = _int(ds, "SamplesPerPixel")
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    info.size = (columns, rows) if rows is not None and columns is not None else None
    info.regions = _regions(ds)
    return info


#: the summary lines of :func:`summarise`: label -> the value of a file that is counted
KINDS: dict[str, Callable[[DicomFileInfo], object]] = {
    "photometric interpretation": lambda f: f.photometric,
    "transfer syntax": lambda f: f.transfer_syntax,
    "bits allocated/stored": lambda f: f"{_text(f.bits_allocated)}/{_text(f.bits_stored)}",
    "samples per pixel": lambda f: f.samples_per_pixel,
    "frames": lambda f: f.frames,
    "ultrasound regions": lambda f: None if f.header_error else len(f.regions),
}


def summarise(files: Sequence[DicomFileInfo]) -> dict[str, dict[str, tuple[int, int]]]:
    """Per kind (see :data:`KINDS`), each value's number of files and how many of them decode.

    Returns:
        ``{kind: {value: (files, decoding)}}``, values ordered by count (most first), then by name; a value the
        header does not give is ``"?"``.
    """
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for kind, value_of in KINDS.items():
        counts: Counter[str] = Counter()
        good: Counter[str] = Counter()
        for f in files:
            value = value_of(f)
            key = "?" if value is None else str(value)
            counts[key] += 1
            good[key] += bool(f.decodes)
        out[kind] = {k: (counts[k], good[k]) for k in sorted(counts, key=lambda k: (-counts[k], k))}
    return out


def format_listing(files: Sequence[DicomFileInfo], max_files: int | None = None) -> list[str]:
    """The lines ``usclip data check`` prints for its DICOM files: the summary per kind, then one line per file.

    Args:
        files: the files, in the order listed.
        max_files: list at most this many files (``None``: all; 0: the summary only).
    """
    if not files:
        return []
    decoding = sum(bool(f.decodes) for f in files)
    lines = [f"  DICOM files: {len(files)}; {decoding} decode, {len(files) - decoding} do not"]
    for kind, values in summarise(files).items():
        parts = ", ".join(f"{value} {n} ({good} decode)" for value, (n, good) in values.items())
        lines.append(f"    {kind}: {parts}")
    shown = files if max_files is None else files[:max_files]
    if shown:
        lines.append("  per file (region boxes (x0, y0, x1, y1) end exclusive; spacing row x column):")
        lines += [f"    {f.describe()}" for f in shown]
    if len(shown) < len(files):
        lines.append(f"    ... and {len(files) - len(shown)} more (--max-dicom-files, --dicom-csv FILE)")
    return lines
