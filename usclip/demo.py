"""``python -m usclip.demo`` (``make demo``): the main job, end to end, on synthetic ultrasound, on the CPU.

Runs ``usclip fit --config configs/demo.yaml`` through the real CLI, tests the best checkpoint on the held-out
split of the same run, tests the same model untrained for comparison, and reports where everything is.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from usclip._io import write_text_atomic
from usclip.cli import main as cli_main
from usclip.packaged_configs import resolve_config

log = logging.getLogger(__name__)


def run_demo(config: str | Path = "configs/demo.yaml", overrides: Sequence[str] = ()) -> dict[str, object]:
    """Fit, test, and test an untrained twin; return a summary (also written to ``results/demo_summary.json``).

    Args:
        config: the demo YAML.
        overrides: extra CLI arguments, e.g. ``["--trainer.max_epochs=1"]``.

    Raises:
        FileNotFoundError: if ``config`` does not exist.
    """
    config = Path(resolve_config(str(config)))  # the packaged demo.yaml outside the repository
    if not config.is_file():
        raise FileNotFoundError(f"demo config {config} not found; run from the repository root or pass --config")
    start = time.perf_counter()
    cli = cli_main(["fit", "--config", str(config), *overrides])
    fit_seconds = time.perf_counter() - start
    trainer, datamodule = cli.trainer, cli.datamodule
    run_dir = Path(trainer.log_dir or ".")
    trained = trainer.test(cli.model, datamodule=datamodule, ckpt_path="best", verbose=False)[0]

    # The same architecture with the same seed, never trained: what learning has to beat.
    L.seed_everything(cli.config["fit"]["seed_everything"], verbose=False)
    untrained_model = type(cli.model)(**{k: v for k, v in cli.model.hparams.items() if not k.startswith("_")})
    untrained_trainer = L.Trainer(
        accelerator="gpu" if trainer.strategy.root_device.type == "cuda" else "cpu",
        devices=1,
        logger=TensorBoardLogger(run_dir, name="untrained", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    untrained = untrained_trainer.test(untrained_model, datamodule=datamodule, verbose=False)[0]
    summary: dict[str, object] = {
        "run_dir": str(run_dir),
        "best_checkpoint": getattr(trainer.checkpoint_callback, "best_model_path", None),
        "test_dice": trained["test_dice"],
        "test_iou": trained["test_iou"],
        "test_hd95": trained["test_hd95"],
        "test_asd": trained["test_asd"],
        "untrained_test_dice": untrained["test_dice"],
        "fit_seconds": round(fit_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    (run_dir / "results").mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "results" / "demo_summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Command-line entry point of the demo."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", default="configs/demo.yaml", help="demo YAML (default: configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="extra usclip CLI arguments, e.g. --trainer.max_epochs=1")
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = run_demo(args.config, [*args.overrides, *extra])
    run_dir = Path(str(summary["run_dir"]))
    lines = [
        "",
        "usclip demo finished",
        f"  test Dice          {summary['test_dice']:.3f}   "
        f"(same model untrained: {summary['untrained_test_dice']:.3f})",
        f"  test IoU / HD95 / ASD  {summary['test_iou']:.3f} / {summary['test_hd95']:.1f} px / "
        f"{summary['test_asd']:.1f} px",
        f"  wall time          {summary['total_seconds']:.0f} s (fit {summary['fit_seconds']:.0f} s)",
        f"  run directory      {run_dir}",
        f"  metrics            {run_dir / 'results' / 'test_metrics.json'}",
        f"  per-image table    {run_dir / 'results' / 'test_per_image.csv'}",
        f"  overlays           {run_dir / 'overlays'}",
        f"  best checkpoint    {summary['best_checkpoint']}",
        f"  TensorBoard        tensorboard --logdir {run_dir.parent}",
    ]
    log.info("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
