"""Row reductions with and without subgroup operations, side by side with PyTorch.

LayerNorm forward, LayerNorm backward (its two dispatches) and the fused softmax + cross-entropy forward/backward,
each with the subgroup kernels (layernorm_subgroups.wgsl, crossentropy_subgroups.wgsl) and with the
workgroup-memory trees, at the presets' shapes (B*T rows of n_embd channels, padded vocabulary) and a larger N.
Each is one dispatch sequence replayed `repeat` times per submission (bench/common.py best_seconds), the two arms
timed in turn for --trials rounds, each keeping its best. PyTorch
(CUDA where present, fp32): F.layer_norm forward, its backward through autograd, and F.cross_entropy forward +
backward on the same shapes. GB/s counts the bytes a kernel must move at least (the (N, C) or (N, Vp) tensors read
and written once).

    python bench/bench_reductions.py [--trials 5] [--no-torch] [--no-write] [--quick]
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
from tabgpt.ops.crossentropy import CrossEntropy  # noqa: E402
from tabgpt.ops.layernorm import LayerNorm  # noqa: E402

# (label, N rows, C channels, V vocabulary, Vp padded)
SHAPES = [("browser", 32 * 256, 384, 4096, 4096), ("gpt2", 8 * 1024, 768, 50257, 50304),
          ("browser x8 rows", 8 * 32 * 256, 384, 4096, 4096)]
TARGET_SECONDS = 0.1


def build_ours(dev, N, C, V, Vp, subgroups):
    """{op: built sequence} for the three ops with subgroups on or off."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C), dtype=np.float32)
    w, b = rng.standard_normal((2, C), dtype=np.float32)
    logits = rng.standard_normal((N, Vp), dtype=np.float32)
    targets = rng.integers(0, V, N).astype(np.uint32)
    ln = wait(LayerNorm.create(dev, N, C, subgroups=subgroups))
    ce = wait(CrossEntropy.create(dev, N, V, Vp, subgroups=subgroups))
    buf = lambda a, label: dev.buffer(a.nbytes, label, a)  # noqa: E731
    bx, bw, bb, bd = buf(x, "x"), buf(w, "w"), buf(b, "b"), buf(x, "dout")
    out, mean, rstd = dev.buffer(x.nbytes, "out"), dev.buffer(4 * N, "mean"), dev.buffer(4 * N, "rstd")
    dinp, dw, db = dev.buffer(x.nbytes, "dinp"), dev.buffer(4 * C, "dw"), dev.buffer(4 * C, "db")
    blog, bt, losses = buf(logits, "logits"), buf(targets, "targets"), dev.buffer(4 * N, "losses")
    seqs = {"layernorm forward": dev.sequence("ln-fwd"), "layernorm backward": dev.sequence("ln-bwd"),
            "cross-entropy fwd+bwd": dev.sequence("ce")}
    ln.forward(seqs["layernorm forward"], out=out, mean=mean, rstd=rstd, inp=bx, weight=bw, bias=bb)
    ln.backward(seqs["layernorm backward"], dinp=dinp, dweight=dw, dbias=db, dout=bd, inp=bx, weight=bw, mean=mean,
                rstd=rstd)
    # The logits become their gradient in place; replays then work on small finite values: the same work.
    ce.forward_backward(seqs["cross-entropy fwd+bwd"], losses=losses, logits=blog, targets=bt)
    for seq in seqs.values():
        wait(seq.build())
    return seqs


def time_ours(dev, N, C, V, Vp, trials):
    """({op: seconds} with the trees, the same with subgroups): the two arms in turn, `trials` rounds, each
    arm's best (a GPU's clocks drift over seconds: arms timed one after the other would carry the drift)."""
    arms = [build_ours(dev, N, C, V, Vp, sg) for sg in (False, True)]
    sync = lambda: wait(dev.sync())  # noqa: E731
    best = [{op: float("inf") for op in arms[0]} for _ in arms]
    for _ in range(trials):
        for arm, res in zip(arms, best):
            for op, seq in arm.items():
                res[op] = min(res[op], best_seconds(seq.run, sync, 1, TARGET_SECONDS))
    return best


def time_torch(N, C, V, Vp, trials):
    """{op: seconds} for PyTorch's layer_norm forward / backward and cross_entropy forward + backward, or None."""
    import torch
    import torch.nn.functional as F
    if not torch.cuda.is_available():
        return None
    dev = "cuda"
    x = torch.randn(N, C, device=dev, requires_grad=True)
    w = torch.randn(C, device=dev, requires_grad=True)
    b = torch.randn(C, device=dev, requires_grad=True)
    g = torch.randn(N, C, device=dev)
    y = F.layer_norm(x, (C,), w, b)
    logits = torch.randn(N, V, device=dev, requires_grad=True)
    targets = torch.randint(0, V, (N,), device=dev)

    def fwd(n):
        with torch.no_grad():
            for _ in range(n):
                F.layer_norm(x, (C,), w, b)

    def bwd(n):
        for _ in range(n):
            torch.autograd.grad(y, (x, w, b), g, retain_graph=True)

    def ce(n):
        for _ in range(n):
            loss = F.cross_entropy(logits, targets)
            torch.autograd.grad(loss, logits)

    sync = torch.cuda.synchronize
    return {"layernorm forward": best_seconds(fwd, sync, trials, TARGET_SECONDS),
            "layernorm backward": best_seconds(bwd, sync, trials, TARGET_SECONDS),
            "cross-entropy fwd+bwd": best_seconds(ce, sync, trials, TARGET_SECONDS)}


def min_bytes(op, N, C, Vp):
    if op == "layernorm forward":
        return 2 * 4 * N * C            # read x, write out
    if op == "layernorm backward":
        return 4 * 4 * N * C            # read x, dout, dinp; write dinp
    return 2 * 4 * N * Vp               # read the logits, write their gradient


def main():
    args = side_by_side_parser(__doc__, "reductions").parse_args()
    shapes = [("quick", 64, 384, 1001, 1024)] if args.quick else SHAPES
    dev = wait(gpu.open_device())
    if not ("subgroups" in dev.features and dev.subgroup_ids):
        sys.exit("this device has no subgroup operations: nothing to compare")
    rows = []
    for label, N, C, V, Vp in shapes:
        trees, sg = time_ours(dev, N, C, V, Vp, args.trials)
        ref = None if args.no_torch else time_torch(N, C, V, Vp, args.trials)
        for op in trees:
            r = (label, N, C, Vp, op, trees[op], sg[op], ref and ref[op])
            rows.append(r)
            print(f"{label:>16} {op:>22}  trees {1e6 * trees[op]:8.1f} us  subgroups {1e6 * sg[op]:8.1f} us"
                  + ("" if ref is None else f"  PyTorch {1e6 * ref[op]:8.1f} us"), flush=True)
    lines = [f"## Row reductions, {datetime.date.today()}, {device_label(dev)}", "",
             f"`python bench/bench_reductions.py {' '.join(sys.argv[1:])}`: best of {args.trials} rounds, "
             "microseconds per call; GB/s over the bytes the op must move at least; PyTorch fp32 on the same GPU.", "",
             "| shape | N x C (Vp) | op | trees us | subgroups us | subgroups vs trees | GB/s (trees / subgroups) "
             "| PyTorch us | trees vs PyTorch | subgroups vs PyTorch |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, N, C, Vp, op, t_tree, t_sg, t_ref in rows:
        gbs = " / ".join(f"{min_bytes(op, N, C, Vp) / t / 1e9:.0f}" for t in (t_tree, t_sg))
        ref = "-" if t_ref is None else f"{1e6 * t_ref:.1f}"
        ratios = " | ".join("-" if t_ref is None else f"{t / t_ref:.2f}x" for t in (t_tree, t_sg))
        lines.append(f"| {label} | {N} x {C} ({Vp}) | {op} | {1e6 * t_tree:.1f} | {1e6 * t_sg:.1f} "
                     f"| {t_sg / t_tree:.2f}x | {gbs} | {ref} | {ratios} |")
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if not args.no_write:
        out = append_result("reductions", text)
        print(f"appended to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
