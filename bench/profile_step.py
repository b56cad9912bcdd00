"""Where a training step's GPU time goes: each dispatch of the step replayed on its own, grouped by kernel.

The model of a preset is built as bench_train.py builds it and trained a few steps; then every dispatch of the
zero-grad, forward-backward and update sequences is replayed alone (its bind groups as in the step), `repeat`
times per submission, best of `trials` submissions. The sum of these standalone times is set beside the measured
time of the whole step: what one dispatch costs alone (warm caches, no neighbour overlap) is close to, not
exactly, its share of the step.

    python bench/profile_step.py --preset browser            # table of kernels by total time
    python bench/profile_step.py --preset tiny --quick        # checks that it runs (lavapipe)

Results are printed and, with --write, appended to bench/results/profile.md with the date and the device.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "pkg"))

from bench_train import native_trainer  # noqa: E402  (bench/bench_train.py)
from common import append_result, device_label  # noqa: E402  (bench/common.py)

# Override constants worth naming in a kernel's label (layouts and fused modes); tile sizes are left out.
LABEL_CONSTANTS = ("A_T", "B_T", "HAS_BIAS", "ACCUMULATE")


def label(op) -> str:
    k = op.kernel
    flags = [c for c in LABEL_CONSTANTS if k.constants.get(c)]
    return f"{k.file.removesuffix('.wgsl')}:{k.entry}" + (f" [{','.join(flags)}]" if flags else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="browser")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's)")
    ap.add_argument("--repeat", type=int, default=20, help="replays of a dispatch per submission")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed whole steps")
    ap.add_argument("--top", type=int, default=20, help="list this many of the slowest single dispatches")
    ap.add_argument("--quick", action="store_true", help="few replays (checks that it runs)")
    ap.add_argument("--write", action="store_true", help="append the table to bench/results/profile.md")
    args = ap.parse_args()
    if args.quick:
        args.repeat, args.trials, args.steps = 2, 1, 2

    from tabgpt import gpu
    from tabgpt.config import preset

    cfg = preset(args.preset, batch_size=args.batch)
    dev, model, step, seconds = native_trainer(cfg)     # as bench_train.py times it
    seconds(0, 3)                                       # warm-up
    step_ms = seconds(3, args.steps) / args.steps * 1e3

    seqs = [(model.zero_seq, 1), (model.fwd_bwd_seq, cfg.grad_accum), (model.update_seq, 1)]
    total = defaultdict(float)
    count = defaultdict(int)
    each = []   # (ms, label, grid, tiles) of every dispatch
    for seq, times in seqs:
        for op in seq.ops:
            one = dev.sequence("profile")
            one.ops.append(op)
            if op.kind != "dispatch":
                name = "copy"
            else:
                name = label(op)
            best = float("inf")
            one.run(1)
            gpu.wait(dev.sync())
            for _ in range(args.trials):
                t = time.perf_counter()
                one.run(args.repeat)
                gpu.wait(dev.sync())
                best = min(best, (time.perf_counter() - t) / args.repeat)
            total[name] += best * 1e3 * times
            count[name] += times
            if op.kind == "dispatch":
                c = op.kernel.constants
                tiles = "x".join(str(c[k]) for k in ("BM", "BN", "BK") if k in c)
                each.append((best * 1e3, name, op.groups, tiles))
    dispatches = sum(count.values())
    summed = sum(total.values())
    device = device_label(dev)
    lines = [f"## Step profile, preset {args.preset}, {datetime.date.today()}, {device}", "",
             f"n_layer {cfg.n_layer}, n_embd {cfg.n_embd}, block {cfg.block_size}, batch {cfg.batch_size} x "
             f"{cfg.grad_accum}; {dispatches} dispatches per step. Whole step: {step_ms:.2f} ms measured "
             f"({cfg.tokens_per_step / step_ms * 1e3:,.0f} tokens/s); the dispatches alone sum to {summed:.2f} ms.",
             f"Command: `python bench/profile_step.py {' '.join(sys.argv[1:])}`", "",
             "| kernel | dispatches | ms per step | share of the sum |", "| --- | ---: | ---: | ---: |"]
    for name in sorted(total, key=total.get, reverse=True):
        lines.append(f"| {name} | {count[name]} | {total[name]:.3f} | {100 * total[name] / summed:.1f}% |")
    lines += ["", f"The {args.top} slowest dispatches:", "",
              "| kernel | workgroups | tiles | ms |", "| --- | --- | --- | ---: |"]
    for ms, name, groups, tiles in sorted(each, reverse=True)[:args.top]:
        lines.append(f"| {name} | {'x'.join(map(str, groups))} | {tiles or '-'} | {ms:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        append_result("profile", text)


if __name__ == "__main__":
    main()
