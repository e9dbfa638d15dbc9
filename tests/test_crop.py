"""Scan-area cropping on synthetic scans with known boxes, and mapping predictions back to the original image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from usclip.data import SegmentationDataModule
from usclip.data.crop import check_box, find_scan_box, paste_back, read_boxes_csv, resized_spacing
from usclip.data.datasets import FolderDataset
from usclip.data.synthetic import generate_sample, write_synthetic_dataset

# (seed, size): sector and linear scans at realistic screen sizes; text strokes at 64 px are as wide as the gaps
# between text and scan, so tiny screens are out of scope.
CASES = [(seed, size) for seed in range(6) for size in (128, 256, (200, 300))] + [(6, 512), (7, 512)]


@pytest.mark.parametrize(("seed", "size"), CASES)
def test_box_contains_scan_area_and_excludes_text(seed, size):
    sample = generate_sample(seed, seed % 2, size)
    x0, y0, x1, y1 = find_scan_box(sample.image)
    tx0, ty0, tx1, ty1 = sample.box
    # the whole scan area is inside the crop ...
    assert x0 <= tx0 and y0 <= ty0 and x1 >= tx1 and y1 >= ty1, (sample.box, (x0, y0, x1, y1))
    # ... and the text band above it, the grey bar and the depth ticks beside it are not (they start >= 2 px away)
    assert y0 >= ty0 - 1 and x0 >= tx0 - 1 and x1 <= tx1 + 1 and y1 <= ty1 + 1, (sample.box, (x0, y0, x1, y1))
    ui = sample.image.copy()
    ui[ty0:ty1, tx0:tx1] = 0
    assert ui[:ty0].any()  # the screen does carry a text band above the scan area ...
    assert not ui[y0:y1, x0:x1].any()  # ... and no mark of the screen is in the crop


def test_box_of_blank_and_full_images():
    assert find_scan_box(np.zeros((100, 80), np.uint8)) == (0, 0, 80, 100)
    speckle = np.random.default_rng(0).integers(30, 255, (90, 120), dtype=np.uint8)
    assert find_scan_box(speckle) == (0, 0, 120, 90)
    framed = np.zeros((100, 140), np.uint8)
    framed[10:90, 20:130] = speckle[:80, :110]
    assert find_scan_box(framed) == (20, 10, 130, 90)
    rgb = np.repeat(framed[..., None], 3, axis=2)
    assert find_scan_box(rgb) == (20, 10, 130, 90)


def test_box_rejects_non_uint8():
    with pytest.raises(ValueError, match=r"uint8.*float"):
        find_scan_box(np.zeros((50, 50), np.float32))


def test_check_box_and_boxes_csv(tmp_path):
    assert check_box((1, 2, 10, 20), (20, 10), "x") == (1, 2, 10, 20)
    with pytest.raises(ValueError, match=r"img\.png: crop box \(0, 0, 11, 20\) does not fit the 10x20 image"):
        check_box((0, 0, 11, 20), (20, 10), "img.png")
    p = tmp_path / "boxes.csv"
    p.write_text("id,x0,y0,x1,y1\na,1,2,3,4\n")
    assert read_boxes_csv(p) == {"a": (1, 2, 3, 4)}
    p.write_text("id,x0,y0,x1,y1\na,1,2,3,4\na,1,2,3,x\n")
    with pytest.raises(ValueError, match=r"boxes\.csv, line 3: box values must be integers"):
        read_boxes_csv(p)
    p.write_text("id,x0,y0,x1,y1\na,1,2,3,4\na,1,2,3,5\n")
    with pytest.raises(ValueError, match=r"line 3: id 'a' appears twice"):
        read_boxes_csv(p)
    p.write_text("id,left,top\n")
    with pytest.raises(ValueError, match=r"boxes\.csv: expected a header with columns \['id', 'x0'"):
        read_boxes_csv(p)


def test_paste_back_places_crop_prediction():
    # a 2-class logit map on an 8x8 model grid, for a crop of 16 x 24 (W x H) at (5, 3) in a 40 x 30 image
    logits = torch.zeros(2, 8, 8)
    logits[1, 2:4, 4:8] = 5.0  # lesion in the right half of rows 2-3
    out = paste_back(logits, torch.tensor([5, 3, 21, 27]), torch.tensor([30, 40]))
    assert out.shape == (2, 30, 40)
    mask = out.argmax(0)
    ys, xs = torch.nonzero(mask, as_tuple=True)
    # rows 2-3 of 8 -> 6..11 of 24 (+3); columns 4-7 of 8 -> 8..15 of 16 (+5); bilinear edges may add a pixel
    assert ys.min().item() in (8, 9) and ys.max().item() in (14, 15)
    assert xs.min().item() in (12, 13) and xs.max().item() == 20
    assert not mask[:3].any() and not mask[:, :5].any() and not mask[:, 21:].any()


def test_paste_back_nearest_round_trip():
    orig = torch.zeros(30, 40, dtype=torch.long)
    orig[10:18, 12:20] = 1
    box = (4, 6, 36, 30)  # 32 x 24 crop -> model 16 x 12 (exact factor 2)
    crop = orig[6:30, 4:36]
    small = crop[::2, ::2]
    back = paste_back(small, box, (30, 40), mode="nearest")
    assert back.dtype == torch.long and torch.equal(back, orig)
    assert torch.equal(paste_back(small.float(), box, (30, 40), mode="nearest", fill=-1.0)[:6], -torch.ones(6, 40))
    with pytest.raises(ValueError, match="does not fit"):
        paste_back(small, (0, 0, 50, 30), (30, 40))
    with pytest.raises(ValueError, match="prediction must be"):
        paste_back(torch.zeros(1, 2, 4, 4), box, (30, 40))


def test_datamodule_crop_modes_on_synthetic(tmp_path):
    write_synthetic_dataset(tmp_path, num_samples=6, size=128, seed=3)
    boxes = read_boxes_csv(tmp_path / "boxes.csv")
    for crop in ("boxes", "auto", "none"):
        dm = SegmentationDataModule(
            str(tmp_path), image_size=32, batch_size=6, crop=crop, split_fractions=(1, 0, 0), augmentations={}
        )
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        assert batch["image"].shape == (6, 3, 32, 32) and batch["crop_box"].dtype == torch.int64
        for sid, box in zip(batch["id"], batch["crop_box"].tolist(), strict=True):
            if crop == "boxes":
                assert tuple(box) == boxes[sid]
            elif crop == "none":
                assert box == [0, 0, 128, 128]
            else:
                t = boxes[sid]
                assert box[0] <= t[0] and box[1] <= t[1] and box[2] >= t[2] and box[3] >= t[3]
                assert box[0] >= t[0] - 1 and box[1] >= t[1] - 1 and box[2] <= t[2] + 1 and box[3] <= t[3] + 1


def test_boxes_mode_needs_a_box_for_every_id(tmp_path):
    write_synthetic_dataset(tmp_path, num_samples=4, size=64, seed=1)
    rows = (tmp_path / "boxes.csv").read_text().splitlines()
    (tmp_path / "boxes.csv").write_text("\n".join(rows[:-1]) + "\n")  # drop the last id's box
    missing = rows[-1].split(",")[0]
    dm = SegmentationDataModule(str(tmp_path), image_size=32, crop="boxes", split_fractions=(1, 0, 0))
    dm.setup("fit")
    with pytest.raises(KeyError, match=rf"boxes\.csv has no box for 1 ids: \['{missing}'\]"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match=r"data\.crop must be one of \('auto', 'boxes', 'none'\), got 'exact'"):
        SegmentationDataModule(str(tmp_path), crop="exact")


def test_crop_then_paste_back_round_trip_with_an_off_centre_non_square_box(tmp_path):
    """Crop with a 24 x 18 (W x H) box at (7, 4) of a 44 x 30 image, then paste back: pixel values, not shapes.

    Every pixel encodes its position (value = 3 * row + column), so a box read as (y0, x0, y1, x1), a shifted
    offset or swapped axes show up as wrong values. Catches the dataset unpacking the crop box in (y, x) order and
    paste_back placing the crop at a transposed or shifted offset.
    """
    h, w, box = 30, 44, (7, 4, 31, 22)
    image = (3 * np.arange(h)[:, None] + np.arange(w)[None, :]).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[6:16, 11:29] = 255  # inside the box, off its centre (even offsets in the crop: exact at half size)
    mask[1:3, 1:4] = 255  # outside the box: dropped by the crop (with a warning)
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    Image.fromarray(image).save(tmp_path / "images" / "u.png")
    Image.fromarray(mask).save(tmp_path / "masks" / "u.png")
    (tmp_path / "boxes.csv").write_text("id,x0,y0,x1,y1\nu,7,4,31,22\n")
    sample = FolderDataset(tmp_path, ["u"], crop="boxes")[0]  # no transform: the crop at its own size
    assert sample["crop_box"].tolist() == list(box) and sample["orig_size"].tolist() == [h, w]
    crop = (sample["image"][0] * 255).round().to(torch.uint8)
    assert torch.equal(crop, torch.from_numpy(image[4:22, 7:31]))
    assert int(crop[0, 0]) == 3 * 4 + 7 and int(crop[-1, -1]) == 3 * 21 + 30
    assert torch.equal(sample["mask"], torch.from_numpy(mask[4:22, 7:31] > 0).long())
    back = paste_back(sample["mask"], sample["crop_box"], sample["orig_size"], mode="nearest")
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[4:22, 7:31] = True
    assert torch.equal(back, torch.from_numpy(mask > 0).long() * inside)
    # a prediction at half the crop's size (12 x 9) lands on the same pixels of the original
    half = paste_back(sample["mask"][::2, ::2], box, (h, w), mode="nearest")
    assert torch.equal(half, back)
    # the same through the auto crop of a framed, off-centre scan area (values again)
    framed = np.zeros((h, w), np.uint8)
    speckle = np.random.default_rng(0).integers(40, 255, (18, 24), dtype=np.uint8)
    framed[4:22, 7:31] = speckle
    assert find_scan_box(framed) == box


def test_resized_spacing_scales_rows_by_height_and_columns_by_width():
    """A 50 x 40 (W x H) crop at 20 px: rows stretch by 40 / 20, columns by 50 / 20 (DICOM-free, runs everywhere).

    Catches the row and column factors swapped (HD95 and ASD in millimetres would be wrong on non-square crops).
    """
    assert resized_spacing((0.2, 0.1), (20, 10, 70, 50), 20) == pytest.approx((0.2 * 40 / 20, 0.1 * 50 / 20))
    assert resized_spacing(torch.tensor([0.3, 0.3]), torch.tensor([0, 0, 30, 60]), 30) == pytest.approx((0.6, 0.3))
