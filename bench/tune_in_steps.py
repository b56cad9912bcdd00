"""Refine the autotuner's picks inside training steps: each product's runoff finalists, timed alone by the
autotuner, are tried in the whole step, one product shape at a time, and kept where the step is faster.

The autotuner (ops/matmul.py) times each product shape by itself; on an H100 fresh tunings of the browser preset
train up to 4% apart (BENCHMARKS.md, 2026-12-05 evening), so candidates within its noise alone are not equal in a
step. This tunes the model afresh into --out's tune file, then, the longest products first, for each shape whose
runoff kept finalists within --within of its pick (timed alone), builds a second model with that shape's pick
replaced by the finalist (every other pick as it stands) and times rounds of --steps steps of both, in turn (the
order alternating). The finalist is kept where the median of its per-round ratios exceeds 1 + --threshold, and later
shapes are tried against the model as refined so far. The refined choices are written back to --out's tune file,
which later runs use through TABGPT_CACHE; the table says what was tried and what each measured.

    python bench/tune_in_steps.py --out runs/tuned [--preset browser] [--steps 20] [--rounds 3]
    TABGPT_CACHE=runs/tuned python bench/bench_train.py --preset browser --steps 100 --rounds 8
    python bench/probe_ab.py --arm TABGPT_CACHE=runs/fresh --arm TABGPT_CACHE=runs/tuned   # against a plain tuning
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "pkg"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_train import Steps  # noqa: E402
from probe_ab import build, rounds_in_turn  # noqa: E402


def trainer(cfg, cache: Path) -> Steps:
    """A model built from a tune file (read, or tuned into it where it has no choices), warmed up."""
    t = Steps(cfg, build(cfg, {"TABGPT_CACHE": str(cache)}))
    t.run(3)
    return t


def release(t: Steps):
    t.check()
    t.model.free()


def ratio_in_turn(base: Steps, alt: Steps, steps: int, rounds: int) -> float:
    """Median over rounds of alt's tokens/s over base's, each round timing both, the order alternating."""
    b, a = rounds_in_turn([base, alt], steps, rounds)
    return statistics.median(x / y for x, y in zip(a, b))


def refine(cfg, out: Path, steps: int, rounds: int, within: float, threshold: float) -> tuple[dict, list]:
    """(the refined choices, one row per finalist tried): see the module's docstring."""
    from tabgpt.ops import matmul
    base = trainer(cfg, out)
    section = matmul._adapter_key(base.dev)
    if not (out / "matmul-tune.json").exists():
        release(base)
        sys.exit("nothing was tuned: the autotuner is off on this adapter (a CPU driver) or by TABGPT_AUTOTUNE=0; "
                 "TABGPT_AUTOTUNE=force tunes anyway")
    choices = json.loads((out / "matmul-tune.json").read_text())[section]
    finalists = {k: f for k, f in base.dev.tune_finalists.items() if k in choices}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in sorted(finalists, key=lambda k: -finalists[k][0][0]):
            pick_s = finalists[key][0][0]
            for seconds, tiles, splits in finalists[key]:
                if [tiles, splits] == choices[key] or seconds > pick_s * (1 + within):
                    continue
                trial = dict(choices, **{key: [tiles, splits]})
                folder = Path(tmp) / f"trial{len(rows)}"
                folder.mkdir()
                (folder / "matmul-tune.json").write_text(json.dumps({section: trial}, sort_keys=True))
                alt = trainer(cfg, folder)
                ratio = ratio_in_turn(base, alt, steps, rounds)
                kept = ratio > 1 + threshold
                rows.append((key, matmul.tiles_label(tiles), splits, seconds / pick_s, ratio, kept))
                print(f"{key}: {matmul.tiles_label(tiles)} split-K {splits}, alone {seconds / pick_s:.3f}x the "
                      f"pick's time, in steps {ratio:.4f}x: {'kept' if kept else 'not kept'}", flush=True)
                if kept:
                    release(base)
                    base, choices = alt, trial
                else:
                    release(alt)
    release(base)
    data = json.loads((out / "matmul-tune.json").read_text())
    data[section] = choices
    (out / "matmul-tune.json").write_text(json.dumps(data, indent=1, sort_keys=True))
    return choices, rows


def table(preset_name: str, steps: int, rounds: int, rows: list) -> str:
    lines = [f"## The autotuner's finalists tried in training steps, preset {preset_name}, {rounds} rounds of {steps} "
             "steps each", "", "| product | finalist | split-K | alone, of the pick's time | in steps, tokens/s of the "
             "model so far | kept |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for key, label, splits, alone, ratio, kept in rows:
        lines.append(f"| {key} | {label} | {splits} | {alone:.3f}x | {ratio:.4f}x | {'yes' if kept else 'no'} |")
    if not rows:
        lines.append("| (no finalist within reach of its pick) | | | | | |")
    return "\n".join(lines) + "\n"


def main():
    from tabgpt.config import preset
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="a folder without a tune file: the refined one is written there")
    ap.add_argument("--preset", default="browser")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--within", type=float, default=0.05, help="finalists up to this much slower alone (0.05: 5%%)")
    ap.add_argument("--threshold", type=float, default=0.002, help="keep a finalist whose steps are this much faster")
    args = ap.parse_args()
    if args.steps < 1 or args.rounds < 1 or args.within < 0:
        sys.exit("--steps and --rounds must be at least 1, --within 0 or more")
    out = Path(args.out)
    if (out / "matmul-tune.json").exists():
        sys.exit(f"{out / 'matmul-tune.json'} exists: give a folder without one (the refinement starts from a fresh "
                 "tuning, whose finalists it tries)")
    out.mkdir(parents=True, exist_ok=True)
    _, rows = refine(preset(args.preset), out, args.steps, args.rounds, args.within, args.threshold)
    print()
    print(table(args.preset, args.steps, args.rounds, rows))
    print(f"the refined tune file: {out / 'matmul-tune.json'} (TABGPT_CACHE={out})")


if __name__ == "__main__":
    main()
