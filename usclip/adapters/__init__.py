"""Parameter-efficient adapters for frozen vision transformers, injected by module replacement.

``ADAPTERS`` maps registry keys to configuration classes; the key is also the prefix of every adapter
parameter name (``lora_A``, ``mona_mlp``). Typical use::

    from usclip.adapters import LoraConfig, inject_adapters, merge_adapters, save_adapters

    inject_adapters(visual, LoraConfig(r=16))  # wraps resblocks.*.attn, freezes everything else
    ...train...
    save_adapters(encoder, "lora.safetensors")
    merge_adapters(visual)  # fold LoRA into the frozen weights for inference

See ``docs/adapters.md`` for the design, the defaults and the checkpoint format.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from usclip.adapters._checkpoint import load_adapters, read_adapter_metadata, save_adapters
from usclip.adapters._inject import (
    AdapterConfig,
    AdapterLayer,
    InjectContext,
    adapter_layers,
    adapter_parameter_names,
    adapter_state_dict,
    count_parameters,
    find_targets,
    inject_adapters,
    mark_only_adapters_trainable,
    parameter_report,
)
from usclip.adapters.lora import LoraConfig, LoraLinear, LoraMultiheadAttention, LoraQkvLinear
from usclip.adapters.mona import Mona, MonaBlock, MonaConfig, MonaTimmBlock

ADAPTERS: dict[str, type[AdapterConfig]] = {"lora": LoraConfig, "mona": MonaConfig}


def list_adapters() -> list[str]:
    """Registry keys of the available adapters."""
    return sorted(ADAPTERS)


def build_adapter_config(name: str, kwargs: dict[str, Any] | None = None) -> AdapterConfig:
    """Instantiate the configuration registered as ``name`` with ``kwargs``.

    Raises:
        ValueError: unknown adapter name or keyword (the message lists the allowed ones).
    """
    if name not in ADAPTERS:
        raise ValueError(f"adapter={name!r} is not registered; choose one of {list_adapters()} or None")
    cls = ADAPTERS[name]
    kwargs = dict(kwargs or {})
    allowed = sorted(f for f in cls.__dataclass_fields__)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"adapter_kwargs has unknown keys {unknown} for adapter={name!r}; allowed: {allowed}")
    return cls(**kwargs)


def _mergeable(module: nn.Module) -> list[AdapterLayer]:
    layers = [layer for _, layer in adapter_layers(module)]
    if not layers:
        raise ValueError(f"{type(module).__name__} holds no adapters to merge")
    bad = sorted({type(layer).__name__ for layer in layers if not hasattr(layer, "merge")})
    if bad:
        raise ValueError(f"{bad} adapters are non-linear and cannot be merged into the frozen weights; only LoRA can")
    return layers


def merge_adapters(module: nn.Module) -> None:
    """Fold every LoRA update into its frozen weight (inference speed); undo with :func:`unmerge_adapters`.

    Raises:
        ValueError: ``module`` has no adapters, or non-mergeable ones (Mona).
    """
    for layer in _mergeable(module):
        layer.merge()  # type: ignore[operator]


def unmerge_adapters(module: nn.Module) -> None:
    """Subtract the LoRA updates merged by :func:`merge_adapters` (exact up to float rounding)."""
    for layer in _mergeable(module):
        layer.unmerge()  # type: ignore[operator]


__all__ = [
    "ADAPTERS",
    "AdapterConfig",
    "AdapterLayer",
    "InjectContext",
    "LoraConfig",
    "LoraLinear",
    "LoraMultiheadAttention",
    "LoraQkvLinear",
    "Mona",
    "MonaBlock",
    "MonaConfig",
    "MonaTimmBlock",
    "adapter_layers",
    "adapter_parameter_names",
    "adapter_state_dict",
    "build_adapter_config",
    "count_parameters",
    "find_targets",
    "inject_adapters",
    "list_adapters",
    "load_adapters",
    "mark_only_adapters_trainable",
    "merge_adapters",
    "parameter_report",
    "read_adapter_metadata",
    "save_adapters",
    "unmerge_adapters",
]
