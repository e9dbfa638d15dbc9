r"""Train and test a usclip segmentation task with a plain ``lightning.Trainer``: no CLI, no YAML.

What it shows: usclip's tasks are ordinary LightningModules and its DataModules ordinary LightningDataModules.
A ``SegmentationTask`` (a CLIP ViT with Mona or LoRA adapters and the paper's light head) and a
``SegmentationDataModule`` go into ``lightning.Trainer.fit`` and ``.test`` as any other module would. The task adds
its own callbacks (best and last checkpoints by the validation Dice, reseeding, guards), so the run folder
``<out>/<name>/version_<n>/`` holds ``checkpoints/best.ckpt``, which ``examples/predict_one_image.py`` and
``usclip.tasks.load_task`` read.

By default it writes a small synthetic dataset (usclip's generator: B-mode scans with lesions and masks) and trains
the tiny test model with random weights for one epoch of a few steps, on the CPU, in seconds. Run it::

    python examples/plain_lightning.py                       # synthetic data, tiny model, a few steps
    python examples/plain_lightning.py --data path/to/BUSI --model ViT-B-16 --pretrained openai \
        --image-size 224 --layers 3 6 9 --epochs 50 --batch-size 32 --out runs

``--data`` takes any folder usclip reads (the generic ``images/`` + ``masks/`` layout or the original BUSI
release; see docs/data.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from usclip.data import SegmentationDataModule, SyntheticSpec
from usclip.tasks import SegmentationTask


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The example's options (small defaults: synthetic data, the tiny test model, a few steps)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="dataset folder (default: a synthetic dataset written under --out)")
    p.add_argument("--synthetic-samples", type=int, default=24, help="images in the synthetic dataset")
    p.add_argument("--model", default="usclip-test-vit", help="open_clip model name (ViT-B-16 for the paper)")
    p.add_argument("--pretrained", default=None, help="open_clip weights tag or file (openai); default: random")
    p.add_argument("--adapter", choices=["mona", "lora"], default="mona")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 3], help="encoder blocks whose features are used")
    p.add_argument("--image-size", type=int, default=64, help="input side length (224 for ViT-B-16)")
    p.add_argument("--embed-dim", type=int, default=16, help="width of the segmentation head")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: after --epochs)")
    p.add_argument("--accelerator", default="cpu", help="cpu, gpu or auto")
    p.add_argument("--out", default="runs", help="folder of the run folders")
    p.add_argument("--name", default="plain_lightning", help="run name: the run is <out>/<name>/version_<n>")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Fit, then test the best checkpoint; return the test metrics (also printed)."""
    args = parse_args(argv)
    L.seed_everything(args.seed)
    out = Path(args.out)

    data = SegmentationDataModule(
        root=args.data or str(out / "data" / "synthetic"),
        image_size=args.image_size,
        batch_size=args.batch_size,
        # a synthetic dataset is written into root first (reused when it is there already)
        synthetic=None if args.data else SyntheticSpec(num_samples=args.synthetic_samples, size=96, seed=args.seed),
    )
    task = SegmentationTask(
        model_name=args.model,
        pretrained=args.pretrained,  # None: random weights, say so explicitly (the default asks for a choice)
        adapter=args.adapter,
        layers=args.layers,
        image_size=args.image_size,
        embed_dim=args.embed_dim,
    )
    trainer = L.Trainer(
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        accelerator=args.accelerator,
        devices=1,
        logger=CSVLogger(out, name=args.name),  # the run folder: <out>/<name>/version_<n>/
        enable_progress_bar=False,
    )
    trainer.fit(task, datamodule=data)
    metrics = dict(trainer.test(task, datamodule=data, ckpt_path="best", verbose=False)[0])
    print(f"run folder: {trainer.log_dir}")
    print(f"best checkpoint: {trainer.checkpoint_callback.best_model_path}")  # type: ignore[union-attr]
    for key in sorted(metrics):
        print(f"{key} = {metrics[key]:.4f}")
    return metrics


if __name__ == "__main__":
    main()
