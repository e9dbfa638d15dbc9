"""Small DICOM files written by the tests (``usclip data check``'s listing): every kind it tells apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

#: regions: (x0, y0, x1, y1) inclusive as written, spatial format, data type, (dx, dy) in cm or None
Region = tuple[tuple[int, int, int, int], int, int, "tuple[float, float] | None"]


def us_dataset(rows: int, columns: int, syntax: str | None = None) -> Any:
    """An Ultrasound Image Storage dataset with its file meta (``syntax``: explicit VR little endian by default),
    ``Rows`` and ``Columns`` set: the header every DICOM the tests write starts from."""
    pytest.importorskip("pydicom", reason="DICOM input needs pydicom: pip install 'usclip[dicom]'")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "US"
    ds.Rows, ds.Columns = rows, columns
    return ds


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    regions: tuple[Region, ...] = (),
    frames: int = 1,
    syntax: str | None = None,
    file_meta: bool = True,
) -> Path:
    """A small US DICOM: 8-bit ``pixels`` (H, W) or (H, W, 3), repeated ``frames`` times.

    ``syntax`` (a compressed transfer syntax UID) stores garbage bytes instead of the pixels: no decoder can
    decode them. ``file_meta=False`` writes the bare dataset (no preamble, no file meta; implicit VR).
    """
    pytest.importorskip("pydicom", reason="DICOM input needs pydicom: pip install 'usclip[dicom]'")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.6.1", generate_uid(), "US"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation, ds.PixelRepresentation = photometric, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if photometric == "PALETTE COLOR":  # 16-bit lookup tables: grey ramps of three different slopes
        ramp = np.arange(256, dtype=np.uint16)
        for colour, lut in zip(("Red", "Green", "Blue"), (ramp * 257, ramp * 128, ramp * 64), strict=True):
            setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
            setattr(ds, f"{colour}PaletteColorLookupTableData", lut.astype("<u2").tobytes())
    raw = np.repeat(pixels[None], frames, axis=0).astype(np.uint8).tobytes()
    ds.PixelData = encapsulate([b"\x00not a JPEG 2000 codestream" * 4]) if syntax else raw
    items = []
    for (x0, y0, x1, y1), spatial, kind, delta in regions:
        r = Dataset()
        r.RegionSpatialFormat, r.RegionDataType, r.RegionFlags = spatial, kind, 0
        r.RegionLocationMinX0, r.RegionLocationMinY0, r.RegionLocationMaxX1, r.RegionLocationMaxY1 = x0, y0, x1, y1
        r.PhysicalUnitsXDirection = r.PhysicalUnitsYDirection = 3 if delta else 0  # 3: cm
        r.PhysicalDeltaX, r.PhysicalDeltaY = delta or (0.0, 0.0)
        items.append(r)
    if items:
        ds.SequenceOfUltrasoundRegions = items
    if not file_meta:
        ds.save_as(path, implicit_vr=True, little_endian=True)
        return path
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds.file_meta = meta
    if syntax:
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"  # JPEG 2000 Image Compression (Lossless Only)


def write_dicom_folder(folder: Path) -> Path:
    """Five DICOM files of every kind the listing tells apart, and one PNG (not listed).

    ``mono``: MONOCHROME2, 2 frames, one tissue region; ``rgb``: RGB, no region; ``pal``: PALETTE COLOR;
    ``two``: two tissue regions side by side (different spacings) and a grey bar; ``j2k``: JPEG 2000 that does not
    decode.
    """
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    grey = rng.integers(20, 240, (30, 40), dtype=np.uint8)  # H 30, W 40
    write_dicom(folder / "mono.dcm", grey, regions=(((2, 3, 19, 24), 1, 1, (0.01, 0.02)),), frames=2)
    write_dicom(folder / "rgb.dcm", rng.integers(0, 255, (10, 20, 3), dtype=np.uint8), "RGB")
    write_dicom(folder / "pal.dcm", grey, "PALETTE COLOR")
    two = (((2, 3, 19, 24), 1, 1, (0.01, 0.02)), ((20, 3, 39, 24), 1, 1, (0.03, 0.05)), ((0, 25, 5, 29), 0, 13, None))
    write_dicom(folder / "two.dcm", grey, regions=two)
    write_dicom(folder / "j2k.dcm", grey, syntax=J2K_LOSSLESS)
    Image.fromarray(grey).save(folder / "plain.png")
    return folder
