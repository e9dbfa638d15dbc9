#!/usr/bin/env bash
# One device check for issue #25 item 1: measured run times of one BUSI segmentation run (bench/paper_run.py).
#   bash bench/paper_run_gpu.sh                 # on the GPU machine; JSON under $OUT (or bench_out/paper_run_gpu)
#   bash bench/paper_run_gpu.sh --cpu-smoke     # the same steps with the tiny model on a CPU (seconds, not figures)
# Steps, each under its own time limit so that the whole script stays within about 8 minutes:
#   1. short: the usclip protocol (bf16-mixed, validation every epoch), ViT-B/16 random weights, 647 synthetic
#      images at 256 px, 5 epochs, CUDA synchronised at each phase end (an exact split), plus the training loader
#      alone with 0, 4 and 8 workers (images/s beside the step images/s): paper_run_short.json (limit 120 s);
#   2. full: the same at 100 epochs without synchronisation (the wall time of the issue's target, "one BUSI run of
#      100 epochs in at most 3 minutes"): paper_run_100.json (limit 330 s).
# The fixed cost (start-up, test, teardown) and the per-epoch cost of each phase follow from the two runs; see
# docs/benchmarks.md ("One paper run, phase by phase") for how they fill docs/reproduce.md's run-time table.
set -u
PY="${PYTHON:-python3}"
OUT="${OUT:-bench_out/paper_run_gpu}"
SMOKE=0
for arg in "$@"; do
    case "$arg" in
        --cpu-smoke) SMOKE=1 ;;
        *) echo "bench/paper_run_gpu.sh: unknown argument '$arg' (expected --cpu-smoke)" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/paper_run_gpu.XXXXXX")"  # data and checkpoints stay out of $OUT
export HF_HUB_OFFLINE=1
cd "$(dirname "$0")/.." || exit 1

if [ "$SMOKE" = 1 ]; then
    COMMON=(--model tiny --images 40 --image-px 96 --precision 32-true --accelerator cpu --num-workers 0)
    SHORT=(--epochs 1 --loader-workers 0)
    FULL=(--epochs 2)
    LIMIT_SHORT=300
    LIMIT_FULL=300
else
    COMMON=(--accelerator gpu)
    SHORT=(--epochs 5 --sync-cuda --loader-workers 0,4,8)
    FULL=(--epochs 100)
    LIMIT_SHORT=120
    LIMIT_FULL=330
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1 || true
lscpu >"$OUT/lscpu.txt" 2>&1 || true
status=0
run() {  # run NAME LIMIT ARGS...
    local name="$1" limit="$2"
    shift 2
    echo "== $name (limit ${limit} s)" >&2
    local start=$SECONDS
    timeout "$limit" "$PY" bench/paper_run.py "${COMMON[@]}" "$@" --out "$OUT/$name.json" --work "$WORK/$name" \
        >"$OUT/$name.log" 2>&1
    local rc=$?
    for f in fit.log test.log; do
        [ -f "$WORK/$name/$f" ] && tail -40 "$WORK/$name/$f" >"$OUT/${name}_$f"
    done
    echo "   rc $rc after $((SECONDS - start)) s" >&2
    if [ "$rc" != 0 ]; then
        tail -20 "$OUT/$name.log" >&2
        status=1
    fi
}

run paper_run_short "$LIMIT_SHORT" "${SHORT[@]}"
run paper_run_100 "$LIMIT_FULL" "${FULL[@]}"
rm -rf "$WORK"
ls -l "$OUT" >&2
exit "$status"
