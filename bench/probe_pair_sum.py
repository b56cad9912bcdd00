"""A MatmulPair's two split-K sums in one dispatch (matmul_split_sum GROUPED) against one each, in turn.

The pairs of a browser-preset layer's backward (the MLP's weight gradients, tn 1536x384 and 384x1536, and the
attention's, 384x1152 and 384x384, K = 8192, each with its bias row), each autotuned as training tunes it; each
pair timed as it runs (the grouped product, then the grouped sum) and with the member sums apart (the grouped
product, then each member's matmul_split_sum), in rounds, each keeping its best round. Both give the same bits.

    python bench/probe_pair_sum.py
    python bench/probe_pair_sum.py --quick       # tiny shapes (lavapipe): checks that it runs
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

PAIRS = {"mlp": ((1536, 384), (384, 1536), 8192), "attention": ((384, 1152), (384, 384), 8192)}
QUICK_PAIRS = {"small": ((36, 20), (20, 52), 300)}
QUICK_FIXED = dict(tiles={"BM": 64, "BN": 64, "BK": 8, "TM": 8, "TN": 8}, splits=3)   # --quick: no autotune


def apart(seq, pair, outs, ops):
    """The pair with each member's sum in a dispatch of its own (the form before the grouped sum)."""
    (a1, b1), (a2, b2) = ops
    m1, m2 = pair.m1, pair.m2
    base2, size2 = pair.slabs[1]
    seq.dispatch(pair.kernel, pair.grid, mp=m1.chunks[0][2], mp2=pair.params2, a4=a1, b4=b1, a4_2=a2, b4_2=b2,
                 bias4=m1.no_bias, out4=pair.scratch.view(0, base2 + size2), aux4=m1.no_aux)
    for m, out, (base, size) in zip((m1, m2), outs, pair.slabs):
        seq.dispatch(m.k["sum"], m.chunks[0][4], mp=m.chunks[0][2], split4=pair.scratch.view(base, size), out4=out,
                     bias4=m.no_bias, aux4=m.no_aux)


def main():
    args = probe_args(probe_parser(__doc__, rounds=5))
    pairs = QUICK_PAIRS if args.quick else PAIRS
    dev = wait(gpu.open_device())
    rng = np.random.default_rng(0)
    arms = {}
    for name, (s1, s2, K) in pairs.items():
        fixed = QUICK_FIXED if args.quick else {}
        pair = wait(MatmulPair.create(dev, s1, s2, K, accumulate=True, bias_row=True, **fixed))   # else autotuned
        ops = [tuple(dev.buffer(4 * K * d, "x", rng.standard_normal(K * d, dtype=np.float32)) for d in s) for s in
               (s1, s2)]
        got = {}
        for form in ("grouped", "apart"):
            outs = [dev.buffer(4 * (m + 1) * n, "out", np.zeros((m + 1) * n, np.float32)) for m, n in (s1, s2)]
            seq = dev.sequence(form)
            if form == "grouped":
                pair.dispatch(seq, out1=outs[0], a1=ops[0][0], b1=ops[0][1], out2=outs[1], a2=ops[1][0], b2=ops[1][1])
            else:
                apart(seq, pair, outs, ops)
            wait(seq.build())
            seq.run()
            wait(dev.sync())
            got[form] = [np.frombuffer(wait(dev.read(o)), np.float32).copy() for o in outs]
            arms[name, form] = (seq, pair, [])
        same = all(np.array_equal(x, y) for x, y in zip(got["grouped"], got["apart"]))
        arms[name, "same"] = same
    time_in_turn(dev, ((arm[0], arm[2]) for key, arm in arms.items() if key[1] != "same"), args)
    print(f"## A MatmulPair's sums in one dispatch or two, {device_label(dev)}, best of {args.rounds} rounds\n")
    print("| pair | tiles, split-K | grouped sum ms | sums apart ms | grouped / apart | same bits |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for name in pairs:
        (_, pair, tg), (_, _, ta) = arms[name, "grouped"], arms[name, "apart"]
        print(f"| {name} | {tiles_label(pair.tiles)}, {pair.splits} | {min(tg) * 1e3:.4f} | {min(ta) * 1e3:.4f} | "
              f"{min(tg) / min(ta):.3f} | {'yes' if arms[name, 'same'] else 'NO'} |")


if __name__ == "__main__":
    main()
