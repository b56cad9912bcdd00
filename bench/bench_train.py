"""Training throughput: our WGSL trainer against PyTorch on the same GPT config and GPU, side by side.

Tokens per second of full training steps (forward, backward, clip, AdamW) on random tokens, after warm-up:
  - tabgpt: the native trainer (wgpu-py; Vulkan on NVIDIA), losses read back at the end only
  - PyTorch eager fp32 (TF32 off), and eager with bf16 autocast, the same model (nanoGPT-style, fused AdamW)
Usage: python bench/bench_train.py --preset browser [--steps 20] [--no-torch] [--rounds N] [--write]

--rounds N (N >= 2) measures the ratio to PyTorch eager fp32 as a paired comparison: both trainers are built and
warmed up in the process once, then each round times `steps` steps of one and then of the other, the order
alternating from round to round (a drift of the GPU's clocks or temperature over the run weighs on both alike),
and the table gives every round's ratio with their median, lowest and highest. A single ratio from one run of each
(the default) carries the noise between runs, 1-2% on an H100.
"""

from __future__ import annotations

import argparse
import array
import datetime
import math
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "pkg"))

from common import append_result, device_label  # noqa: E402  (bench/common.py)


def native_trainer(cfg):
    """(dev, model, step, seconds) for timing our trainer on cfg: a fresh model on random tokens; step(s) runs one
    whole training step (zero-grad, grad_accum forward-backwards, clip + AdamW) without waiting, and
    seconds(first, count) runs steps first.. first+count-1 and returns their wall time, the GPU waited for."""
    from tabgpt import gpu
    from tabgpt.gpt import GPT
    dev = gpu.wait(gpu.open_device())
    model = gpu.wait(GPT.create(dev, cfg, B=cfg.batch_size, T=cfg.block_size))
    gpu.wait(model.init_weights(cfg.seed))
    rng = random.Random(0)
    n = cfg.batch_size * cfg.block_size
    x = array.array("I", (rng.randrange(cfg.vocab_size) for _ in range(n)))
    y = array.array("I", (rng.randrange(cfg.vocab_size) for _ in range(n)))

    def step(s):
        model.train_step(s, cfg.learning_rate * 0.1, [(x, y)] * cfg.grad_accum)

    def seconds(first, count):
        gpu.wait(dev.sync())
        t0 = time.perf_counter()
        for s in range(first, first + count):
            step(s)
        gpu.wait(dev.sync())
        return time.perf_counter() - t0

    return dev, model, step, seconds


def check_finite(model, end: int):
    """The three steps before step `end` trained to finite losses: what was timed was real training."""
    from tabgpt import gpu
    stats = gpu.wait(model.read_step_stats(list(range(end - 3, end))))
    assert all(math.isfinite(l) for l, _, _ in stats), stats


class Steps:
    """A native_trainer's (dev, model, step, seconds) with its own count of steps made: run(count) times the next
    `count` steps and gives their tokens/s; check() checks that the last three trained to finite losses."""

    def __init__(self, cfg, trainer):
        self.dev, self.model, _, self._seconds = trainer
        self.tokens_per_step = cfg.tokens_per_step
        self.done = 0

    def run(self, count: int) -> float:
        dt = self._seconds(self.done, count)
        self.done += count
        return count * self.tokens_per_step / dt

    def check(self):
        check_finite(self.model, self.done)


def bench_ours(cfg, steps):
    dev, model, step, seconds = native_trainer(cfg)
    seconds(0, 3)                       # warm-up
    dt = seconds(3, steps)
    check_finite(model, 3 + steps)
    return steps * cfg.tokens_per_step / dt, device_label(dev)


def torch_trainer(cfg, bf16):
    """(step, sync) for timing PyTorch eager on cfg: the same GPT (nanoGPT-style, tied lm_head, SDPA, fused AdamW)
    on random tokens; step() runs one whole training step (zero-grad, grad_accum forward-backwards, clip, AdamW)
    without waiting, sync() waits for the GPU. fp32 with TF32 off, or bf16 autocast."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    C, H, L, T, V = cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.block_size, cfg.padded_vocab_size

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            B, T_, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T_, H, C // H).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T_, C))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
            self.h = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(C)

        def forward(self, idx, tgt):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
            for b in self.h:
                x = b(x)
            logits = self.ln_f(x) @ self.wte.weight.T
            return F.cross_entropy(logits.view(-1, V).float(), tgt.view(-1))

    model = GPT().to(dev)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), fused=dev == "cuda")
    x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, T), device=dev)
    y = torch.randint(0, cfg.vocab_size, (cfg.batch_size, T), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        for _ in range(cfg.grad_accum):
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
                loss = model(x, y)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step, (torch.cuda.synchronize if dev == "cuda" else (lambda: None))


def torch_seconds(step, sync, steps: int) -> float:
    """Wall seconds of `steps` calls of a torch_trainer's step, the GPU waited for."""
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return time.perf_counter() - t0


def bench_torch(cfg, steps, bf16):
    step, sync = torch_trainer(cfg, bf16)
    torch_seconds(step, sync, 3)        # warm-up
    return steps * cfg.tokens_per_step / torch_seconds(step, sync, steps)


def paired_rounds(cfg, steps: int, rounds: int):
    """[(ours tokens/s, PyTorch eager fp32 tokens/s)] per round, and the device label: both trainers in this process,
    warmed up, then `rounds` rounds of `steps` steps each, ours first in even rounds and PyTorch first in odd ones."""
    dev, model, step, seconds = native_trainer(cfg)
    tstep, tsync = torch_trainer(cfg, bf16=False)
    seconds(0, 3)                       # warm-up, both
    torch_seconds(tstep, tsync, 3)
    out, first = [], 3
    for r in range(rounds):
        if r % 2 == 0:
            ours_dt = seconds(first, steps)
            theirs_dt = torch_seconds(tstep, tsync, steps)
        else:
            theirs_dt = torch_seconds(tstep, tsync, steps)
            ours_dt = seconds(first, steps)
        first += steps
        out.append((steps * cfg.tokens_per_step / ours_dt, steps * cfg.tokens_per_step / theirs_dt))
    check_finite(model, first)
    return out, device_label(dev)


def rounds_table(cfg, args, pairs, device) -> str:
    """The paired rounds as a table: each round's tokens/s and ratio, then the median, lowest and highest ratio."""
    ratios = sorted(o / t for o, t in pairs)
    n = len(ratios)
    median = statistics.median(ratios)
    lines = [f"## Training throughput, paired rounds, preset {args.preset}, {datetime.date.today()}, {device}", "",
             f"n_layer {cfg.n_layer}, n_head {cfg.n_head}, n_embd {cfg.n_embd}, block {cfg.block_size}, "
             f"vocab {cfg.vocab_size}, batch {cfg.batch_size} x {cfg.grad_accum}; both trainers in one process, "
             f"{args.rounds} rounds of {args.steps} steps each after 3 warm-up steps, the order alternating "
             "(tabgpt first in rounds 1, 3, ...)", "",
             "| round | tabgpt tokens/s | PyTorch eager fp32 tokens/s | tabgpt / PyTorch |",
             "| ---: | ---: | ---: | ---: |"]
    for i, (o, t) in enumerate(pairs):
        lines.append(f"| {i + 1} | {o:,.0f} | {t:,.0f} | {o / t:.3f}x |")
    lines += ["", f"tabgpt / PyTorch eager fp32: median {median:.3f}x, lowest {ratios[0]:.3f}x, highest "
              f"{ratios[-1]:.3f}x over {n} rounds; {sum(r >= 1.0 for r in ratios)} of {n} at or above 1.0x."]
    return "\n".join(lines) + "\n"


def main():
    from tabgpt.config import preset
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="browser")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--rounds", type=int, default=1,
                    help="N >= 2: the ratio to PyTorch eager fp32 as N paired rounds in one process (see above)")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    if args.steps < 1 or args.rounds < 1:
        sys.exit("--steps and --rounds must be at least 1")
    cfg = preset(args.preset, batch_size=args.batch_size)
    if args.rounds > 1:
        if args.no_torch:
            sys.exit("--rounds compares with PyTorch: leave out --no-torch")
        pairs, device = paired_rounds(cfg, args.steps, args.rounds)
        text = rounds_table(cfg, args, pairs, device)
        print(text)
        if args.write:
            append_result("train", text)
        return
    ours, device = bench_ours(cfg, args.steps)
    rows = [("tabgpt (WGSL, wgpu-native)", ours)]
    if not args.no_torch:
        rows.append(("PyTorch eager fp32 (TF32 off)", bench_torch(cfg, args.steps, bf16=False)))
        rows.append(("PyTorch eager bf16 autocast", bench_torch(cfg, args.steps, bf16=True)))
    fpt = cfg.flops_per_token()
    lines = [f"## Training throughput, preset {args.preset}, {datetime.date.today()}, {device}", "",
             f"n_layer {cfg.n_layer}, n_head {cfg.n_head}, n_embd {cfg.n_embd}, block {cfg.block_size}, "
             f"vocab {cfg.vocab_size}, batch {cfg.batch_size} x {cfg.grad_accum}; {cfg.n_params() / 1e6:.1f} M params; "
             f"{args.steps} timed steps after 3 warm-up steps", "",
             "| trainer | tokens/s | TFLOP/s (6N + attention) | vs tabgpt |", "| --- | ---: | ---: | ---: |"]
    for name, tps in rows:
        lines.append(f"| {name} | {tps:,.0f} | {tps * fpt / 1e12:.2f} | {tps / ours:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        append_result("train", text)


if __name__ == "__main__":
    main()
