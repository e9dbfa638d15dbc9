"""Hostile images: decompression bombs, huge scans, empty files, 16-bit hot pixels and odd mask values.

Each gets a clear error naming the file or a documented, tested handling (docs/data.md, "Reading rules"); memory
stays bounded because the size is checked from the file header before any pixel is decoded.
"""

from __future__ import annotations

import importlib.util
import logging
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from usclip.cli import main
from usclip.data.bad_samples import BadSample, BadSampleError
from usclip.data.checks import check_dataset
from usclip.data.datasets import FolderDataset
from usclip.data.imageio import (
    MAX_IMAGE_PIXELS,
    ImageReadError,
    binarise_mask,
    deep_bit_depth,
    read_image,
    read_mask,
)

REPO = Path(__file__).resolve().parents[1]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_zero_png(path: Path, width: int, height: int, bit_depth: int = 8) -> Path:
    """A grey PNG of ``width x height`` zeros, built without ever holding (or compressing) the whole image.

    One block of rows is deflated once, ended with a full flush (so it never refers to earlier data), and repeated:
    a 40,000 x 40,000 1-bit image (1.6 gigapixels) takes ~150 KB and a fraction of a second.
    """
    row = b"\x00" * (1 + (width * bit_depth + 7) // 8)  # filter byte 0, then the packed zero pixels
    per_block = 512
    blocks, rest = divmod(height, per_block)
    z = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate; the zlib header and checksum are added below
    block = z.compress(row * per_block) + z.flush(zlib.Z_FULL_FLUSH)
    tail = z.compress(row * rest) + z.flush(zlib.Z_FINISH)
    adler = 1
    for _ in range(blocks):
        adler = zlib.adler32(row * per_block, adler)
    adler = zlib.adler32(row * rest, adler)
    idat = b"\x78\xda" + block * blocks + tail + struct.pack(">I", adler)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)  # colour type 0: grey
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def test_zero_png_helper_writes_a_valid_png(tmp_path):
    path = write_zero_png(tmp_path / "z.png", 70, 1100)  # 2 blocks of 512 rows and a tail of 76
    with Image.open(path) as im:
        assert im.size == (70, 1100) and im.mode == "L"
        assert np.asarray(im).max() == 0
    assert read_image(path).shape == (1100, 70)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """A 1-bit PNG of 40,000 x 40,000 pixels (1.6 gigapixels; 1.6 GB as the 8-bit array training would make)."""
    return write_zero_png(tmp_path_factory.mktemp("bomb") / "bomb.png", 40_000, 40_000, bit_depth=1)


@pytest.fixture(scope="module")
def huge(tmp_path_factory) -> Path:
    """A 20,000 x 20,000 scan (400 megapixels: 400 MB as the 8-bit array; stored 1-bit to build it fast)."""
    return write_zero_png(tmp_path_factory.mktemp("huge") / "huge.png", 20_000, 20_000, bit_depth=1)


def _never_decode(monkeypatch) -> None:
    def fail(self, *args, **kwargs):
        raise AssertionError(f"decoded {self.size} pixels: the size check must come before decoding")

    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)


# ------------------------------------------------------------------ decompression bombs and huge scans
def test_decompression_bomb_is_refused_from_its_header_without_decoding(bomb, monkeypatch):
    assert bomb.stat().st_size < 1_000_000  # small on disk ...
    _never_decode(monkeypatch)  # ... and never decoded
    with pytest.raises(ImageReadError) as info:
        read_image(bomb)
    text = str(info.value)
    assert str(bomb) in text
    assert "40000 x 40000 = 1,600,000,000 pixels" in text and "limit of 64,000,000" in text
    assert "data.max_image_pixels" in text


def test_huge_scan_is_refused_with_the_limit_and_the_way_to_raise_it(huge, monkeypatch):
    _never_decode(monkeypatch)
    with pytest.raises(ImageReadError, match=r"20000 x 20000 = 400,000,000 pixels, more than the limit"):
        read_image(huge)
    with pytest.raises(ImageReadError, match=r"limit of 399,999,999"):
        read_image(huge, max_pixels=399_999_999)  # the limit is inclusive: one pixel less refuses it
    with pytest.raises(ImageReadError, match=r"huge\.png: image of 20000 x 20000"):
        read_mask(huge)  # masks pass the same gate


def test_bomb_reading_memory_stays_bounded(bomb):
    """In a fresh process (imageio alone: no torch), refusing the bomb raises the peak RSS by under 64 MB."""
    code = f"""
import importlib.util, resource, sys
spec = importlib.util.spec_from_file_location("imageio_only", {str(REPO / "usclip" / "data" / "imageio.py")!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    m.read_image({str(bomb)!r})
except m.ImageReadError:
    pass
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    assert importlib.util.find_spec("resource") is not None
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    grown_mb = int(out.stdout.strip())
    assert grown_mb < 64, f"refusing the bomb grew the peak RSS by {grown_mb} MB"


def test_pixel_limit_is_ours_not_pils(tmp_path, monkeypatch):
    """max_pixels above PIL's own bomb limit lifts PIL's during the read (and restores it); below it, ours wins."""
    path = tmp_path / "a.png"
    Image.fromarray(np.full((40, 50), 7, np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL would refuse 2000 pixels (> 2 x 100)
    assert read_image(path, max_pixels=2000).max() == 7  # 40 x 50 = 2000: exactly at the limit is read
    assert read_image(path, max_pixels=None).shape == (40, 50)
    assert Image.MAX_IMAGE_PIXELS == 100  # restored
    with pytest.raises(ImageReadError, match=r"a\.png: image of 50 x 40 = 2,000 pixels, more than the limit of 1,999"):
        read_image(path, max_pixels=1999)


@pytest.mark.parametrize("value", [0, -5, 2.5, True])
def test_bad_pixel_limits_are_named(tmp_path, value):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "images" / "a.png")
    with pytest.raises(ValueError, match=rf"max_image_pixels must be a positive number of pixels or null.*{value!r}"):
        FolderDataset(root, ["a"], with_masks=False, max_image_pixels=value)


def test_dataset_limit_reaches_the_reader_and_check_reports_it(tmp_path):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(root / "images" / "b.png")
    ds = FolderDataset(root, ["a", "b"], with_masks=False, max_image_pixels=1000)
    assert ds[1]["image"].shape == (3, 4, 5)
    with pytest.raises(BadSampleError, match=r"'a'.*a\.png: image of 50 x 40 = 2,000 pixels"):
        ds[0]
    errors = [p for p in check_dataset(root, crop="none", max_image_pixels=1000).problems if p.severity == "error"]
    assert [(Path(p.path).name, "2,000 pixels" in p.message) for p in errors] == [("a.png", True)]
    assert check_dataset(root, crop="none").errors == []  # the default limit reads both


def test_data_check_command_takes_the_limit(tmp_path, capsys, bomb):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "images" / "bomb.png").symlink_to(bomb)
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(root / "images" / "a.png")

    def run(*extra: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exc:
            main(["data", "check", str(root), "--crop", "none", *extra])
        return int(exc.value.code), capsys.readouterr().out

    from usclip.commands.data import build_parser

    assert build_parser().parse_args(["check", "x"]).max_image_pixels == MAX_IMAGE_PIXELS  # spelt out: no drift
    code, out = run()
    assert code == 1 and "bomb.png: image of 40000 x 40000 = 1,600,000,000 pixels" in out and "a.png" not in out
    code, out = run("--max-image-pixels", "1999")
    assert code == 1 and "a.png: image of 50 x 40 = 2,000 pixels, more than the limit of 1,999" in out


# ------------------------------------------------------------------ empty files
def test_zero_byte_file_is_named_on_every_path(tmp_path):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"a\.png: empty file \(0 bytes\)"):
        read_image(root / "images" / "a.png")
    with pytest.raises(BadSampleError, match=r"bad sample 'a' \(index 0, image .*a\.png\): .*empty file"):
        FolderDataset(root, ["a"], with_masks=False)[0]
    marker = FolderDataset(root, ["a"], with_masks=False, on_bad_sample="skip")[0]
    assert isinstance(marker, BadSample) and marker.id == "a" and "empty file (0 bytes)" in marker.reason
    assert [Path(p.path).name for p in check_dataset(root, crop="none").errors] == ["a.png"]


# ------------------------------------------------------------------ 16-bit images with a hot pixel
def _twelve_bit(h: int = 40, w: int = 50) -> np.ndarray:
    return (np.arange(h * w, dtype=np.uint16).reshape(h, w) * 2) % 4096  # 12-bit data: 0 .. 4094


def test_one_bright_pixel_does_not_darken_a_16_bit_image(tmp_path, caplog):
    deep = _twelve_bit()
    deep[5, 7] = 65535  # one hot pixel at the 16-bit maximum
    path = tmp_path / "hot.png"
    Image.fromarray(deep).save(path)
    with caplog.at_level(logging.INFO, logger="usclip"):
        out = read_image(path)
    expected = np.round(_twelve_bit() * (255 / 4095)).astype(np.uint8)  # the 12-bit scale, as without the pixel
    expected[5, 7] = 255  # the hot pixel saturates
    np.testing.assert_array_equal(out, expected)
    assert out.max() == 255 and out[0, 1] == round(2 * 255 / 4095) and out[-1, -1] == round(3998 * 255 / 4095)
    assert "hot.png: I;16 image scaled from 12 to 8 bits" in caplog.text
    assert "hot.png: 1 pixels above the 12-bit range (max 65535) saturated at 255" in caplog.text
    warnings = [p for p in check_dataset_single(tmp_path, path).problems if p.severity == "warning"]
    assert [p.message for p in warnings] == ["1 pixels above the 12-bit range saturate at 255 (hot pixels?)"]


def check_dataset_single(tmp_path: Path, image: Path):
    root = tmp_path / "single"
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "images" / image.name).write_bytes(image.read_bytes())
    return check_dataset(root, crop="none")


@pytest.mark.parametrize(
    ("hot", "bits", "above"),
    [
        (0, 12, 0),  # no hot pixel: the 12-bit scale
        (1, 12, 1),  # one pixel in 2000 (at least one is allowed): still 12 bits
        (2, 16, 0),  # two in 2000 (0.1 %, more than 0.01 %): real 16-bit content, the 16-bit scale
    ],
)
def test_bit_depth_tolerates_at_most_one_in_ten_thousand_hot_pixels(hot, bits, above):
    deep = _twelve_bit()
    deep.flat[:hot] = 60000
    assert deep_bit_depth(deep) == (bits, above)


def test_bit_depth_of_large_images_allows_a_share():
    deep = np.zeros((200, 300), np.uint16)  # 60,000 pixels: 6 may be hot
    deep.flat[:6] = 65535
    assert deep_bit_depth(deep) == (8, 6)
    deep.flat[:7] = 65535
    assert deep_bit_depth(deep) == (16, 0)


def test_32_bit_integer_image_above_16_bits(tmp_path):
    a = np.zeros((10, 20), np.int32)
    a[:, 10:] = 2**20  # half the image at 2**20: a 32-bit scale
    path = tmp_path / "i32.tif"
    Image.fromarray(a, "I").save(path)
    out = read_image(path)
    assert out[0, 0] == 0 and out[0, 15] == round(2**20 * 255 / (2**32 - 1))


# ------------------------------------------------------------------ masks with values other than 0 / 255
@pytest.mark.parametrize(
    ("values", "lesion"),
    [
        ((0, 255), (0, 1)),
        ((0, 1), (0, 1)),  # 0/1 masks: non-zero is lesion (noted once per folder)
        ((0, 128), (0, 1)),  # one foreground value of any level
        ((0, 128, 255), (0, 1, 1)),  # anti-aliased: threshold at 128 (half of 255, rounded up)
        ((0, 3, 255), (0, 0, 1)),  # speckle of low values on a 0/255 mask: background
        ((0, 127, 128, 255), (0, 0, 1, 1)),
        ((0, 10, 20), (0, 1, 1)),  # 3 levels up to 20: threshold at (20 + 1) // 2 = 10
    ],
)
def test_mask_values_other_than_0_255(values, lesion):
    out = binarise_mask(np.array([values], np.uint8), "m.png")
    assert out.tolist() == [list(lesion)] and out.dtype == np.uint8


def test_class_index_masks_are_refused(tmp_path):
    path = tmp_path / "m.png"
    Image.fromarray(np.array([[0, 1, 2, 2]], np.uint8)).save(path)
    with pytest.raises(ImageReadError, match=r"m\.png: mask holds the class indices \[0, 1, 2\]"):
        read_mask(path)


def test_default_limit_is_documented():
    doc = (REPO / "docs" / "data.md").read_text()
    assert f"{MAX_IMAGE_PIXELS:,}" in doc or "64 million" in doc


def test_rgba_compositing_equals_rounded_luminance_times_alpha(tmp_path):
    rgba = np.random.default_rng(1).integers(0, 256, (30, 41, 4), dtype=np.uint8)
    path = tmp_path / "c.png"
    Image.fromarray(rgba, "RGBA").save(path)
    luminance = np.asarray(Image.fromarray(rgba[..., :3], "RGB").convert("L")).astype(np.float64)
    expected = np.round(luminance * rgba[..., 3] / 255.0).astype(np.uint8)  # integer path must round, not floor
    np.testing.assert_array_equal(read_image(path), expected)
