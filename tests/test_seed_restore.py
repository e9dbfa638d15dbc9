"""SeedEachEpoch (#17): the run's seed travels in the checkpoint and wins on resume; each epoch is reseeded from
``(seed, epoch)``, so an epoch redone after a resume draws what it drew the first time."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from usclip.callbacks import SeedEachEpoch
from usclip.data import SegmentationDataModule
from usclip.data.samplers import derive_seed
from usclip.tasks import SegmentationTask

from .test_data import make_folder

TINY = {"model_name": "usclip-test-vit", "pretrained": None, "layers": [1, 3], "image_size": 64, "embed_dim": 8}


@pytest.fixture(autouse=True)
def _keep_seed_env(monkeypatch):
    """Every test starts without a global seed and leaves the environment as it found it."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    monkeypatch.delenv("PL_GLOBAL_SEED")


def test_checkpoint_seed_wins_over_the_new_processes_seed(caplog):
    """Catches: ``load_state_dict`` keeping the seed this process was started with (``setdefault``)."""
    os.environ["PL_GLOBAL_SEED"] = "7"
    state = SeedEachEpoch().state_dict()
    assert state == {"seed": 7}
    os.environ["PL_GLOBAL_SEED"] = "5"  # the resumed process was started with another seed
    with caplog.at_level(logging.WARNING, logger="usclip.callbacks"):
        SeedEachEpoch().load_state_dict(state)
    assert os.environ["PL_GLOBAL_SEED"] == "7"
    assert "checkpoint's seed 7 (this process was started with seed 5)" in caplog.text
    del os.environ["PL_GLOBAL_SEED"]
    SeedEachEpoch().load_state_dict(state)  # a process started without a seed takes the checkpoint's too
    assert os.environ["PL_GLOBAL_SEED"] == "7"


def test_no_seed_stores_nothing_and_restores_nothing():
    assert SeedEachEpoch().state_dict() == {}
    SeedEachEpoch().load_state_dict({})
    assert "PL_GLOBAL_SEED" not in os.environ


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.random()), float(torch.rand(1))


def test_each_epoch_is_reseeded_from_seed_and_epoch():
    """Epoch ``e`` of seed ``s`` draws as a fresh generator seeded with ``derive_seed(s, e)``: Python, NumPy, torch.

    Catches: the epoch left out of the seed (every epoch would draw the same dropout masks and augmentations).
    """
    os.environ["PL_GLOBAL_SEED"] = "7"
    callback, seen = SeedEachEpoch(), []
    for epoch in (0, 1, 2):
        callback.on_train_epoch_start(SimpleNamespace(current_epoch=epoch), None)  # type: ignore[arg-type]
        draws = _draws()
        seed = derive_seed(7, epoch)
        assert draws == (
            random.Random(seed).random(),
            float(np.random.RandomState(seed).random()),
            float(torch.rand(1, generator=torch.Generator().manual_seed(seed))),
        )
        seen.append(draws)
    assert len(set(seen)) == 3


def test_each_batch_is_reseeded_from_seed_epoch_and_batch():
    """Batch ``b`` of epoch ``e`` draws as a fresh generator seeded with ``derive_seed(s, e, b)`` (mid-epoch resume).

    Catches: the epoch or the batch index left out of the per-batch seed (batch k of every epoch, or every batch
    of an epoch, would draw the same dropout masks).
    """
    os.environ["PL_GLOBAL_SEED"] = "7"
    callback, seen = SeedEachEpoch(), set()
    for epoch, batch in ((0, 0), (0, 1), (1, 0), (2, 3)):
        trainer = SimpleNamespace(current_epoch=epoch)
        callback.on_train_batch_start(trainer, None, None, batch)  # type: ignore[arg-type]
        draws = _draws()
        seed = derive_seed(7, epoch, batch)
        assert draws == (
            random.Random(seed).random(),
            float(np.random.RandomState(seed).random()),
            float(torch.rand(1, generator=torch.Generator().manual_seed(seed))),
        )
        seen.add(draws)
    assert len(seen) == 4


class _RecordDraw(L.Callback):
    """The first random number each training batch would draw (the generator state when the step starts)."""

    def __init__(self) -> None:
        self.draws: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        state = torch.get_rng_state()
        self.draws[trainer.current_epoch] = float(torch.rand(1))
        torch.set_rng_state(state)


def _fit(root: Path, out: Path, seed: int, epochs: int, ckpt: Path | None = None) -> dict[int, float]:
    L.seed_everything(seed)
    record = _RecordDraw()
    trainer = L.Trainer(
        max_epochs=epochs,
        limit_train_batches=1,
        limit_val_batches=0,
        accelerator="cpu",
        default_root_dir=out,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        callbacks=[record],
    )
    dm = SegmentationDataModule(str(root), image_size=64, batch_size=4, augmentations={})
    trainer.fit(SegmentationTask(**TINY), datamodule=dm, ckpt_path=ckpt)
    return record.draws


@pytest.mark.filterwarnings("ignore:.*could not find the monitored key", "ignore:Checkpoint directory .* exists")
def test_resumed_epoch_draws_what_the_uninterrupted_run_drew(tmp_path):
    """Two epochs with seed 7 versus one epoch, then a resume started with seed 5: epoch 2 draws the same."""
    root = make_folder(tmp_path / "d", n=20)
    straight = _fit(root, tmp_path / "straight", seed=7, epochs=2)
    first = _fit(root, tmp_path / "cut", seed=7, epochs=1)
    resumed = _fit(root, tmp_path / "cut", seed=5, epochs=2, ckpt=tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert first == {0: straight[0]} and resumed == {1: straight[1]}
    assert straight[0] != straight[1]
    assert os.environ["PL_GLOBAL_SEED"] == "7"
