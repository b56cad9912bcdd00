"""bench/bench_train.py's paired rounds: both trainers in one process, in alternating order, every round's ratio."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "bench_train.py"


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
