"""FLOPs per image of every kind of run in the paper manifest, for the run-time estimates of docs/reproduce.md.

Builds each task as ``usclip fit`` does, on the real architectures with random weights (ViT-B/16, DINOv2 ViT-B/14,
UNet/ResNet34, ResNet18), at 224 px, and counts one training step (forward, loss, backward; AdamW's elementwise
work is not counted) and one inference forward with ``usclip.profiling.flop_counter``. Prints JSON lines
``{"kind": ..., "train_gflop_per_image": ..., "infer_gflop_per_image": ...}``.

    python bench/sweep_cost.py            # about a minute on 2 CPU cores
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "seg CLIP ViT-B/16 + Mona (blocks 3/6/9)": ("segmentation", {"adapter": "mona"}),
    "seg CLIP ViT-B/16 + LoRA r16": ("segmentation", {"adapter": "lora", "adapter_kwargs": {"r": 16}}),
    "seg ViT-B/16 frozen + head (BioMedCLIP, UniMedCLIP, MetaCLIP)": ("segmentation", {"adapter": None}),
    "seg DINOv2 ViT-B/14 frozen + head": ("segmentation", {"model_name": "timm:vit_base_patch14_dinov2"}),
    "seg UNet ResNet34 (whole model)": ("segmentation", {"model_name": "smp:Unet/resnet34", "head": "native"}),
    "cls CLIP ViT-B/16 + Mona (blocks 3/6/9)": ("classification", {"adapter": "mona"}),
    "cls ResNet18 (whole model)": ("classification", {"model_name": "timm:resnet18", "head": "native"}),
    "caption tuning: ViT-B/16 + Mona, whole visual tower (blocks 0-11)": (
        "segmentation",
        {"adapter": "mona", "layers": [11]},
    ),
}


def count(kind: str, task_name: str, kwargs: dict[str, Any], batch: int = 2) -> dict[str, Any]:
    from usclip.profiling import flop_counter
    from usclip.tasks import ClassificationTask, SegmentationTask

    cls = SegmentationTask if task_name == "segmentation" else ClassificationTask
    args = {"model_name": "ViT-B-16", "pretrained": None, "layers": [3, 6, 9], "image_size": 224, **kwargs}
    task = cls(**args)
    images = torch.rand(batch, 3, 224, 224)
    target = (torch.rand(batch, 224, 224) > 0.7).long() if task_name == "segmentation" else torch.tensor([0, 1])
    task.train()
    with (counter := flop_counter()):
        task._loss(task(images), target).backward()
    train = counter.get_total_flops() / batch
    task.eval()
    with torch.inference_mode(), (counter := flop_counter()):
        task(images)
    infer = counter.get_total_flops() / batch
    gflop = {"train_gflop_per_image": round(train / 1e9, 1), "infer_gflop_per_image": round(infer / 1e9, 1)}
    return {"kind": kind, **gflop}


def main() -> None:
    torch.manual_seed(0)
    for kind, (task_name, kwargs) in KINDS.items():
        try:
            print(json.dumps(count(kind, task_name, kwargs)), flush=True)
        except Exception as err:  # report and go on: one missing optional backbone should not hide the others
            print(json.dumps({"kind": kind, "error": f"{type(err).__name__}: {err}"}), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
