"""The task heads of the authors' code (Qu et al., github.com/jinggqu/NextGen-UIA), module for module.

The paper (Sec. 3) describes a 1x1 conv per block and concatenation (:mod:`usclip.models.heads`). The authors'
code instead projects each tapped block's patch tokens with a ``Linear(width -> reduce_dim)`` (``reduces``), runs
each level through ``LayerNorm -> Linear -> GELU -> Linear`` (``blocks``) and fuses the levels; three versions
exist, selected by ``BaseTask(head=...)``:

* ``authors_release`` (the paper-release code, release:models/openai/clip_adapter.py:46-56 and 93-112): cascade
  from the deepest tapped block to the shallowest, ``a = blocks[k](reduces[k](x) + a)`` with ``k = 0`` on the
  deepest one (reversed activations zipped with the module lists as built). Classification: up-sampling, 1x1
  conv, average pooling, flatten (pooled class activation maps, as the paper's).
* ``authors_src`` (the later code, later:src/third_party/openai_clip/clip_adapter.py:46-58 and 95-118): parallel,
  ``a = sum_k blocks[k](reduces[k](x_k))`` with ``x_k`` the k-th tapped block from shallow to deep (reversed
  activations zipped with reversed module lists). Classification: pool, flatten, Linear, ReLU, Dropout(0.1),
  Linear.
* ``authors_timm`` (the later code's head for BiomedCLIP, UniMed-CLIP and MetaCLIP,
  later:src/third_party/timm/clip_adapter.py:46-56 and 121-142): fusion as ``authors_src``. Classification: pool,
  flatten, Dropout(0.5), Linear.

The segmentation head (``seg_head``) is the same in all three: bilinear up-sampling to the input size, then a 1x1
conv to the classes. The parameter names and shapes equal theirs one to one (``reduces.0.weight``,
``blocks.0.0.weight`` (LayerNorm), ``blocks.0.1.weight``, ``blocks.0.3.weight``, ``seg_head.1.weight``,
``cls_head.1.weight`` / ``cls_head.2.weight`` and ``cls_head.5.weight`` / ``cls_head.3.weight``), so the head parts
of their checkpoints load as they are (:func:`usclip.models.authors.convert_authors_state_dict`). As in
:mod:`usclip.models.heads`, the 1x1 conv runs before the up-sampling, which is exact (both are linear and the
bilinear weights sum to one); the index 0 of ``seg_head`` is that up-sampling, a module without parameters.

The input is the encoder's list of ``(B, C_k, h, w)`` patch maps, shallow to deep (:class:`usclip.models.CLIPEncoder`
and :class:`usclip.models.baselines.TimmEncoder` both return the residual stream after each tapped block, class
token removed, no extra norm: their ``activation[:, 1:, :]``). Tokens are taken in row-major order, as theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

#: the ``BaseTask(head=...)`` values that select an authors' head, and the version of their code each reproduces
AUTHORS_HEADS = ("authors_release", "authors_src", "authors_timm")
AuthorsHeadName = Literal["authors_release", "authors_src", "authors_timm"]
HeadTask = Literal["segmentation", "classification"]


class BilinearResize(nn.Module):
    """Bilinear up-sampling to a size given at call time (their ``nn.Upsample((img_size, img_size))``)."""

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """``(B, C, h, w) -> (B, C, *size)``, ``align_corners=False`` as theirs."""
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _mlp_block(dim: int) -> nn.Sequential:
    # their `blocks[k]`: indices 0 (LayerNorm), 1 (Linear), 2 (GELU, exact), 3 (Linear)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))


class AuthorsHead(nn.Module):
    """One of the authors' heads over multi-level patch maps (see the module docstring for the three versions).

    Args:
        in_channels: channels of each encoder map, shallow to deep (their ``feature_dim``, 768 for ViT-B).
        num_classes: output classes.
        reduce_dim: width of the projected levels (their ``reduce_dim``, 512; usclip's ``embed_dim``).
        version: ``authors_release``, ``authors_src`` or ``authors_timm``.
        task: ``segmentation`` (builds ``seg_head``) or ``classification`` (builds ``cls_head``). Their modules
            build both heads and use one; only the used one is built here, so a checkpoint's head part loads
            strictly.

    Raises:
        ValueError: an unknown ``version`` or ``task``, or no input level.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int = 2,
        reduce_dim: int = 512,
        version: AuthorsHeadName = "authors_release",
        task: HeadTask = "segmentation",
    ) -> None:
        super().__init__()
        if version not in AUTHORS_HEADS:
            raise ValueError(f"version must be one of {AUTHORS_HEADS}, got {version!r}")
        if task not in ("segmentation", "classification"):
            raise ValueError(f"task must be 'segmentation' or 'classification', got {task!r}")
        if not in_channels:
            raise ValueError("in_channels is empty: the encoder must return at least one feature map")
        self.version = version
        self.task = task
        self.reduce_dim = reduce_dim
        self.cascade = version == "authors_release"
        # The release pairs reduces[k] with the k-th tapped block from the DEEPEST one (reversed activations zipped
        # with the module lists as built); the later code pairs reduces[k] with the k-th from the shallowest.
        widths = list(in_channels)[::-1] if self.cascade else list(in_channels)
        self.reduces = nn.ModuleList(nn.Linear(c, reduce_dim) for c in widths)
        self.blocks = nn.ModuleList(_mlp_block(reduce_dim) for _ in widths)
        self.seg_head: nn.Sequential | None = None
        self.cls_head: nn.Sequential | None = None
        conv = nn.Conv2d(reduce_dim, num_classes, kernel_size=1)
        if task == "segmentation":
            self.seg_head = nn.Sequential(BilinearResize(), conv)
        elif version == "authors_release":
            self.cls_head = nn.Sequential(BilinearResize(), conv, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        elif version == "authors_src":
            self.cls_head = nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(reduce_dim, reduce_dim),
                nn.ReLU(),
                nn.Dropout(0.1),
                nn.Linear(reduce_dim, num_classes),
            )
        else:
            self.cls_head = nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(reduce_dim, num_classes)
            )

    def fuse(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The fused ``(B, reduce_dim, h, w)`` map of ``[(B, C_k, h, w)]`` (shallow to deep), before the task head."""
        if len(features) != len(self.reduces):
            raise ValueError(f"expected {len(self.reduces)} feature maps, got {len(features)}")
        b, _, h, w = features[0].shape
        tokens = [f.flatten(2).transpose(1, 2) for f in features]  # (B, C, h, w) -> (B, h*w, C), row-major
        a: torch.Tensor | None = None
        if self.cascade:  # release: deep to shallow, each level added before its block
            for reduce, block, x in zip(self.reduces, self.blocks, tokens[::-1], strict=True):
                r = reduce(x)
                a = block(r if a is None else r + a)
        else:  # later code: every level through its own block, summed (deepest first, as their loop adds)
            for reduce, block, x in zip(self.reduces[::-1], self.blocks[::-1], tokens[::-1], strict=True):
                r = block(reduce(x))
                a = r if a is None else r + a
        assert a is not None
        return a.transpose(1, 2).reshape(b, self.reduce_dim, h, w)  # (B, h*w, D) -> (B, D, h, w)

    def forward(self, features: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """Logits: ``(B, num_classes, *size)`` (segmentation) or ``(B, num_classes)`` (classification)."""
        a = self.fuse(features)
        if self.seg_head is not None:
            resize, conv = self.seg_head
            return resize(conv(a), size)  # conv before up-sampling: exact, see the module docstring
        assert self.cls_head is not None
        if self.cascade:
            resize, conv, pool, flatten = self.cls_head
            return flatten(pool(resize(conv(a), size)))  # pooled after up-sampling, as theirs (not equal before)
        return self.cls_head(a)


def build_authors_head(
    head: str, task: HeadTask, in_channels: Sequence[int], num_classes: int, reduce_dim: int
) -> AuthorsHead:
    """The :class:`AuthorsHead` that ``BaseTask(head=...)`` names.

    Raises:
        ValueError: ``head`` is not one of :data:`AUTHORS_HEADS`.
    """
    if head not in AUTHORS_HEADS:
        raise ValueError(f"head={head!r} is not an authors' head; expected one of {AUTHORS_HEADS}")
    return AuthorsHead(in_channels, num_classes, reduce_dim, version=head, task=task)  # type: ignore[arg-type]
