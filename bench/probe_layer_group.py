"""A layer's four weight gradients as one MatmulGroup, as two MatmulPairs, or as four products apart, in turn.

The weight gradients of a transformer layer of the preset (mlp c_proj's (4C, C), c_fc's (C, 4C), c_attn's (C, 3C)
and attn c_proj's (C, C), each with its bias row, K = B * T rows), each form autotuned as training tunes it, timed
in rounds (each keeping its best round), and each form's outputs against the pairs' (different tiles and slices
add in other orders: not the same bits, within float32 rounding).

    python bench/probe_layer_group.py                   # the browser preset's layer
    python bench/probe_layer_group.py --preset gpt2
    python bench/probe_layer_group.py --quick           # tiny shapes (lavapipe): checks that it runs
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "pkg"))

from tabgpt import gpu  # noqa: E402
from tabgpt.config import preset  # noqa: E402
from tabgpt.gpu import wait  # noqa: E402
from tabgpt.ops.matmul import Matmul, MatmulGroup, MatmulPair, tiles_label  # noqa: E402

from common import best_seconds, device_label, probe_args, probe_parser  # noqa: E402  (bench/)

QUICK = dict(C=16, K=200, tiles={"BM": 64, "BN": 64, "BK": 8, "TM": 8, "TN": 8}, splits=3)


def main():
    ap = probe_parser(__doc__, rounds=5)
    ap.add_argument("--preset", default="browser")
    args = probe_args(ap)
    if args.quick:
        C, K, fixed = QUICK["C"], QUICK["K"], dict(tiles=QUICK["tiles"], splits=QUICK["splits"])
    else:
        cfg = preset(args.preset)
        C, K, fixed = cfg.n_embd, cfg.batch_size * cfg.block_size, {}
    shapes = [(4 * C, C), (C, 4 * C), (C, 3 * C), (C, C)]
    dev = wait(gpu.open_device())                    # the adapter's limits: a group of four binds 9 storage buffers
    rng = np.random.default_rng(0)
    # every A inside one buffer and every B inside another, as the model lays them out (the pairs and the products
    # apart read the same views)
    a_buf, a_views = MatmulGroup.arena(dev, [K * m for m, _ in shapes], "a-all")
    b_buf, b_views = MatmulGroup.arena(dev, [K * n for _, n in shapes], "b-all")
    for buf in (a_buf, b_buf):
        dev.write(buf, rng.standard_normal(buf.size // 4, dtype=np.float32))
    ops = list(zip(a_views, b_views))
    group = wait(MatmulGroup.create(dev, shapes, K, bias_row=True, **fixed))
    pairs = [wait(MatmulPair.create(dev, shapes[i], shapes[i + 1], K, bias_row=True, **fixed)) for i in (0, 2)]
    apart = [wait(Matmul.create(dev, m, n, K, "tn", accumulate=True, bias_row=True, **fixed)) for m, n in shapes]
    forms = {
        "group of four": (f"{tiles_label(group.tiles)}, {group.splits}",
                          lambda seq, outs: group.dispatch(seq, [(o, a, b) for o, (a, b) in zip(outs, ops)])),
        "two pairs": ("; ".join(f"{tiles_label(p.tiles)}, {p.splits}" for p in pairs),
                      lambda seq, outs: [p.dispatch(seq, out1=outs[i], a1=ops[i][0], b1=ops[i][1], out2=outs[i + 1],
                                                    a2=ops[i + 1][0], b2=ops[i + 1][1]) for p, i in zip(pairs, (0, 2))]),
        "four apart": ("; ".join(f"{tiles_label(m.tiles)}, {m.splits}" for m in apart),
                       lambda seq, outs: [m.dispatch(seq, out=o, a=a, b=b) for m, o, (a, b) in zip(apart, outs, ops)]),
    }
    arms, got = {}, {}
    for name, (label, append) in forms.items():
        outs = [dev.buffer(4 * (m + 1) * n, "out", np.zeros((m + 1) * n, np.float32)) for m, n in shapes]
        seq = dev.sequence(name)
        append(seq, outs)
        wait(seq.build())
        seq.run()
        wait(dev.sync())
        got[name] = [np.frombuffer(wait(dev.read(o)), np.float32).copy() for o in outs]
        arms[name] = (seq, label, [])
    for _ in range(args.rounds):
        for seq, _, times in arms.values():
            times.append(best_seconds(seq.run, lambda: wait(dev.sync()), 3, args.seconds))
    base = min(arms["two pairs"][2])
    print(f"## A layer's four weight gradients (C = {C}, K = {K}), {device_label(dev)}, best of {args.rounds} rounds\n")
    print("| form | tiles, split-K | ms | / two pairs | max rel diff from the pairs |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, (_, label, times) in arms.items():
        diff = max(float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30))
                   for x, y in zip(got[name], got["two pairs"]))
        print(f"| {name} | {label} | {min(times) * 1e3:.4f} | {min(times) / base:.3f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
