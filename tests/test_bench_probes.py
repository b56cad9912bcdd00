"""The bench probes in their quick modes (tiny sizes, lavapipe), and bench_matmul_variants.py's sources."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from tabgpt.gpu import wait  # noqa: E402

import bench_embedding  # noqa: E402
import probe_bias_rows  # noqa: E402
import probe_nt_as_nn  # noqa: E402
import probe_pair_sum  # noqa: E402
import probe_tiles  # noqa: E402


def run_main(module, monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    module.main()
    return capsys.readouterr().out


def test_probe_tiles_times_each_form_and_compares_outputs(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("TABGPT_CACHE", str(tmp_path))
    out = run_main(probe_tiles, monkeypatch, capsys, "--quick", "--tiles", "64,64,8,8,8", "--tiles",
                   "64,64,8,4,4,prefetch", "--tiles", "64,64,12,8,8")
    rows = [line for line in out.splitlines() if line.startswith("| nn") or line.startswith("| tn")]
    assert len(rows) == len(probe_tiles.QUICK_SIZES)
    for row in rows:
        cells = row.split(" | ")[3:]
        assert "1.000x) same" in cells[0]
        assert "same" in cells[1]                      # other tiles, the same summation order: the same bits
    # BK 12 cuts tn's split-K slices elsewhere (264 rows instead of 256): other sums, still right
    tn = next(r for r in rows if r.startswith("| tn"))
    assert "DIFF (err" in tn and "WRONG" not in tn
    assert "64x64x8 / 4x4 prefetch" in out            # the forms are named as bench_matmul.py names them


def test_probe_tiles_refuses_bad_sizes_and_auto(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        run_main(probe_tiles, monkeypatch, capsys, "--quick", "--tiles", "auto")
    with pytest.raises(SystemExit):
        run_main(probe_tiles, monkeypatch, capsys, "--tiles", "64,64,8,8,8", "--sizes", "nn:64x64")
    assert "layout:MxNxK:splits" in capsys.readouterr().err


def test_probe_nt_as_nn_prints_both_forms(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("TABGPT_CACHE", str(tmp_path))
    out = run_main(probe_nt_as_nn, monkeypatch, capsys, "--quick")
    rows = [line for line in out.splitlines() if line.startswith("| 256x")]
    assert len(rows) == len(probe_nt_as_nn.QUICK_SHAPES)
    assert "gelu_grad" in rows[0] and all(float(r.rstrip(" |").split(" | ")[-1]) > 0 for r in rows)


def test_probe_pair_sum_times_both_forms_and_finds_the_same_bits(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("TABGPT_CACHE", str(tmp_path))
    out = run_main(probe_pair_sum, monkeypatch, capsys, "--quick")
    row = next(line for line in out.splitlines() if line.startswith("| small"))
    assert row.rstrip().endswith("| yes |")            # the grouped sum and the sums apart: the same bits
    assert float(row.split(" | ")[4]) > 0


def test_probe_bias_rows_times_each_pair_with_and_without(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("TABGPT_CACHE", str(tmp_path))
    out = run_main(probe_bias_rows, monkeypatch, capsys, "--quick")
    rows = [line for line in out.splitlines() if line.startswith("| small")]
    assert [r.split(" | ")[1] for r in rows] == ["yes", "no"], rows
    assert all(float(r.split(" | ")[3]) > 0 for r in rows) and rows[1].rstrip().endswith("| 1.000 |")


def test_matmul_variants_sources_still_compile(dev):
    # bench_matmul_variants.py rewrites shaders/matmul.wgsl by anchors in its text: every variant (and the f16
    # form where the adapter has shader-f16) must still find them and compile, the tn kernel with its bias row too
    import bench_matmul_variants as bmv
    from tabgpt.ops.matmul import FILE, TILES_LARGE
    names = ["base", "unroll2", "unroll4", "unrollBK", "literal", "wrap", "peel", "fence", "rowindex", "guarded",
             "select", "wrap+unroll2", "fence+literal", "rowmajor", "colmajor", "grouped", "reverse", "nobarrier",
             "noglobal", "nolds", "breakif", "nolean", "midfence", "midfence+literal", "noglobal+nobarrier+nolds"]
    names += ["f16"] if "shader-f16" in dev.features else []
    base = dev.source(FILE)
    for name in names:
        src = bmv.variant(base, name, TILES_LARGE["BK"])
        for consts in ({"A_T": False, "B_T": False}, {"A_T": True, "B_T": False, "BIAS_ROW": True}):
            k = wait(dev.kernel(FILE, "matmul_tiled", dict(consts, **TILES_LARGE), source=src))
            assert k.entry == "matmul_tiled", name


def test_attention_variants_rewrite_what_they_say(monkeypatch, capsys):
    # bench_attention_variants.py rewrites shaders/attention.wgsl by anchors in its text: every diagnostic must find
    # them, compile and change what it leaves out (its results differ from the base's), the base none
    import bench_attention
    import bench_attention_variants as bav
    monkeypatch.setattr(bench_attention, "TARGET_SECONDS", 0.001)
    names = ["base", "nostore", "nodsread", "noexp", "noglobal", "nobarrier", "nostore+nodsread"]
    out = run_main(bav, monkeypatch, capsys, "--sizes", "2x40x2x16", "--trials", "1", "--no-write",
                   "--variants", *names)
    rows = {r.split(" | ")[1]: r for r in out.splitlines() if r.startswith("| 2x40x2x16 |")}
    assert list(rows) == names
    diffs = {n: [float(x) for x in r.rstrip(" |").split(" | ")[-1].split(" / ")] for n, r in rows.items()}
    assert diffs["base"] == [0.0, 0.0]
    assert diffs["noexp"][0] > 0 and diffs["noglobal"][0] > 0             # the forward changed
    assert diffs["nostore"][0] == 0 and diffs["nostore"][1] > 0           # only the backward (dq from dS)
    assert diffs["nodsread"][0] == 0 and diffs["nodsread"][1] > 0
    with pytest.raises(ValueError, match="unknown variant"):
        bav.variant("", "fast")


def test_probe_epilogues_times_each_form_and_frees_the_arithmetic(monkeypatch, capsys, dev):
    import probe_epilogues as pe
    import numpy as np
    from tabgpt.ops.matmul import FILE, Matmul
    out = run_main(pe, monkeypatch, capsys, "--quick")
    rows = [line.split(" | ")[:2] for line in out.splitlines() if line.startswith("| small")]
    assert rows == [[f"| small {ep}", f] for ep in ("gelu", "gelu_grad", "gelu_keep")
                    for f in ("epilogue", "none", "free", "autotuned")] + \
        [["| small mul", f] for f in ("epilogue", "none", "autotuned")], rows
    # the free source's GELU is the identity: the activation written beside the pre-activation equals it
    base = dev.source(FILE)
    try:
        dev._sources[FILE] = pe.free_source(base)
        dev._kernels.clear()
        M, N, K = 8, 8, 4
        mm = wait(Matmul.create(dev, M, N, K, "nn", epilogue="gelu", **pe.QUICK_FIXED))
        rng = np.random.default_rng(0)
        bufs = {k: dev.buffer(4 * n, k, rng.standard_normal(n, np.float32))
                for k, n in (("a", M * K), ("b", K * N), ("out", M * N), ("aux", M * N))}
        seq = dev.sequence("free gelu")
        mm.dispatch(seq, out=bufs["out"], a=bufs["a"], b=bufs["b"], aux=bufs["aux"])
        wait(seq.build())
        seq.run()
        got = {k: np.frombuffer(wait(dev.read(bufs[k])), np.float32) for k in ("out", "aux")}
        assert np.array_equal(got["out"], got["aux"]) and np.abs(got["out"]).max() > 0
    finally:
        dev._sources[FILE] = base
        dev._kernels.clear()
    with pytest.raises(ValueError, match="is not in"):
        pe.free_source("")


def test_bench_speed_puts_each_adapter_in_a_row(monkeypatch, capsys):
    """bench_speed.py natively (the default adapter, and SwiftShader where Chromium is installed), briefly."""
    import bench_speed
    out = run_main(bench_speed, monkeypatch, capsys, "--no-browser", "--seconds", "1", "--matmul-seconds", "0")
    rows = [line for line in out.splitlines() if line.startswith("| native")]
    assert len(rows) == (2 if bench_speed.swiftshader_icd() else 1), out
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2]) > 0, row                              # 256^3 GFLOP/s (no time left for 512^3)
        assert int(cells[3].replace(",", "")) > 0 and float(cells[4]) > 0, row   # training tokens/s, GFLOP/s
    assert "| where | adapter | 256^3 GFLOP/s | training, preset tiny: tokens/s |" in out


def test_probe_submit_times_each_way_of_submitting_a_step(monkeypatch, capsys):
    import probe_submit
    out = run_main(probe_submit, monkeypatch, capsys, "--quick")
    rows = [r for r in out.splitlines() if r.startswith("| ") and not r.startswith(("| submitted", "| ---"))]
    assert [r.split(" | ")[0][2:] for r in rows] == [
        "three submissions", "one submission of three command buffers", "one command buffer (train_step)",
        "diagnostic: one command buffer, no writes (the same batch, step and ring slot)",
        "diagnostic: ten steps a command buffer, no writes"]
    for r in rows:
        rate, cpu = (float(v.replace(",", "")) for v in r.strip("| ").split(" | ")[1:])
        assert rate > 0 and cpu > 0
    # its arms submit one micro-batch a step: a preset of several is refused with what to give
    from tabgpt import config
    monkeypatch.setitem(config.PRESETS, "tiny", dict(config.PRESETS["tiny"], grad_accum=2))
    with pytest.raises(SystemExit):
        run_main(probe_submit, monkeypatch, capsys, "--quick")
    assert "takes 2 micro-batches a step" in capsys.readouterr().err


def test_bench_embedding_times_both_sort_blocks_and_compares_the_gradients(monkeypatch, capsys):
    out = run_main(bench_embedding, monkeypatch, capsys, "--quick", "--no-write", "--no-torch", "--trials", "1",
                   "--block", "2048", "--threads", "256")
    rows = [line for line in out.splitlines() if line.startswith("| quick")]
    assert len(rows) == 2                                   # uniform and Zipf-like tokens
    for row in rows:
        cells = row.strip("| ").split(" | ")
        assert cells[3] == "6 / 5" and cells[4] == "2048, 256"   # 1200 keys: blocks of 1024, then one of 2048
        assert float(cells[5]) > 0 and float(cells[6]) > 0
        assert cells[-1] == "same bits"


def test_probe_context_needs_cuda_and_says_so(monkeypatch, capsys):
    """Without a CUDA GPU (CI, lavapipe) the probe stops before building a model, saying what it needs."""
    import probe_context
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        run_main(probe_context, monkeypatch, capsys, "--preset", "tiny")
    assert "needs PyTorch with a CUDA GPU" in str(e.value)
    monkeypatch.setitem(sys.modules, "torch", None)          # PyTorch not installed at all
    with pytest.raises(SystemExit) as e:
        run_main(probe_context, monkeypatch, capsys, "--preset", "tiny")
    assert "pip install torch" in str(e.value)
    with pytest.raises(SystemExit) as e:
        run_main(probe_context, monkeypatch, capsys, "--rounds", "0")
    assert "at least 1" in str(e.value)


def test_probe_context_table_compares_each_phase_with_the_first():
    import probe_context
    text = probe_context.table("browser", 3, 100, [("alone", [400.0, 410.0, 405.0]),
                                                  ("CUDA in this process", [390.0, 396.9, 380.0])])
    rows = [line for line in text.splitlines() if line.startswith("| alone") or line.startswith("| CUDA")]
    assert rows[0].endswith("| 405 | 1.000x |")             # median of its rounds, not the mean or the first
    assert rows[1].endswith("| 390 | 0.963x |")             # 390 / 405
    assert "400 / 410 / 405" in rows[0]                      # every round, in order


def test_probe_ab_parses_arms_and_refuses_bad_ones_before_building(monkeypatch, capsys):
    import probe_ab
    assert probe_ab.parse_arm("") == {}
    assert probe_ab.parse_arm("A=1, B=0") == {"A": "1", "B": "0"}
    assert probe_ab.parse_arm("candidates=literal") == {"candidates": "literal"}
    for bad, says in (("A", "NAME=VALUE"), ("=1", "NAME=VALUE"), ("candidates=all", "trial, literal, no128")):
        with pytest.raises(ValueError, match=says):
            probe_ab.parse_arm(bad)
    monkeypatch.setattr(probe_ab, "native_trainer", lambda cfg: pytest.fail("built a model for bad arguments"))
    for argv, says in ((["--arm", ""], "two arms or more"), (["--arm", "", "--arm", "X"], "NAME=VALUE"),
                       (["--arm", "", "--arm", "", "--rounds", "0"], "at least 1")):
        with pytest.raises(SystemExit) as e:
            run_main(probe_ab, monkeypatch, capsys, *argv)
        assert says in str(e.value)


def test_probe_ab_table_gives_each_arm_its_median_ratio_to_the_first():
    import probe_ab
    text = probe_ab.table("browser", 3, 100, ["", "A=1"], [[400.0, 410.0, 405.0], [404.0, 410.0, 400.95]])
    rows = [line for line in text.splitlines() if line.startswith("| (as set)") or line.startswith("| A=1")]
    assert rows[0] == "| (as set) | 400 / 410 / 405 | 405 | 1.000x |"
    assert rows[1] == "| A=1 | 404 / 410 / 401 | 404 | 1.000x |"   # ratios 1.010, 1.000, 0.990: their median


def test_probe_ab_settings_table_gives_each_settings_draws_and_the_highest_lowest():
    import probe_ab
    names = ["TABGPT_CACHE=/t/n1", "TABGPT_CACHE=/t/f1,TABGPT_TUNE_FLUSH=1", "TABGPT_CACHE=/t/n2",
             "TABGPT_CACHE=/t/f2,TABGPT_TUNE_FLUSH=1", "TABGPT_CACHE=/t/n3"]
    tps = [[410.0, 412.0, 411.0], [420.0, 421.0, 419.0], [430.0, 429.0, 431.0], [418.0, 418.0, 418.0],
           [425.0, 425.0, 425.0]]
    text = probe_ab.settings_table(names, tps)
    assert "| (as set) | 3 | 411 | 425 | 430 | 1.046x |" in text
    assert "| TABGPT_TUNE_FLUSH=1 | 2 | 418 | 419 | 420 | 1.005x |" in text       # median of two: their mean
    assert text.endswith("the setting with the highest lowest draw: TABGPT_TUNE_FLUSH=1\n")
    assert probe_ab.settings_table(["", "A=1"], tps[:2]) == ""                     # no setting drawn twice


def test_probe_ab_tunes_each_arm_from_its_own_file_and_restores_the_environment(monkeypatch, capsys, tmp_path):
    """Two arms in one process on lavapipe (the autotuner forced on): each arm's products tuned into its own file,
    the second among the written-out candidates only; the environment as it was afterwards."""
    import json
    import probe_ab
    from tabgpt.ops import matmul
    monkeypatch.delenv("TABGPT_AUTOTUNE", raising=False)
    monkeypatch.setenv("TABGPT_CACHE", str(tmp_path / "shared"))
    tiles_before = matmul.TUNE_TILES
    a, b = tmp_path / "a", tmp_path / "b"
    out = run_main(probe_ab, monkeypatch, capsys, "--preset", "tiny", "--steps", "1", "--rounds", "2",
                   "--arm", f"TABGPT_CACHE={a},TABGPT_AUTOTUNE=force",
                   "--arm", f"TABGPT_CACHE={b},TABGPT_AUTOTUNE=force,candidates=literal")
    assert [line[:8] for line in out.splitlines() if line.startswith("round ")] == ["round 1:", "round 2:"]
    assert "| --- |" in out
    picks = [list(json.loads((d / "matmul-tune.json").read_text()).values())[0] for d in (a, b)]
    assert picks[0] and picks[1]
    assert all(t.get("LITERAL") for t, _ in picks[1].values())
    assert not (tmp_path / "shared").exists()
    assert matmul.TUNE_TILES is tiles_before
    assert "TABGPT_AUTOTUNE" not in os.environ and os.environ["TABGPT_CACHE"] == str(tmp_path / "shared")


def test_tune_in_steps_tries_finalists_in_steps_and_writes_what_it_kept(monkeypatch, capsys, tmp_path):
    """On lavapipe (the autotuner forced on; one finalist besides each pick): every finalist tried in steps, and with
    a threshold that keeps any, the refined tune file holds the last finalist of each product tried."""
    import json
    import tune_in_steps
    from tabgpt.ops import matmul
    monkeypatch.setenv("TABGPT_AUTOTUNE", "force")
    monkeypatch.setenv("TABGPT_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(matmul, "TUNE_RUNOFF", 2)
    out = tmp_path / "tuned"
    text = run_main(tune_in_steps, monkeypatch, capsys, "--preset", "tiny", "--out", str(out), "--steps", "1",
                    "--rounds", "1", "--within", "10", "--threshold", "-1")
    rows = [line.strip("| ").split(" | ") for line in text.splitlines()
            if line[:5] in ("| nn:", "| nt:", "| tn:")]
    assert rows and all(r[5] == "yes" for r in rows)
    saved = list(json.loads((out / "matmul-tune.json").read_text()).values())[0]
    for key in {r[0] for r in rows}:
        last = [r for r in rows if r[0] == key][-1]
        assert matmul.tiles_label(saved[key][0]) == last[1] and str(saved[key][1]) == last[2]
    assert os.environ["TABGPT_CACHE"] == str(tmp_path / "elsewhere")
    with pytest.raises(SystemExit) as e:                      # a tune file there already: refused, untouched
        run_main(tune_in_steps, monkeypatch, capsys, "--preset", "tiny", "--out", str(out))
    assert "exists: give a folder without one" in str(e.value)
    monkeypatch.delenv("TABGPT_AUTOTUNE")                    # lavapipe does not tune unless forced
    with pytest.raises(SystemExit) as e:
        run_main(tune_in_steps, monkeypatch, capsys, "--preset", "tiny", "--out", str(tmp_path / "cpu"))
    assert "nothing was tuned" in str(e.value)
