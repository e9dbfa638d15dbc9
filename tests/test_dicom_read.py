"""DICOM pixel reading: palette colour, colour in the scan area, and the guards shared with PNG (issue #26).

Every test writes its own small DICOM files with pydicom; none reads real scanner files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pydicom = pytest.importorskip("pydicom", reason="DICOM input needs pydicom: pip install 'usclip[dicom]'")

from pydicom.dataset import Dataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from usclip.data.colour import COLOUR_TOLERANCE, colour_share, coloured_pixels, replace_coloured  # noqa: E402
from usclip.data.imageio import ImageReadError, read_image  # noqa: E402

from .dicom_files import us_dataset  # noqa: E402

LUMA = np.array([0.299, 0.587, 0.114])


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits: int = 8,
    region: tuple[int, int, int, int] | None = None,
    syntax: str = ExplicitVRLittleEndian,
    pixel_bytes: bytes | None = None,
    **elements: object,
) -> Path:
    """An ultrasound DICOM file: H x W (grey, palette) or H x W x 3 (RGB) pixels, one tissue region (inclusive).

    The pixel data is written in the byte order of ``syntax`` (pydicom writes OB/OW bytes as given).
    """
    ds = us_dataset(*pixels.shape[:2], syntax)
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation, ds.PixelRepresentation = photometric, 0
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = (8, 8, 7) if bits == 8 else (16, bits, bits - 1)
    order = ">" if syntax == ExplicitVRBigEndian else "<"
    dtype = np.uint8 if bits == 8 else np.dtype(f"{order}u2")
    ds.PixelData = pixel_bytes if pixel_bytes is not None else pixels.astype(dtype).tobytes()
    for key, value in elements.items():
        setattr(ds, key, value)
    if region is not None:
        r = Dataset()
        r.RegionSpatialFormat, r.RegionDataType, r.RegionFlags = 1, 1, 0
        r.RegionLocationMinX0, r.RegionLocationMinY0, r.RegionLocationMaxX1, r.RegionLocationMaxY1 = region
        r.PhysicalUnitsXDirection = r.PhysicalUnitsYDirection = 3
        r.PhysicalDeltaX = r.PhysicalDeltaY = 0.01
        ds.SequenceOfUltrasoundRegions = [r]
    ds.save_as(path, enforce_file_format=True)
    return path


def palette_elements(
    table: np.ndarray, bits: int, first: int = 0, word: int | None = None, order: str = "<"
) -> dict[str, object]:
    """Plain palette LUT elements for an (entries, 3) table: ``bits`` in the descriptor, ``word`` bytes per entry."""
    word = word or bits // 8
    out: dict[str, object] = {}
    for c, name in enumerate(("Red", "Green", "Blue")):
        out[f"{name}PaletteColorLookupTableDescriptor"] = [len(table) % 65536, first, bits]
        dtype = np.uint8 if word == 1 else np.dtype(f"{order}u2")
        out[f"{name}PaletteColorLookupTableData"] = table[:, c].astype(dtype).tobytes()
    return out


def indices(shape: tuple[int, int] = (12, 16), n: int = 256, seed: int = 0) -> np.ndarray:
    """Palette indices using every one of ``n`` entries (at least once), in shuffled order."""
    rng = np.random.default_rng(seed)
    flat = np.resize(np.arange(n), shape[0] * shape[1])
    return rng.permutation(flat).reshape(shape)


# ------------------------------------------------------------------ palette colour
@pytest.mark.parametrize(
    ("bits", "word", "scale", "syntax"),
    [
        (8, 1, 1, ExplicitVRLittleEndian),  # 8-bit entries, one byte each
        (8, 2, 1, ExplicitVRLittleEndian),  # 8-bit entries in 16-bit words (the standard allows it)
        (16, 2, 257, ExplicitVRLittleEndian),  # 16-bit entries: 0..65535
        (16, 2, 257, ExplicitVRBigEndian),  # the same, big endian: pydicom's apply_color_lut byte-swaps these
        (16, 2, 1, ExplicitVRLittleEndian),  # a 16-bit descriptor holding 8-bit values: read on the 8-bit scale
    ],
)
def test_palette_grey_lut_gives_exact_values(tmp_path, bits, word, scale, syntax):
    from usclip.data.dicom import read_dicom

    grey = (np.arange(256) * 7 + 3) % 256  # a grey palette, not monotonic: index bugs show
    # 16-bit entries 257 g - (g % 97): still g on the 8-bit scale, and changed by a byte swap (257 g is not)
    table = np.stack([grey, grey, grey], axis=1) * scale - (grey % 97 if scale == 257 else 0 * grey)[:, None]
    idx = indices()
    order = ">" if syntax == ExplicitVRBigEndian else "<"
    path = write_dicom(
        tmp_path / "p.dcm", idx, "PALETTE COLOR", syntax=syntax, **palette_elements(table, bits, word=word, order=order)
    )
    d = read_dicom(path)
    np.testing.assert_array_equal(d.image, grey[idx])
    assert d.coloured is not None and not d.coloured.any()  # a grey palette has no coloured pixel


def test_palette_16_bit_colours_first_mapped_value_and_16_bit_indices(tmp_path):
    """16-bit indices, a LUT starting at stored value 100, colour entries: luminance on the LUT's 16-bit scale."""
    from usclip.data.dicom import read_dicom

    entries, first = 300, 100
    table = np.zeros((entries, 3), np.int64)
    table[:, 0] = table[:, 1] = table[:, 2] = np.arange(entries) * 200  # grey ramp: 0 .. 59800
    table[7] = (65535, 0, 0)  # pure red
    table[8] = (50000, 40000, 1000)  # a colour: luminance 0.299*50000 + 0.587*40000 + 0.114*1000
    idx = np.array([[0, 50, 107, 108], [100, 250, 399, 65535]], np.uint16)  # below first, in range, above the end
    path = write_dicom(tmp_path / "p16.dcm", idx, "PALETTE COLOR", bits=16, **palette_elements(table, 16, first))
    d = read_dicom(path)
    lum = np.round(table @ LUMA * 255 / 65535).astype(int)
    expected = [[lum[0], lum[0], lum[7], lum[8]], [lum[0], lum[150], lum[299], lum[299]]]
    np.testing.assert_array_equal(d.image, expected)
    assert d.image[0, 2] == round(0.299 * 255)  # 76: red read on its own 16-bit scale, not clipped to 255
    assert d.coloured is not None and d.coloured.tolist() == [[False, False, True, True], [False] * 4]


def _segmented(entries: int) -> bytes:
    """A segmented LUT (PS3.3 C.7.9.2): a discrete segment [0], then a linear segment up to 65535."""
    words = [0, 1, 0, 1, entries - 1, 65535]  # opcode 0 (discrete, 1 value: 0); opcode 1 (linear, n, end value)
    return np.array(words, "<u2").tobytes()


def test_segmented_16_bit_palette(tmp_path):
    from usclip.data.dicom import read_dicom

    entries = 256
    elements: dict[str, object] = {}
    for name in ("Red", "Green", "Blue"):
        elements[f"{name}PaletteColorLookupTableDescriptor"] = [entries, 0, 16]
        elements[f"Segmented{name}PaletteColorLookupTableData"] = _segmented(entries)
    idx = indices()
    d = read_dicom(write_dicom(tmp_path / "seg.dcm", idx, "PALETTE COLOR", **elements))
    np.testing.assert_array_equal(d.image, idx)  # entry i = 257 i on the 16-bit scale = grey i


def test_collapsed_grey_levels_are_reported(tmp_path, monkeypatch, caplog):
    """The issue's bug (a 16-bit palette read on the 8-bit scale: two grey levels) is logged naming the file."""
    import usclip.data.dicom as dicom

    grey = np.arange(256)
    table = np.stack([grey, grey, grey], axis=1) * 257
    path = write_dicom(tmp_path / "aloka.dcm", indices(), "PALETTE COLOR", **palette_elements(table, 16))
    with caplog.at_level(logging.WARNING, logger="usclip.data.dicom"):
        dicom.read_dicom(path)
    assert not caplog.records  # the right reading keeps its 256 levels: no warning
    real = dicom._palette_table
    # the old reading: 16-bit LUT values taken on the 8-bit scale and clipped (0 -> 0, everything else -> 255)
    monkeypatch.setattr(dicom, "_palette_table", lambda ds, p: (real(ds, p)[0], 255))
    with caplog.at_level(logging.WARNING, logger="usclip.data.dicom"):
        d = dicom.read_dicom(path)
    assert len(np.unique(d.image)) == 2
    assert any("aloka.dcm" in r.getMessage() and "2 grey levels" in r.getMessage() for r in caplog.records)


def test_collapsed_monochrome_is_reported(tmp_path, caplog):
    """10-bit data declared as 16 bits stored: 1024 values become 4 grey levels, with a warning."""
    from usclip.data.dicom import read_dicom

    pixels = (np.arange(32 * 32).reshape(32, 32)).astype(np.uint16)  # 0 .. 1023
    path = write_dicom(tmp_path / "dark.dcm", pixels, bits=16)
    with caplog.at_level(logging.WARNING, logger="usclip.data.dicom"):
        d = read_dicom(path)
    assert len(np.unique(d.image)) == 5  # round(v * 255 / 65535) for v < 1024: 0 .. 4
    assert any("dark.dcm" in r.getMessage() and "1024 distinct values" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ colour in the scan area
def doppler_scan(seed: int = 0) -> tuple[np.ndarray, tuple[int, int, int, int], np.ndarray]:
    """A 60 x 80 RGB scan: grey speckle in 20..60, a red Doppler blob of 12 x 10 pixels in the tissue region
    (x 10..69, y 5..54 inclusive: 60 x 50 = 3000 pixels) and a yellow caliper outside it.

    Returns:
        ``(rgb, region, blob mask)``.
    """
    rng = np.random.default_rng(seed)
    grey = rng.integers(20, 61, size=(60, 80)).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    blob = np.zeros((60, 80), bool)
    blob[20:30, 30:42] = True
    rgb[blob] = (255, 0, 0)  # luminance 76: brighter than the speckle
    rgb[0:3, 0:5] = (255, 255, 0)  # a caliper outside the scan region: coloured, but not in the scan area
    return rgb, (10, 5, 69, 54), blob


def test_colour_share_keep_and_replace_on_a_doppler_dicom(tmp_path):
    from usclip.data.checks import check_dataset
    from usclip.data.dicom import read_dicom

    rgb, region, blob = doppler_scan()
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    path = write_dicom(root / "images" / "dop.dcm", rgb, "RGB", region=region)
    keep = read_dicom(path)
    assert keep.region == (10, 5, 70, 55)
    assert colour_share(keep.coloured, keep.region) == pytest.approx(120 / 3000)  # the blob's share of the region
    assert keep.coloured is not None and int(keep.coloured.sum()) == 120 + 15  # blob + caliper in the whole image
    # keep: the luminance as before the option (ITU-R 601, rounded), the blob a bright patch of 76
    np.testing.assert_array_equal(keep.image, np.round(rgb.astype(float) @ LUMA).astype(np.uint8))
    assert (keep.image[blob] == 76).all()
    replaced = read_dicom(path, colour="replace")
    ring = np.zeros_like(blob)
    ring[19:31, 29:43] = True
    ring &= ~blob  # the grey pixels around the blob
    assert replaced.image[blob].max() <= keep.image[ring].max()
    assert replaced.image[blob].min() >= keep.image[ring].min()
    untouched = ~blob  # grey pixels, and the caliper outside the scan region (the crop removes it)
    np.testing.assert_array_equal(replaced.image[untouched], keep.image[untouched])
    report = check_dataset(root)
    assert report.colour_share == {str(path): pytest.approx(0.04)}
    assert "colour in the scan area: 1 of 1 colour files hold coloured pixels" in report.format()
    assert "dop.dcm 4.00 %" in report.format()


def test_colour_replace_inside_each_region_of_a_dual_view(tmp_path, caplog):
    """``regions: all`` with ``colour: replace``: each region's sample gets its own region's filled pixels, the
    cache keeps colour and region apart, and the data check's share covers both regions without a region warning."""
    from usclip.data.cache import SampleCache
    from usclip.data.colour import scan_area_colour_share
    from usclip.data.datasets import FolderDataset
    from usclip.data.dicom import read_dicom
    from usclip.data.layouts import expand_regions, index_folder

    rng = np.random.default_rng(3)
    rgb = np.repeat(rng.integers(20, 61, size=(60, 80)).astype(np.uint8)[..., None], 3, axis=2)
    boxes = [(5, 5, 35, 45), (40, 5, 75, 45)]  # end exclusive: 30 x 40 and 35 x 40 pixels
    blobs = np.zeros((60, 80), bool)
    blobs[15:20, 12:18] = True  # 30 pixels in r0
    blobs[20:30, 50:58] = True  # 80 pixels in r1
    rgb[blobs] = (255, 0, 0)
    rgb[50:53, 0:4] = (255, 255, 0)  # outside both regions: kept
    items = []
    for x0, y0, x1, y1 in boxes:
        r = Dataset()
        r.RegionSpatialFormat, r.RegionDataType, r.RegionFlags = 1, 1, 0
        r.RegionLocationMinX0, r.RegionLocationMinY0 = x0, y0
        r.RegionLocationMaxX1, r.RegionLocationMaxY1 = x1 - 1, y1 - 1  # inclusive corners
        items.append(r)
    (tmp_path / "d" / "images").mkdir(parents=True)
    path = write_dicom(tmp_path / "d" / "images" / "dual.dcm", rgb, "RGB", SequenceOfUltrasoundRegions=items)
    keep = read_dicom(path, regions="all")
    replaced = read_dicom(path, regions="all", colour="replace")
    assert [r.box for r in replaced.regions] == boxes
    assert (keep.image[blobs] == 76).all() and replaced.image[blobs].max() <= 60  # filled in both regions
    np.testing.assert_array_equal(replaced.image[~blobs], keep.image[~blobs])  # the yellow mark outside stays
    index = expand_regions(index_folder(tmp_path / "d", masks=False), "all")
    assert index.ids == ["dual@r0", "dual@r1"]
    cache = SampleCache(max_mb=8)
    kwargs = {"with_masks": False, "crop": "auto", "index": index, "cache": cache, "regions": "all"}
    for colour, image in (("keep", keep.image), ("replace", replaced.image)):
        ds = FolderDataset(tmp_path / "d", index.ids, colour=colour, **kwargs)
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            got = (ds[k]["image"][0] * 255).round().to(dtype=torch.uint8).numpy()
            np.testing.assert_array_equal(got, image[y0:y1, x0:x1])
    assert (cache.misses, len(cache)) == (4, 4)  # two regions x two colour modes: four keys
    with caplog.at_level(logging.WARNING):
        share = scan_area_colour_share(path)
    assert share == pytest.approx((30 + 80) / (1200 + 1400))  # both regions together
    assert not [r for r in caplog.records if "tissue regions" in r.getMessage()]


def test_colour_png_replace_and_dataset_cache_key(tmp_path):
    """Colour PNGs take the same option; the cache keeps keep and replace apart."""
    from usclip.data.cache import SampleCache
    from usclip.data.datasets import FolderDataset

    rgb, _, blob = doppler_scan(seed=1)
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    Image.fromarray(rgb).save(root / "images" / "a.png")
    keep = read_image(root / "images" / "a.png")
    np.testing.assert_array_equal(keep, np.asarray(Image.fromarray(rgb).convert("L")))
    replaced = read_image(root / "images" / "a.png", colour="replace")
    assert replaced[blob].max() <= 60 and (replaced[~coloured_pixels(rgb)] == keep[~coloured_pixels(rgb)]).all()
    cache = SampleCache(max_mb=8)
    kwargs = {"with_masks": False, "crop": "none", "cache": cache}
    a = FolderDataset(root, ["a"], colour="keep", **kwargs)[0]["image"]
    b = FolderDataset(root, ["a"], colour="replace", **kwargs)[0]["image"]
    assert a[0][blob].max() * 255 == pytest.approx(76) and b[0][blob].max() * 255 <= 60
    with pytest.raises(ValueError, match=r"colour must be one of \('keep', 'replace'\), got 'grey'"):
        FolderDataset(root, ["a"], colour="grey", **kwargs)


def test_datamodule_colour_option_is_checked():
    from usclip.data.datamodules import BaseDataModule

    with pytest.raises(ValueError, match=r"data\.colour must be one of \('keep', 'replace'\), got 'Replace'"):
        BaseDataModule(colour="Replace")


def test_replace_coloured_fills_inwards_with_neighbour_medians():
    gray = np.full((7, 7), 10, np.uint8)
    gray[:, 4:] = 50  # two grey levels around a 3 x 3 coloured square
    coloured = np.zeros((7, 7), bool)
    coloured[2:5, 2:5] = True
    gray[coloured] = 200
    out = replace_coloured(gray, coloured)
    assert out[coloured].max() <= 50 and out[coloured].min() >= 10
    assert out[3, 2] == 10 and out[3, 4] == 50  # edge pixels: the median of their grey neighbours ...
    assert out[2, 3] == 10 and out[4, 3] == 10  # ... (10, 10, 50 -> 10; neither their mean nor their maximum)
    assert out[3, 3] == 10  # the centre, filled last from its 8 filled neighbours: 5 x 10, 3 x 50
    np.testing.assert_array_equal(out[~coloured], gray[~coloured])
    tinted = np.ones((4, 4), bool)
    tinted[0, 0] = False  # 15 of 16 pixels coloured: a tinted B-mode, left as it is
    np.testing.assert_array_equal(replace_coloured(gray[:4, :4], tinted), gray[:4, :4])


def test_coloured_pixels_tolerance():
    rgb = np.array([[[100, 100, 100], [100, 100 + COLOUR_TOLERANCE, 100], [90, 100 + COLOUR_TOLERANCE, 100]]], np.uint8)
    assert coloured_pixels(rgb).tolist() == [[False, False, True]]  # a spread of 24 is grey, 25 is colour


# ------------------------------------------------------------------ guards
def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path, monkeypatch):
    import pydicom.pixels

    from usclip.data.dicom import read_dicom

    path = write_dicom(tmp_path / "huge.dcm", np.zeros((2, 2), np.uint8), pixel_bytes=b"\x00" * 8)
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 20000  # a header claiming 400 million pixels over 8 bytes of data
    ds.save_as(path)
    calls = []
    monkeypatch.setattr(pydicom.pixels, "pixel_array", lambda *a, **k: calls.append(a))
    message = (
        r"huge\.dcm: image of 20000 x 20000 = 400,000,000 pixels, more than the limit of 64,000,000 "
        r"\(data\.max_image_pixels\); not decoded"
    )
    with pytest.raises(ImageReadError, match=message):
        read_dicom(path)
    with pytest.raises(ImageReadError, match=message):
        read_image(path)  # read_image passes its limit on to DICOM files
    assert calls == []
    small = write_dicom(tmp_path / "s.dcm", np.full((8, 8), 9, np.uint8))
    monkeypatch.undo()
    with pytest.raises(ImageReadError, match=r"8 x 8 = 64 pixels, more than the limit of 63"):
        read_image(small, max_pixels=63)
    assert read_image(small, max_pixels=64).max() == 9


@pytest.mark.parametrize(
    ("syntax", "deps", "expected"),
    [
        (
            JPEGLSLossless,
            {
                "gdcm": ("gdcm>=3.0.10",),
                "pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1"),
                "pyjpegls": ("numpy", "pyjpegls>=1.2"),
            },
            "pip install pylibjpeg pylibjpeg-libjpeg; or pip install pyjpegls; or pip install python-gdcm",
        ),
        (
            JPEG2000Lossless,
            {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-openjpeg>=2.0"), "pillow": ("numpy", "pillow>=10.0")},
            "pip install pylibjpeg pylibjpeg-openjpeg; or a Pillow built with this codec",
        ),
        (RLELossless, {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-rle>=2.0")}, "pip install pylibjpeg pylibjpeg-rle"),
    ],
)
def test_missing_codec_names_the_package(tmp_path, monkeypatch, syntax, deps, expected):
    import pydicom.pixels

    from usclip.data.dicom import read_dicom

    path = write_dicom(
        tmp_path / "c.dcm", np.zeros((4, 4), np.uint8), syntax=syntax, pixel_bytes=encapsulate([b"\xff\xd8" * 8])
    )
    decoder = pydicom.pixels.get_decoder(syntax)
    monkeypatch.setattr(decoder, "_available", {})  # as if no plugin were installed
    monkeypatch.setattr(decoder, "_unavailable", deps)
    monkeypatch.setattr(pydicom.pixels, "pixel_array", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(ImageReadError, match=r"c\.dcm: pixel data compressed as .*no decoder for it is installed") as e:
        read_dicom(path)
    assert f"{syntax.name} ({syntax})" in str(e.value) and expected in str(e.value)


def test_unknown_transfer_syntax_is_named(tmp_path):
    from usclip.data.dicom import read_dicom

    path = write_dicom(tmp_path / "u.dcm", np.zeros((4, 4), np.uint8))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6"  # a private syntax no pydicom plugin knows
    ds.PixelData = encapsulate([b"\x00" * 10])
    ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=True)
    with pytest.raises(ImageReadError, match=r"u\.dcm: pixel data in transfer syntax 1\.2\.3\.4\.5\.6, which pydicom "):
        read_dicom(path)


def test_dicom_without_pixel_data_and_without_meta_header(tmp_path):
    from usclip.data.dicom import read_dicom

    path = write_dicom(tmp_path / "sr.dcm", np.zeros((4, 4), np.uint8))
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(ImageReadError, match=r"sr\.dcm: DICOM file without pixel data \(no \(7FE0,0010\) element; "):
        read_dicom(path)
    ds.FloatPixelData = np.zeros(16, np.float32).tobytes()
    ds.save_as(path)
    with pytest.raises(ImageReadError, match=r"only FloatPixelData: floating-point data"):
        read_dicom(path)
    # an old file without preamble and meta header (as OT-PAL-8-face.dcm): read from its byte order
    pixels = np.arange(16, dtype=np.uint8).reshape(4, 4) * 9
    bare = pydicom.dcmread(write_dicom(tmp_path / "b.dcm", pixels))
    del bare.file_meta
    bare.preamble = None
    bare.save_as(tmp_path / "bare.dcm", enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert b"DICM" not in (tmp_path / "bare.dcm").read_bytes()
    np.testing.assert_array_equal(read_dicom(tmp_path / "bare.dcm").image, pixels)
