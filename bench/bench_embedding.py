"""The embedding backward (shaders/embedding.wgsl) with the sort's blocks of 1024 keys against the device's own
block size (ops/embedding.sort_shape), side by side with PyTorch's embedding backward.

The whole backward of one step is timed: the position rows' sums, the sort of the B*T keys and the token rows'
sums, at the presets' shapes, on uniformly random tokens and on a Zipf-like stream (a few tokens very frequent, as
in text: long runs). The arms are timed in turn for --trials rounds, each keeping its best (bench/common.py
best_seconds), and their gradients are compared bit for bit. PyTorch (CUDA, fp32): the gradients of
F.embedding(idx, wte) + F.embedding(t, wpe) with respect to wte and wpe through autograd (nn.Embedding's backward).

    python bench/bench_embedding.py [--trials 5] [--no-torch] [--no-write] [--quick] [--block KEYS] [--threads N]
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "pkg"))
sys.path.insert(0, str(ROOT / "bench"))

from common import append_result, best_seconds, device_label, side_by_side_parser  # noqa: E402

from tabgpt import gpu  # noqa: E402
from tabgpt.gpu import wait  # noqa: E402
from tabgpt.ops.embedding import BLOCK, SORT_WG, Embedding, sort_shape  # noqa: E402

# (label, B, T, C, Vp)
SHAPES = [("browser", 32, 256, 384, 4096), ("gpt2", 8, 1024, 768, 50304)]
QUICK = [("quick", 4, 300, 64, 512)]
TARGET_SECONDS = 0.1


def tokens(kind: str, n: int, V: int) -> np.ndarray:
    r = np.random.default_rng(0)
    if kind == "uniform":
        return r.integers(0, V, n).astype(np.uint32)
    ranks = r.zipf(1.2, n) - 1                          # rank 0 most frequent, as in text
    while (far := ranks >= V).any():                    # redrawn past the vocabulary (not piled on its last rank)
        ranks[far] = r.zipf(1.2, int(far.sum())) - 1
    return r.permutation(V)[ranks].astype(np.uint32)


def build(dev, B, T, C, Vp, idx, dout, block, threads):
    """(sequence, dwte, dwpe, embedding) of one backward with the sort's blocks given (None: sort_shape's)."""
    emb = wait(Embedding.create(dev, B, T, C, Vp, block=block, threads=threads))
    dwte, dwpe = dev.buffer(4 * Vp * C, "dwte"), dev.buffer(4 * T * C, "dwpe")
    seq = dev.sequence("embedding-backward")
    emb.backward(seq, dwte=dwte, dwpe=dwpe, dout=dev.buffer(dout.nbytes, "dout", dout),
                 idx=dev.buffer(idx.nbytes, "idx", idx))
    wait(seq.build())
    return seq, dwte, dwpe, emb


def time_torch(B, T, C, Vp, idx, trials):
    import torch
    import torch.nn.functional as F
    if not torch.cuda.is_available():
        return None
    wte = torch.randn(Vp, C, device="cuda", requires_grad=True)
    wpe = torch.randn(T, C, device="cuda", requires_grad=True)
    ix = torch.from_numpy(idx.astype(np.int64)).cuda().view(B, T)
    x = F.embedding(ix, wte) + F.embedding(torch.arange(T, device="cuda"), wpe)   # as nn.Embedding
    g = torch.randn(B, T, C, device="cuda")

    def bwd(n):
        for _ in range(n):
            torch.autograd.grad(x, (wte, wpe), g, retain_graph=True)
    return best_seconds(bwd, torch.cuda.synchronize, trials, TARGET_SECONDS)


def main():
    ap = side_by_side_parser(__doc__, "embedding")
    ap.add_argument("--block", type=int, default=None, help="the second arm's keys per block (default: the device's)")
    ap.add_argument("--threads", type=int, default=None, help="the second arm's threads per block (likewise)")
    args = ap.parse_args()
    dev = wait(gpu.open_device())
    sync = lambda: wait(dev.sync())  # noqa: E731
    rows = []
    for label, B, T, C, Vp in (QUICK if args.quick else SHAPES):
        N = B * T
        own = sort_shape(dev, N, args.block, args.threads)
        for kind in ("uniform", "zipf"):
            idx = tokens(kind, N, Vp)
            dout = np.random.default_rng(1).standard_normal((N, C), dtype=np.float32)
            arms = [build(dev, B, T, C, Vp, idx, dout, BLOCK, SORT_WG), build(dev, B, T, C, Vp, idx, dout, *own)]
            best = [float("inf")] * len(arms)
            for _ in range(args.trials):
                for i, (seq, *_rest) in enumerate(arms):
                    best[i] = min(best[i], best_seconds(seq.run, sync, 1, TARGET_SECONDS))
            grads = []          # the backward adds to the gradients: once more from zero, to compare
            for seq, dwte, dwpe, _ in arms:
                dev.write(dwte, bytes(dwte.size))
                dev.write(dwpe, bytes(dwpe.size))
                seq.run()
                grads.append((wait(dev.read(dwte)), wait(dev.read(dwpe))))
            same = "same bits" if grads[0] == grads[1] else "DIFFERENT"
            ref = None if args.no_torch else time_torch(B, T, C, Vp, idx, args.trials)
            dispatches = [len(a[0]) for a in arms]
            rows.append((label, N, C, Vp, kind, own, dispatches, best, ref, same))
    lines = ["| shape | B*T x C (Vp) | tokens | dispatches, 1024-key blocks / own | own blocks (keys, threads) "
             "| 1024-key blocks ms | own blocks ms | speed-up | PyTorch ms | PyTorch / own | gradients |",
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for label, N, C, Vp, kind, own, disp, best, ref, same in rows:
        torch_ms = f"{ref * 1e3:.3f}" if ref else "-"
        ratio = f"{ref / best[1]:.2f}x" if ref else "-"
        lines.append(f"| {label} | {N} x {C} ({Vp}) | {kind} | {disp[0]} / {disp[1]} | {own[0]}, {own[1]} "
                     f"| {best[0] * 1e3:.3f} | {best[1] * 1e3:.3f} | {best[0] / best[1]:.2f}x | {torch_ms} | {ratio} "
                     f"| {same} |")
    head = (f"## Embedding backward, {datetime.date.today()}, {device_label(dev)}\n\n"
            f"Command: `python bench/bench_embedding.py {' '.join(sys.argv[1:])}`; best of {args.trials} rounds, arms "
            f"in turn\n")
    text = head + "\n" + "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        print(f"appended to {append_result('embedding', text)}")


if __name__ == "__main__":
    main()
