"""Batch-first self-attention for frozen CLIP towers: one GEMM per projection and ``scaled_dot_product_attention``.

open_clip 3.3 blocks call ``nn.MultiheadAttention`` with ``batch_first=True``. In training mode (and whenever
autograd records) PyTorch's MHA transposes the batch to ``(L, B, E)`` first, so the fused q/k/v projection
becomes a batched matmul over ``L`` small ``(B, E)`` matrices with a broadcast weight, followed by a copy that
splits q, k and v, and a second transpose-copy after attention. :class:`FastMultiheadAttention` is a subclass
with the same parameters, state-dict keys and call contract that keeps the batch first: the projections are
plain GEMMs over ``B * L`` rows (what the frozen backbone's bulk of FLOPs needs to run near the matmul peak),
q/k/v are views of the projection, and attention runs through ``F.scaled_dot_product_attention``. Cases it does
not cover (attention weights requested, masks, cross-attention, sequence-first modules) fall back to
``nn.MultiheadAttention.forward`` unchanged.

Written by hand: PyTorch's own MHA fast path is inference-only, and neither open_clip nor timm offers a
batch-first replacement for an existing ``nn.MultiheadAttention`` (timm's ``Attention`` has other parameter
names).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FastMultiheadAttention", "self_attention_from_qkv", "use_fast_attention"]


def self_attention_from_qkv(qkv: torch.Tensor, num_heads: int, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention over a fused projection: ``qkv`` ``(B, L, 3E)`` -> ``(B * L, E)`` (before the output projection).

    q, k and v are strided views of ``qkv`` (no copies); the heads are merged back with one reshape.
    """
    bsz, length, three_e = qkv.shape
    embed = three_e // 3
    q, k, v = qkv.view(bsz, length, 3, num_heads, embed // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, H, L, Dh)
    return out.transpose(1, 2).reshape(bsz * length, embed)


class FastMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose batch-first self-attention keeps the batch first (see the module docstring).

    Build it from an existing module with :meth:`from_module` (the parameters are shared, not copied).
    """

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention) -> FastMultiheadAttention:
        """A ``FastMultiheadAttention`` holding ``mha``'s parameters and settings."""
        new = cls.__new__(cls)
        # Same attributes; the registries (parameters, buffers, submodules, hooks) are new dicts of the same objects.
        new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in mha.__dict__.items()})
        return new

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same contract as ``nn.MultiheadAttention.forward``."""
        fast = (
            self.batch_first
            and query is key
            and key is value
            and query.dim() == 3
            and not need_weights
            and key_padding_mask is None
            and attn_mask is None
            and not is_causal
            and self._qkv_same_embed_dim
            and self.bias_k is None
            and not self.add_zero_attn
        )
        if not fast:
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        bsz, length, embed = query.shape
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
        out = self_attention_from_qkv(qkv, self.num_heads, self.dropout if self.training else 0.0)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias).view(bsz, length, embed), None


def use_fast_attention(module: nn.Module) -> int:
    """Replace every plain ``nn.MultiheadAttention`` under ``module`` by :class:`FastMultiheadAttention`.

    Returns:
        How many modules were replaced.
    """
    targets = [
        (name, m)
        for name, m in module.named_modules()
        if type(m) is nn.MultiheadAttention  # exact type: leave subclasses and wrappers alone
    ]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, FastMultiheadAttention.from_module(m))
    return len(targets)
