"""Datasets, transforms, splits and DataModules on small hand-made folders."""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from usclip.data import ClassificationDataModule, SegmentationDataModule
from usclip.data.cache import SampleCache
from usclip.data.captions import CaptionDataset, CaptionPair, read_captions
from usclip.data.datasets import FolderDataset, encode_labels, read_csv_column
from usclip.data.layouts import index_busi_release, index_dataset
from usclip.data.splits import groups_across_splits, read_split_file, split_ids, subsample_ids, write_splits
from usclip.data.transforms import SeededCompose, build_augmentations, build_transform

from .dicom_files import us_dataset


def make_folder(root: Path, n: int = 20, size: tuple[int, int] = (40, 50), labels: bool = True) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["id,label"]
    for i in range(n):
        img = rng.integers(0, 255, size, dtype=np.uint8)
        mask = np.zeros(size, np.uint8)
        mask[10:20, 10 + i % 5 : 30] = 255
        Image.fromarray(img).save(root / "images" / f"s{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"s{i:02d}.png")
        rows.append(f"s{i:02d},{'malignant' if i % 4 == 0 else 'benign'}")
    if labels:
        (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


# ------------------------------------------------------------------ splits
def test_split_keeps_groups_together_and_stratifies():
    ids = [f"x{i:03d}" for i in range(200)]
    groups = {i: f"g{int(i[1:]) // 4}" for i in ids}  # 50 groups of 4
    labels = {i: int(int(i[1:]) // 4 % 5 == 0) for i in ids}  # 20 % positive, constant within groups
    s = split_ids(ids, (0.8, 0.1, 0.1), seed=1, groups=groups, labels=labels)
    assert sorted(s["train"] + s["val"] + s["test"]) == ids
    where = {i: k for k, v in s.items() for i in v}
    for g in set(groups.values()):
        assert len({where[i] for i in ids if groups[i] == g}) == 1
    assert [len(s[k]) for k in ("train", "val", "test")] == [160, 20, 20]
    for k in ("train", "val", "test"):
        assert sum(labels[i] for i in s[k]) / len(s[k]) == pytest.approx(0.2)
    assert split_ids(ids, seed=1, groups=groups, labels=labels) == s
    assert split_ids(ids, seed=2, groups=groups, labels=labels) != s


def test_a_mixed_group_is_stratified_by_its_majority_label():
    """A group of two benign scans and one malignant scan is split as a benign group (docs/data.md).

    Catches a group's stratum taken from its highest (or any other than the most common) label.
    """
    ids = [f"x{i:03d}" for i in range(60)]
    groups = {i: f"g{int(i[1:]) // 3}" for i in ids}  # 20 groups of 3
    mixed = {i: int(int(i[1:]) % 3 == 0 and int(i[1:]) < 30) for i in ids}  # groups 0-9: one malignant of three
    majority = dict.fromkeys(ids, 0)
    pure = {i: int(int(i[1:]) >= 45) for i in ids}  # groups 15-19 malignant
    for seed in range(3):
        expected = split_ids(ids, seed=seed, groups=groups, labels={i: majority[i] | pure[i] for i in ids})
        assert split_ids(ids, seed=seed, groups=groups, labels={i: mixed[i] | pure[i] for i in ids}) == expected


@pytest.mark.parametrize("fractions", [(0.8, 0.2), (0.8, -0.1, 0.3), (0, 0, 0)])
def test_split_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        split_ids(["a", "b"], fractions)


def test_split_files_round_trip(tmp_path):
    write_splits({"train": ["a", "b"], "test": ["c"]}, tmp_path)
    assert read_split_file(tmp_path / "train.txt") == ["a", "b"]
    assert read_split_file(tmp_path / "test.txt") == ["c"]
    assert not list(tmp_path.glob("*.tmp"))


# ------------------------------------------------------------------ labels and datasets
def test_encode_labels_names_and_errors():
    idx, names = encode_labels({"a": "malignant", "b": "benign"}, None)
    assert names == ["benign", "malignant"] and idx == {"a": 1, "b": 0}
    idx, names = encode_labels({"a": "1", "b": "0"}, None)
    assert idx == {"a": 1, "b": 0} and names == ["0", "1"]
    with pytest.raises(ValueError, match="normal"):
        encode_labels({"a": "normal"}, ["benign", "malignant"])


def test_read_csv_column_names_missing_column(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("name,label\na,1\n")
    with pytest.raises(ValueError, match=r"labels.csv.*'id'"):
        read_csv_column(p, "label")


def test_folder_dataset_sample(tmp_path):
    root = make_folder(tmp_path / "d")
    labels, _ = encode_labels(read_csv_column(root / "labels.csv", "label"), None)
    ds = FolderDataset(root, ["s00", "s01"], labels, build_transform(32))
    s = ds[1]
    assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
    assert float(s["image"].min()) >= 0.0 and float(s["image"].max()) <= 1.0
    assert torch.equal(s["image"][0], s["image"][2])
    assert s["mask"].shape == (32, 32) and set(s["mask"].unique().tolist()) <= {0, 1} and s["mask"].sum() > 0
    assert s["label"].item() == 0 and s["id"] == "s01" and s["index"].item() == 1
    assert s["orig_size"].tolist() == [40, 50]


def test_folder_dataset_missing_files(tmp_path):
    root = make_folder(tmp_path / "d", n=2)
    with pytest.raises(FileNotFoundError, match="s99"):
        FolderDataset(root, ["s99"])
    (root / "masks" / "s01.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"no mask.*s01"):
        FolderDataset(root, ["s00", "s01"])


def test_mask_size_mismatch_is_named(tmp_path):
    root = make_folder(tmp_path / "d", n=1)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "s00.png")
    with pytest.raises(ValueError, match=r"s00\.png"):
        FolderDataset(root, ["s00"])[0]


def test_resize_is_area_for_images_and_nearest_for_masks():
    """The resize to the input size: OpenCV area interpolation for the image, nearest neighbour for the mask.

    Catches the mask resized with linear interpolation (a 1-pixel stripe pattern turns into averages) and the
    image resized with another filter.
    """
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (45, 70), dtype=np.uint8)
    mask = np.zeros((45, 70), np.uint8)
    mask[:, ::2] = 1  # one-pixel stripes
    mask[30:, :] = 0
    out = build_transform(28)(image=image, mask=mask)
    np.testing.assert_array_equal(out["image"], cv2.resize(image, (28, 28), interpolation=cv2.INTER_AREA))
    np.testing.assert_array_equal(out["mask"], cv2.resize(mask, (28, 28), interpolation=cv2.INTER_NEAREST))


def test_augmentations_from_names():
    (flip,) = build_augmentations({"HorizontalFlip": {"p": 1.0}})
    img = np.arange(16, dtype=np.uint8).reshape(4, 4)
    assert np.array_equal(flip(image=img)["image"], img[:, ::-1])
    out = build_transform(4, {"HorizontalFlip": {"p": 1.0}}, seed=0)(image=img)
    assert np.array_equal(out["image"], img[:, ::-1])
    # the list form keeps every entry in order, the same transform twice included (two flips cancel out)
    both = build_transform(4, [{"HorizontalFlip": {"p": 1.0}}, {"VerticalFlip": {"p": 1.0}}], seed=0)
    assert np.array_equal(both(image=img)["image"], img[::-1, ::-1])
    twice = build_augmentations([{"HorizontalFlip": {"p": 1.0}}, {"HorizontalFlip": {"p": 1.0}}])
    assert len(twice) == 2 and np.array_equal(SeededCompose(twice)(image=img)["image"], img)
    with pytest.raises(ValueError, match="NotATransform"):
        build_augmentations({"NotATransform": {}})
    with pytest.raises(ValueError, match="HorizontalFlip"):
        build_augmentations({"HorizontalFlip": {"nope": 1}})


# ------------------------------------------------------------------ DataModules
def test_datamodule_split_and_batches(tmp_path):
    root = make_folder(tmp_path / "d", n=20)
    dm = SegmentationDataModule(str(root), image_size=32, batch_size=4, augmentations={})
    dm.setup("fit")
    assert sum(len(v) for v in dm.splits.values()) == 20
    assert [len(dm.splits[k]) for k in ("train", "val", "test")] == [16, 2, 2]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["mask"].shape == (4, 32, 32)
    assert dm.num_classes == 2
    # the split travels through state_dict (checkpoints)
    other = SegmentationDataModule(str(root), image_size=32, split_seed=7)
    other.load_state_dict(dm.state_dict())
    other.setup("test")
    assert other.splits == dm.splits


def test_datamodule_keeps_groups_csv_together_and_follows_split_seed(tmp_path):
    """``<root>/groups.csv`` reaches the split (synthetic twin of the real-data BUSI test) and so does split_seed.

    Catches the DataModule splitting without the groups of ``groups.csv`` and ignoring ``data.split_seed``.
    """
    root = make_folder(tmp_path / "d", n=20)
    ids = [f"s{i:02d}" for i in range(20)]
    groups = {i: f"p{k // 4}" for k, i in enumerate(ids)}  # 5 patients of 4 images
    (root / "groups.csv").write_text("id,group\n" + "".join(f"{i},{g}\n" for i, g in groups.items()))
    labels = {i: int(k % 4 == 0) for k, i in enumerate(ids)}
    splits = {}
    for seed in (0, 1, 2):
        dm = SegmentationDataModule(str(root), image_size=32, split_fractions=(0.6, 0.2, 0.2), split_seed=seed)
        dm.setup("fit")
        assert dm._index is not None and dm._index.groups == groups
        assert [len(dm.splits[k]) for k in ("train", "val", "test")] == [12, 4, 4]
        assert groups_across_splits(dm.splits, groups) == {}
        assert dm.splits == split_ids(ids, (0.6, 0.2, 0.2), seed=seed, groups=groups, labels=labels)
        splits[seed] = dm.splits
    assert splits[0] != splits[1] or splits[0] != splits[2]


def test_default_input_is_224_and_only_training_is_augmented(tmp_path):
    """Defaults: samples at 224 x 224 (the paper's size); augmentations on the training split only.

    With a flip of probability 1, training samples are the mirrored area-resized image and validation and test
    samples the plain one. Catches a default size other than 224 and augmentations applied at evaluation.
    """
    root = make_folder(tmp_path / "d", n=20)
    dm = SegmentationDataModule(
        str(root),
        batch_size=4,
        crop="none",
        split_fractions=(0.5, 0.25, 0.25),
        augmentations={"HorizontalFlip": {"p": 1.0}},
    )
    dm.setup("fit")

    def plain(sid: str) -> torch.Tensor:
        grey = np.asarray(Image.open(root / "images" / f"{sid}.png"))
        return torch.from_numpy(cv2.resize(grey, (224, 224), interpolation=cv2.INTER_AREA)).float() / 255

    for loader, flipped in ((dm.train_dataloader(), True), (dm.val_dataloader(), False), (dm.test_dataloader(), False)):
        batch = next(iter(loader))
        assert batch["image"].shape == (4, 3, 224, 224) and batch["mask"].shape == (4, 224, 224)
        for sid, image in zip(batch["id"], batch["image"], strict=True):
            expected = plain(sid).flip(-1) if flipped else plain(sid)
            torch.testing.assert_close(image[0], expected, rtol=0, atol=0)


def test_predefined_test_split_and_train_fraction(tmp_path):
    root = make_folder(tmp_path / "d", n=20)
    (root / "test.txt").write_text("s00\ns01\ns02\ns03\n")
    dm = ClassificationDataModule(str(root), image_size=32, train_fraction=0.5)
    dm.setup("fit")
    assert dm.splits["test"] == ["s00", "s01", "s02", "s03"]
    assert not set(dm.splits["test"]) & set(dm.splits["train"] + dm.splits["val"])
    n_trainval = 16  # split 8:2 into train and val (the paper's rule with a predefined test set)
    assert len(dm.splits["val"]) in (3, 4)
    assert len(dm.splits["train"]) == round(0.5 * (n_trainval - len(dm.splits["val"])))
    assert dm.num_classes == 2 and dm.label_names == ["benign", "malignant"]
    assert Counter(dm._labels.values()) == Counter({0: 15, 1: 5})


def test_classification_requires_labels(tmp_path):
    root = make_folder(tmp_path / "d", n=4, labels=False)
    with pytest.raises(FileNotFoundError, match=r"labels\.csv"):
        ClassificationDataModule(str(root)).setup("fit")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="train_fraction"):
        SegmentationDataModule("x", train_fraction=0.0)
    with pytest.raises(ValueError, match="root"):
        SegmentationDataModule(None).setup("fit")


# ------------------------------------------------------------------ layouts: BUSI release == generic folder
def make_busi_pair(tmp_path: Path) -> tuple[Path, Path]:
    """The same 5 tiny BUSI-like cases written in the release layout (RGB, split masks) and the generic layout."""
    rng = np.random.default_rng(3)
    release, generic = tmp_path / "Dataset_BUSI_with_GT", tmp_path / "generic"
    (generic / "images").mkdir(parents=True)
    (generic / "masks").mkdir()
    rows = ["id,label"]
    cases = [("benign", 1, 1), ("benign", 2, 3), ("benign", 10, 1), ("malignant", 1, 2), ("malignant", 7, 1)]
    for cls, n, parts in cases:
        gray = rng.integers(20, 255, (24, 30), dtype=np.uint8)
        masks = []
        for k in range(parts):
            m = np.zeros((24, 30), np.uint8)
            m[2 + 6 * k : 6 + 6 * k, 3 + k : 12 + k] = 255
            masks.append(m)
        folder = release / cls
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).save(folder / f"{cls} ({n}).png")
        for k, m in enumerate(masks):
            suffix = "_mask" if k == 0 else f"_mask_{k}"
            Image.fromarray(m > 0).save(folder / f"{cls} ({n}){suffix}.png")  # 1-bit, as released
        sid = f"{cls}_{n:03d}"
        Image.fromarray(gray).save(generic / "images" / f"{sid}.png")
        Image.fromarray(np.maximum.reduce(masks)).save(generic / "masks" / f"{sid}.png")
        rows.append(f"{sid},{cls}")
    (generic / "labels.csv").write_text("\n".join(rows) + "\n")
    (release / "normal").mkdir()
    Image.fromarray(np.zeros((24, 30), np.uint8)).save(release / "normal" / "normal (1).png")
    Image.fromarray(np.zeros((24, 30), bool)).save(release / "normal" / "normal (1)_mask.png")
    return release, generic


def test_busi_release_reader_equals_generic_reader(tmp_path):
    release, generic = make_busi_pair(tmp_path)
    a, b = index_dataset(release), index_dataset(generic)
    assert a.layout == "busi" and b.layout == "folder"
    assert a.ids == b.ids == ["benign_001", "benign_002", "benign_010", "malignant_001", "malignant_007"]
    assert a.labels == b.labels and len(a.masks["benign_002"]) == 3
    assert [p.name for p in a.masks["benign_002"]] == [
        "benign (2)_mask.png",
        "benign (2)_mask_1.png",
        "benign (2)_mask_2.png",
    ]
    labels, _ = encode_labels(a.labels, None)
    ds_a = FolderDataset(release, a.ids, labels, build_transform(16), index=a)
    ds_b = FolderDataset(generic, b.ids, labels, build_transform(16), index=b)
    for i in range(len(a.ids)):
        sa, sb = ds_a[i], ds_b[i]
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor):  # spacing is NaN (unknown) in both
                torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, equal_nan=True)
            else:
                assert sa[key] == sb[key]
    # normal/ only on request; the DataModule reads the release directly
    assert "normal_001" in index_busi_release(release, include_normal=True).ids
    dm = ClassificationDataModule(str(release), image_size=16, split_fractions=(0.6, 0.2, 0.2))
    dm.setup("fit")
    assert dm.label_names == ["benign", "malignant"] and sum(len(v) for v in dm.splits.values()) == 5


def test_busi_release_bad_names(tmp_path):
    release, _ = make_busi_pair(tmp_path)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(release / "benign" / "benign 3.png")
    with pytest.raises(ValueError, match=r"benign 3\.png: not a BUSI release file name; expected 'benign \(N\)\.png'"):
        index_busi_release(release)
    (release / "benign" / "benign 3.png").unlink()
    (release / "malignant" / "malignant (7)_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 images have no '_mask' file: \['malignant \(7\)\.png'\]"):
        index_busi_release(release)


# ------------------------------------------------------------------ few-shot, predict, external test, cache
def test_subsample_ids_is_stratified_and_seeded():
    ids = [f"x{i:03d}" for i in range(200)]
    labels = {i: int(int(i[1:]) < 50) for i in ids}  # 25 % positive
    for fraction, expected in [(0.01, 2), (0.1, 20), (0.5, 100)]:
        sub = subsample_ids(ids, fraction, seed=0, labels=labels)
        assert len(sub) == expected and set(sub) <= set(ids)
        assert sum(labels[i] for i in sub) == max(1, round(expected * 0.25))
        assert subsample_ids(ids, fraction, seed=0, labels=labels) == sub
    assert subsample_ids(ids, 0.1, seed=1, labels=labels) != subsample_ids(ids, 0.1, seed=0, labels=labels)
    assert subsample_ids(ids, 1.0) == ids
    with pytest.raises(ValueError, match="train_fraction"):
        subsample_ids(ids, 0.0)


def test_predict_defaults_to_the_held_out_test_split(tmp_path):
    root = make_folder(tmp_path / "d", n=20)
    dm = SegmentationDataModule(str(root), image_size=32, batch_size=8)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert sorted(batch["id"]) == dm.splits["test"] and "mask" not in batch


def test_external_test_set_without_root(tmp_path):
    train_root = make_folder(tmp_path / "train", n=20)
    external = make_folder(tmp_path / "external", n=6)
    fitted = ClassificationDataModule(str(train_root), image_size=32)
    fitted.setup("fit")
    dm = ClassificationDataModule(None, image_size=32, test_root=str(external), batch_size=6)
    dm.load_state_dict(fitted.state_dict())  # as `usclip test --ckpt_path` does
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["id"] == [f"s{i:02d}" for i in range(6)]
    assert batch["label"].tolist() == [1, 0, 0, 0, 1, 0]
    with pytest.raises(ValueError, match=r"data\.root is required for 'fit'"):
        dm.setup("fit")


def test_partial_split_files_are_rejected(tmp_path):
    root = make_folder(tmp_path / "d", n=6)
    (root / "train.txt").write_text("s00\n")
    with pytest.raises(ValueError, match=r"found split files \['train\.txt'\]; give all three"):
        SegmentationDataModule(str(root)).setup("fit")


def test_memory_and_disk_cache(tmp_path):
    root = make_folder(tmp_path / "d", n=4)
    cache = SampleCache(max_mb=16, directory=tmp_path / "cache")
    ds = FolderDataset(root, ["s00", "s01"], transform=build_transform(16), crop="auto", cache=cache)
    first = ds[0]
    assert (cache.misses, cache.hits) == (1, 0) and len(list((tmp_path / "cache").rglob("*.npz"))) == 1
    again = ds[0]
    assert (cache.misses, cache.hits) == (1, 1) and torch.equal(first["image"], again["image"])
    # a fresh process-level cache reads the disk entry; a changed file is decoded again
    fresh = SampleCache(max_mb=0, directory=tmp_path / "cache")
    ds2 = FolderDataset(root, ["s00", "s01"], transform=build_transform(16), crop="auto", cache=fresh)
    assert torch.equal(ds2[0]["image"], first["image"]) and (fresh.hits, fresh.misses) == (1, 0)
    Image.fromarray(np.full((40, 50), 7, np.uint8)).save(root / "images" / "s00.png")
    os.utime(root / "images" / "s00.png", ns=(1, 1))
    assert float(ds2[0]["image"].max()) == pytest.approx(7 / 255) and fresh.misses == 1
    # the memory level is bounded
    small = SampleCache(max_mb=3000 / 2**20)  # room for one 40 x 50 image + mask (4000 bytes) is not there
    FolderDataset(root, ["s00", "s01"], cache=small)[0]
    assert len(small) == 0


# ------------------------------------------------------------------ captions
def test_read_captions_csv_jsonl_and_ids(tmp_path):
    root = make_folder(tmp_path / "d", n=3)
    (root / "pairs.csv").write_text('image,caption\nimages/s00.png,"A hypoechoic, oval mass."\nimages/s01.png,Cyst.\n')
    pairs = read_captions(root / "pairs.csv")
    assert pairs == [
        CaptionPair(root / "images" / "s00.png", "A hypoechoic, oval mass."),
        CaptionPair(root / "images" / "s01.png", "Cyst."),
    ]
    lines = [
        '{"image_path": "%s", "text": "Abs path."}' % (root / "images" / "s02.png"),
        "",
        '{"path": "images/s00.png", "caption": "Rel."}',
    ]
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    assert [(p.image.name, p.caption) for p in read_captions(root / "pairs.jsonl")] == [
        ("s02.png", "Abs path."),
        ("s00.png", "Rel."),
    ]
    (root / "captions.csv").write_text(
        "id,caption,label\ns01,Benign findings.,benign\n"
    )  # the BUSI captions.csv layout
    assert read_captions(root / "captions.csv") == [CaptionPair(root / "images" / "s01.png", "Benign findings.")]
    ds = CaptionDataset(read_captions(root / "pairs.csv"), build_transform(16), crop="none")
    s = ds[0]
    assert (
        s["image"].shape == (3, 16, 16)
        and s["caption"] == "A hypoechoic, oval mass."
        and s["crop_box"].tolist() == [0, 0, 50, 40]
    )


@pytest.mark.parametrize(
    ("name", "text", "error", "match"),
    [
        ("a.csv", "file,label\nimages/s00.png,x\n", ValueError, r"a\.csv, line 2: expected an image column"),
        ("a.csv", "image,caption\nimages/s00.png,  \n", ValueError, r"a\.csv, line 2: empty caption"),
        (
            "a.csv",
            "image,caption\nimages/nope.png,x\n",
            FileNotFoundError,
            r"a\.csv, line 2: image .*nope\.png does not exist",
        ),
        ("a.csv", "id,caption\nzz,x\n", FileNotFoundError, r"a\.csv, line 2: id 'zz' has no image"),
        (
            "a.jsonl",
            '{"image": "images/s00.png", "caption": "x"}\n{oops\n',
            ValueError,
            r"a\.jsonl, line 2: not valid JSON",
        ),
        ("a.jsonl", '["images/s00.png", "x"]\n', ValueError, r"a\.jsonl, line 1: expected a JSON object, got list"),
        ("a.txt", "", ValueError, r"a\.txt: captions must be a \.csv or \.jsonl file"),
    ],
)
def test_read_captions_errors(tmp_path, name, text, error, match):
    root = make_folder(tmp_path / "d", n=1)
    (root / name).write_text(text)
    with pytest.raises(error, match=match):
        read_captions(root / name)


# ------------------------------------------------------------------ ultrasound DICOM
def write_us_dicom(
    path: Path,
    pixels: np.ndarray,
    regions: list[tuple[tuple[int, int, int, int], int, float]],
    photometric: str = "MONOCHROME2",
    bits: int = 8,
) -> Path:
    """Write an uncompressed US DICOM; regions are ((x0, y0, x1, y1) inclusive, data type, cm per pixel)."""
    pytest.importorskip("pydicom", reason="DICOM input needs pydicom: pip install 'usclip[dicom]'")
    from pydicom.dataset import Dataset

    ds = us_dataset(*pixels.shape[:2])
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, photometric, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = (8, 8, 7) if bits == 8 else (16, bits, bits - 1)
    ds.PixelData = pixels.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    items = []
    for (x0, y0, x1, y1), data_type, delta in regions:
        r = Dataset()
        r.RegionSpatialFormat, r.RegionDataType, r.RegionFlags = 1, data_type, 0
        r.RegionLocationMinX0, r.RegionLocationMinY0, r.RegionLocationMaxX1, r.RegionLocationMaxY1 = x0, y0, x1, y1
        r.PhysicalUnitsXDirection = r.PhysicalUnitsYDirection = 3  # cm
        r.PhysicalDeltaX, r.PhysicalDeltaY = delta, 2 * delta
        items.append(r)
    ds.SequenceOfUltrasoundRegions = items
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_region_crop_and_spacing(tmp_path):
    from usclip.data.crop import resized_spacing
    from usclip.data.dicom import read_dicom

    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    pixels = np.zeros((60, 80), np.uint8)
    pixels[10:50, 20:70] = 120  # the scan region, without speckle: auto detection alone would also work ...
    pixels[2:6, 2:30] = 255  # ... but burnt-in text next to it must not matter: the region is exact
    mask = np.zeros((60, 80), np.uint8)
    mask[20:30, 30:40] = 255
    # a spectral Doppler strip (data type 3) is larger but not tissue: the tissue region wins
    regions = [((20, 10, 69, 49), 1, 0.01), ((0, 50, 79, 59), 3, 0.05)]
    write_us_dicom(root / "images" / "u1.dcm", pixels, regions)
    Image.fromarray(mask).save(root / "masks" / "u1.png")
    d = read_dicom(root / "images" / "u1.dcm")
    assert d.region == (20, 10, 70, 50) and d.spacing == pytest.approx((0.2, 0.1))
    assert np.array_equal(d.image, pixels)
    s = FolderDataset(root, ["u1"], transform=build_transform(20), crop="auto")[0]
    assert s["crop_box"].tolist() == [20, 10, 70, 50] and s["orig_size"].tolist() == [60, 80]
    assert s["spacing"].tolist() == pytest.approx([0.2, 0.1])
    assert int(s["mask"].sum()) == 5 * 4  # 10 x 10 lesion; crop 50 x 40 (W x H) -> 20 x 20: rows / 2, cols / 2.5
    assert resized_spacing(s["spacing"], s["crop_box"], 20) == pytest.approx((0.2 * 40 / 20, 0.1 * 50 / 20))
    assert FolderDataset(root, ["u1"], crop="none")[0]["crop_box"].tolist() == [0, 0, 80, 60]


def test_dicom_monochrome1_and_16_bit(tmp_path):
    from usclip.data.dicom import read_dicom

    pixels = np.arange(12 * 16, dtype=np.uint16).reshape(12, 16) * 21  # up to 4011: 12-bit data
    write_us_dicom(tmp_path / "a.dcm", pixels, [((0, 0, 15, 11), 1, 0.02)], bits=12)
    d = read_dicom(tmp_path / "a.dcm")
    assert d.image.dtype == np.uint8 and d.image[0, 0] == 0 and d.image[-1, -1] == round(4011 * 255 / 4095)
    write_us_dicom(tmp_path / "b.dcm", np.full((8, 8), 10, np.uint8), [], photometric="MONOCHROME1")
    d = read_dicom(tmp_path / "b.dcm")
    assert (d.image == 245).all() and d.region is None and d.spacing is None


def test_dicom_errors(tmp_path, monkeypatch):
    pytest.importorskip("pydicom", reason="DICOM input needs pydicom: pip install 'usclip[dicom]'")
    from usclip.data.dicom import read_dicom
    from usclip.data.imageio import ImageReadError

    (tmp_path / "bad.dcm").write_bytes(b"not a dicom file at all")
    with pytest.raises(ImageReadError, match=r"bad\.dcm: not a readable DICOM file"):
        read_dicom(tmp_path / "bad.dcm")
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if pydicom were not installed
    with pytest.raises(ImportError, match=r"pip install 'usclip\[dicom\]'"):
        read_dicom(tmp_path / "bad.dcm")


def _write_colour_dicom(path: Path, ybr: np.ndarray, photometric: str, frames: int = 1) -> Path:
    """Uncompressed colour US DICOM from YCbCr samples (frames, H, W, 3); YBR_FULL_422 packs Y0 Y1 Cb Cr."""
    pytest.importorskip("pydicom", reason="DICOM input needs pydicom: pip install 'usclip[dicom]'")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "US"
    _, ds.Rows, ds.Columns, _ = ybr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 3, photometric, 0
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    if frames > 1:
        ds.NumberOfFrames = frames
    if photometric == "YBR_FULL_422":
        pairs = ybr.reshape(frames, ds.Rows, ds.Columns // 2, 2, 3)
        packed = np.stack([pairs[..., 0, 0], pairs[..., 1, 0], pairs[..., 0, 1], pairs[..., 0, 2]], axis=-1)
        ds.PixelData = packed.astype(np.uint8).tobytes()
    else:
        ds.PixelData = ybr.astype(np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("photometric", ["YBR_FULL", "YBR_FULL_422"])
def test_dicom_ycbcr_is_converted_once(tmp_path, photometric):
    """pydicom 3 returns RGB for YCbCr files and keeps the header: converting again gave 171 where 91 is right."""
    from usclip.data.dicom import read_dicom

    grey = np.array([[91, 91, 20, 20, 240, 240], [128, 128, 0, 0, 255, 255], [60, 60, 180, 180, 7, 7]], np.uint8)
    ybr = np.stack([grey, np.full_like(grey, 128), np.full_like(grey, 128)], axis=-1)[None]  # neutral chroma
    d = read_dicom(_write_colour_dicom(tmp_path / "c.dcm", ybr, photometric))
    np.testing.assert_array_equal(d.image, grey)
    # a coloured pixel pair: luminance of the RGB that YCbCr (Y 120, Cb 90, Cr 170) stands for
    ybr2 = np.array([[[[120, 90, 170], [120, 90, 170]]]], np.uint8)
    d2 = read_dicom(_write_colour_dicom(tmp_path / "c2.dcm", ybr2, photometric))
    y, cb, cr = 120.0, 90.0 - 128, 170.0 - 128
    r, g, b = y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb
    expected = 0.299 * np.clip(r, 0, 255) + 0.587 * np.clip(g, 0, 255) + 0.114 * np.clip(b, 0, 255)
    assert abs(int(d2.image[0, 0]) - expected) <= 1.5


def test_dicom_cine_loop_reads_only_its_first_frame(tmp_path, monkeypatch):
    pytest.importorskip("pydicom", reason="DICOM input needs pydicom: pip install 'usclip[dicom]'")
    import pydicom.pixels

    from usclip.data.dicom import read_dicom

    frames = np.stack([np.full((4, 6), v, np.uint8) for v in (30, 140, 250)])
    ybr = np.stack([frames, np.full_like(frames, 128), np.full_like(frames, 128)], axis=-1)
    path = _write_colour_dicom(tmp_path / "loop.dcm", ybr, "YBR_FULL", frames=3)
    calls = []
    real = pydicom.pixels.pixel_array

    def spy(*args, **kwargs):
        calls.append(kwargs.get("index"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pydicom.pixels, "pixel_array", spy)
    d = read_dicom(path)
    assert calls == [0]  # one frame decoded, not the loop
    np.testing.assert_array_equal(d.image, np.full((4, 6), 30, np.uint8))
