"""Data pipeline figures on the real BUSI and DDTI copies: throughput, crop, split balance, duplicate finder.

1. Train dataloader images/s (BUSI, 224 px, default augmentations, batch 32, 2 workers) over three epochs, with
   the decode cache off, in memory (per worker), on disk, and without cropping.
2. Share of pixels the automatic crop removes on 20 BUSI and 20 DDTI images (every n-th id).
3. Label proportions of the group-aware 8:1:1 BUSI split (split seeds 0, 1, 2).
4. Duplicate finder precision and recall against the shared duplicates.csv (direct pairs) and groups.csv (all
   pairs within a group).

    python bench/data_pipeline.py                 # everything (about a minute on 2 cores)
    python bench/data_pipeline.py --only loader --workers 4 --epochs 5
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from usclip.data import SegmentationDataModule
from usclip.data.crop import find_scan_box
from usclip.data.duplicates import find_duplicates, group_ids, group_pairs, precision_recall
from usclip.data.imageio import read_image
from usclip.data.layouts import index_dataset, read_csv_column

DATA = Path(os.environ.get("USCLIP_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def loader_throughput(workers: int, epochs: int, image_size: int) -> None:
    print(f"\n### Train dataloader, BUSI, {image_size} px, batch 32, {workers} workers\n")
    print("| setting | " + " | ".join(f"epoch {e + 1} (img/s)" for e in range(epochs)) + " |")
    print("|---|" + "---|" * epochs)
    with tempfile.TemporaryDirectory() as cache_dir:
        settings = [
            ("crop auto, no cache", {"cache_mb": 0}),
            ("crop auto, memory cache", {}),
            ("crop auto, disk cache (empty at start)", {"cache_mb": 0, "cache_dir": cache_dir}),
            ("crop auto, disk cache (filled)", {"cache_mb": 0, "cache_dir": cache_dir}),
            ("crop none, no cache", {"cache_mb": 0, "crop": "none"}),
        ]
        for name, kwargs in settings:
            dm = SegmentationDataModule(
                str(DATA / "BUSI"), image_size=image_size, batch_size=32, num_workers=workers, **kwargs
            )
            dm.setup("fit")
            loader = dm.train_dataloader()
            rates = []
            for _ in range(epochs):
                start, count = time.perf_counter(), 0
                for batch in loader:
                    count += batch["image"].shape[0]
                rates.append(count / (time.perf_counter() - start))
            del loader
            print(f"| {name} | " + " | ".join(f"{r:.0f}" for r in rates) + " |")


def crop_fractions() -> None:
    print("\n### Automatic crop: share of pixels removed (20 images each, every n-th id)\n")
    print("| dataset | mean | median | min | max |\n|---|---|---|---|---|")
    for name in ("BUSI", "DDTI"):
        index = index_dataset(DATA / name, masks=False)
        ids = index.ids[:: len(index.ids) // 20][:20]
        removed = []
        for sid in ids:
            image = read_image(index.images[sid])
            x0, y0, x1, y1 = find_scan_box(image)
            removed.append(100 * (1 - (x1 - x0) * (y1 - y0) / image.size))
        r = np.array(removed)
        print(f"| {name} | {r.mean():.1f} % | {np.median(r):.1f} % | {r.min():.1f} % | {r.max():.1f} % |")


def split_balance() -> None:
    print("\n### BUSI group-aware 8:1:1 split: size and malignant share per split\n")
    print("| split seed | train | val | test | max difference | groups across splits |\n|---|---|---|---|---|---|")
    index = index_dataset(DATA / "BUSI")
    for seed in (0, 1, 2):
        dm = SegmentationDataModule(str(DATA / "BUSI"), split_seed=seed)
        dm.setup("fit")
        shares = {k: np.mean([index.labels[i] == "malignant" for i in v]) for k, v in dm.splits.items()}
        cells = [f"{len(dm.splits[k])} ({100 * shares[k]:.1f} %)" for k in ("train", "val", "test")]
        where = {
            g: {k for k, v in dm.splits.items() for i in v if index.groups.get(i) == g} for g in index.groups.values()
        }
        crossing = sum(len(s) > 1 for s in where.values())
        spread = 100 * (max(shares.values()) - min(shares.values()))
        print(f"| {seed} | " + " | ".join(cells) + f" | {spread:.1f} points | {crossing} |")


def duplicate_scores() -> None:
    print("\n### Duplicate finder against the shared reference files\n")
    print("| dataset | pairs found | direct pairs P / R (duplicates.csv) | group pairs P / R (groups.csv) | time |")
    print("|---|---|---|---|---|")
    for name in ("BUSI", "DDTI"):
        root = DATA / name
        index = index_dataset(root, masks=False)
        with (root / "duplicates.csv").open() as f:
            reference = {tuple(sorted((r["id_a"], r["id_b"]))) for r in csv.DictReader(f)}
        start = time.perf_counter()
        pairs = find_duplicates(index.images)
        seconds = time.perf_counter() - start
        found = {(p.id_a, p.id_b) for p in pairs}
        p1, r1 = precision_recall(found, reference)  # type: ignore[arg-type]
        groups = group_ids(index.ids, pairs)
        p2, r2 = precision_recall(group_pairs(groups), group_pairs(read_csv_column(root / "groups.csv", "group")))
        print(f"| {name} | {len(found)} | {p1:.3f} / {r1:.3f} | {p2:.3f} / {r2:.3f} | {seconds:.1f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["loader", "crop", "split", "duplicates"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    if not (DATA / "BUSI").is_dir():
        raise SystemExit(f"real data not found at {DATA} (set USCLIP_DATA_DIR)")
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}, load average {load:.1f}")
    if args.only in (None, "loader"):
        loader_throughput(args.workers, args.epochs, args.image_size)
    if args.only in (None, "crop"):
        crop_fractions()
    if args.only in (None, "split"):
        split_balance()
    if args.only in (None, "duplicates"):
        duplicate_scores()


if __name__ == "__main__":
    main()
