"""Mona: multi-cognitive visual adapter, inserted after the residual sums of transformer blocks.

Yin et al., "5%>100%: Breaking Performance Shackles of Full Fine-Tuning on Visual Recognition Tasks", CVPR 2025
(arXiv:2408.08345; reference code github.com/Leiyi-Hu/mona). One Mona module computes, on tokens ``x`` (B, L, C)::

    z = LN(x) * gamma + x * gammax                 # gamma = 1e-6, gammax = 1 at init
    h = down(z)                                    # C -> 64
    h_patch = (dw3(h) + dw5(h) + dw7(h)) / 3 + h   # depth-wise 3x3, 5x5, 7x7 on the 2-D patch grid
    h_patch = conv1x1(h_patch) + h_patch
    out = x + up(dropout(gelu(h)))                 # 64 -> C

Only the patch tokens go through the convolutions, on their ``(gh, gw)`` grid; the class (prefix) tokens skip
them (and, with ``placement="released"``, the whole module: see below). The grid is taken from the token count
of the actual input (with the tower's grid as a hint for non-square inputs), not from a constant. Parameter
names follow the reference code (``project1``, ``adapter_conv.conv1``...), so its checkpoints map one to one.

**Placement.** ``MonaConfig.placement`` puts Mona after the attention residual (``"attn"``), after the MLP
residual (``"mlp"``), after both with two modules (``"both"``, as Yin et al. do in Swin), or after both with one
shared module as the paper-release code does (``"released"``). Qu et al. (arXiv:2506.08849) published two codes:

- the paper-release commit (``release:models/openai/model.py:246-286``) builds one Mona per block and applies it
  twice, after the attention residual and again after the MLP residual, with the same weights. Its class token
  bypasses Mona (no LayerNorm, projections or convolutions) and leaves each application doubled
  (``cat([cls, x]) + cat([cls, delta])``, lines 56 and 76), so a block maps the class token ``c`` to
  ``4 (c + a) + 2 m`` (``a`` the attention output, ``m = mlp(ln_2(2 (c + a)))``): its residual stream grows
  about fourfold per block. Mona runs only where the tokens
  after the first form a square grid (``H * W == N``, lines 271-283), which skips the text tower. ``"released"``
  reproduces this exactly, doubling included: the doubling is a quirk of that code, and the switch exists to
  reproduce the paper's CLIP (Mona) rows, which most likely came from it;
- the later ``src/`` code (``later:src/adapters/mona.py:551-571`` and ``656-676``) adds one Mona after each
  whole block, i.e. after the MLP residual, the class token going through the projections but not the
  convolutions. That is ``"mlp"``.

The default is ``"mlp"``: it is the authors' later layout, trains as many parameters as ``"released"``, and has no
class token that grows fourfold per block; ``"both"`` doubles the adapter parameters.

**Initialisation.** ``init="mona"`` (default) keeps the reference initialisation: PyTorch's default for the
linear and convolution layers, so the adapted model is *not* an identity at init (the up-projection adds a
small random term). This is what both papers trained with. ``init="zero"`` zeroes the up-projection instead:
the model starts exactly at the pretrained one (like LoRA), and the other Mona weights receive gradients from
the second step on.

**Variants (beyond the paper).** ``MonaConfig.variant`` also offers the variants of Qu et al.'s later code
(github.com/jinggqu/NextGen-UIA, ``src/adapters/mona.py``; the paper-release code has the plain Mona only):
``"noise_aware"`` weights the three convolutions by a softmax computed from the pooled input, ``"freq_enhanced"``
multiplies the input of the convolutions by a learnable per-channel "frequency filter" (applied there between
``rfft2`` and ``irfft2``; since every frequency of a channel gets the same real factor it is a per-channel scale,
computed here without the FFTs), and ``"hybrid"`` combines both. ``"baseline"`` (default) is Yin et al.'s Mona.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from usclip.adapters._inject import AdapterConfig, AdapterLayer, InjectContext

_PLACEMENTS = ("attn", "mlp", "both", "released")
_INITS = ("mona", "zero")
_VARIANTS = ("baseline", "noise_aware", "freq_enhanced", "hybrid")
# open_clip 3.3 ResidualAttentionBlock and timm Block attributes re-composed by the wrappers below.
OPEN_CLIP_BLOCK_ATTRS = ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2")
TIMM_BLOCK_ATTRS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


@dataclass(kw_only=True)
class MonaConfig(AdapterConfig):
    """Mona hyperparameters.

    By default Mona wraps every transformer block: ``resblocks.{i}`` (open_clip) or ``blocks.{i}`` (timm trunks).

    Args:
        hidden_dim: width of the down-projection (64 in the paper).
        placement: ``"mlp"`` (default: one Mona after the MLP residual, the authors' later code), ``"attn"``,
            ``"both"`` (two modules, after attention and after the MLP, as the original Mona) or ``"released"``
            (one module applied after attention and again after the MLP, the class token bypassing it and doubled
            at each application: the paper-release code, reproduced quirk included; needs one class token and a
            square patch grid).
        dropout: dropout before the up-projection (0.1 in the reference code).
        init: ``"mona"`` (reference init, not an identity) or ``"zero"`` (zero up-projection, identity at init).
        variant: ``"baseline"`` (Yin et al.'s Mona, default) or, beyond the paper, the variants of Qu et al.'s
            published code: ``"noise_aware"`` (input-dependent weighting of the three convolutions),
            ``"freq_enhanced"`` (learnable per-channel "frequency filter") and ``"hybrid"`` (both); see
            :class:`MonaOp`.
        target_modules: see :class:`~usclip.adapters.AdapterConfig`.
        blocks: see :class:`~usclip.adapters.AdapterConfig`.
    """

    hidden_dim: int = 64
    placement: Literal["attn", "mlp", "both", "released"] = "mlp"
    dropout: float = 0.1
    init: Literal["mona", "zero"] = "mona"
    variant: Literal["baseline", "noise_aware", "freq_enhanced", "hybrid"] = "baseline"

    name: ClassVar[str] = "mona"
    structural_fields: ClassVar[tuple[str, ...]] = ("hidden_dim", "placement", "variant")

    def __post_init__(self) -> None:
        """Validate the hyperparameters."""
        super().__post_init__()
        if isinstance(self.hidden_dim, bool) or not isinstance(self.hidden_dim, int) or self.hidden_dim < 1:
            raise ValueError(f"hidden_dim={self.hidden_dim!r} must be a positive int, e.g. 64")
        if self.placement not in _PLACEMENTS:
            raise ValueError(f"placement={self.placement!r} must be one of {_PLACEMENTS}; the default is 'mlp'")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1), e.g. 0.1")
        if self.init not in _INITS:
            raise ValueError(f"init={self.init!r} must be one of {_INITS}")
        if self.variant not in _VARIANTS:
            raise ValueError(f"variant={self.variant!r} must be one of {_VARIANTS}; the default is 'baseline'")
        if self.variant in ("noise_aware", "hybrid") and self.hidden_dim < 4:
            raise ValueError(f"variant={self.variant!r} needs hidden_dim >= 4 (its estimator has hidden_dim // 4)")

    @property
    def placements(self) -> tuple[str, ...]:
        """Residual sums followed by Mona: ``("mlp",)``, ``("attn",)``, or ``("attn", "mlp")`` (both, released)."""
        return ("attn", "mlp") if self.placement in ("both", "released") else (self.placement,)

    def default_target_modules(self) -> str:
        """Every open_clip ``resblocks.{i}`` and timm ``blocks.{i}``."""
        return r"(?:.*\.)?(?:resblocks|blocks)\.\d+"

    def wrap(self, name: str, module: nn.Module, parent: nn.Module, context: InjectContext) -> nn.Module:
        """Wrap an open_clip ``ResidualAttentionBlock`` or a timm ``Block``.

        Raises:
            TypeError: ``module`` is another kind of block.
        """
        if all(hasattr(module, a) for a in OPEN_CLIP_BLOCK_ATTRS) and isinstance(module.attn, nn.MultiheadAttention):
            return MonaBlock(module, self, context)
        if all(hasattr(module, a) for a in TIMM_BLOCK_ATTRS) and hasattr(module.mlp, "fc1"):
            return MonaTimmBlock(module, self, context)
        raise TypeError(
            f"Mona cannot wrap {name!r} of type {type(module).__name__}: expected an open_clip ResidualAttentionBlock "
            f"(attributes {OPEN_CLIP_BLOCK_ATTRS}, attn an nn.MultiheadAttention) or a timm Block "
            f"(attributes {TIMM_BLOCK_ATTRS}). Fix target_modules."
        )


class MonaOp(nn.Module):
    """Multi-scale depth-wise convolutions on the patch grid: ``y = P(m) + m``, ``m = mean(dw3, dw5, dw7)(x) + x``.

    With ``variant`` (beyond the paper, from Qu et al.'s published code): ``"noise_aware"`` replaces the mean by
    input-dependent weights ``softmax(W2 relu(W1 avgpool(x)))`` over the three convolutions (``noise_estimator``);
    ``"freq_enhanced"`` feeds the convolutions ``irfft2(rfft2(x) * f)`` with a learnable per-channel ``f``
    (``freq_filter``), the residual keeping ``x``; ``"hybrid"`` does both, the weights computed from the filtered
    input.

    Args:
        dim: channels (Mona's hidden width).
        variant: ``"baseline"`` (Yin et al.), ``"noise_aware"``, ``"freq_enhanced"`` or ``"hybrid"``.
    """

    def __init__(self, dim: int, variant: str = "baseline") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=5, padding=2, groups=dim)
        self.conv3 = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.projector = nn.Conv2d(dim, dim, kernel_size=1)
        self.freq_filter = nn.Parameter(torch.ones(dim)) if variant in ("freq_enhanced", "hybrid") else None
        self.noise_estimator = (
            nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(dim, dim // 4, 1),
                nn.ReLU(),
                nn.Conv2d(dim // 4, 3, 1),
                nn.Softmax(dim=1),
            )
            if variant in ("noise_aware", "hybrid")
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, gh, gw) -> (B, C, gh, gw)``.

        Computes the reference function with two convolutions instead of four: the three depth-wise convs share
        the "same" padding, so their (weighted) mean plus ``x`` is one 7x7 depth-wise conv whose kernel is the
        mean of the zero-padded kernels plus a 1 at the centre; ``P(m) + m`` is one 1x1 conv with weight
        ``P + I``. The frequency filter multiplies every frequency of a channel by the same real number, so by
        linearity of the Fourier transform it equals scaling that channel, which folds into the kernel too.
        Input-dependent weights give one kernel per sample, applied as a grouped convolution.
        """
        bsz, dim, gh, gw = x.shape
        kernels = torch.stack(
            [F.pad(self.conv1.weight, (2, 2, 2, 2)), F.pad(self.conv2.weight, (1, 1, 1, 1)), self.conv3.weight]
        )  # (3, C, 1, 7, 7)
        biases = torch.stack([self.conv1.bias, self.conv2.bias, self.conv3.bias])  # type: ignore[list-item]
        centre = kernels.new_zeros(7, 7)
        centre[3, 3] = 1.0
        scale = self.freq_filter.view(dim, 1, 1, 1) if self.freq_filter is not None else None
        if self.noise_estimator is None:
            kernel = kernels.mean(0) if scale is None else kernels.mean(0) * scale
            m = F.conv2d(x, kernel + centre, biases.mean(0), padding=3, groups=dim)
        else:
            pooled = x.mean(dim=(2, 3), keepdim=True)  # the estimator's avgpool, taken before the filter's scale
            if self.freq_filter is not None:
                pooled = pooled * self.freq_filter.view(1, dim, 1, 1)
            w = self.noise_estimator[1:](pooled).view(bsz, 3)  # (B, 3), softmax over the three convolutions
            kernel = torch.einsum("bi,icjkl->bcjkl", w, kernels)  # (B, C, 1, 7, 7): one kernel per sample
            if scale is not None:
                kernel = kernel * scale
            bias = w @ biases  # (B, C)
            # (B, C, gh, gw) -> (1, B*C, gh, gw): a depth-wise conv over B*C channels applies each sample's kernel
            m = F.conv2d(
                x.reshape(1, bsz * dim, gh, gw),
                (kernel + centre).reshape(bsz * dim, 1, 7, 7),
                bias.reshape(-1),
                padding=3,
                groups=bsz * dim,
            ).view(bsz, dim, gh, gw)
        eye = torch.eye(dim, dtype=x.dtype, device=x.device).view(dim, dim, 1, 1)
        return F.conv2d(m, self.projector.weight + eye, self.projector.bias)


class Mona(nn.Module):
    """One Mona module on a token sequence ``(B, L, C)`` whose first ``num_prefix_tokens`` skip the convolutions.

    Args:
        dim: token width ``C``.
        hidden_dim: down-projection width.
        dropout: dropout before the up-projection.
        init: ``"mona"`` (reference) or ``"zero"`` (zero up-projection, identity at init).
        num_prefix_tokens: leading class/register tokens.
        grid_size: the tower's patch grid, used when it matches the token count (non-square inputs).
        variant: convolution variant, see :class:`MonaOp`.
        prefix: what happens to the prefix tokens: ``"adapt"`` (default) passes them through the LayerNorm and both
            projections, skipping only the convolutions; ``"double"`` (the paper-release code) passes them around
            Mona entirely and returns them doubled, ``2 * x_prefix``.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int = 64,
        dropout: float = 0.1,
        init: str = "mona",
        num_prefix_tokens: int = 1,
        grid_size: tuple[int, int] | None = None,
        variant: str = "baseline",
        prefix: Literal["adapt", "double"] = "adapt",
    ) -> None:
        super().__init__()
        if prefix not in ("adapt", "double"):
            raise ValueError(f"prefix={prefix!r} must be 'adapt' or 'double'")
        self.num_prefix_tokens = num_prefix_tokens
        self.grid_size = grid_size
        self.prefix = prefix
        self.norm = nn.LayerNorm(dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))
        self.gammax = nn.Parameter(torch.ones(dim))
        self.project1 = nn.Linear(dim, hidden_dim)
        self.adapter_conv = MonaOp(hidden_dim, variant)
        self.dropout = nn.Dropout(dropout)
        self.project2 = nn.Linear(hidden_dim, dim)
        if init == "zero":
            nn.init.zeros_(self.project2.weight)
            nn.init.zeros_(self.project2.bias)

    def extra_repr(self) -> str:
        """Prefix tokens and grid hint in ``print(model)``."""
        return f"num_prefix_tokens={self.num_prefix_tokens}, grid_size={self.grid_size}, prefix={self.prefix!r}"

    def _grid(self, num_patches: int) -> tuple[int, int]:
        if self.grid_size is not None and self.grid_size[0] * self.grid_size[1] == num_patches:
            return self.grid_size
        side = math.isqrt(num_patches)
        if side * side == num_patches:
            return side, side
        raise ValueError(
            f"Mona got {num_patches} patch tokens (after {self.num_prefix_tokens} prefix tokens), which is neither "
            f"the tower's grid {self.grid_size} nor a square; feed images of the size the encoder was built for"
        )

    def _delta(self, x: torch.Tensor, p: int) -> torch.Tensor:
        """``project2(dropout(gelu(h)))`` for tokens ``x`` whose first ``p`` skip the convolutions."""
        # LN(x) * gamma + x * gammax, with gamma folded into the LayerNorm affine: two passes over x instead of four.
        z = F.layer_norm(
            x, self.norm.normalized_shape, self.norm.weight * self.gamma, self.norm.bias * self.gamma, self.norm.eps
        )
        z = torch.addcmul(z, x, self.gammax)
        h = self.project1(z)  # (B, L, D)
        bsz, length, dim = h.shape
        gh, gw = self._grid(length - p)
        patches = h[:, p:].transpose(1, 2).reshape(bsz, dim, gh, gw)  # (B, N, D) -> (B, D, gh, gw), a view
        patches = self.adapter_conv(patches).flatten(2).transpose(1, 2)  # (B, D, gh, gw) -> (B, N, D)
        h = torch.cat([h[:, :p], patches], dim=1) if p else patches
        return self.project2(self.dropout(F.gelu(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, C) -> (B, L, C)``."""
        p = self.num_prefix_tokens
        if self.prefix == "double":
            # The release's cat([cls, identity]) + cat([cls, project2]): only patch tokens enter Mona.
            cls, patches = x[:, :p], x[:, p:]
            return torch.cat([cls + cls, patches + self._delta(patches, 0)], dim=1)
        return x + self._delta(x, p)


class _MonaWrapper(AdapterLayer):
    """Creates ``mona_attn`` / ``mona_mlp`` for the configured placements, or one shared ``mona`` (``released``).

    The shared module is registered once, as ``mona``, so its state-dict keys are the release's
    (``resblocks.{i}.mona.project1.weight``, ...).
    """

    mona_attn: Mona | None
    mona_mlp: Mona | None
    mona: Mona | None

    def __init__(self, base_layer: nn.Module, config: MonaConfig, context: InjectContext, dim: int) -> None:
        super().__init__(base_layer, config)
        released = config.placement == "released"
        if released:
            grid = context.grid_size
            if context.num_prefix_tokens != 1 or (grid is not None and grid[0] != grid[1]):
                raise ValueError(
                    f"placement='released' reproduces the paper-release code, which handles one class token and a "
                    f"square patch grid; this tower has num_prefix_tokens={context.num_prefix_tokens} and grid "
                    f"{grid}. Use placement='both' (two modules, class token adapted) for it."
                )

        def make() -> Mona:
            return Mona(
                dim,
                config.hidden_dim,
                config.dropout,
                config.init,
                context.num_prefix_tokens,
                context.grid_size,
                config.variant,
                prefix="double" if released else "adapt",
            ).to(next(base_layer.parameters()))

        self.mona = make() if released else None
        self.mona_attn = make() if not released and "attn" in config.placements else None
        self.mona_mlp = make() if not released and "mlp" in config.placements else None

    def _after(self, site: Literal["attn", "mlp"], x: torch.Tensor) -> torch.Tensor:
        """Mona after the ``site`` residual: the shared module (``released``), that site's own module, or none."""
        mona = self.mona if self.mona is not None else (self.mona_attn if site == "attn" else self.mona_mlp)
        return x if mona is None else mona(x)


class MonaBlock(_MonaWrapper):
    """Open_clip ``ResidualAttentionBlock`` with Mona after the attention and/or MLP residual.

    With ``placement="released"``, one shared Mona after both.
    Re-composes the wrapped block's own submodules (``ln_1``, ``attn``, ``ls_1``, ``ln_2``, ``mlp``, ``ls_2``) and
    keeps its signature ``(q_x, k_x=None, v_x=None, attn_mask=None)``, which open_clip calls positionally under
    gradient checkpointing.

    Args:
        base_layer: the block (batch-first attention).
        config: Mona hyperparameters.
        context: prefix-token count and patch grid of the tower.
    """

    def __init__(self, base_layer: nn.Module, config: MonaConfig, context: InjectContext) -> None:
        blk: Any = base_layer
        if not getattr(blk.attn, "batch_first", False):
            raise ValueError("MonaBlock needs a batch-first attention block (open_clip >= 2.24 vision towers)")
        super().__init__(base_layer, config, context, int(blk.mlp.c_fc.in_features))

    def forward(
        self,
        q_x: torch.Tensor,
        k_x: torch.Tensor | None = None,
        v_x: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(B, L, C) -> (B, L, C)``, as ``ResidualAttentionBlock.forward`` plus Mona."""
        b: Any = self.base_layer
        cross = hasattr(b, "ln_1_kv")
        k_x = b.ln_1_kv(k_x) if cross and k_x is not None else None
        v_x = b.ln_1_kv(v_x) if cross and v_x is not None else None
        x = q_x + b.ls_1(b.attention(q_x=b.ln_1(q_x), k_x=k_x, v_x=v_x, attn_mask=attn_mask))
        x = self._after("attn", x)
        x = x + b.ls_2(b.mlp(b.ln_2(x)))
        return self._after("mlp", x)


class MonaTimmBlock(_MonaWrapper):
    """Timm ``Block`` (BiomedCLIP's trunk) with Mona after the attention and/or MLP residual.

    With ``placement="released"``, one shared Mona after both.
    Keeps timm's signature ``(x, attn_mask=None, is_causal=False)``.

    Args:
        base_layer: the block.
        config: Mona hyperparameters.
        context: prefix-token count and patch grid of the tower.
    """

    def __init__(self, base_layer: nn.Module, config: MonaConfig, context: InjectContext) -> None:
        blk: Any = base_layer
        super().__init__(base_layer, config, context, int(blk.mlp.fc1.in_features))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """``(B, L, C) -> (B, L, C)``, as timm ``Block.forward`` plus Mona."""
        b: Any = self.base_layer
        h = b.norm1(x)
        # Older timm attention takes no mask arguments; pass them only when used.
        a = b.attn(h) if attn_mask is None and not is_causal else b.attn(h, attn_mask=attn_mask, is_causal=is_causal)
        x = x + b.drop_path1(b.ls1(a))
        x = self._after("attn", x)
        x = x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))
        return self._after("mlp", x)
