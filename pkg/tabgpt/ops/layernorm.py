"""LayerNorm (shaders/layernorm.wgsl): eps 1e-5, biased variance, as torch.nn.LayerNorm and llm.c.

    ln = await LayerNorm.create(dev, N=B*T, C=C)
    ln.forward(seq, out=y, mean=mean, rstd=rstd, inp=x, weight=w, bias=b)
    ln.backward(seq, dinp=dx, dweight=dw, dbias=db, dout=dy, inp=x, weight=w, mean=mean, rstd=rstd)

Shapes: inp, out, dout, dinp (N, C); weight, bias, dweight, dbias (C,); mean, rstd (N,); all f32, C a multiple of 4.
The backward ACCUMULATES into dinp (the residual stream's gradient, as llm.c) and into dweight and dbias
(gradient accumulation over micro-batches). dweight/dbias are reduced without atomics: per block of rows
into a scratch buffer, then the blocks summed in a fixed order, so results are bit-identical run to run.
"""

from __future__ import annotations

import struct

from tabgpt.gpu import Device, GPUError, Sequence
from tabgpt.ops.elementwise import fold_grid

FILE = "layernorm.wgsl"
WG = 64          # invocations per workgroup (WG in the WGSL)
MAX_ROWS = 64    # rows per backward block at most (MAX_ROWS in the WGSL)


class LayerNorm:
    def __init__(self, dev, N, C, rows_per_block, kernels, params, partial):
        self.dev, self.N, self.C = dev, N, C
        self.rows_per_block = rows_per_block
        self.n_blocks = (N + rows_per_block - 1) // rows_per_block
        self.k = kernels
        self.params = params      # uniform LNParams
        self.partial = partial    # scratch (n_blocks, 2, C) f32

    @classmethod
    async def create(cls, dev: Device, N: int, C: int, rows_per_block: int | None = None) -> "LayerNorm":
        if C % 4:
            raise GPUError(f"LayerNorm needs C (n_embd) to be a multiple of 4, got {C}")
        # About 1024 row blocks: enough workgroups to fill a GPU, and partial sums (2C per block) that cost
        # little next to the (N, C) tensors read.
        rows_per_block = rows_per_block or min(MAX_ROWS, max(1, -(-N // 1024)))
        if not 1 <= rows_per_block <= MAX_ROWS:
            raise GPUError(f"rows_per_block must be in 1..{MAX_ROWS}, got {rows_per_block}")
        n_blocks = (N + rows_per_block - 1) // rows_per_block
        kernels = {name: await dev.kernel(FILE, name)
                   for name in ("layernorm_forward", "layernorm_backward", "layernorm_param_grads")}
        params = dev.uniform(struct.pack("<4I", N, C // 4, rows_per_block, n_blocks), "layernorm-params")
        partial = dev.buffer(4 * n_blocks * 2 * C, "layernorm-partial")
        return cls(dev, N, C, rows_per_block, kernels, params, partial)

    def forward(self, seq: Sequence, out, mean, rstd, inp, weight, bias):
        """out (N, C) = layernorm(inp (N, C)) * weight (C,) + bias (C,); writes mean, rstd (N,) for the backward."""
        seq.dispatch(self.k["layernorm_forward"], fold_grid(self.N), lp=self.params,
                     out=out, mean=mean, rstd=rstd, inp=inp, weight=weight, bias=bias)

    def backward(self, seq: Sequence, dinp, dweight, dbias, dout, inp, weight, mean, rstd):
        """dinp (N, C) += d/dinp; dweight, dbias (C,) += their gradients. Two dispatches."""
        seq.dispatch(self.k["layernorm_backward"], fold_grid(self.n_blocks), lp=self.params,
                     dinp=dinp, partial=self.partial, dout=dout, inp=inp, weight=weight, mean=mean, rstd=rstd)
        seq.dispatch(self.k["layernorm_param_grads"], (2 * self.C // 4,), lp=self.params,
                     partial=self.partial, dweight=dweight, dbias=dbias)
