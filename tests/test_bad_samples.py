"""Files that turn bad during a run, and full disks (docs/reliability.md, "Bad files and full disks").

- ``on_bad_sample: raise`` (default): the run stops naming the file; ``last.ckpt`` of the earlier epoch loads.
- ``on_bad_sample: skip``: the sample leaves its batch, is logged once and counted (``results/bad_samples.json``,
  ``skipped_samples`` in ``test_metrics.json``), also across DataLoader workers; more than ``max_bad_fraction``
  stops the run naming the share and the limit.
- ENOSPC while writing a checkpoint, a results file or a prediction: a clear error; the previous file is
  byte-identical and no temporary file is left.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from tests.test_reliability import _args
from usclip._io import DiskFullError, atomic_path, write_csv_atomic, write_text_atomic
from usclip.callbacks import AtomicCheckpointIO
from usclip.cli import main
from usclip.data import SegmentationDataModule
from usclip.data.bad_samples import (
    BAD_SAMPLES_KEY,
    BadSample,
    BadSampleCounter,
    BadSampleError,
    TooManyBadSamplesError,
    collate_skipping_bad,
)
from usclip.data.datasets import FolderDataset
from usclip.data.synthetic import write_synthetic_dataset
from usclip.data.transforms import build_transform
from usclip.tasks import ClassificationTask, SegmentationTask
from usclip.visualize import save_png


def make_folder(root: Path, n: int = 8, size: tuple[int, int] = (24, 32)) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(root / "images" / f"s{i}.png")
        mask = np.zeros(size, np.uint8)
        mask[4:12, 4 + i : 20] = 255
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
    return root


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ------------------------------------------------------------------ the dataset: raise or mark
@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncate", r"images/s2\.png: cannot read the image"),
        ("delete", r"s2\.png"),
        ("replace", r"masks/s2\.png: mask is 32x24 but its image is 10x10"),  # another picture, another size
        ("text", r"images/s2\.png: cannot read the image"),
    ],
)
def test_bad_file_raises_naming_it_or_is_marked(tmp_path, damage, reason):
    root = make_folder(tmp_path / "d")
    ds = FolderDataset(root, [f"s{i}" for i in range(8)], transform=build_transform(16))
    image = root / "images" / "s2.png"
    if damage == "truncate":
        truncate(image)
    elif damage == "delete":
        image.unlink()
    elif damage == "replace":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(image)
    else:
        image.write_text("<html>503 Service Unavailable</html>")
    with pytest.raises(BadSampleError, match=rf"bad sample 's2' \(index 2, image .*s2\.png\): .*{reason}") as info:
        ds[2]
    assert "on_bad_sample: skip" in str(info.value)
    assert ds[3]["image"].shape == (3, 16, 16)  # the others still load

    ds.on_bad_sample = "skip"
    marker = ds[2]
    assert isinstance(marker, BadSample) and (marker.index, marker.id, marker.path) == (2, "s2", str(image))
    assert "s2.png" in marker.reason


def test_collate_drops_bad_samples_and_hands_them_on(tmp_path):
    root = make_folder(tmp_path / "d", n=4)
    ds = FolderDataset(root, ["s0", "s1", "s2", "s3"], transform=build_transform(16), on_bad_sample="skip")
    truncate(root / "images" / "s1.png")
    batch = collate_skipping_bad([ds[i] for i in range(4)])
    assert batch["id"] == ["s0", "s2", "s3"] and batch["image"].shape == (3, 3, 16, 16)
    assert batch["index"].tolist() == [0, 2, 3]
    assert [b.id for b in batch[BAD_SAMPLES_KEY]] == ["s1"]
    only_bad = collate_skipping_bad([ds[1]])
    assert list(only_bad) == [BAD_SAMPLES_KEY]  # nothing to train on: the tasks skip this batch


def test_counter_counts_distinct_files_and_enforces_the_share(caplog):
    counter = BadSampleCounter(max_fraction=0.2)
    counter.set_size("train", 10)
    a, b, c = (BadSample(i, f"s{i}", f"/d/s{i}.png", "truncated") for i in range(3))
    with caplog.at_level(logging.WARNING, logger="usclip"):
        assert counter.record("train", [a, a]) is True
        assert counter.record("train", [a]) is False  # seen before: not counted or logged again (next epoch)
        counter.record("train", [b])  # 2 of 10 = 20 %: at the limit, allowed
    assert counter.skipped("train") == 2 and caplog.text.count("s0.png") == 1
    with pytest.raises(
        TooManyBadSamplesError,
        match=r"3 of 10 train samples \(30\.0%\) were skipped as bad files, more than "
        r"data\.init_args\.max_bad_fraction=0\.2 \(20\.0%\); first: \['/d/s0\.png', '/d/s1\.png', '/d/s2\.png'\]",
    ):
        counter.record("train", [c])
    assert counter.summary()["train"]["files"] == {f"/d/s{i}.png": "truncated" for i in range(3)}


def test_workers_hand_their_skips_to_the_main_process(tmp_path):
    """Two DataLoader workers: every good test image is served once, every bad one counted once, in any worker."""
    root = make_folder(tmp_path / "d", n=12)
    for name in ("test.txt", "val.txt", "train.txt"):
        ids = {"test.txt": range(0, 8), "val.txt": range(8, 10), "train.txt": range(10, 12)}[name]
        (root / name).write_text("".join(f"s{i}\n" for i in ids))
    dm = SegmentationDataModule(
        str(root), image_size=16, batch_size=3, num_workers=2, on_bad_sample="skip", max_bad_fraction=0.5, crop="none"
    )
    dm.setup("test")
    for i in (1, 5, 6):
        truncate(root / "images" / f"s{i}.png")
    served = []
    for batch in dm.test_dataloader():
        assert all(isinstance(b, BadSample) for b in batch[BAD_SAMPLES_KEY])
        batch = dm.on_before_batch_transfer(batch, 0)  # the main process: counts and drops the markers
        assert BAD_SAMPLES_KEY not in batch
        served += batch.get("id", [])
    assert served == ["s0", "s2", "s3", "s4", "s7"]
    summary = dm.bad_samples.summary()["unknown"]  # no trainer: the split is not known
    assert summary["skipped"] == 3 and sorted(Path(p).name for p in summary["files"]) == ["s1.png", "s5.png", "s6.png"]


def test_skipping_keeps_order_and_augmentations_a_function_of_seed_and_epoch(tmp_path):
    """A redone epoch (a resume) serves the same samples with the same augmentations, the bad one left out."""
    root = make_folder(tmp_path / "d", n=12)
    for name, ids in (("train.txt", range(0, 8)), ("val.txt", range(8, 10)), ("test.txt", range(10, 12))):
        (root / name).write_text("".join(f"s{i}\n" for i in ids))
    truncate(root / "images" / "s3.png")

    def epoch(e: int) -> list[tuple[list[str], torch.Tensor]]:
        dm = SegmentationDataModule(str(root), image_size=16, batch_size=3, on_bad_sample="skip", crop="none")
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(e)
        return [(b["id"], b["image"]) for b in map(lambda b: dm.on_before_batch_transfer(b, 0), loader)]

    first, again, other = epoch(1), epoch(1), epoch(2)
    assert [ids for ids, _ in first] == [ids for ids, _ in again]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, again, strict=True))
    assert [ids for ids, _ in first] != [ids for ids, _ in other]  # another epoch, another order
    served = sorted(i for ids, _ in first for i in ids)
    assert "s3" not in served and len(served) in (5, 6)  # 8 - 1 bad, minus the dropped tail of the last batch


def test_bad_sample_options_are_checked():
    with pytest.raises(ValueError, match=r"data\.on_bad_sample must be one of \('raise', 'skip'\), got 'ignore'"):
        SegmentationDataModule("x", on_bad_sample="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"data\.max_bad_fraction must be a share in \[0, 1\].*got 1\.5"):
        SegmentationDataModule("x", max_bad_fraction=1.5)


# ------------------------------------------------------------------ end to end with the CLI
class DamageAtEpoch(Callback):
    """Test helper: at the start of training epoch ``epoch``, truncate the images named in ``files``."""

    def __init__(self, epoch: int, files: list[str]) -> None:
        self.epoch = epoch
        self.files = files

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            for f in self.files:
                truncate(Path(f))


def _splits(tmp_path: Path) -> dict[str, list[str]]:
    """The tiny config's split (24 synthetic images, 8:1:1, split seed 0), with the data written."""
    write_synthetic_dataset(tmp_path / "data", num_samples=24, size=96, seed=0)
    dm = SegmentationDataModule(str(tmp_path / "data"), image_size=64)
    dm.setup("fit")
    return dm.splits


def test_a_file_going_bad_between_epochs_stops_the_run_and_keeps_last_ckpt(tmp_path):
    splits = _splits(tmp_path)
    images = [str(tmp_path / "data" / "images" / f"{i}.png") for i in splits["train"]]
    damage = json.dumps([{"class_path": f"{__name__}.DamageAtEpoch", "init_args": {"epoch": 1, "files": images}}])
    # the memory cache stays on: a changed file (size, mtime) is read again, not served from the cache
    with pytest.raises(BadSampleError) as info:
        main(["fit", *_args(tmp_path, "raise", "--trainer.max_epochs=2"), f"--trainer.callbacks={damage}"])
    text = str(info.value)
    assert "bad sample" in text and str(tmp_path / "data" / "images") in text and "cannot read the image" in text
    last = tmp_path / "runs" / "raise" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True, map_location="cpu")
    assert saved["epoch"] == 0 and saved["global_step"] == 2  # epoch 0's checkpoint, whole


def test_skip_counts_bad_files_in_the_results_and_caps_their_share(tmp_path):
    splits = _splits(tmp_path)
    bad_train, bad_test = splits["train"][0], splits["test"][0]
    for i in (bad_train, bad_test):
        truncate(tmp_path / "data" / "images" / f"{i}.png")
    # one batch holds the whole split (no dropped tail): every sample is served, the bad one leaves it
    whole = ("--data.init_args.batch_size=32", "--trainer.limit_val_batches=null")
    skip = ("--data.init_args.on_bad_sample=skip", "--data.init_args.max_bad_fraction=0.5", *whole)
    cli = main(["fit", *_args(tmp_path, "skip", *skip)])
    run = Path(cli.trainer.log_dir)
    assert cli.trainer.global_step == 1
    report = json.loads((run / "results" / "bad_samples.json").read_text())
    assert report["on_bad_sample"] == "skip" and report["max_bad_fraction"] == 0.5
    train = report["splits"]["train"]
    assert train["skipped"] == 1 and list(train["files"]) == [str(tmp_path / "data" / "images" / f"{bad_train}.png")]
    assert train["samples"] == len(splits["train"]) and train["share"] == pytest.approx(1 / len(splits["train"]))

    last = f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    cli = main(["test", *_args(tmp_path, "skip", *skip), last])
    metrics = json.loads((Path(cli.trainer.log_dir) / "results" / "test_metrics.json").read_text())
    assert metrics["skipped_samples"] == 1 and metrics["num_images"] == len(splits["test"]) - 1

    # the default limit (1 %): one bad file of the test split is too many
    with pytest.raises(TooManyBadSamplesError) as info:
        main(["test", *_args(tmp_path, "strict", "--data.init_args.on_bad_sample=skip", *whole), last])
    n = len(splits["test"])
    assert f"1 of {n} test samples ({1 / n:.1%})" in str(info.value)
    assert "max_bad_fraction=0.01 (1.0%)" in str(info.value) and f"{bad_test}.png" in str(info.value)


@pytest.mark.parametrize("task", [SegmentationTask, ClassificationTask])
def test_tasks_skip_a_batch_whose_samples_were_all_bad(task):
    only_markers = {BAD_SAMPLES_KEY: []}  # what is left of a batch of bad files once the markers are counted
    nobody = object()  # the guard returns before the task is touched
    assert task.training_step(nobody, only_markers, 0) is None  # Lightning: no optimiser update
    assert task.validation_step(nobody, only_markers, 0) is None
    assert task.test_step(nobody, only_markers, 0) is None
    assert task.predict_step(nobody, only_markers, 0) == []


# ------------------------------------------------------------------ disk full
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _assert_intact(path: Path, before: bytes) -> None:
    assert path.read_bytes() == before  # byte-identical
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left


def test_disk_full_while_writing_a_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 0, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def half_then_full(checkpoint, filepath):  # writes half the new checkpoint, then the disk is full
        Path(filepath).write_bytes(before[: len(before) // 2])
        _enospc()

    monkeypatch.setattr("lightning.fabric.plugins.io.torch_io._atomic_save", half_then_full)
    with pytest.raises(DiskFullError) as info:
        io.save_checkpoint({"epoch": 1, "w": torch.zeros(3)}, path)
    text = str(info.value)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert f"disk full (ENOSPC) while writing the checkpoint {path}" in text
    assert "the previous version is unchanged" in text and str(path.parent) in text
    _assert_intact(path, before)
    assert torch.load(path, weights_only=True)["epoch"] == 0


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_disk_full_while_writing_results(tmp_path, monkeypatch, where):
    path = tmp_path / "results" / "test_metrics.json"
    write_text_atomic(path, '{"dice": 0.5}\n')
    before = path.read_bytes()
    if where == "fsync":
        monkeypatch.setattr(os, "fsync", _enospc)
    elif where == "replace":
        monkeypatch.setattr(os, "replace", _enospc)
    with pytest.raises(DiskFullError, match=rf"disk full \(ENOSPC\) while writing the file {path}"):
        if where == "write":  # half the new file is written, then the disk is full
            with atomic_path(path) as tmp:
                tmp.write_text('{"di')
                _enospc()
        else:
            write_csv_atomic(path, ["dice"], [[0.7]])  # CSV and JSON results go through write_text_atomic
    _assert_intact(path, before)


def test_disk_full_before_the_temporary_file_exists(tmp_path, monkeypatch):
    path = tmp_path / "results" / "test_metrics.json"
    path.parent.mkdir()
    monkeypatch.setattr("tempfile.mkstemp", lambda *a, **k: _enospc())
    with pytest.raises(DiskFullError, match=r"no partial file was left"):
        write_text_atomic(path, "{}")
    assert not path.exists()


def test_disk_full_while_writing_a_prediction(tmp_path, monkeypatch):
    path = tmp_path / "predictions" / "masks" / "a.png"
    save_png(np.full((4, 6), 255, np.uint8), path)
    before = path.read_bytes()
    original = Image.Image.save

    def full_half_way(self, fp, *args, **kwargs):
        original(self, fp, *args, **kwargs)
        Path(fp).write_bytes(Path(fp).read_bytes()[:20])  # a partial PNG, then the disk is full
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(Image.Image, "save", full_half_way)
    with pytest.raises(DiskFullError, match=rf"disk full \(EDQUOT\) while writing the file {path}"):
        save_png(np.zeros((4, 6), np.uint8), path)
    _assert_intact(path, before)


def test_other_write_errors_pass_through_unchanged(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError) as info:
        write_text_atomic(path, "x")
    assert info.value.errno == errno.EIO and not isinstance(info.value, DiskFullError)
    with pytest.raises(KeyboardInterrupt), atomic_path(path):
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
