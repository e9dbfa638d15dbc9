"""``usclip data check`` and ``usclip data duplicates`` through the real entry point (``usclip.cli.main``)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from usclip.cli import main
from usclip.data.synthetic import generate_sample

from .dicom_files import J2K_LOSSLESS, write_dicom_folder


def run(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code or 0)


@pytest.fixture
def dataset(tmp_path):
    """5 synthetic scans, one of them saved twice with a gain change (a near-duplicate pair)."""
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["id,label"]
    for k in range(4):
        s = generate_sample(k, k % 2, 128)
        Image.fromarray(s.image).save(root / "images" / f"x{k}.png")
        Image.fromarray(s.mask).save(root / "masks" / f"x{k}.png")
        rows.append(f"x{k},{['benign', 'malignant'][k % 2]}")
    s = generate_sample(0, 0, 128)
    Image.fromarray(np.clip(s.image * 1.1, 0, 255).astype(np.uint8)).save(root / "images" / "x4.png")
    Image.fromarray(s.mask).save(root / "masks" / "x4.png")
    rows.append("x4,malignant")  # same scan as x0, other label
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_help_mentions_data_command(capsys):
    assert run(["--help"]) == 0
    assert "usclip data check ROOT" in capsys.readouterr().out
    assert run(["data", "--help"]) == 0
    out = capsys.readouterr().out
    assert "check" in out and "duplicates" in out
    assert run(["data"]) == 2  # argparse: a subcommand is required
    assert "required" in capsys.readouterr().err


def test_data_check_reports_counts_and_problems(dataset, capsys):
    assert run(["data", "check", str(dataset)]) == 0
    out = capsys.readouterr().out
    assert "images: 5" in out and "masks: 5" in out and "benign 2 (40.0 %), malignant 3 (60.0 %)" in out
    assert "auto crop: removes" in out and "problems: none" in out
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(dataset / "masks" / "x1.png")
    (dataset / "images" / "x2.png").write_bytes(b"\x89PNG broken")
    assert run(["data", "check", str(dataset), "--labels", "benign"]) == 1
    out = capsys.readouterr().out
    assert "problems: 3 errors" in out
    assert "x1.png: mask is 10x10 but its image is 128x128" in out
    assert "x2.png: cannot read the image" in out
    assert "unknown label 'malignant'" in out


def test_data_duplicates_writes_groups_and_never_overwrites(dataset, capsys):
    assert run(["data", "duplicates", str(dataset), "--pairs", str(dataset / "pairs.csv")]) == 0
    out = capsys.readouterr().out
    assert "5 images: 1 duplicate pairs, 1 groups with more than one image (2 images, largest 2)" in out
    assert "1 groups hold images with different labels" in out
    text = (dataset / "groups.csv").read_text()
    assert text == "id,group\nx0,g0000\nx1,g0001\nx2,g0002\nx3,g0003\nx4,g0000\n"
    assert (dataset / "pairs.csv").read_text().startswith("id_a,id_b,ncc32,ahash16_hamming\nx0,x4,")
    # an existing groups.csv is kept unless --overwrite
    (dataset / "groups.csv").write_text("id,group\nx0,a\nx1,a\n")
    assert run(["data", "duplicates", str(dataset)]) == 1
    assert "groups.csv exists; pass --overwrite" in capsys.readouterr().err
    assert (dataset / "groups.csv").read_text() == "id,group\nx0,a\nx1,a\n"
    out_file = dataset / "new_groups.csv"
    assert (
        run(["data", "duplicates", str(dataset), "--output", str(out_file), "--reference", str(dataset / "groups.csv")])
        == 0
    )
    # found {x0,x4}; reference {x0,x1}: no pair in common
    assert "pair precision 0.000, recall 0.000" in capsys.readouterr().out
    assert run(["data", "duplicates", str(dataset), "--overwrite"]) == 0
    assert (dataset / "groups.csv").read_text() == text


def test_data_duplicates_on_a_missing_folder(tmp_path, capsys):
    assert run(["data", "duplicates", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_data_duplicates_warns_when_one_group_swallows_a_large_share(tmp_path, capsys):
    """11 gain-changed copies of one scan plus 9 distinct scans: the 11-image group (55 %) is flagged as chained.

    Catches: the warning's threshold inverted or compared with the number of groups instead of the group's size
    (the 5-image fixture above, largest 2, stays silent: under the 10-image floor).
    """
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    base = generate_sample(0, 0, 96).image.astype(np.float32)
    for k in range(11):
        Image.fromarray(np.clip(base * (0.9 + 0.02 * k), 0, 255).astype(np.uint8)).save(root / "images" / f"c{k}.png")
    for k in range(9):
        Image.fromarray(generate_sample(100 + k, k % 2, 96).image).save(root / "images" / f"u{k}.png")
    assert run(["data", "duplicates", str(root)]) == 0
    out = capsys.readouterr().out
    assert "largest 11)" in out
    assert "warning: the largest group holds 11 of 20 images (55.0 %)" in out
    assert "--threshold above 0.93" in out


def test_data_duplicates_stays_quiet_on_small_groups(dataset, capsys):
    """Largest group 2 of 5 images (40 %, but under the 10-image floor): no chaining warning."""
    assert run(["data", "duplicates", str(dataset)]) == 0
    assert "warning: the largest group" not in capsys.readouterr().out


def test_data_duplicates_measures_the_largest_group_against_all_images(tmp_path, capsys):
    """11 copies of one scan among 241 images (4.6 %, under the 5 % share): no chaining warning.

    Catches: the share taken of the number of groups (1 here) instead of the number of images.
    """
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    base = generate_sample(0, 0, 64).image.astype(np.float32)
    for k in range(11):
        Image.fromarray(np.clip(base * (0.9 + 0.02 * k), 0, 255).astype(np.uint8)).save(root / "images" / f"c{k}.png")
    rng = np.random.default_rng(0)
    for k in range(230):  # independent noise: no pairs among them
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(root / "images" / f"n{k:03d}.png")
    assert run(["data", "duplicates", str(root)]) == 0
    out = capsys.readouterr().out
    assert "241 images: 55 duplicate pairs, 1 groups with more than one image (11 images, largest 11)" in out
    assert "warning: the largest group" not in out


def test_data_check_lists_a_flat_dicom_folder_and_a_single_file(tmp_path, capsys):
    """A folder of DICOM files without images/ (as a scanner export), --dicom-csv, and one file alone."""
    import csv

    root = write_dicom_folder(tmp_path / "export")
    csv_path = tmp_path / "dicom.csv"
    assert run(["data", "check", str(root), "--crop", "none", "--dicom-csv", str(csv_path)]) == 1  # j2k: an error
    out = capsys.readouterr().out
    assert "images: 6" in out and "no images/ folder: checked the image files in the folder itself" in out
    assert "DICOM files: 5; 4 decode, 1 do not" in out
    syntaxes = "Explicit VR Little Endian 4 (4 decode), JPEG 2000 Image Compression (Lossless Only) 1 (0 decode)"
    assert f"    transfer syntax: {syntaxes}\n" in out
    rgb = "rgb.dcm: RGB, bits 8/8, Explicit VR Little Endian, 1 frame, 3 samples/pixel, 20x10; no regions; decodes"
    # random RGB noise is mostly coloured; grey files get no colour column
    assert f"\n    {rgb}; colour 98.00 % of the scan area\n" in out
    assert "1 region: [1] (2, 3, 20, 25) 2-D/tissue, spacing 0.2 x 0.1 mm; decodes\n" in out  # mono.dcm
    assert f"wrote {csv_path} (5 DICOM files)" in out
    rows = {r["file"]: r for r in csv.DictReader(csv_path.open())}
    assert sorted(rows) == ["j2k.dcm", "mono.dcm", "pal.dcm", "rgb.dcm", "two.dcm"]
    assert (rows["j2k.dcm"]["transfer_syntax_uid"], rows["j2k.dcm"]["decodes"]) == (J2K_LOSSLESS, "0")
    assert rows["j2k.dcm"]["error"] and rows["two.dcm"]["error"] == ""
    assert (rows["rgb.dcm"]["colour_share"], rows["two.dcm"]["colour_share"]) == ("0.980000", "")
    assert (rows["two.dcm"]["regions"], rows["mono.dcm"]["frames"], rows["pal.dcm"]["decodes"]) == ("3", "2", "1")
    assert rows["two.dcm"]["region_list"].startswith("(2, 3, 20, 25) 2-D/tissue, spacing 0.2 x 0.1 mm; (20, 3, 40")
    # one file: its checks and its listing, no split files
    assert run(["data", "check", str(root / "two.dcm"), "--max-dicom-files", "0"]) == 0
    out = capsys.readouterr().out
    assert "(layout: file)" in out and "images: 1" in out and "split files" not in out
    listing = out.split("problems:")[0]  # the problems (the two tissue regions' note) name the file anyway
    assert "ultrasound regions: 3 1 (1 decode)" in listing and "two.dcm:" not in listing  # summary only
    assert run(["data", "check", str(root), "--max-dicom-files", "-1"]) == 2
    assert "--max-dicom-files must be 0 or more, got -1" in capsys.readouterr().err
