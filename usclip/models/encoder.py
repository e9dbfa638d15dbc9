"""CLIP image encoder with optional adapters, returning multi-level patch features.

Builds an open_clip vision tower (open_clip's ``VisionTransformer`` with ``transformer.resblocks``, or a timm
trunk with ``trunk.blocks`` as in BiomedCLIP), loads weights from an open_clip tag, a local file or the Hugging
Face Hub, removes the blocks after the deepest requested one, freezes everything, injects Mona or LoRA adapters
by module replacement (:mod:`usclip.adapters`) and returns the patch tokens of the requested blocks as
``B x C x h x w`` maps through the tower's own ``forward_intermediates``.

**Image size.** The tower is built for one input size, ``image_size`` (default: the config's, 224 for ViT-B/16).
Pretrained position embeddings are interpolated to it once, when the weights load (open_clip's
``resize_pos_embed``; timm's ``set_input_size``). ``forward`` refuses other input sizes with an error instead of
interpolating on every call, because open_clip's ``VisionTransformer._embeds`` adds ``positional_embedding``
as is: supporting any size would mean patching that method.

**Weights files.** ``.safetensors`` and ``torch.save`` state dicts load with ``weights_only=True``; the original
OpenAI TorchScript ``.pt`` archives contain code and load only with ``allow_unsafe_torchscript=True``.
"""

from __future__ import annotations

import json
import logging
import pickle
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
from open_clip.model import (
    _build_vision_tower,
    convert_to_custom_text_state_dict,
    resize_pos_embed,
    resize_text_pos_embed,
)
from open_clip.pretrained import download_pretrained, download_pretrained_from_hf
from safetensors.torch import load_file
from torch import nn

from usclip.adapters import (
    AdapterConfig,
    adapter_state_dict,
    build_adapter_config,
    inject_adapters,
    load_adapters,
    read_adapter_metadata,
)
from usclip.attention import use_fast_attention

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
# Non-weight entries of OpenAI's TorchScript state dicts (and open_clip's non-persistent causal mask).
_TORCHSCRIPT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


def register_model_configs() -> None:
    """Register the JSON configs shipped in ``usclip/models/model_configs`` with open_clip (idempotent)."""
    if "usclip-test-vit" not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def is_torchscript_archive(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript zip archive (it holds ``code/`` and ``constants.pkl``), not a state dict."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def load_checkpoint_file(path: str | Path, allow_unsafe_torchscript: bool = False) -> dict[str, torch.Tensor]:
    """Read a CLIP checkpoint file into a state dict without executing code from it (unless allowed).

    Args:
        path: ``.safetensors``, a ``torch.save``'d state dict (optionally under a ``state_dict`` key, optionally
            with DataParallel's ``module.`` prefix), or an OpenAI TorchScript archive.
        allow_unsafe_torchscript: load TorchScript archives, which runs code stored in the file.

    Raises:
        ValueError: a TorchScript archive without the opt-in, a pickle that needs more than ``weights_only``, or
            a file holding no tensors.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state: Any = load_file(path)
    elif is_torchscript_archive(path):
        if not allow_unsafe_torchscript:
            raise ValueError(
                f"pretrained={str(path)!r} is a TorchScript archive (like OpenAI's original CLIP .pt files); loading "
                "it executes code stored in the file. Pass allow_unsafe_torchscript=True if you trust the file, or "
                "convert it once to safetensors."
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        state = {k: v for k, v in state.items() if k not in _TORCHSCRIPT_EXTRA_KEYS}
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError) as e:
            raise ValueError(
                f"pretrained={str(path)!r} cannot be read with torch.load(weights_only=True): it pickles objects "
                f"other than tensors ({e}). Re-save it as torch.save(model.state_dict()) or as safetensors."
            ) from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"pretrained={str(path)!r} holds no state dict of tensors (got {type(state).__name__})")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _hub_config(hub_id: str) -> tuple[dict[str, Any], str]:
    """Model config and weights file of an ``hf-hub:org/repo`` open_clip model."""
    model_id = hub_id[len("hf-hub:") :]
    try:
        with open(download_pretrained_from_hf(model_id, filename="open_clip_config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        weights = download_pretrained_from_hf(model_id)
    except Exception as e:  # huggingface_hub raises many error types (offline, missing repo, auth)
        raise RuntimeError(
            f"could not fetch {hub_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}). Download it once with "
            "network access (it is then cached), or pass a local checkpoint file as pretrained."
        ) from e
    return cfg, weights


def _resolve(
    model_name: str, pretrained: str | None, allow_unsafe_torchscript: bool
) -> tuple[dict[str, Any], str | None, bool, dict[str, Any]]:
    """``(model_cfg, weights_file, quick_gelu, preprocess_cfg)`` for a model name and a weights source."""
    hub_id = next((s for s in (pretrained, model_name) if s is not None and s.startswith("hf-hub:")), None)
    if hub_id is not None:
        cfg, weights = _hub_config(hub_id)
        model_cfg = cfg.get("model_cfg", cfg)
        return model_cfg, weights, bool(model_cfg.get("quick_gelu", False)), cfg.get("preprocess_cfg", {})
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ValueError(
            f"model_name={model_name!r} is not an open_clip model config; use one of open_clip.list_models() "
            "(e.g. 'ViT-B-16', 'usclip-test-vit') or an 'hf-hub:org/repo' id"
        )
    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    if pretrained is None:
        return model_cfg, None, quick_gelu, {}
    if Path(pretrained).is_file():
        # Only OpenAI shipped TorchScript CLIP archives, and their weights were trained with QuickGELU.
        ts = is_torchscript_archive(pretrained)
        return model_cfg, pretrained, quick_gelu or (ts and allow_unsafe_torchscript), {}
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        raise ValueError(
            f"pretrained={pretrained!r} is neither an existing file nor a pretrained tag of {model_name!r} "
            f"(tags: {sorted(tags)}); pass a tag, a checkpoint path, an 'hf-hub:org/repo' id or None"
        )
    pcfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    try:
        weights = download_pretrained(pcfg)
    except Exception as e:  # download errors come from urllib or huggingface_hub
        raise RuntimeError(
            f"could not fetch the {model_name!r} {pretrained!r} weights ({type(e).__name__}: {e}); download them "
            "once with network access (they are then cached) or pass a local checkpoint file"
        ) from e
    return model_cfg, weights, quick_gelu or bool(pcfg.get("quick_gelu", False)), pcfg


def _load_full_model(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full CLIP state dict the way open_clip's ``load_checkpoint`` massages it, strictly."""
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    for key in ("logit_scale", "logit_bias"):
        target = getattr(model, key, None)
        if key in state and target is not None:
            state[key] = state[key].reshape(target.shape)
    logit_bias = getattr(model, "logit_bias", None)
    if isinstance(logit_bias, torch.Tensor) and "logit_bias" not in state:
        state["logit_bias"] = torch.zeros_like(logit_bias)
    state.pop("text.transformer.embeddings.position_ids", None)
    model.load_state_dict(state, strict=True)


def _load_visual(visual: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load the ``visual.*`` part of a CLIP state dict (or a visual-only one) into the tower, strictly."""
    if not any(k.startswith("visual.") for k in state):
        state = {f"visual.{k}": v for k, v in state.items()}
    holder = nn.Module()
    holder.visual = visual
    resize_pos_embed(state, holder)  # interpolate the grid to the size the tower was built for
    visual.load_state_dict({k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}, strict=True)


class CLIPEncoder(nn.Module):
    """Frozen CLIP vision tower with optional adapters, returning the patch features of selected blocks.

    After construction only adapter parameters have ``requires_grad=True``.

    Args:
        model_name: open_clip config name (``ViT-B-16``, ``usclip-test-vit``) or ``hf-hub:org/repo``.
        pretrained: open_clip tag (``openai``, ``metaclip_400m``), local checkpoint file (open_clip state dict,
            safetensors, or OpenAI TorchScript ``.pt`` with ``allow_unsafe_torchscript``), ``hf-hub:org/repo``
            (BiomedCLIP), or ``None`` for random weights.
        layers: 0-based indices of the blocks whose patch tokens are returned; no block after the deepest runs.
        image_size: the input size the tower is built for (position embeddings interpolated on load); other
            sizes are refused. ``None`` keeps the config's.
        keep_text: keep the whole CLIP model as ``text_model`` (zero-shot, contrastive tuning); the visual tower
            is then not pruned. Otherwise only the visual tower is built.
        adapter: ``"mona"``, ``"lora"`` or ``None``; ``None`` with ``adapter_checkpoint`` takes the file's.
        adapter_kwargs: fields of :class:`~usclip.adapters.MonaConfig` / :class:`~usclip.adapters.LoraConfig`.
        adapter_checkpoint: adapter file from :func:`usclip.adapters.save_adapters` to load (strictly).
        quick_gelu: force QuickGELU on or off; ``None`` follows the weights (on for OpenAI and MetaCLIP tags and
            TorchScript archives, off otherwise; timm trunks ignore it).
        allow_unsafe_torchscript: allow loading TorchScript archives, which executes code from the file.
        grad_checkpointing: recompute block activations in the backward pass to save memory.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        pretrained: str | None = None,
        layers: Sequence[int] = (3, 6, 9),
        image_size: int | tuple[int, int] | None = None,
        keep_text: bool = False,
        adapter: Literal["mona", "lora"] | None = None,
        adapter_kwargs: dict[str, Any] | None = None,
        adapter_checkpoint: str | None = None,
        quick_gelu: bool | None = None,
        allow_unsafe_torchscript: bool = False,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        register_model_configs()
        model_cfg, weights, auto_quick_gelu, preprocess = _resolve(model_name, pretrained, allow_unsafe_torchscript)
        quick_gelu = auto_quick_gelu if quick_gelu is None else quick_gelu
        if quick_gelu != auto_quick_gelu:
            log.warning("quick_gelu=%s overrides %s for pretrained=%r", quick_gelu, auto_quick_gelu, pretrained)
        vision_cfg = model_cfg["vision_cfg"]
        is_timm = "timm_model_name" in vision_cfg
        if image_size is not None and not is_timm:
            vision_cfg["image_size"] = image_size
        state = load_checkpoint_file(weights, allow_unsafe_torchscript) if weights else None

        self.text_model: nn.Module | None = None
        if keep_text:
            create_name = model_name if not (pretrained or "").startswith("hf-hub:") else str(pretrained)
            model = open_clip.create_model(
                create_name,
                load_weights=False,
                force_quick_gelu=quick_gelu,
                force_image_size=None if is_timm else image_size,
                pretrained_text=False,
            )
            if state is not None:
                _load_full_model(model, state)
            visual = model.visual
        else:
            visual = _build_vision_tower(model_cfg["embed_dim"], vision_cfg, quick_gelu=quick_gelu)
            if state is not None:
                _load_visual(visual, state)
        if is_timm and image_size is not None:
            visual.set_input_size(image_size)  # timm resamples the position embeddings
        use_fast_attention(visual)  # batch-first attention: same weights and keys, GEMMs over B * L rows

        if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
            blocks, trunk = visual.transformer.resblocks, None
        elif hasattr(visual, "trunk") and hasattr(visual.trunk, "blocks"):
            blocks, trunk = visual.trunk.blocks, visual.trunk
        else:
            raise ValueError(
                f"model_name={model_name!r} has a {type(visual).__name__} vision tower; CLIPEncoder supports "
                "open_clip VisionTransformer (transformer.resblocks) and timm ViT trunks (trunk.blocks)"
            )
        depth = len(blocks)
        wanted = sorted({int(i) for i in layers})
        if not wanted or wanted[0] < 0 or wanted[-1] >= depth:
            raise ValueError(f"layers={list(layers)} must be block indices in [0, {depth - 1}] for {model_name!r}")
        self.layers: list[int] = wanted
        if not keep_text:
            # Drop the blocks after the deepest requested one, and the pooling head they would feed.
            if trunk is None:
                visual.prune_intermediate_layers(wanted, prune_norm=True, prune_head=True)
            else:
                trunk.prune_intermediate_layers(wanted, prune_norm=True, prune_head=True)
                visual.head = nn.Identity()
        self.visual = visual
        if keep_text:
            self.text_model = model  # registered after `visual`, so adapter names start with "visual."
        if grad_checkpointing:
            visual.set_grad_checkpointing(True)
        for p in self.parameters():
            p.requires_grad_(False)

        if trunk is None:
            self.width: int = visual.transformer.width
            self.patch_size: int = visual.patch_size[0]
            size = visual.image_size
        else:
            self.width = trunk.embed_dim
            self.patch_size = trunk.patch_embed.patch_size[0]
            size = trunk.patch_embed.img_size
        self.image_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.image_mean: tuple[float, ...] = tuple(preprocess.get("mean") or open_clip.OPENAI_DATASET_MEAN)
        self.image_std: tuple[float, ...] = tuple(preprocess.get("std") or open_clip.OPENAI_DATASET_STD)
        #: identity of the encoder, stored in adapter checkpoints and checked when they load
        self.encoder_config: dict[str, Any] = {
            "model_name": model_name,
            "pretrained": pretrained,
            "image_size": list(self.image_size),
            "layers": self.layers,
            "quick_gelu": quick_gelu,
        }

        self.adapter_config: AdapterConfig | None = None
        self.targeted_module_names: list[str] = []
        if adapter is None and adapter_checkpoint is not None:
            file_meta = read_adapter_metadata(adapter_checkpoint)
            adapter, adapter_kwargs = file_meta["adapter"], {**file_meta["config"], **(adapter_kwargs or {})}
        if adapter is not None:
            self.adapter_config = build_adapter_config(adapter, adapter_kwargs)
            names = inject_adapters(self.visual, self.adapter_config)
            self.targeted_module_names = [f"visual.{n}" for n in names]
        elif adapter_kwargs:
            raise ValueError(f"adapter_kwargs={adapter_kwargs} given without an adapter; set adapter='mona' or 'lora'")
        if adapter_checkpoint is not None:
            load_adapters(self, adapter_checkpoint)

    # ----------------------------------------------------------------- whole-model (keep_text) API
    def _clip(self, what: str) -> Any:
        if self.text_model is None:
            raise RuntimeError(f"CLIPEncoder.{what} needs the text tower: build CLIPEncoder(..., keep_text=True)")
        return self.text_model

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Pooled, projected image embeddings ``(B, D)`` of normalised images (adapters included; ``keep_text``)."""
        clip = self._clip("encode_image")
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"images are {tuple(images.shape[-2:])} but the encoder was built for {self.image_size}")
        return clip.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Projected text embeddings ``(B, D)`` of token ids ``(B, context_length)`` (``keep_text``)."""
        return self._clip("encode_text").encode_text(tokens, normalize=normalize)

    @property
    def logit_scale(self) -> nn.Parameter:
        """CLIP's learned log inverse temperature (``logits = logit_scale.exp() * cos``; ``keep_text``)."""
        return self._clip("logit_scale").logit_scale

    def tokenizer(self, context_length: int | None = None) -> Any:
        """The model's own open_clip tokenizer (``None``: the model's context length, 77 for CLIP ViT-B/16)."""
        cfg = self.encoder_config
        pretrained = cfg.get("pretrained") or ""
        name = pretrained if pretrained.startswith("hf-hub:") else cfg["model_name"]
        return open_clip.get_tokenizer(name, context_length=context_length)

    @property
    def out_channels(self) -> list[int]:
        """Channels of each returned feature map."""
        return [self.width] * len(self.layers)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the adapter tensors, keyed as in ``state_dict()`` (empty without adapters)."""
        return adapter_state_dict(self)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Patch features of the selected blocks.

        Args:
            images: normalised images, ``(B, 3, H, W)`` with ``(H, W) == image_size``.

        Returns:
            One ``(B, C, H / patch, W / patch)`` map per entry of ``layers``.

        Raises:
            ValueError: wrong number of dimensions or channels, or an input size the tower was not built for.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"images are {tuple(images.shape[-2:])} but the encoder was built for image_size={self.image_size}; "
                f"resize the images, or build CLIPEncoder(image_size={images.shape[-1]}) (position embeddings are "
                "interpolated once when the weights load)"
            )
        out = self.visual.forward_intermediates(
            images, indices=self.layers, stop_early=True, intermediates_only=True, output_fmt="NCHW"
        )
        return list(out["image_intermediates"])
