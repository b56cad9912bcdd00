"""Elementwise ops (shaders/elementwise.wgsl): GELU forward/backward, residual add, fill, scale, copy.

    ew = await Elementwise.create(dev)
    ew.gelu_forward(seq, out=h, inp=pre, n=B*T*4*C)
    ew.gelu_backward_inplace(seq, dinout=dh, inp=pre, n=B*T*4*C)   # dh = gelu'(pre) * dh
    ew.add(seq, out=x2, a=x1, b=y, n=B*T*C)                        # residual: x2 = x1 + y
    ew.accumulate(seq, out=dx1, inp=dx2, n=B*T*C)                  # residual backward: dx1 += dx2
    ew.zero(seq, grads)                                            # once per optimizer step

One object per device: the kernels are compiled once, and each call binds its own small uniform (so one object
serves every shape). n counts floats; the GELU/add kernels read vec4s, so there n must be a multiple of 4.
Operands larger than the device's storage binding limit are split into several dispatches of views.
"""

from __future__ import annotations

import math
import struct

from tabgpt.gpu import Buffer, Device, GPUError, Sequence, View, is_cpu_adapter

FILE = "elementwise.wgsl"
WG = 256  # invocations per workgroup in every kernel here
MAX_GROUPS = 65535


TREE_WG = 256      # threads of a workgroup that sums a row by a tree (cross-entropy, AdamW's norm) on GPUs
TREE_WG_CPU = 32   # on CPU drivers, where a barrier switches between the workgroup's threads: shorter trees


def workgroup_threads(dev: Device, threads: int | None, what: str, gpu: int = TREE_WG,
                      cpu: int = TREE_WG_CPU) -> int:
    """A kernel's threads a workgroup: `threads` where given, else `cpu` on CPU drivers (where each barrier switches
    between all of a workgroup's threads: shorter trees pay) and `gpu` elsewhere; a power of two in 1..256."""
    wg = threads or (cpu if is_cpu_adapter(dev) else gpu)
    if not (1 <= wg <= 256 and wg & (wg - 1) == 0):
        raise GPUError(f"{what} threads must be a power of two in 1..256, got {wg}")
    return wg


def fold_grid(groups: int) -> tuple[int, int, int]:
    """A 1-D count of workgroups as a grid within the 65535-per-dimension limit; kernels flatten (x, y) back and
    skip the few surplus workgroups of the last row."""
    groups = max(1, int(groups))
    gx = min(groups, MAX_GROUPS)
    return (gx, (groups + gx - 1) // gx, 1)


def span(x: Buffer | View) -> tuple[Buffer, int, int]:
    """(buffer, byte offset, byte size) of a buffer or view."""
    if isinstance(x, Buffer):
        return x, 0, x.size
    if isinstance(x, View):
        return x.buffer, x.offset, x.size
    raise GPUError(f"expected a gpu.Buffer or gpu.View, got {type(x).__name__}")


def bound_at_least(x: Buffer | View, shape: tuple, what: str, name: str) -> tuple[Buffer, int]:
    """(buffer, byte offset) of x, after checking that it binds at least `shape` f32s (what: the op, for the error;
    name: the operand)."""
    buf, off, size = span(x)
    need = 4 * math.prod(shape)
    if size < need:
        raise GPUError(f"{what}: {name} binds {size} bytes, needs {shape} f32 = {need}")
    return buf, off


def chunk_views(dev: Device, n: int, operands: dict, unit: int = 4, limit: int | None = None
                ) -> list[tuple[int, dict]]:
    """Split n floats of several same-length operands into pieces that each fit one storage binding
    (`limit` bytes, by default the device's limit).

    Returns [(floats in piece, {name: View})]. Piece boundaries are multiples of 256 bytes, so operands that start
    256-byte aligned (every Buffer and View does) stay aligned.
    """
    limit = (limit or dev.limits["max-storage-buffer-binding-size"]) // 256 * 256
    per_piece = limit // 4 // unit * unit
    spans = {}
    for name, x in operands.items():
        buf, off, size = span(x)
        if size < 4 * n:
            raise GPUError(f"{name}: {size} bytes bound, but the op needs {n} floats ({4 * n} bytes)")
        spans[name] = (buf, off)
    pieces = []
    for start in range(0, n, per_piece):
        count = min(per_piece, n - start)
        pieces.append((count, {name: buf.view(off + 4 * start, 4 * count) for name, (buf, off) in spans.items()}))
    return pieces


class Elementwise:
    def __init__(self, dev: Device, kernels: dict):
        self.dev = dev
        self.k = kernels

    @classmethod
    async def create(cls, dev: Device) -> "Elementwise":
        names = ["gelu_forward", "gelu_backward", "gelu_backward_inplace", "add", "accumulate", "fill", "scale",
                 "copy"]
        return cls(dev, {name: await dev.kernel(FILE, name) for name in names})

    def _run(self, seq: Sequence, entry: str, n: int, operands: dict, value: float = 0.0, vec4: bool = False):
        if n is None:
            n = min(span(x)[2] for x in operands.values()) // 4
        if n <= 0:
            return
        if vec4 and n % 4:
            raise GPUError(f"{entry}: n = {n} floats must be a multiple of 4 (rows are read as vec4)")
        for count, views in chunk_views(self.dev, n, operands, unit=4 if vec4 else 1):
            items = count // 4 if vec4 else count
            params = self.dev.uniform(struct.pack("<IfII", items, value, 0, 0), f"{entry}-params")
            seq.dispatch(self.k[entry], fold_grid((items + WG - 1) // WG), ep=params, **views)

    # -- GELU, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    def gelu_forward(self, seq: Sequence, out, inp, n: int | None = None):
        """out (n,) = gelu(inp (n,))."""
        self._run(seq, "gelu_forward", n, {"out": out, "inp": inp}, vec4=True)

    def gelu_backward(self, seq: Sequence, dinp, inp, dout, n: int | None = None):
        """dinp (n,) = gelu'(inp) * dout: WRITTEN, not accumulated."""
        self._run(seq, "gelu_backward", n, {"dinp": dinp, "inp": inp, "dout": dout}, vec4=True)

    def gelu_backward_inplace(self, seq: Sequence, dinout, inp, n: int | None = None):
        """dinout (n,) holds dout and is overwritten with dinp = gelu'(inp) * dout (as llm.c, saves a buffer)."""
        self._run(seq, "gelu_backward_inplace", n, {"dio": dinout, "inp": inp}, vec4=True)

    # -- residual stream
    def add(self, seq: Sequence, out, a, b, n: int | None = None):
        """out (n,) = a + b (out must not overlap a or b: WebGPU forbids aliased writable bindings)."""
        self._run(seq, "add", n, {"out": out, "a": a, "b": b}, vec4=True)

    def accumulate(self, seq: Sequence, out, inp, n: int | None = None):
        """out (n,) += inp. The residual backward: the gradient flows unchanged into both branches."""
        self._run(seq, "accumulate", n, {"dio": out, "inp": inp}, vec4=True)

    # -- plain buffer ranges (any n, any size: split into views when beyond the binding limit)
    def fill(self, seq: Sequence, dst, value: float, n: int | None = None):
        """dst (n,) = value; n defaults to the whole buffer or view."""
        self._run(seq, "fill", n, {"dst": dst}, value=value)

    def zero(self, seq: Sequence, dst, n: int | None = None):
        """dst (n,) = 0 (gradients, once per optimizer step)."""
        self.fill(seq, dst, 0.0, n)

    def scale(self, seq: Sequence, dst, factor: float, n: int | None = None):
        """dst (n,) *= factor."""
        self._run(seq, "scale", n, {"dst": dst}, value=factor)

    def copy(self, seq: Sequence, dst, src, n: int | None = None):
        """dst (n,) = src (n,) as a dispatch (Sequence.copy does it as a copy command, between compute passes)."""
        self._run(seq, "copy", n, {"dst": dst, "src": src})
