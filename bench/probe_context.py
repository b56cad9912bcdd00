"""Does a CUDA context beside ours slow our trainer? Our tokens/s, one model, through phases in this order:

  alone                 nothing else on the GPU
  CUDA in another       a child process holds a CUDA context (torch.zeros on the GPU) and waits
  child gone            that process has exited
  torch imported        `import torch` in this process, no CUDA yet
  CUDA in this process  torch.zeros on the GPU in this process (a live, idle CUDA context)
  PyTorch trained       the bench_train PyTorch trainer built here and run 20 steps (its memory held, idle)
  PyTorch released      the trainer deleted and torch.cuda.empty_cache() (the context stays)

Each phase times --rounds rounds of --steps steps and prints every round, so that a phase's cost shows as a ratio
to "alone" within one run. bench_train.py --rounds runs both trainers in one process; this says whether that
arrangement weighs on ours.

    python bench/probe_context.py [--preset browser] [--steps 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "pkg"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_train import Steps, native_trainer  # noqa: E402

CHILD = "import sys, torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize(); print('ready', flush=True); " \
        "sys.stdin.read()"


def need_cuda():
    """Exit with what to do unless PyTorch sees a CUDA GPU (before any model is built)."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        sys.exit("probe_context.py puts CUDA contexts beside our trainer: it needs PyTorch with a CUDA GPU "
                 "(pip install torch, on a machine with an NVIDIA GPU)")


def table(preset_name: str, rounds: int, steps: int, results) -> str:
    """The phases as a table: each round's tokens/s, their median, and the median's ratio to the first phase's."""
    base = statistics.median(results[0][1])
    lines = [f"## Our trainer beside a CUDA context, preset {preset_name}, {rounds} rounds of {steps} steps", "",
             "| phase | tokens/s, each round | median | vs alone |", "| --- | --- | ---: | ---: |"]
    for name, tps in results:
        m = statistics.median(tps)
        lines.append(f"| {name} | {' / '.join(f'{t:,.0f}' for t in tps)} | {m:,.0f} | {m / base:.3f}x |")
    return "\n".join(lines) + "\n"


def main():
    from tabgpt.config import preset
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="browser")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.steps < 1 or args.rounds < 1:
        sys.exit("--steps and --rounds must be at least 1")
    need_cuda()
    cfg = preset(args.preset)
    ours = Steps(cfg, native_trainer(cfg))
    ours.run(3)                                         # warm-up
    results = []

    def phase(name):
        tps = [ours.run(args.steps) for _ in range(args.rounds)]
        results.append((name, tps))
        print(f"{name:22s} " + " ".join(f"{t:,.0f}" for t in tps), flush=True)

    phase("alone")
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if child.stdout.readline().strip() != "ready":
        sys.exit("the child process could not open CUDA")
    phase("CUDA in another")
    child.stdin.close()
    child.wait()
    time.sleep(1.0)
    phase("child gone")
    import torch
    phase("torch imported")
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    phase("CUDA in this process")
    from bench_train import torch_trainer, torch_seconds
    tstep, tsync = torch_trainer(cfg, bf16=False)
    torch_seconds(tstep, tsync, 20)
    phase("PyTorch trained")
    del tstep, tsync
    gc.collect()
    torch.cuda.empty_cache()
    phase("PyTorch released")
    ours.check()
    print()
    print(table(args.preset, args.rounds, args.steps, results))


if __name__ == "__main__":
    main()
