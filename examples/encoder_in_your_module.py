r"""Use usclip's CLIP encoder with adapters inside your own LightningModule, and share only the adapter weights.

What it shows: ``usclip.models.CLIPEncoder`` is a plain ``nn.Module`` (a frozen CLIP vision tower with Mona or
LoRA adapters, returning the patch features of chosen blocks), so any model can use it. Here a small regression
model predicts the lesion's share of the image from the encoder's features. After training, only what was trained
is saved: the adapters with ``usclip.adapters.save_adapters`` (a safetensors file that records the adapter and
encoder configuration, checked when it loads) and the regression head; the frozen backbone is rebuilt from its
source. Reloading checks that the rebuilt model gives the same predictions.

The data are usclip's synthetic B-mode scans made in memory (``usclip.data.synthetic.generate_sample``); the tiny
test model with random weights keeps it to seconds on a CPU. Run it::

    python examples/encoder_in_your_module.py                  # tiny model, LoRA, a few steps
    python examples/encoder_in_your_module.py --adapter mona --model ViT-B-16 --pretrained openai \
        --image-size 224 --layers 11 --samples 256 --max-steps 500
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from usclip.adapters import parameter_report, save_adapters
from usclip.data.synthetic import generate_sample
from usclip.models import CLIPEncoder


class LesionShareRegressor(L.LightningModule):
    """Your own model: CLIP features of the deepest chosen block, averaged, then a linear layer.

    Args:
        encoder: a ``CLIPEncoder``; only its adapters (and this module's head) are trained.
        lr: AdamW learning rate.
    """

    mean: torch.Tensor  # CLIP's normalisation, buffers that follow the module to its device
    std: torch.Tensor

    def __init__(self, encoder: CLIPEncoder, lr: float = 1e-3) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.width, 1)
        self.lr = lr
        self.register_buffer("mean", torch.tensor(encoder.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(encoder.image_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted lesion share ``(B,)`` of images ``(B, 3, H, W)`` in [0, 1]."""
        features = self.encoder((images - self.mean) / self.std)[-1]  # (B, width, H / patch, W / patch)
        return self.head(features.mean(dim=(2, 3))).squeeze(1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Mean squared error between the predicted and the true lesion share."""
        images, share = batch
        loss = nn.functional.mse_loss(self(images), share)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters only."""
        trainable = [p for p in self.parameters() if p.requires_grad]  # adapters and head; the backbone is frozen
        return torch.optim.AdamW(trainable, lr=self.lr)


def synthetic_data(n: int, size: int, seed: int = 0) -> TensorDataset:
    """``n`` synthetic scans resized to ``size`` (grey copied to 3 channels, [0, 1]) and their lesion share."""
    images, shares = [], []
    for i in range(n):
        sample = generate_sample(seed + i, label=i % 2, size=2 * size)
        image = cv2.resize(sample.image, (size, size), interpolation=cv2.INTER_AREA)
        images.append(np.repeat(image[None], 3, axis=0))
        shares.append((sample.mask > 0).mean())
    return TensorDataset(torch.from_numpy(np.stack(images)).float() / 255, torch.tensor(shares, dtype=torch.float32))


def build_encoder(args: argparse.Namespace, adapter_checkpoint: str | None = None) -> CLIPEncoder:
    """The encoder; with ``adapter_checkpoint`` the adapter type, its settings and weights come from that file."""
    if args.pretrained is None:
        torch.manual_seed(args.seed)  # random weights: the same seed rebuilds the same frozen backbone
    return CLIPEncoder(
        args.model,
        pretrained=args.pretrained,
        layers=args.layers,
        image_size=args.image_size,
        adapter=None if adapter_checkpoint else args.adapter,
        adapter_checkpoint=adapter_checkpoint,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The example's options (small defaults: the tiny test model, a few steps)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="usclip-test-vit", help="open_clip model name (ViT-B-16 for the paper)")
    p.add_argument("--pretrained", default=None, help="open_clip weights tag or file (openai); default: random")
    p.add_argument("--adapter", choices=["mona", "lora"], default="lora")
    p.add_argument("--layers", type=int, nargs="+", default=[3], help="encoder blocks; the deepest feeds the head")
    p.add_argument("--image-size", type=int, default=64, help="input side length (224 for ViT-B-16)")
    p.add_argument("--samples", type=int, default=16, help="synthetic training images")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=4)
    p.add_argument("--accelerator", default="cpu", help="cpu, gpu or auto")
    p.add_argument("--out", default="runs/encoder_in_your_module", help="where the weight files go")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Train, save adapters and head, reload them into a fresh model; return the files and the reload difference."""
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = synthetic_data(args.samples, args.image_size, args.seed)

    model = LesionShareRegressor(build_encoder(args))
    print(f"encoder: {parameter_report(model.encoder)}")
    trainer = L.Trainer(
        max_steps=args.max_steps,
        accelerator=args.accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    L.seed_everything(args.seed)
    trainer.fit(model, DataLoader(data, batch_size=args.batch_size, shuffle=True))

    # Only what was trained goes to disk: the adapters (with their configuration) and the head.
    adapters, head = out / "adapters.safetensors", out / "head.safetensors"
    save_adapters(model.encoder, adapters)
    save_file(model.head.state_dict(), str(head))
    print(f"saved {adapters} ({adapters.stat().st_size / 1e3:.1f} kB) and {head}")

    # Later, or on a colleague's machine: rebuild the frozen backbone, load adapters and head.
    reloaded = LesionShareRegressor(build_encoder(args, adapter_checkpoint=str(adapters)))
    reloaded.head.load_state_dict(load_file(str(head)))
    images = data.tensors[0][:4].to(model.device)
    model.eval()
    reloaded.to(model.device).eval()
    with torch.inference_mode():
        before, after = model(images), reloaded(images)
    difference = float((before - after).abs().max())
    print(f"predicted lesion share: {[round(v, 4) for v in after.tolist()]}")
    print(f"max difference after reload: {difference:.3g}")
    return {"adapters": adapters, "head": head, "difference": difference, "predictions": after.cpu()}


if __name__ == "__main__":
    main()
