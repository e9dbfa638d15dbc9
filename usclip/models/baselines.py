"""Baselines in the same pipeline: timm backbones under the paper's heads, and whole models with their own heads.

* ``timm:<name>`` (e.g. ``timm:vit_base_patch14_dinov2.lvd142m``, ``timm:resnet18``) under the paper's heads:
  :class:`TimmEncoder` returns the selected blocks/stages via timm's own ``forward_intermediates`` (the same
  contract as :class:`~usclip.models.CLIPEncoder`), frozen.
* Whole models trained end to end with their own decoder or classifier (``head: native`` in the task):
  ``smp:<Arch>[/<encoder>]`` (e.g. ``smp:Unet/resnet34``) for segmentation, through segmentation-models-pytorch,
  ``clipseg:<checkpoint>`` (e.g. ``clipseg:CIDAS/clipseg-rd64-refined``) for segmentation with a text prompt,
  through transformers (:mod:`usclip.models.clipseg`), and ``timm:<name>`` (e.g. ``timm:resnet18``) for
  classification.

Weights: ``pretrained: null`` is random initialisation; a local file is loaded strictly (``weights_only``); any
other string is handed to the library (timm: a pretrained tag of the model, smp: an encoder weights name such as
``imagenet``, CLIPSeg: a hub id or checkpoint folder), which downloads it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _load_file(model: nn.Module, path: str) -> None:
    """Load a local state dict (``.safetensors`` or a torch file, ``weights_only``) strictly into ``model``."""
    state: Any
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"pretrained={path!r} does not fit {type(model).__name__}: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}"
        )


def _is_file(pretrained: str | None) -> bool:
    return pretrained is not None and Path(pretrained).is_file()


class TimmEncoder(nn.Module):
    """A frozen timm backbone returning the feature maps of selected blocks (ViTs) or stages (CNNs).

    Args:
        model_name: timm model name (without the ``timm:`` prefix).
        pretrained: ``None`` (random), a local weights file, or a timm pretrained tag (``"timm"`` for the default).
        layers: 0-based block (ViT) or stage (CNN) indices, as timm's ``forward_intermediates`` counts them.
        image_size: input size; ViT position embeddings are resampled by timm.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        layers: Sequence[int] = (3, 6, 9),
        image_size: int = 224,
    ) -> None:
        super().__init__()
        import timm

        kwargs: dict[str, Any] = {"img_size": image_size} if "vit" in model_name or "dinov2" in model_name else {}
        use_hub = pretrained is not None and not _is_file(pretrained)
        name = model_name if pretrained in (None, "timm") or _is_file(pretrained) else f"{model_name}.{pretrained}"
        self.model = timm.create_model(name, pretrained=use_hub, num_classes=0, **kwargs)
        if _is_file(pretrained):
            _load_file(self.model, str(pretrained))
        self.layers = sorted({int(i) for i in layers})
        self.model.eval()
        with torch.no_grad():
            shapes = [f.shape for f in self(torch.zeros(1, 3, image_size, image_size))]
        self.out_channels_: list[int] = [int(s[1]) for s in shapes]
        for p in self.parameters():
            p.requires_grad_(False)
        cfg = getattr(self.model, "pretrained_cfg", {}) or {}
        self.image_mean: tuple[float, ...] = tuple(cfg.get("mean", IMAGENET_MEAN))
        self.image_std: tuple[float, ...] = tuple(cfg.get("std", IMAGENET_STD))

    @property
    def out_channels(self) -> list[int]:
        """Channels of each returned feature map."""
        return self.out_channels_

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps ``[(B, C_i, h_i, w_i)]`` of the selected blocks or stages."""
        feats = self.model.forward_intermediates(  # type: ignore[operator]
            images, indices=self.layers, intermediates_only=True, output_fmt="NCHW", stop_early=True
        )
        if len({f.shape[-2:] for f in feats}) > 1:  # CNN stages: bring every map to the finest grid
            size = feats[0].shape[-2:]
            feats = [nn.functional.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats]
        return list(feats)


def build_native_model(
    task: Literal["segmentation", "classification"],
    model_name: str,
    num_classes: int,
    pretrained: str | None,
    image_size: int = 224,
    text_prompt: str | None = None,
) -> tuple[nn.Module, tuple[float, ...], tuple[float, ...]]:
    """A whole baseline model with its own decoder or classifier, trainable end to end (CLIPSeg: its decoder).

    Args:
        task: ``segmentation`` (``smp:<Arch>[/<encoder>]`` or ``clipseg:<checkpoint>``) or ``classification``
            (``timm:<name>``).
        model_name: prefixed model name.
        num_classes: output classes.
        pretrained: see the module docstring.
        image_size: input side length (CLIPSeg runs at this size).
        text_prompt: CLIPSeg's prompt (see :func:`usclip.models.clipseg.resolve_prompt`); only CLIPSeg takes one.

    Returns:
        ``(model, mean, std)`` with the normalisation the model expects.

    Raises:
        ValueError: for a model name that does not fit the task, or a text prompt for a model without text input.
    """
    if text_prompt is not None and not model_name.startswith("clipseg"):
        raise ValueError(f"text_prompt is for model_name='clipseg:<checkpoint>', got model_name={model_name!r}")
    if task == "segmentation" and (model_name == "clipseg" or model_name.startswith("clipseg:")):
        if num_classes != 2:
            raise ValueError(
                f"CLIPSeg predicts one foreground against background: num_classes must be 2, got {num_classes}"
            )
        from usclip.models.clipseg import build_clipseg

        return build_clipseg(model_name.removeprefix("clipseg").removeprefix(":"), pretrained, text_prompt, image_size)
    if task == "segmentation" and model_name.startswith("smp:"):
        import segmentation_models_pytorch as smp

        arch, _, encoder = model_name.removeprefix("smp:").partition("/")
        weights = None if pretrained is None or _is_file(pretrained) else pretrained
        model = smp.create_model(arch, encoder_name=encoder or "resnet34", encoder_weights=weights, classes=num_classes)
        if _is_file(pretrained):
            _load_file(model, str(pretrained))
        return model, IMAGENET_MEAN, IMAGENET_STD
    if task == "classification" and model_name.startswith("timm:"):
        import timm

        name = model_name.removeprefix("timm:")
        use_hub = pretrained is not None and not _is_file(pretrained)
        model = timm.create_model(name, pretrained=use_hub, num_classes=num_classes)
        if _is_file(pretrained):
            _load_file(model, str(pretrained))
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        return model, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    expected = "'smp:<Arch>[/<encoder>]' or 'clipseg:<checkpoint>'" if task == "segmentation" else "'timm:<name>'"
    raise ValueError(f"head='native' for {task} needs model_name={expected}, got {model_name!r}")
