"""Matrix products (shaders/matmul.wgsl): the four Conv1D layers and the tied lm_head, forward and backward.

    fc = await Conv1D.create(dev, M=B*T, K=C, N=4*C)              # Hugging Face GPT-2 Conv1D: W is (in, out)
    fc.forward(seq, out=h, inp=x, weight=w, bias=b)               # h (M, N) = x (M, K) @ w (K, N) + b (N,)
    fc.backward(seq, dinp=dx, dweight=dw, dbias=db, dout=dh, inp=x, weight=w)

    head = await LMHead.create(dev, M=B*T, C=C, Vp=Vp)             # tied: logits = x @ wte^T
    head.forward(seq, logits=lg, x=x, wte=wte)                     # lg (M, Vp) = x (M, C) @ wte (Vp, C)^T
    head.backward(seq, dx=dx, dwte=dwte, dlogits=dlg, x=x, wte=wte)

The backwards WRITE the input gradient (dinp, dx: the next op's layernorm backward adds it into the residual
stream) and ACCUMULATE the parameter gradients (dweight, dbias, dwte: grad += ..., so that micro-batches add up;
zero them once per optimizer step). Epilogues fuse the model's elementwise neighbours into the products: GELU after
c_fc (forward_epilogue="gelu": pre-activation and activation written at once; in training "gelu_keep": the
activation and GELU' of the pre-activation), the residual add after c_proj (forward_epilogue="residual"), and the
GELU's backward into mlp c_proj's dinp (dinp_gelu_grad="kept": times that GELU'; True: GELU' made there).

Both build on Matmul, one product of fixed shape and layout: out (M, N) [+]= op(A) (M, K) @ op(B) (K, N) [+ bias],
layout "nn", "nt" (B stored (N, K)) or "tn" (A stored (K, M)). Two kernels compute it: "tiled" (register-blocked,
workgroup-memory tiles, vec4 loads; every stored row length a multiple of 4) and "simple" (one thread per output,
any shape), which the tests hold the tiled one against. Tile sizes are override constants: default_tiles() picks
them per adapter and shape, and any Matmul takes its own. Where out is small and K long (the weight gradients), the
tiled kernel splits the reduction into slices run side by side (split-K, default_splits()) and a second pass adds
them up in order. Every output is a fixed-order fma chain, so results are bit-identical run to run. Operands beyond
the device's storage binding limit are split into row chunks. On an H100 (Vulkan) the GPT-2 small products run at
22-28 TFLOP/s, 47-60% of cuBLAS fp32: bench/bench_matmul.py, bench/results/matmul.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from tabgpt.gpu import Buffer, Device, GPUError, Sequence, best_run_seconds, env_switch, is_cpu_adapter
from tabgpt.ops.elementwise import MAX_GROUPS, bound_at_least, fold_grid, span

FILE = "matmul.wgsl"
LAYOUTS = ("nn", "nt", "tn")
SIMPLE_WG = 16        # matmul_simple is 16 x 16 threads
SUM_WG = 256          # matmul_split_sum: vec4s per workgroup
SPLIT_TARGET = 1024   # split-K aims at this many workgroups (about 8 per multiprocessor of a 132-SM H100)
BIAS_COLS = 64        # bias_grad_partial: columns per workgroup
BIAS_ROWS = 128       # bias_grad_partial: rows per block (one partial sum per block and column)
ROW_ALIGN = 64        # chunks start at multiples of 64 rows: 64 * 4 bytes * any row length is 256-byte aligned

# Tile shapes (override constants of matmul_tiled). On GPUs: 128 x 128 blocks, 8 x 8 outputs per thread, spread
# thread groups, register prefetch of the next K slice (12-24% faster on an H100 than without) and two copies of
# 8-deep tiles (DOUBLE_BUFFER: one barrier per slice; 16 KiB of workgroup memory, within WebGPU's default limit),
# the fastest of the shapes measured on an H100 (bench/results/matmul.md: 1-14% over one copy of 16-deep tiles;
# BK = 32, 128 x 64 blocks and two copies of 16-deep tiles were slower); 64 x 64 when even split-K leaves too few
# workgroups to fill the GPU (prefetch: 5-8% faster). Natively on GPUs the autotuner picks among these per shape.
# On lavapipe 64 x 64 blocks with 8 x 8 per thread were fastest (2-3x over 32 x 32 / 4 x 4); 16 deep natively, 8 in
# a browser (cpu_tiles).
TILES_LARGE = {"BM": 128, "BN": 128, "BK": 8, "TM": 8, "TN": 8, "SPREAD": True, "PREFETCH": True,
               "DOUBLE_BUFFER": True}
TILES_MEDIUM = {"BM": 64, "BN": 64, "BK": 8, "TM": 4, "TN": 4, "PREFETCH": True}
TILES_CPU = {"BM": 64, "BN": 64, "BK": 16, "TM": 8, "TN": 8}           # a CPU driver natively (lavapipe, SwiftShader)
TILES_CPU_BROWSER = {"BM": 64, "BN": 64, "BK": 8, "TM": 8, "TN": 8}    # a CPU driver in a browser (SwiftShader)


def cpu_tiles(dev: Device) -> dict:
    """The tiles of CPU drivers, where each barrier switches between a workgroup's threads (fibers of a few SIMD
    lanes), so that a longer slice of K between barriers pays natively: 16 deep (training 1.1x as fast as 8 on
    lavapipe and on SwiftShader). In a browser 8: on SwiftShader in Chromium 16 or 32 deep trained no faster and
    the model took 14 or 21 s to build instead of 11 (WebGPU zeroes every workgroup array at each workgroup's start,
    and larger arrays cost the browser's shader build)."""
    return dict(TILES_CPU if dev.backend == "wgpu-native" else TILES_CPU_BROWSER)


def default_tiles(dev: Device, M: int, N: int, K: int = 1) -> dict:
    """Tile sizes for an out (M, N) = (M, K) @ (K, N) product on this adapter (measured on an H100 and lavapipe;
    a starting point elsewhere). Large tiles wherever they, split-K included, make enough workgroups."""
    if is_cpu_adapter(dev):
        return cpu_tiles(dev)
    workgroups = -(-M // TILES_LARGE["BM"]) * -(-N // TILES_LARGE["BN"]) * max(1, min(16, K // 256))
    return dict(TILES_LARGE if workgroups >= 256 else TILES_MEDIUM)


def default_splits(dev: Device, workgroups: int, K: int) -> int:
    """Slices of the reduction for split-K: enough workgroups to fill a large GPU (a few per multiprocessor),
    each slice at least 256 long. CPU adapters gain nothing from it."""
    if is_cpu_adapter(dev):
        return 1
    return max(1, min(SPLIT_TARGET // max(1, workgroups), K // 256, 16))


_scratch: "weakref.WeakKeyDictionary[Device, weakref.WeakValueDictionary]" = weakref.WeakKeyDictionary()


def shared_scratch(dev: Device, nbytes: int) -> Buffer:
    """A split-K scratch buffer of at least nbytes: every product of a sequence runs one after another, so the
    products of all layers share one (the smallest that is large enough, else a new one). The pool holds them
    weakly: a buffer lives as long as a product that uses it (Buffer.shared: no model's or autotune's free() takes
    it; it goes with its last user, to the collector)."""
    pool = _scratch.setdefault(dev, weakref.WeakValueDictionary())
    fits = [(size, buf) for size, buf in pool.items() if size >= nbytes]     # strong references from here on
    if fits:
        return min(fits, key=lambda f: f[0])[1]
    buf = pool[nbytes] = dev.buffer(nbytes, "matmul-split-k")
    buf.shared = True     # not its first user's to free (GPT.free)
    return buf


# ---------------------------------------------------------------------------------------------
# Autotune: on a GPU, each product shape times a few tile shapes and split-K counts once and keeps the fastest.
# The choice is remembered per device, and natively also on disk per adapter (tune_file()), so that later runs
# (a resumed training) use the same kernels and so the same summation order: bit-identical continuation.
# TABGPT_AUTOTUNE=0 turns it off (the fixed per-adapter defaults of default_tiles / default_splits are used).

TUNE_TILES = [
    TILES_LARGE,                                                                   # 16 KiB of workgroup memory
    dict(TILES_LARGE, BK=16, DOUBLE_BUFFER=False),                                 # 16 KiB
    dict(TILES_LARGE, BK=16),                                                      # 32 KiB (where granted)
    dict(TILES_LARGE, TN=16),                                                      # 128 threads, 8 x 16 each
    {"BM": 128, "BN": 64, "BK": 16, "TM": 8, "TN": 8, "SPREAD": True, "PREFETCH": True},
    {"BM": 64, "BN": 128, "BK": 16, "TM": 8, "TN": 8, "SPREAD": True, "PREFETCH": True},
    # 12 x 16 threads: 3 workgroups of 192 threads fit an SM where 2 of 256 do, and 384 or 1536 columns (or rows)
    # are 4 or 16 blocks wide; on an H100 some weight gradients run 3-4% of cuBLAS faster than with 128 x 128.
    dict(TILES_LARGE, BN=96),                                                      # 14 KiB
    dict(TILES_LARGE, BM=96),
    # 12 x 12 threads, 96 x 96 blocks: more, smaller workgroups where 128-wide blocks leave multiprocessors idle
    # in the last wave (an out of 8192 x 384 is 192 blocks of 128 x 128, 344 of 96 x 96).
    dict(TILES_LARGE, BM=96, BN=96),                                               # 12 KiB
    TILES_MEDIUM,
    # 128 threads, each slice's 8 rows written out (LITERAL): on an H200 the written-out rows lose at 128 x 128
    # (73-79% of cuBLAS against 82-88% as a loop: bench/results/h200/run72_midfence.txt) but win in blocks of
    # 128 x 64 or 64 x 128 (nn 8192x1536x384 88% -> 90%, nt 8192x4096x384 82% -> 85%: run73_literal_small_wg.txt),
    # and the autotuner picks them for every product of the browser preset (70-98% of cuBLAS where the loop gave
    # 62-89%; training +3.7%: run74_matmul_browser.txt, run74_train_*.txt).
    dict(TILES_LARGE, BN=64, LITERAL=True),                                        # 12 KiB
    dict(TILES_LARGE, BM=64, LITERAL=True),
]
# Not among them: 128 x 64 / 8 x 4 and 64 x 64 / 8 x 8 (more, smaller workgroups an SM for small outs). Autotuned
# alone, two browser-preset products ran faster with them (tn 384x384x8192 20.6 -> 22.4 TFLOP/s, nt 8192x384x1152
# 27.0 -> 29.4: run33_tile_probe.txt), but training was no faster (397,361 against 398,836 tokens/s, four runs
# each: run35_train_*.txt), and every candidate costs each product's autotune time.

# Then the fastest shape is timed again with each of these changes (and split-K after that). FENCE (the next
# row's tile reads after the row's first fma) moves single products on an H100 by -4 to +14 points of cuBLAS
# either way, depending on the shape (bench/results/h100/fence_products.txt, phi_prefetch.txt). ROW_STEP off (the
# next row's tile indices made from the row number, as before 2026-12-04, instead of stepped by one add per row):
# on an H200 stepping made the nn and tn products measured 2-9% faster, two nt products 0-2% slower and nt
# 8192x768x3072 20% slower (bench/results/h200/run12_loop_forms.txt, run12_row_step.txt).
TUNE_REFINE = [{"FENCE": True}, {"ROW_STEP": False}]
# Then the fastest TUNE_SPLIT_SHAPES tile shapes are timed with every split-K count of TUNE_SPLITS that the
# reduction allows (slices at least 128 long): the count decides how full the last wave of workgroups is, which
# the product's shape alone does not tell. Three shapes: a refinement that wins at the default count leaves its
# unrefined shape and one other in the running (on an H200, 4096^3 kept ROW_STEP off at 77% of cuBLAS when only
# two shapes were timed so, where ROW_STEP on with one slice measures 79%: bench/results/h200/run13_*).
TUNE_SPLITS = (1, 2, 3, 4, 6, 8, 12, 16)
TUNE_SPLIT_SHAPES = 3
# Then the fastest shape with every other count up to TUNE_FINE_SPLITS: the count whose workgroups fill the GPU's
# last wave (blocks x count just under a multiple of the workgroups it runs at once, which WebGPU does not tell)
# is found by timing. On an H200 the browser preset's weight gradients, 36 or 9 blocks of 128 x 128, ran 7 and 29
# slices 5-30% faster than the best count of TUNE_SPLITS (bench/results/h200/run9_splits.txt).
TUNE_FINE_SPLITS = 32
TUNE_FINE_SCRATCH = 256 * 2**20   # beyond TUNE_SPLITS, only counts whose scratch (slices x M x N f32) fits this
# Then the TUNE_RUNOFF fastest distinct candidates are timed again, in turn, TUNE_RUNOFF_ROUNDS times, and each keeps
# its best time of all: a single short timing carries about a point of noise (on an H200 it once kept split-K 3
# at 76% of cuBLAS for 4096^3 where split-K 1 measured 77%), and interleaving the finalists spreads any drift of
# the clocks over all of them.
TUNE_RUNOFF = 3
TUNE_RUNOFF_ROUNDS = 3
TUNE_MIN_FLOPS = 1e9      # smaller products (decoding, short prompts) keep the defaults
TUNE_SECONDS = 0.01       # time per timed submission of one candidate (shorter ones misranked on an H100)
TUNE_TRIALS = 3

_tuned: "weakref.WeakKeyDictionary[Device, dict]" = weakref.WeakKeyDictionary()


def tune_file() -> Path:
    return Path(os.environ.get("TABGPT_CACHE", "~/.cache/tabgpt")).expanduser() / "matmul-tune.json"


def pairs_enabled() -> bool:
    """Whether products that can share a dispatch do (MatmulPair's weight gradients, BatchedMatmul's pair of the
    attention backward); TABGPT_MATMUL_PAIRS=0 makes them apart (the same results)."""
    return env_switch("TABGPT_MATMUL_PAIRS", default=True)


def bias_row_fits(tiles: dict) -> bool:
    """Whether a tiled kernel with these tiles can make a bias row: a thread for each of a block's BN/4 column vec4s
    (matmul.wgsl BIAS_ROW's row groups of threads)."""
    return (tiles["BM"] // tiles["TM"]) * (tiles["BN"] // tiles["TN"]) >= tiles["BN"] // 4


def autotune_enabled(dev: Device, flops: float | None = None) -> bool:
    """Autotune on GPUs natively (not on CPU adapters, where timings say little; not in the browser, where one
    compile costs more than it would save), products of at least TUNE_MIN_FLOPS (when flops is given), unless
    TABGPT_AUTOTUNE=0; TABGPT_AUTOTUNE=force tunes every tiled product on any adapter (tests use it)."""
    mode = os.environ.get("TABGPT_AUTOTUNE", "1")
    if mode not in ("0", "1", "force"):
        raise GPUError(f"TABGPT_AUTOTUNE must be 0 (off), 1 (on GPUs, the default) or force, got {mode!r}")
    if mode == "force":
        return True
    if mode == "0" or (flops is not None and flops < TUNE_MIN_FLOPS):
        return False
    return dev.backend == "wgpu-native" and not is_cpu_adapter(dev)


TUNE_DATA = ("normal", "zeros")     # the default first
# The flush before each timed run of a candidate (TABGPT_TUNE_FLUSH=1): a copy between two buffers of this size,
# more than the last-level cache of the GPUs it runs on (50 MB on an H100), within WebGPU's default buffer size.
TUNE_FLUSH_BYTES = 64 * 2**20
TUNE_MARGIN_MAX = 0.1


def tune_data() -> str:
    """What the autotuner's trial operands hold: TABGPT_AUTOTUNE_DATA, "normal" (the default: N(0, 1) values made
    on the GPU by init.wgsl, like the data a product meets in training) or "zeros" (buffers as created, the default
    until 2026-12-05). On an H100, 3 of 10 fresh tunings on zeros trained the browser preset below 416,000 tokens/s
    (410,574-415,058) and none of 10 on N(0, 1) did (418,810-430,265; BENCHMARKS.md, 2026-12-05 night)."""
    mode = os.environ.get("TABGPT_AUTOTUNE_DATA", TUNE_DATA[0])
    if mode not in TUNE_DATA:
        raise GPUError(f"TABGPT_AUTOTUNE_DATA must be normal (the default) or zeros, got {mode!r}")
    return mode


def tune_flush() -> bool:
    """TABGPT_TUNE_FLUSH=1: each timed run of a candidate starts by copying TUNE_FLUSH_BYTES between two buffers,
    so that the product meets its operands (and its split-K slabs) out of the cache, as in a training step where
    other products' data came in between. An A/B switch (off by default), for bench/probe_ab.py to weigh."""
    return env_switch("TABGPT_TUNE_FLUSH")


def tune_margin() -> float:
    """TABGPT_TUNE_MARGIN=F (0 to TUNE_MARGIN_MAX; 0, the default, is off): of the runoff's finalists within this
    fraction of the fastest, the one with the fewest split-K slices is kept (the fastest among those). An A/B
    switch: the tunings that trained slowest on an H100 split the lm_head's weight gradient into the most slices
    (BENCHMARKS.md, 2026-12-05 evening)."""
    env = os.environ.get("TABGPT_TUNE_MARGIN", "0")
    try:
        margin = float(env)
    except ValueError:
        margin = -1.0
    if not 0.0 <= margin <= TUNE_MARGIN_MAX:
        raise GPUError(f"TABGPT_TUNE_MARGIN must be a fraction from 0 (off, the default) to {TUNE_MARGIN_MAX}, "
                       f"e.g. 0.01, got {env!r}")
    return margin


def pick_finalist(finalists: list, margin: float = 0.0):
    """The autotuner's pick of [seconds, tiles, splits] entries: the fastest; with a margin, the fewest splits of
    those within margin of the fastest, and the fastest of these."""
    best = min(finalists, key=lambda r: r[0])
    if not margin:
        return best
    return min((f for f in finalists if f[0] <= best[0] * (1 + margin)), key=lambda r: (r[2], r[0]))


async def fill_tune_operands(dev: Device, buffers: list[Buffer], seed: int = 1):
    """Fill each buffer with N(0, 1) floats on the GPU (init.wgsl fill_normal, a stream per buffer)."""
    k = await dev.kernel("init.wgsl", "fill_normal")
    seq = dev.sequence("tune-operands")
    for i, buf in enumerate(buffers):
        n = buf.size // 4
        ip = dev.uniform(struct.pack("<2I2f", n, (seed + i * 0x9E3779B1) & 0xFFFFFFFF, 1.0, 0.0), "tune-fill")
        seq.dispatch(k, fold_grid(-(-n // 256)), ip=ip, dst=buf)
    await seq.build()
    seq.run(1)
    await dev.sync()


def _adapter_key(dev: Device) -> str:
    i = dev.info
    # The candidates' fingerprint: a file tuned among other candidates is tuned again.
    cands = hashlib.sha1(json.dumps([TUNE_TILES, TUNE_REFINE, TUNE_SPLITS, TUNE_SPLIT_SHAPES, TUNE_FINE_SPLITS,
                                     TUNE_FINE_SCRATCH, TUNE_RUNOFF, TUNE_RUNOFF_ROUNDS],
                                    sort_keys=True).encode()).hexdigest()[:8]
    mode = tune_data()
    data = "" if mode == "zeros" else f" / data {mode}"    # zeros: the keys of files made before they had a choice
    data += " / flush" if tune_flush() else ""
    margin = tune_margin()
    data += f" / margin {margin:g}" if margin else ""
    return " / ".join(str(i.get(k, "")) for k in ("vendor", "device", "description", "backend_type")) + \
        f" / checks {getattr(dev, 'shader_checks', 'all')} / candidates {cands}{data}"


def _load_tune_file(dev: Device) -> dict:
    try:
        data = json.loads(tune_file().read_text())
        return dict(data.get(_adapter_key(dev), {}))
    except (OSError, ValueError, AttributeError):
        return {}


def _save_tune_file(dev: Device, choices: dict):
    path = tune_file()
    try:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data[_adapter_key(dev)] = choices
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass                      # a read-only home: tuning then happens once per process


async def autotune(dev: Device, M: int, N: int, K: int, layout: str, candidates: list | None = None,
                   persist: bool = True, bias_row: bool = False,
                   pair: tuple[int, int] | None = None) -> tuple[dict, int]:
    """(tiles, splits) of the fastest candidate for an out (M, N) = op(A) (M, K) @ op(B) (K, N) product on dev,
    timed on N(0, 1) operands (or zero-filled ones: tune_data); remembered per device (and on disk when persist).
    pair (M2, N2): the same for a MatmulPair of this tn product and an (M2, N2) one with the same K, timed
    together."""
    choices = _tuned.get(dev)
    if choices is None:
        choices = _tuned[dev] = _load_tune_file(dev) if persist else {}
    key = f"{layout}:{M}x{N}x{K}" + ("+bias_row" if bias_row else "") + (f"+pair:{pair[0]}x{pair[1]}" if pair else "")
    if key in choices:
        try:
            t, splits = choices[key]
            check_tiles(dev, t)                 # a file from another version or device may hold stale tiles
            return dict(t), int(splits)
        except (GPUError, TypeError, ValueError, KeyError):
            del choices[key]
    with dev.recording() as trial:    # its operands and the trial products' own buffers, given back when it is done
        try:
            return await _tune(dev, M, N, K, layout, candidates, persist, bias_row, pair, choices, key)
        finally:
            dev.free(*trial)


async def _tune(dev, M, N, K, layout, candidates, persist, bias_row, pair, choices, key) -> tuple[dict, int]:
    """autotune's timings, for a shape it has no choice for."""
    a_shape = (K, M) if layout == "tn" else (M, K)
    b_shape = (N, K) if layout == "nt" else (K, N)
    a = dev.buffer(4 * a_shape[0] * a_shape[1], "tune-a")
    b = dev.buffer(4 * b_shape[0] * b_shape[1], "tune-b")
    out = dev.buffer(4 * (M + bias_row) * N, "tune-out")
    flops = 2.0 * M * N * K
    if pair:
        M2, N2 = pair
        a2, b2 = dev.buffer(4 * K * M2, "tune-a2"), dev.buffer(4 * K * N2, "tune-b2")
        out2 = dev.buffer(4 * (M2 + bias_row) * N2, "tune-out2")
        flops += 2.0 * M2 * N2 * K
    if tune_data() == "normal":
        await fill_tune_operands(dev, [a, b] + ([a2, b2] if pair else []))
    flush = tune_flush()
    flush_seconds = 0.0        # the flush's own time, taken off each timing (so the log and margin are the product's)
    if flush:
        nbytes = min(TUNE_FLUSH_BYTES, dev.limits["max-buffer-size"]) // 4 * 4
        flush_from, flush_to = dev.buffer(nbytes, "tune-flush-from"), dev.buffer(nbytes, "tune-flush-to")
        seq = await dev.sequence("tune-flush").copy(flush_from, flush_to).build()
        flush_seconds = await best_run_seconds(dev, seq, 10, TUNE_TRIALS)
    margin = tune_margin()
    results = []

    async def build(tiles, splits):
        """(sequence running the candidate once, submissions per timing, the splits Matmul.create kept)."""
        seq = dev.sequence("autotune")
        if flush:
            seq.copy(flush_from, flush_to)
        if pair:
            mm = await MatmulPair.create(dev, (M, N), pair, K, accumulate=False, bias_row=bias_row, tiles=tiles,
                                         splits=splits)
            mm.dispatch(seq, out1=out, a1=a, b1=b, out2=out2, a2=a2, b2=b2)
        else:
            mm = await Matmul.create(dev, M, N, K, layout, tiles=tiles, splits=splits, bias_row=bias_row)
            mm.dispatch(seq, out=out, a=a, b=b)
        await seq.build()
        seq.run(1)
        await dev.sync()
        t0 = time.perf_counter()
        seq.run(1)
        await dev.sync()
        return seq, max(1, min(200, int(TUNE_SECONDS / max(time.perf_counter() - t0, 1e-6)))), mm.splits

    async def clock(seq, repeat):
        return max(await best_run_seconds(dev, seq, repeat, TUNE_TRIALS) - flush_seconds, 1e-9)

    async def time_one(tiles, splits):
        seq, repeat, kept = await build(tiles, splits)
        results.append((await clock(seq, repeat), tiles, kept))
        return kept

    for tiles in candidates or TUNE_TILES:
        try:
            check_tiles(dev, tiles)
        except GPUError:
            continue
        if bias_row and not bias_row_fits(tiles):
            continue
        await time_one(dict(tiles), None)
    fallback = not results
    if fallback:                                # no candidate fits this device: the fixed default, as it is
        await time_one(default_tiles(dev, M, N, K), None)
    best, tiles, splits = min(results, key=lambda r: r[0])
    for change in [] if fallback else TUNE_REFINE:
        refined = dict(tiles, **change)
        if refined != tiles:
            try:
                check_tiles(dev, refined)
            except GPUError:
                continue
            await time_one(refined, None)
    # split-K: every count of TUNE_SPLITS for the fastest few tile shapes (each timed so far at its default count),
    # then every count up to TUNE_FINE_SPLITS for the fastest of all; slices at least 128 long
    def fastest_shapes():
        shapes = []
        for _, t, _ in sorted(results, key=lambda r: r[0]):
            if t not in shapes:
                shapes.append(t)
        return shapes

    async def time_splits(t, counts):
        # the most slices first: the later, smaller scratch buffers fit in its (shared_scratch)
        done = {s for _, u, s in results if u == t}
        for s in sorted(counts, reverse=True):
            if s > max(TUNE_SPLITS) and 4 * s * (M + bias_row) * N > TUNE_FINE_SCRATCH:
                continue
            if s <= max(1, K // 128) and s not in done:
                done.add(s)
                done.add(await time_one(dict(t), s))      # the count Matmul.create kept (memory may cap it)

    for t in fastest_shapes()[:TUNE_SPLIT_SHAPES]:
        await time_splits(t, TUNE_SPLITS)
    await time_splits(fastest_shapes()[0], range(1, TUNE_FINE_SPLITS + 1))
    # the runoff: the fastest few again, in turn, each keeping its best time
    finalists = runoff_finalists(results, TUNE_RUNOFF)
    runs = [await build(dict(f[1]), f[2]) for f in finalists]
    for _ in range(TUNE_RUNOFF_ROUNDS):
        for f, (seq, repeat, _) in zip(finalists, runs):
            f[0] = min(f[0], await clock(seq, repeat))
    del runs
    best, tiles, splits = pick_finalist(finalists or results, margin)
    dev.tune_finalists[key] = sorted(finalists, key=lambda f: f[0])    # for bench/tune_in_steps.py
    choices[key] = [tiles, splits]
    if persist and dev.backend == "wgpu-native":
        _save_tune_file(dev, choices)
    dev.tune_log.append(f"{key}: {flops / best / 1e9:,.0f} GFLOP/s with {tiles_label(tiles)}, split-K {splits} "
                        f"(of {len(results)} timed; {len(finalists)} in the runoff)")
    return dict(tiles), int(splits)


def runoff_finalists(results: list, n: int) -> list[list]:
    """The n fastest distinct (tiles, splits) of the autotune's timings [(seconds, tiles, splits)], fastest first,
    as [seconds, tiles, splits] lists; none where fewer than two would run (nothing to compare)."""
    finalists = []
    for r in sorted(results, key=lambda r: r[0]):
        if len(finalists) < n and all((r[1], r[2]) != (f[1], f[2]) for f in finalists):
            finalists.append(list(r))
    return finalists if len(finalists) > 1 else []


# The optional flags of a tile shape (override constants of matmul_tiled): the value a label names, and the label.
TILE_FLAGS = {"SPREAD": (True, "spread"), "PREFETCH": (True, "prefetch"), "DOUBLE_BUFFER": (True, "double"),
              "ROWS": (True, "rows"), "FENCE": (True, "fence"), "ROW_STEP": (False, "rowindex"),
              "LITERAL": (True, "literal")}
# Flags that are not override constants but conditional source (gpu.Device.kernel's defines): LITERAL writes the
# loop over a slice's BK rows out as BK copies (`// #unroll LITERAL BK` in matmul.wgsl, gpu.unroll_loops).
SOURCE_FLAGS = ("LITERAL",)


def kernel_args(tiles: dict, consts: dict | None = None, defines=()) -> tuple[dict, frozenset]:
    """(override constants, defines) of matmul_tiled for tiles: consts with the tiles' shape and override flags,
    defines with the source flags that are set."""
    c = dict(consts or {}, **{k: v for k, v in tiles.items() if k not in SOURCE_FLAGS})
    return c, frozenset(defines) | {k for k in SOURCE_FLAGS if tiles.get(k)}


def tiles_label(t: dict) -> str:
    flags = "".join(f" {label}" for f, (value, label) in TILE_FLAGS.items() if f in t and t[f] == value)
    return f"{t['BM']}x{t['BN']}x{t['BK']} / {t['TM']}x{t['TN']}{flags}"


def check_tiles(dev: Device, t: dict):
    """Raise GPUError unless tile shape t (BM, BN, BK, TM, TN; the optional flags of TILE_FLAGS) is valid here.
    DOUBLE_BUFFER needs PREFETCH and keeps two copies of the tiles: 8*BK*(BM+BN) bytes of workgroup memory instead
    of 4*BK*(BM+BN)."""
    BM, BN, BK, TM, TN = (t[k] for k in ("BM", "BN", "BK", "TM", "TN"))
    threads = (BM // TM) * (BN // TN)
    problems = []
    unknown = set(t) - {"BM", "BN", "BK", "TM", "TN"} - set(TILE_FLAGS)
    if unknown:
        problems.append(f"unknown tile keys {sorted(unknown)}")
    if t.get("PREFETCH") and max(BK * BM, BK * BN) // 4 > 4 * threads:
        problems.append("PREFETCH holds at most 4 vec4s per thread and operand: BK*max(BM, BN)/4 <= 4 * threads")
    if t.get("DOUBLE_BUFFER") and not t.get("PREFETCH"):
        problems.append("DOUBLE_BUFFER needs PREFETCH")
    if TM not in (4, 8) or TN not in (4, 8, 16):
        problems.append("TM must be 4 or 8, TN 4, 8 or 16")
    if BM % TM or BN % TN or BK % 4 or BK <= 0:
        problems.append("BM % TM, BN % TN and BK % 4 must be 0")
    if threads > dev.limits["max-compute-invocations-per-workgroup"]:
        problems.append(f"{threads} threads per workgroup")
    shared = (8 if t.get("DOUBLE_BUFFER") else 4) * BK * (BM + BN)
    if shared > dev.limits["max-compute-workgroup-storage-size"]:
        problems.append(f"{shared} bytes of workgroup memory" + (" (DOUBLE_BUFFER: two copies of the tiles)"
                                                                 if t.get("DOUBLE_BUFFER") else ""))
    if problems:
        raise GPUError(f"tiles {t} do not fit this device: " + "; ".join(problems))


class Matmul:
    """out (M, N) [+]= op(A) (M, K) @ op(B) (K, N) [+ bias (N,)] for one shape and layout.

    layout "nn": A (M, K), B (K, N); "nt": A (M, K), B (N, K); "tn": A (K, M), B (K, N). All f32, row-major.
    accumulate=True adds into out (out += ...); otherwise out is written.
    epilogue (tiled kernel only), applied last to y, the final value of out, with aux (M, N) laid out as out:
    "gelu": out = y and aux = gelu(y); "residual": out = y + aux; "gelu_grad": out = y * gelu'(aux) (tanh GELU);
    "gelu_keep": out = gelu'(y) and aux = gelu(y) (one tanh for both: a training forward keeps, in place of the
    pre-activation, what the backward needs of it); "mul": out = y * aux (times the gelu' that "gelu_keep" kept).
    """

    # override EPILOGUE of matmul.wgsl
    EPILOGUES = {"gelu": 1, "residual": 2, "gelu_grad": 3, "gelu_keep": 4, "mul": 5}

    def __init__(self, dev, M, N, K, layout, bias, variant, tiles, splits, kernels, chunks, no_bias, scratch,
                 epilogue=None, no_aux=None, bias_row=False):
        self.dev, self.M, self.N, self.K = dev, M, N, K
        self.layout, self.bias, self.variant, self.tiles, self.splits = layout, bias, variant, tiles, splits
        self.k = kernels          # "product" (+ "sum" with splits): the first chunk's; "*_rest": middle chunks';
        #                           "*_last": the last chunk's (where chunks add up, tn, only it has the epilogue)
        self.chunks = chunks      # [(start row, rows, params uniform, product grid, sum grid)]
        self.no_bias = no_bias    # bound in place of the bias when there is none (never read)
        self.scratch = scratch    # (splits, rows, N) f32 partial products, or None
        self.epilogue = epilogue  # None or a key of EPILOGUES
        self.no_aux = no_aux      # bound in place of aux without an epilogue (never read)
        self.bias_row = bias_row  # out has a last row more: the column sums of B (a Conv1D's bias gradient)
        self.out_rows = M + 1 if bias_row else M

    @classmethod
    async def create(cls, dev: Device, M: int, N: int, K: int, layout: str = "nn", bias: bool = False,
                     accumulate: bool = False, variant: str | None = None, tiles: dict | None = None,
                     splits: int | None = None, max_binding: int | None = None,
                     epilogue: str | None = None, bias_row: bool = False) -> "Matmul":
        """variant None picks "tiled" where every stored row length is a multiple of 4, else "simple".
        splits: the tiled kernel cuts the reduction into this many slices run side by side (more workgroups when
        out is small), then sums them in order; None picks it per adapter and shape. max_binding (bytes) caps the
        bytes bound per operand below the device limit (tests use it to force row chunks). epilogue: None or a
        key of EPILOGUES (see the class docstring; dispatch then takes aux).
        bias_row (layout tn, the weight gradient): out has M + 1 rows and the last one (+)= the column sums of B
        (summed from the staged tiles by the first block row's workgroups): a Conv1D's bias gradient in the same
        pass as its weight gradient, where the bias lies right after the weight (out then binds both)."""
        if layout not in LAYOUTS:
            raise GPUError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if epilogue is not None and epilogue not in cls.EPILOGUES:
            raise GPUError(f"epilogue must be None or one of {sorted(cls.EPILOGUES)}, got {epilogue!r}")
        if min(M, N, K) <= 0:
            raise GPUError(f"matmul sizes must be positive, got M={M}, N={N}, K={K}")
        a_row = M if layout == "tn" else K
        b_row = K if layout == "nt" else N
        aligned = a_row % 4 == 0 and b_row % 4 == 0 and N % 4 == 0
        variant = variant or ("tiled" if aligned else "simple")
        if variant not in ("tiled", "simple"):
            raise GPUError(f"variant must be 'tiled' or 'simple', got {variant!r}")
        if variant == "tiled" and not aligned:
            raise GPUError(f"the tiled matmul needs row lengths that are multiples of 4 (layout {layout}: "
                           f"A rows {a_row}, B rows {b_row}, out rows {N}); use variant='simple'")
        if bias_row and (layout != "tn" or variant != "tiled" or epilogue or bias):
            raise GPUError("bias_row needs the tiled kernel, layout 'tn', no bias and no epilogue")
        if epilogue and variant != "tiled":
            raise GPUError(f"the {epilogue!r} epilogue needs the tiled kernel (row lengths that are multiples of 4; "
                           f"layout {layout}: A rows {a_row}, B rows {b_row}, out rows {N})")
        consts = {"A_T": layout == "tn", "B_T": layout == "nt"}
        if bias_row:
            consts["BIAS_ROW"] = True
        Mo = M + 1 if bias_row else M                      # rows of out
        auto = tiles is None and splits is None and autotune_enabled(dev, 2.0 * M * N * K)
        if variant == "tiled" and (tiles == "auto" or auto):
            tiles, splits = await autotune(dev, M, N, K, layout, bias_row=bias_row)
        if variant == "tiled":
            tiles = dict(tiles or default_tiles(dev, M, N, K))
            check_tiles(dev, tiles)
            if bias_row and not bias_row_fits(tiles):
                raise GPUError(f"bias_row needs a thread for each of the block's {tiles['BN'] // 4} column vec4s; "
                               f"tiles {tiles_label(tiles)} have fewer")
            consts, defines = kernel_args(tiles, consts)
            entry, bm, bn, bk = "matmul_tiled", tiles["BM"], tiles["BN"], tiles["BK"]
        else:
            tiles, defines = None, frozenset()
            entry, bm, bn, bk = "matmul_simple", SIMPLE_WG, SIMPLE_WG, 1
        gx = -(-N // bn)
        if gx > MAX_GROUPS:
            raise GPUError(f"N = {N} needs {gx} workgroups along x, more than {MAX_GROUPS}")

        # Row chunks: split the long dimension (out rows for nn/nt, the reduction for tn) so that every operand
        # fits one binding and the grid fits 65535 rows of workgroups. Chunks of a tn reduction add into out.
        limit = min(dev.limits["max-storage-buffer-binding-size"], max_binding or 1 << 62)
        if layout == "tn":
            long, per_row, fixed = K, 4 * max(M, N), 4 * Mo * N     # A and B rows of the reduction; out whole
        else:
            long, per_row, fixed = M, 4 * max(K, N), 4 * K * N      # A and out rows; B whole
        if fixed > limit:
            raise GPUError(f"a {M}x{N}x{K} {layout} matmul binds {fixed} bytes at once, over the limit of {limit}")
        rows = limit // per_row
        if layout != "tn":
            rows = min(rows, MAX_GROUPS * bm)
        if rows < long:
            rows = rows // ROW_ALIGN * ROW_ALIGN
            if rows == 0:
                raise GPUError(f"one {ROW_ALIGN}-row chunk of a {M}x{N}x{K} matmul exceeds the binding limit {limit}")
        rows = min(rows, long)
        if layout == "tn" and -(-Mo // bm) > MAX_GROUPS:
            raise GPUError(f"M = {M} needs {-(-Mo // bm)} workgroups along y, more than {MAX_GROUPS}")
        out_rows = Mo if layout == "tn" else rows         # the largest chunk's rows of out
        red_len = min(rows, K) if layout == "tn" else K    # the largest chunk's reduction length

        # Split-K: slices of the reduction as grid z, each into its own (rows, N) slab of a scratch buffer.
        if variant == "simple":
            splits = 1
        elif splits is None:
            splits = default_splits(dev, gx * -(-out_rows // bm), red_len)
        splits = max(1, min(int(splits), -(-red_len // bk), limit // (4 * out_rows * N)))
        chunks = []
        for start in range(0, long, rows):
            n = min(rows, long - start)
            cm, ck = (Mo, n) if layout == "tn" else (n, K)
            kc = -(-ck // (splits * bk)) * bk if splits > 1 else ck   # reduction length per slice
            params = dev.uniform(struct.pack("<4I", cm, N, ck, kc), f"matmul-{layout}-params")
            gy = -(-(M if layout == "tn" else n) // bm)      # bias_row's extra row needs no block row of its own
            chunks.append((start, n, params, (gx, gy, -(-ck // kc)), fold_grid(-(-cm * N // 4 // SUM_WG))))

        # The epilogue (bias, accumulate, then EPILOGUE) belongs to the product, or with split-K to the sum of the
        # slices. Later chunks of a tn reduction add into what the first wrote, and add the bias no more; there
        # only the last chunk applies EPILOGUE (to the whole sum). EPILOGUE is passed only when set (kernels
        # without an epilogue stay those compiled before it existed).
        more = layout == "tn" and len(chunks) > 1
        first = dict(HAS_BIAS=bias, ACCUMULATE=accumulate)
        rest = dict(HAS_BIAS=bias and not more, ACCUMULATE=accumulate or more)
        last = rest
        if epilogue:
            ep = {"EPILOGUE": cls.EPILOGUES[epilogue]}
            last = dict(rest, **ep)
            if not more:
                first, rest = dict(first, **ep), dict(rest, **ep)
        kernels = {}
        if splits == 1:
            kernels["product"] = await dev.kernel(FILE, entry, dict(consts, **first), defines=defines)
            kernels["product_rest"] = await dev.kernel(FILE, entry, dict(consts, **rest), defines=defines)
            kernels["product_last"] = await dev.kernel(FILE, entry, dict(consts, **last), defines=defines)
            scratch = None
        else:
            kernels["product"] = kernels["product_rest"] = kernels["product_last"] = \
                await dev.kernel(FILE, entry, consts, defines=defines)
            kernels["sum"] = await dev.kernel(FILE, "matmul_split_sum", first)
            kernels["sum_rest"] = await dev.kernel(FILE, "matmul_split_sum", rest)
            kernels["sum_last"] = await dev.kernel(FILE, "matmul_split_sum", last)
            scratch = shared_scratch(dev, 4 * splits * out_rows * N)
        no_bias = None if bias else dev.buffer(16, "matmul-no-bias")
        no_aux = None if epilogue else dev.buffer(16, "matmul-no-aux")
        return cls(dev, M, N, K, layout, bias, variant, tiles, splits, kernels, chunks, no_bias, scratch,
                   epilogue, no_aux, bias_row)

    def dispatch(self, seq: Sequence, out, a, b, bias=None, aux=None):
        """Append the product: out (M, N) [+]= op(a) @ op(b) [+ bias (N,)], then the epilogue with aux (M, N)
        (a buffer other than out). One or two dispatches per chunk."""
        M, N, K, layout = self.M, self.N, self.K, self.layout
        a_shape = (K, M) if layout == "tn" else (M, K)
        b_shape = (N, K) if layout == "nt" else (K, N)
        spans = {}
        for name, x, shape in (("out", out, (self.out_rows, N)), ("a", a, a_shape), ("b", b, b_shape),
                               ("bias", bias, (N,)), ("aux", aux, (M, N))):
            if x is None:
                if name == "aux" and self.epilogue:
                    raise GPUError(f"matmul {layout} {M}x{N}x{K} with the {self.epilogue!r} epilogue: pass aux")
                if name not in ("bias", "aux") or self.bias and name == "bias":
                    raise GPUError(f"matmul {layout} {M}x{N}x{K}: pass {name}")
                continue
            if name == "bias" and not self.bias:
                raise GPUError("this matmul was created with bias=False: create it with bias=True to add one")
            if name == "aux" and not self.epilogue:
                raise GPUError("this matmul has no epilogue: create it with epilogue=... to pass aux")
            spans[name] = bound_at_least(x, shape, f"matmul {layout} {M}x{N}x{K}", name)
        if bias is None:
            bias = self.no_bias           # never read (HAS_BIAS false), but the layout has the binding
        if aux is None:
            aux = self.no_aux             # never read (EPILOGUE 0), likewise
        elif spans["aux"][0] is spans["out"][0]:
            raise GPUError(f"matmul {layout} {M}x{N}x{K}: aux and out must be different buffers")
        rows_view = lambda name, start, rows, width: spans[name][0].view(  # noqa: E731
            spans[name][1] + 4 * start * width, 4 * rows * width)
        last = len(self.chunks) - 1
        for i, (start, rows, params, grid, sum_grid) in enumerate(self.chunks):
            if len(self.chunks) == 1:
                views = {"out": out, "a": a, "b": b, "bias": bias, "aux": aux}
            elif layout == "tn":          # rows of the reduction: of A (K, M) and of B (K, N); out and aux whole
                views = {"out": out, "bias": bias, "aux": aux, "a": rows_view("a", start, rows, M),
                         "b": rows_view("b", start, rows, N)}
            else:                         # rows of out: of A (M, K), of out (M, N) and of aux (M, N)
                views = {"b": b, "bias": bias, "a": rows_view("a", start, rows, K),
                         "out": rows_view("out", start, rows, N),
                         "aux": rows_view("aux", start, rows, N) if self.epilogue else aux}
            rest = "" if i == 0 else "_last" if i == last else "_rest"
            if self.variant == "simple":
                seq.dispatch(self.k["product" + rest], grid, mp=params, **views)
            elif self.splits == 1:
                seq.dispatch(self.k["product" + rest], grid, mp=params, **{k + "4": v for k, v in views.items()})
            else:
                cm = self.out_rows if layout == "tn" else rows
                slabs = self.scratch.view(0, 4 * grid[2] * cm * N)
                seq.dispatch(self.k["product"], grid, mp=params, a4=views["a"], b4=views["b"], bias4=views["bias"],
                             out4=slabs, aux4=views["aux"])   # EPILOGUE 0 here: aux4 bound, never touched
                seq.dispatch(self.k["sum" + rest], sum_grid, mp=params, split4=slabs, out4=views["out"],
                             bias4=views["bias"], aux4=views["aux"])


class MatmulPair:
    """Two weight-gradient products with the same reduction length K in ONE dispatch (matmul_tiled GROUPED), then
    both summed from their split-K slabs by one more (matmul_split_sum GROUPED):

        out1 (M1 [+1], N1) [+]= A1 (K, M1)^T @ B1 (K, N1),   out2 (M2 [+1], N2) [+]= A2 (K, M2)^T @ B2 (K, N2)

    (layout tn; bias_row as Matmul's: each out has a last row more, the column sums of its B). Two products that
    each fill a wave of workgroups or less fill more of the GPU together. Each member is a Matmul with the same
    tiles and split count (its uniform and checks); the pair adds the grouped product and sum kernels and one
    scratch for both members' slabs. Every output is the same fma chain, and the same sum of slices in the same
    order, as its member's alone: bit-identical."""

    def __init__(self, dev, m1, m2, kernel, grid, params2, scratch, slabs, sum_kernel, sum_grid):
        self.dev, self.m1, self.m2, self.kernel, self.grid = dev, m1, m2, kernel, grid
        self.params2, self.scratch, self.slabs = params2, scratch, slabs   # slabs: each member's (offset, bytes)
        self.sum_kernel, self.sum_grid = sum_kernel, sum_grid
        self.tiles, self.splits = m1.tiles, m1.splits

    @classmethod
    async def create(cls, dev: Device, shape1: tuple[int, int], shape2: tuple[int, int], K: int,
                     accumulate: bool = True, bias_row: bool = False, tiles: dict | None = None,
                     splits: int | None = None) -> "MatmulPair":
        """shape1, shape2: (M, N) of the two products (without bias_row's extra row). tiles and splits None: the
        autotuner times the pair as a whole where it is on (else the per-adapter defaults); tiles "auto": always."""
        (M1, N1), (M2, N2) = shape1, shape2
        if tiles == "auto" or tiles is None and splits is None and autotune_enabled(dev, 2.0 * (M1 * N1 + M2 * N2) * K):
            tiles, splits = await autotune(dev, M1, N1, K, "tn", bias_row=bias_row, pair=(M2, N2))
        tiles = dict(tiles or default_tiles(dev, M1 + M2, max(N1, N2), K))
        if splits is None:
            wg = sum(-(-n // tiles["BN"]) * -(-m // tiles["BM"]) for m, n in (shape1, shape2))
            splits = default_splits(dev, wg, K)
        splits = max(2, int(splits))                       # the slabs are where the two products meet
        ms = [await Matmul.create(dev, m, n, K, "tn", accumulate=accumulate, variant="tiled", tiles=tiles,
                                  splits=splits, bias_row=bias_row) for m, n in (shape1, shape2)]
        if any(len(m.chunks) != 1 or m.splits != ms[0].splits or m.chunks[0][3][2] != ms[0].chunks[0][3][2]
               for m in ms):
            raise GPUError(f"a MatmulPair needs both {K}-long reductions in one binding with the same slices; "
                           f"make the products apart (Matmul)")
        m1, m2 = ms
        consts, defines = kernel_args(tiles, {"A_T": True, "B_T": False, **({"BIAS_ROW": True} if bias_row else {})},
                                      {"GROUPED"})
        kernel = await dev.kernel(FILE, "matmul_tiled", consts, defines=defines)
        z = m1.chunks[0][3][2]
        size1, size2 = (4 * z * m.out_rows * m.N for m in ms)
        base2 = -(-size1 // 256) * 256                      # the second member's slabs: 256-byte aligned
        scratch = shared_scratch(dev, base2 + size2)
        params2 = dev.uniform(struct.pack("<4I", m2.out_rows, N2, K, base2 // 16), "matmul-pair-params")
        blocks = sum(m.chunks[0][3][0] * m.chunks[0][3][1] for m in ms)
        if blocks > MAX_GROUPS:
            raise GPUError(f"a MatmulPair of {blocks} blocks exceeds {MAX_GROUPS} workgroups along x")
        sum_kernel = await dev.kernel(FILE, "matmul_split_sum", {"ACCUMULATE": accumulate}, defines={"GROUPED"})
        vec4s = sum(m.out_rows * m.N // 4 for m in ms)
        return cls(dev, m1, m2, kernel, (blocks, 1, z), params2, scratch, ((0, size1), (base2, size2)), sum_kernel,
                   fold_grid(-(-vec4s // SUM_WG)))

    def dispatch(self, seq: Sequence, out1, a1, b1, out2, a2, b2):
        """Append both products: the grouped slab product, then the grouped sum into out1 and out2 ([+]=)."""
        for m, tag, out, a, b in ((self.m1, "1", out1, a1, b1), (self.m2, "2", out2, a2, b2)):
            name = f"matmul pair {tag}: tn {m.M}x{m.N}x{m.K}"
            bound_at_least(out, (m.out_rows, m.N), name, "out")
            bound_at_least(a, (m.K, m.M), name, "a")
            bound_at_least(b, (m.K, m.N), name, "b")
        m1 = self.m1
        base2, size2 = self.slabs[1]
        slabs = self.scratch.view(0, base2 + size2)
        seq.dispatch(self.kernel, self.grid, mp=m1.chunks[0][2], mp2=self.params2, a4=a1, b4=b1, a4_2=a2, b4_2=b2,
                     bias4=m1.no_bias, out4=slabs, aux4=m1.no_aux)
        seq.dispatch(self.sum_kernel, self.sum_grid, mp=m1.chunks[0][2], mp2=self.params2, split4=slabs, out4=out1,
                     out4_2=out2, bias4=m1.no_bias, aux4=m1.no_aux)


@dataclass(frozen=True)
class Strided:
    """Where each product's matrix of a BatchedMatmul lies in its buffer (floats): row r, column c of the matrix
    of batch element b, head h at base + b * per_batch + h * per_head + r * ld + c."""
    ld: int
    base: int = 0
    per_batch: int = 0
    per_head: int = 0

    def floats(self, batches: int, heads: int, rows: int, cols: int) -> int:
        """The floats a buffer needs for every matrix (each row read or written in whole vec4s)."""
        return (self.base + (batches - 1) * self.per_batch + (heads - 1) * self.per_head + (rows - 1) * self.ld
                + -(-cols // 4) * 4)


BATCH_CAUSAL = {None: 0, "skip_upper": 1, "k_from_row": 2, "k_to_row": 3}
BATCH_SOFTMAX = {None: set(), "p": {"SOFTMAX"}, "ds": {"SOFTMAX", "SOFTMAX_DS"}}


class BatchedMatmul:
    """One product per batch element b and head h in ONE dispatch (matmul_tiled BATCHED), out_z (M, N) =
    op(A_z) (M, K) @ op(B_z) (K, N), z = b * heads + h, each matrix strided inside a larger one (Strided): the
    per-head products of attention. No split-K, bias or accumulation: out is written. Strides and offsets are
    multiples of 4; a row's vec4s may run past its columns into the row's padding (ld at least the columns rounded
    up to 4), which must hold finite values: they meet zeros of the other operand (nt, where both rows run along
    K, needs K % 4 == 0) or land in out's padding. causal (the products of causal attention's backward, rows and
    columns positions): "skip_upper" leaves out's blocks wholly above the diagonal unwritten, "k_from_row" (tn)
    sums the reduction from the block's first row, "k_to_row" (nn) up to its last (the zeros of P and dS beyond
    the diagonal, which the products then read only within their blocks of rows). softmax (with "skip_upper", M = N:
    the attention backward's S and dP, matmul.wgsl's SOFTMAX block) stores masked softmax terms instead of the
    product y, each row m of product z with its r = row_in[z * M + m] and scale = 1 / sqrt(K): "p" P =
    exp(scale y - r), "ds" scale P (y - r) with P from aux at out's place; zeros past the diagonal (and in the
    rows' padding) in every block made. second (tn only, no softmax): a second product of the same shape in the
    same dispatch (matmul.wgsl's PAIRED block), (a2, b2, out2) its Strided operands, a2 and b2 in buffers of their
    own (dispatch's a2, b2), out2 in out's buffer with out's row length: the attention backward's dV and dK (on an
    H200 the backward 4-6% faster than with the two apart: bench/results/h200/run47_batched_pair_probe.txt,
    run48_attention_pair.txt). Tiles, where not given: on GPUs
    128 x 128 (x 64 where N < 128) x 16, 8 x 8 a thread, spread and prefetched, the autotuner's picks for flat
    products of attention's shapes on an H200 (bench/results/h200/run37_attention_as_products.txt); not tuned."""

    def __init__(self, dev, M, N, K, layout, batches, heads, strides, kernel, params, grid, tiles, softmax=None):
        self.dev, self.M, self.N, self.K, self.layout = dev, M, N, K, layout
        self.batches, self.heads, self.strides, self.kernel = batches, heads, strides, kernel
        self.params, self.grid, self.tiles, self.softmax = params, grid, tiles, softmax
        self.paired = "a2" in strides
        self.no_bias, self.no_aux = dev.buffer(16, "matmul-no-bias"), dev.buffer(16, "matmul-no-aux")

    @classmethod
    async def create(cls, dev: Device, M: int, N: int, K: int, layout: str, batches: int, heads: int,
                     a: Strided, b: Strided, out: Strided, causal: str | None = None,
                     tiles: dict | None = None, softmax: str | None = None,
                     second: tuple[Strided, Strided, Strided] | None = None) -> "BatchedMatmul":
        if layout not in LAYOUTS:
            raise GPUError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if causal not in BATCH_CAUSAL:
            raise GPUError(f"causal must be one of {sorted(k for k in BATCH_CAUSAL if k)} or None, got {causal!r}")
        if min(M, N, K, batches, heads) <= 0:
            raise GPUError(f"batched matmul sizes must be positive, got M={M} N={N} K={K} {batches}x{heads}")
        if softmax not in BATCH_SOFTMAX:
            raise GPUError(f"softmax must be 'p', 'ds' or None, got {softmax!r}")
        if softmax and (causal != "skip_upper" or M != N):
            raise GPUError(f"softmax stores are for the square causal products (causal 'skip_upper', M = N), got "
                           f"causal={causal!r}, M={M}, N={N}")
        if second and (layout != "tn" or softmax or second[2].ld != out.ld):
            raise GPUError(f"a batched pair is for two tn products without softmax stores whose outs have one row "
                           f"length, got layout {layout!r}, softmax {softmax!r}, out ld {out.ld} and "
                           f"{second[2].ld}")
        a_cols, b_cols = (M if layout == "tn" else K), (K if layout == "nt" else N)
        operands = [("a", a, a_cols), ("b", b, b_cols), ("out", out, N)]
        operands += [(name + "2", st, cols) for (name, _, cols), st in zip(operands, second)] if second else []
        for name, st, cols in operands:
            if any(v % 4 for v in (st.ld, st.base, st.per_batch, st.per_head)):
                raise GPUError(f"batched matmul {name}: strides and offsets must be multiples of 4, got {st}")
            padded = -(-cols // 4) * 4
            if st.ld < padded:
                raise GPUError(f"batched matmul {name}: rows of {cols} columns need ld >= {padded}")
        if layout == "nt" and K % 4:
            raise GPUError(f"batched matmul nt: both operands' rows run along K, whose padding would meet: K % 4 "
                           f"must be 0, got K={K}")
        if N % 4 and 0 < out.per_head < out.ld:
            raise GPUError(f"batched matmul out: heads side by side in a row need N % 4 == 0 (a row's last vec4 "
                           f"would reach the next head's columns), got N={N}")
        n_products = batches * heads * (2 if second else 1)
        if n_products > dev.limits["max-compute-workgroups-per-dimension"]:
            raise GPUError(f"batched matmul: {n_products} products ({batches} x {heads}"
                           f"{' x 2' if second else ''}) exceed the workgroup grid limit")
        if tiles is None:
            tiles = cpu_tiles(dev) if is_cpu_adapter(dev) else \
                {"BM": 128, "BN": 128 if N >= 128 else 64, "BK": 16, "TM": 8, "TN": 8, "SPREAD": True,
                 "PREFETCH": True}
        tiles = dict(tiles)
        check_tiles(dev, tiles)
        consts, defines = kernel_args(tiles, dict(A_T=layout == "tn", B_T=layout == "nt", CAUSAL=BATCH_CAUSAL[causal]),
                                      {"BATCHED"} | BATCH_SOFTMAX[softmax] | ({"PAIRED"} if second else set()))
        kernel = await dev.kernel(FILE, "matmul_tiled", consts, defines=defines)
        params = dev.uniform(struct.pack("<4I", M, N, K, 0), "matmul-batched-params")
        pack = lambda a, b, out: struct.pack(  # noqa: E731
            "<16I", a.ld, b.ld, out.ld, heads, a.base, a.per_batch, a.per_head, b.base, b.per_batch, b.per_head,
            out.base, out.per_batch, out.per_head, 0, 0, 0)
        bps = [dev.uniform(pack(*abo), "matmul-batched-strides") for abo in [(a, b, out)] + [second] * bool(second)]
        grid = (-(-N // tiles["BN"]), -(-M // tiles["BM"]), n_products)
        if max(grid[:2]) > MAX_GROUPS:
            raise GPUError(f"batched matmul {M}x{N}: {grid[:2]} workgroups exceed {MAX_GROUPS}")
        shapes = {"a": ((K if layout == "tn" else M), a_cols), "b": ((N if layout == "nt" else K), b_cols),
                  "out": (M, N)}
        strides = {name: (st, *shapes[name.rstrip("2")]) for name, st, _ in operands}
        return cls(dev, M, N, K, layout, batches, heads, strides, kernel, (params, *bps), grid, tiles, softmax)

    def dispatch(self, seq: Sequence, out, a, b, row_in=None, aux=None, a2=None, b2=None):
        """Append the products (out written where its blocks are made). With softmax: row_in (batches * heads * M)
        f32, and ("ds") aux, P laid out as out. Paired (second): a2 and b2, the second product's operands (its out
        in out's buffer)."""
        name = f"batched matmul {self.layout} {self.M}x{self.N}x{self.K} ({self.batches}x{self.heads})"
        if (a2 is None or b2 is None) == self.paired:
            raise GPUError(f"{name}: " + ("a pair needs a2 and b2" if self.paired else "a2 and b2 are for a pair"))
        for what, x, wanted in (("row_in", row_in, bool(self.softmax)), ("aux", aux, self.softmax == "ds")):
            if x is not None and not wanted:
                raise GPUError(f"{name}: {what} is for softmax " + ("'p' and 'ds'" if what == "row_in" else "'ds'")
                               + f" stores, this product's softmax is {self.softmax!r}")
        operands = [("a", a), ("b", b), ("out", out)] + ([("aux", aux)] if self.softmax == "ds" else []) + \
            ([("a2", a2), ("b2", b2), ("out2", out)] if self.paired else [])
        for what, x in operands:
            if x is None:
                need = f"softmax {self.softmax!r} needs aux" if what == "aux" else f"pass {what}"
                raise GPUError(f"{name}: {need}")
            st, rows, cols = self.strides["out" if what == "aux" else what]
            bound_at_least(x, (st.floats(self.batches, self.heads, rows, cols),), name, what)
        extra = {}
        if self.softmax:
            if row_in is None:
                raise GPUError(f"{name}: softmax {self.softmax!r} needs row_in")
            bound_at_least(row_in, (self.batches * self.heads * self.M,), name, "row_in")
            extra["row_in"] = row_in
        if self.paired:
            extra.update(a4_2=a2, b4_2=b2, bp2=self.params[2])
        seq.dispatch(self.kernel, self.grid, mp=self.params[0], bp=self.params[1], a4=a, b4=b, out4=out,
                     bias4=self.no_bias, aux4=aux if self.softmax == "ds" else self.no_aux, **extra)


class BiasGrad:
    """dbias (N,) += column sums of dout (M, N), without atomics: per 128-row block, then blocks in order."""

    def __init__(self, dev, M, N, kernels, chunks, partial):
        self.dev, self.M, self.N = dev, M, N
        self.k = kernels
        self.chunks = chunks      # [(start row, rows, params uniform)]
        self.partial = partial    # scratch (n_blocks, N) f32

    @classmethod
    async def create(cls, dev: Device, M: int, N: int, max_binding: int | None = None) -> "BiasGrad":
        limit = min(dev.limits["max-storage-buffer-binding-size"], max_binding or 1 << 62)
        rows = min(M, (limit // (4 * N)) // BIAS_ROWS * BIAS_ROWS, MAX_GROUPS * BIAS_ROWS)
        if rows <= 0:
            raise GPUError(f"{BIAS_ROWS} rows of dout ({N} columns) exceed the binding limit {limit}")
        chunks = []
        for start in range(0, M, rows):
            n = min(rows, M - start)
            chunks.append((start, n, dev.uniform(struct.pack("<4I", n, N, 0, BIAS_ROWS), "bias-grad-params")))
        kernels = {e: await dev.kernel(FILE, e) for e in ("bias_grad_partial", "bias_grad_sum")}
        partial = dev.buffer(4 * -(-rows // BIAS_ROWS) * N, "bias-grad-partial")
        return cls(dev, M, N, kernels, chunks, partial)

    def dispatch(self, seq: Sequence, dbias, dout):
        """dbias (N,) += dout (M, N) summed over rows. Two dispatches per chunk of rows."""
        buf, off = bound_at_least(dout, (self.M, self.N), "bias grad", "dout")
        for start, rows, params in self.chunks:
            d = dout if len(self.chunks) == 1 else buf.view(off + 4 * start * self.N, 4 * rows * self.N)
            seq.dispatch(self.k["bias_grad_partial"], (-(-self.N // BIAS_COLS), -(-rows // BIAS_ROWS)),
                         mp=params, dout=d, partial=self.partial)
            seq.dispatch(self.k["bias_grad_sum"], (-(-self.N // 64),), mp=params, partial=self.partial, dbias=dbias)


class Conv1D:
    """Hugging Face GPT-2's Conv1D: out (M, N) = inp (M, K) @ weight (K, N) + bias (N,), weight stored (in, out).

    Fused epilogues (the model's elementwise neighbours, in the products' stores):
      forward_epilogue "gelu":      forward also writes gelu_out = gelu(out)          (mlp c_fc, forward only)
      forward_epilogue "gelu_keep": gelu_out = gelu(y) and out = gelu'(y), y = inp @ weight + bias (mlp c_fc in
                                    training: what the backward needs of the pre-activation, from the same tanh)
      forward_epilogue "residual":  out = residual + inp @ weight + bias              (attn and mlp c_proj)
      dinp_gelu_grad True:          dinp = (dout @ weight^T) * gelu'(gelu_pre)         (mlp c_proj: the gradient of
                                    the c_fc output, through the GELU of its pre-activation gelu_pre)
      dinp_gelu_grad "kept":        dinp = (dout @ weight^T) * gelu_grad               (the same, with gelu_grad the
                                    out of a "gelu_keep" c_fc: no tanh in the backward)
    backward=False: the forward product only. fuse_bias_grad (with a bias): the bias gradient comes out of the
    weight-gradient product (Matmul bias_row), which then needs dbias stored right after dweight in one buffer
    (as the model's gradients are), instead of two passes of its own over dout."""

    # dinp_gelu_grad's values other than False: (the dinp product's epilogue, the backward argument it multiplies by)
    DINP_GELU = {True: ("gelu_grad", "gelu_pre"), "kept": ("mul", "gelu_grad")}

    def __init__(self, fwd, dinp, dweight, dbias):
        self.fwd, self.dinp, self.dweight, self.dbias = fwd, dinp, dweight, dbias

    @classmethod
    async def create(cls, dev: Device, M: int, K: int, N: int, bias: bool = True, variant: str | None = None,
                     tiles: dict | None = None, forward_epilogue: str | None = None,
                     dinp_gelu_grad: bool | str = False,
                     backward: bool = True, fuse_bias_grad: bool = False) -> "Conv1D":
        if forward_epilogue not in (None, "gelu", "gelu_keep", "residual"):
            raise GPUError(f"forward_epilogue must be None, 'gelu', 'gelu_keep' or 'residual', "
                           f"got {forward_epilogue!r}")
        if dinp_gelu_grad not in (False, *cls.DINP_GELU):
            raise GPUError(f"dinp_gelu_grad must be False, True or 'kept', got {dinp_gelu_grad!r}")
        fwd = await Matmul.create(dev, M, N, K, "nn", bias=bias, variant=variant, tiles=tiles,
                                  epilogue=forward_epilogue)
        if not backward:
            return cls(fwd, None, None, None)
        dinp = await Matmul.create(dev, M, K, N, "nt", variant=variant, tiles=tiles,
                                   epilogue=cls.DINP_GELU[dinp_gelu_grad][0] if dinp_gelu_grad else None)
        fuse = fuse_bias_grad and bias and fwd.variant == "tiled"
        dweight = await Matmul.create(dev, K, N, M, "tn", accumulate=True, variant=variant, tiles=tiles,
                                      bias_row=fuse)
        dbias = await BiasGrad.create(dev, M, N) if bias and not fuse else None
        return cls(fwd, dinp, dweight, dbias)

    def forward(self, seq: Sequence, out, inp, weight, bias=None, gelu_out=None, residual=None):
        """out (M, N) = [residual (M, N) +] inp (M, K) @ weight (K, N) + bias (N,): written; with the "gelu"
        epilogue also gelu_out (M, N) = gelu(out); with "gelu_keep" gelu_out = gelu(y) and out = gelu'(y) for
        y = inp @ weight + bias. residual and gelu_out: buffers other than out."""
        ep = self.fwd.epilogue
        gelu = ep in ("gelu", "gelu_keep")
        for name, x, want, wanted in (("gelu_out", gelu_out, gelu, "'gelu' or 'gelu_keep'"),
                                      ("residual", residual, ep == "residual", "'residual'")):
            if (x is None) == want:
                raise GPUError(f"Conv1D forward with forward_epilogue={ep!r}: "
                               + (f"pass {name}" if x is None else f"{name} needs forward_epilogue={wanted}"))
        self.fwd.dispatch(seq, out=out, a=inp, b=weight, bias=bias, aux=gelu_out if gelu else residual)

    def backward(self, seq: Sequence, dinp, dweight, dout, inp, weight, dbias=None, gelu_pre=None,
                 gelu_grad=None, weight_grad: bool = True):
        """dinp (M, K) = dout @ weight^T (WRITTEN; with dinp_gelu_grad=True times gelu'(gelu_pre (M, K)), with
        "kept" times gelu_grad (M, K)); dweight (K, N) += inp^T @ dout; dbias (N,) += sum of dout rows.
        weight_grad=False: dinp only (the weight and bias gradients are made elsewhere, e.g. by a MatmulPair with
        another Conv1D's)."""
        if self.dinp is None:
            raise GPUError("this Conv1D was created with backward=False")
        given = {"gelu_pre": gelu_pre, "gelu_grad": gelu_grad}
        form = {arg: value for value, (_, arg) in self.DINP_GELU.items()}     # the dinp_gelu_grad each is passed with
        want = next((arg for ep, arg in self.DINP_GELU.values() if ep == self.dinp.epilogue), None)
        if want and given[want] is None:
            raise GPUError(f"Conv1D with dinp_gelu_grad={form[want]!r}: pass {want}")
        for name, x in given.items():
            if x is not None and name != want:
                raise GPUError(f"{name} needs a Conv1D created with dinp_gelu_grad={form[name]!r}")
        self.dinp.dispatch(seq, out=dinp, a=dout, b=weight, aux=gelu_pre if gelu_grad is None else gelu_grad)
        if not weight_grad:
            return
        if self.dweight.bias_row:
            # fused bias gradient: out = [dweight; dbias], one contiguous range
            dweight = weight_and_bias(dweight, dbias)
        self.dweight.dispatch(seq, out=dweight, a=inp, b=dout)
        if self.dbias is not None:
            if dbias is None:
                raise GPUError("this Conv1D has a bias: pass dbias")
            self.dbias.dispatch(seq, dbias=dbias, dout=dout)


def weight_and_bias(dweight, dbias):
    """[dweight; dbias] as one view, for the products that make the bias gradient as the weight gradient's last row
    (bias_row): dbias must lie right after dweight in the same buffer."""
    if dbias is None:
        raise GPUError("this Conv1D has a bias: pass dbias")
    wbuf, woff, wsize = span(dweight)
    bbuf, boff, bsize = span(dbias)
    if bbuf is not wbuf or boff != woff + wsize:
        raise GPUError("a Conv1D with fuse_bias_grad needs dbias stored right after dweight in one buffer; "
                       "create it with fuse_bias_grad=False otherwise")
    return wbuf.view(woff, wsize + bsize)


class LMHead:
    """The tied lm_head: logits (M, Vp) = x (M, C) @ wte (Vp, C)^T, no bias."""

    def __init__(self, fwd, dx, dwte):
        self.fwd, self.dx, self.dwte = fwd, dx, dwte

    @classmethod
    async def create(cls, dev: Device, M: int, C: int, Vp: int, variant: str | None = None,
                     tiles: dict | None = None) -> "LMHead":
        fwd = await Matmul.create(dev, M, Vp, C, "nt", variant=variant, tiles=tiles)
        dx = await Matmul.create(dev, M, C, Vp, "nn", variant=variant, tiles=tiles)
        dwte = await Matmul.create(dev, Vp, C, M, "tn", accumulate=True, variant=variant, tiles=tiles)
        return cls(fwd, dx, dwte)

    def forward(self, seq: Sequence, logits, x, wte):
        """logits (M, Vp) = x (M, C) @ wte (Vp, C)^T: written."""
        self.fwd.dispatch(seq, out=logits, a=x, b=wte)

    def backward(self, seq: Sequence, dx, dwte, dlogits, x, wte):
        """dx (M, C) = dlogits (M, Vp) @ wte (WRITTEN); dwte (Vp, C) += dlogits^T @ x."""
        self.dx.dispatch(seq, out=dx, a=dlogits, b=wte)
        self.dwte.dispatch(seq, out=dwte, a=dlogits, b=x)
