"""SegmentationTask: what trains, what checkpoints hold, and loss/normalisation plumbing."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import open_clip
import pytest
import torch

from usclip.data import SegmentationDataModule
from usclip.models import register_model_configs
from usclip.tasks import SegmentationTask

from .test_data import make_folder


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A local open_clip checkpoint of the tiny model: the path real pretrained weights take."""
    register_model_configs()
    torch.manual_seed(1)
    model = open_clip.create_model("usclip-test-vit")
    path = tmp_path_factory.mktemp("w") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


def tiny_task(pretrained: str | None = None, **kw) -> SegmentationTask:
    return SegmentationTask(
        model_name="usclip-test-vit", pretrained=pretrained, layers=[1, 3], image_size=64, embed_dim=8, **kw
    )


def fit(task: SegmentationTask, root: Path, tmp_path: Path, steps: int = 3) -> L.Trainer:
    dm = SegmentationDataModule(str(root), image_size=64, batch_size=4, augmentations={})
    trainer = L.Trainer(
        max_steps=steps,
        limit_val_batches=1,
        accelerator="cpu",
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    trainer.fit(task, datamodule=dm)
    return trainer


def test_only_head_trains_without_adapter(tmp_path):
    root = make_folder(tmp_path / "d", n=20)
    task = tiny_task()
    before = {k: v.clone() for k, v in task.state_dict().items()}
    fit(task, root, tmp_path)
    after = task.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("head.") for k in changed)
    assert {k for k in before if k.startswith("head.") and k.endswith("weight")} <= changed


def test_normalisation_uses_encoder_statistics():
    task = tiny_task()
    x = torch.full((1, 3, 64, 64), 0.5)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(task.normalize(x), (x - mean) / std)


def test_checkpoint_without_frozen_backbone(weights_file, tmp_path):
    root = make_folder(tmp_path / "d", n=20)
    task = tiny_task(pretrained=str(weights_file))
    trainer = fit(task, root, tmp_path)
    ckpt = tmp_path / "x.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert state and not any(k.startswith("encoder.") for k in state)  # no copy of the frozen backbone

    task.eval()
    x = torch.rand(2, 3, 64, 64)
    restored = SegmentationTask.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    torch.testing.assert_close(restored(x), task(x))

    other = tmp_path / "other.pt"
    torch.manual_seed(2)
    torch.save(open_clip.create_model("usclip-test-vit").state_dict(), other)
    with pytest.raises(RuntimeError, match="different frozen backbone"):
        SegmentationTask.load_from_checkpoint(ckpt, map_location="cpu", pretrained=str(other))


def test_random_backbone_is_kept_in_checkpoint(tmp_path):
    root = make_folder(tmp_path / "d", n=20)
    task = tiny_task()
    trainer = fit(task, root, tmp_path, steps=1)
    ckpt = tmp_path / "x.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("encoder.") for k in state)


def test_num_classes_validated():
    with pytest.raises(ValueError, match="num_classes"):
        tiny_task(num_classes=1)
