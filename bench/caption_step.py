"""Caption fine-tuning step with and without the text embedding cache (ViT-B/16 architecture, random weights).

Two ``CaptionFinetuneTask`` instances built from the same seed with the paper's caption settings (Mona in the visual
tower, frozen text tower, frozen logit scale), one with ``cache_text=True`` and one with ``cache_text=False``. A
step is what ``usclip fit`` does per batch: tokenise the captions, embed images and captions, CLIP's symmetric
InfoNCE, backward, AdamW over the trainable tensors. The captions cycle through a fixed pool of ``--pool`` batches,
and the cached task sees the pool once before timing, so its timed steps are those of the second and later epochs
(every caption already embedded). The two variants are timed **interleaved in one process**, alternating which goes
first, so that load from other processes on shared cores hits both alike; the figure to quote is the ratio.

Also printed: the FLOPs of one step of each variant and of the text forward alone (``torch.utils.flop_counter``:
matmuls, convolutions, attention; elementwise work not counted), the expected ratio they imply, the CPU model and
vector extensions from ``/proc/cpuinfo``, and torch's threads.

Examples::

    python bench/caption_step.py                        # batch 8, 224 px, fp32, 5 timed pairs
    python bench/caption_step.py --batch-size 32 --pairs 3
    python bench/caption_step.py --device cuda --precision bf16 --batch-size 32 --pairs 20
    python bench/caption_step.py --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from usclip.profiling import flop_counter
from usclip.tasks import CaptionFinetuneTask

log = logging.getLogger("bench.caption_step")

WORDS = [
    "hypoechoic",
    "oval",
    "circumscribed",
    "parallel",
    "mass",
    "irregular",
    "spiculated",
    "angular",
    "taller-than-wide",
    "posterior",
    "shadowing",
    "enhancement",
    "microcalcifications",
    "vascularity",
    "thyroid",
    "breast",
    "liver",
    "nodule",
    "cyst",
    "heterogeneous",
    "isoechoic",
    "halo",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16", help="open_clip model config (random weights)")
    p.add_argument("--layers", default="3,6,9", help="blocks recorded in the adapter file (the whole tower runs)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--precision", choices=("32", "bf16"), default="32", help="bf16 = autocast to bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--pool", type=int, default=4, help="distinct caption batches cycled through")
    p.add_argument("--pairs", type=int, default=5, help="timed (uncached, cached) step pairs; medians reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each variant before timing")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    return p.parse_args(argv)


def cpu_info() -> dict[str, Any]:
    """CPU model and vector extensions from /proc/cpuinfo (Linux), cores, torch's threads and ISA level."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
    ext = [f for f in ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    return {
        "cpu": model,
        "extensions": ext,
        "avx512": any(f.startswith("avx512") for f in flags),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch_cpu_capability": capability,
        "torch": torch.__version__,
    }


def captions(n: int, batch: int) -> list[list[str]]:
    """``n`` batches of distinct captions of 40-50 words (refined captions fill most of CLIP's 77 tokens)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        rows = []
        for _ in range(batch):
            k = int(torch.randint(40, 51, (1,), generator=g))
            rows.append(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (k,), generator=g)))
        out.append(rows)
    return out


def build(args: argparse.Namespace, cache: bool, device: torch.device) -> CaptionFinetuneTask:
    torch.manual_seed(0)  # both variants start from the same weights
    task = CaptionFinetuneTask(
        model_name=args.model,
        pretrained=None,
        adapter="mona",
        layers=[int(i) for i in args.layers.split(",")],
        image_size=args.image_size,
        temperature="pretrained",
        cache_text=cache,
    )
    return task.to(device).train()


class Runner:
    """One variant: its task, optimiser and a step function."""

    def __init__(self, task: CaptionFinetuneTask, args: argparse.Namespace, device: torch.device) -> None:
        self.task, self.device = task, device
        self.opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
        )

    def step(self, images: torch.Tensor, texts: list[str]) -> float:
        with self.autocast:
            image, text = self.task.embed({"image": images, "caption": texts})
            loss = self.task.criterion(image, text, self.task.logit_scale())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def timed(self, images: torch.Tensor, texts: list[str]) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        self.step(images, texts)
        sync(self.device)
        return time.perf_counter() - t0

    def flops(self, images: torch.Tensor, texts: list[str]) -> int:
        with flop_counter() as counter:
            self.step(images, texts)
        return int(counter.get_total_flops())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pool = captions(args.pool, args.batch_size)
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device) for _ in pool]

    plain, cached = Runner(build(args, False, device), args, device), Runner(build(args, True, device), args, device)
    # the text forward alone, for the FLOP share
    tokens = plain.task.tokenize(pool[0])
    with torch.no_grad(), flop_counter() as counter:
        plain.task.encoder.encode_text(tokens)
    text_flops = int(counter.get_total_flops())
    for i in range(len(pool)):  # the cached variant sees every caption once: later epochs from here on
        cached.step(images[i], pool[i])
    for i in range(args.warmup):
        plain.step(images[i % len(pool)], pool[i % len(pool)])
        cached.step(images[i % len(pool)], pool[i % len(pool)])
    step_flops = {"uncached": plain.flops(images[0], pool[0]), "cached": cached.flops(images[0], pool[0])}

    times: dict[str, list[float]] = {"uncached": [], "cached": []}
    for k in range(args.pairs):
        i = k % len(pool)
        order = (("uncached", plain), ("cached", cached)) if k % 2 == 0 else (("cached", cached), ("uncached", plain))
        for name, runner in order:
            times[name].append(runner.timed(images[i], pool[i]))
    med = {k: statistics.median(v) for k, v in times.items()}
    pair_ratios = [u / c for u, c in zip(times["uncached"], times["cached"], strict=True)]
    result = {
        "model": args.model,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "precision": args.precision,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        **cpu_info(),
        "cache_entries": len(cached.task._text_cache),
        "seconds_per_step": med,
        "seconds_all": times,
        "speedup_median_ratio": med["uncached"] / med["cached"],
        "speedup_pair_ratios": pair_ratios,
        "gflop_per_step": {k: v / 1e9 for k, v in step_flops.items()},
        "gflop_text_forward": text_flops / 1e9,
        "flop_ratio": step_flops["uncached"] / max(step_flops["cached"], 1),
    }
    print(
        f"{args.model}, batch {args.batch_size}, {args.image_size} px, {args.precision}, {result['device']}; "
        f"{result['cpu']} ({', '.join(result['extensions'])}; AVX-512: {result['avx512']}), "
        f"{result['threads']} threads, torch {result['torch']} ({result['torch_cpu_capability']})"
    )
    print(
        f"seconds per step (median of {args.pairs}, interleaved): uncached {med['uncached']:.3f}, "
        f"cached {med['cached']:.3f}; ratio {result['speedup_median_ratio']:.3f} "
        f"(per pair: {', '.join(f'{r:.3f}' for r in pair_ratios)})"
    )
    print(
        f"GFLOP per step: uncached {result['gflop_per_step']['uncached']:.1f}, cached "
        f"{result['gflop_per_step']['cached']:.1f} (text forward {result['gflop_text_forward']:.1f}); "
        f"FLOP ratio {result['flop_ratio']:.3f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
