"""What the benchmarks share: timing a replayed submission, and appending a dated table to bench/results/."""

from __future__ import annotations

import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def best_seconds(run, sync, trials: int = 3, seconds: float = 0.25, max_repeat: int = 1000) -> float:
    """Best seconds per call over `trials` submissions of run(repeat), each waited for by sync().

    run(1) once to warm up and once to measure, then repeat is chosen so that one submission lasts about
    `seconds`: long enough that submission and read-back costs vanish, short enough to repeat."""
    run(1)
    sync()
    t0 = time.perf_counter()
    run(1)
    sync()
    once = time.perf_counter() - t0
    repeat = max(1, min(max_repeat, int(seconds / max(once, 1e-6))))
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        run(repeat)
        sync()
        best = min(best, (time.perf_counter() - t0) / repeat)
    return best


def append_result(name: str, text: str) -> Path:
    """Append `text` (a dated markdown section) to bench/results/NAME.md."""
    out = RESULTS / f"{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(text + "\n")
    return out


def device_label(dev) -> str:
    """The adapter's name, and natively the shader runtime checks in force (they change kernel speed)."""
    name = dev.info.get("device") or dev.info.get("vendor") or "?"
    if dev.backend == "wgpu-native":
        name += f" (wgpu-native, shader checks: {dev.shader_checks})"
    return name
