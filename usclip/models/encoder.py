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

**Weights that must load.** Named weights that cannot be found, fetched or loaded strictly raise one
:class:`PretrainedWeightsError` saying where they come from (the Hugging Face repo and file open_clip asks for, the
cache it reads, whether ``HF_HUB_OFFLINE`` is set) and how to get them. Random weights only with ``pretrained=None``.
"""

from __future__ import annotations

import json
import logging
import os
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
#: file suffixes that make a ``pretrained`` string a path rather than an open_clip tag
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
#: weight files that no open_clip tag or Hub id provides, by file name: where to download them
KNOWN_WEIGHT_FILES: dict[str, str] = {
    "unimed_clip_vit_b16.pt": (
        "UniMed-CLIP ViT-B/16 (use model_name ViT-B-16-quickgelu): download unimed_clip_vit_b16.pt from the link in "
        "the README of https://github.com/mbzuai-oryx/UniMed-CLIP and save it at that path"
    ),
    # the authors' ckpt/ folder (github.com/jinggqu/NextGen-UIA, ckpt/README.md)
    "ViT-B-16.pt": (
        "OpenAI CLIP ViT-B/16 as OpenAI distributed it (a TorchScript archive: it needs allow_unsafe_torchscript); "
        "pretrained: openai loads the same weights as safetensors from the Hugging Face Hub instead"
    ),
    "dinov2_vitb14_pretrain.pth": (
        "DINOv2 ViT-B/14 as Meta released it (https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/"
        "dinov2_vitb14_pretrain.pth); configs/baselines/dinov2_authors.yaml reads this file, and "
        "configs/baselines/dinov2.yaml loads the same weights through timm "
        "(model_name timm:vit_base_patch14_dinov2, pretrained lvd142m)"
    ),
}
# Non-weight entries of OpenAI's TorchScript state dicts (and open_clip's non-persistent causal mask).
_TORCHSCRIPT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


class PretrainedWeightsError(RuntimeError):
    """Named pretrained weights cannot be found, fetched or loaded; the message says where to get them."""


def _cause(err: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, shortened: the reason under a weights error, not a wall of text."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _hf_cache_note() -> str:
    """Where huggingface_hub reads and writes, and whether it may download (read at call time, not import)."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return (
            f"HF_HUB_OFFLINE is set, so nothing is downloaded and the Hugging Face cache ({constants.HF_HUB_CACHE}) "
            "must already hold the files"
        )
    return (
        f"it is downloaded once into the Hugging Face cache ({constants.HF_HUB_CACHE}); without network access "
        "that cache must already hold the files"
    )


_WEIGHTS_FORMAT = (
    "an open_clip/CLIP state dict as .safetensors or a torch.save'd .pt/.pth/.bin (optionally under a 'state_dict' "
    "key; only the visual.* keys are used unless the text tower is kept), or an OpenAI TorchScript .pt with "
    "allow_unsafe_torchscript=True"
)


def looks_like_path(pretrained: str) -> bool:
    """Whether a ``pretrained`` string names a file (a path separator or a weights suffix), not a tag or Hub id."""
    if pretrained.startswith("hf-hub:"):
        return False
    return "/" in pretrained or "\\" in pretrained or pretrained.lower().endswith(WEIGHT_FILE_SUFFIXES)


def check_weights_file(pretrained: str | None, model_name: str) -> None:
    """Raise :class:`PretrainedWeightsError` when ``pretrained`` names a file that does not exist.

    The message gives the path as given and as resolved, the expected format and, for files in
    :data:`KNOWN_WEIGHT_FILES`, where to download them.
    """
    if pretrained is None or not looks_like_path(pretrained):
        return
    path = Path(pretrained).expanduser()
    if path.is_file():
        return
    what = "is a directory, not a weights file" if path.is_dir() else "does not exist"
    hint = KNOWN_WEIGHT_FILES.get(path.name)
    raise PretrainedWeightsError(
        f"pretrained={pretrained!r} {what} (resolved to {path.resolve()}). Expected a weights file for "
        f"model_name={model_name!r}: {_WEIGHTS_FORMAT}."
        + (f" These are the weights of {hint}." if hint else "")
        + " Write pretrained: null for random weights."
    )


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


def _hub_error(hub_id: str, err: BaseException, what: str) -> PretrainedWeightsError:
    model_id = hub_id[len("hf-hub:") :]
    return PretrainedWeightsError(
        f"could not fetch {hub_id!r} ({what}): open_clip reads open_clip_config.json and the weights "
        f"open_clip_model.safetensors (or open_clip_pytorch_model.bin) of the Hugging Face Hub repo {model_id!r}; "
        f"{_hf_cache_note()}. Fix: fetch them once with network access (`hf download {model_id}`), or pass a local "
        f"weights file as pretrained ({_WEIGHTS_FORMAT}) with model_name={hub_id!r} for the architecture. "
        f"Cause: {_cause(err)}"
    )


def _hub_config(hub_id: str) -> dict[str, Any]:
    """The ``open_clip_config.json`` of an ``hf-hub:org/repo`` open_clip model."""
    try:
        path = download_pretrained_from_hf(hub_id[len("hf-hub:") :], filename="open_clip_config.json")
        with open(path, encoding="utf-8") as f:
            cfg: dict[str, Any] = json.load(f)
    except Exception as e:  # huggingface_hub raises many error types (offline, missing repo, auth)
        raise _hub_error(hub_id, e, "its model config") from e
    return cfg


def _hub_weights(hub_id: str) -> str:
    """Local path of the weights of an ``hf-hub:org/repo`` open_clip model (safetensors preferred, as open_clip)."""
    try:
        return str(download_pretrained_from_hf(hub_id[len("hf-hub:") :]))
    except Exception as e:
        raise _hub_error(hub_id, e, "its weights") from e


def _tag_error(model_name: str, tag: str, pcfg: dict[str, Any], err: BaseException) -> PretrainedWeightsError:
    hub, url = pcfg.get("hf_hub", ""), pcfg.get("url", "")
    if hub:
        repo, filename = os.path.split(hub)
        files = repr(filename) if filename else "'open_clip_model.safetensors' (or 'open_clip_pytorch_model.bin')"
        where = f"open_clip fetches them from the Hugging Face Hub repo {repo!r}, file {files}; {_hf_cache_note()}"
        fetch = f"`hf download {repo} {filename or 'open_clip_model.safetensors'}`"
    else:
        where = f"open_clip downloads them from {url} into ~/.cache/clip"
        fetch = f"download {url}"
    return PretrainedWeightsError(
        f"could not fetch the {model_name!r} {tag!r} weights: {where}. Fix: fetch them once with network access "
        f"({fetch}), or pass a local weights file as pretrained ({_WEIGHTS_FORMAT}). Cause: {_cause(err)}"
    )


def _resolve(
    model_name: str, pretrained: str | None, allow_unsafe_torchscript: bool
) -> tuple[dict[str, Any], str | None, bool, dict[str, Any]]:
    """``(model_cfg, weights_file, quick_gelu, preprocess_cfg)`` for a model name and a weights source.

    The architecture comes from ``pretrained`` when it is an ``hf-hub:`` id (``model_name`` is then ignored, or must
    be the same id), else from ``model_name`` (an open_clip config name, or an ``hf-hub:`` id whose
    ``open_clip_config.json`` is read). Weights: ``None`` (random), a local file, an open_clip tag of ``model_name``,
    or the ``hf-hub:`` repo's own weights.
    """
    if pretrained == "":
        raise ValueError("pretrained='' is empty: give an open_clip tag, a weights file, an 'hf-hub:' id, or null")
    if pretrained is not None and pretrained.startswith("hf-hub:"):
        if model_name.startswith("hf-hub:") and model_name != pretrained:
            raise ValueError(
                f"model_name={model_name!r} and pretrained={pretrained!r} name two different Hub models; "
                "give the same hf-hub id for both (or an open_clip name as model_name)"
            )
        if not model_name.startswith("hf-hub:"):
            log.info("pretrained=%r brings its own architecture; model_name=%r is not used", pretrained, model_name)
        cfg = _hub_config(pretrained)
        model_cfg = cfg.get("model_cfg", cfg)
        weights = _hub_weights(pretrained)
        return model_cfg, weights, bool(model_cfg.get("quick_gelu", False)), cfg.get("preprocess_cfg", {})
    check_weights_file(pretrained, model_name)
    if model_name.startswith("hf-hub:"):
        if pretrained is not None and not Path(pretrained).expanduser().is_file():
            raise ValueError(
                f"pretrained={pretrained!r} is not a file: with model_name={model_name!r} give a weights file, the "
                "same hf-hub id (the repo's own weights) or null"
            )
        cfg = _hub_config(model_name)
        model_cfg = cfg.get("model_cfg", cfg)
        quick_gelu = bool(model_cfg.get("quick_gelu", False))
        preprocess = cfg.get("preprocess_cfg", {})
    else:
        found = open_clip.get_model_config(model_name)
        if found is None:
            raise ValueError(
                f"model_name={model_name!r} is not an open_clip model config; use one of open_clip.list_models() "
                "(e.g. 'ViT-B-16', 'usclip-test-vit') or an 'hf-hub:org/repo' id"
            )
        model_cfg, quick_gelu, preprocess = found, bool(found.get("quick_gelu", False)), {}
    if pretrained is None:
        return model_cfg, None, quick_gelu, preprocess
    path = Path(pretrained).expanduser()
    if path.is_file():
        # Only OpenAI shipped TorchScript CLIP archives, and their weights were trained with QuickGELU.
        ts = is_torchscript_archive(path)
        return model_cfg, str(path), quick_gelu or (ts and allow_unsafe_torchscript), preprocess
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        raise ValueError(
            f"pretrained={pretrained!r} is neither an existing file nor a pretrained tag of {model_name!r} "
            f"(tags: {sorted(tags)}); pass a tag, a weights file, an 'hf-hub:org/repo' id or null (random weights)"
        )
    pcfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    try:
        weights = download_pretrained(pcfg)
    except Exception as e:  # download errors come from urllib or huggingface_hub
        raise _tag_error(model_name, pretrained, pcfg, e) from e
    if not weights:
        raise _tag_error(model_name, pretrained, pcfg, FileNotFoundError("open_clip returned no file"))
    return model_cfg, weights, quick_gelu or bool(pcfg.get("quick_gelu", False)), pcfg


def _check_keys(module: nn.Module, state: dict[str, torch.Tensor], source: str, what: str) -> None:
    """Raise :class:`PretrainedWeightsError` unless ``state`` has exactly the keys and shapes of ``module``."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise PretrainedWeightsError(
            f"pretrained={source!r} does not fit {what}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(shapes)} shape mismatches {shapes[:3]}. "
            f"Expected {_WEIGHTS_FORMAT}, of the architecture model_name names (e.g. ViT-B-16 vs ViT-B-32)."
        )


def _load_full_model(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
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
    _check_keys(model, state, source, "the whole CLIP model (keep_text)")
    model.load_state_dict(state, strict=True)


def _load_visual(visual: nn.Module, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Load the ``visual.*`` part of a CLIP state dict (or a visual-only one) into the tower, strictly."""
    if not any(k.startswith("visual.") for k in state):
        state = {f"visual.{k}": v for k, v in state.items()}
    holder = nn.Module()
    holder.visual = visual
    resize_pos_embed(state, holder)  # interpolate the grid to the size the tower was built for
    visual_state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    _check_keys(visual, visual_state, source, "the visual tower (keys after 'visual.')")
    visual.load_state_dict(visual_state, strict=True)


def _build_tower(embed_dim: int, vision_cfg: dict[str, Any], quick_gelu: bool, empty: bool) -> nn.Module:
    """open_clip's vision tower; ``empty=True`` skips the random initialisation that loaded weights overwrite.

    The tower is then built on the meta device and given uninitialised CPU storage (``to_empty``): every tensor is
    a parameter or persistent buffer that the strict load fills (:func:`_check_keys` refuses a partial file). A
    tower with non-persistent buffers, which no file fills, or one whose constructor needs real tensors, is built
    normally. Random initialisation of ViT-B/16 takes seconds on a small CPU; the meta build a fraction of one.
    """
    if empty:
        try:
            with torch.device("meta"):
                visual = _build_vision_tower(embed_dim, vision_cfg, quick_gelu=quick_gelu)
        except Exception:  # a constructor that reads tensor values (.item()) cannot run on meta
            log.debug("vision tower cannot be built on the meta device; initialising it normally", exc_info=True)
        else:
            persistent = set(visual.state_dict())
            if all(name in persistent for name, _ in visual.named_buffers()):
                return visual.to_empty(device="cpu")
    return _build_vision_tower(embed_dim, vision_cfg, quick_gelu=quick_gelu)


class CLIPEncoder(nn.Module):
    """Frozen CLIP vision tower with optional adapters, returning the patch features of selected blocks.

    After construction only adapter parameters have ``requires_grad=True``.

    Args:
        model_name: open_clip config name (``ViT-B-16``, ``ViT-B-16-quickgelu``, ``usclip-test-vit``) or
            ``hf-hub:org/repo`` (the architecture in that repo's ``open_clip_config.json``).
        pretrained: open_clip tag (``openai``, ``metaclip_400m``), local checkpoint file (open_clip state dict,
            safetensors, or OpenAI TorchScript ``.pt`` with ``allow_unsafe_torchscript``), ``hf-hub:org/repo``
            (BiomedCLIP: architecture and weights from the Hub), or ``None`` for random weights. Weights that
            cannot be found, fetched or loaded strictly raise :class:`PretrainedWeightsError`.
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
        if state is None:
            log.info("CLIPEncoder(%s): random weights (pretrained=None)", model_name)
        source = str(pretrained)

        self.text_model: nn.Module | None = None
        if keep_text:
            create_name = str(pretrained) if (pretrained or "").startswith("hf-hub:") else model_name
            model = open_clip.create_model(
                create_name,
                load_weights=False,
                force_quick_gelu=quick_gelu,
                force_image_size=None if is_timm else image_size,
                pretrained_text=False,
            )
            if state is not None:
                _load_full_model(model, state, source)
            visual = model.visual
        else:
            visual = _build_tower(model_cfg["embed_dim"], vision_cfg, quick_gelu, empty=state is not None)
            if state is not None:
                _load_visual(visual, state, source)
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
