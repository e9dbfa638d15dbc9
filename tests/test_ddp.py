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


# One script that calls usclip.cli.main("fit"), then main("test"): Lightning's usual fit-then-test script under DDP
# (rank 1 reruns the script; the second trainer reuses the processes and the process group). It pays the import of
# torch and Lightning once instead of twice.
FIT_THEN_TEST = """import sys
from usclip.cli import main

argv = sys.argv[1:]
cut = argv.index("--then")
main(argv[:cut])
main(argv[cut + 1 :])
"""


def _fit_then_test(fit: list[str], test: list[str], how: str, cwd: Path) -> None:
    """Run ``usclip fit`` then ``usclip test`` under DDP: two ``python -m usclip`` commands, or one script."""
    if how == "cli":
        _usclip(*fit, cwd=cwd)
        _usclip(*test, cwd=cwd)
        return
    script = cwd / "fit_then_test.py"
    script.write_text(FIT_THEN_TEST)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(script), *fit, "--then", *test], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]


# The default case runs fit and test in one script (one interpreter start instead of two); the `usclip` commands
# as a user types them are the slow cases. Both catch a padding sampler (an image evaluated twice), a test table or
# metric gathered from rank zero only (images missing), and DDP metrics that differ from one process.
@pytest.mark.parametrize(
    ("conf", "table", "how"),
    [
        ("segmentation_lora.yaml", "test_per_image.csv", "script"),
        pytest.param("segmentation_lora.yaml", "test_per_image.csv", "cli", marks=pytest.mark.slow),
        pytest.param("classification_lora.yaml", "test_predictions.csv", "cli", marks=pytest.mark.slow),  # ~60 s
    ],
    ids=["segmentation", "segmentation_cli", "classification_cli"],
)
def test_ddp_two_processes_fit_then_test_gathers_every_image_once(tmp_path, conf, table, how):
    # a few DDP training steps on two processes, then the test under DDP from the last checkpoint
    run = tmp_path / "runs" / "ddp" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    fit = ["fit", *_args(conf, tmp_path, "ddp"), *DDP, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"]
    test = ["test", *_args(conf, tmp_path, "ddp_test"), *DDP, f"--ckpt_path={last}"]
    _fit_then_test(fit, test, how, cwd=tmp_path)
    assert last.is_file()
    test_ids = read_split_file(run / "splits" / "test.txt")
    assert len(test_ids) % 2 == 1

    # the test under DDP: every image evaluated once, by one of the two processes, gathered on rank zero
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
