"""The paper's heads: shapes, fusion, and the conv/up-sampling commutation they rely on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from usclip.models.heads import ClassificationHead, FeatureReducer, SegmentationHead


def feats(b=2, c=(8, 8, 8), h=4, w=5):
    torch.manual_seed(0)
    return [torch.randn(b, ci, h, w) for ci in c]


@pytest.mark.parametrize(("fusion", "channels"), [("concat", 3 * 6), ("sum", 6)])
def test_reducer_fusion(fusion, channels):
    red = FeatureReducer([8, 8, 8], embed_dim=6, fusion=fusion)
    out = red(feats())
    assert red.out_channels == channels and out.shape == (2, channels, 4, 5)
    maps = [p(f) for p, f in zip(red.proj, feats(), strict=True)]
    expected = torch.cat(maps, 1) if fusion == "concat" else sum(maps)
    torch.testing.assert_close(out, expected)


def test_reducer_errors():
    with pytest.raises(ValueError, match="fusion"):
        FeatureReducer([8], fusion="mean")
    with pytest.raises(ValueError, match="expected 3 feature maps, got 2"):
        FeatureReducer([8, 8, 8])(feats()[:2])


def test_segmentation_head_equals_upsample_then_conv():
    head = SegmentationHead([8, 8, 8], num_classes=3, embed_dim=6)
    out = head(feats(), size=(16, 20))
    assert out.shape == (2, 3, 16, 20)
    # the paper's order (up-sample the fused features, then 1x1 conv) gives the same logits
    fused = F.interpolate(head.reduce(feats()), size=(16, 20), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, head.classifier(fused))  # float32 defaults: rtol 1.3e-6, atol 1e-5


def test_classification_head_pools_cam():
    head = ClassificationHead([8, 8, 8], num_classes=2, embed_dim=6)
    logits, cam = head(feats(), size=(16, 20), return_cam=True)
    assert logits.shape == (2, 2) and cam.shape == (2, 2, 16, 20)
    torch.testing.assert_close(logits, cam.mean(dim=(2, 3)))
    assert sum(p.numel() for p in head.parameters()) == 3 * (8 * 6 + 6) + (18 * 2 + 2)


TINY_TASK = {"model_name": "usclip-test-vit", "pretrained": None, "layers": [1, 3], "embed_dim": 8}


def test_tasks_fuse_blocks_by_concatenation_by_default():
    """The paper concatenates the projected blocks. Catches: ``fusion: sum`` as the tasks' default."""
    from usclip.tasks import ClassificationTask, SegmentationTask

    for task_class in (SegmentationTask, ClassificationTask):
        head = task_class(**TINY_TASK, image_size=64).head
        assert head.reduce.fusion == "concat" and head.reduce.out_channels == 2 * 8
        assert head.classifier.in_channels == 16


def test_task_logits_come_back_at_the_input_height_and_width():
    """A task built for non-square 48 x 64 images: logits ``(B, K, 48, 64)``, the head's up-sampled maps.

    Catches: the logits up-sampled to ``(W, H)`` (invisible on square images).
    """
    from usclip.tasks import SegmentationTask

    torch.manual_seed(0)
    task = SegmentationTask(**TINY_TASK, image_size=(48, 64)).eval()
    x = torch.rand(2, 3, 48, 64)
    with torch.no_grad():
        logits = task(x)
        maps = task.head.classifier(task.head.reduce(task.encoder(task.normalize(x))))
    assert maps.shape[-2:] == (3, 4) and logits.shape == (2, 2, 48, 64)
    torch.testing.assert_close(logits, F.interpolate(maps, size=(48, 64), mode="bilinear", align_corners=False))
