"""bench/bench_train.py's paired rounds: both trainers in one process, in alternating order, every round's ratio."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "bench_train.py"
sys.path.insert(0, str(ROOT / "bench"))

import bench_train  # noqa: E402
from tabgpt.config import preset  # noqa: E402


def test_paired_rounds_give_each_rounds_ratio_and_their_median():
    pytest.importorskip("torch")
    r = subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--steps", "1", "--rounds", "3"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert [int(row.split("|")[1]) for row in rows] == [1, 2, 3]
    ratios = []
    for row in rows:
        ours, theirs, ratio = (c.strip() for c in row.split("|")[2:5])
        ours, theirs = float(ours.replace(",", "")), float(theirs.replace(",", ""))
        assert ours > 0 and theirs > 0
        assert float(ratio.rstrip("x")) == pytest.approx(ours / theirs, rel=2e-3, abs=1e-3)
        ratios.append(ours / theirs)
    summary = next(line for line in r.stdout.splitlines() if line.startswith("tabgpt / PyTorch eager fp32: median"))
    median = float(summary.split("median ")[1].split("x")[0])
    assert median == pytest.approx(sorted(ratios)[1], rel=2e-3, abs=1e-3)
    assert "over 3 rounds" in summary


def test_paired_rounds_need_pytorch():
    r = subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--rounds", "2", "--no-torch"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "leave out --no-torch" in r.stderr


def test_the_median_of_an_even_count_of_rounds_is_the_mean_of_the_middle_two():
    args = type("Args", (), {"preset": "tiny", "rounds": 4, "steps": 1})
    pairs = [(4.0, 1.0), (1.0, 1.0), (2.0, 1.0), (3.0, 1.0)]
    text = bench_train.rounds_table(preset("tiny"), args, pairs, "a device")
    assert "median 2.500x, lowest 1.000x, highest 4.000x over 4 rounds; 4 of 4 at or above 1.0x" in text


def test_rounds_alternate_which_trainer_goes_first(monkeypatch):
    calls = []

    def native_trainer(cfg):
        def seconds(first, count):
            calls.append(("ours", first, count))
            return 1.0

        class Model:
            async def read_step_stats(self, steps):
                calls.append(("stats", steps))
                return [(1.0, 1.0, False) for _ in steps]
        return None, Model(), None, seconds

    def torch_trainer(cfg, bf16):
        assert not bf16
        return "step", "sync"

    def torch_seconds(step, sync, count):
        calls.append(("torch", count))
        return 2.0

    monkeypatch.setattr(bench_train, "native_trainer", native_trainer)
    monkeypatch.setattr(bench_train, "torch_trainer", torch_trainer)
    monkeypatch.setattr(bench_train, "torch_seconds", torch_seconds)
    monkeypatch.setattr(bench_train, "device_label", lambda dev: "a device")
    cfg = preset("tiny")
    pairs, device = bench_train.paired_rounds(cfg, steps=5, rounds=3)
    assert calls == [("ours", 0, 3), ("torch", 3),                       # warm-up, both
                     ("ours", 3, 5), ("torch", 5),                       # round 1: ours first
                     ("torch", 5), ("ours", 8, 5),                       # round 2: PyTorch first
                     ("ours", 13, 5), ("torch", 5),                      # round 3
                     ("stats", [15, 16, 17])]
    assert pairs == [(5 * cfg.tokens_per_step / 1.0, 5 * cfg.tokens_per_step / 2.0)] * 3 and device == "a device"
