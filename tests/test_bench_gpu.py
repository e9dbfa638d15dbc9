"""bench/gpu.sh and bench/metrics_device.py on the CPU (the GPU figures themselves are in docs/benchmarks.md)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load_metrics_bench():
    spec = importlib.util.spec_from_file_location("metrics_device", REPO / "bench" / "metrics_device.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_metrics_device_agrees_with_cpu_and_monai(tmp_path):
    bench = _load_metrics_bench()
    out = tmp_path / "m.json"
    result = bench.main(
        ["--device", "cpu", "--pairs", "32", "--size", "48", "--repeats", "1", "--monai-pairs", "8", "--json", str(out)]
    )
    assert json.loads(out.read_text()) == result
    assert result["max_abs_diff_device_vs_cpu"] == 0.0
    assert result["monai_pairs_compared"] == 8  # pair 15 is the first empty prediction
    # docs/benchmarks.md: within 4.8e-7 (2**-21) of MONAI on 2,048 pairs at 224 px; 2.4e-7 measured on these 8
    assert result["max_abs_diff_vs_monai"] <= 2.0**-21
    assert result["pairs"] == 32 and result["size"] == 48


def test_metrics_device_masks_have_missed_lesions():
    bench = _load_metrics_bench()
    preds, target = bench.make_masks(32, 40, seed=3)
    assert preds.shape == target.shape == (32, 40, 40)
    empty = [i for i in range(32) if not preds[i].any()]
    assert empty == [15, 31]
    assert all(target[i].any() for i in range(32))


def test_gpu_script_rejects_bad_arguments(tmp_path):
    for args, needle in (
        (["--device", "tpu"], "--device must be cuda or cpu, got 'tpu'"),
        (["--fast"], "unknown argument '--fast'"),
    ):
        proc = subprocess.run(
            ["bash", str(REPO / "bench" / "gpu.sh"), *args, "--out", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2
        assert needle in proc.stderr


@pytest.mark.slow
def test_gpu_script_tiny_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), "--device", "cpu", "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu.json").read_text())
    assert summary["device"] == "cpu" and summary["tiny"] is True
    assert summary["torch"] == torch.__version__
    assert summary["train_bf16"]["precision"] == "bf16" and summary["train_fp32"]["precision"] == "32"
    assert summary["predict_lora_merged"]["mode"] == "predict (LoRA merged)"
    assert summary["train_bf16"]["images_per_s"] > 0
    assert summary["metrics"]["max_abs_diff_device_vs_cpu"] == 0.0
    test_metrics = summary["fit"]["test_metrics"]
    with (tmp_path / "runs" / "busi_seg" / "test" / "results" / "test_per_image.csv").open() as f:
        dice = [float(row["dice"]) for row in csv.DictReader(f)]
    # the summary holds the test's own numbers: the mean of the per-image Dice (not only a value in [0, 1])
    assert test_metrics["num_images"] == len(dice) >= 1
    assert test_metrics["dice"] == pytest.approx(sum(dice) / len(dice), abs=1e-6)
    assert (tmp_path / "runs" / "busi_seg" / "fit" / "checkpoints" / "best.ckpt").is_file()
