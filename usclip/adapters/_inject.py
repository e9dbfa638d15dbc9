"""Adapter injection by module replacement: match, replace, record, freeze and report.

The four steps follow peft's ``check_target_module_exists`` / ``inject_adapter``
(peft:src/peft/tuners/tuners_utils.py), cut down to what usclip needs:

1. **Match** module names from ``named_modules()`` by full regex (a ``str`` pattern) or by exact name / ``.suffix``
   (a list of names), then keep only the blocks listed in ``blocks``.
2. **Replace** each match with ``setattr(parent, child_name, wrapper)``; the wrapper keeps the original as
   ``base_layer``, so the adapter shows up in ``print(model)`` and ``named_modules()``.
3. **Record** the replaced names; if nothing matched, raise an error listing the patterns and real module names.
4. **Freeze and report**: every parameter that is not an adapter parameter gets ``requires_grad=False`` and one
   log line gives the trainable and total parameter counts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

log = logging.getLogger(__name__)

# Block index inside a module name: ``transformer.resblocks.7.attn`` -> 7, ``trunk.blocks.3`` -> 3.
_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:resblocks|blocks|layers)\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class InjectContext:
    """Facts about the host vision transformer that block-level adapters need.

    Attributes:
        grid_size: patch grid ``(gh, gw)`` the tower was built for; a hint for reshaping tokens, used when the
            token count matches it (otherwise a square grid is inferred from the token count).
        num_prefix_tokens: leading non-patch tokens (class, register) in each sequence.
    """

    grid_size: tuple[int, int] | None = None
    num_prefix_tokens: int = 1


@dataclass(kw_only=True)
class AdapterConfig:
    """Fields shared by every adapter configuration.

    Args:
        target_modules: which modules to wrap, relative to the module given to :func:`inject_adapters`. A ``str``
            is a regular expression that must match the whole module name; a list matches names exactly or by
            ``.suffix`` (peft semantics). ``None`` picks the adapter's default (see its class docstring).
        blocks: 0-based transformer block indices to adapt (the number after ``resblocks.``/``blocks.`` in the
            module name); ``None`` adapts every matched block.
    """

    target_modules: str | list[str] | None = None
    blocks: list[int] | None = None

    #: registry key, also the prefix of every adapter parameter name (``lora`` -> ``lora_A``)
    name: ClassVar[str] = ""
    #: fields that change the adapter weights' meaning; a checkpoint must agree on them to load
    structural_fields: ClassVar[tuple[str, ...]] = ()
    #: values of structural fields added after format version 1 shipped, for files that do not record them
    legacy_defaults: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        """Validate the shared fields and normalise sequences to lists."""
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            self.target_modules = [str(t) for t in self.target_modules]
            if not self.target_modules:
                raise ValueError("target_modules=[] matches nothing; pass None for the default targets")
        if self.blocks is not None:
            self.blocks = sorted({int(b) for b in self.blocks})
            if any(b < 0 for b in self.blocks):
                raise ValueError(f"blocks={self.blocks} must hold non-negative block indices, e.g. [0, 1, 2]")

    def default_target_modules(self) -> str:
        """Regular expression of the modules wrapped when ``target_modules`` is ``None``."""
        raise NotImplementedError

    def wrap(self, name: str, module: nn.Module, parent: nn.Module, context: InjectContext) -> nn.Module:
        """Return the adapter wrapper that replaces ``module`` (called ``name``, child of ``parent``)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible field values (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


class AdapterLayer(nn.Module):
    """Base class of adapter wrappers: holds the wrapped module as ``base_layer`` and the adapter ``config``.

    Subclasses name their own parameters and submodules with the prefix ``f"{config.name}_"``, so adapter
    parameters can be selected by name as well as by type.
    """

    config: AdapterConfig

    def __init__(self, base_layer: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.config = config

    def adapter_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the adapter's own parameters (not those of ``base_layer``)."""
        for n, p in self.named_parameters():
            if not n.startswith("base_layer."):
                yield n, p

    def extra_repr(self) -> str:
        """Show the adapter hyperparameters in ``print(model)``."""
        fields = {f: getattr(self.config, f) for f in self.config.structural_fields}
        return ", ".join(f"{k}={v}" for k, v in fields.items())


def block_index(name: str) -> int | None:
    """0-based block index in a module name (``visual.transformer.resblocks.7.attn`` -> 7), or ``None``."""
    m = _BLOCK_INDEX.search(name)
    return int(m.group(1)) if m else None


def _matches(name: str, patterns: str | Sequence[str]) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def infer_context(model: nn.Module) -> InjectContext:
    """Find the patch grid and the number of prefix tokens of the first vision transformer inside ``model``.

    Recognises timm ``VisionTransformer`` (``patch_embed.grid_size``, ``num_prefix_tokens``) and open_clip's
    ``VisionTransformer`` (``grid_size`` and one class token).
    """
    for m in model.modules():
        pe = getattr(m, "patch_embed", None)
        if pe is not None and hasattr(pe, "grid_size") and hasattr(m, "num_prefix_tokens"):
            return InjectContext(tuple(pe.grid_size), int(m.num_prefix_tokens))  # type: ignore[arg-type]
        if hasattr(m, "grid_size") and hasattr(m, "class_embedding"):
            return InjectContext(tuple(m.grid_size), 1)  # type: ignore[arg-type]
    return InjectContext()


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules of ``model`` that ``config`` would wrap.

    Raises:
        ValueError: nothing matched (the message lists the patterns and some real module names), or ``model``
            already holds adapters.
    """
    patterns = config.target_modules if config.target_modules is not None else config.default_target_modules()
    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            raise ValueError(
                f"{type(model).__name__} already holds an adapter at {name!r} ({type(module).__name__}); "
                "inject adapters once, into a fresh model"
            )
        if not name or not _matches(name, patterns):
            continue
        if config.blocks is not None and block_index(name) not in config.blocks:
            continue
        names.append(name)
    if not names:
        examples = [n for n, _ in model.named_modules() if n][:12]
        raise ValueError(
            f"{config.name} adapter: no module of {type(model).__name__} matched target_modules={patterns!r} "
            f"with blocks={config.blocks}. Some module names: {examples}. Fix target_modules (a regex matching "
            "the whole name, or a list of exact names / suffixes) or blocks."
        )
    nested = [(a, b) for a in names for b in names if b.startswith(a + ".")]
    if nested:
        raise ValueError(f"target_modules={patterns!r} matched nested modules {nested[0]}; match only one of them")
    return names


def inject_adapters(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Wrap the modules of ``model`` selected by ``config`` with adapters, freeze the rest and log the counts.

    Args:
        model: the module to adapt in place (for usclip, the CLIP visual tower).
        config: a :class:`~usclip.adapters.LoraConfig` or :class:`~usclip.adapters.MonaConfig`.

    Returns:
        The names of the replaced modules, in ``named_modules()`` order.

    Raises:
        ValueError: nothing matched, or a match cannot be adapted.
        TypeError: a matched module has a type the adapter does not support.
    """
    names = find_targets(model, config)
    context = infer_context(model)
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = config.wrap(name, getattr(parent, child_name), parent, context)
        setattr(parent, child_name, wrapper)
    mark_only_adapters_trainable(model)
    log.info("%s adapters in %d modules; %s", config.name, len(names), parameter_report(model))
    return names


def adapter_layers(module: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """``(name, layer)`` of every adapter wrapper inside ``module`` (each module once)."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, AdapterLayer)]


def adapter_parameter_names(module: nn.Module) -> list[str]:
    """Qualified names of the adapter parameters of ``module``."""
    names: list[str] = []
    for name, layer in adapter_layers(module):
        prefix = f"{name}." if name else ""
        names.extend(prefix + n for n, _ in layer.adapter_named_parameters())
    return names


def mark_only_adapters_trainable(module: nn.Module) -> None:
    """Set ``requires_grad`` to ``True`` for adapter parameters and ``False`` for every other parameter."""
    adapter_ids = {id(p) for _, layer in adapter_layers(module) for _, p in layer.adapter_named_parameters()}
    for p in module.parameters():
        p.requires_grad_(id(p) in adapter_ids)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of ``module`` (shared parameters counted once)."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def parameter_report(module: nn.Module) -> str:
    """One line: ``trainable params: 737,280 || all params: 86,929,408 || trainable%: 0.8481``."""
    trainable, total = count_parameters(module)
    return (
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
    )


def adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """State-dict entries (parameters and buffers) of the adapters inside ``module``, detached.

    Keys are relative to ``module``; the frozen weights of the wrapped layers are left out.
    """
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(module):
        prefix = f"{name}." if name else ""
        for key, value in layer.state_dict().items():
            if not key.startswith("base_layer."):
                out[prefix + key] = value.detach()
    return out
