# Run on the GPU machine after `source bench/h100_env.sh` (bench/results/h100/ab_unclamped.txt holds the output).
# A/B: matmul.wgsl with index clamps ("clamped", UNCLAMPED_FILES emptied) and without (the new default)
for mode in clamped unclamped; do
  for args in \
      "bench/bench_matmul.py --no-write --trials 3 --sizes 4096x4096x4096 nt:8192x768x3072 tn:768x3072x8192 \
--tiles 128,128,8,8,8,spread,prefetch,double" \
      "bench/bench_train.py --preset browser --steps 30 --no-torch" \
      "bench/bench_train.py --preset gpt2 --steps 6 --no-torch"; do
    echo "== $mode: $args"
    python3 -c "
import sys, runpy
sys.path.insert(0, 'pkg'); sys.path.insert(0, 'bench')
import tabgpt.gpu as g
if '$mode' == 'clamped':
    g.UNCLAMPED_FILES = set()
argv = '''$args'''.split()
sys.argv = argv
runpy.run_path(argv[0], run_name='__main__')
" 2>&1 | grep "^| [nt][nt] \|tabgpt (WGSL"
  done
done
