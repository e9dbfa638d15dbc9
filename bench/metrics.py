"""Time HD95 + ASD on 224 x 224 masks: usclip.metrics against MONAI on the same masks, with the same values.

Targets are real BUSI and DDTI masks (nearest-resized to 224 x 224); predictions are shifted, eroded and
dilated copies (``--kind realistic``) or copies with 1 % of pixels flipped (``--kind noisy``, many boundary
pixels). Both sides compute HD95 and the symmetric ASD for every pair; throughput is pairs per second, the
median over ``--repeats`` runs, interleaved so that load from other processes hits both alike.

    python bench/metrics.py                      # realistic pairs, 256 of them
    python bench/metrics.py --kind noisy
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
from PIL import Image

from usclip.metrics import SegmentationMetrics, surface_distances

SIZE = 224
REPO = Path(__file__).resolve().parents[1]


def load_targets(root: Path, count: int) -> torch.Tensor:
    out = []
    for dataset in ("BUSI", "DDTI"):
        files = sorted((root / dataset / "masks").glob("*.png"))
        step = max(1, len(files) // (count // 2))
        for path in files[::step][: count // 2]:
            mask = torch.from_numpy(np.array(Image.open(path)) > 0).float()[None, None]
            out.append(F.interpolate(mask, size=(SIZE, SIZE), mode="nearest")[0, 0] > 0)
    return torch.stack(out)


def make_predictions(targets: torch.Tensor, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "noisy":
        return targets ^ (torch.rand(targets.shape, generator=g) < 0.01)
    preds = []
    for i, m in enumerate(targets):
        x = m[None, None].float()
        r = int(torch.randint(1, 4, (1,), generator=g))
        if i % 3 == 0:  # shift
            dy, dx = (int(v) for v in torch.randint(-8, 9, (2,), generator=g))
            x = torch.roll(x, (dy, dx), dims=(2, 3))
        elif i % 3 == 1:  # dilate
            x = F.max_pool2d(x, 2 * r + 1, stride=1, padding=r)
        else:  # erode (radius 1 keeps thin masks non-empty)
            x = -F.max_pool2d(-x, 3, stride=1, padding=1)
        preds.append(x[0, 0] > 0)
    return torch.stack(preds)


def run_ours(preds: torch.Tensor, targets: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    hd, asd = [], []
    for start in range(0, preds.shape[0], batch_size):
        r = surface_distances(preds[start : start + batch_size], targets[start : start + batch_size])
        hd.append(r.hd)
        asd.append(r.asd)
    return torch.cat(hd), torch.cat(asd)


def run_monai(preds: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p, t = preds[:, None].float(), targets[:, None].float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(p, t, percentile=95)[:, 0]
        asd = compute_average_surface_distance(p, t, symmetric=True)[:, 0]
    return hd, asd


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def memory_check(preds: torch.Tensor, targets: torch.Tensor, batch_size: int, passes: int) -> tuple[float, float]:
    """Max RSS (MiB) after one pass and after ``passes`` passes of SegmentationMetrics over the pairs."""
    metric = SegmentationMetrics()

    def one_pass() -> None:
        for start in range(0, preds.shape[0], batch_size):
            metric.update(preds[start : start + batch_size], targets[start : start + batch_size])

    one_pass()
    first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for _ in range(passes - 1):
        one_pass()
    metric.compute()
    return first, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = os.environ.get("USCLIP_DATA_DIR", str(REPO.parent / "shared" / "data"))
    parser.add_argument("--data-dir", type=Path, default=Path(default_data))
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kind", choices=("realistic", "noisy"), default="realistic")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--memory-passes", type=int, default=20, help="passes for the memory check (0: skip)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    targets = load_targets(args.data_dir, args.num_images)
    preds = make_predictions(targets, args.kind)
    n = targets.shape[0]
    both = preds.flatten(1).any(1) & targets.flatten(1).any(1)

    run_ours(preds[:8], targets[:8], args.batch_size)  # warm-up
    run_monai(preds[:4], targets[:4])
    ours_s, monai_s = [], []
    for _ in range(args.repeats):
        dt, ours = timed(run_ours, preds, targets, args.batch_size)
        ours_s.append(dt)
        dt, ref = timed(run_monai, preds, targets)
        monai_s.append(dt)
    hd, asd = ours  # type: ignore[misc]
    ref_hd, ref_asd = ref  # type: ignore[misc]
    diff_hd = (hd[both] - ref_hd[both]).abs().max().item()
    diff_asd = (asd[both] - ref_asd[both]).abs().max().item()

    ours_rate = n / statistics.median(ours_s)
    monai_rate = n / statistics.median(monai_s)
    load = os.getloadavg()
    date = subprocess.run(["date"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"date: {date}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}, load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(f"torch {torch.__version__}, pairs: {n} ({args.kind}, {SIZE}x{SIZE}), both non-empty: {int(both.sum())}")
    print(f"ours : {ours_rate:8.1f} pairs/s  (HD95 + ASD, batch {args.batch_size}, median of {args.repeats})")
    print(f"MONAI: {monai_rate:8.1f} pairs/s  (compute_hausdorff_distance + compute_average_surface_distance)")
    print(f"ratio: {ours_rate / monai_rate:.1f}x")
    print(f"max |ours - MONAI| where both non-empty: HD95 {diff_hd:.3g}, ASD {diff_asd:.3g}")
    if args.memory_passes:
        first, last = memory_check(preds, targets, args.batch_size, args.memory_passes)
        print(
            f"SegmentationMetrics max RSS: {first:.0f} MiB after 1 pass, {last:.0f} MiB after "
            f"{args.memory_passes} passes ({args.memory_passes * n} images)"
        )


if __name__ == "__main__":
    main()
