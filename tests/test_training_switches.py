"""Training switches that undo differences from the authors' code: cosine floor, Dice options, focal activation,
best-checkpoint metric, and the overlays that set them (configs/training/)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from monai.losses import DiceCELoss, FocalLoss

import usclip.precision
from usclip.callbacks import ValidateOnEpochs
from usclip.cli import main
from usclip.data import SegmentationDataModule
from usclip.tasks import ClassificationTask, SegmentationTask

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "model_name": "usclip-test-vit",
    "pretrained": None,
    "adapter": None,
    "layers": [1, 3],
    "image_size": 64,
    "embed_dim": 16,
}


def _schedule(task, total: int) -> list[float]:
    task.trainer = SimpleNamespace(estimated_stepping_batches=total)  # what configure_optimizers reads
    conf = task.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_cosine_decays_to_min_lr_like_cosine_annealing():
    torch.manual_seed(0)
    task = SegmentationTask(**TINY, lr=3e-4, min_lr=2e-5)
    lrs = _schedule(task, 12)
    # torch's CosineAnnealingLR(T_max=total, eta_min) in closed form, stepped per iteration as the authors do
    expected = [2e-5 + (3e-4 - 2e-5) * 0.5 * (1 + math.cos(math.pi * t / 12)) for t in range(12)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    default = _schedule(SegmentationTask(**TINY, lr=3e-4), 12)
    assert default[6] == pytest.approx(3e-4 * 0.5, rel=1e-9) and default[-1] < lrs[-1]


def test_min_lr_above_lr_is_refused():
    task = SegmentationTask(**TINY, lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match=r"min_lr=0.001 must be in \[0, lr=0.0001\]"):
        _schedule(task, 4)


def test_dice_options_reach_monai():
    logits = torch.randn(2, 2, 12, 20)  # non-square
    target = (torch.rand(2, 1, 12, 20) > 0.7).long()
    for squared, smooth in ((False, 1e-5), (True, 1e-8)):
        task = SegmentationTask(**TINY, dice_squared_pred=squared, dice_smooth=smooth)
        reference = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=squared, smooth_nr=smooth, smooth_dr=smooth)
        assert torch.allclose(task.criterion(logits, target), reference(logits, target), atol=0, rtol=0)
    plain = SegmentationTask(**TINY).criterion(logits, target)
    squared = SegmentationTask(**TINY, dice_squared_pred=True).criterion(logits, target)
    assert not torch.allclose(plain, squared)


def test_focal_activation_and_best_metric():
    logits = torch.tensor([[2.0, -1.0], [0.3, 0.9], [-1.5, 1.0]])
    label = torch.tensor([0, 1, 1])
    for activation in ("softmax", "sigmoid"):
        task = ClassificationTask(**TINY, focal_activation=activation, gamma=2.0)
        reference = FocalLoss(to_onehot_y=True, use_softmax=activation == "softmax", gamma=2.0)
        assert torch.equal(task._loss(logits, label), reference(logits, label.view(-1, 1)))
    soft = ClassificationTask(**TINY)._loss(logits, label)
    sig = ClassificationTask(**TINY, focal_activation="sigmoid")._loss(logits, label)
    assert not torch.allclose(soft, sig)
    assert ClassificationTask(**TINY).monitor == "val_auc"
    task = ClassificationTask(**TINY, best_by="acc")
    assert task.monitor == "val_acc"
    best = [c for c in task.configure_callbacks() if getattr(c, "filename", None) == "best"]
    assert best and best[0].monitor == "val_acc" and best[0].mode == "max"
    with pytest.raises(ValueError, match="focal_activation must be 'softmax' or 'sigmoid', got 'tanh'"):
        ClassificationTask(**TINY, focal_activation="tanh")
    with pytest.raises(ValueError, match="best_by must be 'auc' or 'acc'"):
        ClassificationTask(**TINY, best_by="f1")


SEG_LOSS = {"dice_squared_pred": True, "dice_smooth": 1e-8, "min_lr": 1e-8}
CLS_LOSS = {"focal_activation": "sigmoid", "best_by": "acc", "min_lr": 1e-8}
#: per overlay: the tiny config it follows, the resolved model arguments, max_epochs
AUTHORS_LOOPS = {
    # paper release (release:clip_seg.py:47/148, release:clip_cls.py:48/149): 1000 epochs, no early stopping
    "authors_segmentation": ("segmentation_none", {**SEG_LOSS, "early_stopping_patience": None}, 1000, False),
    "authors_classification": ("classification_lora", {**CLS_LOSS, "early_stopping_patience": None}, 1000, False),
    # later src/ scripts (later:scripts/baselines.sh:16, later:src/models/clip/segmentation.py:66/197): 200, patience 15
    "authors_src_segmentation": ("segmentation_none", {**SEG_LOSS, "early_stopping_patience": 15}, 200, True),
    "authors_src_classification": ("classification_lora", {**CLS_LOSS, "early_stopping_patience": 15}, 200, True),
}


def _authors_cli(tmp_path, overlay: str, *extra: str):
    config = AUTHORS_LOOPS[overlay][0]
    args = ["--config", str(REPO / "tests" / "conf" / f"{config}.yaml"), "--trainer.precision=bf16-mixed"]  # as paper
    args += ["--config", str(REPO / "configs" / "training" / f"{overlay}.yaml")]
    args += [f"--data.init_args.root={tmp_path}", f"--trainer.default_root_dir={tmp_path}"]
    return main([*args, *extra], run=False)


class _RecordValidation(L.Callback):
    def __init__(self) -> None:
        self.epochs: list[int] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.epochs.append(trainer.current_epoch)


class _Constant(L.LightningModule):
    """One weight, one sample per epoch; validation logs ``monitor`` = 0.5 every time (it never improves)."""

    def __init__(self, monitor: str, callbacks: list[L.Callback]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.monitor, self.schedule = monitor, callbacks
        self.data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(1, 1)), batch_size=1)

    def training_step(self, batch, batch_idx):
        return (self.w * batch[0]).sum() ** 2

    def validation_step(self, batch, batch_idx) -> None:
        self.log(self.monitor, 0.5)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def configure_callbacks(self) -> list[L.Callback]:
        return self.schedule

    def train_dataloader(self):
        return self.data

    def val_dataloader(self):
        return self.data


def _epochs_validated(task, max_epochs: int, folder=None) -> tuple[list[int], int]:
    """Run ``task``'s own schedule and early-stopping callbacks (and checkpoints, with a ``folder``) on
    :class:`_Constant`: the epochs validated, the epochs run."""
    kinds = (ValidateOnEpochs, EarlyStopping, *((ModelCheckpoint,) if folder else ()))
    callbacks = [c for c in task.configure_callbacks() if isinstance(c, kinds)]
    record = _RecordValidation()
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        default_root_dir=folder,
        logger=False,
        enable_checkpointing=folder is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[record],
    )
    trainer.fit(_Constant(task.monitor, callbacks))
    return record.epochs, trainer.current_epoch


@pytest.mark.parametrize("overlay", list(AUTHORS_LOOPS))
def test_authors_training_overlays(tmp_path, monkeypatch, overlay):
    """Each overlay resolves to its loop: losses, floor, length, the validation schedule, stopping, and fp32 over the
    paper configs' bf16-mixed (on a machine with native bf16, where usclip would keep bf16)."""
    monkeypatch.setattr(usclip.precision, "cpu_has_native_bf16", lambda: True)
    _, expected, epochs, last = AUTHORS_LOOPS[overlay]
    cli = _authors_cli(tmp_path, overlay)
    for key, value in expected.items():
        assert cli.model.hparams[key] == value, key
    assert (cli.model.hparams["validate_every"], cli.model.hparams["validate_last_epoch"]) == (10, last)
    assert cli.trainer.max_epochs == epochs
    assert cli.trainer.precision == "32-true"  # both loops run CLIP in float32 without autocast
    schedule = [c for c in cli.model.configure_callbacks() if isinstance(c, ValidateOnEpochs)]
    validated = [e for e in range(epochs) if schedule[0].validates(e, epochs)]
    assert validated == [*range(10, epochs, 10), *([epochs - 1] if last else [])]  # 0-based, as their loops count
    stoppers = [c for c in cli.model.configure_callbacks() if isinstance(c, EarlyStopping)]
    assert [s.patience for s in stoppers] == ([] if expected["early_stopping_patience"] is None else [15])
    # 22 epochs under the overlay's own callbacks: after epochs 10 and 20 (not 9, 19 and 21 as Lightning's
    # check_val_every_n_epoch=10 would), and after the last one, 21, in the later loop only
    assert _epochs_validated(cli.model, 22) == ([10, 20, 21] if last else [10, 20], 22)


def test_early_stopping_counts_validations_not_epochs():
    """Patience 2, validation after epochs 2, 4, 6, ... and a metric that never improves: the run stops after the
    third validation, epoch 6, as the later loop's counter does (later:src/models/clip/segmentation.py:228-249).

    Catches: early stopping judged at every training epoch end (with stale metrics it would stop after epoch 4, or
    fail on the missing metric before the first validation).
    """
    task = SegmentationTask(**TINY, validate_every=2, validate_last_epoch=True, early_stopping_patience=2)
    assert _epochs_validated(task, 12) == ([2, 4, 6], 7)


def test_last_checkpoint_after_every_epoch_best_after_validations(tmp_path):
    """Validation after epoch 2 of 0-3 only: ``last.ckpt`` holds epoch 3, which had no validation, ``best.ckpt`` the
    validated epoch 2. Catches: ``last.ckpt`` waiting for a validation end (it would hold epoch 2)."""
    task = SegmentationTask(**TINY, validate_every=2)
    assert _epochs_validated(task, 4, tmp_path) == ([2], 4)
    saved = {p.stem: torch.load(p, map_location="cpu", weights_only=True) for p in (tmp_path / "checkpoints").iterdir()}
    assert {name: ckpt["epoch"] for name, ckpt in saved.items()} == {"last": 3, "best": 2}


@pytest.mark.slow
def test_a_real_run_validates_on_the_authors_epochs(tmp_path):
    """The same through ``usclip fit``'s own task and data (tiny model, 12 epochs of one batch): validation after
    epoch 10 only under the release loop (about 10 s on 2 busy cores; the fast twin above runs the same callbacks)."""
    tiny = ["--trainer.max_epochs=12", "--trainer.limit_train_batches=1", "--trainer.num_sanity_val_steps=0"]
    tiny += ["--trainer.enable_checkpointing=false", "--trainer.logger=false", "--model.init_args.num_overlays=0"]
    tiny += ["--data.init_args.num_workers=0"]
    cli = _authors_cli(tmp_path, "authors_segmentation", *tiny)
    record = _RecordValidation()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert record.epochs == [10]


def test_validation_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match="every must be a positive number of epochs, got 0"):
        SegmentationTask(**TINY, validate_every=0)
    with pytest.raises(ValueError, match="validate_last_epoch=True needs validate_every"):
        SegmentationTask(**TINY, validate_last_epoch=True)
    schedule = ValidateOnEpochs(10)
    assert [e for e in range(1000) if schedule.validates(e, 1000)] == list(range(10, 1000, 10))  # 99, never 0 or 999


# ------------------------------------------------------------------------------------------- losses by hand (#17)
def test_dice_and_ce_terms_carry_their_own_weights():
    """Dice + CE against a hand computation with unequal weights.

    Catches: ``lambda_ce`` read from ``lambda_dice`` (or the two swapped), and sigmoid instead of softmax.
    """
    torch.manual_seed(3)
    logits = torch.randn(2, 2, 6, 10)  # non-square
    target = (torch.rand(2, 6, 10) > 0.6).long()
    task = SegmentationTask(**TINY, lambda_dice=0.25, lambda_ce=3.0)
    prob = logits.softmax(1)
    onehot = torch.stack([target == 0, target == 1], 1).float()
    smooth = 1e-5
    dice = 1 - (2 * (prob * onehot).sum((2, 3)) + smooth) / (prob.sum((2, 3)) + onehot.sum((2, 3)) + smooth)
    ce = -(logits.log_softmax(1) * onehot).sum(1).mean()
    expected = 0.25 * dice.mean() + 3.0 * ce
    torch.testing.assert_close(task._loss(logits, target), expected, rtol=1e-6, atol=1e-7)


def _focal_by_hand(logits: torch.Tensor, label: torch.Tensor, gamma: float, alpha: float | None, softmax: bool):
    """MONAI's focal loss written out: one term per (image, class), mean over all of them."""
    terms = []
    for row, y in zip(logits.tolist(), label.tolist(), strict=True):
        if softmax:
            z = [math.exp(v) for v in row]
            for k in range(len(row)):
                p = z[k] / sum(z)
                weight = 1.0 if alpha is None else (alpha if k > 0 else 1 - alpha)
                terms.append(-weight * (1 - p) ** gamma * math.log(p) if k == y else 0.0)
        else:
            for k, v in enumerate(row):
                p = 1 / (1 + math.exp(-v))
                pt = p if k == y else 1 - p
                weight = 1.0 if alpha is None else (alpha if k == y else 1 - alpha)
                terms.append(-weight * (1 - pt) ** gamma * math.log(pt))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize(("gamma", "alpha"), [(2.0, None), (0.5, None), (1.5, 0.8)])
def test_focal_loss_equals_a_hand_computation(activation, gamma, alpha):
    """Focal loss values for three images, by hand: ``-alpha_t (1 - p_t)^gamma log p_t``.

    Catches: gamma ignored (fixed at 2), alpha applied to the negative class (``1 - alpha``), softmax and sigmoid
    confused, a wrong default gamma.
    """
    logits = torch.tensor([[2.0, -1.0], [0.3, 0.9], [-1.5, 1.0]], dtype=torch.float64)
    label = torch.tensor([0, 1, 0])
    task = ClassificationTask(**TINY, focal_activation=activation, gamma=gamma, alpha=alpha)
    expected = _focal_by_hand(logits, label, gamma, alpha, activation == "softmax")
    assert float(task._loss(logits, label)) == pytest.approx(expected, rel=1e-6)
    if (gamma, alpha, activation) == (2.0, None, "softmax"):  # the defaults
        assert float(ClassificationTask(**TINY)._loss(logits, label)) == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------- optimiser (#17)
def test_adamw_gets_the_papers_settings_and_only_trainable_parameters():
    """AdamW: lr 1e-4, betas (0.9, 0.95), weight decay 1e-2 by default; the values given are used; only tensors
    with ``requires_grad`` go in, and a task with none is refused.

    Catches: torch's default betas (0.9, 0.999), weight decay 1e-4, the frozen encoder handed to the optimiser.
    """
    task = SegmentationTask(**TINY)
    task.trainer = SimpleNamespace(estimated_stepping_batches=10)
    opt = task.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert (group["initial_lr"], group["betas"], group["weight_decay"]) == (1e-4, (0.9, 0.95), 1e-2)
    trainable = {id(p) for p in task.parameters() if p.requires_grad}
    assert {id(p) for p in group["params"]} == trainable
    assert trainable == {id(p) for p in task.head.parameters()}  # adapter: null, so the head only
    assert len(group["params"]) < len(list(task.parameters()))

    task = SegmentationTask(**TINY, lr=3e-3, betas=(0.8, 0.9), weight_decay=0.05)
    task.trainer = SimpleNamespace(estimated_stepping_batches=10)
    group = task.configure_optimizers()["optimizer"].param_groups[0]
    assert (group["initial_lr"], group["betas"], group["weight_decay"]) == (3e-3, (0.8, 0.9), 0.05)

    for p in task.head.parameters():
        p.requires_grad_(False)
    with pytest.raises(RuntimeError, match="no trainable parameters"):
        task.configure_optimizers()


def test_warmup_is_linear_then_cosine_over_the_remaining_steps():
    """Warm-up of 3 steps over 10: lr x 1/4, 2/4, 3/4, then the cosine from lr over the 7 steps left.

    Catches: a warm-up that starts at 0 (a wasted step), the cosine counted from step 0 instead of the warm-up's end.
    """
    lrs = _schedule(SegmentationTask(**TINY, lr=2e-4, warmup_steps=3), 10)
    expected = [2e-4 * f for f in (0.25, 0.5, 0.75)]
    expected += [2e-4 * 0.5 * (1 + math.cos(math.pi * t / 7)) for t in range(7)]
    assert lrs == pytest.approx(expected, rel=1e-9)


class _RecordLr(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_cosine_steps_with_every_optimiser_step_in_a_run(tmp_path):
    """In a real run of 2 epochs x 3 steps the learning rate follows the cosine step by step.

    Catches: the scheduler stepped once per epoch (``interval: epoch``), which holds lr for a whole epoch.
    """
    from .test_data import make_folder

    root = make_folder(tmp_path / "d", n=20)
    task = SegmentationTask(**TINY, lr=1e-3, min_lr=1e-4)
    record = _RecordLr()
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=0,
        accelerator="cpu",
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        callbacks=[record],
    )
    dm = SegmentationDataModule(str(root), image_size=64, batch_size=4, augmentations={})
    trainer.fit(task, datamodule=dm)
    expected = [1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * t / 6)) for t in range(6)]
    assert record.lrs == pytest.approx(expected, rel=1e-9)
