#!/bin/bash
# Runs on the GPU machine (NVIDIA, through Vulkan): set-up, `tabgpt device`, the training throughput benchmark
# against PyTorch, and the quality run (browser preset on the default corpus, 10 minutes of training in two
# segments: the second resumes the first from its checkpoint, which continues bit-identically).
#   bash bench/h100.sh 1    # set-up, device, benchmarks, training segment 1
#   bash bench/h100.sh 2    # training segment 2 (resume) + samples + evaluation
# The GPU machine has the NVIDIA driver and PyTorch but no Vulkan loader and no wgpu: bring them along in two
# git-ignored folders prepared on a machine with the package registries:
#   .gl/   the Vulkan loader and the GL dispatch libraries the NVIDIA ICD links against (the H200 machines need
#          them): (cd .gl && apt-get download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
#   .whl/  pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#              --platform manylinux2014_x86_64 -d .whl wgpu==0.32.0 cffi pycparser rendercanvas
set -uo pipefail
STAGE=${1:-1}
source bench/h100_env.sh
RUN=/tmp/runs/browser
BUDGET=${BUDGET:-600}
if [ "$STAGE" = 1 ]; then
  python3 -m tabgpt device 2>&1 | tee "$OUT/device.txt"
  python3 bench/bench_train.py --preset browser --steps 30 --write 2>&1 | tee "$OUT/bench_browser.txt"
  [ "${GPT2:-0}" = 1 ] && python3 bench/bench_train.py --preset gpt2 --steps 6 --write 2>&1 | tee "$OUT/bench_gpt2.txt"
  cp bench/results/train.md "$OUT/train.md"
  # Size the schedule to the time budget from the measured throughput (minus ~8% for evaluations).
  TPS=$(grep "tabgpt (WGSL" "$OUT/bench_browser.txt" | awk -F'|' '{gsub(/[ ,]/,"",$3); print $3}')
  STEPS=$(python3 -c "print(int($TPS * $BUDGET * 0.92 / (32 * 256)))")
  echo "throughput $TPS tokens/s -> max_steps $STEPS" | tee "$OUT/plan.txt"
  rm -rf $RUN
  python3 -m tabgpt train --data default --preset browser --max-steps "$STEPS" --eval-interval 250 \
      --checkpoint-interval 500 --time-limit ${SEG1:-300} --out $RUN 2>&1 | tee "$OUT/train1.log"
else
  python3 -m tabgpt train --data default --resume --time-limit $BUDGET --out $RUN 2>&1 | tee "$OUT/train2.log"
  python3 -m tabgpt sample --run $RUN --prompt "ROMEO:" --num-samples 3 --max-new-tokens 150 --top-k 50 2>&1 \
    | tee "$OUT/samples.txt"
  python3 -m tabgpt eval --run $RUN --data default 2>&1 | tee "$OUT/eval.json"
fi
cp $RUN/metrics.jsonl $RUN/config.json "$OUT/" 2>/dev/null
true
