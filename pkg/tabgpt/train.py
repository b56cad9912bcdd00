"""The training loop: one async generator of events, shared by the CLI and the page.

    async for event in train(model, data, cfg, control): ...

Every optimizer step is a few prebuilt GPU sequences replayed (zero grads; forward + backward per
micro-batch; clip + AdamW). The loss is accumulated on the GPU into a ring of slots and read back every
`log_interval` steps, one step behind the GPU, so the GPU never waits for Python. A NaN or inf loss or
gradient makes the GPU skip that update (parameters and moments untouched); the loop reports it, and stops
with a clear message if it persists.
"""

from __future__ import annotations

import array
import math
import random
import time
from dataclasses import dataclass

from tabgpt.config import Config


class TrainingError(Exception):
    """Training cannot go on (diverged, or the data is unusable); the message says what to try. A divergence also
    gives its cause and the settings to change (settings), for a front end that knows how the run goes on."""

    def __init__(self, message: str, cause: str | None = None, settings: str | None = None):
        super().__init__(message)
        self.cause = cause
        self.settings = settings


@dataclass
class Control:
    """Set by the front end while training runs: pause, stop."""
    stop: bool = False
    pause: bool = False
    reason: str = ""

    def request_stop(self, reason: str = "stopped by the user"):
        self.stop, self.reason = True, reason


@dataclass
class TokenData:
    """Train and validation token streams (array.array of ids) and the bytes they came from."""
    train: array.array
    val: array.array
    train_bytes: int = 0
    val_bytes: int = 0

    def check(self, block_size: int):
        """Refuse streams shorter than one block (block_size + 1 tokens), with how much more text it would take:
        the shortfall in tokens at the corpus's bytes per token, over the share of the text that stream gets."""
        need = block_size + 1
        total_bytes = self.train_bytes + self.val_bytes
        n_tokens = len(self.train) + len(self.val)
        per_token = total_bytes / n_tokens if total_bytes and n_tokens else 4.0
        for name, toks, nbytes, share in (("training", self.train, self.train_bytes, 0.95),
                                          ("validation", self.val, self.val_bytes, 0.05)):
            if len(toks) < need:
                if nbytes and total_bytes:
                    share = nbytes / total_bytes
                more = math.ceil((need - len(toks)) * per_token / share / 100) * 100
                raise TrainingError(
                    f"the {name} text has {len(toks)} tokens, fewer than one training block needs "
                    f"({need} = block_size + 1): give a text of about {more:,} more bytes in all (the {name} "
                    f"part is {100 * share:.0f}% of it; a few times more to learn anything), or a shorter context "
                    f"(block_size: a smaller preset)")


def get_lr(step: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay to min_lr (nanoGPT)."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    ratio = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def get_batch(tokens: array.array, B: int, T: int, seed: int, step: int, micro: int):
    """B random windows of T+1 tokens; a pure function of (seed, step, micro), so a resumed run sees the same
    batches as an uninterrupted one. Returns (inputs, targets) as array('I') of B*T ids each."""
    rng = random.Random(seed * 1_000_003 + step * 1_009 + micro)
    hi = len(tokens) - T - 1
    x = array.array("I")
    y = array.array("I")
    for _ in range(B):
        i = rng.randint(0, hi)
        window = tokens[i:i + T + 1]
        x.extend(window[:-1])
        y.extend(window[1:])
    return x, y


def eval_batches(tokens: array.array, B: int, T: int, n: int):
    """Fixed validation batches: evenly spaced windows, the same every evaluation."""
    hi = len(tokens) - T - 1
    count = n * B
    starts = [round(i * hi / max(1, count - 1)) for i in range(count)] if count > 1 else [0]
    for b in range(n):
        x = array.array("I")
        y = array.array("I")
        for i in starts[b * B:(b + 1) * B]:
            window = tokens[i:i + T + 1]
            x.extend(window[:-1])
            y.extend(window[1:])
        yield x, y


async def evaluate_loss(model, tokens: array.array, n_batches: int) -> float:
    """Mean validation loss over fixed batches (forward only)."""
    B, T = model.B, model.T
    total = 0.0
    count = 0
    for x, y in eval_batches(tokens, B, T, n_batches):
        model.set_batch(x, y)
        model.run_eval()
        total += await model.read_eval_loss()
        count += 1
    return total / max(1, count)


async def train(model, data: TokenData, cfg: Config, control: Control | None = None, start_step: int = 0,
                sampler=None, checkpoint=None):
    """Train `model` from `start_step` to cfg.max_steps, yielding event dicts.

    sampler(step) -> awaitable str gives a sample for the progress display; checkpoint(step, reason) -> awaitable
    writes the run folder. Both are optional (the tests drive the bare loop).
    """
    control = control or Control()
    data.check(cfg.block_size)
    B, T = model.B, model.T
    tokens_per_step = B * T * cfg.grad_accum
    yield {"type": "start", "step": start_step, "max_steps": cfg.max_steps, "n_params": cfg.n_params(),
           "tokens_per_step": tokens_per_step, "train_tokens": len(data.train), "val_tokens": len(data.val)}
    t_start = time.perf_counter()
    t_last, step_last = t_start, start_step
    pending = []          # steps whose loss is on the GPU but not read yet
    bad_streak = 0
    evaluated = None      # the step of the last evaluation (a stop right after one does not repeat it)
    last_loss = None      # no step read back yet (a resumed run's first evaluation)
    step = start_step

    def step_events(steps, results):
        """Events for steps whose (loss, grad norm, skipped) were read back; throughput since the last read."""
        nonlocal bad_streak, last_loss, t_last, step_last
        now = time.perf_counter()
        done_steps = step - step_last
        dt = max(1e-9, now - t_last)
        t_last, step_last = now, step
        for s, (loss, norm, skipped) in zip(steps, results):
            finite = math.isfinite(loss) and math.isfinite(norm)
            if skipped or not finite:
                bad_streak += 1
                yield {"type": "nan", "step": s, "loss": loss, "grad_norm": norm,
                       "message": f"step {s}: non-finite loss or gradient; the update was skipped"}
                if bad_streak >= 5 and start_step > 0 and s - bad_streak + 1 == start_step:
                    raise TrainingError(
                        f"the first {bad_streak} steps after resuming at step {start_step} all had a non-finite "
                        f"loss or gradient: the weights or optimizer state loaded from the checkpoint are "
                        f"probably not finite (a corrupt or diverged checkpoint). Resume from an earlier copy "
                        f"of the run, or start a new one")
                if bad_streak >= 5:
                    cause = (f"training diverged: {bad_streak} steps in a row had a non-finite loss or gradient "
                             f"(last at step {s})")
                    raise TrainingError(
                        f"{cause}. Lower the learning rate (now {cfg.learning_rate}) or raise the warmup (now "
                        f"{cfg.warmup_steps} steps), then resume from the last checkpoint", cause=cause,
                        settings=f"a lower learning rate (now {cfg.learning_rate}) or a longer warmup (now "
                                 f"{cfg.warmup_steps} steps)")
                continue
            bad_streak = 0
            last_loss = loss
            tps = done_steps * tokens_per_step / dt
            yield {"type": "step", "step": s + 1, "loss": loss, "grad_norm": norm, "lr": get_lr(s, cfg),
                   "tokens_per_s": tps, "gflops": tps * cfg.flops_per_token() / 1e9, "elapsed": now - t_start,
                   "eta": (cfg.max_steps - step) * dt / max(1, done_steps)}

    while step < cfg.max_steps:
        if control.stop:
            break
        while control.pause and not control.stop:
            yield {"type": "paused", "step": step}
            await model.sleep(0.1)
        if control.stop:  # stopped while paused: no further step
            break
        lr = get_lr(step, cfg)
        model.train_step(step, lr, [get_batch(data.train, B, T, cfg.seed, step, micro)
                                    for micro in range(cfg.grad_accum)])
        pending.append(step)
        step += 1

        # Read losses one interval behind: the GPU already runs the next steps while we wait for these.
        if len(pending) > cfg.log_interval or step == cfg.max_steps:
            flush = pending if step == cfg.max_steps else pending[:-1]
            pending = pending[len(flush):]
            for ev in step_events(flush, await model.read_step_stats(flush)):
                yield ev

        if cfg.eval_interval and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
            val = await evaluate_loss(model, data.val, cfg.eval_steps)
            evaluated = step
            yield {"type": "eval", "step": step, "val_loss": val, "train_loss": last_loss}
        if sampler and cfg.sample_interval and step % cfg.sample_interval == 0 and step < cfg.max_steps:
            yield {"type": "sample", "step": step, "text": await sampler(step)}
        if checkpoint and cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0:
            # every step up to the checkpoint in the metrics first: a run resumed from it has its whole history
            if pending:
                for ev in step_events(pending, await model.read_step_stats(pending)):
                    yield ev
                pending = []
            yield {"type": "checkpoint", "step": step, **(await checkpoint(step, "interval"))}
        if cfg.time_limit and time.perf_counter() - t_start > cfg.time_limit:
            control.request_stop(f"time limit of {cfg.time_limit:g} s reached")

    if pending:  # stopped early: the steps still on the GPU, reported like every other step
        for ev in step_events(pending, await model.read_step_stats(pending)):
            yield ev
    if control.stop and step < cfg.max_steps and cfg.eval_interval and evaluated != step:
        val = await evaluate_loss(model, data.val, cfg.eval_steps)
        yield {"type": "eval", "step": step, "val_loss": val, "train_loss": last_loss}
    if checkpoint:
        yield {"type": "checkpoint", "step": step, **(await checkpoint(step, "stop" if control.stop else "end"))}
    yield {"type": "stopped" if control.stop else "done", "step": step, "reason": control.reason,
           "seconds": time.perf_counter() - t_start, "loss": last_loss}
