"""A training step as three submissions against one: tokens/s and the CPU's time per step, arms in turn.

One model of the preset (one autotune) runs its steps three ways, each for --steps steps per round, in turn:
"three submissions" (zero_grad, forward-backward and update submitted apart, as before GPT.train_step), "one
submission of three command buffers" (natively: queue.submit of the three at once) and "one command buffer"
(GPT.train_step, what the trainer runs). Each keeps its best round. The same steps (tests/test_gpt.py checks
that train_step and the separate sequences give the same bits). Two diagnostics beside them, which a trainer
cannot do (its batches change each step): the step's command buffer without the writes of its batch, step number
and ring slot (what those writes cost), and ten steps in one command buffer (what a submission costs).

    python bench/probe_submit.py                      # browser preset, 30 steps a round, 3 rounds
    python bench/probe_submit.py --quick              # tiny preset, 10 steps, 1 round (lavapipe): checks that it runs
"""

from __future__ import annotations

import array
import random
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "pkg"))

from tabgpt import gpu  # noqa: E402
from tabgpt.config import preset  # noqa: E402
from tabgpt.gpt import GPT, RING  # noqa: E402

from common import device_label, probe_args, probe_parser  # noqa: E402  (bench/)


def arms_of(model, x, y):
    """{name: step(s)} for each way of submitting a step."""
    dev = model.dev

    def three(s):
        model.set_step(s, 1e-4)
        model.run_zero_grad()
        model.set_batch(x, y)
        model.run_forward_backward()
        model.run_update(slot=s)

    def buffers(s):
        model.set_step(s, 1e-4)
        model.set_batch(x, y)
        dev.write(model.record_params, struct.pack("<4I", s % RING, RING, 0, 0))
        dev.device.queue.submit([dev._encode(q) for q in (model.zero_seq, model.fwd_bwd_seq, model.update_seq)])

    def one(s):
        model.train_step(s, 1e-4, [(x, y)])

    def no_writes(s):
        model.step_seq.run()

    def ten(s):
        if s % 10 == 9:
            model.step_seq.run(repeat=10)

    arms = {"three submissions": three, "one submission of three command buffers": buffers,
            "one command buffer (train_step)": one,
            "diagnostic: one command buffer, no writes (the same batch, step and ring slot)": no_writes,
            "diagnostic: ten steps a command buffer, no writes": ten}
    if dev.backend != "wgpu-native":
        del arms["one submission of three command buffers"]
    return arms


def timed(dev, step, steps):
    """(tokens/s from the wall time to the GPU's end, the CPU's ms per step to submit them)."""
    gpu.wait(dev.sync())
    t0 = time.perf_counter()
    for s in range(steps):
        step(s)
    submitted = time.perf_counter() - t0
    gpu.wait(dev.sync())
    return steps / (time.perf_counter() - t0), 1e3 * submitted / steps


def main():
    ap = probe_parser(__doc__)
    ap.add_argument("--preset", default="browser")
    ap.add_argument("--steps", type=int, default=30, help="steps a round and arm (rounded up to tens)")
    args = probe_args(ap)
    name, steps = ("tiny", 10) if args.quick else (args.preset, -(-args.steps // 10) * 10)
    cfg = preset(name)
    if cfg.grad_accum != 1:
        ap.error(f"the {name} preset takes {cfg.grad_accum} micro-batches a step; the arms compare the submissions "
                 f"of one: give a preset with grad_accum 1")
    dev = gpu.wait(gpu.open_device())
    model = gpu.wait(GPT.create(dev, cfg, B=cfg.batch_size, T=cfg.block_size))
    gpu.wait(model.init_weights(1))
    rng = random.Random(0)
    n = cfg.batch_size * cfg.block_size
    x = array.array("I", (rng.randrange(cfg.vocab_size) for _ in range(n)))
    y = array.array("I", (rng.randrange(cfg.vocab_size) for _ in range(n)))
    arms = arms_of(model, x, y)
    for step in arms.values():          # warm-up
        timed(dev, step, 10)
    best = {k: (0.0, 0.0) for k in arms}
    for _ in range(args.rounds):
        for k, step in arms.items():
            rate, cpu = timed(dev, step, steps)
            if rate > best[k][0]:
                best[k] = (rate, cpu)
    print(f"## A step as three submissions or one, preset {name}, {time.strftime('%Y-%m-%d')}, {device_label(dev)}\n")
    print(f"{steps} steps a round and arm, best of {args.rounds} rounds in turn\n")
    print("| submitted as | tokens/s | CPU ms a step |\n| --- | ---: | ---: |")
    for k, (rate, cpu) in best.items():
        print(f"| {k} | {rate * n:,.0f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
