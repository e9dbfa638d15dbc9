"""Training switches that undo differences from the authors' code: cosine floor, Dice options, focal activation,
best-checkpoint metric, and the overlays that set them (configs/training/)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from monai.losses import DiceCELoss, FocalLoss

from usclip.cli import main
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


@pytest.mark.parametrize(
    ("config", "overlay", "expected"),
    [
        (
            "segmentation_none.yaml",
            "authors_segmentation.yaml",
            {"dice_squared_pred": True, "dice_smooth": 1e-8, "min_lr": 1e-8, "early_stopping_patience": 15},
        ),
        (
            "classification_lora.yaml",
            "authors_classification.yaml",
            {"focal_activation": "sigmoid", "best_by": "acc", "min_lr": 1e-8, "early_stopping_patience": 15},
        ),
    ],
)
def test_authors_training_overlays(tmp_path, config, overlay, expected):
    args = ["--config", str(REPO / "tests" / "conf" / config), "--config", str(REPO / "configs" / "training" / overlay)]
    cli = main([*args, f"--data.init_args.root={tmp_path}", f"--trainer.default_root_dir={tmp_path}"], run=False)
    for key, value in expected.items():
        assert cli.model.hparams[key] == value, key
    assert cli.trainer.check_val_every_n_epoch == 10
    assert cli.trainer.max_epochs == 1000
