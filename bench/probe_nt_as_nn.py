"""Each input-gradient (nt) product of a browser-preset step against the nn product of the same M, N, K: what
making them nn with B transposed beforehand (a transpose of the weight a step) would gain, before any transpose.

Both forms autotuned (each with the epilogue it would carry in training), then timed in turn, in rounds, each
keeping its best round. The table goes to standard output (bench/results/h200/run49_nt_nn_probe.txt is one).

    python bench/probe_nt_as_nn.py
    python bench/probe_nt_as_nn.py --quick     # tiny sizes (lavapipe): checks that it runs
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "pkg"))

from tabgpt import gpu  # noqa: E402
from tabgpt.gpu import wait  # noqa: E402
from tabgpt.ops.matmul import Matmul, tiles_label  # noqa: E402

from bench_matmul import operands  # noqa: E402  (bench/)
from common import device_label, probe_args, probe_parser, time_in_turn  # noqa: E402

# (M, N, K, epilogue): mlp c_proj's input gradient (times gelu'), c_attn's, attn c_proj's, c_fc's; the lm_head's
# logits; then two products the forward makes as nn anyway, for scale.
SHAPES = [(8192, 1536, 384, "gelu_grad"), (8192, 384, 1152, None), (8192, 384, 384, None), (8192, 384, 1536, None),
          (8192, 4096, 384, None), (8192, 1536, 384, None), (8192, 1152, 384, None)]
QUICK_SHAPES = [(256, 128, 64, "gelu_grad"), (256, 64, 128, None)]


def main():
    args = probe_args(probe_parser(__doc__, rounds=3, seconds=0.1))
    shapes = QUICK_SHAPES if args.quick else SHAPES
    dev = wait(gpu.open_device())
    rng = np.random.default_rng(0)
    arms = {}
    for M, N, K, ep in shapes:
        for layout in ("nt", "nn"):
            a, b = operands(M, N, K, layout)
            mm = wait(Matmul.create(dev, M, N, K, layout, tiles="auto", epilogue=ep))
            kw = {}
            if ep:
                aux = rng.standard_normal((M, N), dtype=np.float32)
                kw["aux"] = dev.buffer(aux.nbytes, "aux", aux)
            seq = dev.sequence("probe")
            mm.dispatch(seq, out=dev.buffer(4 * M * N, "out"), a=dev.buffer(a.nbytes, "a", a),
                        b=dev.buffer(b.nbytes, "b", b), **kw)
            wait(seq.build())
            arms[M, N, K, ep, layout] = (seq, mm, [])
    time_in_turn(dev, ((seq, times) for seq, _, times in arms.values()), args)
    print(f"## nt products against nn of the same shape, {device_label(dev)}, autotuned, "
          f"best of {args.rounds} rounds\n")
    print("| M x N x K | epilogue | nt ms | nt tiles | nn ms | nn tiles | nn / nt |")
    print("| --- | --- | ---: | --- | ---: | --- | ---: |")
    for M, N, K, ep in shapes:
        (_, nt, t_nt), (_, nn, t_nn) = arms[M, N, K, ep, "nt"], arms[M, N, K, ep, "nn"]
        print(f"| {M}x{N}x{K} | {ep or '-'} | {min(t_nt) * 1e3:.4f} | {tiles_label(nt.tiles)} x{nt.splits} | "
              f"{min(t_nn) * 1e3:.4f} | {tiles_label(nn.tiles)} x{nn.splits} | {min(t_nn) / min(t_nt):.3f} |")


if __name__ == "__main__":
    main()
