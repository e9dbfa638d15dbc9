"""The paper's light task heads over multi-level ViT features (Qu et al., arXiv:2506.08849, Sec. 3).

These follow the paper's text (``BaseTask(head="paper")``, the default). The authors' code has other heads (a
Linear and an MLP block per level, cascaded or summed): :mod:`usclip.models.authors_heads` reproduces them
(``head: authors_release | authors_src | authors_timm``); docs/adapters.md lists the differences.

Feature reducing: each selected block's patch map is projected by a 1x1 conv to ``embed_dim`` (the CLIP embedding
width, 512 for ViT-B/16) and the maps are fused by concatenation (the paper) or sum.

Both heads end in a 1x1 conv and bilinear up-sampling. A 1x1 conv and bilinear interpolation are both linear and
interpolation weights sum to one, so ``conv(upsample(x)) == upsample(conv(x))`` exactly: the heads apply the conv at
patch resolution and up-sample the ``num_classes`` logit maps, which is the same function at a fraction of the cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Fusion = Literal["concat", "sum"]


class FeatureReducer(nn.Module):
    """Project each feature map to ``embed_dim`` channels and fuse them.

    Args:
        in_channels: channels of each input map.
        embed_dim: channels of each projection.
        fusion: ``concat`` (output ``len(in_channels) * embed_dim`` channels) or ``sum`` (``embed_dim``).
    """

    def __init__(self, in_channels: Sequence[int], embed_dim: int = 512, fusion: Fusion = "concat") -> None:
        super().__init__()
        if fusion not in ("concat", "sum"):
            raise ValueError(f"fusion must be 'concat' or 'sum', got {fusion!r}")
        if not in_channels:
            raise ValueError("in_channels is empty: the encoder must return at least one feature map")
        self.fusion = fusion
        self.proj = nn.ModuleList(nn.Conv2d(c, embed_dim, kernel_size=1) for c in in_channels)
        self.out_channels = embed_dim * len(in_channels) if fusion == "concat" else embed_dim

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fuse ``[(B, C_i, h, w)]`` into ``(B, out_channels, h, w)``."""
        if len(features) != len(self.proj):
            raise ValueError(f"expected {len(self.proj)} feature maps, got {len(features)}")
        maps = [p(f) for p, f in zip(self.proj, features, strict=True)]
        return torch.cat(maps, dim=1) if self.fusion == "concat" else torch.stack(maps).sum(0)


class SegmentationHead(nn.Module):
    """Fused features -> 1x1 conv -> bilinear up-sampling to the input size.

    Args:
        in_channels: channels of each encoder feature map.
        num_classes: output classes (2 for lesion vs background).
        embed_dim: projection width of each map.
        fusion: ``concat`` or ``sum``.
    """

    def __init__(
        self, in_channels: Sequence[int], num_classes: int = 2, embed_dim: int = 512, fusion: Fusion = "concat"
    ) -> None:
        super().__init__()
        self.reduce = FeatureReducer(in_channels, embed_dim, fusion)
        self.classifier = nn.Conv2d(self.reduce.out_channels, num_classes, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Logits ``(B, num_classes, *size)`` from ``[(B, C_i, h, w)]``."""
        logits = self.classifier(self.reduce(features))  # (B, K, h, w), conv before up-sampling: see module doc
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class ClassificationHead(SegmentationHead):
    """Fused features -> 1x1 conv (class activation maps) -> bilinear up-sampling -> adaptive average pooling.

    The segmentation head's maps, pooled: no MLP, as in the paper. ``forward(..., return_cam=True)`` also returns
    the up-sampled class activation maps.

    Args:
        in_channels: channels of each encoder feature map.
        num_classes: output classes.
        embed_dim: projection width of each map.
        fusion: ``concat`` or ``sum``.
    """

    def __init__(
        self, in_channels: Sequence[int], num_classes: int = 2, embed_dim: int = 512, fusion: Fusion = "concat"
    ) -> None:
        super().__init__(in_channels, num_classes, embed_dim, fusion)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(  # type: ignore[override]
        self, features: Sequence[torch.Tensor], size: tuple[int, int], return_cam: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, num_classes)``; with ``return_cam`` also the maps ``(B, num_classes, *size)``."""
        cam = super().forward(features, size)
        logits = self.pool(cam).flatten(1)  # (B, K, 1, 1) -> (B, K)
        return (logits, cam) if return_cam else logits
