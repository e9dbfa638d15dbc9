"""DICOM files with several tissue regions (a dual view): ``regions: largest | all | error``.

Every file is written here with pydicom: two tissue regions of different sizes and anisotropic spacings, the smaller
one first in the sequence, plus a 2-D colour-flow region larger than both and a graphics region, neither tissue.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from usclip.data import SegmentationDataModule
from usclip.data.cache import SampleCache
from usclip.data.datasets import FolderDataset
from usclip.data.imageio import ImageReadError
from usclip.data.layouts import expand_regions, index_folder

from .dicom_files import us_dataset

pytest.importorskip("pydicom", reason="DICOM input needs pydicom: pip install 'usclip[dicom]'")

H, W = 40, 64
# (x0, y0, x1, y1) end exclusive, (row, column) spacing in mm
R0_BOX, R0_SPACING = (2, 4, 22, 28), (0.5, 0.2)  # 20 x 24 = 480 pixels, first in the file
R1_BOX, R1_SPACING = (30, 6, 60, 26), (0.1, 0.4)  # 30 x 20 = 600 pixels: the largest
R0_GREY, R1_GREY = 100, 200


def write_dual_view(path: Path, r1_box: tuple[int, int, int, int] = R1_BOX) -> Path:
    """A 40 x 64 US DICOM holding the two tissue regions above, a colour-flow region and a graphics region."""
    from pydicom.dataset import Dataset

    pixels = np.zeros((H, W), np.uint8)
    for (x0, y0, x1, y1), grey in ((R0_BOX, R0_GREY), (r1_box, R1_GREY)):
        pixels[y0:y1, x0:x1] = grey
    ds = us_dataset(*pixels.shape[:2])
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = pixels.tobytes()
    regions = [
        # (spatial format, data type, box, (row, column) mm); data type 1 = tissue, 2 = colour flow
        (1, 2, (0, 0, W, H), (0.3, 0.3)),  # colour flow over the whole frame: 2-D and larger, but not tissue
        (1, 1, R0_BOX, R0_SPACING),
        (0, 13, (40, 30, 50, 38), (0.0, 0.0)),  # a small non-2-D region, as the ALOKA file has
        (1, 1, r1_box, R1_SPACING),
    ]
    items = []
    for spatial, data_type, (x0, y0, x1, y1), (dy, dx) in regions:
        r = Dataset()
        r.RegionSpatialFormat, r.RegionDataType, r.RegionFlags = spatial, data_type, 0
        r.RegionLocationMinX0, r.RegionLocationMinY0 = x0, y0
        r.RegionLocationMaxX1, r.RegionLocationMaxY1 = x1 - 1, y1 - 1  # the file's corners are inclusive
        r.PhysicalUnitsXDirection = r.PhysicalUnitsYDirection = 3  # cm
        r.PhysicalDeltaX, r.PhysicalDeltaY = dx / 10, dy / 10
        items.append(r)
    ds.SequenceOfUltrasoundRegions = items
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def full_mask() -> np.ndarray:
    """A full-frame mask with a lesion in each region: 4 x 5 pixels in r0, 6 x 3 in r1."""
    mask = np.zeros((H, W), np.uint8)
    mask[10:14, 5:10] = 255  # r0
    mask[8:14, 40:43] = 255  # r1
    return mask


def make_root(root: Path, n_dual: int = 1, n_single: int = 0) -> Path:
    """``images/dual<i>.dcm`` (two tissue regions) and ``images/png<i>.png``, masks and labels for all."""
    rows = ["id,label"]
    for i in range(n_dual):
        write_dual_view(root / "images" / f"dual{i}.dcm")
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(full_mask()).save(root / "masks" / f"dual{i}.png")
        rows.append(f"dual{i},{'malignant' if i % 2 else 'benign'}")
    for i in range(n_single):
        Image.fromarray(np.full((H, W), 50, np.uint8)).save(root / "images" / f"png{i}.png")
        Image.fromarray(full_mask()).save(root / "masks" / f"png{i}.png")
        rows.append(f"png{i},{'malignant' if i % 3 else 'benign'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _region_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "tissue regions" in r.getMessage()]


def test_largest_takes_the_larger_region_and_warns_once_naming_the_other(tmp_path, caplog):
    from usclip.data.dicom import dicom_regions, read_dicom

    path = write_dual_view(tmp_path / "a.dcm")
    with caplog.at_level(logging.WARNING):
        d = read_dicom(path)
        again = read_dicom(path)  # a second read (the next epoch) says nothing more
    assert d.region == again.region == R1_BOX and d.spacing == pytest.approx(R1_SPACING)
    assert [r.box for r in d.regions] == [R0_BOX, R1_BOX]  # tissue only, in file order: the colour flow is not one
    assert [r.spacing for r in d.regions] == [pytest.approx(R0_SPACING), pytest.approx(R1_SPACING)]
    assert [r.item for r in d.regions] == [1, 3]
    assert [r.box for r in dicom_regions(path)] == [R0_BOX, R1_BOX]  # the header alone gives the same regions
    (warning,) = _region_warnings(caplog)
    assert str(path) in warning and "using the largest, r1 box (30, 6, 60, 26)" in warning
    assert "leaving out r0 box (2, 4, 22, 28), spacing 0.5 x 0.2 mm" in warning
    # the dataset crops to the larger region and carries its spacing (row, column)
    (tmp_path / "images").mkdir()
    path.rename(tmp_path / "images" / "a.dcm")
    s = FolderDataset(tmp_path, ["a"], crop="auto", with_masks=False)[0]
    assert s["crop_box"].tolist() == list(R1_BOX) and s["spacing"].tolist() == pytest.approx(R1_SPACING)
    assert s["image"].shape == (3, 20, 30) and float(s["image"].min()) == pytest.approx(R1_GREY / 255)
    # equal areas (the ALOKA dual view): the first in the file
    assert read_dicom(write_dual_view(tmp_path / "eq.dcm", r1_box=(40, 10, 60, 34))).region == R0_BOX
    # reading the whole frame (read_image: overlays, data check) chooses nothing and so warns nothing
    caplog.clear()
    from usclip.data.imageio import read_image

    with caplog.at_level(logging.WARNING):
        assert read_image(write_dual_view(tmp_path / "b.dcm")).shape == (H, W)
    assert _region_warnings(caplog) == []


def test_error_refuses_naming_the_file_and_its_regions(tmp_path):
    from usclip.data.dicom import read_dicom

    root = make_root(tmp_path / "d", n_dual=1, n_single=2)
    path = root / "images" / "dual0.dcm"
    with pytest.raises(ImageReadError, match=r"dual0\.dcm: 2 tissue regions \(r0 box \(2, 4, 22, 28\).*r1 box \(30,"):
        read_dicom(path, regions="error")
    with pytest.raises(ValueError, match=r"regions must be one of \('largest', 'all', 'error'\), got 'both'"):
        read_dicom(path, regions="both")  # type: ignore[arg-type]
    # the DataModule refuses before anything is decoded, naming the file and its regions
    dm = SegmentationDataModule(str(root), image_size=16, regions="error")
    with pytest.raises(
        ValueError, match=r"(?s)data\.regions='error': 1 DICOM files.*dual0\.dcm: r0 box \(2, 4, 22, 28\)"
    ):
        dm.setup("fit")
    with pytest.raises(ValueError, match=r"data\.regions='all' .* needs data\.crop='auto'; got crop='none'"):
        SegmentationDataModule(str(root), regions="all", crop="none")
    with pytest.raises(ValueError, match=r"data\.regions must be one of"):
        SegmentationDataModule(str(root), regions="first")  # type: ignore[arg-type]


def test_all_makes_each_region_a_sample_with_its_box_spacing_mask_and_label(tmp_path, caplog):
    root = make_root(tmp_path / "d", n_dual=1, n_single=1)
    index = expand_regions(index_folder(root), "all")
    assert index.ids == ["dual0@r0", "dual0@r1", "png0"]
    assert index.regions == {"dual0@r0": ("dual0", 0), "dual0@r1": ("dual0", 1)}
    assert index.labels == {"dual0@r0": "benign", "dual0@r1": "benign", "png0": "benign"}
    assert index.groups == {"dual0@r0": "dual0", "dual0@r1": "dual0"}  # one group: one split
    assert index.masks["dual0@r1"] == (root / "masks" / "dual0.png",)
    cache = SampleCache(max_mb=4)  # one file, two regions: two cache entries
    ds = FolderDataset(root, index.ids, crop="auto", index=index, cache=cache, regions="all")
    with caplog.at_level(logging.WARNING):
        r0, r1, png = ds[0], ds[1], ds[2]
    assert _region_warnings(caplog) == [] and not [r for r in caplog.records if "lesion pixels" in r.getMessage()]
    assert (r0["id"], r1["id"]) == ("dual0@r0", "dual0@r1")
    assert r0["crop_box"].tolist() == list(R0_BOX) and r1["crop_box"].tolist() == list(R1_BOX)
    assert r0["spacing"].tolist() == pytest.approx(R0_SPACING) and r1["spacing"].tolist() == pytest.approx(R1_SPACING)
    assert r0["orig_size"].tolist() == r1["orig_size"].tolist() == [H, W]
    assert r0["image"].shape == (3, 24, 20) and r1["image"].shape == (3, 20, 30)  # (C, rows, columns)
    assert torch.all(r0["image"] == R0_GREY / 255) and torch.all(r1["image"] == R1_GREY / 255)
    # the full-frame mask, cropped to each region's box: each sample gets its own lesion, at its place
    assert int(r0["mask"].sum()) == 20 and r0["mask"][10 - 4 : 14 - 4, 5 - 2 : 10 - 2].all()
    assert int(r1["mask"].sum()) == 18 and r1["mask"][8 - 6 : 14 - 6, 40 - 30 : 43 - 30].all()
    assert png["crop_box"].tolist() != list(R0_BOX) and "dual0" not in png["id"]
    assert (cache.misses, len(cache)) == (3, 3)
    # a region id that is already another file's id is refused
    Image.fromarray(np.zeros((H, W), np.uint8)).save(root / "images" / "dual0@r1.png")
    with pytest.raises(ValueError, match=r"'dual0@r1', the id of region r1 of dual0\.dcm, is also the id of dual0@r1"):
        expand_regions(index_folder(root, masks=False), "all")


def test_all_keeps_the_regions_of_a_file_in_one_split(tmp_path):
    root = make_root(tmp_path / "d", n_dual=6, n_single=8)
    dm = SegmentationDataModule(
        str(root), image_size=16, batch_size=4, regions="all", split_fractions=(0.5, 0.25, 0.25)
    )
    dm.setup("fit")
    assert sum(len(v) for v in dm.splits.values()) == 6 * 2 + 8
    for i in range(6):
        holding = [name for name, ids in dm.splits.items() if f"dual{i}@r0" in ids or f"dual{i}@r1" in ids]
        assert len(holding) == 1 and {f"dual{i}@r0", f"dual{i}@r1"} <= set(dm.splits[holding[0]])
    # split files may name the file (all its regions), not one region here and the other there
    (root / "test.txt").write_text("dual0\npng0\n")
    dm = SegmentationDataModule(str(root), image_size=16, regions="all")
    dm.setup("fit")
    assert dm.splits["test"] == ["dual0@r0", "dual0@r1", "png0"]
    for name in ("train", "val"):
        (root / f"{name}.txt").write_text("dual1@r0\n" if name == "train" else "dual1@r1\n")
    with pytest.raises(ValueError, match=r"regions of 1 DICOM files lie in several splits \(e\.g\. \{'dual1': \["):
        SegmentationDataModule(str(root), image_size=16, regions="all").setup("fit")
    # a checkpoint of a regions='largest' run names the file: regions='all' predicts each of its regions
    dm = SegmentationDataModule(str(root), image_size=16, regions="all")
    dm.load_state_dict({"splits": {"train": ["png1"], "val": ["png2"], "test": ["dual3", "png0"]}})
    dm.setup("predict")
    assert dm.predict_dataloader().dataset.ids == ["dual3@r0", "dual3@r1", "png0"]
    # a checkpoint's region ids read with regions='largest' say what to set
    (root / "train.txt").unlink()
    (root / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"dual0@r0.*read them with regions='all'"):
        FolderDataset(root, ["dual0@r0"], crop="auto")


def test_predict_pastes_every_region_into_one_mask_of_the_file(tmp_path):
    from usclip.tasks import PredictionWriter, SegmentationTask

    root = make_root(tmp_path / "d", n_dual=1, n_single=1)
    dm = SegmentationDataModule(None, image_size=16, batch_size=2, predict_root=str(root / "images"), regions="all")
    task = SegmentationTask(model_name="unet", pretrained=None, head="native", image_size=16, normalization="none")

    def left_half_lesion(images: torch.Tensor) -> torch.Tensor:  # lesion in the left half of every crop
        logits = torch.zeros(images.shape[0], 2, 16, 16)
        logits[:, 1, :, :8], logits[:, 1, :, 8:] = 4.0, -4.0  # symmetric: the resized edge falls mid-region
        return logits

    task.forward = left_half_lesion  # type: ignore[method-assign]
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        default_root_dir=tmp_path / "run",
        enable_progress_bar=False,
        callbacks=[PredictionWriter()],  # what `usclip predict` adds: predict_step itself writes nothing
    )
    records = [r for batch in trainer.predict(task, datamodule=dm) for r in batch]
    assert sorted(r.id for r in records) == ["dual0@r0", "dual0@r1", "png0"]
    out = tmp_path / "run" / "predictions"
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["dual0.png", "png0.png"]  # one mask per file
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["dual0.png", "png0.png"]
    assert not (out / ".regions").exists()
    mask = np.asarray(Image.open(out / "masks" / "dual0.png")) > 0
    expected = np.zeros((H, W), bool)
    for x0, y0, x1, y1 in (R0_BOX, R1_BOX):
        expected[y0:y1, x0 : (x0 + x1) // 2] = True  # the left half of each region, at its place in the frame
    assert mask.shape == (H, W) and np.array_equal(mask, expected)
