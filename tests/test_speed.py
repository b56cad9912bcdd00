"""tabgpt.speed (`tabgpt device --speed`, the check page's "Measure speed"): its products are checked exactly, a
kernel that computes wrong results is reported as wrong, and training's throughput comes from the trainer's loop."""

import subprocess
import sys

import numpy as np
import pytest

from tabgpt import gpu, speed
from tabgpt.config import preset
from tabgpt.ops.matmul import Matmul


def pattern(n, period, mul):
    return np.frombuffer(speed.pattern_matrix(n, n, period, mul), dtype=np.float32).reshape(n, n)


def test_the_patterns_products_are_exact_integers_and_exact_entry_gives_them():
    for n in (1, 7, 36):
        a, b = pattern(n, speed.A_P, speed.A_MUL), pattern(n, speed.B_P, speed.B_MUL)
        assert set(np.unique(a)) <= {-2, -1, 0, 1, 2} and set(np.unique(b)) <= set(range(-3, 4))
        assert len({a[i].tobytes() for i in range(n)}) == min(n, speed.A_P)   # rows differ (shifts)
        ref = a.astype(np.int64) @ b.astype(np.int64)
        assert all(speed.exact_entry(n, i, j) == ref[i, j] for i in range(n) for j in range(n))
    # the largest size's sums stay exact in f32: |entries| <= 2 and 3, n terms
    assert 6 * max(speed.SIZES) <= 2 ** 24


def test_check_rows_names_each_wrong_entry():
    n = 16
    ref = {i: [float(speed.exact_entry(n, i, j)) for j in range(n)] for i in (0, 5)}
    assert speed.check_rows(n, ref, [0, 3, 15]) == []
    ref[5][3] += 1
    assert speed.check_rows(n, ref, [0, 3, 15]) == [f"out[5, 3] = {ref[5][3]:g}, not {ref[5][3] - 1:g}"]


def test_matmul_speed_times_checked_products_within_its_budget(dev):
    before = dev.bytes_allocated
    rows = gpu.wait(speed.matmul_speed(dev, sizes=(20, 64, 100), seconds=60))
    # each size's matrices freed at once (Device.free): what stays is less than the smallest matrix (the
    # products' own small placeholder buffers)
    assert dev.bytes_allocated - before < 4 * 20 * 20
    assert [r["n"] for r in rows] == [20, 64, 100]
    for r in rows:
        assert r["ok"] and r["wrong"] == [] and r["checked"] >= 16, r
        assert r["ms"] > 0 and abs(r["gflops"] - 2 * r["n"] ** 3 / (r["ms"] / 1e3) / 1e9) < 1e-9 * r["gflops"]
    # no time left after the first size: the larger ones are not started
    assert [r["n"] for r in gpu.wait(speed.matmul_speed(dev, sizes=(20, 64), seconds=0))] == [20]
    # a size whose matrices exceed one binding is not tried
    big = int((dev.limits["max-storage-buffer-binding-size"] // 4) ** 0.5) + 4
    assert [r["n"] for r in gpu.wait(speed.matmul_speed(dev, sizes=(20, big), seconds=60))] == [20]


def test_a_kernel_that_computes_wrong_products_is_reported_wrong(dev, monkeypatch):
    real = Matmul.dispatch

    def off_by_one_k(self, seq, out, a, b, **kw):   # the product of a shorter reduction (A read as M x (K - 4))
        if not hasattr(self, "_short"):
            self._short = gpu.wait(Matmul.create(dev, self.M, self.N, self.K - 4, "nn"))
        return real(self._short, seq, out=out, a=a, b=b, **kw)
    monkeypatch.setattr(Matmul, "dispatch", off_by_one_k)
    rows = gpu.wait(speed.matmul_speed(dev, sizes=(64,), seconds=60))
    assert not rows[0]["ok"] and rows[0]["wrong"] and "not" in rows[0]["wrong"][0], rows


def test_train_speed_runs_the_trainer_and_counts_from_the_first_read_back(dev):
    before = dev.bytes_allocated
    r = gpu.wait(speed.train_speed(dev, "tiny", 2.0))
    cfg = preset("tiny")
    assert "error" not in r, r
    # its model's weights, moments and activations are given back (the kernels' small scratch is collected later)
    assert dev.bytes_allocated - before < r["gpu_bytes"] / 4, (dev.bytes_allocated - before, r["gpu_bytes"])
    assert r["tokens_per_step"] == cfg.batch_size * cfg.block_size and r["n_params"] == cfg.n_params()
    assert r["timed_steps"] >= 1 and r["steps"] > r["timed_steps"] and r["compile_seconds"] > 0
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / (r["step_ms"] / 1e3))
    assert r["gflops"] == pytest.approx(r["tokens_per_s"] * cfg.flops_per_token() / 1e9)
    # a preset beyond this device's limits (WebGPU's default 128 MiB binding) is named, without the CLI's flags
    r = gpu.wait(speed.train_speed(dev, "gpt2", 2.0))
    assert r["error"].startswith("the gpt2 preset does not fit this GPU: the logits") and "--" not in r["error"]
    with pytest.raises(ValueError, match="seconds must be positive"):
        gpu.wait(speed.train_speed(dev, "tiny", 0))


def _device(*args):
    return subprocess.run([sys.executable, "-m", "tabgpt", "device", *args], capture_output=True, text=True,
                          timeout=600)


def test_device_speed_prints_products_and_training_and_refuses_bad_settings():
    r = _device("--speed", "--preset", "tiny", "--seconds", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(line.split()[:1] == ["256"] and "GFLOP/s" in line and line.endswith("ok") for line in lines), r.stdout
    assert any("training, preset tiny" in line and "tokens/s" in line for line in lines), r.stdout
    for args, message in ((("--preset", "huge"), "unknown --preset 'huge'"), (("--seconds", "0"), "--seconds must"),
                          (("--seconds", "inf"), "--seconds must")):
        r = _device("--speed", *args)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_size_the_gpu_cannot_run_ends_the_list_with_its_error(dev, monkeypatch):
    from tabgpt.gpu import GPUError
    real = Matmul.create

    async def out_of_memory_at_64(dev_, M, N, K, *a, **kw):
        if M == 64:
            raise GPUError("out of memory (simulated)")
        return await real(dev_, M, N, K, *a, **kw)
    monkeypatch.setattr(Matmul, "create", out_of_memory_at_64)
    rows = gpu.wait(speed.matmul_speed(dev, sizes=(20, 64, 100), seconds=60))
    assert [r["n"] for r in rows] == [20, 64] and rows[0]["ok"]
    assert rows[1] == {"n": 64, "ok": False, "error": "out of memory (simulated)"}


def test_device_without_speed_refuses_its_settings():
    r = _device("--preset", "tiny")
    assert r.returncode == 1 and "add --speed" in r.stderr, r.stderr
