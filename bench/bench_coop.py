"""What cooperative matrices (tensor cores) give our matmul on an NVIDIA GPU through wgpu-native, beside cuBLAS.

    python bench/bench_coop.py --out bench/results/coop.md     # on the GPU machine (bench/h100.sh sets it up)
    python bench/bench_coop.py --quick --out /tmp/coop.md      # anywhere: runs the plumbing, reports what failed
    python bench/bench_coop.py --naga-check                    # no GPU: each kernel through naga's SPIR-V writer

The kernels are bench/matmul_coop.wgsl (an experiment, not shipped): out (M, N) f32 = A (M, K) @ B (K, N) with f16
inputs and f32 accumulation, from a naive one-tile-per-subgroup kernel to one staging 128x128 blocks in workgroup
memory.
Every step runs in its own process, so that a compile error, a driver crash or a hang costs one row of the
table and not the run; each error is printed and written down, and the run goes on:

1. probe: the adapter's cooperative matrix configurations (from wgpu's log), the device, and which of
   coopLoad/coopLoadT and coopStore/coopStoreT read and write row-major tiles (one 16x16x16 product checked
   against NumPy). Also whether `coop_mat16x16<f32, C>()` (a zero constructor) compiles.
2. torch: cuBLAS through torch.matmul at the same sizes in fp32 (TF32 off), TF32 and fp16, CUDA events.
3. one process per kernel: a small product checked whole, then each timed size (best of a few submissions of
   `repeat` products, waited for by a read-back, as bench/bench_matmul.py does), checked on 16 rows.
4. stock: the same device request with wgpu-native as installed (fails today: see below).
5. probe_f32: whether f32 inputs (coop_mat16x16<f32, A>, coop_mat8x8<f32, A>) compile and compute (last: on
   the H100 the driver's compiler fails on them and the device is lost).

Correctness: the reference is float64 NumPy of the f16-rounded inputs, so only the accumulation differs; a
result passes when max |out - ref| <= 1e-3 * max |ref| (f32 accumulation over K = 4096 is ~1e-6 in practice).
The error against the unrounded f32 inputs is printed too (f16 rounding of the inputs: ~1e-3).

wgpu-native 29 (wgpu-py 0.32) creates devices with wgpu's experimental features off and offers no switch, so a
request for "cooperative-matrix" fails with "experimental features are not enabled" even where the adapter
lists it. For this benchmark only, the workers load a copy of the library with that check skipped (two
branches in wgpu_core's Adapter::create_device_and_queue, found by their exact bytes; see unlock_library).

naga 29.0.3 panics in its SPIR-V writer ("Expression [..] is not cached") on some cooperative stores, which
kills the process when the pipeline is created. --naga-check finds these without a GPU: it also skips the
check that the adapter has the feature, so a CPU adapter (lavapipe) passes each kernel through naga's parser,
validator and SPIR-V writer; the CPU driver then refuses the SPIR-V ("device lost"), which counts as a pass.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "pkg"))

from common import best_seconds  # noqa: E402  (bench/common.py)

SHADER = "matmul_coop.wgsl"
SHADER_PATH = Path(__file__).resolve().parent / SHADER  # an experiment: kept beside its bench, not in shaders/
SIZES = [(4096, 4096, 4096), (8192, 768, 3072)]   # M, N, K: square, and GPT-2 small's mlp c_proj at B*T = 8192
QUICK_SIZES = [(256, 256, 256)]
CHECK_SIZE = (256, 384, 320)                        # checked whole before timing
TOL = 1e-3                                          # max |out - ref| / max |ref| against f16-rounded inputs
# name: (entry point, output rows per workgroup, output columns per workgroup, input type in global memory)
KERNELS = {
    "naive": ("matmul_naive", 32, 32, "f16"),
    "block": ("matmul_block", 64, 64, "f16"),
    "staged": ("matmul_staged", 128, 128, "f16"),
    "staged_f32in": ("matmul_staged_f32in", 128, 128, "f32"),
}
ORDER = ["probe", "torch", "kernel:staged", "kernel:naive", "kernel:staged_f32in", "kernel:block", "stock",
         "probe_f32"]

# The two branches of wgpu_core::instance::Adapter::create_device_and_queue (wgpu-core 29.0.3 in wgpu-py
# 0.32.0's libwgpu_native-release.so) that refuse experimental features:
#   cmpb $0x1,0x120(%r14); jne <refuse>; jmp <go on>    -> jne becomes two nops
#   cmpb $0x0,0x120(%r14); jne <go on>                  -> jne becomes jmp
EXPERIMENTAL_CHECKS = [(bytes.fromhex("4180be20010000017528eb43"), 8, b"\x90\x90"),
                       (bytes.fromhex("4180be2001000000751d"), 8, b"\xeb")]
# For --naga-check only: the branch just before them that refuses features the adapter lacks, so that a CPU
# adapter hands cooperative-matrix WGSL to naga (parse, validation, SPIR-V writer); its driver then fails.
FEATURE_CHECK = (bytes.fromhex("4c89ff4821d74c31ff48f7d04c21e04809c77523"), 18, b"\x90\x90")


def log(*args, **kw):
    print(*args, **kw, flush=True)


# ---------------------------------------------------------------------------------------------
# Set-up shared by the workers.

def unlock_library(dst: Path, any_feature: bool = False) -> str:
    """Write a copy of wgpu-native with the experimental-features check skipped (and with any_feature, the
    check that the adapter has the requested features); returns what happened."""
    spec = importlib.util.find_spec("wgpu")
    if spec is None or not spec.submodule_search_locations:
        return "wgpu not installed"
    src = Path(list(spec.submodule_search_locations)[0]) / "resources" / "libwgpu_native-release.so"
    if not src.is_file():
        return f"no {src.name} next to wgpu (not Linux?): library left as it is"
    data = bytearray(src.read_bytes())
    for pattern, at, new in EXPERIMENTAL_CHECKS + ([FEATURE_CHECK] if any_feature else []):
        if data.count(pattern) != 1:
            return f"check pattern {pattern.hex()} found {data.count(pattern)} times in {src}: library left as it is"
        i = data.find(pattern) + at
        data[i:i + len(new)] = new
    dst.write_bytes(data)
    return f"patched copy of {src} at {dst}"


def entry_source(src: str, entry: str) -> str:
    """The WGSL with only `entry` and the functions it calls, so that one entry point that does not compile
    cannot take the others down with it (the compiler validates the whole module)."""
    from tabgpt.gpu import block_end
    spans = {}
    for m in re.finditer(r"^fn\s+(\w+)\s*\(", src, flags=re.M):
        start = m.start()
        # Attributes on the lines just above belong to the function.
        while True:
            prev = src.rfind("\n", 0, start - 1)
            line = src[prev + 1:start].strip()
            if start > 0 and re.match(r"@(compute|workgroup_size|vertex|fragment|must_use)\b", line):
                start = prev + 1
            else:
                break
        spans[m.group(1)] = (start, block_end(src, src.index("{", m.end())))
    keep, todo = set(), [entry]
    while todo:
        fn = todo.pop()
        if fn in keep:
            continue
        keep.add(fn)
        a, b = spans[fn]
        todo += [f for f in re.findall(r"\b(\w+)\s*\(", src[a:b]) if f in spans and f not in keep]
    out, pos = [], 0
    for name, (a, b) in sorted(spans.items(), key=lambda kv: kv[1]):
        out.append(src[pos:a])
        if name in keep:
            out.append(src[a:b])
        pos = b
    out.append(src[pos:])
    return "".join(out)


def with_layout(src: str, layout: str) -> str:
    """The kernels are written with coopLoadT/coopStoreT as the row-major pair; where the probe found the
    plain names to be row-major instead, swap them."""
    if layout != "plain":
        return src
    src = src.replace("coopLoadT<", "coopLoad@<").replace("coopLoad<", "coopLoadT<").replace("coopLoad@<", "coopLoad<")
    swapped = src.replace("coopStoreT(", "coopStore@(").replace("coopStore(", "coopStoreT(")
    return swapped.replace("coopStore@(", "coopStore(")


def open_device(capture_log: bool = False):
    """A tabgpt device that also asks for "cooperative-matrix". Returns (device, coop log lines)."""
    from tabgpt import gpu
    import wgpu

    class CoopDevice(gpu.NativeDevice):
        @classmethod
        async def open(cls, power_preference="high-performance", limits=None):
            os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
            self = cls()
            self.wgpu = wgpu
            adapter = wgpu.gpu.request_adapter_sync(power_preference=power_preference)
            info = dict(adapter.info)
            self.info = {k: info.get(k, "") for k in ("vendor", "device", "description", "backend_type")}
            native = set(adapter.features)
            self.adapter_features = sorted(native)
            feats = [f for f in ("shader-f16", "cooperative-matrix", "timestamp-query") if f in native]
            self.features = set(feats)
            alim = adapter.limits
            want = {n: alim[n] for n in gpu.RAISED_LIMITS if n in alim}
            for n in ("max-storage-buffer-binding-size", "max-buffer-size"):
                if n in want:
                    want[n] = min(want[n], (2 << 30) - 4)
            if "cooperative-matrix" not in native:
                if not os.environ.get("COOP_ANY_FEATURE"):
                    raise gpu.GPUError(f"adapter {self.info['device']!r} lists no 'cooperative-matrix'")
                feats.append("cooperative-matrix")
            self.device = adapter.request_device_sync(required_features=feats, required_limits=want)
            self.adapter = adapter
            for n in gpu.DEFAULT_LIMITS:
                if n in self.device.limits:
                    self.limits[n] = self.device.limits[n]
            return self

    lines = []
    if capture_log:
        class Keep(logging.Handler):
            def emit(self, record):
                msg = record.getMessage()
                if re.search(r"coop|cooperative", msg, re.I):
                    lines.append(msg.strip())
        handler = Keep()
        wgpu.logger.addHandler(handler)
        wgpu.logger.setLevel(logging.DEBUG)
    try:
        dev = gpu.wait(CoopDevice.open())
    finally:
        if capture_log:
            wgpu.logger.setLevel(logging.WARNING)
            wgpu.logger.removeHandler(handler)
    return dev, lines


def short(e: BaseException | str, n: int = 600) -> str:
    s = str(e).strip().replace("\r", "")
    s = re.sub(r"\n\s*\n", "\n", s)
    return s if len(s) <= n else s[:n] + " ..."


def emit(record: dict):
    print("RESULT " + json.dumps(record), flush=True)


# ---------------------------------------------------------------------------------------------
# Workers (each runs in its own process).

PROBE = """
enable f16;
enable wgpu_cooperative_matrix;
@group(0) @binding(0) var<storage, read> a: array<T>;
@group(0) @binding(1) var<storage, read> b: array<T>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> zeros: array<f32>;
@compute @workgroup_size(32)
fn probe() {
    let x = LOAD<coop_matSxS<T, A>>(&a[0], SU);
    let y = LOAD<coop_matSxS<T, B>>(&b[0], SU);
    let z = ZERO;
    STORE(coopMultiplyAdd(x, y, z), &out[0], SU);
}
"""


def run_probe(dev, S=16, T="f16", load="coopLoadT", store="coopStoreT", zero=None):
    """One S x S x S product A @ B in a single subgroup; returns (what the result equals, max error)."""
    from tabgpt.gpu import wait
    zero = zero or "LOAD<coop_matSxS<f32, C>>(&zeros[0], SU)"
    src = (PROBE.replace("ZERO", zero).replace("LOAD", load).replace("STORE", store)
           .replace("SxS", f"{S}x{S}").replace("SU", f"{S}u").replace("<T", f"<{T}"))
    rng = np.random.default_rng(1)
    dt = np.float16 if T == "f16" else np.float32
    a = rng.standard_normal((S, S)).astype(dt)
    b = rng.standard_normal((S, S)).astype(dt)
    ba, bb = dev.buffer(a.nbytes, "a", a), dev.buffer(b.nbytes, "b", b)
    out = dev.buffer(4 * S * S, "out")
    zeros = dev.buffer(4 * 256, "zeros")
    k = wait(dev.kernel(f"probe-{S}-{T}-{load}-{store}", "probe", source=src))
    seq = dev.sequence("probe")
    seq.dispatch(k, (1, 1, 1), a=ba, b=bb, out=out, zeros=zeros)
    wait(seq.build())
    seq.run()
    got = np.frombuffer(wait(dev.read(out)), dtype=np.float32).reshape(S, S).astype(np.float64)
    A, B = a.astype(np.float64), b.astype(np.float64)
    cands = {"A@B": A @ B, "B@A": B @ A, "(A@B)^T": (A @ B).T, "(B@A)^T": (B @ A).T}
    errs = {n: float(np.abs(got - r).max() / np.abs(r).max()) for n, r in cands.items()}
    best = min(errs, key=errs.get)
    return (best if errs[best] <= TOL else "none"), errs[best]


def worker_probe(args):
    t0 = time.perf_counter()
    rec = {"kind": "probe"}
    try:
        dev, lines = open_device(capture_log=True)
    except Exception as e:
        try:
            import wgpu
            info = dict(wgpu.gpu.request_adapter_sync(power_preference="high-performance").info)
            rec["device"] = {k: info.get(k, "") for k in ("vendor", "device", "description", "backend_type")}
        except Exception as e2:
            rec["device"] = {"device": "no adapter: " + short(e2, 200)}
        rec.update(device_error=short(e, 1500))
        log("device:", rec["device_error"])
        emit(rec)
        return
    rec.update(device=dev.info, coop_log=lines, features=dev.adapter_features,
               open_s=round(time.perf_counter() - t0, 2))
    log("adapter:", dev.info)
    log("cooperative matrix log lines:", *lines, sep="\n  ")
    layouts = {}
    for load in ("coopLoadT", "coopLoad"):
        for store in ("coopStoreT", "coopStore"):
            name = f"{load}+{store}"
            try:
                what, err = run_probe(dev, load=load, store=store)
                layouts[name] = {"result": what, "err": err}
            except Exception as e:
                layouts[name] = {"error": short(e)}
            log(f"  {name}: {layouts[name]}")
    rec["layouts"] = layouts
    if layouts.get("coopLoadT+coopStoreT", {}).get("result") == "A@B":
        rec["layout"] = "T"
    elif layouts.get("coopLoad+coopStore", {}).get("result") == "A@B":
        rec["layout"] = "plain"
    try:
        what, err = run_probe(dev, load="coopLoadT" if rec.get("layout") != "plain" else "coopLoad",
                              store="coopStoreT" if rec.get("layout") != "plain" else "coopStore",
                              zero="coop_mat16x16<f32, C>()")
        rec["zero_constructor"] = {"result": what, "err": err}
    except Exception as e:
        rec["zero_constructor"] = {"error": short(e)}
    log("  zero constructor coop_mat16x16<f32, C>():", rec["zero_constructor"])
    emit(rec)


def worker_stock(args):
    """Ask for 'cooperative-matrix' with wgpu-native as installed (expected to fail: see the docstring)."""
    rec = {"kind": "stock"}
    try:
        open_device()
        rec["result"] = "device with 'cooperative-matrix' created"
    except Exception as e:
        rec["result"] = "failed: " + short(e, 400)
    log("  stock wgpu-native:", rec["result"])
    emit(rec)


def worker_probe_f32(args):
    rec = {"kind": "probe_f32"}
    try:
        dev, _ = open_device()
    except Exception as e:
        rec["device_error"] = short(e)
        emit(rec)
        return
    load, store = ("coopLoad", "coopStore") if args.layout == "plain" else ("coopLoadT", "coopStoreT")
    for S in (16, 8):
        try:
            what, err = run_probe(dev, S=S, T="f32", load=load, store=store)
            rec[f"f32_{S}x{S}"] = {"result": what, "err": err}
        except Exception as e:
            rec[f"f32_{S}x{S}"] = {"error": short(e)}
        log(f"  f32 inputs {S}x{S}x{S}: {rec[f'f32_{S}x{S}']}")
        emit(dict(rec))


def worker_naga(args, entry):
    """Compile one entry point through naga's SPIR-V writer (see --naga-check)."""
    dev, _ = open_device()
    src = with_layout(entry_source(SHADER_PATH.read_text(), entry), args.layout)
    try:
        dev.device.create_compute_pipeline(layout="auto", compute={
            "module": dev.device.create_shader_module(code=src), "entry_point": entry})
        emit({"kind": "naga", "entry": entry, "result": "pipeline created"})
    except Exception as e:
        emit({"kind": "naga", "entry": entry, "result": "SPIR-V written; the driver then said: "
              + short(e, 200).splitlines()[-1].strip()})


def operands(M, N, K, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((M, K), dtype=np.float32), rng.standard_normal((K, N), dtype=np.float32))


def time_seq(dev, seq, seconds):
    """Seconds per run of `seq`: best of 3 submissions of `repeat` runs each, waited for by a read-back."""
    from tabgpt.gpu import wait
    return best_seconds(seq.run, lambda: wait(dev.sync()), 3, seconds, max_repeat=500)


def worker_kernel(args, name):
    from tabgpt.gpu import wait
    entry, bm, bn, itype = KERNELS[name]
    try:
        dev, _ = open_device()
    except Exception as e:
        emit({"kind": "kernel", "kernel": name, "size": "-", "error": "device: " + short(e)})
        return
    src = with_layout(entry_source(SHADER_PATH.read_text(), entry), args.layout)
    zeros = dev.buffer(4 * 256, "zeros")
    sizes = [CHECK_SIZE] + (QUICK_SIZES if args.quick else SIZES)
    for M, N, K in sizes:
        size = f"{M}x{N}x{K}"
        rec = {"kind": "kernel", "kernel": name, "entry": entry, "size": size, "checked": "all rows"}
        try:
            a, b = operands(M, N, K)
            a16, b16 = a.astype(np.float16), b.astype(np.float16)
            ga, gb = (a16, b16) if itype == "f16" else (a, b)
            ba, bb = dev.buffer(ga.nbytes, "a", ga), dev.buffer(gb.nbytes, "b", gb)
            out = dev.buffer(4 * M * N, "out")
            params = dev.uniform(struct.pack("<4I", M, N, K, 0))
            k = wait(dev.kernel(SHADER, entry, source=src))
            seq = dev.sequence(name)
            seq.dispatch(k, (N // bn, M // bm, 1), a=ba, b=bb, a4=ba, b4=bb, a4f=ba, b4f=bb, out=out,
                         zeros=zeros, p=params)
            wait(seq.build())
            seq.run()
            got = np.frombuffer(wait(dev.read(out)), dtype=np.float32).reshape(M, N)
            rows = np.arange(M)
            if (M, N, K) != CHECK_SIZE:
                rows = np.unique(np.r_[0, M - 1, np.random.default_rng(2).integers(0, M, 14)])
                rec["checked"] = f"{len(rows)} rows"
            ref16 = a16[rows].astype(np.float64) @ b16.astype(np.float64)
            ref32 = a[rows].astype(np.float64) @ b.astype(np.float64)
            g = got[rows].astype(np.float64)
            rec["err16"] = float(np.abs(g - ref16).max() / np.abs(ref16).max())
            rec["err32"] = float(np.abs(g - ref32).max() / np.abs(ref32).max())
            rec["ok"] = bool(rec["err16"] <= TOL and np.isfinite(g).all())
            if (M, N, K) != CHECK_SIZE:
                sec = time_seq(dev, seq, args.seconds)
                rec["ms"] = 1e3 * sec
                rec["tflops"] = 2.0 * M * N * K / sec / 1e12
            log(f"{name:>13} {size:>15}  " + ("OK  " if rec["ok"] else "BAD ") +
                f"err16 {rec['err16']:.1e} err32 {rec['err32']:.1e}" +
                (f"  {rec['ms']:.3f} ms  {rec['tflops']:.1f} TFLOP/s" if "ms" in rec else ""))
        except Exception as e:
            rec["error"] = short(e)
            log(f"{name:>13} {size:>15}  ERROR {rec['error']}")
        emit(rec)
        if "error" in rec and (M, N, K) == CHECK_SIZE:
            break   # it did not compile or run: the timed sizes would say the same


def worker_torch(args):
    try:
        import torch
    except ImportError:
        emit({"kind": "torch", "error": "no torch"})
        return
    if not torch.cuda.is_available():
        emit({"kind": "torch", "error": "torch sees no CUDA GPU"})
        return
    name = torch.cuda.get_device_name(0)
    for M, N, K in (QUICK_SIZES if args.quick else SIZES):
        rec = {"kind": "torch", "device": name, "size": f"{M}x{N}x{K}"}
        a, b = operands(M, N, K)
        ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
        for label, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                                   ("fp16", torch.float16, False)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            x, y = ta.to(dtype), tb.to(dtype)
            out = torch.empty((M, N), device="cuda", dtype=dtype)
            for _ in range(3):
                torch.matmul(x, y, out=out)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch.matmul(x, y, out=out)
            torch.cuda.synchronize()
            repeat = max(1, min(500, int(args.seconds / max(time.perf_counter() - t0, 1e-6))))
            best = float("inf")
            for _ in range(3):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                for _ in range(repeat):
                    torch.matmul(x, y, out=out)
                e.record()
                torch.cuda.synchronize()
                best = min(best, s.elapsed_time(e) / 1e3 / repeat)
            rec[label + "_ms"] = 1e3 * best
            rec[label + "_tflops"] = 2.0 * M * N * K / best / 1e12
        torch.backends.cuda.matmul.allow_tf32 = False
        log(f"cuBLAS {rec['size']}: " + ", ".join(f"{k} {rec[k + '_tflops']:.1f} TFLOP/s"
                                                 for k in ("fp32", "tf32", "fp16")))
        emit(rec)


# ---------------------------------------------------------------------------------------------
# Driver.

def run_worker(step: str, args, env, timeout: float) -> tuple[list[dict], str]:
    """Run one step in a fresh process; returns (its RESULT records, a note when it failed)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", step, "--layout", args.layout,
           "--seconds", str(args.seconds)] + (["--quick"] if args.quick else [])
    log(f"\n=== {step}")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        rc = f"timeout after {timeout:.0f} s"
    records = []
    for line in out.splitlines():
        if line.startswith("RESULT "):
            records.append(json.loads(line[7:]))
        else:
            log("  " + line)
    err_lines = [ln for ln in err.splitlines() if "XDG_RUNTIME_DIR" not in ln]
    note = ""
    if rc != 0:
        # A Rust panic says what went wrong on the line after "panicked at"; keep it ahead of the tail.
        panic = [ln for i, ln in enumerate(err_lines)
                 if "panicked" in ln or (i and "panicked" in err_lines[i - 1])]
        note = f"{step}: exit {rc}; stderr: " + short("\n".join(panic[:4] + err_lines[-6:]), 900)
        log("  " + note)
    elif err_lines:
        log("  stderr: " + short("\n".join(err_lines[-8:]), 600))
    log(f"  ({time.perf_counter() - t0:.1f} s)")
    return records, note


def fmt(v, f):
    return "-" if v is None else format(v, f) + ("x" if f == ".2f" else "")


def report(state) -> str:
    """The markdown section for bench/results/coop.md."""
    probe = next((r for r in state["records"] if r["kind"] == "probe"), {})
    dev = probe.get("device", {})
    device = dev.get("device") or "?"
    lines = [f"## Cooperative matrices through wgpu-native, {state['date']}, {device}", "",
             f"`python bench/bench_coop.py {' '.join(state['argv'])}` (every step in its own process). "
             f"wgpu {state['wgpu']}; driver: {dev.get('description', '?')}; library: {state['unlock']}.", ""]
    if "device_error" in probe:
        lines += ["Device with 'cooperative-matrix': **failed**:", "", "```", probe["device_error"], "```", ""]
    if probe.get("coop_log"):
        lines += ["Cooperative matrix configurations (wgpu's log while opening the adapter):", "", "```"]
        lines += probe["coop_log"] + ["```", ""]
    if probe.get("layouts"):
        lines += ["Tile layout probe (one 16x16x16 f16 product, which product the stored tile equals):", ""]
        lines += [f"- {k}: " + (v.get("result", "") + (f" (max rel err {v['err']:.1e})" if "err" in v else "")
                                if "error" not in v else "error: `" + v["error"].replace("\n", " ") + "`")
                  for k, v in probe["layouts"].items()]
        z = probe.get("zero_constructor", {})
        lines += ["- zero constructor `coop_mat16x16<f32, C>()`: " +
                  (z.get("result", "") if "error" not in z else "error: `" + z["error"].replace("\n", " ") + "`"),
                  f"- kernels ran with layout: {state['args'].layout}", ""]
    stock = [r for r in state["records"] if r["kind"] == "stock"]
    if stock:
        lines += [f"wgpu-native as installed, asked for 'cooperative-matrix': {stock[-1]['result']}", ""]
    f32 = [r for r in state["records"] if r["kind"] == "probe_f32"]
    if f32:
        r = f32[-1]
        lines += ["f32 inputs: " + "; ".join(
            f"{k}: " + (v.get("result", "") if "error" not in v else "error: `" + v["error"].replace("\n", " ") + "`")
            for k, v in r.items() if k.startswith("f32_")), ""]
    cub = {r["size"]: r for r in state["records"] if r["kind"] == "torch" and "size" in r}
    if cub:
        name = next(iter(cub.values())).get("device", "")
        lines += [f"cuBLAS through torch.matmul ({name}, CUDA events, best of 3): " + "; ".join(
            f"{s}: fp32 {r['fp32_tflops']:.1f}, TF32 {r['tf32_tflops']:.1f}, fp16 {r['fp16_tflops']:.1f} TFLOP/s"
            for s, r in cub.items()), ""]
    lines += ["| kernel | M x N x K | ms | TFLOP/s | of cuBLAS fp32 | of cuBLAS fp16 | max rel err (f16 in / f32 in) "
              "| checked | result |", "| --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for r in state["records"]:
        if r["kind"] != "kernel":
            continue
        c = cub.get(r["size"], {})
        f32s = None if "tflops" not in r or "fp32_tflops" not in c else r["tflops"] / c["fp32_tflops"]
        f16s = None if "tflops" not in r or "fp16_tflops" not in c else r["tflops"] / c["fp16_tflops"]
        res = ("error: " + r["error"].replace("\n", " ").replace("|", "/")[:300]) if "error" in r else \
            ("pass" if r["ok"] else "**wrong**")
        errs = f"{r['err16']:.1e} / {r['err32']:.1e}" if "err16" in r else "-"
        lines.append(f"| {r['kernel']} | {r['size']} | {fmt(r.get('ms'), '.3f')} | {fmt(r.get('tflops'), '.1f')} | "
                     f"{fmt(f32s, '.2f')} | {fmt(f16s, '.2f')} | {errs} | {r.get('checked', '-')} | {res} |")
    if state["notes"]:
        lines += ["", "Failures and skipped steps:", ""] + [f"- {n}".replace("\n", " ") for n in state["notes"]]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", action="append", default=[],
                    help="append the markdown report to this file (repeatable)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a CPU adapter: checks the plumbing)")
    ap.add_argument("--budget", type=float, default=170.0, help="seconds for the whole run; later steps skipped")
    ap.add_argument("--seconds", type=float, default=0.1, help="time per timed submission")
    ap.add_argument("--steps", nargs="+", default=ORDER, help=f"subset of {ORDER}")
    ap.add_argument("--no-unlock", action="store_true", help="use wgpu-native as installed")
    ap.add_argument("--naga-check", action="store_true",
                    help="no GPU needed: put each kernel through naga's SPIR-V writer on any adapter and report "
                         "panics (naga 29 has some); nothing is run or timed")
    ap.add_argument("--layout", default="T", choices=["T", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        if args.worker == "probe":
            worker_probe(args)
        elif args.worker == "probe_f32":
            worker_probe_f32(args)
        elif args.worker.startswith("naga:"):
            worker_naga(args, args.worker.split(":", 1)[1])
        elif args.worker == "stock":
            worker_stock(args)
        elif args.worker == "torch":
            worker_torch(args)
        elif args.worker.startswith("kernel:"):
            worker_kernel(args, args.worker.split(":", 1)[1])
        return

    t_start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1", RUST_BACKTRACE="0")
    env.setdefault("XDG_RUNTIME_DIR", "/tmp")
    lib = Path(f"/tmp/libwgpu_native-unlocked-{os.getuid()}{'-any' if args.naga_check else ''}.so")
    unlock = "as installed (--no-unlock)" if args.no_unlock else unlock_library(lib, args.naga_check)
    if unlock.startswith("patched"):
        env["WGPU_LIB_PATH"] = str(lib)
    log("wgpu-native:", unlock)
    if args.naga_check:
        env["COOP_ANY_FEATURE"] = "1"
        failed = 0
        for name, (entry, *_) in KERNELS.items():
            records, note = run_worker("naga:" + entry, args, env, timeout=60)
            res = records[0]["result"] if records else note
            failed += not records
            log(f"{entry}: {res}")
        sys.exit(1 if failed else 0)
    try:
        wgpu_version = importlib.metadata.version("wgpu")
    except importlib.metadata.PackageNotFoundError:
        wgpu_version = "?"
    state = {"date": datetime.date.today(), "argv": [a for a in sys.argv[1:]], "wgpu": wgpu_version,
             "unlock": unlock, "records": [], "notes": [], "args": args}

    # Each --out file keeps what it held and gets this run's section appended (rewritten after every step,
    # so that a run cut short still leaves its rows).
    before = {path: (Path(path).read_text().rstrip() + "\n\n" if Path(path).is_file() else "") for path in args.out}

    def write():
        text = report(state)
        for path in args.out:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(before[path] + text)

    for step in args.steps:
        left = args.budget - (time.perf_counter() - t_start)
        if left < 15:
            state["notes"].append(f"{step}: skipped, {left:.0f} s of the time budget left")
            log(f"=== {step}: skipped (budget)")
            continue
        if step.startswith("kernel:") or step == "probe_f32":
            probe = next((r for r in state["records"] if r["kind"] == "probe"), {})
            if "device_error" in probe:
                state["notes"].append(f"{step}: skipped, no device with 'cooperative-matrix'")
                continue
        step_env = env
        if step == "stock":
            step_env = {k: v for k, v in env.items() if k != "WGPU_LIB_PATH"}
        records, note = run_worker(step, args, step_env, timeout=min(75.0, left - 5))
        state["records"] += records
        if step == "probe":
            probe = next((r for r in records if r["kind"] == "probe"), {})
            if probe.get("layout"):
                args.layout = probe["layout"]
            elif "device_error" not in probe:
                state["notes"].append("probe: neither coopLoadT+coopStoreT nor coopLoad+coopStore gave A@B; "
                                      "kernels run as written")
        if note:
            state["notes"].append(note)
        for r in records:
            if "error" in r and r["kind"] in ("kernel", "torch"):
                state["notes"].append(f"{r['kind']} {r.get('kernel', '')} {r.get('size', '')}: "
                                      + r["error"].replace("\n", " ")[:500])
        write()
    write()
    log("\n" + report(state))
    log(f"total {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
