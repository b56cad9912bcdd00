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


def probe_parser(doc: str, rounds: int = 3, seconds: float = 0.05):
    """The arguments the probes share (bench/probe_*.py): --quick (tiny sizes, one round: a smoke run for CPU
    adapters), --rounds (each form timed once a round, in turn; each keeps its best round) and --seconds (time
    per timed submission). Parse with probe_args."""
    import argparse
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke run for CPU adapters")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--seconds", type=float, default=seconds, help="time per timed submission")
    return ap


def side_by_side_parser(doc: str, results: str):
    """The arguments of the benchmarks that time our kernels beside PyTorch's at a few shapes (bench_reductions.py,
    bench_embedding.py, bench_attention.py): --trials (rounds, arms in turn), --no-torch, --no-write (of
    bench/results/RESULTS.md) and --quick (small shapes)."""
    import argparse
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    ap.add_argument("--no-write", action="store_true", help=f"do not append to bench/results/{results}.md")
    ap.add_argument("--quick", action="store_true", help="small shapes (checks that it runs)")
    return ap


def time_in_turn(dev, arms, args) -> None:
    """The probes' timing: each of args.rounds rounds times every arm's sequence once, in turn (best_seconds over
    args.seconds), and appends the time to the arm's list. arms: (sequence, times) pairs."""
    from tabgpt.gpu import wait
    arms = list(arms)
    for _ in range(args.rounds):
        for seq, times in arms:
            times.append(best_seconds(seq.run, lambda: wait(dev.sync()), 3, args.seconds))


def probe_args(ap):
    """ap's arguments, with rounds 1 under --quick."""
    args = ap.parse_args()
    if args.quick:
        args.rounds = 1
    return args


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
