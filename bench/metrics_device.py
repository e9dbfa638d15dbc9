"""Segmentation metrics on a device (CUDA or CPU) from synthetic masks: speed and agreement with MONAI and the CPU.

Targets are random ellipses at ``--size`` x ``--size``; predictions are shifted and dilated or eroded copies, with
a few empty predictions (missed lesions). usclip's batched Dice, IoU, HD95 and ASD run on ``--device``; the same
masks go through the same functions on the CPU and through MONAI (``compute_hausdorff_distance``,
``compute_average_surface_distance``, one image at a time on the host) for the first ``--monai-pairs`` pairs.
On CUDA the distance metrics are also run under ``torch.set_float32_matmul_precision("high")`` (TF32 matmuls),
which a user's training script may have switched on, to show whether the values move.

    python bench/metrics_device.py --device cuda --json metrics.json
    python bench/metrics_device.py --device cpu --pairs 64            # what the tiny GPU-script test runs
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings

import numpy as np
import torch

from usclip.metrics.functional import asd, dice, hd95, iou

log = logging.getLogger("bench.metrics_device")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--pairs", type=int, default=1024, help="prediction/target pairs")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--monai-pairs", type=int, default=64, help="pairs compared with MONAI (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def make_masks(pairs: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ellipse targets and shifted, dilated or eroded predictions; every 16th prediction is empty."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    targets, preds = [], []
    for i in range(pairs):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        ry, rx = rng.uniform(0.08, 0.25, 2) * size
        t = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        dy, dx = rng.integers(-6, 7, 2)
        grow = rng.uniform(0.85, 1.15)
        p = ((yy - cy - dy) / (ry * grow)) ** 2 + ((xx - cx - dx) / (rx * grow)) ** 2 <= 1.0
        if i % 16 == 15:
            p[:] = False
        targets.append(t)
        preds.append(p)
    return torch.from_numpy(np.stack(preds)), torch.from_numpy(np.stack(targets))


def compute(preds: torch.Tensor, target: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {"dice": [], "iou": [], "hd95": [], "asd": []}
    for s in range(0, preds.shape[0], batch_size):
        p, t = preds[s : s + batch_size], target[s : s + batch_size]
        out["dice"].append(dice(p, t))
        out["iou"].append(iou(p, t))
        out["hd95"].append(hd95(p, t))
        out["asd"].append(asd(p, t))
    return {k: torch.cat(v).double().cpu() for k, v in out.items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for k in a:
        both = torch.isfinite(a[k]) & torch.isfinite(b[k])
        if not torch.equal(torch.isfinite(a[k]), torch.isfinite(b[k])):
            return float("inf")
        if both.any():
            worst = max(worst, float((a[k][both] - b[k][both]).abs().max()))
    return worst


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    preds, target = make_masks(args.pairs, args.size, args.seed)
    dp, dt = preds.to(device), target.to(device)
    compute(dp[: args.batch_size], dt[: args.batch_size], args.batch_size)  # warm-up
    times = []
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        on_device = compute(dp, dt, args.batch_size)
        sync(device)
        times.append(time.perf_counter() - start)
    on_cpu = compute(preds, target, args.batch_size)
    result: dict[str, object] = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "pairs": args.pairs,
        "size": args.size,
        "batch_size": args.batch_size,
        "pairs_per_s": round(args.pairs / statistics.median(times), 1),
        "seconds": [round(t, 4) for t in times],
        "max_abs_diff_device_vs_cpu": max_diff(on_device, on_cpu),
        "mean_dice": round(float(on_cpu["dice"].mean()), 5),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            tf32 = compute(dp, dt, args.batch_size)
        finally:
            torch.set_float32_matmul_precision(previous)
        result["max_abs_diff_tf32_vs_cpu"] = max_diff(tf32, on_cpu)
    if args.monai_pairs > 0:
        from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

        n = min(args.monai_pairs, args.pairs)
        p1 = torch.nn.functional.one_hot(preds[:n].long(), 2).permute(0, 3, 1, 2).float()
        t1 = torch.nn.functional.one_hot(target[:n].long(), 2).permute(0, 3, 1, 2).float()
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns about every empty prediction
            m_hd = compute_hausdorff_distance(p1, t1, include_background=False, percentile=95).view(-1).double()
            m_asd = compute_average_surface_distance(p1, t1, include_background=False, symmetric=True).view(-1).double()
        monai_s = time.perf_counter() - start
        ours = {"hd95": on_device["hd95"][:n], "asd": on_device["asd"][:n]}
        finite = torch.isfinite(m_hd) & torch.isfinite(m_asd)
        result["monai_pairs_compared"] = int(finite.sum())
        result["max_abs_diff_vs_monai"] = max(
            float((ours["hd95"][finite] - m_hd[finite]).abs().max()),
            float((ours["asd"][finite] - m_asd[finite]).abs().max()),
        )
        result["monai_pairs_per_s"] = round(n / monai_s, 1)
    for k, v in result.items():
        log.info("%-28s %s", k, v)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
