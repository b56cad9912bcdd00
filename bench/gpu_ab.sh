#!/bin/bash
# A/B on the GPU machine: the working tree ("new") against a copy of an earlier commit in .dev/base ("base"),
# one process after the other in one lease, each with a fresh autotune file (as a new user's first run), kept in
# $OUT/tune_N_LABEL (the tile shapes and split-K counts that arm's products ran with).
# Prepare the base here:
#   rm -rf .dev/base && mkdir -p .dev/base && git archive BASE pkg shaders bench | tar -x -C .dev/base
# then carry .gl, .whl and .dev:  bash bench/gpu_ab.sh TARGET, TARGET one of
#   check, train, pair, attention, gpt2, matmul, profile, torch, embedding, all; and, not in all: tunes (the
#   spread of fresh autotunings of the working tree, on N(0, 1) operands and on zeros, and a tune_in_steps.py
#   refinement against plain tunings, each in one process: probe_ab.py) and variants (the autotuner's A/B
#   switches TABGPT_TUNE_FLUSH and TABGPT_TUNE_MARGIN, three fresh tunings each, then paired rounds against
#   PyTorch with the one whose lowest draw was highest)
# DRAWS=N sets the fresh tunings of each setting in `tunes` and `variants` (default 3; each adds about two minutes
# to `variants` on an H100, a minute to `tunes`); VARIANTS="margin" (or "flush", "both", space-separated) keeps
# only those settings beside the default in `variants`.
# STEPS=N sets the timed steps of each browser-preset arm (default 30; 100 weighs the first step's encoding, which
# the GPU waits for, a third as much).
# ALT="NAME=value" adds a third arm to `train`: the working tree with that environment variable set; several arms
# are separated by ';' and each may set several variables: ALT="A=1;B=1;A=1 B=1" (arms alt1, alt2, alt3).
set -uo pipefail
# the tunes and variants settings, checked before the set-up
DRAWS=${DRAWS:-3}
VARIANTS=${VARIANTS:-flush margin both}
declare -A setting=([flush]=TABGPT_TUNE_FLUSH=1 [margin]=TABGPT_TUNE_MARGIN=0.01
                    [both]=TABGPT_TUNE_FLUSH=1,TABGPT_TUNE_MARGIN=0.01)
if ! [[ $DRAWS =~ ^[1-9][0-9]*$ ]]; then
  echo "DRAWS must be a whole number of fresh tunings, 1 or more, got '$DRAWS'" >&2; exit 2
fi
for s in $VARIANTS; do
  [ -n "${setting[$s]:-}" ] || { echo "VARIANTS takes flush, margin or both (space-separated), got '$s'" >&2; exit 2; }
done
source bench/h100_env.sh
WHAT=${1:-all}
ALT=${ALT:-}
STEPS=${STEPS:-30}
ARM=0
train() {   # train TREE LABEL [ARGS]: bench_train from TREE's bench/ (and so its pkg/); prints tokens/s and wall time
  local tree=$1 label=$2; shift 2
  local t0=$(date +%s.%N)
  ARM=$((ARM + 1))
  local cache="$OUT/tune_${ARM}_$label"    # a fresh autotune file, kept: what this arm's products ran with
  mkdir -p "$cache"
  echo "== $label: bench_train $* (tune file: $cache)"
  TABGPT_CACHE="$cache" python3 "$tree/bench/bench_train.py" --steps "$STEPS" "$@" 2>&1 \
    | tee -a "$OUT/train_$label.txt" | grep -E '^\| (tabgpt|PyTorch)'
  echo "   wall $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s (start-up, autotune, steps)"
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
python3 -m tabgpt device 2>&1 | head -12 > "$OUT/device.txt"
if [ "$WHAT" = check ] || [ "$WHAT" = all ]; then
  # kernel tests on this GPU (real hardware, beside lavapipe and SwiftShader)
  python3 -m pytest -q -p no:cacheprovider tests/test_ops_attention.py tests/test_ops_matmul.py \
    -k "${CHECK:-dq or split or epilogue}" 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -3
fi
if [ "$WHAT" = train ] || [ "$WHAT" = all ]; then
  for round in 1 2; do
    train .dev/base base --preset browser --no-torch
    if [ $round = 1 ]; then train . new --preset browser; else train . new --preset browser --no-torch; fi
    # each ALT arm: the working tree with its settings (space-separated NAME=value pairs) in the environment
    IFS=';' read -ra arms <<< "$ALT"
    for i in "${!arms[@]}"; do
      [ -n "${arms[$i]// /}" ] || continue
      label=alt; [ "${#arms[@]}" -gt 1 ] && label="alt$((i + 1))"
      echo "   $label: ${arms[$i]}"
      ( export ${arms[$i]}; train . "$label" --preset browser --no-torch )
      ARM=$((ARM + 1))   # the subshell's count is lost with it
    done
  done
fi
if [ "$WHAT" = attention ] || [ "$WHAT" = all ]; then
  python3 bench/bench_attention.py --trials 3 2>&1 | tee -a "$OUT/attention_new.txt" | grep -E '^\| [0-9]'
  TABGPT_ATTENTION_DQ=recompute python3 bench/bench_attention.py --trials 3 --no-write 2>&1 \
    | tee -a "$OUT/attention_recompute.txt" | grep -E '^\| [0-9]'
fi
if [ "$WHAT" = gpt2 ] || [ "$WHAT" = all ]; then
  train .dev/base base --preset gpt2 --steps 6 --no-torch
  train . new --preset gpt2 --steps 6
fi
if [ "$WHAT" = matmul ] || [ "$WHAT" = all ]; then
  TABGPT_CACHE=$(mktemp -d) python3 bench/bench_matmul.py --trials 3 --seconds 0.1 --squares \
    --tiles 128,128,8,8,8,spread,prefetch,double --tiles auto 2>&1 | tee -a "$OUT/matmul_new.txt" | grep -E '^\| nn'
fi
if [ "$WHAT" = embedding ] || [ "$WHAT" = all ]; then
  # the embedding backward: its sort's blocks of 1024 keys against the device's, beside PyTorch's
  python3 bench/bench_embedding.py --trials 5 2>&1 | tee -a "$OUT/embedding_new.txt" | grep -E '^\| (browser|gpt2)'
fi
if [ "$WHAT" = profile ] || [ "$WHAT" = all ]; then
  TABGPT_CACHE=$(mktemp -d) python3 bench/profile_step.py --preset browser 2>&1 | tee -a "$OUT/profile_new.txt" \
    | grep -E 'Whole step|^\| (matmul|attention|layernorm)'
fi
if [ "$WHAT" = pair ] || [ "$WHAT" = all ]; then
  # the ratio to PyTorch eager fp32 as paired rounds in one process (ROUNDS, default 8), in alternating order
  TABGPT_CACHE=$(mktemp -d) python3 bench/bench_train.py --preset browser --steps "$STEPS" --rounds "${ROUNDS:-8}" \
    2>&1 | tee -a "$OUT/train_pair.txt" | grep -E '^(\| [0-9]|tabgpt / PyTorch)'
fi
if [ "$WHAT" = torch ] || [ "$WHAT" = all ]; then
  # the step by kind of kernel, ours beside PyTorch eager fp32's (torch.profiler)
  TABGPT_CACHE=$(mktemp -d) python3 bench/profile_torch.py --preset browser 2>&1 | tee -a "$OUT/profile_torch.txt" \
    | grep -E '^\| [a-z]'
fi
if [ "$WHAT" = tunes ]; then
  T=/tmp/tunes; rm -rf $T; mkdir -p $T
  arms=()
  for i in $(seq "$DRAWS"); do
    arms+=(--arm "TABGPT_CACHE=$T/n$i" --arm "TABGPT_CACHE=$T/z$i,TABGPT_AUTOTUNE_DATA=zeros")
  done
  python3 bench/probe_ab.py --preset browser --steps 100 --rounds 4 "${arms[@]}" 2>&1 \
    | tee -a "$OUT/probe_tunes.txt" | grep -E '^[|] (TABGPT|[(]as set)|^the setting'
  python3 bench/tune_in_steps.py --preset browser --out $T/refined 2>&1 | tee -a "$OUT/tune_in_steps.txt" \
    | grep -E '^\| (nn|nt|tn):'
  python3 bench/probe_ab.py --preset browser --steps 100 --rounds 4 --arm TABGPT_CACHE=$T/n1 \
    --arm TABGPT_CACHE=$T/n2 --arm TABGPT_CACHE=$T/n3 --arm TABGPT_CACHE=$T/refined 2>&1 \
    | tee -a "$OUT/probe_refined.txt" | grep -E '^\| TABGPT'
  (cd $T && tar czf "$OUT/tunes.tgz" */matmul-tune.json)
fi
if [ "$WHAT" = variants ]; then
  # the autotuner's A/B switches, three fresh tunings each (about 6 minutes on an H100), then paired rounds against
  # PyTorch with a fresh tuning of the setting whose lowest draw was highest
  T=/tmp/variants; rm -rf $T; mkdir -p $T
  arms=()
  for i in $(seq "$DRAWS"); do
    arms+=(--arm "TABGPT_CACHE=$T/n$i")
    for s in $VARIANTS; do arms+=(--arm "TABGPT_CACHE=$T/$s$i,${setting[$s]}"); done
  done
  python3 bench/probe_ab.py --preset browser --steps 100 --rounds 3 "${arms[@]}" 2>&1 \
    | tee -a "$OUT/probe_variants.txt" | grep -E '^[|] (TABGPT|[(]as set)|^the setting'
  (cd $T && tar czf "$OUT/tunes.tgz" */matmul-tune.json)
  best=$(sed -n 's/^the setting with the highest lowest draw: //p' "$OUT/probe_variants.txt" | tr ',' ' ')
  [ "$best" = "(as set)" ] && best=
  mkdir -p $T/pair
  env $best TABGPT_CACHE=$T/pair python3 bench/bench_train.py --preset browser --steps 100 --rounds 6 2>&1 \
    | tee -a "$OUT/train_pair_variant.txt" | tail -3
fi
tar czf "$OUT/results.tgz" bench/results
true
