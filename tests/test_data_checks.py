"""Bad inputs: every one gives an error naming the file and the problem, or a documented, logged fix.

Each case is checked twice: on the training path (Dataset / DataModule) and in ``usclip data check``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usclip.data import ClassificationDataModule, SegmentationDataModule
from usclip.data.checks import check_dataset
from usclip.data.datasets import FolderDataset
from usclip.data.imageio import ImageReadError, read_image, read_mask

from .dicom_files import J2K_LOSSLESS, write_dicom, write_dicom_folder


def make_folder(root: Path, n: int = 6, size: tuple[int, int] = (40, 50)) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["id,label"]
    for i in range(n):
        Image.fromarray(rng.integers(30, 255, size, dtype=np.uint8)).save(root / "images" / f"s{i}.png")
        mask = np.zeros(size, np.uint8)
        mask[10:20, 10:30] = 255
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
        rows.append(f"s{i},{'malignant' if i % 3 == 0 else 'benign'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def problems(root: Path, severity: str, **kwargs) -> list[str]:
    return [
        f"{p.path}: {p.message}" for p in check_dataset(root, crop="none", **kwargs).problems if p.severity == severity
    ]


def test_clean_folder_has_no_problems(tmp_path):
    root = make_folder(tmp_path / "d")
    report = check_dataset(root)
    assert report.problems == [] and report.num_images == 6 and report.num_masks == 6
    assert report.labels == {"benign": 4, "malignant": 2}
    text = report.format()
    assert "images: 6" in text and "benign 4 (66.7 %)" in text and "problems: none" in text
    assert "lesion coverage mean 10.0 %" in text


# ------------------------------------------------------------------ unreadable and truncated images
@pytest.mark.parametrize("kind", ["truncated", "empty", "text"])
def test_unreadable_image(tmp_path, kind):
    root = make_folder(tmp_path / "d")
    bad = root / "images" / "s1.png"
    data = bad.read_bytes()
    bad.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "text": b"not an image"}[kind])
    expect = "empty file" if kind == "empty" else "cannot read the image"
    with pytest.raises(ImageReadError, match=rf"s1\.png: {expect}"):
        FolderDataset(root, ["s0", "s1"])[1]
    (err,) = problems(root, "error")
    assert err.startswith(str(bad)) and expect in err


# ------------------------------------------------------------------ masks
def test_missing_mask(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "masks" / "s2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 ids have no mask in .*masks: \['s2'\]"):
        FolderDataset(root, ["s1", "s2"])
    dm = SegmentationDataModule(str(root), image_size=32, split_fractions=(1, 0, 0))
    dm.setup("fit")
    with pytest.raises(FileNotFoundError, match=r"no mask.*s2"):
        dm.train_dataloader()
    (err,) = problems(root, "error")
    assert "s2.png: has no mask file" in err


def test_mask_of_another_size(tmp_path):
    root = make_folder(tmp_path / "d")
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(root / "masks" / "s0.png")
    with pytest.raises(ImageReadError, match=r"masks/s0\.png: mask is 12x10 but its image is 50x40 \(W x H\)"):
        FolderDataset(root, ["s0"])[0]
    (err,) = problems(root, "error")
    assert "s0.png: mask is 12x10 but its image is 50x40" in err


def test_zero_one_mask_is_read_as_binary_and_logged(tmp_path, caplog):
    root = make_folder(tmp_path / "d")
    mask = np.zeros((40, 50), np.uint8)
    mask[5:15, 5:25] = 1
    Image.fromarray(mask).save(root / "masks" / "s0.png")
    with caplog.at_level(logging.INFO, logger="usclip"):
        s = FolderDataset(root, ["s0"])[0]
    assert int(s["mask"].sum()) == 200 and set(s["mask"].unique().tolist()) == {0, 1}
    assert "masks stored as 0/1 (first: s0.png), read as binary" in caplog.text
    (note,) = problems(root, "note")
    assert "s0.png: mask stored as 0/1; read as binary" in note


def test_class_index_mask_is_an_error(tmp_path):
    root = make_folder(tmp_path / "d")
    mask = np.zeros((40, 50), np.uint8)
    mask[5:15, 5:25] = 1
    mask[20:30, 5:25] = 2
    Image.fromarray(mask).save(root / "masks" / "s3.png")
    with pytest.raises(ImageReadError, match=r"s3\.png: mask holds the class indices \[0, 1, 2\]"):
        FolderDataset(root, ["s3"])[0]
    (err,) = problems(root, "error")
    assert "s3.png: mask holds the class indices [0, 1, 2]" in err and "must be binary" in err


def test_antialiased_mask_is_thresholded_with_a_warning(tmp_path, caplog):
    root = make_folder(tmp_path / "d")
    mask = np.zeros((40, 50), np.uint8)
    mask[10:20, 10:30] = 255
    mask[9, 10:30] = 100  # soft edge below half: background
    mask[20, 10:30] = 200  # soft edge above half: lesion
    Image.fromarray(mask).save(root / "masks" / "s4.png")
    with caplog.at_level(logging.WARNING, logger="usclip"):
        s = FolderDataset(root, ["s4"])[0]
    assert int(s["mask"].sum()) == 11 * 20
    assert "s4.png: mask has 4 grey levels (anti-aliased or resampled); thresholded at 128" in caplog.text
    (warning,) = problems(root, "warning")
    assert "s4.png: mask has 4 grey levels (anti-aliased); thresholded at 128" in warning


def test_rgba_mask_and_merged_masks(tmp_path):
    # an opaque white lesion on a transparent background (two BUSI masks are RGBA); a second lesion file is OR-ed
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:5, 2:6] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a_mask.png")
    other = np.zeros((8, 8), np.uint8)
    other[6:8, 0:2] = 255
    Image.fromarray(other).save(tmp_path / "a_mask_1.png")
    assert int(read_mask(tmp_path / "a_mask.png").sum()) == 12
    merged = read_mask([tmp_path / "a_mask.png", tmp_path / "a_mask_1.png"], (8, 8))
    assert int(merged.sum()) == 16 and merged.dtype == np.uint8


# ------------------------------------------------------------------ image kinds converted with a note
def test_rgba_and_16bit_images_are_converted_with_a_note(tmp_path, caplog):
    root = make_folder(tmp_path / "d")
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 255
    rgba[:, :10, 3] = 0  # transparent strip: no echo
    Image.fromarray(rgba, "RGBA").save(root / "images" / "s0.png")
    deep = np.arange(40 * 50, dtype=np.uint16).reshape(40, 50)
    deep[-1, -1] = 4095  # 12-bit data
    Image.fromarray(deep).save(root / "images" / "s1.png")
    with caplog.at_level(logging.INFO, logger="usclip"):
        a = read_image(root / "images" / "s0.png")
        b = read_image(root / "images" / "s1.png")
    assert a.dtype == np.uint8 and a[:, :10].max() == 0 and a[:, 10:].min() == 200
    assert b.dtype == np.uint8 and b.max() == 255 and b[0, 1] == round(255 / 4095)
    assert "s0.png: RGBA image composited onto black" in caplog.text
    assert "s1.png: I;16 image scaled from 12 to 8 bits" in caplog.text
    notes = problems(root, "note")
    assert any("s0.png: RGBA image: composited onto black" in n for n in notes)
    assert any("s1.png: I;16 (16-bit) image: scaled to 8 bits" in n for n in notes)


# ------------------------------------------------------------------ labels, ids and split files
def test_unknown_label(tmp_path):
    root = make_folder(tmp_path / "d")
    text = (root / "labels.csv").read_text().replace("s3,malignant", "s3,normal")
    (root / "labels.csv").write_text(text)
    dm = ClassificationDataModule(str(root), label_names=["benign", "malignant"])
    with pytest.raises(ValueError, match=r"labels\.csv: labels \['normal'\] \(ids \['s3'\]\) are not among"):
        dm.setup("fit")
    (err,) = problems(root, "error", label_names=["benign", "malignant"])
    assert "labels.csv: unknown label 'normal' (ids ['s3'])" in err


def test_duplicate_ids(tmp_path):
    root = make_folder(tmp_path / "d")
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(root / "images" / "s2.jpg")
    with pytest.raises(ValueError, match=r"duplicate id 's2' in .*images: s2\.jpg and s2\.png"):
        FolderDataset(root, ["s2"])
    with pytest.raises(ValueError, match="duplicate id 's2'"):
        SegmentationDataModule(str(root)).setup("fit")
    (err,) = problems(root, "error")
    assert "s2.png: duplicate id 's2': s2.jpg has the same stem" in err


def test_duplicate_label_rows(tmp_path):
    root = make_folder(tmp_path / "d")
    with (root / "labels.csv").open("a") as f:
        f.write("s1,malignant\n")
    with pytest.raises(ValueError, match=r"labels\.csv, line 8: id 's1' appears twice"):
        SegmentationDataModule(str(root)).setup("fit")


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_split_id_without_file(tmp_path, split):
    root = make_folder(tmp_path / "d")
    files = {"train": "s0\ns1\ns2\n", "val": "s3\n", "test": "s4\ns5\n"}
    files[split] += "ghost\n"
    for name, text in files.items():
        (root / f"{name}.txt").write_text(text)
    with pytest.raises(ValueError, match=rf"{split}\.txt: 1 ids have no image in the dataset: \['ghost'\]"):
        SegmentationDataModule(str(root)).setup("fit")
    (err,) = problems(root, "error")
    assert f"{split}.txt: 1 ids have no image: ['ghost']" in err


def test_split_id_in_two_files(tmp_path):
    root = make_folder(tmp_path / "d")
    for name, text in {"train": "s0\ns1\ns2\n", "val": "s3\n", "test": "s3\ns5\n"}.items():
        (root / f"{name}.txt").write_text(text)
    with pytest.raises(ValueError, match=r"test\.txt: id 's3' is listed in .*val\.txt too"):
        SegmentationDataModule(str(root)).setup("fit")
    (err,) = problems(root, "error")
    assert "test.txt: id 's3' is also listed in val.txt" in err


def test_conflicting_group_labels_and_orphans_are_warned(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "groups.csv").write_text("id,group\ns0,g\ns1,g\ns2,h\nzz,h\n")
    warnings = problems(root, "warning")
    assert any("groups.csv: 1 groups hold images with different labels (['g'])" in w for w in warnings)
    assert any("groups.csv: 1 ids have no image: ['zz']" in w for w in warnings)


# ------------------------------------------------------------------ DICOM listing
def test_dicom_files_are_listed_with_header_regions_and_decoding(tmp_path):
    from usclip.data.dicom_checks import summarise

    root = tmp_path / "d"
    write_dicom_folder(root / "images")
    report = check_dataset(root, crop="none")
    files = {f.name: f for f in report.dicom}
    assert sorted(files) == ["images/j2k.dcm", "images/mono.dcm", "images/pal.dcm", "images/rgb.dcm", "images/two.dcm"]
    mono, rgb, pal, two, j2k = (files[f"images/{n}.dcm"] for n in ("mono", "rgb", "pal", "two", "j2k"))
    assert (mono.photometric, mono.bits_allocated, mono.bits_stored) == ("MONOCHROME2", 8, 8)
    assert (mono.frames, mono.samples_per_pixel, mono.size) == (2, 1, (40, 30))
    assert (rgb.photometric, rgb.samples_per_pixel, rgb.size, rgb.regions) == ("RGB", 3, (20, 10), [])
    assert pal.photometric == "PALETTE COLOR" and mono.transfer_syntax == "Explicit VR Little Endian"
    assert j2k.transfer_syntax == "JPEG 2000 Image Compression (Lossless Only)"
    assert j2k.transfer_syntax_uid == J2K_LOSSLESS
    # regions as written: end-exclusive boxes, spacing (row, column) in mm from cm, names of format and type
    assert [(r.box, r.spatial_format, r.data_type) for r in two.regions] == [
        ((2, 3, 20, 25), 1, 1),
        ((20, 3, 40, 25), 1, 1),
        ((0, 25, 6, 30), 0, 13),
    ]
    assert two.regions[0].spacing == pytest.approx((0.2, 0.1)) and two.regions[1].spacing == pytest.approx((0.5, 0.3))
    assert two.regions[2].spacing is None
    # decoding through usclip's reader: the garbage JPEG 2000 fails (with or without a decoder), the rest decode
    assert [f.decodes for f in (mono, rgb, pal, two)] == [True] * 4 and j2k.decodes is False
    assert j2k.error and "\n" not in j2k.error and any(p.path.endswith("j2k.dcm") for p in report.errors)
    kinds = summarise(report.dicom)
    assert kinds["photometric interpretation"] == {"MONOCHROME2": (3, 2), "PALETTE COLOR": (1, 1), "RGB": (1, 1)}
    assert kinds["transfer syntax"] == {
        "Explicit VR Little Endian": (4, 4),
        "JPEG 2000 Image Compression (Lossless Only)": (1, 0),
    }
    assert kinds["frames"] == {"1": (4, 3), "2": (1, 1)} and kinds["samples per pixel"] == {"1": (4, 3), "3": (1, 1)}
    assert kinds["ultrasound regions"] == {"0": (3, 2), "1": (1, 1), "3": (1, 1)}
    text = report.format()
    assert "DICOM files: 5; 4 decode, 1 do not" in text
    assert "photometric interpretation: MONOCHROME2 3 (2 decode), PALETTE COLOR 1 (1 decode), RGB 1 (1 decode)" in text
    assert "images/mono.dcm: MONOCHROME2, bits 8/8, Explicit VR Little Endian, 2 frames, 1 sample/pixel, 40x30" in text
    assert (
        "images/two.dcm: MONOCHROME2, bits 8/8, Explicit VR Little Endian, 1 frame, 1 sample/pixel, 40x30; 3 regions: "
        "[1] (2, 3, 20, 25) 2-D/tissue, spacing 0.2 x 0.1 mm; [2] (20, 3, 40, 25) 2-D/tissue, spacing 0.5 x 0.3 mm; "
        "[3] (0, 25, 6, 30) none/grey bar; decodes"
    ) in text
    assert "images/j2k.dcm: MONOCHROME2, bits 8/8, JPEG 2000 Image Compression (Lossless Only)" in text
    assert f"no regions; does not decode: {j2k.error}" in text
    assert "plain.png" not in text.split("problems:")[0]  # PNG files are checked, not listed as DICOM
    # a file with two tissue regions says what data.regions does with them (only that file: the grey bar is no tissue)
    notes = [p for p in report.problems if "tissue regions" in p.message]
    assert [(p.severity, Path(p.path).name) for p in notes] == [("note", "two.dcm")]
    assert notes[0].message.startswith("2 tissue regions (2, 3, 20, 25), (20, 3, 40, 25): data.regions: largest")
    summary_only = report.format(max_dicom_files=0)
    assert "DICOM files: 5" in summary_only and "images/mono.dcm:" not in summary_only


def test_dicom_header_without_file_meta_and_not_dicom(tmp_path):
    """An old file without preamble and file meta is read with force (like OT-PAL-8-face.dcm); junk is named."""
    from usclip.data.dicom_checks import read_dicom_header

    bare = write_dicom(tmp_path / "bare.dcm", np.zeros((6, 9), np.uint8), "PALETTE COLOR", file_meta=False)
    info = read_dicom_header(bare)
    assert (info.photometric, info.size, info.header_error) == ("PALETTE COLOR", (9, 6), None)
    assert info.transfer_syntax == "Implicit VR Little Endian (no file meta)" and info.transfer_syntax_uid is None
    (tmp_path / "junk.dcm").write_bytes(b"not a dicom file at all")
    junk = read_dicom_header(tmp_path / "junk.dcm")
    assert junk.header_error == "not a DICOM file (no DICOM header and no image attributes)"
    junk.decoded("cannot read\nsecond line")
    assert junk.decodes is False and junk.error == "cannot read"
    assert junk.describe() == (
        "junk.dcm: header not readable: not a DICOM file (no DICOM header and no image attributes); no regions; "
        "does not decode: cannot read"
    )
