"""Speed of our fused causal attention (shaders/attention.wgsl) natively, beside PyTorch's fp32
scaled_dot_product_attention when PyTorch sees a CUDA GPU.

For each shape B x T x NH x hs, the forward (one dispatch) and the backward (delta, dq, dk/dv: three dispatches)
are each one dispatch sequence replayed `repeat` times per submission and waited for with dev.sync(); the best of
a few submissions gives the time per call. The forward's out and the backward's dqkv are checked against PyTorch
(on the GPU when there is one, else on the CPU in float64 for small shapes).

    python bench/bench_attention.py                          # GPT-2 small (8x1024, 12 heads of 64), browser preset
    python bench/bench_attention.py --quick --no-write       # tiny shapes: checks that it runs (lavapipe)
    python bench/bench_attention.py --tile 8,16 --tile 8,8,4 # tile shapes TC,NR[,RPT] for all three kernels
    python bench/bench_attention.py --tile 8,16,4/8,8,4/8,8,4    # forward/dq/dkv each its own
    python bench/bench_attention.py --pipeline both          # software-pipelined inner loops and plain ones
    python bench/bench_attention.py --prefetch both          # streamed tiles prefetched into registers or not

Results are printed as a table and appended to bench/results/attention.md with the date and the device.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "pkg"))

from tabgpt import gpu  # noqa: E402

from common import append_result, best_seconds, device_label, side_by_side_parser  # noqa: E402  (bench/common.py)
from tabgpt.gpu import wait  # noqa: E402
from tabgpt.ops.attention import ENTRIES, Attention, Tile  # noqa: E402

# B x T x NH x hs: GPT-2 small at batch 8, and the browser preset (batch 32, context 256, 6 heads of 64).
SIZES = ["8x1024x12x64", "32x256x6x64"]
QUICK_SIZES = ["2x64x2x32", "1x100x3x64"]
TARGET_SECONDS = 0.25
# --pipeline: the PIPELINE forms of the kernels' inner loops to time (software-pipelined True, plain False).
PIPELINES = {"on": [True], "off": [False], "both": [True, False]}
# --prefetch: the PREFETCH forms of the streamed tiles' loads to time (into registers one tile ahead True,
# between two barriers False). Kernels whose tiles cannot prefetch load directly either way.
PREFETCHES = PIPELINES


def parse_size(s: str) -> tuple[int, int, int, int]:
    B, T, NH, hs = (int(v) for v in s.lower().split("x"))
    return B, T, NH, hs


def parse_tile(s: str) -> dict:
    """"TC,NR[,RPT]" for all three kernels, or three of them joined by "/" for forward/dq/dkv."""
    tiles = [Tile(*(int(v) for v in part.split(","))) for part in s.split("/")]
    if len(tiles) not in (1, 3):
        raise argparse.ArgumentTypeError(f"one tile or three (forward/dq/dkv), got {s!r}")
    return dict(zip(ENTRIES, tiles * 3 if len(tiles) == 1 else tiles))


def inputs(B, T, NH, hs, seed=0):
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B, T, 3 * NH * hs), dtype=np.float32)
    dout = rng.standard_normal((B, T, NH * hs), dtype=np.float32)
    return qkv, dout


def time_ours(dev, B, T, NH, hs, tile, trials, pipeline=False, prefetch=True, dq_rows=None):
    """(forward s, backward s, out, dqkv, Attention)."""
    C = NH * hs
    qkv, dout = inputs(B, T, NH, hs)
    attn = wait(Attention.create(dev, B=B, T=T, C=C, n_head=NH, tiles=tile, pipeline=pipeline,
                                 prefetch=prefetch, dq_rows=dq_rows))
    b_qkv, b_dout = dev.buffer(qkv.nbytes, "qkv", qkv), dev.buffer(dout.nbytes, "dout", dout)
    b_out, b_lse = dev.buffer(4 * B * T * C, "out"), dev.buffer(4 * B * NH * T, "lse")
    b_dqkv = dev.buffer(qkv.nbytes, "dqkv")
    fwd, bwd = dev.sequence("bench-attention-forward"), dev.sequence("bench-attention-backward")
    attn.forward(fwd, out=b_out, lse=b_lse, qkv=b_qkv)
    attn.backward(bwd, dqkv=b_dqkv, dout=b_dout, qkv=b_qkv, out=b_out, lse=b_lse)
    wait(fwd.build())
    wait(bwd.build())
    sync = lambda: wait(dev.sync())  # noqa: E731
    t_fwd = best_seconds(fwd.run, sync, trials, TARGET_SECONDS)
    t_bwd = best_seconds(bwd.run, sync, trials, TARGET_SECONDS)
    read = lambda buf, shape: np.frombuffer(wait(dev.read(buf)), dtype=np.float32).reshape(shape)  # noqa: E731
    return t_fwd, t_bwd, read(b_out, (B, T, C)), read(b_dqkv, (B, T, 3 * C)), attn


def torch_attention(B, T, NH, hs, trials):
    """(forward s, backward s or None without CUDA, out, dqkv): PyTorch fp32 SDPA, causal, TF32 off."""
    import torch
    import torch.nn.functional as F
    cuda = torch.cuda.is_available()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    qkv, dout = inputs(B, T, NH, hs)
    dtype = torch.float32 if cuda else torch.float64
    x = torch.from_numpy(qkv).to("cuda" if cuda else "cpu", dtype).requires_grad_(True)
    g = torch.from_numpy(dout).to(x.device, dtype)

    def forward():
        q, k, v = (t.view(B, T, NH, hs).transpose(1, 2) for t in x.split(NH * hs, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(B, T, NH * hs)

    y = forward()
    (dx,) = torch.autograd.grad(y, x, g, retain_graph=True)   # the timed backwards below reuse the graph
    out, dqkv = y.detach().cpu().double().numpy(), dx.cpu().double().numpy()
    if not cuda:
        return None, None, out, dqkv

    def run_fwd(n):
        with torch.no_grad():
            for _ in range(n):
                forward()

    def run_bwd(n):
        for _ in range(n):
            torch.autograd.grad(y, x, g, retain_graph=True)

    sync = torch.cuda.synchronize
    return (best_seconds(run_fwd, sync, trials, TARGET_SECONDS), best_seconds(run_bwd, sync, trials, TARGET_SECONDS),
            out, dqkv)


def loads_label(attn) -> str:
    """How the kernels load their streamed tiles: "prefetch" (all three), "direct" (none), or the prefetching
    ones, e.g. "prefetch forward" where the others' tiles would need more than 4 registers a thread."""
    on = [e[len("attention_"):].replace("backward_", "") for e, p in attn.prefetch.items() if p]
    if len(on) == len(attn.prefetch):
        return "prefetch"
    return "prefetch " + ",".join(on) if on else "direct"


def rel_err(got, ref):
    return float(np.abs(got.astype(np.float64) - ref).max() / max(1.0, np.abs(ref).max()))


def main():
    global TARGET_SECONDS
    ap = side_by_side_parser(__doc__, "attention")          # --trials, --no-torch, --no-write, --quick
    ap.add_argument("--sizes", nargs="+", help="BxTxNHxhs, e.g. 8x1024x12x64")
    ap.add_argument("--tile", action="append", type=parse_tile,
                    help="TC,NR[,RPT] for all three kernels, or forward/dq/dkv joined by /; repeat to compare "
                         "several (default: per device)")
    ap.add_argument("--pipeline", choices=sorted(PIPELINES), default="off",
                    help="the kernels' inner loops software-pipelined (on), plain (off, the default), or both, "
                         "timed side by side")
    ap.add_argument("--no-pipeline", dest="pipeline", action="store_const", const="off",
                    help="same as --pipeline off")
    ap.add_argument("--prefetch", choices=sorted(PREFETCHES), default="on",
                    help="the streamed tiles read into registers one tile ahead (on, the default), loaded between "
                         "barriers (off), or both, timed side by side")
    ap.add_argument("--dq-rows", type=int, action="append", choices=[4, 8],
                    help="query rows per thread of the dq-from-dS kernel (repeat to compare; default: its own)")
    ap.add_argument("--seconds", type=float, default=TARGET_SECONDS, help="time per timed submission")
    args = ap.parse_args()
    sizes = [parse_size(s) for s in (args.sizes or (QUICK_SIZES if args.quick else SIZES))]
    trials = 1 if args.quick else args.trials
    TARGET_SECONDS = args.seconds

    dev = wait(gpu.open_device())
    device = device_label(dev)
    rows = []
    for B, T, NH, hs in sizes:
        ref = None if args.no_torch else torch_attention(B, T, NH, hs, trials)
        for tile in args.tile or [None]:
            for pipeline in PIPELINES[args.pipeline]:
                for prefetch, dq_rows in ((p, r) for p in PREFETCHES[args.prefetch] for r in args.dq_rows or [None]):
                    t_fwd, t_bwd, out, dqkv, attn = time_ours(dev, B, T, NH, hs, tile, trials, pipeline, prefetch,
                                                              dq_rows)
                    tiles = " ".join(f"{e[len('attention_'):].replace('backward_', '')} {t.TC},{t.NR},{t.RPT}"
                                     for e, t in attn.tiles.items())
                    loops = "pipelined" if pipeline else "plain"
                    loads = loads_label(attn)
                    dq = "products" if attn.backward_mode == "products" else attn.dq + (
                        f" ({attn.k['attention_backward_dq_ds'].constants['RQ']} rows)" if attn.dq == "ds" else "")
                    r = {"size": f"{B}x{T}x{NH}x{hs}", "tiles": tiles, "loops": loops, "loads": loads, "dq": dq,
                         "fwd": t_fwd, "bwd": t_bwd, "t_fwd": ref and ref[0], "t_bwd": ref and ref[1],
                         "err_out": ref and rel_err(out, ref[2]), "err_dqkv": ref and rel_err(dqkv, ref[3])}
                    rows.append(r)
                    print(f"{r['size']:>14} {tiles:>36} {loops:>9} {loads:>16} dq {dq:>9}  fwd {1e3 * t_fwd:8.3f} ms  "
                          f"bwd {1e3 * t_bwd:8.3f} ms", flush=True)

    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}x"  # noqa: E731
    backend = "" if dev.backend == "wgpu-native" else f" ({dev.backend})"     # device_label names wgpu-native
    lines = [f"## Causal attention f32, {datetime.date.today()}, {device}{backend}", "",
             f"`python bench/bench_attention.py {' '.join(sys.argv[1:])}`: best of {trials}; PyTorch "
             "scaled_dot_product_attention fp32 (is_causal, TF32 off); tiles: kernel TC,NR,RPT; loops: inner loops "
             "software-pipelined (PIPELINE) or plain; loads: streamed tiles prefetched into registers one tile "
             "ahead (PREFETCH; by the kernels named, where not all) or loaded directly; dq: from the dS that dkv "
             "stored, or recomputed (ops/attention.py dq_mode); products: the backward as batched products "
             "(backward_mode).", "",
             "| B x T x NH x hs | tiles | loops | loads | dq | fwd ms | bwd ms | PyTorch fwd ms | PyTorch bwd ms "
             "| fwd vs PyTorch | bwd vs PyTorch | max rel err out / dqkv |",
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        errs = "-" if r["err_out"] is None else f"{r['err_out']:.1e} / {r['err_dqkv']:.1e}"
        lines.append(f"| {r['size']} | {r['tiles']} | {r['loops']} | {r['loads']} | {r['dq']} | {1e3 * r['fwd']:.3f} "
                     f"| {1e3 * r['bwd']:.3f} "
                     f"| {fmt(r['t_fwd'] and 1e3 * r['t_fwd'], '.3f')} | {fmt(r['t_bwd'] and 1e3 * r['t_bwd'], '.3f')} "
                     f"| {ratio(r['fwd'], r['t_fwd'])} | {ratio(r['bwd'], r['t_bwd'])} | {errs} |")
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if not args.no_write:
        out = append_result("attention", text)
        print(f"appended to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
