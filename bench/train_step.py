"""Training and inference throughput of the usclip tasks on the ViT-B/16 architecture (random weights).

One configuration per process (peak RSS is the process's). It builds the task exactly as ``usclip fit`` does
(``SegmentationTask`` / ``ClassificationTask`` with the paper's head), then times optimiser steps (forward, Dice+CE
or focal loss, backward, AdamW over the trainable parameters) or inference forwards (``torch.inference_mode``),
and prints:

- images/s (median over ``--repeats`` timed blocks of ``--steps`` steps, after ``--warmup`` steps);
- peak RSS of the process (``ru_maxrss``) and the parameters (trainable / all);
- FLOPs per image from ``torch.utils.flop_counter`` (matmuls, convolutions, attention, via
  ``usclip.profiling.flop_counter``; elementwise work is not counted) and the achieved FLOP/s as a fraction of a
  matmul peak measured in the same run (a square matmul of ``--peak-size`` in the same dtype and thread count,
  best of several), measured after each timed block: the fraction is the median over blocks of the block's
  achieved FLOP/s over the peak measured right after it.

Examples::

    python bench/train_step.py                                  # Mona after the MLP in blocks 0-9, seg, batch 8
    python bench/train_step.py --precision bf16                 # CPU autocast to bfloat16
    python bench/train_step.py --adapter lora --mode predict --merge --against-frozen
    python bench/train_step.py --task classification --batch-size 16
    python bench/train_step.py --device cuda --precision bf16 --batch-size 32
    python bench/train_step.py --json out.json                  # also write the figures as JSON

"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("bench.train_step")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16", help="open_clip model config (random weights)")
    p.add_argument("--task", choices=("segmentation", "classification"), default="segmentation")
    p.add_argument("--adapter", choices=("mona", "lora", "none"), default="mona")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--layers", default="3,6,9", help="blocks read by the head (blocks after the deepest are dropped)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--precision", choices=("32", "bf16"), default="32", help="bf16 = autocast to bfloat16")
    p.add_argument("--mode", choices=("train", "predict"), default="train")
    p.add_argument("--merge", action="store_true", help="merge LoRA into the frozen weights (predict)")
    p.add_argument(
        "--against-frozen",
        action="store_true",
        help="predict: also time the tower without adapters, alternating blocks, and report the time ratio",
    )
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (the task's compile_encoder)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks (the median is reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-size", type=int, default=2048, help="side of the square matmul that measures the peak")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int, seconds: float = 2.0) -> float:
    """Best FLOP/s of an ``n x n @ n x n`` matmul in ``dtype`` (several timed rounds)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    sync(device)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        reps = 3 if device.type == "cpu" else 50
        for _ in range(reps):
            torch.mm(a, b, out=out)
        sync(device)
        best = max(best, reps * 2 * n**3 / (time.perf_counter() - t0))
    return best


def build(args: argparse.Namespace) -> torch.nn.Module:
    from usclip.tasks import ClassificationTask, SegmentationTask

    adapter = None if args.adapter == "none" else args.adapter
    adapter_kwargs: dict[str, Any] | None = None
    if adapter == "lora":
        adapter_kwargs = {"r": args.lora_rank}
    cls = SegmentationTask if args.task == "segmentation" else ClassificationTask
    task = cls(
        model_name=args.model,
        pretrained=None,
        layers=[int(i) for i in args.layers.split(",")],
        adapter=adapter,
        adapter_kwargs=adapter_kwargs,
        image_size=args.image_size,
        grad_checkpointing=args.grad_checkpointing,
        compile_encoder=args.compile,
    )
    if args.merge:
        from usclip.adapters import merge_adapters

        if adapter != "lora":
            raise SystemExit(f"--merge needs --adapter lora, got --adapter {args.adapter}")
        merge_adapters(task)
    return task


def make_batch(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    if args.task == "segmentation":
        target = (torch.rand(args.batch_size, args.image_size, args.image_size, generator=g) > 0.7).long()
    else:
        target = torch.randint(0, 2, (args.batch_size,), generator=g)
    return images.to(device), target.to(device)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp_dtype = torch.bfloat16 if args.precision == "bf16" else None
    peak_dtype = amp_dtype or torch.float32
    if args.against_frozen and args.mode != "predict":
        raise SystemExit("--against-frozen compares inference: use it with --mode predict")
    torch.manual_seed(0)

    task = build(args).to(device)
    model: Callable[[torch.Tensor], torch.Tensor] = task
    images, target = make_batch(args, device)
    params = [p for p in task.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-2) if args.mode == "train" else None

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    def step() -> None:
        if opt is None:
            with torch.inference_mode(), autocast():
                model(images)
            return
        with autocast():
            logits = model(images)
            loss = task._loss(logits, target)  # the loss exactly as training_step computes it
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    task.train(args.mode == "train")
    frozen_step: Callable[[], None] | None = None
    if args.against_frozen:
        # The same tower without adapters, timed in alternation with the measured model (same process, same drift).
        frozen = build(argparse.Namespace(**{**vars(args), "adapter": "none", "merge": False, "compile": False}))
        frozen = frozen.to(device).eval()

        def frozen_step() -> None:
            with torch.inference_mode(), autocast():
                frozen(images)

    for _ in range(args.warmup):
        step()
        if frozen_step is not None:
            frozen_step()
    sync(device)

    # Timed blocks of steps interleaved with the matmul peak: the speed of a shared or virtual machine drifts, so
    # each block is compared with the peak measured right after it.
    times, peaks, frozen_times = [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        times.append(time.perf_counter() - t0)
        if frozen_step is not None:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                frozen_step()
            sync(device)
            frozen_times.append(time.perf_counter() - t0)
        peaks.append(matmul_peak(peak_dtype, device, args.peak_size, seconds=1.0))
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # before the FLOP counter's extra step

    from usclip.profiling import flop_counter

    compiled = task.__dict__.get("_compiled_encoder")
    task.__dict__["_compiled_encoder"] = None  # count on the eager modules: compiled kernels bypass the counter
    counter = flop_counter()
    with counter:
        step()
    task.__dict__["_compiled_encoder"] = compiled
    flops_per_image = counter.get_total_flops() / args.batch_size

    seconds_per_step = statistics.median(times) / args.steps
    ips = args.batch_size / seconds_per_step
    fractions = [flops_per_image * args.batch_size * args.steps / t / p for t, p in zip(times, peaks, strict=True)]
    peak = statistics.median(peaks)
    achieved = flops_per_image * ips

    result = {
        "model": args.model,
        "task": args.task,
        "adapter": args.adapter,
        "mode": args.mode + (" (LoRA merged)" if args.merge else ""),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "precision": args.precision,
        "grad_checkpointing": args.grad_checkpointing,
        "compile": args.compile,
        "threads": torch.get_num_threads(),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "images_per_s": round(ips, 3),
        "seconds_per_step": round(seconds_per_step, 4),
        "step_times_s": [round(t / args.steps, 4) for t in times],
        "peak_rss_gb": round(rss_gb, 3),
        "trainable_params": sum(p.numel() for p in task.parameters() if p.requires_grad),
        "all_params": sum(p.numel() for p in task.parameters()),
        "gflop_per_image": round(flops_per_image / 1e9, 2),
        "achieved_gflops": round(achieved / 1e9, 1),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "fraction_of_peak": round(statistics.median(fractions), 3),
        "fractions": [round(f, 3) for f in fractions],
        "peaks_gflops": [round(p / 1e9, 1) for p in peaks],
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    if frozen_times:
        ratios = [t / f for t, f in zip(times, frozen_times, strict=True)]
        result["frozen_images_per_s"] = round(args.batch_size * args.steps / statistics.median(frozen_times), 3)
        result["time_vs_frozen"] = round(statistics.median(ratios), 3)
        result["time_vs_frozen_per_block"] = [round(r, 3) for r in ratios]
    if device.type == "cuda":
        result["peak_cuda_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1024**3, 3)
    for k, v in result.items():
        log.info("%-20s %s", k, v)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
