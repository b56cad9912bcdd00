"""Token + position embedding (shaders/embedding.wgsl), forward and a deterministic backward.

    emb = await Embedding.create(dev, B=B, T=T, C=C, Vp=Vp)
    emb.forward(seq, out=x, idx=idx, wte=wte, wpe=wpe)       # x (B*T, C) = wte[idx] + wpe[t]
    emb.backward(seq, dwte=dwte, dwpe=dwpe, dout=dx, idx=idx)

Shapes: idx (B*T,) u32; wte, dwte (Vp, C); wpe, dwpe (at least T rows, C); out, dout (B*T, C); f32, C a multiple
of 4. The backward ACCUMULATES into dwte and dwpe. Without float atomics, the token rows are grouped on the GPU:
the keys tok * B*T + n are sorted (bitonic, in about (log2 n_pad)^2 / 2 stages, most in workgroup memory), then
each token's run of rows is summed in sorted order, long runs in pieces of 32 rows by many workgroups and the pieces
added up in order. The result is bit-identical run to run.
"""

from __future__ import annotations

import struct

from tabgpt.gpu import Device, GPUError, Sequence
from tabgpt.ops.elementwise import fold_grid

FILE = "embedding.wgsl"
WG = 256        # WG in the WGSL
BLOCK = 1024    # BLOCK in the WGSL: keys sorted per workgroup
SEG = 32        # SEG in the WGSL: sorted rows per segment of the dwte sums


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
    async def create(cls, dev: Device, B: int, T: int, C: int, Vp: int) -> "Embedding":
        N = B * T
        if C % 4:
            raise GPUError(f"Embedding needs C (n_embd) to be a multiple of 4, got {C}")
        if Vp * N >= 1 << 32:
            raise GPUError(f"Embedding backward sorts keys tok * B*T + n in 32 bits: Vp * B*T = {Vp * N} is too "
                           f"large; use a smaller batch or vocabulary")
        names = ("encoder_forward", "encoder_backward_wpe", "sort_start", "sort_merge_global", "sort_merge_local",
                 "encoder_backward_wte", "encoder_backward_wte_runs")
        kernels = {name: await dev.kernel(FILE, name) for name in names}
        params = dev.uniform(struct.pack("<4I", N, T, C // 4, Vp), "embedding-params")
        n_pad = BLOCK
        while n_pad < N:
            n_pad *= 2
        keys = dev.buffer(4 * n_pad, "embedding-sort-keys")
        pieces = dev.buffer(4 * 2 * ((N + SEG - 1) // SEG) * C, "embedding-run-pieces")
        # The bitonic network: blocks sorted locally, then for each larger k the long-range stages one dispatch
        # each, and the stages that fit a block together.
        blocks = n_pad // BLOCK
        passes = [("sort_start", dev.uniform(struct.pack("<4I", n_pad, 0, 0, 0), "sort-params"), (blocks,))]
        k = 2 * BLOCK
        while k <= n_pad:
            j = k // 2
            while j >= BLOCK:
                u = dev.uniform(struct.pack("<4I", n_pad, k, j, 0), "sort-params")
                passes.append(("sort_merge_global", u, fold_grid((n_pad // 2 + WG - 1) // WG)))
                j //= 2
            passes.append(("sort_merge_local", dev.uniform(struct.pack("<4I", n_pad, k, 0, 0), "sort-params"),
                           (blocks,)))
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
