"""A/B of settings in one process: our trainer built once per arm, then rounds of steps, the arms in turn.

Each arm is a set of environment variables (NAME=VALUE, comma-separated; "" for none) applied while its model is
built, when the switches are read (TABGPT_ATTENTION_DQ_PREFETCH, TABGPT_CACHE, ...), and "candidates=NAME" gives
the autotuner other candidates for that arm (CANDIDATES: "trial" adds TRIAL_TILES to its own, "literal" keeps the
written-out ones, "no128" drops 128 x 128 blocks). The arms share the process's device; its tune choices held in
memory are dropped before each arm, so that each arm's products are tuned, or read, from the arm's tune file
(TABGPT_CACHE): arms without a TABGPT_CACHE of their own share one file and so the same picks, and arms that each
set one measure the spread of fresh tunings. Then each round times --steps steps of every arm, the order rotating
from round to round, and the table gives each arm's tokens/s per round and the median of its ratios to the first
arm's in the same rounds. Separate processes differ by up to 4% on an H100, most of it the autotuner's picks
(bench/results/h100/run95_*, run96_*, run97_*); arms in one process measure within 0.1-0.2% round to round.

    python bench/probe_ab.py --arm "" --arm TABGPT_ATTENTION_DQ_PREFETCH=0 [--preset browser] [--steps 100]
    python bench/probe_ab.py --arm TABGPT_CACHE=/tmp/t1 --arm TABGPT_CACHE=/tmp/t2 --arm TABGPT_CACHE=/tmp/t3
    python bench/probe_ab.py --arm TABGPT_CACHE=/tmp/n1 --arm TABGPT_CACHE=/tmp/z1,TABGPT_AUTOTUNE_DATA=zeros \
        --arm TABGPT_CACHE=/tmp/n2 --arm TABGPT_CACHE=/tmp/z2,TABGPT_AUTOTUNE_DATA=zeros
        # fresh tunings timed on N(0, 1) operands and on zeros (several of each: one tuning is one draw); a second
        # table then gives each setting's lowest, median and highest draw
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "pkg"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_train import Steps, native_trainer  # noqa: E402
from tabgpt.ops.matmul import TILES_LARGE  # noqa: E402

# "candidates=trial": more written-out tile shapes, where fewer threads leave each more registers. On an H100
# (2026-12-05) the autotuner picked them for 7 of the browser preset's 15 products, whose sum over a step, each
# timed alone, fell 2% (16.58 to 16.19 ms: bench_matmul.py, run91_matmul.txt), but training was no faster (arms in
# separate processes, 421,088 / 422,515 against 423,385 / 426,402 tokens/s: run92_train_*.txt).
TRIAL_TILES = [dict(TILES_LARGE, LITERAL=True, **shape) for shape in (
    {"TN": 16}, {"BM": 64, "TN": 16}, {"BM": 64, "BN": 64}, {"BN": 64, "BK": 16}, {"BM": 64, "BK": 16}, {"BN": 96},
    {"BM": 96})]


# candidates=NAME: the autotuner's candidates for the arm, from its own (TUNE_TILES)
CANDIDATES = {
    "trial": lambda tiles: tiles + TRIAL_TILES,
    "literal": lambda tiles: [t for t in tiles if t.get("LITERAL")],             # rows written out only
    "no128": lambda tiles: [t for t in tiles if (t["BM"], t["BN"]) != (128, 128)],  # no 128 x 128 blocks
}


def parse_arm(text: str) -> dict:
    """"A=1,B=0" -> {"A": "1", "B": "0"}; "" -> {}. ValueError for anything else, or an unknown candidates= name."""
    arm = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        if not eq or not name:
            raise ValueError(f"an arm is NAME=VALUE pairs separated by commas (or ''), got {text!r}")
        if name == "candidates" and value not in CANDIDATES:
            raise ValueError(f"candidates= takes {', '.join(CANDIDATES)}, got {value!r}")
        arm[name] = value
    return arm


def build(cfg, arm: dict):
    """native_trainer(cfg) with the arm's environment set while the model is built (and restored after)."""
    from tabgpt.ops import matmul
    saved_env = {k: os.environ.get(k) for k in arm if k != "candidates"}
    saved_tiles = matmul.TUNE_TILES
    matmul._tuned.clear()     # the device is shared: each arm's products are tuned (or read) from its own tune file
    try:
        for k, v in arm.items():
            if k == "candidates":
                matmul.TUNE_TILES = CANDIDATES[v](saved_tiles)
            else:
                os.environ[k] = v
        return native_trainer(cfg)
    finally:
        matmul.TUNE_TILES = saved_tiles
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rounds_in_turn(arms: list[Steps], steps: int, rounds: int, report=None) -> list[list[float]]:
    """Each arm's tokens/s per round: every round times `steps` steps of every arm, the order rotating from round to
    round (with two arms, alternating); report(round, tps) after each round."""
    tps = [[] for _ in arms]
    for r in range(rounds):
        for i in [(r + j) % len(arms) for j in range(len(arms))]:
            tps[i].append(arms[i].run(steps))
        if report:
            report(r, tps)
    return tps


def table(preset_name: str, rounds: int, steps: int, names: list[str], tps: list[list[float]]) -> str:
    """Each arm's tokens/s per round, its median, and the median of its per-round ratios to the first arm's."""
    lines = [f"## Settings side by side in one process, preset {preset_name}, {rounds} rounds of {steps} steps, "
             "arms in turn", "", "| arm | tokens/s, each round | median | vs the first arm (median of rounds) |",
             "| --- | --- | ---: | ---: |"]
    for name, t in zip(names, tps):
        ratio = statistics.median(a / b for a, b in zip(t, tps[0]))
        lines.append(f"| {name or '(as set)'} | {' / '.join(f'{x:,.0f}' for x in t)} | {statistics.median(t):,.0f} "
                     f"| {ratio:.3f}x |")
    return "\n".join(lines) + "\n"


def setting(arm: str) -> str:
    """An arm's settings apart from its tune file: "TABGPT_CACHE=/tmp/f1,TABGPT_TUNE_FLUSH=1" ->
    "TABGPT_TUNE_FLUSH=1"."""
    return ",".join(f"{k}={v}" for k, v in parse_arm(arm).items() if k != "TABGPT_CACHE")


def settings_table(names: list[str], tps: list[list[float]]) -> str:
    """Where arms repeat a setting with tune files of their own (fresh tunings), each setting's draws: the lowest,
    median and highest of its arms' median tokens/s, and the setting whose lowest is highest; "" where no setting
    has two arms."""
    groups: dict[str, list[float]] = {}
    for name, t in zip(names, tps):
        groups.setdefault(setting(name), []).append(statistics.median(t))
    if max(len(v) for v in groups.values()) < 2:
        return ""
    lines = ["## Each setting's fresh tunings (the median tokens/s of each of its arms)", "",
             "| setting | tunings | lowest | median | highest | highest / lowest |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for g, v in groups.items():
        lines.append(f"| {g or '(as set)'} | {len(v)} | {min(v):,.0f} | {statistics.median(v):,.0f} | {max(v):,.0f} "
                     f"| {max(v) / min(v):.3f}x |")
    best = max(groups, key=lambda g: min(groups[g]))
    return "\n".join(lines) + f"\n\nthe setting with the highest lowest draw: {best or '(as set)'}\n"


def main():
    from tabgpt.config import preset
    ap = argparse.ArgumentParser()
    ap.add_argument("--arm", action="append", default=[], help="NAME=VALUE[,NAME=VALUE...] or '' (twice or more)")
    ap.add_argument("--preset", default="browser")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    if len(args.arm) < 2 or args.steps < 1 or args.rounds < 1:
        sys.exit("give two arms or more (--arm ... --arm ...), and --steps and --rounds of at least 1")
    try:
        arms = [parse_arm(a) for a in args.arm]
    except ValueError as e:
        sys.exit(str(e))
    cfg = preset(args.preset)
    trainers = [Steps(cfg, build(cfg, arm)) for arm in arms]
    for t in trainers:
        t.run(3)                                        # warm-up

    def report(r, tps):
        print(f"round {r + 1}: " + "  ".join(f"{name or '(as set)'} {t[-1]:,.0f}" for name, t in zip(args.arm, tps)),
              flush=True)

    tps = rounds_in_turn(trainers, args.steps, args.rounds, report)
    for t in trainers:
        t.check()
    print()
    print(table(args.preset, args.rounds, args.steps, args.arm, tps))
    print(settings_table(args.arm, tps))


if __name__ == "__main__":
    main()
