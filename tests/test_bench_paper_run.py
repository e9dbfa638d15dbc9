"""bench/paper_run.py's phase accounting and usclip.callbacks.PhaseTimer (no timing assertions on speed).

The phases must partition the wall time: each present and non-negative, their sum equal to the wall time within
``SLACK_S`` (rounding of the JSON values to milliseconds, eight phases). The end-to-end run through the CLI is
slow (two processes); its fast twin runs the callback in process on a tiny fit.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from usclip.callbacks import PhaseTimer
from usclip.data import SegmentationDataModule
from usclip.tasks import SegmentationTask

from .test_data import make_folder

REPO = Path(__file__).resolve().parents[1]
#: eight phases rounded to 1 ms each
SLACK_S = 0.01
TINY = {"model_name": "usclip-test-vit", "pretrained": None, "layers": [1, 3], "image_size": 64, "embed_dim": 8}


def _bench():
    spec = importlib.util.spec_from_file_location("paper_run", REPO / "bench" / "paper_run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_split_phases_gives_each_gap_to_the_innermost_phase():
    """Catches: a checkpoint inside a validation counted twice, data wait taken from the wrong side of a step,
    or the time after the last event dropped."""
    bench = _bench()
    events = [
        ["setup", "mark", 1.0],  # 0-1: startup
        ["validation", "begin", 2.0],  # 1-2: startup
        ["checkpoint", "begin", 2.5],  # 2-2.5: validation
        ["checkpoint", "end", 3.25],  # 0.75 checkpoint
        ["validation", "end", 4.0],  # 0.75 validation
        ["epoch", "begin", 4.5],  # startup
        ["train_step", "begin", 6.0],  # 1.5 data
        ["train_step", "end", 9.0],  # 3 train
        ["epoch", "end", 9.5],  # 0.5 other
        ["teardown", "mark", 10.0],  # 0.5 other
    ]
    phases = bench.split_phases(events, 0.0, 12.0)
    assert phases == {
        "startup": 2.5,
        "data": 1.5,
        "train_steps": 3.0,
        "validation": 1.25,
        "checkpoint": 0.75,
        "other": 1.0,
        "teardown": 2.0,
        "test": 0.0,
    }
    with pytest.raises(ValueError, match="train_step end at 2 closes epoch"):
        bench.split_phases([["epoch", "begin", 1], ["train_step", "end", 2]], 0.0, 3.0)
    with pytest.raises(ValueError, match="outside the process"):
        bench.split_phases([["setup", "mark", 5.0]], 0.0, 3.0)


def _check_partition(phases: dict[str, float], wall: float, names: tuple[str, ...]) -> None:
    assert tuple(phases) == names
    assert all(v >= 0.0 for v in phases.values()), phases
    assert sum(phases.values()) == pytest.approx(wall, abs=SLACK_S)


def test_phase_timer_in_process_partitions_the_fit(tmp_path):
    """Fast twin of the CLI run: a tiny fit with the callback; its events split into phases that sum to the
    wall time, with a step per training batch, checkpoint writes timed and the JSON beside the run."""
    bench = _bench()
    root = make_folder(tmp_path / "d", n=20)
    torch.manual_seed(0)
    timer = PhaseTimer()
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=1,
        accelerator="cpu",
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="run", version="v"),
    )
    start = time.time()
    dm = SegmentationDataModule(str(root), image_size=64, batch_size=4, augmentations={})
    trainer.fit(SegmentationTask(**TINY), datamodule=dm)
    end = time.time()
    written = json.loads((tmp_path / "run" / "v" / "results" / "phases_fit.json").read_text())
    assert written["stage"] == "fit" and written["train_images"] == 2 * 2 * 4
    kinds = [tuple(e[:2]) for e in written["events"]]
    assert kinds.count(("train_step", "begin")) == kinds.count(("train_step", "end")) == 4
    assert kinds.count(("validation", "begin")) == 3  # the sanity check and one per epoch
    assert kinds.count(("checkpoint", "begin")) >= 2  # last.ckpt after each epoch
    phases = bench.split_phases(written["events"], start, end)
    _check_partition(phases, end - start, bench.PHASES)
    for name in ("startup", "data", "train_steps", "validation", "checkpoint", "teardown"):
        assert phases[name] > 0.0, name
    assert trainer.save_checkpoint.__name__ == "save_checkpoint" and not hasattr(trainer.save_checkpoint, "__wrapped__")


@pytest.mark.slow
def test_paper_run_tiny_one_epoch_through_the_cli(tmp_path):
    """The whole benchmark: ``usclip fit`` then ``usclip test`` in processes of their own, one epoch, tiny model."""
    bench = _bench()
    out = tmp_path / "run.json"
    tiny = ["--model", "tiny", "--epochs", "1", "--images", "40", "--image-px", "96", "--precision", "32-true"]
    result = bench.main(
        [*tiny, "--accelerator", "cpu", "--num-workers", "0", "--out", str(out), "--loader-workers", "0"]
    )
    assert json.loads(out.read_text()) == result
    _check_partition(result["phases_s"], result["wall_s"], bench.PHASES)
    assert all(result["phases_s"][name] > 0 for name in ("startup", "train_steps", "validation", "test"))
    assert result["epochs"] == 1 and result["validations"] == 2  # sanity check + the epoch's
    assert result["train_steps"] == 1 and result["train_images"] == 32  # 32 of ~32 training images, drop_last
    assert result["configs"] == ["configs/busi_seg.yaml", "configs/adapters/mona.yaml"]
    assert sum(result["test_detail_s"].values()) == pytest.approx(result["phases_s"]["test"], abs=SLACK_S)
    assert result["loader"][0]["workers"] == 0 and len(result["loader"][0]["images_per_s_by_epoch"]) == 2


def test_paper_configs_follow_the_sweep():
    """The configs are the sweep's for BUSI CLIP (Mona) under each protocol, and the protocol's length is read."""
    bench = _bench()
    authors = bench.paper_configs("authors")
    assert [Path(c).relative_to(REPO).as_posix() for c in authors] == [
        "configs/busi_seg.yaml",
        "configs/augment/reference.yaml",
        "configs/metrics/authors.yaml",
        "configs/adapters/mona_released.yaml",
        "configs/heads/authors_release.yaml",
        "configs/training/authors_segmentation.yaml",
    ]
    assert bench.composed(authors, "trainer")["max_epochs"] == 1000
    assert bench.composed(bench.paper_configs("usclip"), "trainer")["max_epochs"] == 200
    with pytest.raises(SystemExit):
        bench.parse_args(["--epochs", "0"])
