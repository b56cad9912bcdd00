#!/bin/bash
# A/B on the GPU machine: the working tree ("new") against a copy of an earlier commit in .dev/base ("base"),
# one process after the other in one lease, each with a fresh autotune file (as a new user's first run).
# Prepare the base here:  rm -rf .dev/base && mkdir -p .dev/base && git archive BASE pkg shaders bench | tar -x -C .dev/base
# then carry .gl, .whl and .dev:  bash bench/gpu_ab.sh [train|matmul|all]
set -uo pipefail
source bench/h100_env.sh
WHAT=${1:-all}
train() {   # train TREE LABEL [ARGS]: bench_train of the browser preset from TREE's bench/ (and so its pkg/)
  local tree=$1 label=$2; shift 2
  echo "== $label: bench_train $*"
  TABGPT_CACHE=$(mktemp -d) python3 "$tree/bench/bench_train.py" --preset browser --steps 30 "$@" 2>&1 \
    | tee -a "$OUT/train_$label.txt" | grep -E '^\| (tabgpt|PyTorch)'
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
python3 -m tabgpt device 2>&1 | head -12 | tee "$OUT/device.txt"
if [ "$WHAT" = train ] || [ "$WHAT" = all ]; then
  train .dev/base base --no-torch
  train . new
  train .dev/base base --no-torch
  train . new --no-torch
  python3 bench/bench_train.py --preset tiny --steps 300 --no-torch 2>&1 | tee -a "$OUT/train_tiny.txt" | grep -E '^\| tabgpt'
fi
if [ "$WHAT" = matmul ] || [ "$WHAT" = all ]; then
  TABGPT_CACHE=$(mktemp -d) python3 bench/bench_matmul.py --trials 3 --seconds 0.05 --preset browser --tiles auto \
    2>&1 | tee -a "$OUT/matmul_new.txt" | tail -32
  TABGPT_CACHE=$(mktemp -d) python3 bench/profile_step.py --preset browser 2>&1 | tee -a "$OUT/profile_new.txt" | head -40
fi
tar czf "$OUT/results.tgz" bench/results
true
