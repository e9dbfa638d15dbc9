"""The data pipeline on the real BUSI and DDTI copies in ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from usclip.cli import main
from usclip.data import SegmentationDataModule
from usclip.data.crop import find_scan_box
from usclip.data.duplicates import find_duplicates, group_ids, group_pairs, precision_recall
from usclip.data.imageio import read_image, read_mask
from usclip.data.layouts import index_dataset, read_csv_column
from usclip.data.splits import groups_across_splits, read_split_file

pytestmark = pytest.mark.realdata

CONF = Path(__file__).parent / "conf" / "segmentation_lora.yaml"


def label_shares(ids: list[str], labels: dict[str, str]) -> float:
    return sum(labels[i] == "malignant" for i in ids) / len(ids)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_busi_group_aware_split(shared_data, seed):
    root = shared_data / "BUSI"
    dm = SegmentationDataModule(str(root), split_seed=seed)
    dm.setup("fit")
    splits = dm.splits
    index = index_dataset(root)
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == index.ids  # every image, once
    assert groups_across_splits(splits, index.groups) == {}  # no duplicate group spans two splits
    sizes = [len(splits[k]) / len(index.ids) for k in ("train", "val", "test")]
    assert sizes == pytest.approx([0.8, 0.1, 0.1], abs=0.01)
    shares = [label_shares(splits[k], index.labels) for k in ("train", "val", "test")]
    assert max(shares) - min(shares) <= 0.03, shares  # label proportions within 3 points


def test_busi_samples_at_224(shared_data):
    dm = SegmentationDataModule(str(shared_data / "BUSI"), batch_size=8, augmentations={})
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (8, 3, 224, 224) and batch["mask"].shape == (8, 224, 224)
    assert set(batch["mask"].unique().tolist()) == {0, 1}
    h, w = batch["orig_size"].T
    x0, y0, x1, y1 = batch["crop_box"].T
    assert ((x0 >= 0) & (y0 >= 0) & (x1 <= w) & (y1 <= h) & (x1 > x0) & (y1 > y0)).all()


def test_crop_on_busi_and_ddti_keeps_lesions(shared_data):
    removed = {}
    for name in ("BUSI", "DDTI"):
        index = index_dataset(shared_data / name)
        fractions = []
        for sid in index.ids[:: len(index.ids) // 20][:20]:
            image = read_image(index.images[sid])
            x0, y0, x1, y1 = find_scan_box(image)
            fractions.append(1 - (x1 - x0) * (y1 - y0) / image.size)
            mask = read_mask(index.masks[sid], image.shape)
            assert mask[y0:y1, x0:x1].sum() == mask.sum(), sid  # the lesion is never cut
        removed[name] = float(np.mean(fractions))
    assert removed["BUSI"] < 0.05  # already cropped by its authors: little to remove
    assert 0.1 < removed["DDTI"] < 0.5  # black borders, scanner text and bars around the scan


@pytest.mark.slow
def test_busi_duplicate_finder_recovers_groups(shared_data):
    root = shared_data / "BUSI"
    index = index_dataset(root, masks=False)
    found = group_pairs(group_ids(index.ids, find_duplicates(index.images)))
    precision, recall = precision_recall(found, group_pairs(read_csv_column(root / "groups.csv", "group")))
    assert precision >= 0.95 and recall >= 0.9, (precision, recall)


@pytest.mark.slow
def test_busi_split_written_at_fit_is_the_one_test_uses(shared_data, tmp_path):
    args = [
        "--config",
        str(CONF),
        f"--data.init_args.root={shared_data / 'BUSI'}",
        "--data.init_args.synthetic=null",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=2",
    ]
    cli = main(["fit", *args])
    run = Path(cli.trainer.log_dir)
    fit_splits = {s: read_split_file(run / "splits" / f"{s}.txt") for s in ("train", "val", "test")}
    assert len(fit_splits["test"]) == pytest.approx(65, abs=3)
    # another split seed on the command line must not change the test set: the checkpoint carries the split
    best = run / "checkpoints" / "last.ckpt"
    cli = main(["test", *args, f"--ckpt_path={best}", "--data.init_args.split_seed=99"])
    test_run = Path(cli.trainer.log_dir)
    assert test_run != run
    assert read_split_file(test_run / "splits" / "test.txt") == fit_splits["test"]
    with (test_run / "results" / "test_per_image.csv").open() as f:
        assert sorted(r["id"] for r in csv.DictReader(f)) == fit_splits["test"]
    groups = read_csv_column(shared_data / "BUSI" / "groups.csv", "group")
    assert not Counter(groups[i] for i in fit_splits["test"]).keys() & {groups[i] for i in fit_splits["train"]}
