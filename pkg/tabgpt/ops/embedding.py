"""Token + position embedding (shaders/embedding.wgsl), forward and a deterministic backward.

    emb = await Embedding.create(dev, B=B, T=T, C=C, Vp=Vp)
    emb.forward(seq, out=x, idx=idx, wte=wte, wpe=wpe)       # x (B*T, C) = wte[idx] + wpe[t]
    emb.backward(seq, dwte=dwte, dwpe=dwpe, dout=dx, idx=idx)

Shapes: idx (B*T,) u32; wte, dwte (Vp, C); wpe, dwpe (at least T rows, C); out, dout (B*T, C); f32, C a multiple
of 4. The backward ACCUMULATES into dwte and dwpe. Without float atomics, the token rows are grouped on the GPU:
the keys tok * B*T + n are sorted (bitonic, in about (log2 n_pad)^2 / 2 stages, most in workgroup memory), then
each token's run of rows is summed in sorted order, long runs in pieces of 32 rows by many workgroups and the pieces
added up in order. The result is bit-identical run to run.

The sort's first kernel sorts blocks of 1024 keys (a workgroup each); the stages that follow run in blocks as large
as the device's workgroup memory holds (`sort_shape`: 8192 keys in 32 KiB), so that on a GPU the 8192 keys of the
presets' batches are sorted by two dispatches, where blocks of 1024 keys throughout took ten (the blocks' sort, six
stages whose pairs lie blocks apart, three merges in the blocks). CPU drivers keep blocks of 1024 keys and 256
threads (each barrier switches between all of a workgroup's threads there).
"""

from __future__ import annotations

import struct

from tabgpt.gpu import Device, GPUError, Sequence, is_cpu_adapter
from tabgpt.ops.elementwise import fold_grid

FILE = "embedding.wgsl"
WG = 256        # WG in the WGSL
BLOCK = 1024    # BLOCK in the WGSL: keys sorted per workgroup (at least; CPU drivers' size)
SORT_WG = 256   # SWG in the WGSL: threads sorting a block of BLOCK keys
MAX_SORT_WG = 1024
SEG = 32        # SEG in the WGSL: sorted rows per segment of the dwte sums


def sort_shape(dev: Device, N: int, block: int | None = None, threads: int | None = None) -> tuple[int, int]:
    """(keys per block, threads per block) of the embedding backward's sort of N keys. The block: given, else 1024
    on CPU drivers, else the largest power of two from 1024 whose keys fit the device's workgroup memory, no larger
    than N's next power of two. The threads: given, else 256 for 1024 keys or on CPU drivers, else up to 1024; half
    the block at most, and within the device's limits."""
    lim = dev.limits
    storage = lim["max-compute-workgroup-storage-size"]
    cpu = is_cpu_adapter(dev)
    if block is None:
        block = BLOCK
        while not cpu and block < N and 8 * block <= storage:
            block *= 2
    if block < 2 or block & (block - 1) or 4 * block > storage:
        raise GPUError(f"the embedding sort's block must be a power of two whose keys fit the workgroup memory "
                       f"({storage} bytes), got {block}")
    if threads is None:
        threads = SORT_WG if cpu or block <= BLOCK else MAX_SORT_WG
    if threads < 1:
        raise GPUError(f"the embedding sort needs at least one thread a workgroup, got {threads}")
    threads = min(threads, block // 2, lim["max-compute-invocations-per-workgroup"],
                  lim["max-compute-workgroup-size-x"])
    return block, 1 << (threads.bit_length() - 1)


class Embedding:
    def __init__(self, dev, B, T, C, Vp, kernels, params, keys, pieces, sort_passes):
        self.dev, self.B, self.T, self.C, self.Vp = dev, B, T, C, Vp
        self.N = B * T
        self.k = kernels
        self.params = params            # uniform EmbParams
        self.keys = keys                # scratch (n_pad,) u32
        self.n_pad = keys.size // 4
        self.pieces = pieces            # scratch (2 * ceil(N / SEG), C) f32: partial sums of long runs
        self.sort_passes = sort_passes  # [(entry, uniform SortParams, workgroups)]

    @classmethod
    async def create(cls, dev: Device, B: int, T: int, C: int, Vp: int, block: int | None = None,
                     threads: int | None = None) -> "Embedding":
        """block, threads: the keys a workgroup sorts and its threads (sort_shape's choice unless given)."""
        N = B * T
        if C % 4:
            raise GPUError(f"Embedding needs C (n_embd) to be a multiple of 4, got {C}")
        if Vp * N >= 1 << 32:
            raise GPUError(f"Embedding backward sorts keys tok * B*T + n in 32 bits: Vp * B*T = {Vp * N} is too "
                           f"large; use a smaller batch or vocabulary")
        names = ("encoder_forward", "encoder_backward_wpe", "sort_start", "sort_merge_global", "sort_merge_local",
                 "encoder_backward_wte", "encoder_backward_wte_runs")
        block, threads = sort_shape(dev, N, block, threads)
        start = min(block, BLOCK)     # sort_start's blocks: many workgroups at once, then merged in the large ones
        constants = {"sort_start": {"BLOCK": start, "SWG": min(SORT_WG, start // 2, threads)},
                     "sort_merge_local": {"BLOCK": block, "SWG": threads}}
        kernels = {name: await dev.kernel(FILE, name, constants.get(name)) for name in names}
        params = dev.uniform(struct.pack("<4I", N, T, C // 4, Vp), "embedding-params")
        n_pad = block                 # at least one block
        while n_pad < N:
            n_pad *= 2
        keys = dev.buffer(4 * n_pad, "embedding-sort-keys")
        pieces = dev.buffer(4 * 2 * ((N + SEG - 1) // SEG) * C, "embedding-run-pieces")
        # The bitonic network: sort_start's blocks sorted (every k up to `start`), then every k up to `block` in
        # the large blocks at once, then for each larger k the long-range stages one dispatch each and the stages
        # that fit a block together.
        blocks = n_pad // block
        sp = lambda k, j, k_end: dev.uniform(struct.pack("<4I", n_pad, k, j, k_end), "sort-params")  # noqa: E731
        passes = [("sort_start", sp(0, 0, 0), (n_pad // start,))]
        if start < block:
            passes.append(("sort_merge_local", sp(2 * start, 0, block), (blocks,)))
        k = 2 * block
        while k <= n_pad:
            j = k // 2
            while j >= block:
                passes.append(("sort_merge_global", sp(k, j, 0), fold_grid((n_pad // 2 + WG - 1) // WG)))
                j //= 2
            passes.append(("sort_merge_local", sp(k, 0, k), (blocks,)))
            k *= 2
        return cls(dev, B, T, C, Vp, kernels, params, keys, pieces, passes)

    def forward(self, seq: Sequence, out, idx, wte, wpe):
        """out (B*T, C) = wte[idx] + wpe[t] for row n = b*T + t."""
        seq.dispatch(self.k["encoder_forward"], fold_grid((self.N * self.C // 4 + WG - 1) // WG), ep=self.params,
                     out=out, idx=idx, wte=wte, wpe=wpe)

    def backward(self, seq: Sequence, dwte, dwpe, dout, idx):
        """dwpe[t] += sum_b dout[b*T + t]; dwte[v] += sum of the dout rows whose token is v."""
        seq.dispatch(self.k["encoder_backward_wpe"], fold_grid((self.T * self.C // 4 + WG - 1) // WG),
                     ep=self.params, dwpe=dwpe, dout=dout)
        for entry, sort_params, groups in self.sort_passes:
            seq.dispatch(self.k[entry], groups, ep=self.params, sp=sort_params, idx=idx, keys=self.keys)
        for entry in ("encoder_backward_wte", "encoder_backward_wte_runs"):
            seq.dispatch(self.k[entry], fold_grid(self.N), ep=self.params, keys=self.keys, pieces=self.pieces,
                         dout=dout, dwte=dwte)
