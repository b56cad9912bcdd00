"""A kernel self-test that runs the same way natively and in the browser.

It multiplies awkwardly shaped matrices with a tiled WGSL matmul and sums a long vector with a
tree reduction, and compares both with plain-Python references (no numpy: this runs in Pyodide).
"""

from __future__ import annotations

import array
import math
import random
import struct
import time

from tabgpt.gpu import Device, open_device

MATMUL_TOL = 1e-4   # relative to the largest |reference| entry
REDUCE_TOL = 1e-5   # relative to sum(|x|)


def _matmul_ref(a, b, M, N, K):
    out = [0.0] * (M * N)
    for i in range(M):
        row = a[i * K:(i + 1) * K]
        for j in range(N):
            out[i * N + j] = math.fsum(row[k] * b[k * N + j] for k in range(K))
    return out


async def check_matmul(dev: Device, M=37, N=45, K=53, seed=0) -> dict:
    rng = random.Random(seed)
    a = array.array("f", (rng.uniform(-1, 1) for _ in range(M * K)))
    b = array.array("f", (rng.uniform(-1, 1) for _ in range(K * N)))
    k = await dev.kernel("selftest.wgsl", "matmul")
    ba, bb = dev.buffer(4 * M * K, "a", a), dev.buffer(4 * K * N, "b", b)
    bo = dev.buffer(4 * M * N, "out")
    params = dev.uniform(struct.pack("<4I", M, N, K, 0))
    seq = dev.sequence("selftest-matmul")
    seq.dispatch(k, ((N + 15) // 16, (M + 15) // 16), mp=params, a=ba, b=bb, out=bo)
    await seq.build()
    seq.run()
    got = await dev.read_floats(bo)
    ref = _matmul_ref(a.tolist(), b.tolist(), M, N, K)
    scale = max(abs(x) for x in ref)
    err = max(abs(g - r) for g, r in zip(got, ref)) / scale
    return {"name": f"matmul {M}x{K} @ {K}x{N}", "max_rel_err": err, "tol": MATMUL_TOL, "ok": err <= MATMUL_TOL}


async def check_reduce(dev: Device, n=100_003, seed=1) -> dict:
    rng = random.Random(seed)
    x = array.array("f", (rng.uniform(-1, 1) for _ in range(n)))
    k = await dev.kernel("selftest.wgsl", "reduce_sum")
    bufs = [dev.buffer(4 * n, "x", x)]
    seq = dev.sequence("selftest-reduce")
    size = n
    while True:
        groups = (size + 1023) // 1024
        out = dev.buffer(4 * groups, f"partial{len(bufs)}")
        seq.dispatch(k, (groups,), rp=dev.uniform(struct.pack("<4I", size, 0, 0, 0)), inp=bufs[-1], partial=out)
        bufs.append(out)
        size = groups
        if groups == 1:
            break
    await seq.build()
    seq.run()
    got = (await dev.read_floats(bufs[-1]))[0]
    ref = math.fsum(x)
    err = abs(got - ref) / math.fsum(abs(v) for v in x)
    return {"name": f"reduce_sum n={n} ({len(seq)} passes)", "value": got, "ref": ref,
            "max_rel_err": err, "tol": REDUCE_TOL, "ok": err <= REDUCE_TOL}


async def dispatch_cost(dev: Device, n=1000, reps=5) -> dict:
    """Microseconds per replayed dispatch: n tiny dispatches in one sequence, submitted and waited for."""
    k = await dev.kernel("selftest.wgsl", "touch")
    buf = dev.buffer(16, "touch")
    seq = dev.sequence("dispatch-cost")
    for _ in range(n):
        seq.dispatch(k, (1,), partial=buf)
    await seq.build()
    seq.run()
    await dev.sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        seq.run()
        await dev.sync()
        best = min(best, time.perf_counter() - t0)
    total = (await dev.read_floats(buf, count=1))[0]
    return {"dispatches": n, "us_per_dispatch": 1e6 * best / n, "counter": total,
            "counter_ok": total == n * (reps + 1)}


async def run_selftest(dev: Device | None = None) -> dict:
    dev = dev or await open_device()
    t0 = time.perf_counter()
    checks = [await check_matmul(dev), await check_matmul(dev, 64, 64, 64, seed=2), await check_reduce(dev)]
    return {"ok": all(c["ok"] for c in checks), "checks": checks, "seconds": time.perf_counter() - t0}
