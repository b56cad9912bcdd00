"""Fixed forms of the tiled matmul side by side: every product of a list with each tile form, in turn, in rounds.

bench_matmul.py times each product's forms one after the other; a probe of small differences (a few percent) needs
the forms interleaved, so that a drift of the GPU's clocks spreads over all of them: each round times every product
with every form once (best of a few submissions), and each keeps its best round. Every form's output is compared
with the first form's, to the bit ("same"; a form that changes the summation order, such as another BK with
split-K, shows "DIFF" and is checked against NumPy on a few rows instead).

    python bench/probe_tiles.py --tiles 128,128,8,8,8,spread,prefetch,double \\
        --tiles 128,256,8,8,16,spread,prefetch,double                # the browser preset's products and squares
    python bench/probe_tiles.py --quick --tiles 64,64,8,8,8 --tiles 64,64,8,4,4    # tiny sizes (lavapipe)

Tiles are bench_matmul.py's: BM,BN,BK,TM,TN[,flag...]. Sizes are layout:MxNxK:splits (splits: split-K slices).
The table goes to standard output (bench/results/h200/run55_wide_tiles.txt is one; run50_warp_probe.txt was made by
this probe with forms of a kernel constant that was not kept).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "pkg"))

from tabgpt import gpu  # noqa: E402
from tabgpt.gpu import wait  # noqa: E402
from tabgpt.ops.matmul import Matmul, tiles_label  # noqa: E402

from bench_matmul import operands, parse_tiles  # noqa: E402  (bench/)
from common import device_label, probe_args, probe_parser, time_in_turn  # noqa: E402

# Squares of each layout, then every product of a browser-preset step (forward nn, input gradient nt, weight
# gradient tn; the lm_head's three last), with split-K counts the autotuner picks for them on an H200.
SIZES = ["nn:4096x4096x4096:1", "nt:4096x4096x4096:1", "tn:4096x4096x4096:1",
         "nn:8192x1152x384:1", "nt:8192x384x1152:4", "tn:384x1152x8192:16",
         "nn:8192x384x384:1", "nt:8192x384x384:1", "tn:384x384x8192:16",
         "nn:8192x1536x384:1", "nt:8192x384x1536:1", "tn:384x1536x8192:16",
         "nn:8192x384x1536:4", "nt:8192x1536x384:1", "tn:1536x384x8192:11",
         "nt:8192x4096x384:1", "nn:8192x384x4096:4", "tn:4096x384x8192:11"]
QUICK_SIZES = ["nn:256x256x128:1", "tn:128x256x512:2"]


def parse_size(s: str) -> tuple[str, int, int, int, int]:
    """"layout:MxNxK:splits" -> (layout, M, N, K, splits)."""
    try:
        layout, dims, splits = s.split(":")
        M, N, K = (int(v) for v in dims.lower().split("x"))
        if layout not in ("nn", "nt", "tn"):
            raise ValueError(layout)
        return layout, M, N, K, int(splits)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is layout:MxNxK:splits, e.g. nt:8192x384x1152:4; got {s!r}")


def main():
    ap = probe_parser(__doc__)
    ap.add_argument("--tiles", action="append", required=True, type=parse_tiles,
                    help="BM,BN,BK,TM,TN[,flag...] (bench_matmul.py's); repeat: the first is the reference")
    ap.add_argument("--sizes", nargs="+", type=parse_size, help="layout:MxNxK:splits (default: squares and the "
                                                                 "browser preset's products)")
    args = probe_args(ap)
    if "auto" in args.tiles:
        ap.error("fixed tiles only: the autotuner's choice differs from product to product")
    sizes = args.sizes or [parse_size(s) for s in (QUICK_SIZES if args.quick else SIZES)]
    dev = wait(gpu.open_device())
    runs = {}       # (size index, form index) -> [sequence, best seconds per round, "same" / "DIFF" / error]
    for i, (layout, M, N, K, splits) in enumerate(sizes):
        a, b = operands(M, N, K, layout)
        ba, bb = dev.buffer(a.nbytes, "a", a), dev.buffer(b.nbytes, "b", b)
        out = dev.buffer(4 * M * N, "out")
        rows = sorted({0, M // 2, M - 1})
        ref = (a.T if layout == "tn" else a)[rows].astype(np.float64) @ (b.T if layout == "nt" else b)
        first = None
        for j, tiles in enumerate(args.tiles):
            mm = wait(Matmul.create(dev, M, N, K, layout, tiles=dict(tiles), splits=splits))
            seq = dev.sequence("probe")
            mm.dispatch(seq, out=out, a=ba, b=bb)
            wait(seq.build())
            seq.run()
            wait(dev.sync())
            got = np.frombuffer(wait(dev.read(out)), dtype=np.float32).reshape(M, N)
            err = float(np.abs(got[rows] - ref).max() / max(1e-30, np.abs(ref).max()))
            if first is None:
                first = got.copy()
            same = "same" if np.array_equal(got, first) else f"DIFF (err {err:.1e})"
            runs[i, j] = [seq, [], same if err < 1e-4 else f"WRONG (err {err:.1e})"]
    time_in_turn(dev, ((run[0], run[1]) for run in runs.values()), args)
    labels = [tiles_label(t) for t in args.tiles]
    print(f"## Tile forms in turn, {device_label(dev)}, best of {args.rounds} rounds\n")
    print("ms per product (TFLOP/s, time against the first form), and the output against the first form's:\n")
    print("| layout | M x N x K | split-K | " + " | ".join(labels) + " |")
    print("| --- | --- | ---: | " + " | ".join("---" for _ in labels) + " |")
    for i, (layout, M, N, K, splits) in enumerate(sizes):
        best = [min(runs[i, j][1]) for j in range(len(labels))]
        cells = [f"{t * 1e3:.4f} ({2.0 * M * N * K / t / 1e12:.1f}, {t / best[0]:.3f}x) {runs[i, j][2]}"
                 for j, t in enumerate(best)]
        print(f"| {layout} | {M}x{N}x{K} | {splits} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
