"""Causal multi-head self-attention, fused (shaders/attention.wgsl): flash-attention style, so the forward's memory
grows as T, not T*T, per head (the backward's too where dq is recomputed; see below).

    attn = await Attention.create(dev, B=B, T=T, C=C, n_head=NH)
    attn.forward(seq, out=y, lse=lse, qkv=qkv)
    attn.backward(seq, dqkv=dqkv, dout=dy, qkv=qkv, out=y, lse=lse)

Shapes, all f32: qkv (B*T, 3C) laid out [q | k | v], head h the hs-slice [h*hs, (h+1)*hs) of each third
(hs = C / n_head, a multiple of 4, at most 128); out (B*T, C), the heads merged back (before c_proj);
lse (B, n_head, T), each row's logsumexp of scaled scores, written by the forward for the backward;
dout (B*T, C); dqkv (B*T, 3C). Scores are scaled by 1/sqrt(hs).
The backward WRITES dqkv (every element, =): qkv is an activation whose only consumer is attention. It runs
three dispatches: delta = rowsum(dout * out) into a scratch (B, n_head, T), then dq (each query block walks
its key tiles) and dk, dv (each key block walks its query tiles), so that no two workgroups write the same
element and nothing needs atomics. Results are bit-identical run to run. Where the (B, n_head, T, T) gradient of
the scores fits one binding and DS_MAX_BYTES (dq_mode), the dk, dv kernel also stores it and dq is one product
from it (attention_backward_dq_ds) instead of recomputing the scores: same dq to the bit, memory T*T per head.
From PRODUCTS_MIN_T positions, where its two (B, n_head, T, T) scratches fit, the backward instead runs as batched
matrix products (backward_mode "products": S and dP, whose stores are P and scale dS, then dV, dK, dQ), which the
matmul kernel makes faster than the fused kernels at long T.

Workgroup shapes are chosen per kernel to fit the device's workgroup memory: small tiles (and heads split
into chunks of dims) within WebGPU's default 16 KiB, bigger ones where more is granted (32 KiB on lavapipe and
on SwiftShader in Chromium, 48 KiB on NVIDIA natively).

pipeline=True has the kernels' inner loops read their next step's workgroup-memory values during the current
step's FMAs (software pipelining, override PIPELINE), which made the matmul 10% faster on an H100 but the
attention kernels 27-43% slower there (more registers: bench/results/attention.md), so the default, False, reads
them at the top of each step; bench/bench_attention.py --pipeline both times the two. The results are
bit-identical either way.

prefetch=True (the default; override PREFETCH, as the matmul's) has each thread read its share of the NEXT streamed tile
(K, V in forward and dq; Q, dO and lse, delta in dkv) from global memory into registers while the current tile
is worked on, instead of loading each tile between two barriers. A thread's share is prefetch_vec4s(hs, tile)
vec4s per streamed matrix, in named registers: at most MAX_PREFETCH_VEC4S (4; that is NR >= hs / 4). Kernels
whose tile would need more compile without it (Attention.prefetch says which have it). Bit-identical results
either way; bench/bench_attention.py --prefetch both times the two (on the H100: 11-14% faster forward and
backward, bench/results/attention.md).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from tabgpt.gpu import Device, GPUError, Sequence, env_switch
from tabgpt.ops.elementwise import bound_at_least, fold_grid
from tabgpt.ops.matmul import BatchedMatmul, Strided, pairs_enabled

FILE = "attention.wgsl"
MAX_HEAD_SIZE = 128
ENTRIES = ("attention_forward", "attention_backward_dq", "attention_backward_dkv")
# RPT of the tiles pick_tile chooses. 4 rows per thread (each streamed vec4 read serves twice the FMAs) measured
# slower on an H100 at GPT-2 size: forward 1.80 ms against 1.45, backward 8.9 against 5.7 (bench/results/attention.md).
ROWS_PER_THREAD = 2
# PREFETCH holds a thread's share of each streamed matrix in at most this many named vec4 registers.
MAX_PREFETCH_VEC4S = 4


@dataclass(frozen=True)
class Tile:
    """One kernel's workgroup shape: NR x TC threads; the workgroup owns a block of RPT NR rows (queries in forward
    and dq, keys in dkv) and streams tiles of 4 TC rows of the other kind; each thread makes an RPT x 4 tile of
    scores and owns RPT rows x 8 dims of the output (DS = ceil(hs / (8 TC)) workgroups share a head's dims).
    RPT (rows per thread) is 2 or 4."""
    TC: int
    NR: int
    RPT: int = 2

    def chunks(self, hs: int) -> int:
        return -(-hs // (8 * self.TC))


def workgroup_memory(entry: str, hs: int, t: Tile) -> tuple[int, int, int]:
    """(vec4s of `tiles`, f32s of `mat`, vec4s of `pt`) an entry point needs: the layouts written above each in the
    WGSL. A score-shaped tile in `pt` is BS / 2 pair rows of PW4 = BR / 2 + 4 vec4s (the shader's header)."""
    h4p, BR, BS = hs // 4 + 1, t.RPT * t.NR, 4 * t.TC
    score = (BS // 2) * (BR // 2 + 4)
    if entry == "attention_forward":        # Q | K | V;  P;  Mx (BR, TC)
        return (BR + 2 * BS) * h4p, BR * t.TC, score
    if entry == "attention_backward_dq":    # Q | dO | K | V;  dS
        return (2 * BR + 2 * BS) * h4p, 0, score
    if entry == "attention_backward_dkv":   # K | V | Q | dO;  P | dS;  lse, delta (BS)
        return (2 * BR + 2 * BS) * h4p, 2 * BS, 2 * score
    raise ValueError(entry)


def prefetch_vec4s(hs: int, t: Tile) -> int:
    """PREFETCH's vec4 registers per thread for each streamed matrix: ceil(BS hs/4 / (NR TC)), BS = 4 TC rows."""
    threads = t.NR * t.TC
    return -(-(4 * t.TC * (hs // 4)) // threads)


def prefetch_problem(hs: int, t: Tile) -> str:
    """Why tile t cannot prefetch its streamed tiles at head size hs ("" if it can)."""
    n = prefetch_vec4s(hs, t)
    if n > MAX_PREFETCH_VEC4S:
        return f"PREFETCH needs {n} vec4 registers per thread and streamed matrix (at most {MAX_PREFETCH_VEC4S})"
    return ""


def tile_problem(entry: str, hs: int, t: Tile, limits: dict) -> str:
    """Why tile t cannot serve `entry` at head size hs on a device with these limits ("" if it can)."""
    threads = t.NR * t.TC
    if t.RPT not in (2, 4):
        return f"RPT={t.RPT} rows per thread (2 or 4)"
    smv, sms, smp = workgroup_memory(entry, hs, t)
    if threads > limits["max-compute-invocations-per-workgroup"] or threads > limits["max-compute-workgroup-size-x"]:
        return f"{threads} threads"
    if 16 * smv + 4 * sms + 16 * smp > limits["max-compute-workgroup-storage-size"]:
        return f"{16 * smv + 4 * sms + 16 * smp} bytes of workgroup memory"
    return ""


def pick_tile(entry: str, hs: int, T: int, limits: dict, rpt: int | None = None) -> Tile:
    """The biggest workgroup that fits, with the fewest dim chunks; blocks no longer than the sequence needs.

    TC starts where one workgroup covers the whole head (8 TC >= hs; at least 4: 16 keys per tile) and
    halves when memory is short (then heads split into chunks); the block's rows run from 64 down, RPT
    (default ROWS_PER_THREAD) rows per thread."""
    rpt = rpt or ROWS_PER_THREAD
    tc = 4
    while 8 * tc < hs:
        tc *= 2
    while tc >= 1:
        for br in (64, 32, 16, 8, 4, 2):
            if br > max(16, T) or br < rpt:
                continue
            t = Tile(tc, br // rpt, rpt)
            if not tile_problem(entry, hs, t, limits):
                return t
        tc //= 2
    raise GPUError(f"{entry}: no workgroup shape fits head size {hs} in this device's workgroup memory")


DQ_QB = 64                    # attention_backward_dq_ds: queries per workgroup
DQ_KS = 16                    #   keys per staged step where 32 do not fit (TABGPT_ATTENTION_DQ_KS: 16 or 32)
DQ_KS_CHOICES = (16, 32)
# attention_backward_dq_ds's loading by default (dq_ds_options): the next keys prefetched into registers, dS read as
# vec4s, 32 keys a step where they fit. On an H100 at the browser preset the backward took 0.305 / 0.307 ms against
# 0.315 / 0.318 with none of them (two rounds, arms in turn), and training 415,379 / 415,421 tokens/s against
# 414,019 / 414,342 (+0.3%, the same tune file: bench/results/h100/run89_*); bit-identical either way.
DQ_LOADING = {"prefetch": True, "vec4": True, "ks": 32}
DQ_ROWS = (4, 8)              #   query rows per thread, the first whose threads fit
DS_MAX_BYTES = 512 << 20      # "auto" stores dS up to this size (and the binding limit): GPT-2 small, T = 1024: 402 MB
# The backward through batched products ("products", backward_mode) by default from this sequence length, where each
# of its two (B, n_head, T, T) scratches fits DS_MAX_BYTES and a binding. On an H200, 8192 tokens a batch, heads of
# 64 (bench/results/h200/run44_products_crossover.txt): from T = 384 the products take 0.75-0.90x the fused time
# (GPT-2 small: 1.905 -> 1.427 ms, training +3%, run41_*); at T = 256 0.90-0.98x (the browser preset: 0.98x, its
# training the same within noise, run42_*), where the fused kernels, which need no scratch, stay the default.
PRODUCTS_MIN_T = 384


def heavy_group(group: int | None = None) -> int:
    """HEAVY_FIRST's heads per group (attention.wgsl block_order; 0: all of them; strictly, workgroup columns of the
    grid, several a head where its dims are split into chunks): group, else TABGPT_ATTENTION_ORDER_GROUP (default 0)."""
    if group is None:
        env = os.environ.get("TABGPT_ATTENTION_ORDER_GROUP", "0")
        if not env.isdigit():
            raise GPUError(f"TABGPT_ATTENTION_ORDER_GROUP must be a count of heads (0: all), got {env!r}")
        group = int(env)
    if group < 0:
        raise GPUError(f"the heads per group must be 0 (all) or more, got {group}")
    return int(group)


def heavy_first_enabled(heavy_first: bool | None = None) -> bool:
    """Whether the causal kernels launch their row blocks heaviest first across all heads (attention.wgsl
    block_order; the same results): heavy_first, else TABGPT_ATTENTION_ORDER (0 or 1; default 1: with the
    layernorms' folded gradients, training 1.0% faster on an H200, bench/results/h200/run80_train_*.txt)."""
    return env_switch("TABGPT_ATTENTION_ORDER", heavy_first, default=True)


def env_count(name: str) -> int | str | None:
    """The environment variable `name` as an int where it is digits, None where unset or empty, else its text (for
    the caller's error message)."""
    env = os.environ.get(name, "")
    return int(env) if env.isdigit() else env or None


def dq_ds_vec4s(hs: int, ks: int = DQ_KS) -> int:
    """attention_backward_dq_ds's workgroup memory in vec4s (SMV): KS staged keys of K rows and of dS rows."""
    return ks * (hs // 4 + DQ_QB // 4)


def dq_ds_options(prefetch: bool | None = None, vec4: bool | None = None, ks: int | None = None,
                  hs: int | None = None, limits: dict | None = None) -> dict:
    """attention_backward_dq_ds's loading options: {"prefetch": the next staged keys' K and dS read into registers
    during the current ones (override DQ_PREFETCH), "vec4": dS read as aligned vec4s where T % 4 == 0 (DS_VEC4),
    "ks": keys per staged step (KS)}; each the argument where given, else TABGPT_ATTENTION_DQ_PREFETCH,
    TABGPT_ATTENTION_DS_VEC4 (0 or 1) and TABGPT_ATTENTION_DQ_KS (16 or 32), else DQ_LOADING's, whose 32 keys
    become 16 where their workgroup memory at head size hs exceeds limits' (WebGPU's default 16 KiB from hs 72).
    Every choice gives the same dQ to the bit (the same fmas in the same order; only how the operands reach
    workgroup memory differs)."""
    if ks is None:
        ks = env_count("TABGPT_ATTENTION_DQ_KS")
    if ks is None:
        ks = DQ_LOADING["ks"]
        if hs is not None and limits and 16 * dq_ds_vec4s(hs, ks) > limits["max-compute-workgroup-storage-size"]:
            ks = DQ_KS
    if ks not in DQ_KS_CHOICES:
        raise GPUError(f"attention_backward_dq_ds stages {' or '.join(map(str, DQ_KS_CHOICES))} keys a step "
                       f"(TABGPT_ATTENTION_DQ_KS), got {ks!r}")
    return {"prefetch": env_switch("TABGPT_ATTENTION_DQ_PREFETCH", prefetch, default=DQ_LOADING["prefetch"]),
            "vec4": env_switch("TABGPT_ATTENTION_DS_VEC4", vec4, default=DQ_LOADING["vec4"]), "ks": int(ks)}


def dq_ds_shape(hs: int, limits: dict, rows: int | None = None, ks: int = DQ_KS) -> tuple[int, str]:
    """(RQ, problem) of attention_backward_dq_ds at head size hs: query rows per thread (rows, or the fewest of
    DQ_ROWS), so that (QB / RQ) x hs/4 threads fit the device, and why it cannot run here ("" if it can)."""
    h4 = hs // 4
    max_threads = min(limits["max-compute-invocations-per-workgroup"], limits["max-compute-workgroup-size-x"])
    if rows is None:                                   # TABGPT_ATTENTION_DQ_ROWS: benchmarks' A/B
        rows = env_count("TABGPT_ATTENTION_DQ_ROWS")
    if rows not in (None, 4, 8):
        raise GPUError(f"attention_backward_dq_ds takes 4 or 8 query rows per thread (dq_rows or "
                       f"TABGPT_ATTENTION_DQ_ROWS), got {rows!r}")
    for rq in (rows,) if rows else DQ_ROWS:
        if (DQ_QB // rq) * h4 <= max_threads:
            smem = 16 * dq_ds_vec4s(hs, ks)
            if smem > limits["max-compute-workgroup-storage-size"]:
                return rq, f"{smem} bytes of workgroup memory"
            return rq, ""
    rq = rows or DQ_ROWS[-1]
    return rq, f"{(DQ_QB // rq) * h4} threads"


def ds_bytes(B: int, n_head: int, T: int) -> int:
    """Bytes of the stored dS (B, n_head, T, T) f32."""
    return 4 * B * n_head * T * T


def ds_by_default(B: int, n_head: int, T: int, binding: int) -> bool:
    """Whether "auto" stores dS as far as its size goes: within one binding of `binding` bytes and DS_MAX_BYTES
    (dq_mode also asks that the dq kernel's workgroup fits the device)."""
    return ds_bytes(B, n_head, T) <= min(binding, DS_MAX_BYTES)


def dq_mode(dev: Device, B: int, T: int, n_head: int, hs: int, dq: str = "auto", rows: int | None = None,
            ks: int = DQ_KS) -> str:
    """How the backward makes dQ: "ds" (dkv stores dS, attention_backward_dq_ds multiplies it by K: one product
    instead of four) where the (B, NH, T, T) dS fits a binding and DS_MAX_BYTES and the kernel's workgroup (with
    `rows` query rows per thread, dq_ds_shape) fits the device, else "recompute" (attention_backward_dq recomputes
    S, P, dP and dS per query block). TABGPT_ATTENTION_DQ overrides "auto"; "ds" asked for by name takes any size
    one binding holds (DS_MAX_BYTES only bounds what "auto" spends)."""
    if dq == "auto":
        dq = os.environ.get("TABGPT_ATTENTION_DQ", "auto")
    if dq not in ("auto", "ds", "recompute"):
        raise GPUError(f"the attention dq mode must be auto, ds or recompute, got {dq!r}")
    nbytes = ds_bytes(B, n_head, T)
    binding = dev.limits["max-storage-buffer-binding-size"]
    rq, problem = dq_ds_shape(hs, dev.limits, rows, ks)
    if dq == "ds" and (nbytes > binding or problem):      # asked for: any size that one binding holds
        why = [f"{nbytes} bytes of dS in one binding, where this device binds at most {binding}: use a smaller "
               "batch"] if nbytes > binding else []
        why += [f"{problem} with {rq} query rows per thread"] if problem else []
        raise GPUError("attention dq from a stored dS does not fit: " + "; ".join(why) + "; or use dq='recompute'")
    if dq == "auto":
        dq = "ds" if ds_by_default(B, n_head, T, binding) and not problem else "recompute"
    return dq


def reads_made_blocks(T: int, made: dict, reader_rows: int, what: str) -> None:
    """Check that the causal products of backward "products", which read P (dS) past the diagonal only within
    squares of reader_rows positions on it (their blocks of rows: BatchedMatmul's causal modes), read only blocks
    of the S (dP) product, tiles `made`, that it stores (skip_upper: those not wholly above the diagonal, which
    hold zeros past it). The farthest such entry of a square is its top right one."""
    bm, bn = made["BM"], made["BN"]
    for r0 in range(0, T, reader_rows):
        i, j = r0, min(r0 + reader_rows, T) - 1
        if (j // bn) * bn > (i // bm) * bm + bm - 1:
            raise GPUError(f"attention backward products: {what}: rows of {reader_rows} read entry ({i}, {j}), in a "
                           f"block of {bm} x {bn} that is not made")


def product_scratch_bytes(B: int, n_head: int, T: int) -> int:
    """Bytes of each of the two (B, n_head, T, T rounded up to 4) f32 scratches of backward "products" (S's, dP's)."""
    return 4 * B * n_head * T * (-(-T // 4) * 4)


def products_bytes(B: int, n_head: int, T: int) -> int:
    """Bytes of both scratches of backward "products"."""
    return 2 * product_scratch_bytes(B, n_head, T)


def products_by_default(B: int, n_head: int, T: int, binding: int) -> bool:
    """Whether "auto" runs the backward as products: from PRODUCTS_MIN_T positions, each scratch within one binding
    of `binding` bytes and DS_MAX_BYTES."""
    return T >= PRODUCTS_MIN_T and product_scratch_bytes(B, n_head, T) <= min(binding, DS_MAX_BYTES)


def backward_scratch_bytes(B: int, n_head: int, T: int, binding: int) -> int:
    """The (T, T)-per-head scratch bytes the default ("auto") backward allocates with bindings of `binding` bytes:
    the products' two, or the stored dS (where dq_mode's kernel fits, which it does for every head size of the
    presets), or none."""
    if products_by_default(B, n_head, T, binding):
        return products_bytes(B, n_head, T)
    return ds_bytes(B, n_head, T) if ds_by_default(B, n_head, T, binding) else 0


def backward_mode(dev: Device, B: int, T: int, n_head: int, backward: str = "auto") -> str:
    """How the backward runs: "flash" (the fused kernels: dq and dk, dv each walk the other's tiles) or "products"
    (S = Q K^T and dP = dO V^T as batched products that store P and scale dS instead (BatchedMatmul softmax), then
    dV = P^T dO, dK = dS^T Q and dQ = dS K as batched products: the matmul kernel's speed, memory T*T per head
    twice). TABGPT_ATTENTION_BACKWARD overrides "auto", which is "products" from PRODUCTS_MIN_T positions where
    each scratch fits DS_MAX_BYTES and a binding, else "flash"; "products" asked for by name takes any size one
    binding holds. "none": a forward-only op (prompts, evaluation), which compiles no backward kernel."""
    if backward == "none":
        return backward
    if backward == "auto":
        backward = os.environ.get("TABGPT_ATTENTION_BACKWARD", "auto")
    if backward not in ("auto", "flash", "products"):
        raise GPUError(f"the attention backward must be auto, flash or products, got {backward!r}")
    scratch = product_scratch_bytes(B, n_head, T)
    if backward == "products" and scratch > dev.limits["max-storage-buffer-binding-size"]:
        raise GPUError(f"attention backward 'products' needs {scratch} bytes in one "
                       f"binding, over this device's {dev.limits['max-storage-buffer-binding-size']}: use a smaller "
                       "batch or backward='flash'")
    if backward == "auto":
        binding = dev.limits["max-storage-buffer-binding-size"]
        backward = "products" if products_by_default(B, n_head, T, binding) else "flash"
    return backward


class Attention:
    def __init__(self, dev, B, T, C, n_head, kernels, tiles, params, delta, pipeline=False, prefetch=None,
                 dq="recompute", ds=None, no_ds=None, products=None):
        self.dev, self.B, self.T, self.C, self.n_head = dev, B, T, C, n_head
        self.hs = C // n_head
        self.k = kernels          # {entry: Kernel}, the entries that the modes run
        self.tiles = tiles        # {entry: Tile} of those of ENTRIES
        self.params = params      # uniform AttnParams
        self.delta = delta        # scratch (B, n_head, T) f32 (None: backward "none")
        self.pipeline = pipeline  # the PIPELINE override the kernels were compiled with
        # {entry: the PREFETCH override it was compiled with} for the tiled kernels compiled
        self.prefetch = prefetch or {e: False for e in tiles}
        self.dq = dq              # "ds": dkv stores dS and attention_backward_dq_ds makes dQ; "recompute"
        self.ds = ds              # "ds": the stored dS (B, n_head, T, T) f32, else None
        self.no_ds = no_ds        # bound as dkv's ds_out where it stores nothing (never touched)
        # backward "products": {"s", "dp", "dq", "dvk" (or "dv", "dk" apart): BatchedMatmul, "s_buf", "dp_buf":
        # scratch}, else None
        self.products = products
        self.backward_mode = "products" if products else "flash" if "attention_backward_dkv" in kernels else "none"

    @classmethod
    async def create(cls, dev: Device, B: int, T: int, C: int, n_head: int,
                     tiles: dict | None = None, pipeline: bool = False, prefetch: bool = True,
                     dq: str = "auto", dq_rows: int | None = None, backward: str = "auto",
                     heavy_first: bool | None = None, heavy_group_size: int | None = None,
                     dq_options: dict | None = None) -> "Attention":
        """Compile the kernels for this shape. tiles={entry: Tile} forces tile shapes (tests, benchmarks);
        pipeline=True compiles the inner loops with software pipelining (override PIPELINE, same results);
        prefetch=True reads the next streamed tile into registers during the current one (override PREFETCH,
        same results) in each kernel whose tile allows it (prefetch_problem; the others load as without).
        dq: "auto", "ds" or "recompute" (dq_mode): how the backward makes dQ; both give the same values.
        dq_options: attention_backward_dq_ds's loading options (dq_ds_options' arguments; benchmarks, tests).
        dq_rows: attention_backward_dq_ds's query rows per thread (4 or 8; benchmarks), else dq_ds_shape's; with
        dq "auto", rows that do not fit the device mean "recompute". backward: "auto", "flash", "products" or
        "none" (backward_mode); with "products" or "none" dq is unused. Only the kernels that the modes run are
        compiled: the forward; with "flash" dkv, delta and dq's kernel (attention_backward_dq or _dq_ds); with
        "products" delta (and the batched products); with "none" nothing else (backward then refuses to run)."""
        if n_head <= 0 or C % n_head or (C // n_head) % 4:
            raise GPUError(f"attention needs C (n_embd) divisible by n_head and a head size that is a multiple "
                           f"of 4, got C={C}, n_head={n_head}")
        hs = C // n_head
        if hs > MAX_HEAD_SIZE:
            raise GPUError(f"attention supports head sizes up to {MAX_HEAD_SIZE}, got {hs}")
        if max(B, n_head) > dev.limits["max-compute-workgroups-per-dimension"]:
            raise GPUError(f"attention: B={B} or n_head={n_head} exceeds the workgroup grid limit")
        if 4 * B * T * 3 * C > dev.limits["max-storage-buffer-binding-size"]:
            raise GPUError(f"attention: qkv of {4 * B * T * 3 * C} bytes exceeds this device's storage binding "
                           "limit; use a smaller batch")
        mode = backward_mode(dev, B, T, n_head, backward)
        order = {"HEAVY_FIRST": heavy_first_enabled(heavy_first), "HEAVY_GROUP": heavy_group(heavy_group_size)}
        dq_opts = dq_ds_options(**(dq_options or {}), hs=hs, limits=dev.limits)
        dq = dq_mode(dev, B, T, n_head, hs, dq, dq_rows, dq_opts["ks"]) if mode == "flash" else "recompute"
        kernels, chosen, prefetched = {}, {}, {}
        entries = {"flash": ENTRIES if dq == "recompute" else ("attention_forward", "attention_backward_dkv"),
                   "products": ENTRIES[:1], "none": ENTRIES[:1]}[mode]
        for entry in entries:
            t = (tiles or {}).get(entry) or pick_tile(entry, hs, T, dev.limits)
            problem = tile_problem(entry, hs, t, dev.limits)
            if problem:
                raise GPUError(f"{entry}: tile {t} does not fit head size {hs}: {problem}")
            if n_head * t.chunks(hs) > dev.limits["max-compute-workgroups-per-dimension"]:
                raise GPUError(f"{entry}: n_head={n_head} x {t.chunks(hs)} chunks exceeds the workgroup grid limit")
            smv, sms, smp = workgroup_memory(entry, hs, t)
            chosen[entry] = t
            prefetched[entry] = bool(prefetch) and not prefetch_problem(hs, t)
            kernels[entry] = await dev.kernel(FILE, entry, constants={
                "HS": hs, "TC": t.TC, "NR": t.NR, "RPT": t.RPT, "DS": t.chunks(hs), "SMV": smv,
                "SMS": max(1, sms), "SMP": smp, "PIPELINE": bool(pipeline), "PREFETCH": prefetched[entry],
                **({"STORE_DS": True} if dq == "ds" and entry == "attention_backward_dkv" else {}), **order})
        ds = no_ds = None
        if dq == "ds":
            ks = dq_opts["ks"]
            rq = dq_ds_shape(hs, dev.limits, dq_rows, ks)[0]          # dq_mode found that it fits
            kernels["attention_backward_dq_ds"] = await dev.kernel(FILE, "attention_backward_dq_ds", constants={
                "HS": hs, "QB": DQ_QB, "RQ": rq, "KS": ks, "SMV": dq_ds_vec4s(hs, ks), "SMS": 1,
                "DQ_PREFETCH": dq_opts["prefetch"], "DS_VEC4": dq_opts["vec4"] and T % 4 == 0, **order})
            # rounded up to whole vec4s: the kernel also binds it as an array of vec4s (ds_in4)
            ds = dev.buffer(-(-ds_bytes(B, n_head, T) // 16) * 16, "attention-ds")
        elif mode == "flash":
            no_ds = dev.buffer(16, "attention-no-ds")
        if mode != "none":
            kernels["attention_backward_delta"] = await dev.kernel(FILE, "attention_backward_delta",
                                                                   constants={"HS": hs})
        params = dev.uniform(struct.pack("<4I", B, T, n_head, 0), "attention-params")
        delta = dev.buffer(4 * B * n_head * T, "attention-delta") if mode != "none" else None
        products = await cls._products(dev, B, T, C, n_head) if mode == "products" else None
        return cls(dev, B, T, C, n_head, kernels, chosen, params, delta, bool(pipeline), prefetched, dq, ds, no_ds,
                   products)

    @staticmethod
    async def _products(dev: Device, B: int, T: int, C: int, n_head: int) -> dict:
        """The batched products of backward "products" and their two scratches (B, n_head, T, Tp), Tp = T rounded
        up to 4: P and scale dS, each (query, key), stored by the products of S = Q K^T and dP = dO V^T themselves
        (BatchedMatmul softmax). qkv's and dqkv's thirds: q at column 0, k at C, v at 2C, head h at h * hs; dout's
        head h at h * hs."""
        hs, Tp = C // n_head, -(-T // 4) * 4
        sq = lambda third: Strided(ld=3 * C, base=third * C, per_batch=T * 3 * C, per_head=hs)   # noqa: E731
        sdo = Strided(ld=C, per_batch=T * C, per_head=hs)
        stt = Strided(ld=Tp, per_batch=n_head * T * Tp, per_head=T * Tp)
        bm = lambda M, N, K, layout, a, b, out, causal, softmax=None, second=None: BatchedMatmul.create(  # noqa
            dev, M, N, K, layout, B, n_head, a, b, out, causal=causal, softmax=softmax, second=second)
        pr = {"s": await bm(T, T, hs, "nt", sq(0), sq(1), stt, "skip_upper", "p"),     # P from S = Q K^T
              "dp": await bm(T, T, hs, "nt", sdo, sq(2), stt, "skip_upper", "ds"),     # scale dS from dP = dO V^T
              "dq": await bm(T, hs, T, "nn", stt, sq(1), sq(0), "k_to_row")}           # dQ = scale dS K
        # dV = P^T dO and dK = scale dS^T Q: one dispatch (a batched pair), or apart with TABGPT_MATMUL_PAIRS=0
        # or where 2 B n_head products exceed the grid
        dv, dk = (T, hs, T, "tn", stt, sdo, sq(2), "k_from_row"), (T, hs, T, "tn", stt, sq(0), sq(1), "k_from_row")
        if pairs_enabled() and 2 * B * n_head <= dev.limits["max-compute-workgroups-per-dimension"]:
            pr["dvk"] = await bm(*dv, second=dk[4:7])
        else:
            pr["dv"], pr["dk"] = await bm(*dv), await bm(*dk)
        for made in ("s", "dp"):
            for reader in ("dvk" if "dvk" in pr else "dv", "dq"):
                reads_made_blocks(T, pr[made].tiles, pr[reader].tiles["BM"], f"{made} read by {reader}")
        scratch = product_scratch_bytes(B, n_head, T)     # each: (B, n_head, T, Tp) f32, as the estimates count it
        pr["s_buf"], pr["dp_buf"] = dev.buffer(scratch, "attention-s"), dev.buffer(scratch, "attention-dp")
        return pr

    def _grid(self, entry: str) -> tuple[int, int, int]:
        t = self.tiles[entry]
        return (-(-self.T // (t.RPT * t.NR)), self.n_head * t.chunks(self.hs), self.B)

    def _check(self, **bound):
        """Each bound buffer at least as big as its shape: the kernels index without clamps (gpu.UNCLAMPED_FILES),
        every index in range by construction for buffers of these shapes."""
        rows = self.B * self.T
        shapes = {"qkv": (rows, 3 * self.C), "out": (rows, self.C), "dout": (rows, self.C), "dqkv": (rows, 3 * self.C),
                  "lse": (self.B, self.n_head, self.T)}
        for name, x in bound.items():
            bound_at_least(x, shapes[name], f"attention B={self.B} T={self.T} C={self.C}", name)

    def forward(self, seq: Sequence, out, lse, qkv):
        """out (B*T, C) = causal softmax(q k^T / sqrt(hs)) v per head of qkv (B*T, 3C); lse (B, NH, T) written."""
        self._check(out=out, lse=lse, qkv=qkv)
        e = "attention_forward"
        seq.dispatch(self.k[e], self._grid(e), ap=self.params, qkv=qkv, out=out, lse=lse)

    def backward(self, seq: Sequence, dqkv, dout, qkv, out, lse):
        """dqkv (B*T, 3C) WRITTEN from dout (B*T, C) and the forward's qkv, out and lse. The dispatches: delta,
        then dq and dkv, or (dq "ds") dkv storing dS, then dq from it; or (backward "products") delta, S's product
        storing P, dP's storing scale dS, dV's and dK's (one dispatch where paired), dQ's."""
        if self.backward_mode == "none":
            raise GPUError("this attention op was made for the forward only (backward 'none'); make it with "
                           "backward='auto' to train")
        self._check(dqkv=dqkv, dout=dout, qkv=qkv, out=out, lse=lse)
        seq.dispatch(self.k["attention_backward_delta"], fold_grid(-(-self.B * self.n_head * self.T // 64)),
                     ap=self.params, dout=dout, out_in=out, delta=self.delta)
        pr = self.products
        if pr:
            s, dp = pr["s_buf"], pr["dp_buf"]
            pr["s"].dispatch(seq, out=s, a=qkv, b=qkv, row_in=lse)
            pr["dp"].dispatch(seq, out=dp, a=dout, b=qkv, row_in=self.delta, aux=s)
            if "dvk" in pr:
                pr["dvk"].dispatch(seq, out=dqkv, a=s, b=dout, a2=dp, b2=qkv)
            else:
                pr["dv"].dispatch(seq, out=dqkv, a=s, b=dout)
                pr["dk"].dispatch(seq, out=dqkv, a=dp, b=qkv)
            pr["dq"].dispatch(seq, out=dqkv, a=dp, b=qkv)
            return
        e = "attention_backward_dkv"
        dkv = lambda: seq.dispatch(self.k[e], self._grid(e), ap=self.params, qkv=qkv, dout=dout,  # noqa: E731
                                   lse_in=lse, delta_in=self.delta, dqkv=dqkv, ds_out=self.ds or self.no_ds)
        if self.dq == "ds":
            dkv()
            seq.dispatch(self.k["attention_backward_dq_ds"], (-(-self.T // DQ_QB), self.n_head, self.B),
                         ap=self.params, qkv=qkv, ds_in=self.ds, ds_in4=self.ds, dqkv=dqkv)
        else:
            e_q = "attention_backward_dq"
            seq.dispatch(self.k[e_q], self._grid(e_q), ap=self.params, qkv=qkv, dout=dout, lse_in=lse,
                         delta_in=self.delta, dqkv=dqkv)
            dkv()
