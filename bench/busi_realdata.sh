#!/usr/bin/env bash
# Real-data learning on BUSI from random initialisation, CPU, equal wall-time budgets (issue: tasks and baselines).
# Runs the adapter-injected CLIP model and the UNet baseline side by side (one thread each, so both see the same
# machine), then the classification task, and prints each run's test metrics.
#   bash bench/busi_realdata.sh [BUDGET (default 00:00:15:00)] [DATA (default ../shared/data/BUSI)]
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:-00:00:15:00}
DATA=${2:-${USCLIP_DATA_DIR:-../shared/data}/BUSI}
OUT=${OUT:-runs/bench_busi}
USCLIP=${USCLIP:-.venv/bin/usclip}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
# the same small budget-sized setting for every run: 128 px, batch 16, random weights
COMMON=(--data.root "$DATA" --data.image_size 128 --data.batch_size 16 --data.num_workers 0
        --trainer.precision 32-true --trainer.max_time "$BUDGET" --trainer.max_epochs 1000
        --trainer.enable_progress_bar false --trainer.logger.init_args.save_dir "$OUT" --model.pretrained null)
CLIP=(--model.model_name usclip-demo-vit --model.layers [1,3,5] --model.embed_dim 128 --model.lr 1e-3)

fit_test() {  # name, then usclip arguments
  local name=$1; shift
  "$USCLIP" fit "$@" --trainer.logger.init_args.name "$name" > "$OUT/$name.fit.log" 2>&1
  local ckpt
  ckpt=$(ls -d "$OUT/$name"/version_*/checkpoints/best.ckpt | tail -n 1)
  "$USCLIP" test "$@" --trainer.logger.init_args.name "$name" --ckpt_path "$ckpt" > "$OUT/$name.test.log" 2>&1
}

mkdir -p "$OUT"
fit_test clip_mona_seg --config configs/busi_seg.yaml "${COMMON[@]}" "${CLIP[@]}" &
fit_test unet_seg --config configs/busi_seg.yaml --config configs/baselines/unet.yaml "${COMMON[@]}" \
  --model.model_name smp:Unet/resnet18 --model.lr 1e-3 &
wait
fit_test clip_mona_cls --config configs/busi_cls.yaml "${COMMON[@]}" "${CLIP[@]}"
for f in "$OUT"/*/version_*/results/test_metrics.json; do echo "== $f"; cat "$f"; done
