"""How fast this GPU trains: the trainer's matrix product on square sizes, and training steps of a preset.

The same code runs natively (`tabgpt device --speed`) and in the browser (the check page's "Measure speed"),
so a visitor can see what their GPU does through WebGPU in this browser. No numpy: it runs in Pyodide.

    rows = await matmul_speed(dev)                 # [{n, ms, gflops, tiles, splits, ok}, ...] growing n
    r = await train_speed(dev, "browser", 10.0)    # {tokens_per_s, gflops, step_ms, steps, ...}

Each product is of matrices with small integer entries, so every sum is exact in f32 whatever the kernel's
order of summation: sampled entries of the result are compared to exact references, and a kernel that computes
wrong results is reported as such (ok False), not as fast. Training runs the trainer's own loop (tabgpt.train)
on random token ids, without evaluations or checkpoints; its throughput is counted from the first read-back of
the losses to the last, so compiling and the first submission are left out (they are reported apart).
"""

from __future__ import annotations

import array
import random
import time

from tabgpt.gpu import Device, GPUError, best_run_seconds

SIZES = (256, 512, 1024, 2048, 4096)
TIMED_SECONDS = 0.1     # each size's timed submissions are about this long (short ones carry the round trip)
TRIALS = 3              # the best of this many
MATMUL_SECONDS = 15.0   # matmul_speed's budget: no larger size is started that would not fit in what is left
TRAIN_SECONDS = 10.0    # train_speed's default time to train

# A[i, k] = ((A_MUL i + k) mod A_P) - A_P // 2 and B[k, j] = ((B_MUL k + j) mod B_P) - B_P // 2: entries in
# [-2, 2] and [-3, 3], so that every partial sum is an integer below 6 n <= 2^24 in magnitude (exact in f32).
A_P, A_MUL, B_P, B_MUL = 5, 2, 7, 3


def pattern_matrix(rows: int, cols: int, period: int, mul: int) -> bytes:
    """The f32 bytes of M[r, c] = ((mul r + c) mod period) - period // 2, row-major (rows are shifts of one)."""
    base = array.array("f", [(c % period) - period // 2 for c in range(cols + period)]).tobytes()
    shifts = [base[4 * s:4 * (s + cols)] for s in range(period)]
    return b"".join(shifts[(mul * r) % period] for r in range(rows))


def exact_entry(n: int, i: int, j: int) -> int:
    """(A @ B)[i, j] of pattern_matrix's A and B (n x n), in integers."""
    return sum((((A_MUL * i + k) % A_P) - A_P // 2) * (((B_MUL * k + j) % B_P) - B_P // 2) for k in range(n))


def check_rows(n: int, rows: dict[int, list[float]], cols: list[int]) -> list[str]:
    """What is wrong in the rows read back (row index -> its n values), at the sampled columns: [] when nothing."""
    return [f"out[{i}, {j}] = {row[j]:g}, not {exact_entry(n, i, j)}"
            for i, row in rows.items() for j in cols if row[j] != exact_entry(n, i, j)]


async def _best_time(dev: Device, seq) -> tuple[float, float]:
    """(seconds of one run, including its submission and wait; best seconds per run over TRIALS timings)."""
    t0 = time.perf_counter()
    seq.run(1)
    await dev.sync()
    once = time.perf_counter() - t0
    repeat = max(1, min(100, int(TIMED_SECONDS / max(once, 1e-6))))
    return once, await best_run_seconds(dev, seq, repeat, TRIALS)


async def matmul_speed(dev: Device, sizes=SIZES, seconds: float = MATMUL_SECONDS, post=None) -> list[dict]:
    """GFLOP/s of the trainer's matrix product (n x n times n x n, f32, the tiles training would use here: the
    autotuner's natively on a GPU, the adapter's defaults in the browser) for each n of sizes in turn, while the
    next size is expected to fit in what is left of `seconds` (each takes about 8 times the one before) and its
    three matrices fit one binding each (natively on a GPU, the first product of each size at or above
    TUNE_MIN_FLOPS autotunes its tiles once for the adapter, which its time includes). A size the GPU cannot run
    (out of memory, a lost device) ends the list with a row {"n", "error"}. post(message) reports progress."""
    from tabgpt.ops.matmul import Matmul, autotune_enabled, tiles_label
    rows: list[dict] = []
    t_start = time.perf_counter()
    last = 0.0
    rng = random.Random(0)
    for n in sizes:
        if 4 * n * n > min(dev.limits["max-storage-buffer-binding-size"], dev.limits["max-buffer-size"]):
            break
        if rows and 8 * last > seconds - (time.perf_counter() - t_start):
            break
        if post:
            tuning = " (autotuning its tiles, once for this GPU)" if autotune_enabled(dev, 2.0 * n ** 3) else ""
            post(f"timing the matrix product at {n} x {n} x {n}{tuning}")
        t0 = time.perf_counter()
        picked = sorted({0, n - 1, rng.randrange(n), rng.randrange(n)})
        cols = sorted({0, n - 1, *(rng.randrange(n) for _ in range(6))})
        try:
            a = dev.buffer(4 * n * n, "speed-a", pattern_matrix(n, n, A_P, A_MUL))
            b = dev.buffer(4 * n * n, "speed-b", pattern_matrix(n, n, B_P, B_MUL))
            out = dev.buffer(4 * n * n, "speed-out")
            mm = await Matmul.create(dev, n, n, n, "nn")
            seq = dev.sequence("speed-matmul")
            mm.dispatch(seq, out=out, a=a, b=b)
            await seq.build()
            seq.run(1)               # the first run compiles where the driver defers it
            await dev.sync()
            _, best = await _best_time(dev, seq)
            got = {i: await dev.read_floats(out, 4 * i * n, n) for i in picked}
        except GPUError as e:
            rows.append({"n": n, "ok": False, "error": str(e)})
            break
        wrong = check_rows(n, got, cols)
        rows.append({"n": n, "ms": 1e3 * best, "gflops": 2.0 * n ** 3 / best / 1e9,
                     "tiles": tiles_label(mm.tiles) if mm.tiles else mm.variant,
                     "splits": mm.splits, "ok": not wrong, "checked": len(picked) * len(cols),
                     "wrong": wrong[:3]})
        last = time.perf_counter() - t0
        del mm, seq
        dev.free(a, b, out)      # 192 MiB at 4096: a page that measures again must not wait for the collector
    return rows


async def train_speed(dev: Device, preset_name: str = "browser", seconds: float = TRAIN_SECONDS, post=None) -> dict:
    """Tokens/s and GFLOP/s of the trainer (tabgpt.train's loop, the preset's model and batch) on random token
    ids for about `seconds`, after the model is built (compile_seconds). {"error": ...} where the preset does not
    fit this GPU's limits or memory."""
    from tabgpt.config import preset
    from tabgpt.gpt import GPT
    from tabgpt.pipeline import FLAG_NAMES, RunError, check_fits, flag
    from tabgpt.train import TokenData
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, got {seconds!r}")
    cfg = preset(preset_name).replace(max_steps=10 ** 9, warmup_steps=10, eval_interval=0, sample_interval=0,
                                      checkpoint_interval=0, log_interval=2, time_limit=float(seconds)).validate()
    out = {"preset": preset_name, "n_params": cfg.n_params(), "tokens_per_step": cfg.batch_size * cfg.block_size
           * cfg.grad_accum, "flops_per_token": cfg.flops_per_token()}
    try:
        check_fits(dev, cfg, fixed=[flag(k) for k in FLAG_NAMES])   # (the train command's flags mean nothing here)
    except RunError as e:
        return {**out, "error": f"the {preset_name} preset does not fit this GPU: {e}"}
    if post:
        post(f"building the {preset_name} preset's model ({cfg.n_params() / 1e6:.1f} M parameters)")
    rng = random.Random(0)
    B, T, V = cfg.batch_size, cfg.block_size, cfg.vocab_size
    data = TokenData(array.array("I", (rng.randrange(V) for _ in range(8 * B * T + 1))),
                     array.array("I", (rng.randrange(V) for _ in range(T + 1))))
    t0 = time.perf_counter()
    model = None
    try:
        try:
            model = await GPT.create(dev, cfg, B, T)
            await model.init_weights(cfg.seed)
            await dev.sync()
        except GPUError as e:
            return {**out, "error": f"the {preset_name} preset's model could not be built on this GPU: {e}"}
        return await _timed_training(model, data, cfg, out, t0, seconds, post)
    finally:
        if model is not None:
            model.free()   # the page's own model may be on this GPU too: give this one's memory back now


async def _timed_training(model, data, cfg, out: dict, t0: float, seconds: float, post) -> dict:
    from tabgpt.train import TrainingError, train
    preset_name = out["preset"]
    out["compile_seconds"] = time.perf_counter() - t0
    out["gpu_bytes"] = model.gpu_bytes
    if post:
        post(f"training the {preset_name} preset for {seconds:g} s")
    reads = []              # (elapsed, step) at each read-back of losses
    try:
        async for ev in train(model, data, cfg):
            if ev["type"] == "step":
                if reads and reads[-1][0] == ev["elapsed"]:
                    reads[-1] = (ev["elapsed"], ev["step"])     # the same read-back: its last step
                else:
                    reads.append((ev["elapsed"], ev["step"]))
    except TrainingError as e:
        return {**out, "error": f"training did not run: {e}"}
    except GPUError as e:
        return {**out, "error": f"the GPU failed while training: {e}"}
    if len(reads) < 2:
        return {**out, "error": f"fewer than two read-backs of the loss in {seconds:g} s: give it more time"}
    (t_first, s_first), (t_last, s_last) = reads[0], reads[-1]
    step_s = (t_last - t_first) / (s_last - s_first)
    tps = out["tokens_per_step"] / step_s
    return {**out, "steps": s_last, "timed_steps": s_last - s_first, "step_ms": 1e3 * step_s, "tokens_per_s": tps,
            "gflops": tps * cfg.flops_per_token() / 1e9}
