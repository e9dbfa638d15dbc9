"""Two-process DDP on CPU (gloo) through the real CLI: a few training steps, then a test gathered from both processes.

The test split has an odd number of images, so a padding ``DistributedSampler`` would evaluate one image twice;
usclip's evaluation sampler shards without padding and the per-image table has exactly one row per test image.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from usclip.cli import main
from usclip.data.splits import read_split_file

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "tests" / "conf"
DDP = ("--trainer.strategy=ddp", "--trainer.accelerator=cpu", "--trainer.devices=2")


def _args(conf: str, tmp_path: Path, name: str) -> list[str]:
    return [
        "--config",
        str(CONF_DIR / conf),
        f"--data.init_args.root={tmp_path / 'data'}",
        "--data.init_args.split_fractions=[0.6,0.1,0.3]",  # 7 test images of 24: odd
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        f"--trainer.logger.init_args.name={name}",
        f"--trainer.default_root_dir={tmp_path}",
    ]


def _usclip(*args: str, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "usclip", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    ("conf", "table"),
    [
        ("segmentation_lora.yaml", "test_per_image.csv"),
        pytest.param("classification_lora.yaml", "test_predictions.csv", marks=pytest.mark.slow),  # ~60 s more
    ],
    ids=["segmentation", "classification"],
)
def test_ddp_two_processes_fit_then_test_gathers_every_image_once(tmp_path, conf, table):
    # a few DDP training steps on two processes
    _usclip(
        "fit",
        *_args(conf, tmp_path, "ddp"),
        *DDP,
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        cwd=tmp_path,
    )
    run = tmp_path / "runs" / "ddp" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file()
    test_ids = read_split_file(run / "splits" / "test.txt")
    assert len(test_ids) % 2 == 1

    # the test under DDP: every image evaluated once, by one of the two processes, gathered on rank zero
    _usclip("test", *_args(conf, tmp_path, "ddp_test"), *DDP, f"--ckpt_path={last}", cwd=tmp_path)
    results = tmp_path / "runs" / "ddp_test" / "version_0" / "results"
    rows = _rows(results / table)
    assert sorted(r["id"] for r in rows) == sorted(test_ids)  # one row per test image: none twice, none missing
    ddp = json.loads((results / "test_metrics.json").read_text())
    assert ddp["num_images"] == len(test_ids)

    # the same checkpoint on one process gives the same table and metrics
    cli = main(["test", *_args(conf, tmp_path, "single"), f"--ckpt_path={last}"])
    single_dir = Path(cli.trainer.log_dir) / "results"
    single = json.loads((single_dir / "test_metrics.json").read_text())
    assert ddp.keys() == single.keys()
    for key, value in single.items():
        assert ddp[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-5, abs=1e-6)), key
    by_id = {r["id"]: r for r in _rows(single_dir / table)}
    for row in rows:
        for column, value in row.items():
            if column not in ("id", "index", "metric_protocol"):
                assert float(value) == pytest.approx(float(by_id[row["id"]][column]), rel=1e-5, abs=1e-6)
