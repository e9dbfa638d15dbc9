"""CLIP image encoder returning multi-level patch features.

Wraps an open_clip vision tower (``open_clip.create_model``) and exposes the patch tokens of selected
transformer blocks as ``B x C x h x w`` maps, via the tower's own ``forward_intermediates``. Blocks after the
deepest requested one are removed, and the text tower is dropped unless asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
from torch import nn

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"


def register_model_configs() -> None:
    """Register the JSON configs shipped in ``usclip/models/model_configs`` with open_clip (idempotent)."""
    if "usclip-test-vit" not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def _resolve_pretrained(model_name: str, pretrained: str | None) -> tuple[str, str | None, bool]:
    """Return ``(model_name, pretrained, quick_gelu)`` for ``open_clip.create_model``.

    ``pretrained`` may be an open_clip tag (``openai``), a local file, or an ``hf-hub:`` id; an hf-hub id moves
    into ``model_name`` as open_clip expects. QuickGELU is switched on when the tag's weights were trained with it
    (OpenAI and MetaCLIP): open_clip itself only warns about the mismatch.
    """
    if pretrained is not None and pretrained.startswith("hf-hub:"):
        return pretrained, None, False
    if pretrained is None or Path(pretrained).is_file():
        return model_name, pretrained, False
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"model_name={model_name!r} is not an open_clip model config; expected one of open_clip.list_models() "
            "(e.g. 'ViT-B-16') or an 'hf-hub:org/repo' id."
        )
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        raise ValueError(
            f"pretrained={pretrained!r} is neither an existing local file nor a pretrained tag of {model_name!r}; "
            f"known tags: {sorted(tags)}. Pass a tag, a checkpoint path, or an 'hf-hub:org/repo' id."
        )
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    return model_name, pretrained, bool(cfg.get("quick_gelu", False))


class CLIPEncoder(nn.Module):
    """Frozen-by-default CLIP vision tower returning the patch features of selected blocks.

    Args:
        model_name: open_clip model config name (``ViT-B-16``, ``usclip-test-vit``) or ``hf-hub:org/repo``.
        pretrained: open_clip pretrained tag (``openai``, ``metaclip_400m``), a local checkpoint file, an
            ``hf-hub:`` id, or ``None`` for random weights.
        layers: 0-based indices of the blocks whose patch tokens are returned; no block after the deepest one runs.
        image_size: input size the position embeddings are built (or resized) for; ``None`` keeps the config's.
        keep_text: keep the text tower (contrastive fine-tuning, zero-shot); otherwise only the visual tower
            is kept.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        pretrained: str | None = None,
        layers: Sequence[int] = (3, 6, 9),
        image_size: int | None = None,
        keep_text: bool = False,
    ) -> None:
        super().__init__()
        register_model_configs()
        name, weights, quick_gelu = _resolve_pretrained(model_name, pretrained)
        model = open_clip.create_model(
            name, pretrained=weights, force_quick_gelu=quick_gelu, force_image_size=image_size
        )
        visual = model.visual
        if not hasattr(visual, "transformer"):
            raise ValueError(f"model {model_name!r} has no open_clip VisionTransformer tower (got {type(visual)})")
        depth = len(visual.transformer.resblocks)
        layers = sorted({int(i) for i in layers})
        if not layers or layers[0] < 0 or layers[-1] >= depth:
            raise ValueError(f"layers={list(layers)} must be block indices in [0, {depth - 1}] for {model_name!r}")
        self.layers = layers
        self.text_model = model if keep_text else None
        if not keep_text:
            # Drop the blocks after the deepest requested one, and the pooling head they would feed.
            visual.prune_intermediate_layers(layers, prune_norm=True, prune_head=True)
        self.visual = visual
        self.width: int = visual.transformer.width
        self.patch_size: int = visual.patch_size[0]
        self.image_mean: tuple[float, ...] = tuple(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        self.image_std: tuple[float, ...] = tuple(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)

    @property
    def out_channels(self) -> list[int]:
        """Channels of each returned feature map."""
        return [self.width] * len(self.layers)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Patch features of the selected blocks.

        Args:
            images: normalised images, ``(B, 3, H, W)``.

        Returns:
            One ``(B, C, H / patch, W / patch)`` map per entry of ``layers``.
        """
        out = self.visual.forward_intermediates(
            images, indices=self.layers, stop_early=True, intermediates_only=True, output_fmt="NCHW"
        )
        return out["image_intermediates"]
