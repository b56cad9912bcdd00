"""bench/profile_step.py's GPU-timestamp profile of a whole training step (lavapipe has timestamp-query)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import profile_step  # noqa: E402
from bench_train import native_trainer  # noqa: E402
from tabgpt.config import preset  # noqa: E402


@pytest.fixture(scope="module")
def trainer():
    cfg = preset("tiny")
    dev, model, step, seconds = native_trainer(cfg)
    if "timestamp-query" not in dev.features:
        pytest.skip("this adapter has no timestamp-query")
    seconds(0, 1)
    return cfg, dev, model


def test_each_dispatch_of_the_step_gets_its_interval_and_run(trainer):
    cfg, dev, model = trainer
    ops = profile_step.step_ops(model, cfg)
    dispatches = [op for op in ops if op.kind == "dispatch"]
    span, span_each, rows = profile_step.profile_timestamps(dev, model, cfg, trials=1)
    assert [op for _, op, _, _ in rows] == dispatches           # every dispatch, in the step's order
    assert span > 0 and span_each > 0
    assert all(rn > 0 and iv > 0 for _, _, iv, rn in rows)
    # the intervals run from one dispatch's end to the next one's: they add up to the step's span exactly
    assert sum(iv for _, _, iv, _ in rows) == span_each
    assert {name for name, _, _, _ in rows} >= {"attention:attention_forward", "adamw:adamw_update"}


def test_the_table_names_every_kernel_and_the_span(trainer):
    cfg, dev, model = trainer

    class Args:
        preset, trials, top = "tiny", 1, 5

    text = profile_step.timestamp_table(Args, cfg, dev, model, step_ms=1.0)
    assert "GPU span of a step as it trains" in text and "us a dispatch" in text and "waits for the one" in text
    assert "| attention:attention_backward_dkv |" in text
    assert text.count("\n| matmul:matmul_tiled") >= 3


def test_the_dispatch_floor_is_a_positive_time_per_dispatch(trainer):
    cfg, dev, model = trainer
    floor = profile_step.dispatch_floor(dev, model, trials=1, n=8)
    span, _, rows = profile_step.profile_timestamps(dev, model, cfg, trials=1)
    assert 0 < floor < span                    # ns per one-workgroup dispatch: far below a whole step
