"""``last.ckpt`` after every epoch, improved or not; ``best.ckpt`` only when the monitored metric improves (#17).

A segmentation task whose validation reports a scripted Dice (0.6, then a worse 0.4) trains two epochs: ``best.ckpt``
must hold the first epoch and ``last.ckpt`` the second, each with that epoch's weights. Lightning 2.6's
``save_last=True`` writes ``last.ckpt`` only together with a new best, so a resumed run would redo epochs.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from usclip.data import SegmentationDataModule
from usclip.tasks import SegmentationTask

from .test_data import make_folder

TINY = {"model_name": "usclip-test-vit", "pretrained": None, "layers": [1, 3], "image_size": 64, "embed_dim": 8}


class ScriptedDice(SegmentationTask):
    """Logs ``val_dice`` from a script (one value per epoch) instead of measuring it; records each epoch's head."""

    script = (0.6, 0.4)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.heads: list[dict[str, torch.Tensor]] = []

    def on_validation_epoch_end(self) -> None:
        self.val_metrics.reset()
        self.log("val_dice", torch.tensor(self.script[self.current_epoch]))
        if not self.trainer.sanity_checking:
            self.heads.append({k: v.clone() for k, v in self.head.state_dict().items()})


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, ScriptedDice]:
    tmp = tmp_path_factory.mktemp("ckpt")
    root = make_folder(tmp / "d", n=20)
    torch.manual_seed(0)
    task = ScriptedDice(**TINY)
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        default_root_dir=tmp,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    trainer.fit(task, datamodule=SegmentationDataModule(str(root), image_size=64, batch_size=4, augmentations={}))
    return tmp / "checkpoints", task


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_last_holds_the_worse_second_epoch_and_best_the_first(run):
    """Catches: ``last.ckpt`` written only on improvement (it would hold epoch 1), or best chosen by the lowest Dice
    (``monitor_mode: min``: it would hold epoch 2)."""
    folder, task = run
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]
    last, best = _load(folder / "last.ckpt"), _load(folder / "best.ckpt")
    assert (last["epoch"], last["global_step"]) == (1, 2)
    assert (best["epoch"], best["global_step"]) == (0, 1)
    for ckpt, epoch in ((best, 0), (last, 1)):
        head = {k.removeprefix("head."): v for k, v in ckpt["state_dict"].items() if k.startswith("head.")}
        assert head.keys() == task.heads[epoch].keys()
        assert all(torch.equal(head[k], task.heads[epoch][k]) for k in head), epoch
    assert not torch.equal(best["state_dict"]["head.classifier.weight"], last["state_dict"]["head.classifier.weight"])


def test_best_checkpoint_records_the_best_score(run):
    """The best-model callback's state names the first epoch's 0.6 as the best score, the scripted value."""
    folder, _ = run
    states = _load(folder / "last.ckpt")["callbacks"]
    best_states = [s for k, s in states.items() if k.startswith("ModelCheckpoint") and "'monitor': 'val_dice'" in k]
    assert len(best_states) == 1
    assert float(best_states[0]["best_model_score"]) == pytest.approx(0.6)
    assert Path(best_states[0]["best_model_path"]).name == "best.ckpt"
