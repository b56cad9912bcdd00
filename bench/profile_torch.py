"""Where the time of a training step goes, ours beside PyTorch eager's, by kind of kernel.

The two trainers of bench/bench_train.py (the same GPT config and random tokens) are profiled in one process:
  - tabgpt: GPU timestamps around each dispatch of a whole step, each in a compute pass of its own
    (bench/profile_step.py): a kernel's run, beginning to end;
  - PyTorch eager (fp32 with TF32 off, or --bf16 autocast): torch.profiler's kernel times (CUPTI) over a few
    whole steps, per step. On a machine without CUDA it profiles PyTorch's CPU operators instead (a smoke run).
Kernels are grouped by what they do (matrix products, attention, layernorm, cross-entropy, embedding, optimizer,
elementwise), so the two columns say where one trainer gains on the other: the sums are kernel time, without
the gaps between kernels (the whole step's wall time is printed beside them). By name, PyTorch's groups cannot
follow the work exactly: its elementwise group holds its separate GELU, residual adds and copies, which our
products fuse into their epilogues, but also the bias gradients (reductions; ours are a row of the weight
gradients' products) and the zero fill of the logits' gradient in nll_loss's backward (ours is part of the
cross-entropy kernel). Ours are the shortest of --trials timestamped steps, PyTorch's the mean of --steps.

    python bench/profile_torch.py --preset browser             # on a GPU with PyTorch (CUDA)
    python bench/profile_torch.py --preset tiny --quick        # checks that it runs (lavapipe, CPU PyTorch)

Results are printed and, with --write, appended to bench/results/profile_torch.md with the date and the device.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "pkg"))

from bench_train import native_trainer, torch_seconds, torch_trainer  # noqa: E402  (bench/bench_train.py)
from common import append_result, device_label  # noqa: E402  (bench/common.py)
from profile_step import profile_timestamps  # noqa: E402  (bench/profile_step.py)

GROUPS = ("matrix products", "attention", "layernorm", "cross-entropy", "embedding", "optimizer", "elementwise")

# Our kernels by shader file (the label's part before the colon).
OUR_GROUPS = {"matmul": "matrix products", "attention": "attention", "layernorm": "layernorm",
              "crossentropy": "cross-entropy", "embedding": "embedding", "adamw": "optimizer",
              "metrics": "optimizer", "elementwise": "elementwise"}

# PyTorch's kernels (CUDA) and operators (CPU) by the first pattern their lower-cased name contains; first match
# wins, so attention's and the optimizer's patterns come before the products' ("gemm" also names cuBLAS kernels
# inside fused attention on some versions).
TORCH_PATTERNS = (
    ("attention", ("fmha", "flash", "attention", "attn")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "clip_grad", "lpnorm", "normtwoops", "_amp_")),
    ("layernorm", ("layer_norm", "layernorm", "gammabeta", "rowwisemoments", "computeinternalgradients",
                   "computegradientfusedparams")),
    ("cross-entropy", ("softmax", "nll_loss", "cross_entropy", "crossentropy")),
    ("embedding", ("embedding", "index_select", "indexselect", "indexing_backward", "compute_grad_weight",
                   "krn_partial", "partial_segments", "radix", "sort", "cub::", "unique", "scatter", "index_put")),
    ("matrix products", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "splitkreduce", "aten::mm", "aten::addmm",
                         "aten::bmm", "aten::matmul", "aten::linear", "ampere_", "sm90_")),
)
# CPU operators that only call others (their time is counted where it is spent): left out of the sums.
TORCH_WRAPPERS = ("aten::linear", "aten::matmul", "aten::cross_entropy_loss", "autograd::engine", "optimizer.",
                  "torch::autograd", "aten::scaled_dot_product_attention")


def our_group(label: str, constants: dict | None = None) -> str:
    """The group of one of our kernels, from its profile label ("matmul:matmul_tiled [B_T]") and its override
    constants: the batched products (CAUSAL) are the attention backward's (ops/attention.py, backward "products")."""
    group = OUR_GROUPS.get(label.split(":", 1)[0].removesuffix("_subgroups"), "elementwise")
    if group == "matrix products" and constants and "CAUSAL" in constants:
        return "attention"
    return group


def torch_group(name: str) -> str:
    """The group of one of PyTorch's kernels or operators, from its name."""
    low = name.lower()
    for group, patterns in TORCH_PATTERNS:
        if any(p in low for p in patterns):
            return group
    return "elementwise"


def by_group(items) -> dict:
    """{group: [count, ms]} summed over (group, count, ms) items."""
    groups = defaultdict(lambda: [0, 0.0])
    for group, count, ms in items:
        groups[group][0] += count
        groups[group][1] += ms
    return dict(groups)


def profile_ours(cfg, trials: int):
    """({group: (dispatches, run ms) per step}, CPU ms per step, device label, GPU span ms)."""
    dev, model, step, seconds = native_trainer(cfg)
    if "timestamp-query" not in dev.features or dev.backend != "wgpu-native":
        sys.exit("this adapter has no timestamp-query here: bench/profile_step.py --replay times our kernels")
    seconds(0, 3)
    step_ms = seconds(3, 10) / 10 * 1e3
    span, _, rows = profile_timestamps(dev, model, cfg, trials)
    groups = by_group((our_group(name, op.kernel.constants), 1, run_ns / 1e6) for name, op, _, run_ns in rows)
    return groups, step_ms, device_label(dev), span / 1e6


def profiled_kernels(averages, cuda: bool, steps: int) -> list[tuple[str, float, float]]:
    """[(name, calls, ms) per step] of torch.profiler's key_averages(): on CUDA each kernel's own device time
    (self_device_time_total; self_cuda_time_total in older PyTorch), else each CPU operator's own time, the
    wrappers left out; rows without time are dropped."""
    kernels = []
    for ev in averages:
        if cuda:
            us = getattr(ev, "self_device_time_total", None)
            if us is None:
                us = getattr(ev, "self_cuda_time_total", 0.0)
        else:
            if any(ev.key.lower().startswith(w) for w in TORCH_WRAPPERS):
                continue
            us = ev.self_cpu_time_total
        if us > 0:
            kernels.append((ev.key, ev.count / steps, us / 1e3 / steps))
    return kernels


def profile_torch(cfg, steps: int, bf16: bool):
    """({group: (kernels, ms) per step}, wall ms per step, [(name, calls, ms) per step, slowest first], kind)
    where kind is "CUDA kernels" or, without CUDA, "CPU operators"."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    step, sync = torch_trainer(cfg, bf16)
    torch_seconds(step, sync, 3)        # warm-up
    wall_ms = torch_seconds(step, sync, steps) / steps * 1e3
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        sync()
    kernels = profiled_kernels(prof.key_averages(), cuda, steps)
    if cuda and not kernels:
        sys.exit("torch.profiler recorded no CUDA kernels (is CUPTI available to PyTorch here?)")
    groups = by_group((torch_group(name), calls, ms) for name, calls, ms in kernels)
    kernels.sort(key=lambda k: -k[2])
    return groups, wall_ms, kernels, "CUDA kernels" if cuda else "CPU operators"


def table(args, cfg, ours, theirs) -> str:
    groups, step_ms, device, span_ms = ours
    tgroups, wall_ms, kernels, kind = theirs
    mode = "bf16 autocast" if args.bf16 else "fp32 (TF32 off)"
    lines = [f"## A training step by kind of kernel, tabgpt and PyTorch eager {mode}, preset {args.preset}, "
             f"{datetime.date.today()}, {device}", "",
             f"n_layer {cfg.n_layer}, n_embd {cfg.n_embd}, block {cfg.block_size}, batch {cfg.batch_size} x "
             f"{cfg.grad_accum}. Whole step: tabgpt {step_ms:.2f} ms by the CPU (GPU span {span_ms:.2f} ms), "
             f"PyTorch {wall_ms:.2f} ms by the CPU. tabgpt: GPU timestamps, each dispatch's run; PyTorch: "
             f"torch.profiler's {kind}, {args.steps} steps. Kernel time only (no gaps between kernels).",
             f"Command: `python bench/profile_torch.py {' '.join(sys.argv[1:])}`", "",
             "| kind | tabgpt dispatches | tabgpt ms | PyTorch kernels | PyTorch ms | tabgpt ms / PyTorch ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    def total(g):
        return sum(v[0] for v in g.values()), sum(v[1] for v in g.values())

    rows = [(name, groups.get(name, (0, 0.0)), tgroups.get(name, (0, 0.0))) for name in GROUPS]
    rows.append(("all", total(groups), total(tgroups)))
    for name, (n, ms), (tn, tms) in rows:
        ratio = f"{ms / tms:.2f}x" if tms > 0 and ms > 0 else "-"
        lines.append(f"| {name} | {n} | {ms:.3f} | {tn:.0f} | {tms:.3f} | {ratio} |")
    lines += ["", f"PyTorch's {args.top} slowest {kind} (per step):", "",
              "| kernel | kind | calls | ms |", "| --- | --- | ---: | ---: |"]
    for name, calls, ms in kernels[:args.top]:
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| `{short.replace('|', '/')}` | {torch_group(name)} | {calls:.0f} | {ms:.3f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="browser")
    ap.add_argument("--steps", type=int, default=5, help="PyTorch steps profiled")
    ap.add_argument("--trials", type=int, default=3, help="our timestamped steps (the shortest is kept)")
    ap.add_argument("--bf16", action="store_true", help="PyTorch with bf16 autocast (default: fp32, TF32 off)")
    ap.add_argument("--top", type=int, default=25, help="list this many of PyTorch's slowest kernels")
    ap.add_argument("--quick", action="store_true", help="one step, one trial (checks that it runs)")
    ap.add_argument("--write", action="store_true", help="append the table to bench/results/profile_torch.md")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.trials = 1, 1
    if args.steps < 1 or args.trials < 1:
        sys.exit("--steps and --trials must be at least 1")
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("PyTorch is not installed: pip install torch")
    from tabgpt.config import preset
    cfg = preset(args.preset)
    ours = profile_ours(cfg, args.trials)
    theirs = profile_torch(cfg, args.steps, args.bf16)
    text = table(args, cfg, ours, theirs)
    print(text)
    if args.write:
        append_result("profile_torch", text)


if __name__ == "__main__":
    main()
