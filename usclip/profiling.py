"""FLOP counting for benchmarks and cost tests: ``torch.utils.flop_counter`` plus CPU attention.

``FlopCounterMode`` knows the CUDA kernels of ``scaled_dot_product_attention`` but not the CPU flash-attention
ops, so on CPU the attention GEMMs of a ViT (about 4 % of a ViT-B/16 forward at 224 px) would go uncounted.
:func:`flop_counter` registers them with torch's own SDPA formulas. Written by hand because torch (2.14) does
not map these two ops.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["flop_counter"]

_aten = torch.ops.aten


# FlopCounterMode calls custom formulas with the shapes of tensor arguments, not the tensors.
def _cpu_sdpa_flop(query: torch.Size, key: torch.Size, value: torch.Size, *args: Any, **kwargs: Any) -> int:
    return int(sdpa_flop_count(query, key, value))


def _cpu_sdpa_backward_flop(
    grad_out: torch.Size, query: torch.Size, key: torch.Size, value: torch.Size, *args: Any, **kwargs: Any
) -> int:
    return int(sdpa_backward_flop_count(grad_out, query, key, value))


def flop_counter(display: bool = False) -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts CPU ``scaled_dot_product_attention`` (forward and backward).

    Example::

        with (counter := flop_counter()):
            model(images).sum().backward()
        counter.get_total_flops()
    """
    custom: dict[Any, Any] = {}
    for name, fn in (
        ("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa_flop),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_backward_flop),
    ):
        if hasattr(_aten, name):  # present in every torch usclip supports; guarded for forks
            custom[getattr(_aten, name)] = fn
    return FlopCounterMode(display=display, custom_mapping=custom)
