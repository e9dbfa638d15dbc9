"""Adapter-only checkpoints: safetensors with the adapter and encoder configuration in the metadata.

File layout: tensors are the adapter state dict (keys relative to the encoder, e.g.
``visual.transformer.resblocks.0.attn.lora_A.q``); the safetensors metadata holds one entry, ``usclip_adapters``,
a JSON object::

    {"format": "usclip-adapters", "format_version": 1, "adapter": "lora",
     "config": {"r": 16, "alpha": 16.0, "scaling": "alpha/r", ...}, "targets": [...],
     "encoder": {"model_name": "ViT-B-16", "pretrained": "openai", ...}}

Fields added to a configuration later are read from older files with their meaning at the time
(``AdapterConfig.legacy_defaults``: a LoRA file without ``scaling`` was trained with ``alpha / r``).

Loading checks, in order: adapter type, structural hyperparameters (rank, alpha, scaling, projections / width,
placement, variant), encoder model and weights, adapted modules (blocks), then the exact key set and shapes, and
names the first mismatch. The file's adapters of blocks the encoder pruned are skipped with a log message, so a file
from caption fine-tuning (whole tower) loads into a segmentation encoder that stops after its deepest feature block.
Nothing in the file is executed (safetensors holds raw tensors and strings); saving writes a temporary file in the
same folder and renames it, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from usclip._io import atomic_path
from usclip.adapters._inject import _BLOCK_INDEX, AdapterLayer, adapter_layers, adapter_state_dict, block_index

log = logging.getLogger(__name__)

FORMAT = "usclip-adapters"
FORMAT_VERSION = 1
METADATA_KEY = "usclip_adapters"


def _root(module: nn.Module) -> nn.Module:
    """The module whose names the file uses: the first one carrying ``encoder_config`` (a CLIPEncoder), else ``module``.

    A file saved from a Lightning task therefore loads into a bare encoder and back.
    """
    for m in module.modules():
        if isinstance(getattr(m, "encoder_config", None), dict):
            return m
    return module


def _layers_and_config(
    module: nn.Module, prefix: str = ""
) -> tuple[list[tuple[str, AdapterLayer]], str, dict[str, Any]]:
    layers = [(n, layer) for n, layer in adapter_layers(module) if n.startswith(prefix)]
    if not layers:
        raise ValueError(
            f"{type(module).__name__} holds no adapters{f' under {prefix!r}' if prefix else ''}; build it with "
            "adapter='lora' or 'mona' "
            "(or call usclip.adapters.inject_adapters) before saving or loading adapters"
        )
    configs = {json.dumps([layer.config.name, layer.config.to_dict()], sort_keys=True) for _, layer in layers}
    if len(configs) != 1:
        raise ValueError(f"{type(module).__name__} mixes adapter configurations {sorted(configs)}; save them apart")
    cfg = layers[0][1].config
    return layers, cfg.name, cfg.to_dict()


def _metadata(module: nn.Module, prefix: str = "") -> dict[str, Any]:
    root = _root(module)
    layers, name, config = _layers_and_config(root, prefix)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter": name,
        "config": config,
        "targets": [n for n, _ in layers],
        "encoder": getattr(root, "encoder_config", None),
    }


def save_adapters(module: nn.Module, path: str | os.PathLike[str], prefix: str = "") -> None:
    """Write the adapter weights of ``module`` and their configuration to a safetensors file.

    Args:
        module: a :class:`~usclip.models.CLIPEncoder`, a module containing one (a Lightning task), or any module
            with injected adapters.
        path: destination, conventionally ``*.safetensors``; written atomically (temporary file + rename).
        prefix: save only the adapters whose names (relative to the encoder) start with it, e.g. ``"visual."``
            when the text tower of a ``keep_text`` encoder holds adapters of its own.

    Raises:
        ValueError: ``module`` has no adapters, or adapters of different configurations.
    """
    root = _root(module)
    meta = _metadata(root, prefix)
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(root).items() if k.startswith(prefix)}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    log.info("saved %d %s adapter tensors to %s", len(tensors), meta["adapter"], path)


def read_adapter_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The configuration stored in an adapter file (see the module docstring for the fields).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a usclip adapter checkpoint or has an unknown format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as e:  # safetensors raises its own error types for non-safetensors files
        raise ValueError(f"{str(path)!r} is not a safetensors file written by usclip.adapters.save_adapters") from e
    if raw is None:
        raise ValueError(f"{str(path)!r} has no {METADATA_KEY!r} metadata; it was not written by save_adapters")
    meta: dict[str, Any] = json.loads(raw)
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has format {meta.get('format')!r} version {meta.get('format_version')!r}; "
            f"this usclip reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    _fill_legacy_defaults(meta, str(path))
    return meta


def _fill_legacy_defaults(meta: dict[str, Any], path: str) -> None:
    """Give a file written before a structural field existed that field's meaning at the time (``legacy_defaults``).

    E.g. LoRA files without ``scaling`` were trained with ``alpha / r``, whatever the default is today.
    """
    from usclip.adapters import ADAPTERS  # the registry imports this module

    cls = ADAPTERS.get(meta.get("adapter", ""))
    config = meta.get("config")
    if cls is None or not isinstance(config, dict):
        return
    missing = {k: v for k, v in cls.legacy_defaults.items() if k not in config}
    if missing:
        log.debug("adapter checkpoint %s predates %s; reading it with %s", path, sorted(missing), missing)
        config.update(missing)


def _is_identifier(pretrained: Any) -> bool:
    """Tags (``openai``) and hub ids name weights everywhere; file paths differ between machines."""
    if not isinstance(pretrained, str):
        return False
    return pretrained.startswith("hf-hub:") or not any(c in pretrained for c in "/\\.")


def _pruned_targets(root: nn.Module, targets: list[str]) -> list[str]:
    """Targets whose transformer block is absent from ``root`` because the encoder pruned the deeper blocks.

    A block counts as pruned when its container exists (``visual.transformer.resblocks``) but holds fewer blocks
    than the target's index; a target under a container ``root`` lacks (another architecture) is not pruned.
    """
    pruned = []
    for t in targets:
        index = block_index(t)
        if index is None:
            continue
        container = t[: _BLOCK_INDEX.search(t).start(1) - 1]  # type: ignore[union-attr]
        try:
            blocks = root.get_submodule(container)
        except AttributeError:
            continue
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and index >= len(blocks):
            pruned.append(t)
    return pruned


def _check_compatible(
    file_meta: dict[str, Any], meta: dict[str, Any], path: str, pruned: list[str] | None = None
) -> None:
    """Raise on the first mismatch between a file's adapters and the module's (``pruned`` targets are allowed)."""
    where = f"adapter checkpoint {path!r}"
    if file_meta["adapter"] != meta["adapter"]:
        raise ValueError(
            f"{where} holds {file_meta['adapter']!r} adapters but the module has {meta['adapter']!r} adapters; "
            f"build the encoder with adapter={file_meta['adapter']!r}"
        )
    for field in _structural_fields(meta["adapter"]):
        want, have = file_meta["config"].get(field), meta["config"].get(field)
        if want != have:
            raise ValueError(
                f"{where}: {meta['adapter']} {field}={want!r} in the file but {field}={have!r} in the module; "
                f"build the encoder with adapter_kwargs={{{field!r}: {want!r}}}"
            )
    enc_file, enc = file_meta.get("encoder") or {}, meta.get("encoder") or {}
    if enc_file.get("model_name") != enc.get("model_name"):
        raise ValueError(
            f"{where} was trained on model_name={enc_file.get('model_name')!r} but the encoder is "
            f"model_name={enc.get('model_name')!r}; build the encoder with the file's model_name"
        )
    p_file, p = enc_file.get("pretrained"), enc.get("pretrained")
    if p_file != p:
        if _is_identifier(p_file) and _is_identifier(p):
            raise ValueError(
                f"{where} was trained on pretrained={p_file!r} weights but the encoder has pretrained={p!r}; "
                "adapters only fit the backbone they were trained on"
            )
        log.warning("%s was trained with pretrained=%r; the encoder uses pretrained=%r", where, p_file, p)
    file_targets = [t for t in file_meta["targets"] if t not in set(pruned or ())]
    if file_targets != meta["targets"]:
        missing = sorted(set(file_targets) - set(meta["targets"]))
        extra = sorted(set(meta["targets"]) - set(file_meta["targets"]))
        raise ValueError(
            f"{where} adapts other modules than the module does: only in the file {missing[:4]}, only in the "
            f"module {extra[:4]}; build the encoder with the same layers and adapter_kwargs "
            f"(file config {file_meta['config']})"
        )


def _structural_fields(name: str) -> tuple[str, ...]:
    from usclip.adapters import ADAPTERS  # the registry imports this module

    return ADAPTERS[name].structural_fields if name in ADAPTERS else ()


@torch.no_grad()
def load_adapters(module: nn.Module, path: str | os.PathLike[str], prefix: str = "") -> None:
    """Load adapter weights saved by :func:`save_adapters` into ``module``, strictly.

    Merged LoRA layers are unmerged for the copy and merged again afterwards. One exception to strictness: the
    file's adapters of blocks the encoder pruned (a file from caption fine-tuning, which keeps every block, loaded
    into a segmentation encoder that stops after its deepest feature block) are skipped, with a log message.

    Args:
        module: a module with adapters of the same configuration as the file's.
        path: the safetensors file.
        prefix: load into the adapters whose names start with it only (see :func:`save_adapters`).

    Raises:
        ValueError: a mismatch of adapter type, hyperparameter, adapted blocks, encoder model, keys or shapes;
            the message names it and the fix.
    """
    root = _root(module)
    file_meta = read_adapter_metadata(path)
    meta = _metadata(root, prefix)
    pruned = _pruned_targets(root, file_meta["targets"])
    _check_compatible(file_meta, meta, str(path), pruned)
    own = {k: v for k, v in adapter_state_dict(root).items() if k.startswith(prefix)}
    with safe_open(str(path), framework="pt") as f:
        keys = {k for k in f.keys() if not any(k.startswith(t + ".") for t in pruned)}  # noqa: SIM118
        if pruned:
            log.info(
                "adapter checkpoint %s: skipped the adapters of %d blocks the encoder pruned (%s ...)",
                path,
                len(pruned),
                pruned[0],
            )
        if keys != set(own):
            missing, unexpected = sorted(set(own) - keys), sorted(keys - set(own))
            raise ValueError(
                f"adapter checkpoint {str(path)!r} does not match the module's adapter keys: missing {missing[:4]} "
                f"({len(missing)}), unexpected {unexpected[:4]} ({len(unexpected)})"
            )
        tensors = {k: f.get_tensor(k) for k in sorted(keys)}
    for k, t in tensors.items():
        if t.shape != own[k].shape:
            raise ValueError(
                f"adapter checkpoint {str(path)!r}: {k} has shape {tuple(t.shape)} in the file but "
                f"{tuple(own[k].shape)} in the module"
            )
    merged = [layer for _, layer in adapter_layers(root) if getattr(layer, "merged", False)]
    for layer in merged:
        layer.unmerge()  # type: ignore[operator]
    for k, t in tensors.items():
        own[k].copy_(t)
    for layer in merged:
        layer.merge()  # type: ignore[operator]
    log.info("loaded %d %s adapter tensors from %s", len(tensors), file_meta["adapter"], path)
