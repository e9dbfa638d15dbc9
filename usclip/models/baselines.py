"""Baselines in the same pipeline: timm backbones under the paper's heads, and whole models with their own heads.

* ``timm:<name>`` (e.g. ``timm:vit_base_patch14_dinov2.lvd142m``, ``timm:resnet18``) under the paper's heads:
  :class:`TimmEncoder` returns the selected blocks/stages via timm's own ``forward_intermediates`` (the same
  contract as :class:`~usclip.models.CLIPEncoder`), frozen.
* Whole models trained end to end with their own decoder or classifier (``head: native`` in the task):
  ``smp:<Arch>[/<encoder>]`` (e.g. ``smp:Unet/resnet34``) for segmentation, through segmentation-models-pytorch,
  ``clipseg:<checkpoint>`` (e.g. ``clipseg:CIDAS/clipseg-rd64-refined``) for segmentation with a text prompt,
  through transformers (:mod:`usclip.models.clipseg`), and ``timm:<name>`` (e.g. ``timm:resnet18``) for
  classification.
* The authors' baselines as they ran them (:mod:`usclip.models.authors_baselines`): ``dinov2:<arch>`` (frozen DINOv2
  under their decoder or linear classifier, both tasks) and ``unet`` (their 16-channel UNet from scratch); their
  ResNet18 is ``timm:resnet18`` with ``pretrained: tv_in1k`` (torchvision's weights).

Weights: ``pretrained: null`` is random initialisation; a local file is loaded strictly (``weights_only``; timm
models through timm's checkpoint filter, so Facebook's DINOv2 and torchvision's ResNet files load); any
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

#: ``model_name`` prefix -> (the module it imports, the usclip extra that installs it; pyproject.toml)
MODEL_EXTRAS: dict[str, tuple[str, str]] = {
    "smp:": ("segmentation_models_pytorch", "baselines"),
    "clipseg": ("transformers", "clipseg"),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _read_state(path: str) -> dict[str, torch.Tensor]:
    """A local state dict: ``.safetensors`` or a torch file (``weights_only``, optionally under ``state_dict``)."""
    state: Any
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"pretrained={path!r} holds a {type(state).__name__}, expected a state dict")
    return state


def check_model_installed(model_name: str | None) -> None:
    """Raise one clear error when ``model_name`` needs an optional package that is not installed.

    Called when the configuration is parsed (before anything is built) and again when the model is built.

    Args:
        model_name: the task's ``model_name`` (``smp:Unet/resnet34``, ``clipseg:<checkpoint>``, ...), or ``None``.

    Raises:
        ModuleNotFoundError: naming the model, the missing package and the ``pip install 'usclip[<extra>]'`` line.
    """
    import importlib.util

    for prefix, (module, extra) in MODEL_EXTRAS.items():
        if isinstance(model_name, str) and model_name.startswith(prefix) and importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(
                f"model_name={model_name!r} needs the {module!r} package, which is not installed: "
                f"pip install 'usclip[{extra}]'"
            )


def _timm_filter(model: nn.Module) -> Any:
    """The ``checkpoint_filter_fn`` of the timm module that defines ``model`` (None for other models or none)."""
    import importlib

    module = type(model).__module__
    if not module.startswith("timm."):
        return None
    return getattr(importlib.import_module(module), "checkpoint_filter_fn", None)


def load_weights_file(model: nn.Module, path: str, drop_mismatched_classifier: bool = False) -> None:
    """Load a local weights file strictly into ``model``.

    For timm models the file first goes through timm's ``checkpoint_filter_fn`` of the model's family, which converts
    other releases of the same weights: Facebook's DINOv2 files (``dinov2_vitb14_pretrain.pth``: ``mask_token``
    dropped, the position grid resampled to the model's image size), OpenAI CLIP files for timm ViTs, ... timm's ResNet
    names its parameters as torchvision does, so torchvision files (``resnet18-f37072fd.pth``) load unchanged.

    Args:
        model: the model to fill.
        path: ``.safetensors`` or a torch file (``weights_only``, optionally under a ``state_dict`` key).
        drop_mismatched_classifier: leave the classifier (timm's ``pretrained_cfg["classifier"]``, e.g. ``fc``) at its
            initialisation when the file's has another shape (ImageNet's 1000 classes for 2): what torchvision users
            do by replacing ``model.fc`` after loading.

    Raises:
        ValueError: when keys are missing or left over, naming the first of each.
    """
    state = _read_state(path)
    filter_fn = _timm_filter(model)
    if filter_fn is not None:
        state = filter_fn(state, model)
    if drop_mismatched_classifier:
        own = model.state_dict()
        head = str((getattr(model, "pretrained_cfg", {}) or {}).get("classifier", "fc"))
        dropped = [k for k in state if k.startswith(head + ".") and k in own and state[k].shape != own[k].shape]
        if dropped:
            log.warning(
                "pretrained=%s: its %s has %d outputs, the model %d: %s starts from its initialisation",
                path,
                head,
                len(state[dropped[0]]),
                len(own[dropped[0]]),
                head,
            )
            state = {**{k: v for k, v in state.items() if k not in dropped}, **{k: own[k] for k in dropped}}
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
            load_weights_file(self.model, str(pretrained))
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
    options: dict[str, Any] | None = None,
) -> tuple[nn.Module, tuple[float, ...], tuple[float, ...]]:
    """A whole baseline model with its own decoder or classifier, trainable end to end (CLIPSeg: its decoder).

    Args:
        task: ``segmentation`` (``smp:<Arch>[/<encoder>]``, ``clipseg:<checkpoint>``, ``unet``, ``dinov2:<arch>``) or
            ``classification`` (``timm:<name>``, ``dinov2:<arch>``).
        model_name: prefixed model name.
        num_classes: output classes.
        pretrained: see the module docstring.
        image_size: input side length (CLIPSeg and DINOv2 run at this size).
        text_prompt: CLIPSeg's prompt (see :func:`usclip.models.clipseg.resolve_prompt`); only CLIPSeg takes one.
        options: the task's ``native_kwargs``: ``dinov2:`` takes ``layer_scale`` and (classification)
            ``n_last_blocks``, ``unet`` takes ``init_channels`` (:mod:`usclip.models.authors_baselines`).

    Returns:
        ``(model, mean, std)`` with the normalisation the model expects.

    Raises:
        ValueError: for a model name that does not fit the task, a text prompt for a model without text input, or
            options the model does not take.
    """
    from usclip.models import authors_baselines as ab

    opts = ab.native_options(model_name, options)
    if text_prompt is not None and not model_name.startswith("clipseg"):
        raise ValueError(f"text_prompt is for model_name='clipseg:<checkpoint>', got model_name={model_name!r}")
    if model_name.startswith("dinov2:"):
        dino = ab.build_dinov2(task, model_name.removeprefix("dinov2:"), num_classes, pretrained, image_size, **opts)
        cfg = getattr(dino.backbone, "pretrained_cfg", {}) or {}
        return dino, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    if task == "segmentation" and model_name == "unet":
        unet = ab.AuthorsUNet(3, num_classes, **opts)
        if pretrained is not None:
            if not _is_file(pretrained):
                raise ValueError(
                    f"model_name='unet' trains from scratch: pretrained must be null or a file, got {pretrained!r}"
                )
            load_weights_file(unet, str(pretrained))
        return unet, IMAGENET_MEAN, IMAGENET_STD
    if task == "segmentation" and (model_name == "clipseg" or model_name.startswith("clipseg:")):
        if num_classes != 2:
            raise ValueError(
                f"CLIPSeg predicts one foreground against background: num_classes must be 2, got {num_classes}"
            )
        from usclip.models.clipseg import build_clipseg

        return build_clipseg(model_name.removeprefix("clipseg").removeprefix(":"), pretrained, text_prompt, image_size)
    if task == "segmentation" and model_name.startswith("smp:"):
        check_model_installed(model_name)
        import segmentation_models_pytorch as smp

        arch, _, encoder = model_name.removeprefix("smp:").partition("/")
        weights = None if pretrained is None or _is_file(pretrained) else pretrained
        model = smp.create_model(arch, encoder_name=encoder or "resnet34", encoder_weights=weights, classes=num_classes)
        if _is_file(pretrained):
            load_weights_file(model, str(pretrained))
        return model, IMAGENET_MEAN, IMAGENET_STD
    if task == "classification" and model_name.startswith("timm:"):
        import timm

        name = model_name.removeprefix("timm:")
        use_hub = pretrained is not None and not _is_file(pretrained)
        # a tag (tv_in1k: torchvision's IMAGENET1K_V1) picks those weights; "timm" the model's default tag
        tagged = name if pretrained in (None, "timm") or _is_file(pretrained) else f"{name}.{pretrained}"
        model = timm.create_model(tagged, pretrained=use_hub, num_classes=num_classes)
        if _is_file(pretrained):
            load_weights_file(model, str(pretrained), drop_mismatched_classifier=True)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        return model, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    expected = (
        "'smp:<Arch>[/<encoder>]', 'clipseg:<checkpoint>', 'unet' or 'dinov2:<arch>'"
        if task == "segmentation"
        else "'timm:<name>' or 'dinov2:<arch>'"
    )
    raise ValueError(f"head='native' for {task} needs model_name={expected}, got {model_name!r}")
