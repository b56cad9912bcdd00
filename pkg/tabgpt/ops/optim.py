"""AdamW with global gradient-norm clipping (shaders/adamw.wgsl), entirely on the GPU.

    opt = await AdamW.create(dev, n_params=P, decay_ranges=[(offset, count), ...])   # the 2-D weights
    opt.step(seq, params=params, grads=grads, m=m, v=v)    # appended once to the update sequence
    ...
    opt.write_step(t=step + 1, lr=get_lr(step, cfg))       # every step, before the sequence runs
    stats = await opt.read_stats()                         # when the trainer wants: norm, scale, skip, skipped
    norms = await opt.read_norms([t1, t2])                 # past steps' norms (a ring of `ring` steps)

params, grads, m, v: P f32 each (Buffers or Views; P may exceed one storage binding: they are bound in chunks).
Per step: the sum of squares of grads in fixed-size blocks, then one workgroup adds the blocks up in order
(deterministic), giving norm and the clip scale min(1, max_norm / (norm + 1e-6)); the update then reads that
scale from the GPU, so nothing waits for the CPU. torch.optim.AdamW's update, on grads * scale:
    p *= 1 - lr * wd                       (only elements inside decay_ranges)
    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
A non-finite norm (a NaN or inf anywhere in grads) skips the update: params, m and v stay untouched and the
`skipped` counter goes up. t keeps counting in the caller's hands either way.
"""

from __future__ import annotations

import array
import math
import struct

from tabgpt.gpu import Device, GPUError, Sequence
from tabgpt.ops.elementwise import chunk_views, fold_grid, workgroup_threads

FILE = "adamw.wgsl"
PER_THREAD = 16   # elements a thread adds to a partial sum of squares (PER_THREAD in the WGSL)
STATS_HEADER = 16  # bytes before the history ring: norm f32, scale f32, skip u32, skipped u32


def decay_mask(n_params: int, decay_ranges) -> array.array:
    """One bit per parameter, set inside the (offset, count) ranges: ceil(n_params / 32) u32 words."""
    words = array.array("I", bytes(4 * max(1, (n_params + 31) // 32)))
    for offset, count in decay_ranges:
        start, end = offset, offset + count
        if start < 0 or end > n_params:
            raise GPUError(f"decay range ({offset}, {count}) outside the {n_params} parameters")
        while start < end and start % 32:                      # leading partial word
            words[start // 32] |= 1 << (start % 32)
            start += 1
        full = (end - start) // 32                             # whole words
        if full:
            words[start // 32:start // 32 + full] = array.array("I", [0xFFFFFFFF]) * full
            start += 32 * full
        while start < end:                                     # trailing partial word
            words[start // 32] |= 1 << (start % 32)
            start += 1
    return words


class AdamW:
    def __init__(self, dev, n_params, kernels, pieces, hyper, chunk_params, partials, stats, decay, ring, limit, wg):
        self.dev, self.n_params = dev, n_params
        self.wg, self.part = wg, wg * PER_THREAD   # threads a workgroup; elements a partial sum of squares
        self.k = kernels
        self.pieces = pieces              # [(base element, count)] one per binding chunk
        self.hyper = hyper                # uniform Hyper, rewritten by write_step()
        self.chunk_params = chunk_params  # uniform Chunk per piece
        self.partials = partials          # scratch (n_partials,) f32
        self.n_partials = partials.size // 4
        self.stats = stats                # Stats: norm, scale, skip, skipped, history (ring,)
        self.decay = decay                # (ceil(P/32),) u32 bit mask
        self.ring = ring
        self.limit = limit                # bytes per binding chunk
        self.write_step(t=1, lr=0.0)

    @classmethod
    async def create(cls, dev: Device, n_params: int, decay_ranges=(), ring: int = 256,
                     max_binding: int | None = None, threads: int | None = None) -> "AdamW":
        """decay_ranges: (offset, count) element ranges of the flat vector that get weight decay (the 2-D weights).
        ring: how many past steps' norms stay readable. max_binding: bytes per chunk (default: the device limit).
        threads: a workgroup's (a power of two, 1..256) instead of the adapter's (elementwise.TREE_WG, TREE_WG_CPU
        on CPU drivers)."""
        if n_params >= 1 << 32:
            raise GPUError(f"{n_params} parameters do not fit 32-bit indices")
        if ring < 1:
            raise GPUError("the norm history needs a ring of at least one step")
        limit = (max_binding or dev.limits["max-storage-buffer-binding-size"]) // 256 * 256
        per_piece = limit // 4
        pieces = [(s, min(per_piece, n_params - s)) for s in range(0, n_params, per_piece)]
        wg = workgroup_threads(dev, threads, "AdamW")
        kernels = {name: await dev.kernel(FILE, name, constants={"WG": wg})
                   for name in ("grad_norm_partial", "grad_norm_finish", "adamw_update")}
        chunk_params, part_base = [], 0
        for base, count in pieces:
            chunk_params.append(dev.uniform(struct.pack("<4I", base, count, part_base, 0), "adamw-chunk"))
            part_base += -(-count // (wg * PER_THREAD))
        partials = dev.buffer(4 * part_base, "grad-norm-partials")
        stats = dev.buffer(STATS_HEADER + 4 * ring, "grad-stats")
        decay = dev.buffer(4 * ((n_params + 31) // 32), "decay-mask", decay_mask(n_params, decay_ranges))
        hyper = dev.uniform(bytes(48), "adamw-hyper")
        return cls(dev, n_params, kernels, pieces, hyper, chunk_params, partials, stats, decay, ring, limit, wg)

    def write_step(self, t: int, lr: float, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.1, max_norm: float = 1.0):
        """The step's hyperparameters (t counts from 1, as torch); a uniform write, so no recompiles."""
        if t < 1:
            raise ValueError(f"the AdamW step t counts from 1, got {t}")
        step_size = lr / (1.0 - beta1 ** t)
        bc2_sqrt = math.sqrt(1.0 - beta2 ** t)
        data = struct.pack("<8f4I", lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt, max_norm,
                           t, self.ring, self.n_partials, 0)
        self.dev.write(self.hyper, data)

    def grad_norm(self, seq: Sequence, grads):
        """stats.norm = ||grads (P,)||, stats.scale = the clip scale, stats.skip = the norm is not finite."""
        for (base, count), cp, (_, views) in zip(self.pieces, self.chunk_params,
                                                 chunk_views(self.dev, self.n_params, {"grads": grads},
                                                             limit=self.limit)):
            seq.dispatch(self.k["grad_norm_partial"], fold_grid(-(-count // self.part)), ck=cp,
                         partials=self.partials, **views)
        seq.dispatch(self.k["grad_norm_finish"], (1,), hp=self.hyper, partials=self.partials, stats=self.stats)

    def update(self, seq: Sequence, params, grads, m, v):
        """params, m, v (P,) updated in place from grads (P,), clipped by stats.scale (after grad_norm)."""
        operands = {"params": params, "grads": grads, "m": m, "v": v}
        for (base, count), cp, (_, views) in zip(self.pieces, self.chunk_params,
                                                 chunk_views(self.dev, self.n_params, operands, limit=self.limit)):
            seq.dispatch(self.k["adamw_update"], fold_grid(-(-count // self.wg)), hp=self.hyper, ck=cp,
                         stats=self.stats, decay=self.decay, **views)

    def step(self, seq: Sequence, params, grads, m, v):
        """grad_norm, then update: the whole optimizer step."""
        self.grad_norm(seq, grads)
        self.update(seq, params, grads, m, v)

    @staticmethod
    def parse_stats(data: bytes) -> dict:
        norm, scale, skip, skipped = struct.unpack_from("<ffII", data)
        return {"norm": norm, "scale": scale, "skip": bool(skip), "skipped": skipped}

    async def read_stats(self) -> dict:
        """The latest step's norm, clip scale, whether it was skipped, and how many updates were skipped."""
        return self.parse_stats(await self.dev.read(self.stats, 0, STATS_HEADER))

    async def read_norms(self, steps) -> list[float]:
        """The gradient norm of each step t in `steps` (the last `ring` steps only); NaN/inf: skipped."""
        data = await self.dev.read(self.stats, STATS_HEADER, 4 * self.ring)
        history = struct.unpack(f"<{self.ring}f", data)
        return [history[t % self.ring] for t in steps]
