"""Regenerate the README's example pictures, ``docs/images/overlay_grid.png`` and ``docs/images/roc_curve.png``.

Both come from synthetic scans and tiny models on the CPU (about two minutes on two cores), through the real CLI,
so they show what ``usclip test`` and ``usclip report`` draw today:

- the overlay grid: ``usclip fit`` + ``usclip test`` of two segmentation methods (Mona and LoRA in the setting of
  ``configs/demo.yaml``: usclip-demo-vit, random weights, fewer images and epochs), then
  ``usclip report <runs> --grid-images 3 --method-from name`` and its ``overlays_<dataset>.png``;
- the ROC curve: the same setting as a ``ClassificationTask``, ``usclip fit`` + ``usclip test``, and its
  ``results/test_roc.png``.

The PNGs are drawn at ``--dpi`` (default 150, which keeps each file well under 300 KB) and copied to ``--out``.
They show the pictures' format, not what pretrained CLIP adapters achieve.

Run from the repository root::

    python bench/docs_images.py                      # work folder bench_out/docs_images, copies to docs/images
    python bench/docs_images.py --epochs 2 --out /tmp/pictures   # quicker, elsewhere
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from usclip.cli import main as cli_main
from usclip.packaged_configs import resolve_config

log = logging.getLogger("docs_images")

SEGMENTATION_METHODS = ("Mona", "LoRA")  # logger names, the grid's column titles with --method-from name


def demo_config() -> dict:
    """The packaged ``configs/demo.yaml`` as a dict."""
    return yaml.safe_load(Path(resolve_config("configs/demo.yaml")).read_text())


def write_config(work: Path, name: str, *, task: str, adapter: str, args: argparse.Namespace) -> Path:
    """A config of the demo setting, scaled down to ``args``, for one run ``<work>/runs/<name>/version_0``."""
    config = copy.deepcopy(demo_config())
    config["trainer"].update(
        accelerator="cpu",
        max_epochs=args.epochs,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    config["trainer"]["logger"]["init_args"].update(save_dir=str(work / "runs"), name=name, version="version_0")
    model = config["model"]["init_args"]
    model["adapter"] = adapter
    data = config["data"]["init_args"]
    data["synthetic"]["num_samples"] = args.samples
    if task == "classification":
        config["model"]["class_path"] = "usclip.tasks.ClassificationTask"
        config["data"]["class_path"] = "usclip.data.ClassificationDataModule"
        model.update(figure_dpi=args.dpi, figure_formats=["png"])
        data["root"] = str(work / "data" / "synthetic_cls")
    else:
        data["root"] = str(work / "data" / "synthetic")
    path = work / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def fit_and_test(config: Path) -> Path:
    """``usclip fit`` then ``usclip test`` of the best checkpoint; return the run directory."""
    start = time.perf_counter()
    cli = cli_main(["fit", "--config", str(config)])
    run_dir = Path(cli.trainer.log_dir)
    cli_main(["test", "--config", str(config), f"--ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}"])
    metrics = json.loads((run_dir / "results" / "test_metrics.json").read_text())
    shown = {k: round(v, 3) for k, v in metrics.items() if k in ("dice", "iou", "acc", "auc")}
    log.info("%s: %s in %.0f s", run_dir, shown, time.perf_counter() - start)
    return run_dir


def run(args: argparse.Namespace) -> dict[str, Path]:
    """Make both pictures; return where they were copied."""
    work = args.work.resolve()
    if work.exists():
        shutil.rmtree(work)  # fresh runs: version_0 each, no stale overlays in the grid
    seg_runs = [
        fit_and_test(write_config(work, name, task="segmentation", adapter=name.lower(), args=args))
        for name in SEGMENTATION_METHODS
    ]
    cls_run = fit_and_test(write_config(work, "classifier", task="classification", adapter="mona", args=args))

    report = work / "report"
    report_args = ["--output", str(report), "--grid-images", str(args.grid_images), "--method-from", "name"]
    try:  # `usclip report` is an argparse subcommand: it ends in SystemExit(<exit code>)
        cli_main(["report", *map(str, seg_runs), *report_args, "--formats", "png", "--dpi", str(args.dpi)])
    except SystemExit as done:
        if done.code not in (None, 0):
            raise RuntimeError(f"usclip report failed with exit code {done.code}") from done
    (grid,) = sorted(report.glob("overlays_*.png"))
    roc = cls_run / "results" / "test_roc.png"
    if not roc.is_file():
        raise FileNotFoundError(f"{roc} missing: the classifier's test set holds one class")

    args.out.mkdir(parents=True, exist_ok=True)
    copied = {"overlay_grid": args.out / "overlay_grid.png", "roc_curve": args.out / "roc_curve.png"}
    shutil.copyfile(grid, copied["overlay_grid"])
    shutil.copyfile(roc, copied["roc_curve"])
    return copied


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--work", type=Path, default=Path("bench_out/docs_images"), help="runs and report (emptied)")
    parser.add_argument("--out", type=Path, default=Path("docs/images"), help="where the two PNGs go")
    parser.add_argument("--epochs", type=int, default=12, help="epochs of each run (default: 12)")
    parser.add_argument("--samples", type=int, default=240, help="synthetic images of each data set (default: 240)")
    parser.add_argument("--grid-images", type=int, default=3, help="rows of the overlay grid (default: 3)")
    parser.add_argument("--dpi", type=int, default=150, help="PNG resolution (default: 150)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    copied = run(args)
    for name, path in copied.items():
        log.info("%s: %s (%.0f KB)", name, path, path.stat().st_size / 1024)
    log.info("done in %.0f s", time.perf_counter() - start)


if __name__ == "__main__":
    main()
