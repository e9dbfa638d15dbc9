"""How far LoRA moves the attention weights in the first AdamW steps, for usclip's default and the authors' setting.

Builds the tiny test encoder (random weights, ``usclip-test-vit``) or ViT-B/16 with LoRA r=16 under several
settings from the same seed, trains each for ``--steps`` AdamW steps (betas 0.9/0.95, weight decay 0.01, the paper's
optimiser) on one fixed random batch with a 1x1 segmentation head, and prints the mean over blocks of
``||scale * B @ A|| / ||W||`` for the fused q/k/v weight. Under Adam the size of each step of ``B`` is set by the
learning rate, not by the gradient, so the update of ``W`` grows with ``scale * lr``: the authors' scale 8 at lr
1e-4 moves the weights about as far as scale 1 at lr 8e-4. Used for the figures in docs/adapters.md
("LoRA switches").

Example::

    python bench/lora_scale.py                       # tiny encoder, 20 steps (about a minute on 2 CPU cores)
    python bench/lora_scale.py --model ViT-B-16 --steps 10
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
import torch.nn.functional as F

from usclip.adapters import LoraMultiheadAttention
from usclip.models import CLIPEncoder

SETTINGS: dict[str, tuple[dict[str, Any], float]] = {
    "default (alpha/r, alpha 16: scale 1), lr 1e-4": ({"r": 16, "alpha": 16.0}, 1e-4),
    "alpha/sqrt(r), alpha 32 (scale 8), lr 1e-4": ({"r": 16, "alpha": 32.0, "scaling": "alpha/sqrt(r)"}, 1e-4),
    "authors' reference (+ dropout 0.1, out), lr 1e-4": (
        {"r": 16, "alpha": 32.0, "scaling": "alpha/sqrt(r)", "dropout": 0.1, "attn_targets": ["q", "k", "v", "out"]},
        1e-4,
    ),
    "default (scale 1), lr 8e-4": ({"r": 16, "alpha": 16.0}, 8e-4),
}


def relative_update(model: str, kwargs: dict[str, Any], lr: float, steps: int) -> float:
    """Mean over LoRA attention layers of ``||scale * B @ A||_F / ||W_qkv||_F`` after ``steps`` AdamW steps."""
    tiny = model == "usclip-test-vit"
    size, layers = (64, (1, 3)) if tiny else (224, (3, 6, 9))
    torch.manual_seed(0)
    enc = CLIPEncoder(model, layers=layers, adapter="lora", adapter_kwargs=kwargs).train()
    head = torch.nn.Conv2d(sum(enc.out_channels), 2, 1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, size, size, generator=g)
    y = torch.randint(0, 2, (4, size // 16, size // 16), generator=g)
    params = [p for p in enc.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(torch.cat(enc(x), dim=1)), y).backward()
        opt.step()
    ratios = []
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, LoraMultiheadAttention):
                delta = torch.cat([m.scale * (m.lora_B[t] @ m.lora_A[t]) for t in m.qkv_targets])
                ratios.append((delta.norm() / m.base_layer.in_proj_weight.norm()).item())
    return sum(ratios) / len(ratios)


def main() -> None:
    """Print one line per setting: the relative update and its ratio to the default's."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="usclip-test-vit", help="open_clip model name (random weights)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import usclip.models  # noqa: F401  (registers usclip-test-vit)

    base = None
    for name, (kwargs, lr) in SETTINGS.items():
        r = relative_update(args.model, kwargs, lr, args.steps)
        base = base or r
        print(f"{name:52s} ||dW||/||W|| = {r:.2e}  ({r / base:.2f} x default)")


if __name__ == "__main__":
    main()
