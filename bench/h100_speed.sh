#!/bin/bash
# Kernel-speed runs on the GPU machine (set-up as bench/h100.sh says; carry .gl and .whl):
#   bash bench/h100_speed.sh checks    # shader runtime checks: matmul, step profile and training, all/bounds/none
#   bash bench/h100_speed.sh explore   # matmul tile variants side by side, step profile, training
#   bash bench/h100_speed.sh step      # step profile and training throughput (browser and gpt2 presets)
#   bash bench/h100_speed.sh final     # the benchmarks of BENCHMARKS.md with the defaults
# Logs and the appended bench/results/*.md come back in $OUT.
set -uo pipefail
source bench/h100_env.sh
[ -d .dev/pin ] && cp -r .dev/pin/. .   # pinned copies of files being edited elsewhere, when carried
WHAT=${1:-checks}
SIZES="4096x4096x4096 8192x3072x768 nt:8192x768x3072 tn:768x3072x8192"
if [ "$WHAT" = checks ]; then
  for m in all bounds none; do
    TABGPT_SHADER_CHECKS=$m python3 bench/bench_matmul.py --trials 3 --seconds 0.08 --sizes $SIZES \
      --tiles 128,128,16,8,8,spread,prefetch --tiles 128,128,8,8,8,spread,prefetch \
      --tiles 128,128,32,8,8,spread,prefetch ${TILES:-} 2>&1 | tee -a "$OUT/matmul.txt"
  done
  for m in all bounds none; do
    TABGPT_SHADER_CHECKS=$m python3 bench/profile_step.py --preset browser --write 2>&1 | tee -a "$OUT/profile.txt"
  done
  TABGPT_SHADER_CHECKS=all python3 bench/bench_train.py --preset browser --steps 30 --no-torch --write 2>&1 \
    | tee -a "$OUT/train.txt"
  TABGPT_SHADER_CHECKS=none python3 bench/bench_train.py --preset browser --steps 30 --no-torch --write 2>&1 \
    | tee -a "$OUT/train.txt"
  TABGPT_SHADER_CHECKS=bounds python3 bench/bench_train.py --preset browser --steps 30 --write 2>&1 \
    | tee -a "$OUT/train.txt"
  for m in all bounds; do
    TABGPT_SHADER_CHECKS=$m python3 bench/bench_attention.py --trials 3 2>&1 | tee -a "$OUT/attention.txt"
  done
fi
if [ "$WHAT" = explore ]; then
  # matmul variants: ROWS staging, 16 columns per thread
  python3 bench/bench_matmul.py --trials 3 --seconds 0.1 --all-layouts --tiles 128,128,8,8,8,spread,prefetch,double \
    --tiles 128,128,8,8,8,spread,prefetch,double,rows --tiles 128,256,8,8,16,spread,prefetch,double \
    --tiles 128,256,8,8,16,spread,prefetch,double,rows --tiles 128,128,8,8,16,spread,prefetch,double \
    --tiles 128,128,16,8,16,spread,prefetch,double 2>&1 | tee -a "$OUT/matmul.txt"
  python3 bench/profile_step.py --preset browser --write 2>&1 | tee -a "$OUT/profile.txt"
  python3 bench/bench_train.py --preset browser --steps 30 --write 2>&1 | tee -a "$OUT/train.txt"
fi
if [ "$WHAT" = step ]; then
  python3 bench/profile_step.py --preset browser --write 2>&1 | tee -a "$OUT/profile.txt"
  python3 bench/bench_train.py --preset browser --steps 30 --write 2>&1 | tee -a "$OUT/train.txt"
  python3 bench/bench_train.py --preset gpt2 --steps 6 --write 2>&1 | tee -a "$OUT/train.txt"
  python3 bench/bench_train.py --preset small --steps 30 --write 2>&1 | tee -a "$OUT/train.txt"
fi
if [ "$WHAT" = final ]; then
  python3 -m tabgpt device 2>&1 | tee "$OUT/device.txt"
  python3 bench/bench_peak.py 2>&1 | tee -a "$OUT/peak.txt"
  python3 bench/bench_matmul.py --trials 3 --seconds 0.1 --all-layouts --tiles 128,128,8,8,8,spread,prefetch,double \
    --tiles auto 2>&1 | tee -a "$OUT/matmul.txt"
  python3 bench/bench_matmul_variants.py --sizes 4096x4096x4096 nt:8192x768x3072 tn:768x3072x8192 2>&1 \
    | tee -a "$OUT/matmul.txt"
  python3 bench/bench_attention.py --trials 3 --pipeline both 2>&1 | tee -a "$OUT/attention.txt"
  python3 bench/profile_step.py --preset browser --write 2>&1 | tee -a "$OUT/profile.txt"
  python3 bench/bench_train.py --preset browser --steps 30 --write 2>&1 | tee -a "$OUT/train.txt"
  python3 bench/bench_train.py --preset gpt2 --steps 6 --write 2>&1 | tee -a "$OUT/train.txt"
fi
tar czf "$OUT/results.tgz" bench/results
true
