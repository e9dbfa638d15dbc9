"""usclip from Python as a Lightning user writes it: the Trainer's callbacks are kept, plain dicts are coerced (#23).

Two fits (plain ``lightning.Trainer`` and the real CLI) on a tiny random-weight model; everything else constructs
objects only. See docs/reliability.md, "Callbacks you pass".
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from usclip.cli import main
from usclip.data import SegmentationDataModule
from usclip.data.captions import CaptionDataModule, CaptionSource
from usclip.data.datamodules import SyntheticSpec
from usclip.tasks import SegmentationTask

from .test_data import make_folder

TINY = {"model_name": "usclip-test-vit", "pretrained": None, "layers": [1, 3], "image_size": 64, "embed_dim": 8}
CONF = Path(__file__).parent / "conf" / "segmentation_none.yaml"


def _stops_at_the_second_validation() -> EarlyStopping:
    # the first validation improves on +inf; no later one can improve by 1e9: stops after epoch 1 of 5
    return EarlyStopping(monitor="val_loss", patience=0, min_delta=1e9, check_on_train_epoch_end=False)


def _trainer(tmp: Path, callbacks: list, max_epochs: int = 5) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        default_root_dir=tmp,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        callbacks=callbacks,
    )


# ------------------------------------------------------------------ callbacks passed to the Trainer are kept
def test_the_users_checkpoint_and_early_stopping_are_kept_beside_best_and_last(tmp_path):
    root = make_folder(tmp_path / "d", n=12)
    mine = ModelCheckpoint(dirpath=tmp_path / "mine", filename="mine-{epoch}", save_top_k=-1)
    stop = _stops_at_the_second_validation()
    torch.manual_seed(0)
    task = SegmentationTask(**TINY)
    trainer = _trainer(tmp_path, [mine, stop])
    data = SegmentationDataModule(str(root), image_size=64, batch_size=4, augmentations={})
    trainer.fit(task, datamodule=data)

    assert stop.stopped_epoch == 1 and trainer.current_epoch == 2  # the user's EarlyStopping stopped the run
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["mine-epoch=0.ckpt", "mine-epoch=1.ckpt"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1  # usclip's last.ckpt (what --ckpt_path last resumes) is still written every epoch
    # each ModelCheckpoint's state under its own key: the user's (monitor None, every epoch) is not usclip's "last"
    states = {k: v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint")}
    assert len(states) == 3 and mine.state_key in states
    assert Path(states[mine.state_key]["best_model_path"]).parent == tmp_path / "mine"
    assert trainer.checkpoint_callback is mine  # trainer.test(ckpt_path="best") uses the user's best

    trainer.validate(task, datamodule=data)  # a second run with this Trainer repeats nothing
    checkpoints = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert len(checkpoints) == 3 and checkpoints[0] is mine
    assert [c for c in trainer.callbacks if isinstance(c, EarlyStopping)] == [stop]


def test_without_callbacks_usclip_replaces_lightnings_default_checkpoint():
    task = SegmentationTask(**TINY)
    trainer = _trainer(Path("."), [])
    assert [type(c) for c in trainer.checkpoint_callbacks] == [ModelCheckpoint]  # Lightning's default, for now
    task.trainer = trainer
    returned = task.configure_callbacks()
    assert sorted(c.filename for c in returned if isinstance(c, ModelCheckpoint)) == ["best", "last"]
    assert not any(isinstance(c, EarlyStopping) for c in returned)  # early_stopping_patience=None: none


def test_early_stopping_set_twice_is_refused_naming_both(tmp_path):
    task = SegmentationTask(**TINY, early_stopping_patience=3)
    task.trainer = _trainer(tmp_path, [EarlyStopping(monitor="val_dice", mode="max")])
    with pytest.raises(ValueError, match=r"early_stopping_patience=3 and the callback EarlyStopping.*null"):
        task.configure_callbacks()
    alone = SegmentationTask(**TINY, early_stopping_patience=3)  # usclip's own, patience 3 on the task's monitor
    alone.trainer = _trainer(tmp_path, [])
    (stopping,) = [c for c in alone.configure_callbacks() if isinstance(c, EarlyStopping)]
    assert (stopping.patience, stopping.monitor, stopping.mode) == (3, "val_dice", "max")


def test_the_cli_keeps_trainer_callbacks(tmp_path):
    """``--trainer.callbacks`` on the real CLI: the user's checkpoint files and stop, and usclip's best/last."""
    cli = main(
        [
            "fit",
            "--config",
            str(CONF),
            f"--data.init_args.root={tmp_path / 'data'}",
            "--data.init_args.synthetic.num_samples=12",
            "--data.init_args.synthetic.size=64",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=5",
            "--trainer.limit_train_batches=1",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.callbacks+=ModelCheckpoint",
            "--trainer.callbacks.filename=mine-{epoch}",
            "--trainer.callbacks.save_top_k=-1",
            "--trainer.callbacks+=EarlyStopping",
            "--trainer.callbacks.monitor=val_loss",
            "--trainer.callbacks.patience=0",
            "--trainer.callbacks.min_delta=1e9",
            "--trainer.callbacks.check_on_train_epoch_end=false",
        ]
    )
    assert cli.trainer.current_epoch == 2  # stopped by the user's EarlyStopping, not after 5 epochs
    run = tmp_path / "runs" / "segmentation_none" / "version_0" / "checkpoints"
    names = sorted(p.name for p in run.iterdir())
    assert names == ["best.ckpt", "last.ckpt", "mine-epoch=0.ckpt", "mine-epoch=1.ckpt"], names


def test_the_cli_refuses_early_stopping_twice_before_building_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(SegmentationTask, "configure_models", _must_not_build)
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "fit",
                "--config",
                str(CONF),
                f"--data.init_args.root={tmp_path}",
                "--model.init_args.early_stopping_patience=4",
                "--trainer.callbacks+=EarlyStopping",
                "--trainer.callbacks.monitor=val_dice",
            ]
        )
    assert exc.value.code == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("usclip: error:")]
    assert "early_stopping_patience=4 and the callback EarlyStopping" in line
    assert "--model.init_args.early_stopping_patience null" in line


def _must_not_build(self) -> None:
    raise AssertionError("the model was built before the error")


# ------------------------------------------------------------------ plain dicts where dataclasses are expected
def test_a_dict_for_synthetic_becomes_a_synthetic_spec(tmp_path):
    data = SegmentationDataModule(str(tmp_path / "syn"), image_size=64, synthetic={"num_samples": 3, "size": 48})
    assert data.synthetic == SyntheticSpec(num_samples=3, size=48)
    data.prepare_data()  # asdict() of the spec: failed on the dict before
    assert len(list((tmp_path / "syn" / "images").iterdir())) == 3


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"num_sample": 3}, r"data.synthetic: unknown key 'num_sample' \(did you mean 'num_samples'\?\); the keys "),
        ({"colour": 1}, r"unknown key 'colour'; the keys of SyntheticSpec are: num_samples, size, seed, malig"),
        (3, r"data.synthetic must be a SyntheticSpec or a mapping of its fields, got int: 3"),
    ],
)
def test_a_bad_synthetic_is_refused_at_construction(tmp_path, value, message):
    with pytest.raises(TypeError, match=message):
        SegmentationDataModule(str(tmp_path), synthetic=value)


def test_caption_sources_as_dicts_are_coerced_or_refused(tmp_path):
    (tmp_path / "pairs.csv").write_text("image,caption\na.png,x\n")
    data = CaptionDataModule(sources=[{"name": "pmc", "captions": str(tmp_path / "pairs.csv")}])
    assert data.sources == [CaptionSource(name="pmc", captions=str(tmp_path / "pairs.csv"))]
    with pytest.raises(TypeError, match=r"data.sources\[1\]: unknown key 'captionz' \(did you mean 'captions'\?\)"):
        CaptionDataModule(sources=[{"name": "a", "captions": "x.csv"}, {"name": "b", "captionz": "y.csv"}])
    with pytest.raises(TypeError, match=r"data.sources\[0\]: missing key 'name'"):
        CaptionDataModule(sources=[{"captions": "x.csv"}])
