"""Speed of our f32 matmul (shaders/matmul.wgsl) natively, beside cuBLAS fp32 when PyTorch sees a CUDA GPU.

For each size M x N x K: out (M, N) = A (M, K) @ B (K, N) (layout nn unless --layout says otherwise), one dispatch
sequence replayed `repeat` times per submission and waited for with dev.sync(); the best of a few submissions
gives the time per product and GFLOP/s = 2 M N K / time. A few rows of the result are checked against NumPy.
cuBLAS runs the same product through torch.matmul with TF32 off (true fp32), timed with CUDA events.

    python bench/bench_matmul.py                       # GPT-2 small shapes (B*T = 8192) and 4096^3
    python bench/bench_matmul.py --quick --no-write    # tiny sizes: checks that it runs (lavapipe)
    python bench/bench_matmul.py --sizes 4096x4096x4096 --tiles 128,128,8,8,8 --tiles 64,64,8,4,4
    python bench/bench_matmul.py --squares --preset browser --preset gpt2   # 1024^3..8192^3 and every product
        # of a training step of the two presets
    python bench/bench_matmul.py --all-layouts --tiles 128,128,16,8,8 --tiles 128,128,16,8,8,spread,prefetch
        # every product of a GPT-2 small training step (nn, nt, tn), two kernel variants side by side

Tiles are BM,BN,BK,TM,TN, optionally followed by the flags "spread" (a thread's row and column groups half a
block apart) and "prefetch" (the next K slice read into registers during the current one's products).
A size may carry its layout: nt:8192x768x2304.

Results are printed as a table and appended to bench/results/matmul.md with the date and the device.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "pkg"))

from tabgpt import gpu  # noqa: E402

from common import append_result, device_label, best_seconds  # noqa: E402  (bench/common.py)
from tabgpt.gpu import wait  # noqa: E402
from tabgpt.ops.matmul import TILE_FLAGS, Matmul, tiles_label  # noqa: E402

# GPT-2 small (C = 768) at B*T = 8192: c_attn, attn c_proj, c_fc, mlp c_proj; then a square product.
GPT2_SIZES = ["8192x2304x768", "8192x768x768", "8192x3072x768", "8192x768x3072", "4096x4096x4096"]
# The backward's products of the same layers: dinp (nt) and dweight (tn).
GPT2_SIZES_NT = ["nt:8192x768x2304", "nt:8192x768x768", "nt:8192x768x3072", "nt:8192x3072x768"]
GPT2_SIZES_TN = ["tn:768x2304x8192", "tn:768x768x8192", "tn:768x3072x8192", "tn:3072x768x8192"]
QUICK_SIZES = ["64x64x64", "111x216x72", "256x256x256"]
SQUARES = ["1024x1024x1024", "2048x2048x2048", "4096x4096x4096", "8192x8192x8192"]


def preset_sizes(name: str) -> list[str]:
    """Every product of a training step of preset `name` (B*T rows): the four Conv1D layers and the tied lm_head,
    forward (nn), input gradient (nt) and weight gradient (tn)."""
    from tabgpt.config import preset
    cfg = preset(name)
    n, C, Vp = cfg.batch_size * cfg.block_size, cfg.n_embd, cfg.padded_vocab_size
    sizes = []
    for k_in, k_out in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C), (C, Vp)):
        lm = k_out == Vp                     # lm_head: logits = x @ wte^T (nt), dx = dlogits @ wte (nn)
        sizes += [f"nt:{n}x{Vp}x{C}" if lm else f"nn:{n}x{k_out}x{k_in}",
                  f"nn:{n}x{C}x{Vp}" if lm else f"nt:{n}x{k_in}x{k_out}",
                  f"tn:{Vp}x{C}x{n}" if lm else f"tn:{k_in}x{k_out}x{n}"]
    return sizes
TARGET_SECONDS = 0.25   # time per timed submission (repeat is chosen to reach it)


def parse_size(s: str, layout: str) -> tuple[str, int, int, int]:
    """"MxNxK" or "layout:MxNxK" -> (layout, M, N, K)."""
    if ":" in s:
        layout, s = s.split(":")
    M, N, K = (int(v) for v in s.lower().split("x"))
    return layout, M, N, K


def parse_tiles(s: str) -> dict:
    """"BM,BN,BK,TM,TN[,flag...]" -> tiles, with the flags' labels of ops/matmul.py's TILE_FLAGS, as the tables
    print them: "spread", "prefetch" and "double" (DOUBLE_BUFFER, with prefetch: two copies of the workgroup
    tiles, one barrier per K slice instead of two), "rows" (ROWS: neighbouring threads stage neighbouring rows of
    k-running operands), "fence" (FENCE: the next row's tile reads after the row's first fma), "rowindex"
    (ROW_STEP off: the next row's tile indices made from the row number); "auto": the autotuner's choice."""
    if s == "auto":
        return "auto"
    parts = s.split(",")
    BM, BN, BK, TM, TN = (int(v) for v in parts[:5])
    t = {"BM": BM, "BN": BN, "BK": BK, "TM": TM, "TN": TN}
    flags = {label: (key, value) for key, (value, label) in TILE_FLAGS.items()}
    for flag in parts[5:]:
        if flag not in flags:
            raise argparse.ArgumentTypeError(f"unknown tile flag {flag!r} ({', '.join(flags)})")
        key, value = flags[flag]
        t[key] = value
    if t.get("DOUBLE_BUFFER") and not t.get("PREFETCH"):
        raise argparse.ArgumentTypeError(f"tile flag 'double' needs 'prefetch': {s!r}")
    return t


def tiles_name(mm: Matmul, asked) -> str:
    if mm.variant == "simple":
        return "simple"
    return ("auto: " if asked == "auto" else "") + tiles_label(mm.tiles)


def operands(M, N, K, layout, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((K, M) if layout == "tn" else (M, K), dtype=np.float32)
    b = rng.standard_normal((N, K) if layout == "nt" else (K, N), dtype=np.float32)
    return a, b


def time_ours(dev, M, N, K, layout, variant, tiles, splits, trials):
    """(seconds per product, max relative error of a few checked rows, Matmul)."""
    a, b = operands(M, N, K, layout)
    mm = wait(Matmul.create(dev, M, N, K, layout, variant=variant, tiles=tiles, splits=splits))
    ba, bb = dev.buffer(a.nbytes, "a", a), dev.buffer(b.nbytes, "b", b)
    out = dev.buffer(4 * M * N, "out")
    seq = dev.sequence("bench-matmul")
    mm.dispatch(seq, out=out, a=ba, b=bb)
    wait(seq.build())
    best = best_seconds(seq.run, lambda: wait(dev.sync()), trials, TARGET_SECONDS)
    # Check the first and last rows against float64 NumPy.
    rows = sorted(set(range(min(8, M))) | set(range(max(0, M - 8), M)))
    got = np.frombuffer(wait(dev.read(out)), dtype=np.float32).reshape(M, N)[rows]
    a64 = (a.T if layout == "tn" else a).astype(np.float64)[rows]
    b64 = (b.T if layout == "nt" else b).astype(np.float64)
    ref = a64 @ b64
    err = float(np.abs(got - ref).max() / max(1e-30, np.abs(ref).max()))
    return best, err, mm


def time_cublas(M, N, K, layout, trials):
    """Seconds per product through torch.matmul on CUDA with TF32 off, or None without a CUDA GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    a, b = operands(M, N, K, layout)
    ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
    fa = (lambda: ta.t()) if layout == "tn" else (lambda: ta)
    fb = (lambda: tb.t()) if layout == "nt" else (lambda: tb)
    out = torch.empty((M, N), device="cuda", dtype=torch.float32)
    torch.matmul(fa(), fb(), out=out)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.matmul(fa(), fb(), out=out)
    torch.cuda.synchronize()
    once = time.perf_counter() - t0
    repeat = max(1, min(1000, int(TARGET_SECONDS / max(once, 1e-6))))
    best = float("inf")
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            torch.matmul(fa(), fb(), out=out)
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / repeat)
    return best


def main():
    global TARGET_SECONDS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", help="MxNxK, e.g. 4096x4096x4096 (default: GPT-2 small shapes)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one trial: a smoke run for CPU adapters")
    ap.add_argument("--layout", default="nn", choices=["nn", "nt", "tn"], help="layout of sizes without one")
    ap.add_argument("--all-layouts", action="store_true", help="the GPT-2 sizes of all three layouts")
    ap.add_argument("--squares", action="store_true", help="square products 1024^3 to 8192^3")
    ap.add_argument("--preset", action="append", default=[],
                    help="every product of a training step of this preset (repeat for several)")
    ap.add_argument("--variant", default=None, choices=["tiled", "simple"])
    ap.add_argument("--tiles", action="append", type=parse_tiles,
                    help="BM,BN,BK,TM,TN[,spread,prefetch,double] for the tiled kernel, or auto (the autotuner's "
                         "choice); repeat to compare several (default: per adapter, autotuned on GPUs)")
    ap.add_argument("--splits", action="append", type=int,
                    help="slices of the reduction (split-K); repeat to compare several (default: per adapter)")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=TARGET_SECONDS, help="time per timed submission")
    ap.add_argument("--no-cublas", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="do not append to bench/results/matmul.md")
    args = ap.parse_args()
    default = QUICK_SIZES if args.quick else GPT2_SIZES
    if args.all_layouts:
        default = default + ([f"{lay}:{s}" for lay in ("nt", "tn") for s in QUICK_SIZES] if args.quick
                             else GPT2_SIZES_NT + GPT2_SIZES_TN)
    extra = (SQUARES if args.squares else []) + [x for p in args.preset for x in preset_sizes(p)]
    sizes = [parse_size(s, args.layout) for s in (args.sizes or ([] if extra and not args.all_layouts else default))
             + extra]
    trials = 1 if args.quick else args.trials
    TARGET_SECONDS = args.seconds

    dev = wait(gpu.open_device())
    device = device_label(dev)
    rows = []
    for layout, M, N, K in sizes:
        flop = 2.0 * M * N * K
        cublas = None if args.no_cublas else time_cublas(M, N, K, layout, trials)
        for tiles, splits in [(t, s) for t in args.tiles or [None] for s in args.splits or [None]]:
            sec, err, mm = time_ours(dev, M, N, K, layout, args.variant, tiles, splits, trials)
            rows.append({
                "layout": layout, "size": f"{M}x{N}x{K}", "kernel": tiles_name(mm, tiles), "splits": mm.splits,
                "ms": 1e3 * sec,
                "gflops": flop / sec / 1e9,
                "cublas_ms": None if cublas is None else 1e3 * cublas,
                "cublas_gflops": None if cublas is None else flop / cublas / 1e9, "err": err})
            r = rows[-1]
            print(f"{layout} {r['size']:>16} {r['kernel']:>18} x{r['splits']:<2} {r['gflops']:10.1f} GFLOP/s  "
                  f"err {err:.1e}",
                  flush=True)

    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    layouts = "/".join(dict.fromkeys(r["layout"].upper() for r in rows))
    lines = [f"## {layouts} f32 matmul, {datetime.date.today()}, {device} ({dev.backend})", "",
             f"`python bench/bench_matmul.py {' '.join(sys.argv[1:])}`: best of {trials}; "
             "cuBLAS through torch.matmul, TF32 off.", "",
             "| layout | M x N x K | tiles (BMxBNxBK / TMxTN) | split-K | ms | GFLOP/s | cuBLAS ms | cuBLAS GFLOP/s | "
             "of cuBLAS | max rel err |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        share = None if r["cublas_gflops"] is None else 100 * r["gflops"] / r["cublas_gflops"]
        pct = fmt(share, '.0f') + ('' if share is None else '%')
        lines.append(f"| {r['layout']} | {r['size']} | {r['kernel']} | {r['splits']} | {r['ms']:.3f} "
                     f"| {r['gflops']:.1f} | {fmt(r['cublas_ms'], '.3f')} | {fmt(r['cublas_gflops'], '.1f')} | {pct} "
                     f"| {r['err']:.1e} |")
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if not args.no_write:
        out = append_result("matmul", text)
        print(f"appended to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
