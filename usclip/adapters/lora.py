"""LoRA: low-rank adaptation of the attention projections of a frozen transformer.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022 (arXiv:2106.09685). A frozen weight
``W`` (out x in) gets a trainable update ``scale * B @ A`` with ``A`` (r x in), ``B`` (out x r) and
``scale = alpha / r`` (the LoRA paper's rule, default) or ``scale = alpha / sqrt(r)`` (rank-stabilised LoRA,
Kalajdzievski, arXiv:2312.03732, peft's ``use_rslora``; the setting of the paper we reproduce, see
``configs/adapters/lora_reference.yaml``). ``A`` starts Kaiming-uniform and ``B`` at zero, so an adapted model
computes exactly what the pretrained one does until the first optimiser step. Dropout, when set, acts on the input of
the low-rank branch only, with an independent mask per adapted projection, and only in training. The update can be
merged into ``W`` for inference and subtracted again.

Three wrappers, chosen by the type of the matched module (see ``LoraConfig.wrap``):

- :class:`LoraMultiheadAttention` wraps open_clip's ``nn.MultiheadAttention``, whose q/k/v weights live in one
  fused ``in_proj_weight``; it adds one low-rank pair per selected projection (``q``, ``k``, ``v``, ``out``).
  ``out_proj`` can only be adapted here: ``nn.MultiheadAttention`` reads ``out_proj.weight`` directly and never
  calls ``out_proj.forward``, so a wrapper on ``attn.out_proj`` would be silently ignored.
- :class:`LoraQkvLinear` wraps timm's fused ``attn.qkv`` ``nn.Linear`` (BiomedCLIP's trunk), again one pair per
  selected projection.
- :class:`LoraLinear` wraps any other ``nn.Linear`` (timm ``attn.proj``, ``mlp.c_fc``...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from usclip.adapters._inject import AdapterConfig, AdapterLayer, InjectContext
from usclip.attention import self_attention_from_qkv

_PROJECTIONS = ("q", "k", "v", "out")
_SCALINGS = ("alpha/r", "alpha/sqrt(r)")
LoraScaling = Literal["alpha/r", "alpha/sqrt(r)"]


@dataclass(kw_only=True)
class LoraConfig(AdapterConfig):
    """LoRA hyperparameters.

    By default LoRA adapts q, k and v of every attention block: ``resblocks.{i}.attn`` (open_clip
    ``nn.MultiheadAttention``, vision or text tower) or ``blocks.{i}.attn.qkv`` (timm trunks). With ``"out"`` in
    ``attn_targets`` the output projection is adapted too: ``out_proj`` inside the open_clip attention wrapper, or
    ``blocks.{i}.attn.proj`` on timm.

    The authors' setting (Qu et al.'s released code) is ``r=16, alpha=32, scaling="alpha/sqrt(r)", dropout=0.1,
    attn_targets=("q", "k", "v", "out")``: scale 8 (``configs/adapters/lora_reference.yaml``). The default keeps the
    LoRA paper's ``alpha / r`` with ``alpha = r``, scale 1; docs/adapters.md ("LoRA switches") says why.

    Args:
        r: rank of the update.
        alpha: scaling numerator (default 16 with ``r=16`` and ``alpha/r``: scale 1).
        scaling: ``"alpha/r"`` (LoRA paper, default) or ``"alpha/sqrt(r)"`` (rank-stabilised, like peft's
            ``use_rslora``); the update is multiplied by :attr:`scale`.
        dropout: dropout probability on the input of the low-rank branch (training only; the frozen path never
            sees it); one independent mask per adapted projection.
        attn_targets: attention projections to adapt, any of ``"q"``, ``"k"``, ``"v"``, ``"out"``.
        target_modules: see :class:`~usclip.adapters.AdapterConfig`.
        blocks: see :class:`~usclip.adapters.AdapterConfig`.
    """

    r: int = 16
    alpha: float = 16.0
    scaling: LoraScaling = "alpha/r"
    dropout: float = 0.0
    attn_targets: tuple[str, ...] = ("q", "k", "v")

    name: ClassVar[str] = "lora"
    structural_fields: ClassVar[tuple[str, ...]] = ("r", "alpha", "scaling", "attn_targets")
    #: files written before ``scaling`` existed used ``alpha / r``
    legacy_defaults: ClassVar[dict[str, Any]] = {"scaling": "alpha/r"}

    def __post_init__(self) -> None:
        """Validate the hyperparameters."""
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r={self.r!r} must be a positive int (LoRA rank), e.g. r=16")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha!r} must be a number > 0 (the update is scaled by alpha / r), e.g. 16")
        if self.scaling not in _SCALINGS:
            raise ValueError(
                f"scaling={self.scaling!r} must be one of {_SCALINGS}: 'alpha/r' (LoRA paper, default) or "
                "'alpha/sqrt(r)' (rank-stabilised, the authors' setting)"
            )
        self.alpha = float(self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1), e.g. 0.0 or 0.1")
        targets = tuple(self.attn_targets)
        bad = [t for t in targets if t not in _PROJECTIONS]
        if bad or not targets or len(set(targets)) != len(targets):
            raise ValueError(
                f"attn_targets={targets!r} must be a non-empty list of distinct values from {_PROJECTIONS}, "
                "e.g. ('q', 'k', 'v')"
            )
        self.attn_targets = tuple(t for t in _PROJECTIONS if t in targets)  # canonical order

    @property
    def scale(self) -> float:
        """The multiplier of ``B @ A``: ``alpha / r`` or ``alpha / sqrt(r)``, as ``scaling`` says."""
        return self.alpha / (math.sqrt(self.r) if self.scaling == "alpha/sqrt(r)" else self.r)

    def default_target_modules(self) -> str:
        """Open_clip attention modules and timm fused ``qkv`` (and ``proj`` when ``"out"`` is targeted)."""
        timm = []
        if any(t in self.attn_targets for t in "qkv"):
            timm.append("qkv")
        if "out" in self.attn_targets:
            timm.append("proj")
        return rf"(?:.*\.)?(?:resblocks\.\d+\.attn|blocks\.\d+\.attn\.(?:{'|'.join(timm)}))"

    def wrap(self, name: str, module: nn.Module, parent: nn.Module, context: InjectContext) -> nn.Module:
        """Wrap ``nn.MultiheadAttention``, a fused timm ``qkv`` linear or any other ``nn.Linear``.

        Raises:
            ValueError: ``module`` is the ``out_proj`` of an ``nn.MultiheadAttention`` (never called).
            TypeError: ``module`` is neither.
        """
        if isinstance(parent, nn.MultiheadAttention):
            raise ValueError(
                f"LoRA target {name!r} is inside nn.MultiheadAttention, which never calls its submodules' forward "
                "(it reads out_proj.weight directly), so the adapter would be silently ignored. Target the "
                "attention module itself and set attn_targets=('q', 'k', 'v', 'out') to adapt the output projection."
            )
        if isinstance(module, nn.MultiheadAttention):
            return LoraMultiheadAttention(module, self)
        if isinstance(module, nn.Linear):
            if name.rsplit(".", 1)[-1] == "qkv":
                return LoraQkvLinear(module, self)
            return LoraLinear(module, self)
        raise TypeError(
            f"LoRA cannot adapt {name!r} of type {type(module).__name__}; supported: nn.MultiheadAttention, "
            "nn.Linear. Fix target_modules."
        )


def _lora_pair(r: int, in_features: int, out_features: int, like: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    """``(A, B)``: A Kaiming-uniform as in peft and the LoRA paper's code, B zero so that the update starts at 0."""
    a = torch.empty(r, in_features, dtype=like.dtype, device=like.device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    b = torch.zeros(out_features, r, dtype=like.dtype, device=like.device)
    return nn.Parameter(a), nn.Parameter(b)


def _add_low_rank(base: torch.Tensor, h: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """``base + scale * h @ up.T`` in one GEMM; ``base`` (..., out), ``h`` (..., k), ``up`` (out, k).

    With ``up == 0`` the result equals ``base`` bit for bit, which keeps LoRA an exact identity at init.
    """
    out = torch.addmm(base.reshape(-1, base.shape[-1]), h.reshape(-1, h.shape[-1]), up.t(), alpha=scale)
    return out.view(base.shape)


class _FusedQkvLora(AdapterLayer):
    """Shared parts of the wrappers whose q/k/v weights are one fused ``(3 * d, in)`` matrix."""

    def __init__(
        self, base_layer: nn.Module, config: LoraConfig, weight: torch.Tensor, targets: tuple[str, ...]
    ) -> None:
        super().__init__(base_layer, config)
        self.r = config.r
        self.scale = config.scale
        self.targets = targets
        self.merged = False
        self.qkv_dim = weight.shape[0] // 3
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for t in targets:
            in_f, out_f = (self.qkv_dim, self._out_weight().shape[0]) if t == "out" else (weight.shape[1], self.qkv_dim)
            self.lora_A[t], self.lora_B[t] = _lora_pair(config.r, in_f, out_f, weight)
        self.qkv_targets = tuple(t for t in targets if t != "out")

    def _out_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _qkv_delta(self, x: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """``qkv`` (..., 3d) plus the low-rank updates of the selected projections, from input ``x`` (..., in).

        Without active dropout the down-projections run as one GEMM; with it, each projection draws its own mask
        (in the order q, k, v), as separate LoRA layers on q, k and v would (peft, the authors' code).
        """
        if not self.qkv_targets:
            return qkv
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            h = torch.cat([F.linear(self.lora_dropout(x), self.lora_A[t]) for t in self.qkv_targets], dim=-1)
        else:
            h = F.linear(x, torch.cat([self.lora_A[t] for t in self.qkv_targets]))  # (T*r, in) -> (..., T*r)
        # Block-diagonal up-projection (3d, T*r): zero rows for projections that are not adapted.
        blocks = [self.lora_B[t] if t in self.lora_B else h.new_zeros(self.qkv_dim, 0) for t in "qkv"]
        return _add_low_rank(qkv, h, torch.block_diag(*blocks), self.scale)

    def _delta_weight(self, t: str) -> torch.Tensor:
        return self.scale * (self.lora_B[t] @ self.lora_A[t])

    @torch.no_grad()
    def _apply_merge(self, sign: float) -> None:
        w = self._qkv_weight()
        for i, t in enumerate("qkv"):
            if t in self.qkv_targets:
                w[i * self.qkv_dim : (i + 1) * self.qkv_dim] += sign * self._delta_weight(t)
        if "out" in self.targets:
            self._out_weight().data += sign * self._delta_weight("out")

    def _qkv_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def merge(self) -> None:
        """Add the update to the frozen weights; ``forward`` then runs the base layer alone."""
        if not self.merged:
            self._apply_merge(1.0)
            self.merged = True

    def unmerge(self) -> None:
        """Subtract the update again (exact up to float rounding, ~1e-7 relative)."""
        if self.merged:
            self._apply_merge(-1.0)
            self.merged = False


class LoraMultiheadAttention(_FusedQkvLora):
    """LoRA around ``nn.MultiheadAttention`` (open_clip 3.3 ``ResidualAttentionBlock.attn``).

    Keeps MHA's call signature and ``(output, weights)`` return. Unmerged, q/k/v come from ``F.linear`` with the
    frozen fused weight plus the low-rank deltas and attention runs through ``F.scaled_dot_product_attention``
    (the op MHA itself uses); merged, the frozen module runs alone, fast path included.

    Args:
        base_layer: the attention module; needs equal q/k/v widths, no ``bias_k``/``bias_v``, no zero attention.
        config: rank, alpha, dropout and ``attn_targets``.
    """

    base_layer: nn.MultiheadAttention

    def __init__(self, base_layer: nn.MultiheadAttention, config: LoraConfig) -> None:
        if not base_layer._qkv_same_embed_dim or base_layer.bias_k is not None or base_layer.add_zero_attn:
            raise ValueError(
                "LoraMultiheadAttention needs nn.MultiheadAttention with kdim == vdim == embed_dim, no bias_k/bias_v "
                "and add_zero_attn=False (open_clip's vision blocks); got a different configuration"
            )
        super().__init__(base_layer, config, base_layer.in_proj_weight, config.attn_targets)

    def _qkv_weight(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight.data

    def _out_weight(self) -> torch.Tensor:
        return self.base_layer.out_proj.weight

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
        """Same contract as ``nn.MultiheadAttention.forward`` (masks: ``True``/``-inf`` = not attended)."""
        mha = self.base_layer
        if self.merged:
            return mha(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        self_attention = query is key and key is value
        if (
            mha.batch_first
            and self_attention
            and query.dim() == 3
            and not need_weights
            and key_padding_mask is None
            and attn_mask is None
            and not is_causal
        ):
            # The batch-first path of FastMultiheadAttention (which CLIPEncoder installs), plus the deltas: GEMMs
            # over B * L rows, q/k/v as views, SDPA. Matches the frozen module bit for bit at init.
            bsz, length, embed = query.shape
            qkv = self._qkv_delta(query, F.linear(query, mha.in_proj_weight, mha.in_proj_bias))
            out = self_attention_from_qkv(qkv, mha.num_heads, mha.dropout if self.training else 0.0)
            proj = F.linear(out, mha.out_proj.weight, mha.out_proj.bias)
            if "out" in self.targets:
                proj = _add_low_rank(
                    proj, F.linear(self.lora_dropout(out), self.lora_A["out"]), self.lora_B["out"], self.scale
                )
            return proj.view(bsz, length, embed), None
        # Other calls work sequence-first, (L, B, E), like nn.MultiheadAttention's own path: GEMM results depend
        # (by ~1e-7) on the row order, and matching it keeps LoRA at init bit-identical to the frozen attention.
        if mha.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        tgt_len, bsz, embed = query.shape
        src_len = key.shape[0]
        heads, head_dim = mha.num_heads, embed // mha.num_heads
        if self_attention:
            qkv = self._qkv_delta(query, F.linear(query, mha.in_proj_weight, mha.in_proj_bias))  # (L, B, 3E)
            # (L, B, 3E) -> 3 x (B, H, L, Dh), views
            q, k, v = qkv.view(tgt_len, bsz, 3, heads, head_dim).permute(2, 1, 3, 0, 4).unbind(0)
        else:
            q, k, v = self._separate_qkv(query, key, value)
            # (L, B, E) -> (B, H, L, Dh), views
            q = q.view(tgt_len, bsz, heads, head_dim).permute(1, 2, 0, 3)
            k = k.view(src_len, bsz, heads, head_dim).permute(1, 2, 0, 3)
            v = v.view(src_len, bsz, heads, head_dim).permute(1, 2, 0, 3)
        mask = _additive_mask(attn_mask, key_padding_mask, bsz, heads, tgt_len, src_len, q.dtype)
        dropout_p = mha.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * head_dim**-0.5) @ k.transpose(-2, -1)  # (B, H, L, S)
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(~_causal(tgt_len, src_len, q.device), float("-inf"))
            attn = scores.softmax(dim=-1)
            weights = attn.mean(dim=1) if average_attn_weights else attn
            out = F.dropout(attn, dropout_p) @ v
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal and mask is None
            )
        out = out.permute(2, 0, 1, 3).reshape(tgt_len * bsz, embed)  # (B, H, L, Dh) -> (L * B, E)
        proj = F.linear(out, mha.out_proj.weight, mha.out_proj.bias)
        if "out" in self.targets:
            proj = _add_low_rank(
                proj, F.linear(self.lora_dropout(out), self.lora_A["out"]), self.lora_B["out"], self.scale
            )
        proj = proj.view(tgt_len, bsz, embed)
        return (proj.transpose(0, 1) if mha.batch_first else proj), weights

    def _separate_qkv(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v projected from distinct inputs (cross-attention), each with its own low-rank delta."""
        mha = self.base_layer
        ws = mha.in_proj_weight.chunk(3)
        bs = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        outs = []
        for t, x, w, b in zip("qkv", (query, key, value), ws, bs, strict=True):
            y = F.linear(x, w, b)
            if t in self.qkv_targets:
                y = _add_low_rank(y, F.linear(self.lora_dropout(x), self.lora_A[t]), self.lora_B[t], self.scale)
            outs.append(y)
        return outs[0], outs[1], outs[2]


def _causal(tgt_len: int, src_len: int, device: torch.device) -> torch.Tensor:
    return torch.ones(tgt_len, src_len, dtype=torch.bool, device=device).tril()


def _additive_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    bsz: int,
    heads: int,
    tgt_len: int,
    src_len: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """MHA's masks (bool ``True`` = blocked, or additive float) as one additive ``(B|1, H|1, L, S)`` mask."""

    def additive(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is not None:
        a = additive(attn_mask)
        mask = a.view(1, 1, tgt_len, src_len) if a.dim() == 2 else a.view(bsz, heads, tgt_len, src_len)
    if key_padding_mask is not None:
        kp = additive(key_padding_mask).view(bsz, 1, 1, src_len)
        mask = kp if mask is None else mask + kp
    return mask


class LoraQkvLinear(_FusedQkvLora):
    """LoRA on a fused ``qkv`` ``nn.Linear`` (timm ``Attention.qkv``): one pair per selected q/k/v slice.

    Args:
        base_layer: the fused linear, ``out_features = 3 * d``.
        config: rank, alpha, dropout; only the ``q``/``k``/``v`` entries of ``attn_targets`` apply here.
    """

    base_layer: nn.Linear

    def __init__(self, base_layer: nn.Linear, config: LoraConfig) -> None:
        targets = tuple(t for t in config.attn_targets if t != "out")
        if base_layer.out_features % 3 or not targets:
            raise ValueError(
                f"LoraQkvLinear needs a fused qkv linear (out_features divisible by 3, got {base_layer.out_features}) "
                f"and q/k/v in attn_targets (got {config.attn_targets})"
            )
        super().__init__(base_layer, config, base_layer.weight, targets)

    def _qkv_weight(self) -> torch.Tensor:
        return self.base_layer.weight.data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in) -> (..., 3 * d)``."""
        qkv = self.base_layer(x)
        return qkv if self.merged else self._qkv_delta(x, qkv)


class LoraLinear(AdapterLayer):
    """LoRA around an ``nn.Linear``: ``y = W x + b + (alpha / r) * B A dropout(x)``.

    Args:
        base_layer: the frozen linear layer.
        config: rank, alpha, dropout.
    """

    base_layer: nn.Linear

    def __init__(self, base_layer: nn.Linear, config: LoraConfig) -> None:
        super().__init__(base_layer, config)
        self.scale = config.scale
        self.merged = False
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A, self.lora_B = _lora_pair(
            config.r, base_layer.in_features, base_layer.out_features, base_layer.weight
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in) -> (..., out)``."""
        y = self.base_layer(x)
        if self.merged:
            return y
        return _add_low_rank(y, F.linear(self.lora_dropout(x), self.lora_A), self.lora_B, self.scale)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update to the frozen weight; ``forward`` then runs the base layer alone."""
        if not self.merged:
            self.base_layer.weight += self.scale * (self.lora_B @ self.lora_A)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (exact up to float rounding)."""
        if self.merged:
            self.base_layer.weight -= self.scale * (self.lora_B @ self.lora_A)
            self.merged = False
