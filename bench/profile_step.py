"""Where a training step's GPU time goes, grouped by kernel.

The model of a preset is built as bench_train.py builds it and trained a few steps. Then, where the adapter has
`timestamp-query` (natively), the whole step is run with GPU timestamps (--timestamps, the default there):
  - as it trains (each sequence's dispatches in one compute pass), timestamps around each pass: the GPU's span of
    the step, which the CPU-measured step time can only exceed;
  - each dispatch in a compute pass of its own, timestamps at its pass's beginning and end, in the step's order:
    a dispatch's "interval" is the time from the previous dispatch's end to its own (what it adds to the step:
    its barrier, its launch and its run), its "run" from its beginning to its end; the intervals add up to the
    span, and their difference from the runs is what the dispatches cost beyond their kernels.
Otherwise (--replay) every dispatch of the zero-grad, forward-backward and update sequences is replayed alone
(its bind groups as in the step), `repeat` times per submission, best of `trials` submissions: each replay also
carries a submission's fixed cost, so its sum exceeds the step.

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
from types import SimpleNamespace

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


def step_ops(model, cfg):
    """The ops of one whole step in order: zero-grad, grad_accum forward-backwards, update."""
    return (list(model.zero_seq.ops) + list(model.fwd_bwd_seq.ops) * cfg.grad_accum + list(model.update_seq.ops))


def timestamped(dev, ops, per_dispatch: bool) -> list[int]:
    """Run ops (a whole step) once with GPU timestamps; returns the raw timestamps: per dispatch (beginning, end)
    of its own pass with per_dispatch, else (beginning, end) of each compute pass of the step as it trains
    (consecutive dispatches share one; copies end it)."""
    import wgpu
    n_pass = sum(op.kind == "dispatch" for op in ops) if per_dispatch else \
        sum(op.kind == "dispatch" and (i == 0 or ops[i - 1].kind != "dispatch") for i, op in enumerate(ops))
    qs = dev.device.create_query_set(type=wgpu.QueryType.timestamp, count=2 * n_pass)
    out = dev.device.create_buffer(size=16 * n_pass, usage=wgpu.BufferUsage.QUERY_RESOLVE | wgpu.BufferUsage.COPY_SRC)
    work = dev._encode(SimpleNamespace(ops=ops), 1, query_set=qs, per_dispatch=per_dispatch)
    enc = dev.device.create_command_encoder()
    enc.resolve_query_set(qs, 0, 2 * n_pass, out, 0)
    dev.device.queue.submit([work, enc.finish()])
    raw = dev.device.queue.read_buffer(out)
    qs.destroy()
    out.destroy()
    return list(memoryview(raw).cast("Q"))


def span_of(stamps: list[int]) -> int:
    """From the first timestamp to the last."""
    return stamps[-1] - stamps[0]


def dispatch_floor(dev, model, trials, n=256) -> float:
    """GPU ns a dispatch costs beyond its work: n one-workgroup fills of one small buffer in one pass (each waits
    for the one before, as the step's dispatches do: wgpu puts a barrier between writes of a buffer), the pass's
    span divided by n, best of trials."""
    buf = dev.buffer(256, "dispatch-floor")
    seq = dev.sequence("dispatch-floor")
    for _ in range(n):
        model.ops.ew.zero(seq, buf, 64)
    return min(span_of(timestamped(dev, seq.ops, False)) for _ in range(trials)) / n


def profile_timestamps(dev, model, cfg, trials):
    """(span ns of the step as trained, [(label, op, interval ns, run ns)] per dispatch): of `trials` runs each,
    the run whose span is shortest."""
    ops = step_ops(model, cfg)
    span = min(span_of(timestamped(dev, ops, False)) for _ in range(trials))
    best = min((timestamped(dev, ops, True) for _ in range(trials)), key=span_of)
    dispatches = [op for op in ops if op.kind == "dispatch"]
    rows = []
    for i, op in enumerate(dispatches):
        begin, end = best[2 * i], best[2 * i + 1]
        prev_end = best[2 * i - 1] if i else begin
        rows.append((label(op), op, end - prev_end, end - begin))
    return span, span_of(best), rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="browser")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's)")
    ap.add_argument("--repeat", type=int, default=20, help="replays of a dispatch per submission")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="timed whole steps")
    ap.add_argument("--top", type=int, default=20, help="list this many of the slowest single dispatches")
    ap.add_argument("--quick", action="store_true", help="few replays (checks that it runs)")
    ap.add_argument("--write", action="store_true", help="append the table to bench/results/profile.md")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--timestamps", action="store_true", help="GPU timestamps (the default where available)")
    mode.add_argument("--replay", action="store_true", help="replay each dispatch alone, timed by the CPU")
    args = ap.parse_args()
    if args.quick:
        args.repeat, args.trials, args.steps = 2, 1, 2

    from tabgpt import gpu
    from tabgpt.config import preset

    cfg = preset(args.preset, batch_size=args.batch)
    dev, model, step, seconds = native_trainer(cfg)     # as bench_train.py times it
    stamps = "timestamp-query" in dev.features and dev.backend == "wgpu-native"
    if args.timestamps and not stamps:
        sys.exit("this adapter (or the browser backend) has no timestamp-query here: use --replay")
    seconds(0, 3)                                       # warm-up
    step_ms = seconds(3, args.steps) / args.steps * 1e3

    if stamps and not args.replay:
        text = timestamp_table(args, cfg, dev, model, step_ms)
        print(text)
        if args.write:
            append_result("profile", text)
        return

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


def timestamp_table(args, cfg, dev, model, step_ms) -> str:
    span, span_each, rows = profile_timestamps(dev, model, cfg, args.trials)
    floor = dispatch_floor(dev, model, args.trials)
    interval, run, count = defaultdict(float), defaultdict(float), defaultdict(int)
    for name, _, iv, rn in rows:
        interval[name] += iv / 1e6
        run[name] += rn / 1e6
        count[name] += 1
    n = len(rows)
    runs = sum(run.values())
    lines = [f"## Step profile (GPU timestamps), preset {args.preset}, {datetime.date.today()}, {device_label(dev)}",
             "", f"n_layer {cfg.n_layer}, n_embd {cfg.n_embd}, block {cfg.block_size}, batch {cfg.batch_size} x "
             f"{cfg.grad_accum}; {n} dispatches per step. Whole step: {step_ms:.2f} ms measured by the CPU "
             f"({cfg.tokens_per_step / step_ms * 1e3:,.0f} tokens/s); GPU span of a step as it trains "
             f"{span / 1e6:.2f} ms; with each dispatch in its own pass {span_each / 1e6:.2f} ms, of which the "
             f"kernels' runs (beginning to end of each) {runs:.2f} ms and the rest, {span_each / 1e6 - runs:.2f} ms "
             f"({(span_each / 1e6 - runs) / n * 1e3:.1f} us a dispatch), between them (barriers, launches). A "
             f"dispatch of one workgroup that waits for the one before costs {floor / 1e3:.1f} us in a pass "
             f"({n} such: {n * floor / 1e6:.2f} ms).",
             f"Command: `python bench/profile_step.py {' '.join(sys.argv[1:])}`", "",
             "| kernel | dispatches | interval ms per step | run ms per step | share of the span |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name in sorted(interval, key=interval.get, reverse=True):
        lines.append(f"| {name} | {count[name]} | {interval[name]:.3f} | {run[name]:.3f} | "
                     f"{100 * interval[name] / (span_each / 1e6):.1f}% |")
    lines += ["", f"The {args.top} longest intervals:", "",
              "| kernel | workgroups | tiles | interval ms | run ms |", "| --- | --- | --- | ---: | ---: |"]
    for name, op, iv, rn in sorted(rows, key=lambda r: r[2], reverse=True)[:args.top]:
        c = op.kernel.constants
        tiles = "x".join(str(c[k]) for k in ("BM", "BN", "BK") if k in c)
        lines.append(f"| {name} | {'x'.join(map(str, op.groups))} | {tiles or '-'} | {iv / 1e6:.3f} | {rn / 1e6:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
