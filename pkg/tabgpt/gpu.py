"""The only module that talks to WebGPU.

One small async API, two backends chosen automatically:
- natively, wgpu-py (Vulkan: lavapipe on a CPU, NVIDIA/AMD/Intel drivers on a GPU);
- in the browser, ``navigator.gpu`` through Pyodide's JS FFI (inside a module Web Worker).

Nothing above this module knows which one runs. The API::

    dev = await open_device()                     # adapter info, features, limits
    x = dev.buffer(4 * n, "x")                    # storage buffer (also copy src/dst)
    dev.write(x, data)                            # bytes, memoryview or array.array
    k = await dev.kernel("selftest.wgsl", "matmul", constants={"TILE": 16})
    seq = dev.sequence("step")                    # a prebuilt list of dispatches
    seq.dispatch(k, (gx, gy, 1), a=x, b=y, out=z) # bindings by their WGSL names
    await seq.build()                             # validation errors raise here
    seq.run()                                     # submit; no read-back, no wait
    data = await dev.read(z)                      # bytes

Bindings are matched by the names of the ``var`` declarations in the WGSL file;
each entry point gets an explicit layout holding only the bindings it uses, so
one file can hold a forward and a backward entry point with different buffers.
Bind groups are created once, when the sequence is built, and replayed.
Natively, coroutines never really suspend, so ``wait(coro)`` runs them without
an event loop (handy for tests and the CLI).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import struct
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path

IN_BROWSER = sys.platform == "emscripten"

# WebGPU's guaranteed defaults: kernels are written for these and ask for more only where granted.
DEFAULT_LIMITS = {
    "max-storage-buffer-binding-size": 128 << 20,
    "max-buffer-size": 256 << 20,
    "max-compute-workgroup-storage-size": 16384,
    "max-compute-invocations-per-workgroup": 256,
    "max-compute-workgroup-size-x": 256,
    "max-compute-workgroup-size-y": 256,
    "max-compute-workgroup-size-z": 64,
    "max-compute-workgroups-per-dimension": 65535,
    "max-storage-buffers-per-shader-stage": 8,
    "max-uniform-buffer-binding-size": 65536,
    "max-bind-groups": 4,
}
# Limits worth raising when the adapter grants more (bigger tensors per binding, bigger tiles).
RAISED_LIMITS = [
    "max-storage-buffer-binding-size",
    "max-buffer-size",
    "max-compute-workgroup-storage-size",
    "max-compute-invocations-per-workgroup",
    "max-compute-workgroup-size-x",
    "max-compute-workgroup-size-y",
    "max-storage-buffers-per-shader-stage",
]
# Optional features, by their WebGPU names; natively wgpu calls subgroups "subgroup".
WANTED_FEATURES = ["shader-f16", "subgroups", "timestamp-query"]


class GPUError(Exception):
    """A WebGPU error (WGSL compilation, validation, out of memory) with the driver's message."""


def wait(coro):
    """Run a coroutine that never truly suspends (every native call here) to completion."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("wait() got a coroutine that suspends; await it in an event loop instead")


async def best_run_seconds(dev, seq, repeat: int, trials: int) -> float:
    """The best over `trials` of: seq run `repeat` times in one submission, waited for, per run (seconds)."""
    import time
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        seq.run(repeat)
        await dev.sync()
        best = min(best, (time.perf_counter() - t0) / repeat)
    return best


# ---------------------------------------------------------------------------------------------
# WGSL sources: find files, parse bindings and which entry point uses which binding.

def env_switch(name: str, value: bool | None = None, default: bool = False) -> bool:
    """value where given, else the environment variable `name` as 0 or 1 (unset: default); anything else is
    refused, so that a misspelt setting cannot go unnoticed."""
    if value is not None:
        return bool(value)
    env = os.environ.get(name)
    if env is None:
        return default
    if env not in ("0", "1"):
        raise GPUError(f"{name} must be 0 or 1, got {env!r}: set it to 0 (off) or 1 (on), or unset it (the default, "
                       f"{int(default)})")
    return env == "1"


def shader_dir() -> Path:
    """shaders/ inside the installed wheel, or the repository's shaders/ in a development install."""
    here = Path(__file__).resolve().parent
    for cand in (here / "shaders", here.parent.parent / "shaders"):
        if cand.is_dir():
            return cand
    raise GPUError(f"no shaders/ folder found next to {here}; reinstall the tabgpt wheel")


_BINDING_RE = re.compile(
    r"@group\(\s*0\s*\)\s*@binding\(\s*(\d+)\s*\)\s*var\s*(<[^>]*>)?\s*(\w+)\s*:")
_FN_RE = re.compile(r"\bfn\s+(\w+)\s*\(")
_IDENT_RE = re.compile(r"(?<![.\w])[A-Za-z_]\w*")  # not after "." (member access such as wg.y)


@dataclass
class Binding:
    index: int
    name: str
    kind: str  # "uniform", "read-only-storage" or "storage"


def parse_bindings(src: str) -> dict[str, Binding]:
    out = {}
    for m in _BINDING_RE.finditer(_strip_comments(src)):
        space = (m.group(2) or "").replace(" ", "")
        if space.startswith("<uniform"):
            kind = "uniform"
        elif "read_write" in space:
            kind = "storage"
        else:
            kind = "read-only-storage"
        out[m.group(3)] = Binding(int(m.group(1)), m.group(3), kind)
    return out


def _strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
    return re.sub(r"//[^\n]*", "", src)


def block_end(src: str, i: int) -> int:
    """The index just past the `}` that closes the `{` at src[i] (len(src) if it is never closed)."""
    depth = 0
    for j in range(i, len(src)):
        depth += {"{": 1, "}": -1}.get(src[j], 0)
        if depth == 0:
            return j + 1
    return len(src)


def _function_bodies(src: str) -> dict[str, tuple[str, set[str]]]:
    """Map each function name to (body text, names it declares: parameters, `let` and `var` locals)."""
    bodies = {}
    for m in _FN_RE.finditer(src):
        i = src.find("{", m.end())
        signature = src[m.end():i]
        body = src[i:block_end(src, i)]
        params = signature.split("->")[0]
        local = set(re.findall(r"(\w+)\s*:", params)) | set(re.findall(r"\b(?:let|var|const)\s+(\w+)", body))
        bodies[m.group(1)] = (body, local)
    return bodies


def used_bindings(src: str, entry: str) -> list[Binding]:
    """The bindings an entry point reaches, directly or through the functions it calls. A parameter or local
    that shadows a binding's name is not a use of the binding."""
    src = _strip_comments(src)
    bindings = parse_bindings(src)
    bodies = _function_bodies(src)
    if entry not in bodies:
        raise GPUError(f"entry point {entry!r} not found; functions here: {sorted(bodies)}")
    seen, todo, names = set(), [entry], set()
    while todo:
        fn = todo.pop()
        if fn in seen:
            continue
        seen.add(fn)
        body, local = bodies[fn]
        for ident in _IDENT_RE.findall(body):
            if ident in local:
                continue
            if ident in bodies:
                todo.append(ident)
            elif ident in bindings:
                names.add(ident)
    return sorted((bindings[n] for n in names), key=lambda b: b.index)


_DIRECTIVE_START_RE = re.compile(r"^\s*//\s*#(if|elif|else|endif)\b")
_DIRECTIVE_RE = re.compile(r"^\s*//\s*#(if|elif|else|endif)\b\s*(\w*(?:\s*\|\|\s*\w+)*)\s*$")


def select_blocks(src: str, defines=frozenset(), file: str = "shader") -> str:
    """The source with its conditional blocks resolved: `// #if NAME`, optional `// #elif NAME` parts, an optional
    `// #else` part and `// #endif`, each on a line of its own; the lines of the first part whose NAME is in
    `defines` are kept (those of #else where none is), the others dropped. A part may name several defines,
    `NAME || OTHER`: it is taken where any of them is set. Dropped lines and the directives become
    empty lines (line numbers stay those of the file). So a kernel can have a variant of its own while the code of
    the others stays exactly what it is: a condition on an override constant would leave both branches in the
    module, and NVIDIA's compiler makes other code of the whole kernel even where the branch is never taken."""
    out, name = [], None        # name: the open block's, None outside one
    keep, taken, after_else = True, False, False   # this part's lines kept; a part taken; past its #else
    for lineno, line in enumerate(src.splitlines(), 1):
        m = _DIRECTIVE_RE.match(line)
        if not m:
            if _DIRECTIVE_START_RE.match(line):
                raise GPUError(f"{file}:{lineno}: a malformed directive: `{line.strip()}` (`// #if NAME`, "
                               "`// #elif NAME || OTHER`, `// #else`, `// #endif`)")
            out.append(line if keep else "")
            continue
        word, arg = m.groups()
        named = any(n.strip() in defines for n in arg.split("||")) if arg else False
        if word == "if":
            if name is not None or not arg:
                raise GPUError(f"{file}:{lineno}: `#if NAME` needs a name and cannot nest")
            name, keep, taken, after_else = arg, named, named, False
        elif name is None or (after_else and word != "endif") or (word == "elif") != bool(arg):
            raise GPUError(f"{file}:{lineno}: `#{word}` without its `#if`, after `#else`, or "
                           + ("without a name" if word == "elif" else "with a name"))
        elif word == "endif":
            name, keep = None, True
        else:
            keep = not taken and (word == "else" or named)
            taken, after_else = taken or keep, word == "else"
        out.append("")
    if name is not None:
        raise GPUError(f"{file}: `#if {name}` without its `#endif`")
    return "\n".join(out) + "\n"


_UNROLL_RE = re.compile(r"^\s*//\s*#unroll\s+(\w+)\s+(\w+)\s*$")
_FOR_RE = re.compile(r"^\s*for \(var (\w+) = 0u; \1 < (\w+); \1\+\+\) \{\s*$")


def unroll_loops(src: str, defines=frozenset(), constants: dict | None = None, file: str = "shader") -> str:
    """The source with its marked loops written out where asked: a line `// #unroll NAME COUNT` before a loop
    `for (var v = 0u; v < COUNT; v++) {` that runs on its own lines, with NAME in `defines` and COUNT (an override
    constant) among `constants`, becomes the loop's body COUNT times over, each copy in a block of its own with v a
    literal (0u, 1u, ...). NVIDIA's compiler does not unroll loops that naga writes, and WGSL has no hint for it;
    written out, the copies' indices are constants. Without NAME in defines, or COUNT among the constants (a loop
    of another entry point of the file, whose constants this kernel does not set), the loop stays a loop.
    The copies take the lines of the directive and the loop (several copies a line, their `//` comments dropped),
    so that every line after the loop keeps its number: a compiler's message points into the file as it is."""
    lines = src.splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _UNROLL_RE.match(lines[i])
        if not m or m.group(1) not in defines:
            out.append(lines[i])
            i += 1
            continue
        name, count = m.groups()
        loop = _FOR_RE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if not loop or loop.group(2) != count:
            raise GPUError(f"{file}:{i + 1}: `#unroll {name} {count}` must precede `for (var v = 0u; v < {count}; "
                           "v++) {` on a line of its own")
        if count not in (constants or {}):
            out.append(lines[i])
            i += 1
            continue
        if not isinstance(constants[count], int) or not 0 < constants[count] <= 64:
            raise GPUError(f"{file}:{i + 1}: `#unroll {name} {count}`: {count} must be 1 to 64, "
                           f"got {constants[count]!r}")
        text = "\n".join(lines[i + 1:])
        start = text.index("{")
        end = block_end(text, start)
        last = i + 1 + text[:end].count("\n")      # the line of the loop's closing brace
        body = " ".join(line.split("//")[0].strip() for line in text[start + 1:end - 1].splitlines())
        var = re.compile(rf"\b{loop.group(1)}\b")
        copies = ["{ " + var.sub(f"{r}u", body).strip() + " }" for r in range(constants[count])]
        slots = last - i + 1                         # the directive's line and the loop's
        per = -(-len(copies) // slots)
        rows = [" ".join(copies[a:a + per]) for a in range(0, len(copies), per)]
        rows += [""] * (slots - len(rows))
        rows[-1] += text[end:].split("\n", 1)[0]    # whatever follows the closing brace on its line
        out += rows
        i = last + 1
    return "\n".join(out) + "\n"


def prepare_source(src: str, features: set[str]) -> tuple[str, str]:
    """Per-backend WGSL differences: the `enable` lines.

    Chrome requires `enable subgroups;` where subgroup builtins are used and the native compiler
    rejects it; `enable f16;` is needed by both where f16 is used. Returns (code, missing feature or "").
    """
    lines = []
    missing = ""
    for line in src.splitlines():
        s = line.strip()
        if s.startswith("enable ") and s.endswith(";"):
            ext = s[len("enable "):-1].strip()
            if ext == "subgroups":
                if "subgroups" not in features:
                    missing = "subgroups"
                if not IN_BROWSER:
                    line = "// " + line
            elif ext == "f16" and "shader-f16" not in features:
                missing = "shader-f16"
        lines.append(line)
    return "\n".join(lines) + "\n", missing


# ---------------------------------------------------------------------------------------------
# Backend-neutral objects.

_recording: contextvars.ContextVar = contextvars.ContextVar("tabgpt_recording", default=None)   # Device.recording

@dataclass(eq=False)
class Buffer:
    handle: object
    size: int
    label: str
    uniform: bool = False
    shared: bool = False   # used by more than its maker (the products' split-K scratch): Device.free skips it
    release: object = field(default=None, repr=False)   # counts it out of Device.bytes_allocated, once

    @property
    def freed(self) -> bool:
        """Given back by Device.free (its count released)."""
        return self.release is not None and not self.release.alive

    def view(self, offset: int, size: int) -> "View":
        if offset < 0 or size <= 0 or offset + size > self.size:
            raise GPUError(f"view [{offset}, {offset + size}) outside buffer {self.label!r} of {self.size} bytes")
        return View(self, offset, size)


@dataclass(frozen=True)
class View:
    """A byte range of a buffer, bound in place of a whole buffer (for tensors split across bindings)."""
    buffer: Buffer
    offset: int
    size: int


@dataclass(eq=False)
class Kernel:
    handle: object          # the compute pipeline
    layout: object          # its bind group layout
    file: str
    entry: str
    bindings: list[Binding]
    constants: dict = field(default_factory=dict)   # its override constants (for profiles and messages)

    def binding_names(self) -> list[str]:
        return [b.name for b in self.bindings]


@dataclass
class _Op:
    kind: str               # "dispatch" or "copy"
    kernel: Kernel | None = None
    bind_group: object = None
    groups: tuple = (1, 1, 1)
    copy: tuple = ()
    label: str = ""


def _as_bytes(data) -> memoryview:
    mv = memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


class Sequence:
    """A list of dispatches and copies, bind groups created once, replayed by run()."""

    def __init__(self, device: "Device", label: str):
        self.device = device
        self.label = label
        self.ops: list[_Op] = []
        self._built = False
        self.owed: dict[int, str] = {}   # work an op left to finish on this sequence (id of the op: what to call)

    def dispatch(self, kernel: Kernel, groups, **bindings) -> "Sequence":
        groups = tuple(int(g) for g in (groups if isinstance(groups, (tuple, list)) else (groups,)))
        groups = (groups + (1, 1))[:3]
        limit = self.device.limits["max-compute-workgroups-per-dimension"]
        if min(groups) < 0 or max(groups) > limit:
            raise GPUError(f"{kernel.entry}: workgroup grid {groups} outside 0..{limit} per dimension")
        want = set(kernel.binding_names())
        got = set(bindings)
        if want - got:
            raise GPUError(f"{kernel.file}:{kernel.entry} needs bindings {sorted(want - got)}")
        # Extra names are allowed (callers may pass a shared dict); only used ones are bound.
        entries = []
        for b in kernel.bindings:
            res = bindings[b.name]
            if isinstance(res, Buffer):
                res = View(res, 0, res.size)
            if not isinstance(res, View):
                raise GPUError(f"binding {b.name!r} of {kernel.entry} must be a Buffer or View, got {type(res)}")
            entries.append((b.index, res))
        bg = self.device._bind_group(kernel, entries, f"{kernel.entry}")
        self.ops.append(_Op("dispatch", kernel, bg, groups, label=kernel.entry))
        self._built = False
        return self

    def copy(self, src: Buffer, dst: Buffer, size: int | None = None, src_offset: int = 0,
             dst_offset: int = 0) -> "Sequence":
        size = src.size - src_offset if size is None else size
        if size % 4 or src_offset % 4 or dst_offset % 4:
            raise GPUError("buffer copies need sizes and offsets that are multiples of 4")
        self.ops.append(_Op("copy", copy=(src, src_offset, dst, dst_offset, size), label="copy"))
        self._built = False
        return self

    def extend(self, other: "Sequence") -> "Sequence":
        other._check_owed()
        self.ops.extend(other.ops)
        self._built = False
        return self

    def _check_owed(self):
        if self.owed:
            raise GPUError(f"sequence {self.label!r} has unfinished work: " + "; ".join(self.owed.values()))

    async def build(self) -> "Sequence":
        """Encode once without submitting, so that validation errors surface here as GPUError; refused while an op
        has left work to finish on it (a LayerNorm's deferred backwards: their gradients would never be made)."""
        self._check_owed()
        await self.device._validate(self)
        self._built = True
        return self

    def run(self, repeat: int = 1):
        """Submit the whole sequence (repeat times) without waiting for the GPU."""
        self._check_owed()
        self.device._submit(self, repeat)

    def __len__(self):
        return len(self.ops)


def is_cpu_adapter(dev: "Device") -> bool:
    """Whether dev runs on a CPU driver (lavapipe, SwiftShader: a browser's fallback adapter), where a workgroup's
    threads are fibers of a few SIMD lanes and each barrier switches between all of them: the kernels then take
    barrier-light shapes (ops: matmul tiles, layernorm blocks, cross-entropy and AdamW workgroups, the embedding
    sort's blocks), and the page proposes the tiny preset."""
    info = dev.info
    names = " ".join(str(info.get(k, "")) for k in ("vendor", "architecture", "device", "description")).lower()
    return (info.get("adapter_type") == "CPU" or bool(info.get("is_fallback_adapter"))
            or "llvmpipe" in names or "swiftshader" in names)


class Device:
    """Common part of both backends: buffers, kernels, sequences."""

    backend = "?"

    def __init__(self):
        self.info: dict = {}
        self.features: set[str] = set()
        self.limits: dict = dict(DEFAULT_LIMITS)
        self._sources: dict[str, str] = {}
        self._kernels: dict[tuple, Kernel] = {}
        self.bytes_allocated = 0
        self.tune_log: list[str] = []   # what autotuned kernels chose (ops/matmul.autotune)
        self.tune_finalists: dict = {}  # per tuned product: its runoff's [seconds, tiles, splits], fastest first
        self.shader_checks = "all"   # natively: the runtime checks of our shader modules (NativeDevice.open)
        self.subgroup_ids = False    # the WGSL builtins subgroup_id and num_subgroups compile here

    def has_subgroup_ops(self) -> bool:
        """The adapter has the `subgroups` feature and its WGSL compiler the subgroup_id / num_subgroups builtins:
        the subgroup kernels (layernorm_subgroups.wgsl, crossentropy_subgroups.wgsl) can run here."""
        return "subgroups" in self.features and self.subgroup_ids

    def subgroup_reductions(self) -> bool:
        """Whether layernorm and cross-entropy reduce their rows with subgroup operations (subgroupAdd,
        subgroupMax) by default: only with TABGPT_SUBGROUPS=1 and where has_subgroup_ops(). They are off by
        default because on the one real GPU measured (NVIDIA H200) the workgroup-memory trees were as fast or
        faster (BENCHMARKS.md, "Row reductions")."""
        return env_switch("TABGPT_SUBGROUPS") and self.has_subgroup_ops()

    async def kernel_of(self, files: list[str], entry: str, constants: dict | None = None) -> Kernel:
        """Compile `entry` of several shader files joined into one module, labelled by the last file: a file of
        variants (say with `enable subgroups;`, which must come first) ahead of the file whose bindings and
        helpers it uses (WGSL declarations may come in any order)."""
        return await self.kernel(files[-1], entry, constants, source="\n".join(self.source(f) for f in files))

    # -- sources and kernels
    def source(self, file: str) -> str:
        if file not in self._sources:
            path = shader_dir() / file
            if not path.is_file():
                raise GPUError(f"shader file {file!r} not found in {shader_dir()}")
            self._sources[file] = path.read_text()
        return self._sources[file]

    async def kernel(self, file: str, entry: str, constants: dict | None = None,
                     source: str | None = None, defines=frozenset()) -> Kernel:
        """Compile `entry` of shaders/`file` (or of `source`) with override constants and the conditional blocks
        named by `defines` (select_blocks); cached."""
        constants = dict(constants or {})
        defines = frozenset(defines)
        key = (file, entry, tuple(sorted(constants.items())), source, defines)
        if key in self._kernels:
            return self._kernels[key]
        src = select_blocks(source if source is not None else self.source(file), defines, file)
        src = unroll_loops(src, defines, constants, file)
        code, missing = prepare_source(src, self.features)
        if missing:
            raise GPUError(f"{file} needs the WebGPU feature {missing!r}, which this adapter lacks")
        bindings = used_bindings(code, entry)
        if not bindings:
            raise GPUError(f"{file}:{entry} uses no bindings")
        n_storage = sum(b.kind != "uniform" for b in bindings)
        if n_storage > self.limits["max-storage-buffers-per-shader-stage"]:
            raise GPUError(f"{file}:{entry} uses {n_storage} storage buffers; this device allows "
                           f"{self.limits['max-storage-buffers-per-shader-stage']}")
        k = await self._create_kernel(file, entry, code, bindings, constants)
        self._kernels[key] = k
        return k

    def sequence(self, label: str = "sequence") -> Sequence:
        return Sequence(self, label)

    def raise_if_broken(self):
        """GPUError where the device is lost or reported an error asynchronously (the browser's; wgpu-py raises
        at the call)."""

    # -- buffers
    def buffer(self, nbytes: int, label: str = "buffer", data=None) -> Buffer:
        """A storage buffer (also copy source and destination), zero-filled or holding `data`."""
        nbytes = max(4, (int(nbytes) + 3) // 4 * 4)
        if nbytes > self.limits["max-buffer-size"]:
            raise GPUError(f"buffer {label!r} of {nbytes / 2**20:.1f} MiB exceeds this device's maximum buffer size "
                           f"of {self.limits['max-buffer-size'] / 2**20:.0f} MiB; use a smaller model or batch")
        buf = Buffer(self._create_buffer(nbytes, label, uniform=False), nbytes, label)
        self.bytes_allocated += nbytes
        # counted out when freed, or else when the collector takes it (the GPU's memory goes with the handle)
        buf.release = weakref.finalize(buf, self._count_out, nbytes)
        made = _recording.get()
        if made is not None:
            made.append(buf)
        if data is not None:
            self.write(buf, data)
        return buf

    @staticmethod
    @contextlib.contextmanager
    def recording():
        """with dev.recording() as made: the storage buffers created inside (by this task: an asyncio task of its own
        records apart; an inner recording takes its buffers from the outer one), to free() together later."""
        made: list[Buffer] = []
        token = _recording.set(made)
        try:
            yield made
        finally:
            _recording.reset(token)

    def free(self, *bufs: Buffer):
        """Give storage buffers' memory back now (not when the garbage collector gets to them): for large scratch
        buffers made and dropped while a page stays open. A freed buffer must not be used again; shared ones
        (Buffer.shared) and ones already freed are left as they are."""
        for buf in bufs:
            if buf.freed or buf.shared:
                continue
            buf.handle.destroy()
            buf.release()

    def _count_out(self, nbytes: int):
        self.bytes_allocated -= nbytes

    def uniform(self, data, label: str = "params") -> Buffer:
        """A small uniform buffer (sizes, step, learning rate); update it with write()."""
        mv = _as_bytes(data)
        nbytes = max(16, (mv.nbytes + 15) // 16 * 16)
        buf = Buffer(self._create_buffer(nbytes, label, uniform=True), nbytes, label, uniform=True)
        self.write(buf, mv)
        return buf

    def write(self, buf: Buffer, data, offset: int = 0):
        mv = _as_bytes(data)
        n = mv.nbytes
        if n % 4:
            mv = memoryview(bytes(mv) + b"\0" * (4 - n % 4))
        if offset + mv.nbytes > buf.size:
            raise GPUError(f"write of {n} bytes at {offset} overflows buffer {buf.label!r} ({buf.size} bytes)")
        self._write(buf, mv, offset)

    async def read(self, buf: Buffer, offset: int = 0, size: int | None = None) -> bytes:
        size = buf.size - offset if size is None else size
        if offset % 4 or offset + size > buf.size:
            raise GPUError(f"read [{offset}, {offset + size}) outside buffer {buf.label!r} ({buf.size} bytes)")
        padded = (size + 3) // 4 * 4
        data = await self._read(buf, offset, padded)
        return bytes(data[:size])

    async def read_floats(self, buf: Buffer, offset: int = 0, count: int | None = None) -> list[float]:
        count = (buf.size - offset) // 4 if count is None else count
        data = await self.read(buf, offset, 4 * count)
        return list(struct.unpack(f"<{count}f", data))


# ---------------------------------------------------------------------------------------------
# Native backend: wgpu-py.

# Runtime checks naga adds to native shader modules (wgpu-native's WGPUShaderRuntimeChecks flags): "all" is
# wgpu's default (index clamps and a loop-iteration guard); "bounds" keeps the clamps only; "none" drops both.
SHADER_CHECKS = {"all": None, "bounds": 0x1, "none": 0x0}
DEFAULT_SHADER_CHECKS = "bounds"
# Files whose kernels drop the index clamps too under "bounds": every index they form is in range by construction
# (workgroup tiles indexed by constants and thread ids; global reads and writes behind explicit row / column
# checks against sizes that ops/matmul.py and ops/attention.py validate against the bound buffers before any
# dispatch).
UNCLAMPED_FILES = {"matmul.wgsl", "attention.wgsl"}


def _trusted_modules_available() -> bool:
    try:
        from wgpu.backends.wgpu_native import _api
        from wgpu.backends.wgpu_native._ffi import lib
        needed = ("libf", "new_struct_p", "to_c_string_view", "GPUShaderModule")
        return all(hasattr(_api, n) for n in needed) and hasattr(lib, "wgpuDeviceCreateShaderModuleTrusted")
    except ImportError:
        return False   # another wgpu-py layout: modules are then made the default way (shader_checks "all")


def _trusted_shader_module(device, code: str, label: str, flags: int):
    """wgpuDeviceCreateShaderModuleTrusted through wgpu-py's cffi handle (wgpu-py does not wrap it)."""
    from wgpu.backends.wgpu_native import _api
    from wgpu.backends.wgpu_native._ffi import ffi, lib
    create = _api.libf.wgpuDeviceCreateShaderModuleTrusted   # raises wgpu's errors like create_shader_module
    src = _api.new_struct_p("WGPUShaderSourceWGSL *", code=_api.to_c_string_view(code))
    src[0].chain.next = ffi.NULL
    src[0].chain.sType = lib.WGPUSType_ShaderSourceWGSL
    desc = _api.new_struct_p("WGPUShaderModuleDescriptor *", nextInChain=ffi.cast("WGPUChainedStruct *", src),
                             label=_api.to_c_string_view(label))
    handle = create(device._internal, desc, flags)
    if handle == ffi.NULL:
        raise RuntimeError("Shader module creation failed")
    return _api.GPUShaderModule(label, handle, device)


class NativeDevice(Device):
    backend = "wgpu-native"

    @classmethod
    async def open(cls, power_preference="high-performance", limits: dict | None = None):
        if not os.environ.get("XDG_RUNTIME_DIR"):
            # wgpu's Vulkan loader complains without it; a private folder silences it.
            d = f"/tmp/tabgpt-xdg-{os.getuid()}"
            os.makedirs(d, mode=0o700, exist_ok=True)
            os.environ["XDG_RUNTIME_DIR"] = d
        try:
            import wgpu
        except ImportError as e:  # pragma: no cover - the wheel depends on wgpu natively
            raise GPUError("wgpu is not installed: pip install wgpu") from e
        self = cls()
        self.wgpu = wgpu
        adapter = wgpu.gpu.request_adapter_sync(power_preference=power_preference)
        if adapter is None:
            raise GPUError("no WebGPU adapter: install a Vulkan driver (on a machine without a GPU: "
                           "apt-get install mesa-vulkan-drivers libvulkan1)")
        info = dict(adapter.info)
        self.info = {k: info.get(k, "") for k in ("vendor", "architecture", "device", "description",
                                                    "adapter_type", "backend_type")}
        native = set(adapter.features)
        feats = []
        for f in WANTED_FEATURES:
            nf = "subgroup" if f == "subgroups" else f
            if nf in native:
                feats.append(nf)
                self.features.add(f)
        self.subgroup_ids = "subgroups" in self.features   # naga compiles subgroup_id and num_subgroups
        alim = adapter.limits
        want = {}
        for name in RAISED_LIMITS:
            if name in alim:
                want[name] = alim[name]
        # Buffers beyond 2 GiB are not addressable by u32 indices in our kernels.
        for name in ("max-storage-buffer-binding-size", "max-buffer-size"):
            if name in want:
                want[name] = min(want[name], (2 << 30) - 4)
        if limits:
            want.update(limits)
        self.device = adapter.request_device_sync(required_features=feats, required_limits=want)
        self.adapter = adapter
        # wgpu by default wraps every loop of a shader in an iteration counter (a guard against infinite loops in
        # untrusted shaders), which keeps the driver from unrolling and pipelining inner loops. Our loops all have
        # bounded trip counts, so our modules are made "trusted" without that counter where wgpu-native offers it
        # (wgpuDeviceCreateShaderModuleTrusted), keeping the index clamps. TABGPT_SHADER_CHECKS=all|bounds|none
        # picks another setting (the benchmarks compare them).
        mode = os.environ.get("TABGPT_SHADER_CHECKS", DEFAULT_SHADER_CHECKS)
        if mode not in SHADER_CHECKS:
            raise GPUError(f"TABGPT_SHADER_CHECKS must be one of {', '.join(SHADER_CHECKS)}, got {mode!r}")
        self.shader_checks = mode if _trusted_modules_available() else "all"
        dl = self.device.limits
        for name in DEFAULT_LIMITS:
            if name in dl:
                self.limits[name] = dl[name]
        return self

    def _create_buffer(self, nbytes, label, uniform):
        U = self.wgpu.BufferUsage
        usage = (U.UNIFORM | U.COPY_DST) if uniform else (U.STORAGE | U.COPY_SRC | U.COPY_DST)
        try:
            return self.device.create_buffer(size=nbytes, usage=usage, label=label)
        except Exception as e:
            raise GPUError(f"could not allocate {label!r} ({nbytes} bytes): {e}") from e

    def _write(self, buf, mv, offset):
        self.device.queue.write_buffer(buf.handle, offset, mv)

    async def _read(self, buf, offset, size):
        return self.device.queue.read_buffer(buf.handle, offset, size)

    async def _create_kernel(self, file, entry, code, bindings, constants):
        B = self.wgpu.ShaderStage.COMPUTE
        entries = []
        for b in bindings:
            entries.append({"binding": b.index, "visibility": B, "buffer": {"type": b.kind}})
        try:
            module = self._shader_module(code, file)
            layout = self.device.create_bind_group_layout(entries=entries, label=f"{file}:{entry}")
            playout = self.device.create_pipeline_layout(bind_group_layouts=[layout])
            stage = {"module": module, "entry_point": entry}
            if constants:
                stage["constants"] = {k: float(v) for k, v in constants.items()}
            pipeline = self.device.create_compute_pipeline(layout=playout, compute=stage, label=f"{file}:{entry}")
        except Exception as e:
            raise GPUError(f"{file}:{entry}: {e}") from e
        return Kernel(pipeline, layout, file, entry, bindings, dict(constants or {}))

    def _shader_module(self, code: str, label: str):
        """A shader module of our own WGSL, made with the runtime checks of self.shader_checks (see open); under
        "bounds", the files of UNCLAMPED_FILES without the clamps too."""
        mode = self.shader_checks
        if mode == "bounds" and label in UNCLAMPED_FILES:
            mode = "none"
        flags = SHADER_CHECKS[mode]
        if flags is None:
            return self.device.create_shader_module(code=code, label=label)
        return _trusted_shader_module(self.device, code, label, flags)

    def _bind_group(self, kernel, entries, label):
        res = [{"binding": i, "resource": {"buffer": v.buffer.handle, "offset": v.offset, "size": v.size}}
               for i, v in entries]
        try:
            return self.device.create_bind_group(layout=kernel.layout, entries=res, label=label)
        except Exception as e:
            raise GPUError(f"{kernel.file}:{kernel.entry}: {e}") from e

    def _encode(self, seq, repeat=1, query_set=None, per_dispatch=False):
        """The command buffer of seq's ops, repeat times: consecutive dispatches share a compute pass. For
        bench/profile_step.py: query_set (timestamp-query) gets each pass's beginning and end (queries 2i, 2i + 1 of
        pass i, counted again in each repetition); per_dispatch puts every dispatch in a pass of its own."""
        enc = self.device.create_command_encoder()
        cpass = None
        for _ in range(repeat):
            n_pass = 0
            for op in seq.ops:
                if op.kind == "dispatch":
                    if cpass is None:
                        stamps = {} if query_set is None else {"timestamp_writes": {
                            "query_set": query_set, "beginning_of_pass_write_index": 2 * n_pass,
                            "end_of_pass_write_index": 2 * n_pass + 1}}
                        cpass = enc.begin_compute_pass(**stamps)
                        n_pass += 1
                    cpass.set_pipeline(op.kernel.handle)
                    cpass.set_bind_group(0, op.bind_group)
                    cpass.dispatch_workgroups(*op.groups)
                    if per_dispatch:
                        cpass.end()
                        cpass = None
                else:
                    if cpass is not None:
                        cpass.end()
                        cpass = None
                    src, so, dst, do, n = op.copy
                    enc.copy_buffer_to_buffer(src.handle, so, dst.handle, do, n)
        if cpass is not None:
            cpass.end()
        return enc.finish()

    async def _validate(self, seq):
        try:
            self._encode(seq)
        except Exception as e:
            raise GPUError(f"sequence {seq.label!r}: {e}") from e

    def _submit(self, seq, repeat):
        try:
            self.device.queue.submit([self._encode(seq, repeat)])
        except Exception as e:
            raise GPUError(f"sequence {seq.label!r}: {e}") from e

    async def sync(self):
        """Wait until the GPU has finished all submitted work."""
        if not hasattr(self, "_sync_buf"):
            self._sync_buf = self.buffer(4, "sync")
            self._sync_buf.shared = True
        self.device.queue.read_buffer(self._sync_buf.handle, 0, 4)

    def destroy(self):
        self.device.destroy()


# ---------------------------------------------------------------------------------------------
# Browser backend: navigator.gpu through Pyodide.

_JS_HELPERS = r"""
({
  encode(device, ops, repeat) {
    const enc = device.createCommandEncoder();
    let pass = null;
    for (let r = 0; r < repeat; r++) {
      for (const op of ops) {
        if (op.length === 5) {
          if (pass === null) pass = enc.beginComputePass();
          pass.setPipeline(op[0]); pass.setBindGroup(0, op[1]);
          pass.dispatchWorkgroups(op[2], op[3], op[4]);
        } else {
          if (pass !== null) { pass.end(); pass = null; }
          enc.copyBufferToBuffer(op[0], op[1], op[2], op[3], op[4]);
        }
      }
    }
    if (pass !== null) pass.end();
    return enc.finish();
  },
  submit(device, ops, repeat) {
    device.queue.submit([this.encode(device, ops, repeat)]);
  },
  async read(device, buf, offset, size) {
    const staging = device.createBuffer({size, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST});
    const enc = device.createCommandEncoder();
    enc.copyBufferToBuffer(buf, offset, staging, 0, size);
    device.queue.submit([enc.finish()]);
    await staging.mapAsync(GPUMapMode.READ);
    const out = new Uint8Array(staging.getMappedRange().slice(0));
    staging.unmap(); staging.destroy();
    return out;
  },
  async compile(device, code, label) {
    device.pushErrorScope("validation");
    const module = device.createShaderModule({code, label});
    const info = await module.getCompilationInfo();
    const err = await device.popErrorScope();
    const msgs = [];
    for (const m of info.messages) {
      if (m.type === "error") msgs.push(`${label}:${m.lineNum}:${m.linePos}: ${m.message}`);
    }
    if (msgs.length || err) {
      const lines = code.split("\n");
      for (const m of info.messages) {
        if (m.type === "error" && m.lineNum > 0) msgs.push(`  ${m.lineNum} | ${lines[m.lineNum - 1]}`);
      }
      if (err) msgs.push(err.message);
      return {error: msgs.join("\n")};
    }
    return {module};
  },
  async pipeline(device, module, layoutEntries, entry, constants, label) {
    device.pushErrorScope("validation");
    const layout = device.createBindGroupLayout({entries: layoutEntries, label});
    const playout = device.createPipelineLayout({bindGroupLayouts: [layout]});
    const stage = {module, entryPoint: entry};
    if (Object.keys(constants).length) stage.constants = constants;
    let pipeline = null, perr = null;
    try {
      pipeline = await device.createComputePipelineAsync({layout: playout, compute: stage, label});
    } catch (e) { perr = e.message; }
    const err = await device.popErrorScope();
    if (perr || err) return {error: [perr, err && err.message].filter(Boolean).join("\n")};
    return {pipeline, layout};
  },
  async validate(device, ops) {
    device.pushErrorScope("validation");
    try { this.encode(device, ops, 1); } catch (e) { await device.popErrorScope(); return e.message; }
    const err = await device.popErrorScope();
    return err ? err.message : null;
  },
})
"""


class BrowserDevice(Device):
    backend = "webgpu-browser"

    @classmethod
    async def open(cls, power_preference="high-performance", limits: dict | None = None):
        from js import navigator, Object, eval as js_eval  # noqa: A001
        from pyodide.ffi import to_js
        self = cls()
        self._to_js = lambda x: to_js(x, dict_converter=Object.fromEntries)
        self.js = js_eval(_JS_HELPERS)
        gpu = getattr(navigator, "gpu", None)
        if gpu is None:
            raise GPUError("this browser has no WebGPU (navigator.gpu is missing): use a recent Chrome, Edge or "
                           "Safari 26+, or Firefox 141+ on Windows; pages must be served over https or localhost")
        adapter = await gpu.requestAdapter(self._to_js({"powerPreference": power_preference}))
        if adapter is None:
            raise GPUError("WebGPU is present but no adapter was found: the GPU may be blocklisted; "
                           "try enabling hardware acceleration in the browser settings")
        info = adapter.info
        self.info = {k: str(getattr(info, k, "") or "") for k in ("vendor", "architecture", "device", "description")}
        self.info["is_fallback_adapter"] = bool(getattr(info, "isFallbackAdapter", False))
        self.info["backend_type"] = "WebGPU"
        feats = [f for f in WANTED_FEATURES if adapter.features.has(f)]
        self.features = set(feats)
        lang = getattr(gpu, "wgslLanguageFeatures", None)
        self.subgroup_ids = bool(lang is not None and lang.has("subgroup_id"))
        camel = lambda n: re.sub(r"-(\w)", lambda m: m.group(1).upper(), n)  # noqa: E731
        want = {}
        for name in RAISED_LIMITS:
            v = getattr(adapter.limits, camel(name), None)
            if v is not None:
                want[camel(name)] = int(min(v, (2 << 30) - 4))
        if limits:
            want.update({camel(k): v for k, v in limits.items()})
        self.device = await adapter.requestDevice(self._to_js({"requiredFeatures": feats, "requiredLimits": want}))
        for name in DEFAULT_LIMITS:
            v = getattr(self.device.limits, camel(name), None)
            if v is not None:
                self.limits[name] = int(v)
        self.adapter = adapter
        # Errors nothing captured (running out of memory while allocating, internal errors) and the loss of the
        # device (a driver reset, a kernel that ran too long) arrive as events: kept here and raised by the next
        # read or sync, instead of training on with buffers that do not exist.
        from pyodide.ffi import create_proxy
        self._error, self._lost = None, None   # the first such error since the last raised; the loss's reason

        def on_error(ev):
            # out of memory and internal errors; validation errors are our own mistakes, which build() reports in
            # an error scope of its own (the browser logs them to the console as well)
            err = getattr(ev, "error", None)
            kind = str(getattr(getattr(err, "constructor", None), "name", "") or "")
            if kind in ("GPUOutOfMemoryError", "GPUInternalError") and self._error is None:
                self._error = f"{kind}: {getattr(err, 'message', '') or err}"

        def on_lost(info):
            self._lost = (f"{getattr(info, 'reason', '') or 'unknown'}: {getattr(info, 'message', '') or ''}"
                          .rstrip(": "))
        self._handlers = (create_proxy(on_error), create_proxy(on_lost))
        self.device.onuncapturederror = self._handlers[0]
        self.device.lost.then(self._handlers[1])
        from js import GPUBufferUsage
        self._usage_storage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST
        self._usage_uniform = GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST
        return self

    def _create_buffer(self, nbytes, label, uniform):
        usage = self._usage_uniform if uniform else self._usage_storage
        return self.device.createBuffer(self._to_js({"size": nbytes, "usage": usage, "label": label}))

    def _write(self, buf, mv, offset):
        from pyodide.ffi import to_js
        self.device.queue.writeBuffer(buf.handle, offset, to_js(mv))

    def raise_if_broken(self):
        """GPUError where the device was lost or reported an error nothing captured (each reported once)."""
        if self._lost is not None:
            raise GPUError(f"the GPU device was lost ({self._lost}): the browser or its driver reset it, for example "
                           f"after a kernel ran too long or the GPU ran out of memory. Reload the page: 'Resume saved "
                           f"run' goes on from the last checkpoint saved in this browser, and a smaller preset asks "
                           f"less of the GPU")
        if self._error is not None:
            msg, self._error = self._error, None
            if "memory" in msg.lower():
                raise GPUError(f"the GPU ran out of memory ({msg}): choose a smaller preset, or a smaller batch or "
                               f"context")
            raise GPUError(f"the GPU reported an error: {msg}")

    async def _read(self, buf, offset, size):
        self.raise_if_broken()
        try:
            arr = await self.js.read(self.device, buf.handle, offset, size)
        except Exception:
            self.raise_if_broken()   # the read failed because the device is gone: say so
            raise
        self.raise_if_broken()       # an error in the work this read waited for
        return arr.to_bytes()

    async def _create_kernel(self, file, entry, code, bindings, constants):
        res = await self.js.compile(self.device, code, file)
        if getattr(res, "error", None):
            raise GPUError(f"{file}:{entry}: WGSL compilation failed:\n{res.error}")
        module = res.module
        entries = [{"binding": b.index, "visibility": 4, "buffer": {"type": b.kind}} for b in bindings]
        res = await self.js.pipeline(self.device, module, self._to_js(entries), entry,
                                     self._to_js({k: float(v) for k, v in constants.items()}), f"{file}:{entry}")
        if getattr(res, "error", None):
            raise GPUError(f"{file}:{entry}: {res.error}")
        return Kernel(res.pipeline, res.layout, file, entry, bindings, dict(constants or {}))

    def _bind_group(self, kernel, entries, label):
        res = [{"binding": i, "resource": {"buffer": v.buffer.handle, "offset": v.offset, "size": v.size}}
               for i, v in entries]
        return self.device.createBindGroup(self._to_js({"layout": kernel.layout, "entries": res, "label": label}))

    def _ops(self, seq):
        """The sequence as a JS array, built once per sequence version and reused by every run."""
        cached = getattr(seq, "_js", None)
        if cached is not None and cached[0] == len(seq.ops) and seq._built:
            return cached[1]
        from pyodide.ffi import to_js
        rows = []
        for op in seq.ops:
            if op.kind == "dispatch":
                rows.append([op.kernel.handle, op.bind_group, *op.groups])
            else:
                src, so, dst, do, n = op.copy
                rows.append([src.handle, so, dst.handle, do, n])
        arr = to_js(rows)
        seq._js = (len(seq.ops), arr)
        return arr

    async def _validate(self, seq):
        seq._built = False
        err = await self.js.validate(self.device, self._ops(seq))
        if err:
            raise GPUError(f"sequence {seq.label!r}: {err}")
        seq._built = True
        self._ops(seq)

    def _submit(self, seq, repeat):
        self.js.submit(self.device, self._ops(seq), repeat)

    async def sync(self):
        self.raise_if_broken()
        await self.device.queue.onSubmittedWorkDone()
        self.raise_if_broken()

    def destroy(self):
        self.device.destroy()


_device_cache: dict = {}


async def open_device(power_preference: str = "high-performance", limits: dict | None = None,
                      shared: bool = True) -> Device:
    """Open the WebGPU device (the same one for every caller unless shared=False)."""
    key = (power_preference, tuple(sorted((limits or {}).items())))
    if shared and key in _device_cache:
        return _device_cache[key]
    cls = BrowserDevice if IN_BROWSER else NativeDevice
    dev = await cls.open(power_preference, limits)
    if shared:
        _device_cache[key] = dev
    return dev
