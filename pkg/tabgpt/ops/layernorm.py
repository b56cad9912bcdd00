"""LayerNorm (shaders/layernorm.wgsl): eps 1e-5, biased variance, as torch.nn.LayerNorm and llm.c.

    ln = await LayerNorm.create(dev, N=B*T, C=C)
    ln.forward(seq, out=y, mean=mean, rstd=rstd, inp=x, weight=w, bias=b)
    ln.backward(seq, dinp=dx, dweight=dw, dbias=db, dout=dy, inp=x, weight=w, mean=mean, rstd=rstd)

Shapes: inp, out, dout, dinp (N, C); weight, bias, dweight, dbias (C,); mean, rstd (N,); all f32, C a multiple of 4.
The backward ACCUMULATES into dinp (the residual stream's gradient, as llm.c) and into dweight and dbias
(gradient accumulation over micro-batches). dweight/dbias are reduced without atomics: per block of rows
into a scratch buffer, then the blocks summed in a fixed order, so results are bit-identical run to run.

A model's layernorms can make their parameter gradients together: created with deferred=K, backward(...,
defer=True) writes its block sums into the next of K slots of one scratch and leaves dweight and dbias pending, and
finish(seq) makes every pending one's in one dispatch (layernorm_param_grads_deferred, a table of where each one's
sums and gradients lie); until then the sequence refuses to build, run or be appended to another. So the 2 L + 1
layernorms of a model's backward cost 2 L + 2 dispatches instead of 4 L + 2, each of which waits for the one
before; K slots cost K x n_blocks x 2C floats (41 MB at the browser preset). Same sums in the same order:
bit-identical. Not with the subgroup kernels; on where deferred > 0 and fold=True, or
TABGPT_LAYERNORM_FOLD (default 1; 0 turns it off).

Row reductions use TPR threads per row, R = 64 / TPR rows per workgroup at once (the WGSL's header). The
forward's TPR is the smallest power of two with TPR * KMAX >= C / 4, at most 64: a thread holds at most KMAX = 8
vec4s of a row (32 floats in registers) and the per-row trees are as short as that allows, log2(TPR) barrier levels
shared by all R rows. So C = 384 (the browser preset, 96 vec4s) gets TPR 16, R 4: 6 vec4s per thread, 4-level
trees, 2 x 5 barriers per 4 rows (was 2 x 8 per row); C = 768 gets TPR 32, R 2; C <= 32 gets TPR 1, R 64 (no
tree). The forward runs ceil(N / R) workgroups. The backward's block of rows_per_block rows (8 for N = 8192) is
reduced R_b rows at a time, R_b = min(R, rows_per_block rounded up to a power of two) with TPR_b = 64 / R_b threads
per row, so that small blocks (1 row for N <= 1024) keep all 64 threads busy. The results depend on these choices
(summation order), which depend only on C and rows_per_block: bit-identical run to run.

With subgroups=True, or TABGPT_SUBGROUPS=1 where the device has subgroup operations (Device.subgroup_reductions;
off by default: on an H200 the trees were as fast or faster), the kernels of layernorm_subgroups.wgsl reduce
each row within one subgroup (a warp on NVIDIA) by subgroupAdd: no trees and no barriers in the forward (two
rows per workgroup, SG_ROWS), one barrier in the backward (whose subgroups take two rows at a time). Their row
sums are added in the device's subgroup order: the same results up to rounding, still bit-identical run to run
on one device.
"""

from __future__ import annotations

import struct

from tabgpt.gpu import Device, GPUError, Sequence, env_switch, is_cpu_adapter
from tabgpt.ops.elementwise import fold_grid, span

FILE = "layernorm.wgsl"
SG_FILE = "layernorm_subgroups.wgsl"
SG_ROWS = 2      # rows per forward workgroup of the subgroup kernels (SG_ROWS in SG_FILE)
WG = 64          # invocations per workgroup (WG in the WGSL)
MAX_ROWS = 64    # rows per backward block at most (MAX_ROWS in the WGSL)
KMAX = 8         # vec4s of a row per thread kept in registers (KMAX in the WGSL)


def pick_threads_per_row(C: int) -> int:
    """TPR for rows of C channels: the smallest power of two covering C / 4 vec4s with KMAX per thread, at most WG."""
    tpr = 1
    while tpr < WG and tpr * KMAX < C // 4:
        tpr *= 2
    return tpr


MAX_DEFERRED = 64   # layernorms per deferred dispatch (MAX_DEFERRED in the WGSL)


def rows_per_block_for(N: int, cpu: bool = False) -> int:
    """The backward's rows per block: about 1024 blocks, enough workgroups to fill a GPU, and partial sums (2C per
    block) that cost little next to the (N, C) tensors read. On CPU drivers (cpu=True), where each barrier switches
    between the workgroup's threads, blocks of 16 to 64 rows (16 blocks, a CPU's cores, up to 1024 rows; more
    beyond): fewer threads a row, shorter trees."""
    if cpu:
        return min(MAX_ROWS, max(16, -(-N // 16)))
    return min(MAX_ROWS, max(1, -(-N // 1024)))


def slot_bytes(N: int, C: int, rows_per_block: int) -> int:
    """One deferred backward's slot: its partial sums (n_blocks, 2, C) f32, rounded up to a binding offset."""
    return -(-4 * -(-N // rows_per_block) * 2 * C // 256) * 256


def deferred_bytes(N: int, C: int, count: int, fold: bool | None = None, max_buffer: int | None = None,
                   rows_per_block: int | None = None) -> int:
    """The scratch of `count` deferred backwards' partial sums (LayerNorm.create's deferred=), where they defer:
    folding on, and the slots within max_buffer (the device's max-buffer-size) where given; blocks of
    rows_per_block rows (default: a GPU's, rows_per_block_for)."""
    size = count * slot_bytes(N, C, rows_per_block or rows_per_block_for(N))
    if not fold_enabled(fold) or (max_buffer is not None and size > max_buffer):
        return 0
    return size


def fold_enabled(fold: bool | None = None) -> bool:
    """Whether deferred parameter gradients are made together: fold, else TABGPT_LAYERNORM_FOLD (0 or 1; default 1:
    with the attention's heaviest blocks first, training 1.0% faster on an H200, bench/results/h200/run80_*)."""
    return env_switch("TABGPT_LAYERNORM_FOLD", fold, default=True)


def grads_extent(entries) -> tuple[int, int]:
    """(start rounded down to a binding offset, end) of the gradients of LayerNorm.finish's entries
    (buffer, dweight offset, size, dbias offset, size, partial)."""
    return (min(min(e[1], e[3]) for e in entries) // 256 * 256, max(max(e[1] + e[2], e[3] + e[4]) for e in entries))


class LayerNorm:
    def __init__(self, dev, N, C, rows_per_block, tpr, kernels, params, partial, subgroups=False):
        self.dev, self.N, self.C = dev, N, C
        self.subgroups = subgroups        # the kernels of SG_FILE
        self.rows_per_block = rows_per_block
        self.n_blocks = (N + rows_per_block - 1) // rows_per_block
        self.tpr = tpr                    # threads per row (forward)
        self.rows_per_group = WG // tpr   # R: rows per forward workgroup
        self.tpr_backward = WG // min(WG // tpr, 1 << (rows_per_block - 1).bit_length())   # TPR_b (above)
        self.k = kernels
        self.params = params      # uniform LNParams
        self.partial = partial    # scratch (n_blocks, 2, C) f32
        self.slots = None         # deferred: a scratch of slots, each a partial, and the slot's bytes
        self.pending = []         # (sequence, dweight, dbias, slot) of each deferred backward

    @classmethod
    async def create(cls, dev: Device, N: int, C: int, rows_per_block: int | None = None,
                     threads_per_row: int | None = None, subgroups: bool | None = None, deferred: int = 0,
                     fold: bool | None = None) -> "LayerNorm":
        """threads_per_row (the forward's TPR, a power of two in 1..64) overrides the choice above (tests);
        subgroups picks the subgroup kernels (True) or the workgroup-memory trees (False) instead of the device's
        default (Device.subgroup_reductions); deferred: how many backwards may defer their parameter gradients
        to finish() (above; fold, else TABGPT_LAYERNORM_FOLD, turns it on; not with the subgroup kernels)."""
        if C % 4:
            raise GPUError(f"LayerNorm needs C (n_embd) to be a multiple of 4, got {C}")
        rows_per_block = rows_per_block or rows_per_block_for(N, is_cpu_adapter(dev))
        if not 1 <= rows_per_block <= MAX_ROWS:
            raise GPUError(f"rows_per_block must be in 1..{MAX_ROWS}, got {rows_per_block}")
        tpr = threads_per_row or pick_threads_per_row(C)
        if not (1 <= tpr <= WG and tpr & (tpr - 1) == 0):
            raise GPUError(f"threads_per_row must be a power of two in 1..{WG}, got {tpr}")
        n_blocks = (N + rows_per_block - 1) // rows_per_block
        params = dev.uniform(struct.pack("<4I", N, C // 4, rows_per_block, n_blocks), "layernorm-params")
        partial = dev.buffer(4 * n_blocks * 2 * C, "layernorm-partial")
        if subgroups is None:
            subgroups = dev.subgroup_reductions()
        elif subgroups and not dev.has_subgroup_ops():
            raise GPUError("this device has no subgroup operations (the subgroups feature and the subgroup_id "
                           "builtin): create LayerNorm with subgroups=False")
        self = cls(dev, N, C, rows_per_block, tpr, {}, params, partial, subgroups)
        if subgroups:
            self.k = {name: await dev.kernel_of([SG_FILE, FILE], name + "_sg")
                      for name in ("layernorm_forward", "layernorm_backward", "layernorm_param_grads")}
        else:
            # the parameter gradients' threads: no more than the blocks they sum (the same sums, fewer barriers)
            pwg = {"PWG": min(WG, 1 << (self.n_blocks - 1).bit_length())}
            self.k = {"layernorm_forward": await dev.kernel(FILE, "layernorm_forward", constants={"TPR": tpr}),
                      "layernorm_backward": await dev.kernel(FILE, "layernorm_backward",
                                                             constants={"TPR": self.tpr_backward}),
                      "layernorm_param_grads": await dev.kernel(FILE, "layernorm_param_grads", constants=pwg)}
            # (where the slots outgrow one buffer, as for very large models in a browser, each makes its own)
            if deferred > 0 and deferred_bytes(N, C, deferred, fold, dev.limits["max-buffer-size"], rows_per_block):
                slot = slot_bytes(N, C, rows_per_block)
                self.k["layernorm_param_grads_deferred"] = await dev.kernel(FILE, "layernorm_param_grads_deferred",
                                                                            constants=pwg)
                self.slots = (dev.buffer(deferred * slot, "layernorm-deferred-partials"), slot, deferred)
        return self

    @property
    def defers(self) -> bool:
        """Whether backward(defer=True) leaves the parameter gradients to finish()."""
        return self.slots is not None

    def forward(self, seq: Sequence, out, mean, rstd, inp, weight, bias):
        """out (N, C) = layernorm(inp (N, C)) * weight (C,) + bias (C,); writes mean, rstd (N,) for the backward."""
        groups = -(-self.N // (SG_ROWS if self.subgroups else self.rows_per_group))
        seq.dispatch(self.k["layernorm_forward"], fold_grid(groups), lp=self.params,
                     out=out, mean=mean, rstd=rstd, inp=inp, weight=weight, bias=bias)

    def backward(self, seq: Sequence, dinp, dweight, dbias, dout, inp, weight, mean, rstd, defer: bool = False):
        """dinp (N, C) += d/dinp; dweight, dbias (C,) += their gradients. Two dispatches; one with defer=True
        where the op defers (self.defers), and dweight, dbias complete only after finish(seq)."""
        if self.pending and self.pending[0][0] is not seq:
            raise GPUError("layernorm backwards are pending on another sequence: call finish() on that one first")
        defer = defer and self.defers
        if defer:
            scratch, slot, count = self.slots
            if len(self.pending) == count:
                raise GPUError(f"more than {count} deferred layernorm backwards: call finish() first, or create "
                               f"the LayerNorm with more (deferred=)")
            part = scratch.view(len(self.pending) * slot, self.partial.size)
        else:
            part = self.partial
        seq.dispatch(self.k["layernorm_backward"], fold_grid(self.n_blocks), lp=self.params,
                     dinp=dinp, partial=part, dout=dout, inp=inp, weight=weight, mean=mean, rstd=rstd)
        if defer:
            self.pending.append((seq, dweight, dbias, part))
            seq.owed[id(self)] = "deferred layernorm backwards pending: call LayerNorm.finish(seq)"
        else:
            self._param_grads(seq, part, dweight, dbias)

    def _param_grads(self, seq, part, dweight, dbias):
        seq.dispatch(self.k["layernorm_param_grads"], (2 * self.C // 4,), lp=self.params,
                     partial_in=part, dweight=dweight, dbias=dbias)

    def finish(self, seq: Sequence):
        """The parameter gradients of every backward deferred on seq (none: nothing): one dispatch for as many as
        one binding of their gradients and one of their sums hold (MAX_DEFERRED at most), one each for any whose
        gradients are not 16-byte aligned in one buffer."""
        if not self.pending:
            return
        if self.pending[0][0] is not seq:
            raise GPUError("the pending layernorm backwards were recorded on another sequence")
        pending, self.pending = self.pending, []
        limit = self.dev.limits["max-storage-buffer-binding-size"]
        group = []

        def flush():
            if group:
                self._param_grads_together(seq, group)
                group.clear()
        for _, dweight, dbias, part in pending:
            (wbuf, woff, wsize), (bbuf, boff, bsize) = span(dweight), span(dbias)
            if wbuf is not bbuf or woff % 16 or boff % 16:   # on its own (the group goes on: each gradient's
                self._param_grads(seq, part, dweight, dbias)    # sums are its own, in any order)
                continue
            entry = (wbuf, woff, wsize, boff, bsize, part)
            trial = group + [entry]
            lo, hi = grads_extent(trial)
            p_lo, p_hi = trial[0][5].offset, trial[-1][5].offset + trial[-1][5].size
            # two backwards into the same gradients (never in a model) stay in different dispatches, in order
            shared = any(a < b + m and b < a + n for e in group for b, m in ((e[1], e[2]), (e[3], e[4]))
                         for a, n in ((woff, wsize), (boff, bsize)))
            if group and (wbuf is not group[0][0] or len(trial) > MAX_DEFERRED or hi - lo > limit
                          or p_hi - p_lo > limit or shared):
                flush()
            group.append(entry)
        flush()
        seq.owed.pop(id(self), None)     # (a dispatch that failed above leaves the sequence refusing to run)

    def _param_grads_together(self, seq, group):
        buf = group[0][0]
        lo, hi = grads_extent(group)
        parts = [e[5] for e in group]
        p_lo = parts[0].offset
        table = b"".join(struct.pack("<4I", (p.offset - p_lo) // 16, (woff - lo) // 16, (boff - lo) // 16, 0)
                         for (_, woff, _, boff, _, _), p in zip(group, parts))
        seq.dispatch(self.k["layernorm_param_grads_deferred"], (2 * self.C // 4, len(group)), lp=self.params,
                     partial_in=parts[0].buffer.view(p_lo, parts[-1].offset + parts[-1].size - p_lo),
                     grads=buf.view(lo, hi - lo), deferred=self.dev.uniform(table.ljust(16 * MAX_DEFERRED, b"\0"),
                                                                             "layernorm-deferred"))
