#!/usr/bin/env bash
# One GPU, at most about 8 minutes: the figures of docs/benchmarks.md ("On a GPU"), written as JSON.
#
#   bash bench/gpu.sh                        # on a machine with a CUDA GPU (ViT-B/16, random weights)
#   bash bench/gpu.sh --device cpu --tiny    # the same steps on the CPU with the tiny test model (tests run this)
#   bash bench/gpu.sh --out DIR              # where the JSON files and the run go (default: bench_out/gpu)
#
# Steps (each writes DIR/<step>.json; DIR/gpu.json gathers them with the machine and the wall time):
#   1. train_bf16 / train_fp32: training step of the paper's segmentation task (Mona, blocks 3/6/9, batch 32,
#      224 px) under bf16 autocast and in fp32 (bench/train_step.py)
#   2. predict_bf16: inference forward, bf16; predict_lora_merged: LoRA merged into the frozen weights
#   3. metrics: Dice, IoU, HD95, ASD on the device, checked against the CPU and MONAI (bench/metrics_device.py)
#   4. fit: `usclip fit` + `usclip test` of configs/busi_seg.yaml (bf16-mixed) with random weights on a synthetic
#      dataset, through the real CLI
# Python comes from $PYTHON (default python3); usclip must be importable (pip install, or PYTHONPATH=repo root).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
TINY=0
OUT=bench_out/gpu
PY="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --tiny) TINY=1; shift ;;
        --out) OUT="$2"; shift 2 ;;
        -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "bench/gpu.sh: unknown argument '$1' (expected --device cuda|cpu, --tiny, --out DIR)" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in cuda | cpu) ;; *) echo "bench/gpu.sh: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;; esac
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
START=$(date +%s)

if [ "$TINY" = 1 ]; then
    STEP_ARGS=(--model usclip-test-vit --layers 1,3 --image-size 64 --batch-size 2 --steps 1 --repeats 1 --warmup 1
        --peak-size 128)
    METRIC_ARGS=(--pairs 64 --size 64 --repeats 1 --monai-pairs 8)
    FIT_MODEL="model_name: usclip-test-vit
    layers: [1, 3]
    embed_dim: 16"
    FIT_DATA="image_size: 64
    batch_size: 4
    num_workers: 0
    synthetic: {num_samples: 24, size: 96, seed: 0}"
    FIT_TRAINER="max_epochs: 1
  precision: 32-true
  accelerator: $DEVICE
  enable_progress_bar: false"
else
    STEP_ARGS=(--batch-size 32 --steps 10 --repeats 3 --warmup 3 --peak-size 8192)
    METRIC_ARGS=(--pairs 2048 --repeats 5 --monai-pairs 64)
    FIT_MODEL="layers: [3, 6, 9]"
    FIT_DATA="batch_size: 32
    num_workers: 8
    synthetic: {num_samples: 640, size: 256, seed: 0}"
    FIT_TRAINER="max_epochs: 3
  accelerator: $DEVICE
  enable_progress_bar: false"
fi

step() {  # step NAME ARGS...: run one benchmark, write OUT/NAME.json, log to OUT/NAME.log
    local name="$1"
    shift
    echo "== $name" >&2
    "$PY" "$@" --json "$OUT/$name.json" >"$OUT/$name.log" 2>&1 || {
        echo "bench/gpu.sh: step $name failed; last lines of $OUT/$name.log:" >&2
        tail -20 "$OUT/$name.log" >&2
        exit 1
    }
}

step train_bf16 bench/train_step.py --device "$DEVICE" --precision bf16 "${STEP_ARGS[@]}"
step train_fp32 bench/train_step.py --device "$DEVICE" --precision 32 "${STEP_ARGS[@]}"
step predict_bf16 bench/train_step.py --device "$DEVICE" --precision bf16 --mode predict "${STEP_ARGS[@]}"
step predict_lora_merged bench/train_step.py --device "$DEVICE" --precision bf16 --mode predict --adapter lora --merge \
    "${STEP_ARGS[@]}"
step metrics bench/metrics_device.py --device "$DEVICE" "${METRIC_ARGS[@]}"

# A paper config through the real CLI, with random weights on synthetic data (the overlay below is all it changes).
cat >"$OUT/fit_overlay.yaml" <<EOF
trainer:
  $FIT_TRAINER
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {save_dir: $OUT/runs, name: busi_seg}
model:
  init_args:
    pretrained: null
    $FIT_MODEL
data:
  init_args:
    root: $OUT/data
    $FIT_DATA
EOF
echo "== fit" >&2
FIT_START=$(date +%s.%N)
"$PY" -m usclip fit --config configs/busi_seg.yaml --config "$OUT/fit_overlay.yaml" \
    --trainer.logger.init_args.version fit >"$OUT/fit.log" 2>&1 || {
    echo "bench/gpu.sh: usclip fit failed; last lines of $OUT/fit.log:" >&2
    tail -30 "$OUT/fit.log" >&2
    exit 1
}
FIT_END=$(date +%s.%N)
"$PY" -m usclip test --config configs/busi_seg.yaml --config "$OUT/fit_overlay.yaml" \
    --trainer.logger.init_args.version test --ckpt_path "$OUT/runs/busi_seg/fit/checkpoints/best.ckpt" \
    >"$OUT/test.log" 2>&1 || {
    echo "bench/gpu.sh: usclip test failed; last lines of $OUT/test.log:" >&2
    tail -30 "$OUT/test.log" >&2
    exit 1
}

"$PY" - "$OUT" "$START" "$FIT_START" "$FIT_END" "$DEVICE" "$TINY" <<'EOF'
import json, platform, subprocess, sys, time
from pathlib import Path

import torch

out, start, fit_start, fit_end, device, tiny = sys.argv[1:]
out = Path(out)
summary = {
    "device": device,
    "tiny": tiny == "1",
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
    "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
}
if device == "cuda":
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        )
        summary["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        summary["nvidia_smi"] = f"unavailable: {err}"
for name in ("train_bf16", "train_fp32", "predict_bf16", "predict_lora_merged", "metrics"):
    summary[name] = json.loads((out / f"{name}.json").read_text())
metrics = json.loads((out / "runs" / "busi_seg" / "test" / "results" / "test_metrics.json").read_text())
summary["fit"] = {
    "config": "configs/busi_seg.yaml + random weights, synthetic data",
    "fit_seconds": round(float(fit_end) - float(fit_start), 1),
    "test_metrics": metrics,
}
summary["total_seconds"] = round(time.time() - float(start), 1)
(out / "gpu.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: summary[k] for k in ("device", "gpu", "total_seconds")}))
EOF
