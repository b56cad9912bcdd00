"""What the bias rows cost: a browser-preset layer's weight-gradient pairs with and without them, in turn.

Each MatmulPair (the MLP's, tn 1536x384 and 384x1536, and attention's, 384x1152 and 384x384, K = 8192) made as
training makes it, with each bias gradient as its product's last row (bias_row), and again without (the products
alone; the bias gradients would then need passes of their own), each autotuned, timed in rounds, each keeping its
best round.

    python bench/probe_bias_rows.py
    python bench/probe_bias_rows.py --quick       # tiny shapes (lavapipe): checks that it runs
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "pkg"))

from tabgpt import gpu  # noqa: E402
from tabgpt.gpu import wait  # noqa: E402
from tabgpt.ops.matmul import MatmulPair, tiles_label  # noqa: E402

from common import device_label, probe_args, probe_parser, time_in_turn  # noqa: E402  (bench/)
from probe_pair_sum import PAIRS, QUICK_FIXED, QUICK_PAIRS  # noqa: E402  (the same pairs)


def main():
    args = probe_args(probe_parser(__doc__, rounds=5))
    pairs = QUICK_PAIRS if args.quick else PAIRS
    fixed = QUICK_FIXED if args.quick else {}
    dev = wait(gpu.open_device())
    rng = np.random.default_rng(0)
    arms = {}
    for name, (s1, s2, K) in pairs.items():
        for bias_row in (True, False):
            pair = wait(MatmulPair.create(dev, s1, s2, K, bias_row=bias_row, **fixed))    # else autotuned
            ops = [(dev.buffer(4 * (m + 1) * n, "out"),
                    dev.buffer(4 * K * m, "a", rng.standard_normal(K * m, np.float32)),
                    dev.buffer(4 * K * n, "b", rng.standard_normal(K * n, np.float32))) for m, n in (s1, s2)]
            seq = dev.sequence(name)
            pair.dispatch(seq, out1=ops[0][0], a1=ops[0][1], b1=ops[0][2], out2=ops[1][0], a2=ops[1][1], b2=ops[1][2])
            wait(seq.build())
            arms[name, bias_row] = (seq, f"{tiles_label(pair.tiles)}, {pair.splits}", [])
    time_in_turn(dev, ((seq, times) for seq, _, times in arms.values()), args)
    print(f"## A layer's weight-gradient pairs with and without bias rows, {device_label(dev)}, "
          f"best of {args.rounds} rounds\n")
    print("| pair | bias rows | tiles, split-K | ms | with / without |")
    print("| --- | --- | --- | ---: | ---: |")
    for (name, bias_row), (_, label, times) in arms.items():
        ratio = min(times) / min(arms[name, False][2])
        print(f"| {name} | {'yes' if bias_row else 'no'} | {label} | {min(times) * 1e3:.4f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
