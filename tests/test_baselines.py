"""Baselines in the same pipeline: timm backbones under the paper's heads, and native whole models."""

from __future__ import annotations

import pytest
import torch

from usclip.models.baselines import TimmEncoder, build_native_model
from usclip.tasks import ClassificationTask, SegmentationTask


def test_timm_vit_encoder_under_paper_head():
    # timm's tiny test ViT stands in for DINOv2 ViT-B/14 (same class, same forward_intermediates contract)
    task = SegmentationTask(model_name="timm:test_vit", pretrained=None, layers=[0, 1], image_size=64, embed_dim=8)
    assert isinstance(task.encoder, TimmEncoder)
    x = torch.rand(2, 3, 64, 64)
    assert task(x).shape == (2, 2, 64, 64)
    trainable = {n.split(".")[0] for n, p in task.named_parameters() if p.requires_grad}
    assert trainable == {"head"}  # the backbone is frozen, as the CLIP encoder is
    torch.testing.assert_close(task.pixel_mean.flatten(), torch.tensor(task.encoder.image_mean))


def test_timm_cnn_stages_are_brought_to_one_grid():
    enc = TimmEncoder("resnet18", layers=[1, 2, 3], image_size=64)
    feats = enc(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == enc.out_channels == [64, 128, 256]
    assert len({f.shape[-2:] for f in feats}) == 1


def test_native_models_train_fully():
    seg = SegmentationTask(model_name="smp:Unet/resnet18", pretrained=None, head="native", image_size=64)
    assert seg(torch.rand(2, 3, 64, 64)).shape == (2, 2, 64, 64)
    assert all(p.requires_grad for p in seg.parameters())
    cls = ClassificationTask(model_name="timm:resnet18", pretrained=None, head="native", num_classes=3, image_size=64)
    assert cls(torch.rand(2, 3, 64, 64)).shape == (2, 3)


def test_native_model_loads_local_weights(tmp_path):
    model, _, _ = build_native_model("classification", "timm:resnet18", 2, None)
    path = tmp_path / "r18.pt"
    torch.save(model.state_dict(), path)
    again, _, _ = build_native_model("classification", "timm:resnet18", 2, str(path))
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(again.eval()(x), model.eval()(x))
    with pytest.raises(ValueError, match=r"does not fit.*missing keys"):
        build_native_model("classification", "timm:resnet34", 2, str(path))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model_name": "ViT-B-16", "head": "native"}, r"head='native' for segmentation needs model_name='smp:"),
        ({"model_name": "smp:Unet", "head": "native", "adapter": "mona"}, r"adapter='mona'.*takes no adapter"),
        ({"model_name": "timm:test_vit", "adapter": "lora", "layers": [0]}, r"adapter='lora'.*takes no adapter"),
    ],
)
def test_baseline_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SegmentationTask(image_size=64, pretrained=None, **kwargs)
