"""The f32 FMA rate a WGSL kernel can reach on this adapter: the ceiling for our matmul, measured, not quoted.
With --f16, the same for vec2<f16> fma chains (two FMAs per instruction where the hardware pairs them; needs
shader-f16): whether f16 arithmetic could make a faster matmul on this GPU.

Every thread runs CHAINS independent fma chains (a*x + y with values that stay finite) for `iters` iterations and
writes one sum (so that nothing is optimised away); FLOP = 2 * threads * CHAINS * iters. Workgroups of 256
threads, enough of them to fill a large GPU many times over. Best of a few timed submissions.

    python bench/bench_peak.py                 # prints TFLOP/s and appends to bench/results/peak.md
    python bench/bench_peak.py --quick --no-write
    python bench/bench_peak.py --f16
"""

from __future__ import annotations

import argparse
import datetime
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "pkg"))

from common import append_result, best_seconds, device_label  # noqa: E402  (bench/common.py)
from tabgpt import gpu  # noqa: E402
from tabgpt.gpu import wait  # noqa: E402

CHAINS = 16

def source(f16: bool = False) -> str:
    """The kernel: f32 chains, or vec2<f16> chains (each fma two FMAs) that end in an f32 sum."""
    t = "vec2<f16>" if f16 else "f32"
    init = "".join(f"    var c{j} = {t}(f16((i + {j}u) & 1023u) * 1e-4h);\n" if f16
                   else f"    var c{j} = f32(i + {j}u) * 1e-7;\n" for j in range(CHAINS))
    total = " + ".join(f"c{j}" for j in range(CHAINS))
    return ("enable f16;\n" if f16 else "") + """
struct P { iters: u32, _a: u32, _b: u32, _c: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> sink: array<f32>;

@compute @workgroup_size(256)
fn fma_peak(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
    let i = gid.y * nwg.x * 256u + gid.x;
""" + ("""    let x = vec2<f16>(0.999h + f16(i & 7u) * 1e-4h);
    let y = vec2<f16>(1e-3h);
""" if f16 else """    let x = 0.999 + f32(i & 7u) * 1e-6;
    let y = 1e-3;
""") + init + """
    for (var it = 0u; it < p.iters; it++) {
""" + "".join(f"        c{j} = fma(c{j}, x, y);\n" for j in range(CHAINS)) + """
    }
""" + (f"    let s = {total};\n    sink[i] = f32(s.x) + f32(s.y);\n}}\n" if f16 else f"    sink[i] = {total};\n}}\n")


SOURCE = source()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small grid (CPU adapters)")
    ap.add_argument("--iters", type=int, default=4096)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--f16", action="store_true", help="vec2<f16> fma chains (shader-f16) instead of f32")
    args = ap.parse_args()
    dev = wait(gpu.open_device())
    if args.f16 and "shader-f16" not in dev.features:
        raise SystemExit("--f16: this adapter has no shader-f16")
    groups = 64 if args.quick else 132 * 64
    iters = 64 if args.quick else args.iters
    threads = groups * 256
    k = wait(dev.kernel("peak_f16.wgsl" if args.f16 else "peak.wgsl", "fma_peak",
                        source=source(args.f16)))
    params = dev.uniform(struct.pack("<4I", iters, 0, 0, 0), "peak-params")
    sink = dev.buffer(4 * threads, "sink")
    seq = dev.sequence("peak")
    seq.dispatch(k, (min(groups, 65535), -(-groups // 65535)), p=params, sink=sink)
    wait(seq.build())
    sec = best_seconds(seq.run, lambda: wait(dev.sync()), 1 if args.quick else 5, 0.2)
    lanes = 2 if args.f16 else 1
    tflops = 2.0 * lanes * threads * CHAINS * iters / sec / 1e12
    kind = "vec2<f16>" if args.f16 else "f32"
    line = (f"{tflops:.2f} TFLOP/s {kind} FMA ({threads} threads x {CHAINS} chains x {iters} iterations, "
            f"{sec * 1e3:.3f} ms)")
    print(line)
    if not args.no_write:
        text = (f"## FMA ceiling, {datetime.date.today()}, {device_label(dev)}\n\n"
                f"`python bench/bench_peak.py {' '.join(sys.argv[1:])}`: {line}\n")
        append_result("peak", text)


if __name__ == "__main__":
    main()
