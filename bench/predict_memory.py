"""Peak memory of ``usclip predict`` over many images: results stream to disk, so memory must stay flat.

Writes ``max(--counts)`` synthetic images, trains a tiny segmentation checkpoint (``usclip-test-vit``, random
weights, one step), then runs ``usclip predict`` on the first N images for each N in ``--counts``, each in a fresh
process, and reports that process's peak resident set size (``ru_maxrss`` from ``wait4``) and wall time.

    python bench/predict_memory.py --out /tmp/predict_memory --counts 500 5000
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from usclip.data.synthetic import write_synthetic_dataset

log = logging.getLogger("predict_memory")

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "tests" / "conf" / "segmentation_lora.yaml"


def _usclip(args: list[str], cwd: Path) -> tuple[float, float]:
    """Run ``python -m usclip ARGS``; return (peak RSS in MiB, wall seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "usclip", *args], cwd=cwd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"usclip {' '.join(args[:1])} failed with exit code {proc.returncode}")
    return usage.ru_maxrss / 1024.0, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def main(argv: list[str] | None = None) -> None:
    """Measure and print a Markdown table of peak RSS per image count."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a new temporary folder)")
    parser.add_argument("--counts", type=int, nargs="+", default=[500, 5000], help="images per predict run")
    parser.add_argument("--size", type=int, default=96, help="side of the synthetic images in pixels")
    parser.add_argument("--batch-size", type=int, default=32, help="predict batch size")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out: Path = args.out if args.out is not None else Path(tempfile.mkdtemp(prefix="usclip_predict_memory_"))
    out.mkdir(parents=True, exist_ok=True)

    images = write_synthetic_dataset(out / "data", num_samples=max(args.counts), size=args.size) / "images"
    names = sorted(p.name for p in images.glob("*.png"))
    common = [
        "--config",
        str(CONF),
        f"--data.init_args.root={out / 'train'}",
        f"--trainer.logger.init_args.save_dir={out / 'runs'}",
        f"--trainer.default_root_dir={out}",
    ]
    run = out / "runs" / "segmentation_lora" / "version_0" / "checkpoints" / "last.ckpt"
    if not run.is_file():
        _usclip(["fit", *common, "--trainer.limit_train_batches=1"], cwd=out)
    rows = []
    for count in args.counts:
        folder = out / f"predict_{count}"
        folder.mkdir(exist_ok=True)
        for name in names[:count]:  # the first `count` images, linked rather than copied
            link = folder / name
            if not link.exists():
                link.symlink_to(images / name)
        name = f"predict_{count}"
        peak, seconds = _usclip(
            [
                "predict",
                *common,
                f"--trainer.logger.init_args.name={name}",
                f"--ckpt_path={run}",
                f"--data.init_args.predict_root={folder}",
                f"--data.init_args.batch_size={args.batch_size}",
            ],
            cwd=out,
        )
        written = max((out / "runs" / name).glob("version_*"), key=lambda p: p.stat().st_mtime)
        masks = len(list((written / "predictions" / "masks").glob("*.png")))
        if masks != count:
            raise RuntimeError(f"{count} images but {masks} masks written in {written}")
        rows.append((count, peak, seconds))
        log.info("%d images: peak RSS %.0f MiB, %.1f s", count, peak, seconds)
    print("| images | peak RSS (MiB) | wall time (s) |")
    print("| ---: | ---: | ---: |")
    for count, peak, seconds in rows:
        print(f"| {count} | {peak:.0f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
