"""The GPU core natively: buffers, kernels, sequences, errors, and the self-test kernels vs NumPy."""

import re
import struct

import numpy as np
import pytest

from tabgpt import gpu, selftest
from tabgpt.gpu import GPUError, wait


def test_device_reports_adapter_features_and_limits(dev):
    assert dev.info["device"]
    assert dev.limits["max-storage-buffer-binding-size"] >= 128 << 20
    assert dev.limits["max-compute-invocations-per-workgroup"] >= 256


def test_buffer_round_trip_bytes(dev):
    data = np.arange(1001, dtype=np.float32) * 0.5
    buf = dev.buffer(data.nbytes, "rt", data)
    back = np.frombuffer(wait(dev.read(buf)), dtype=np.float32)
    np.testing.assert_array_equal(back, data)
    part = np.frombuffer(wait(dev.read(buf, 40, 12)), dtype=np.float32)
    np.testing.assert_array_equal(part, data[10:13])


@pytest.mark.parametrize("M,N,K", [(37, 45, 53), (1, 1, 1), (16, 16, 16), (65, 3, 129)])
def test_tiled_matmul_matches_numpy(dev, M, N, K):
    rng = np.random.default_rng(M * N * K)
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((K, N), dtype=np.float32)
    k = wait(dev.kernel("selftest.wgsl", "matmul"))
    bo = dev.buffer(4 * M * N, "out")
    seq = dev.sequence().dispatch(k, ((N + 15) // 16, (M + 15) // 16), mp=dev.uniform(struct.pack("<4I", M, N, K, 0)),
                                  a=dev.buffer(a.nbytes, "a", a), b=dev.buffer(b.nbytes, "b", b), out=bo)
    wait(seq.build())
    seq.run()
    got = np.frombuffer(wait(dev.read(bo)), dtype=np.float32).reshape(M, N)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    err = np.abs(got - ref).max() / max(1.0, np.abs(ref).max())
    assert err < 1e-5, f"max relative error {err:.3g} (M={M}, N={N}, K={K})"


@pytest.mark.parametrize("n", [1, 1023, 1025, 300_001])
def test_reduction_matches_numpy_and_is_deterministic(dev, n):
    res = wait(selftest.check_reduce(dev, n=n, seed=n))
    assert res["ok"], res
    again = wait(selftest.check_reduce(dev, n=n, seed=n))
    assert again["value"] == res["value"], "same input gave a different sum"


def test_selftest_passes(dev):
    res = wait(selftest.run_selftest(dev))
    assert res["ok"], res


def test_replayed_sequence_counts_every_dispatch(dev):
    res = wait(selftest.dispatch_cost(dev, n=50, reps=2))
    assert res["counter_ok"], res


def test_wgsl_error_is_a_readable_exception(dev):
    bad = "@group(0) @binding(0) var<storage, read_write> x: array<f32>;\n" \
          "@compute @workgroup_size(1) fn main() { x[0] = undefined_thing; }\n"
    with pytest.raises(GPUError) as e:
        wait(dev.kernel("bad.wgsl", "main", source=bad))
    assert "undefined_thing" in str(e.value), str(e.value)


def test_validation_error_is_a_readable_exception(dev):
    k = wait(dev.kernel("selftest.wgsl", "matmul"))
    small = dev.buffer(4, "small")
    # A uniform buffer bound where the WGSL expects a storage buffer is a validation error.
    with pytest.raises(GPUError) as e:
        seq = dev.sequence("bad").dispatch(k, (1, 1), mp=small, a=small, b=small, out=small)
        wait(seq.build())
    assert "matmul" in str(e.value)


def test_missing_binding_is_named(dev):
    k = wait(dev.kernel("selftest.wgsl", "matmul"))
    with pytest.raises(GPUError, match="needs bindings"):
        dev.sequence().dispatch(k, (1, 1), a=dev.buffer(4))


def test_entry_points_get_only_the_bindings_they_use():
    src = gpu.shader_dir().joinpath("selftest.wgsl").read_text()
    assert [b.name for b in gpu.used_bindings(src, "matmul")] == ["mp", "a", "b", "out"]
    assert [b.name for b in gpu.used_bindings(src, "reduce_sum")] == ["rp", "inp", "partial"]
    assert [b.kind for b in gpu.used_bindings(src, "reduce_sum")] == ["uniform", "read-only-storage", "storage"]


def test_subgroups_enable_line_is_handled_per_backend():
    code, missing = gpu.prepare_source("enable subgroups;\nfn f() {}\n", {"subgroups"})
    assert missing == ""
    assert ("// enable subgroups;" in code) != gpu.IN_BROWSER
    _, missing = gpu.prepare_source("enable f16;\n", set())
    assert missing == "shader-f16"


def test_conditional_blocks_keep_one_part_and_the_line_numbers():
    src = "a\n  // #if X\nx1\nx2\n  // #else\ny\n// #endif\nb\n// #if Y\nz\n// #endif\n"
    assert gpu.select_blocks(src) == "a\n\n\n\n\ny\n\nb\n\n\n\n"
    assert gpu.select_blocks(src, {"X", "Y"}) == "a\n\nx1\nx2\n\n\n\nb\n\nz\n\n"
    chain = "// #if X\nx\n// #elif Y\ny\n// #elif Z\nz\n// #else\nw\n// #endif\n"
    for defines, kept in [({"X", "Y"}, "x"), ({"Y", "Z"}, "y"), ({"Z"}, "z"), (set(), "w")]:
        assert [l for l in gpu.select_blocks(chain, defines).splitlines() if l] == [kept]
    either = "// #if X || Y\nxy\n// #elif Z||W\nzw\n// #else\nv\n// #endif\n"   # a part taken where any name is set
    for defines, kept in [({"Y"}, "xy"), ({"X", "W"}, "xy"), ({"W"}, "zw"), ({"Z"}, "zw"), (set(), "v")]:
        assert [l for l in gpu.select_blocks(either, defines).splitlines() if l] == [kept]
    for bad, what in [("// #if X\n", "without its `#endif`"), ("// #endif\n", "without its `#if`"),
                      ("// #if X ||\n// #endif\n", "malformed"), ("// #if X Y\n// #endif\n", "malformed"),
                      ("// #if X\n// #if Y\n", "cannot nest"), ("// #if\n", "needs a name"),
                      ("// #if X\n// #else\n// #else\n", "after `#else`"),
                      ("// #if X\n// #else\n// #elif Y\n", "after `#else`"), ("// #if X\n// #elif\n", "without a name"),
                      ("// #if X\n// #endif X\n", "with a name")]:
        with pytest.raises(GPUError, match=what):
            gpu.select_blocks(bad, file="f.wgsl")


def test_marked_loops_are_written_out_where_asked():
    src = ("a\n  // #unroll L BK\n  for (var kk = 0u; kk < BK; kk++) {\n    x += t[kk] + tkk[2u];  // kk\n  }\nb\n"
           "// #unroll M N\nfor (var i = 0u; i < N; i++) {\n  if (i > 0u) { y(i); }\n}\nc\n")
    assert gpu.unroll_loops(src) == src
    out = gpu.unroll_loops(src, {"L", "M"}, {"BK": 3, "N": 2})
    assert [l.strip() for l in out.splitlines() if l.strip()] == [
        "a", "{ x += t[0u] + tkk[2u]; }", "{ x += t[1u] + tkk[2u]; }", "{ x += t[2u] + tkk[2u]; }",
        "b", "{ if (0u > 0u) { y(0u); } }", "{ if (1u > 0u) { y(1u); } }", "c"]
    # the copies take the directive's and the loop's lines: every line after a loop keeps its number
    assert [n for n, l in enumerate(out.splitlines()) if l in ("a", "b", "c")] == [0, 5, 10] == \
        [n for n, l in enumerate(src.splitlines()) if l in ("a", "b", "c")]
    many = gpu.unroll_loops(src, {"L"}, {"BK": 12})       # more copies than lines: several a line
    assert many.splitlines()[5:] == src.splitlines()[5:] and many.count("x += t[") == 12
    assert [int(v) for v in re.findall(r"t\[(\d+)u\]", many)] == list(range(12))
    assert "for" not in gpu.unroll_loops(src, {"L"}, {"BK": 1}).split("b\n")[0]
    assert gpu.unroll_loops(src, {"L", "M"}, {"BK": 3}).count("for (var") == 1     # N not set: M's loop stays
    # matmul.wgsl's rows of a slice (the tile flag LITERAL, ops/matmul.py kernel_args)
    mm = (gpu.shader_dir() / "matmul.wgsl").read_text()
    loop = "for (var kk = 0u; kk < BK; kk++)"
    written = gpu.unroll_loops(gpu.select_blocks(mm), {"LITERAL"}, {"BK": 8})
    assert loop in mm and loop not in written and len(written.splitlines()) == len(mm.splitlines())
    for bad, consts, what in [("// #unroll L BK\nx = 1;\n", {"BK": 2}, "must precede"),
                              ("// #unroll L BK\nfor (var k = 0u; k < BN; k++) {\n}\n", {"BK": 2}, "must precede"),
                              ("// #unroll L BK\nfor (var k = 0u; k < BK; k++) {\n}\n", {"BK": 0}, "must be 1 to 64"),
                              # after a written-out loop, an error names its line in the file
                              ("x\n// #unroll L BK\nfor (var k = 0u; k < BK; k++) {\n}\ny\n// #unroll L BK\nz = 1;\n",
                               {"BK": 2}, "f.wgsl:6: .* must precede")]:
        with pytest.raises(GPUError, match=what):
            gpu.unroll_loops(bad, {"L"}, consts, "f.wgsl")


def test_plain_matmul_source_holds_none_of_the_variants_code():
    """matmul.wgsl's GROUPED, BATCHED, SOFTMAX and PAIRED blocks leave nothing of theirs in the plain kernels'
    module, nor SOFTMAX's and PAIRED's in the plain batched kernels'."""
    src = gpu.shader_dir().joinpath("matmul.wgsl").read_text()
    idents = lambda defines: set(gpu._IDENT_RE.findall(gpu._strip_comments(gpu.select_blocks(src, defines))))  # noqa
    softmax = {"row_in", "z_row", "on_or_below", "softmax_scale", "exp"}
    names = {"a4_2", "b4_2", "mp2", "second", "dim_m", "dim_n", "bp", "BatchParams", "a_off", "b_off", "c_off",
             "CAUSAL", "bp2", "out4_2", "i_all", "n4_1"} | softmax
    assert idents(set()).isdisjoint(names), idents(set()) & names
    assert idents({"BATCHED"}).isdisjoint(softmax | {"bp2", "a4_2", "b4_2", "second"}), idents({"BATCHED"}) & names
    for defines, own in ((("GROUPED",), {"a4_2", "mp2", "second", "out4_2", "i_all"}),
                         (("BATCHED",), {"bp", "a_off", "CAUSAL"}),
                         (("BATCHED", "SOFTMAX"), softmax), (("BATCHED", "SOFTMAX", "SOFTMAX_DS"), softmax - {"exp"}),
                         (("BATCHED", "PAIRED"), {"bp2", "a4_2", "b4_2", "second", "a_off"})):
        assert own <= idents(set(defines)), defines


def test_kernels_with_other_defines_are_other_modules(dev):
    """matmul.wgsl's GROUPED block: its bindings exist only in the kernel compiled with the define."""
    consts = {"A_T": True, "BIAS_ROW": True, "BM": 64, "BN": 64, "TM": 8, "TN": 8}
    plain = wait(dev.kernel("matmul.wgsl", "matmul_tiled", consts))
    grouped = wait(dev.kernel("matmul.wgsl", "matmul_tiled", consts, defines={"GROUPED"}))
    assert grouped is not plain and grouped is wait(dev.kernel("matmul.wgsl", "matmul_tiled", consts,
                                                                 defines=["GROUPED"]))
    assert {b.name for b in grouped.bindings} - {b.name for b in plain.bindings} == {"a4_2", "b4_2", "mp2"}
    # and its sum of both products' slabs: the second product's uniform and out
    plain_sum = wait(dev.kernel("matmul.wgsl", "matmul_split_sum", {"ACCUMULATE": True}))
    grouped_sum = wait(dev.kernel("matmul.wgsl", "matmul_split_sum", {"ACCUMULATE": True}, defines={"GROUPED"}))
    assert {b.name for b in grouped_sum.bindings} - {b.name for b in plain_sum.bindings} == {"mp2", "out4_2"}


def test_subgroup_reductions_need_the_feature_and_the_builtins_and_are_opt_in(monkeypatch):
    d = gpu.Device()
    monkeypatch.setenv("TABGPT_SUBGROUPS", "1")
    assert not d.has_subgroup_ops() and not d.subgroup_reductions()       # neither
    d.features.add("subgroups")
    assert not d.has_subgroup_ops() and not d.subgroup_reductions()       # a browser without subgroup_id
    d.subgroup_ids = True
    assert d.has_subgroup_ops() and d.subgroup_reductions()
    monkeypatch.setenv("TABGPT_SUBGROUPS", "0")
    assert d.has_subgroup_ops() and not d.subgroup_reductions()
    for bad in ("2", "on", "", "yes"):   # a setting that is neither 0 nor 1 is refused, not read as off
        monkeypatch.setenv("TABGPT_SUBGROUPS", bad)
        with pytest.raises(gpu.GPUError, match="TABGPT_SUBGROUPS must be 0 or 1"):
            d.subgroup_reductions()
    monkeypatch.delenv("TABGPT_SUBGROUPS")
    assert not d.subgroup_reductions()                                     # off by default


def test_kernel_of_joins_files_with_the_enable_line_first(dev):
    """A subgroup file ahead of the file whose bindings it uses compiles as one module (on lavapipe, which has
    subgroups)."""
    k = gpu.wait(dev.kernel_of(["layernorm_subgroups.wgsl", "layernorm.wgsl"], "layernorm_forward_sg"))
    assert k.file == "layernorm.wgsl" and k.entry == "layernorm_forward_sg"
    assert k.binding_names() == ["lp", "inp", "weight", "bias", "out", "mean", "rstd"]


def test_fixture_device_is_held_to_webgpu_default_limits(dev):
    assert dev.limits["max-storage-buffers-per-shader-stage"] == 8
    assert dev.limits["max-compute-workgroup-storage-size"] == 16384


def test_cli_device_passes_and_exits_zero():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "tabgpt", "device"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pass  matmul" in r.stdout and r.stdout.strip().endswith("OK"), r.stdout
    # a bad environment switch: an error line and exit status 1, as for every command (it was a traceback)
    import os
    for name, default in (("TABGPT_SUBGROUPS", 0), ("TABGPT_LAYERNORM_FOLD", 1), ("TABGPT_ATTENTION_ORDER", 1),
                          ("TABGPT_MATMUL_PAIRS", 1), ("TABGPT_ATTENTION_DQ_PREFETCH", 1), ("TABGPT_TUNE_FLUSH", 0),
                          ("TABGPT_ATTENTION_DS_VEC4", 1)):
        r = subprocess.run([sys.executable, "-m", "tabgpt", "device"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, name: "2"})
        assert r.returncode == 1 and f"error: {name} must be 0 or 1, got '2': set it to 0" in r.stderr, r.stderr
        assert f"unset it (the default, {default})" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "tabgpt", "device"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "TABGPT_ATTENTION_DQ_KS": "24"})
    assert r.returncode == 1 and "error: attention_backward_dq_ds stages 16 or 32 keys" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "tabgpt", "device"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "TABGPT_AUTOTUNE_DATA": "ones"})
    assert r.returncode == 1 and "error: TABGPT_AUTOTUNE_DATA must be normal (the default) or zeros" in r.stderr
    for margin in ("0.5", "-0.01", "one"):
        r = subprocess.run([sys.executable, "-m", "tabgpt", "device"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "TABGPT_TUNE_MARGIN": margin})
        assert r.returncode == 1 and "error: TABGPT_TUNE_MARGIN must be a fraction from 0 (off, the default) to 0.1, " \
            f"e.g. 0.01, got '{margin}'" in r.stderr, r.stderr
    # a device that cannot be opened as asked (here: an unknown shader-check mode): the same error line
    r = subprocess.run([sys.executable, "-m", "tabgpt", "device", "--json"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "TABGPT_SHADER_CHECKS": "bogus"})
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert "error: TABGPT_SHADER_CHECKS must be one of all, bounds, none, got 'bogus'" in r.stderr, r.stderr


def test_parameters_and_locals_that_shadow_a_binding_are_not_uses():
    src = ("@group(0) @binding(0) var<storage, read> a: array<f32>;\n"
           "@group(0) @binding(1) var<storage, read_write> out: array<f32>;\n"
           "fn helper(a: f32) -> f32 { return a * 2.0; }\n"
           "@compute @workgroup_size(1) fn only_out() { let a = 1.0; out[0] = helper(a); }\n"
           "@compute @workgroup_size(1) fn both() { out[0] = a[0]; }\n"
           "@compute @workgroup_size(1) fn member(@builtin(workgroup_id) wg: vec3u) { let v = vec2f(1.0); "
           "out[0] = v.a + f32(wg.x); }\n")
    assert [b.name for b in gpu.used_bindings(src, "only_out")] == ["out"]
    assert [b.name for b in gpu.used_bindings(src, "both")] == ["a", "out"]
    assert [b.name for b in gpu.used_bindings(src, "member")] == ["out"], "a member access (v.a) is not a use"


def test_native_shader_checks_setting(monkeypatch):
    """Natively our modules skip wgpu's loop-iteration guard ("bounds"); TABGPT_SHADER_CHECKS picks another
    setting, and a wrong value is refused with the choices."""
    import tabgpt.gpu as g
    # this wgpu-py reaches wgpu-native's trusted-module entry point (else every setting would quietly be "all")
    assert g._trusted_modules_available()
    for mode in ("bounds", "all", "none"):
        monkeypatch.setenv("TABGPT_SHADER_CHECKS", mode)
        dev = g.wait(g.open_device(shared=False))
        assert dev.shader_checks == mode
        res = wait(selftest.check_reduce(dev, n=100003, seed=3))   # compiles and runs right under each setting
        assert res["ok"], (mode, res)
    monkeypatch.setenv("TABGPT_SHADER_CHECKS", "fast")
    with pytest.raises(g.GPUError, match="all, bounds, none"):
        g.wait(g.open_device(shared=False))
