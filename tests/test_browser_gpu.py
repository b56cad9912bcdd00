"""The GPU core inside Pyodide in headless Chromium (WebGPU on SwiftShader), served from 127.0.0.1.

Every request that leaves 127.0.0.1 is aborted and counted: none is allowed.
"""


import numpy as np
import pytest

from browser_support import run_py, status_without_webgpu

pytestmark = pytest.mark.browser


def test_check_page_passes_the_selftest(check_page):
    state = check_page.evaluate("window.tabgptCheck")
    assert state["stage"] == "done", (state, check_page.logs)
    r = state["result"]
    assert r["backend"] == "webgpu-browser"
    assert r["selftest"]["ok"], r["selftest"]
    assert "Kernel self-test" in check_page.inner_text("body")
    assert any("/runtime/tabgpt-" in u for u in check_page.guard.local), "the wheel was not served locally"
    assert check_page.guard.outside == []


def test_measure_speed_times_checked_products_and_training_in_browser(check_page):
    """The check page's "Measure speed" (tabgpt.speed in the worker): the trainer's products, each checked, and
    training at the preset picked; SwiftShader is a fallback adapter, so the page offers tiny first."""
    assert check_page.is_visible("#btn-speed")
    assert check_page.eval_on_selector("#speed-preset", "e => e.value") == "tiny"
    check_page.fill("#speed-seconds", "0")
    check_page.click("#btn-speed")
    assert "from 1 to 600 seconds" in check_page.inner_text("#speed-result")
    check_page.fill("#speed-seconds", "2")
    check_page.click("#btn-speed")
    check_page.wait_for_function("window.tabgptCheck.speed !== null", timeout=240_000)
    s = check_page.evaluate("window.tabgptCheck.speed")
    assert "error" not in s, s
    assert s["matmul"] and [m["n"] for m in s["matmul"]] == [256, 512, 1024][:len(s["matmul"])], s["matmul"]
    assert all(m["ok"] and m["checked"] >= 16 and m["gflops"] > 0 for m in s["matmul"]), s["matmul"]
    t = s["train"]
    print("\n" + "; ".join(f"{m['n']}^3 {m['gflops']:.1f} GFLOP/s" for m in s["matmul"]) +
          f"; tiny preset {t.get('tokens_per_s', 0):,.0f} tokens/s")
    assert "error" not in t and t["preset"] == "tiny" and t["timed_steps"] >= 1 and t["tokens_per_s"] > 0, t
    assert abs(t["gflops"] - t["tokens_per_s"] * t["flops_per_token"] / 1e9) < 1e-6 * t["gflops"]
    text = check_page.inner_text("#speed-result")
    assert "256 × 256 × 256" in text and "GFLOP/s" in text and "tokens/s" in text, text
    assert "Speed measured" in check_page.inner_text("#status")
    assert not check_page.is_disabled("#btn-speed")


def test_same_matmul_kernel_matches_numpy_in_browser(check_page):
    M, N, K = 37, 45, 53
    rng = np.random.default_rng(7)
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((K, N), dtype=np.float32)
    code = f"""
import array, base64, struct, json
from tabgpt import gpu
dev = await gpu.open_device()
a = array.array('f', base64.b64decode('{__import__("base64").b64encode(a.tobytes()).decode()}'))
b = array.array('f', base64.b64decode('{__import__("base64").b64encode(b.tobytes()).decode()}'))
k = await dev.kernel('selftest.wgsl', 'matmul')
out = dev.buffer(4 * {M * N}, 'out')
seq = dev.sequence('t').dispatch(k, ({(N + 15) // 16}, {(M + 15) // 16}),
    mp=dev.uniform(struct.pack('<4I', {M}, {N}, {K}, 0)), a=dev.buffer(len(a) * 4, 'a', a),
    b=dev.buffer(len(b) * 4, 'b', b), out=out)
await seq.build()
seq.run()
base64.b64encode(await dev.read(out)).decode()
"""
    import base64
    got = np.frombuffer(base64.b64decode(run_py(check_page, code)), dtype=np.float32).reshape(M, N)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 1e-5, f"max relative error {err:.3g}"


def test_same_reduction_matches_in_browser(check_page):
    r = run_py(check_page, "import json\nfrom tabgpt import selftest, gpu\n"
                           "json.dumps(await selftest.check_reduce(await gpu.open_device(), n=300001, seed=3))")
    assert r["ok"], r


def test_wgsl_error_is_a_readable_exception_in_browser(check_page):
    r = run_py(check_page, """
from tabgpt import gpu
dev = await gpu.open_device()
bad = ("@group(0) @binding(0) var<storage, read_write> x: array<f32>;\\n"
       "@compute @workgroup_size(1) fn main() { x[0] = undefined_thing; }\\n")
try:
    await dev.kernel('bad.wgsl', 'main', source=bad)
    msg = 'no error'
except gpu.GPUError as e:
    msg = 'GPUError: ' + str(e)
msg
""")
    assert r.startswith("GPUError") and "undefined_thing" in r, r


def test_validation_error_is_a_readable_exception_in_browser(check_page):
    r = run_py(check_page, """
from tabgpt import gpu
dev = await gpu.open_device()
k = await dev.kernel('selftest.wgsl', 'matmul')
small = dev.buffer(4, 'small')
try:
    await dev.sequence('bad').dispatch(k, (1, 1), mp=small, a=small, b=small, out=small).build()
    msg = 'no error'
except gpu.GPUError as e:
    msg = 'GPUError: ' + str(e)
msg
""")
    assert r.startswith("GPUError") and "bad" in r, r


def test_uncaptured_errors_and_a_lost_device_are_readable_in_browser(check_page):
    """What arrives as an event (an error nothing captured, as running out of memory does; the device's loss) is
    raised by the next read or sync as a GPUError that says what happened and what to do."""
    r = run_py(check_page, """
import json
from js import Object
from pyodide.ffi import to_js
from tabgpt import gpu
dev = await gpu.BrowserDevice.open()   # a device of its own: this test breaks it
buf = dev.buffer(16, 'x')
out = []
# what the browser sends when an allocation fails and no error scope captures it
from js import GPUOutOfMemoryError, GPUUncapturedErrorEvent
dev.device.dispatchEvent(GPUUncapturedErrorEvent.new('uncapturederror', to_js(
    {'error': GPUOutOfMemoryError.new('test: not enough memory')}, dict_converter=Object.fromEntries)))
dev.device.createBuffer(to_js({'size': 4, 'usage': 0}, dict_converter=Object.fromEntries))   # invalid: only logged
try:
    for _ in range(50):
        await dev.sync()
    out.append('no error')
except gpu.GPUError as e:
    out.append(str(e))
out.append((await dev.read(buf)).hex())   # reported once; the device still works
dev.device.destroy()
try:
    await dev.read(buf)
    out.append('no error')
except gpu.GPUError as e:
    out.append(str(e))
json.dumps(out)
""")
    assert r[0].startswith("the GPU ran out of memory (GPUOutOfMemoryError: test: not enough memory)"), r
    assert r[1] == "00" * 16, r
    assert r[2].startswith("the GPU device was lost (destroyed") and "Reload the page" in r[2], r


def test_no_webgpu_shows_which_browsers_have_it(chromium, site_url):
    text = status_without_webgpu(chromium, site_url, "/check/index.html",
                                 "window.tabgptCheck && window.tabgptCheck.stage === 'error'")
    assert "WebGPU" in text and "Chrome" in text and "Safari" in text, text


def test_subgroup_reductions_match_numpy_in_browser(check_page):
    """LayerNorm and cross-entropy with subgroup reductions (SwiftShader's subgroups have 4 lanes) and with the
    workgroup-memory trees, in Pyodide on the page's WebGPU, against NumPy."""
    import base64
    import reference
    r = np.random.default_rng(11)
    n, c, v, vp = 19, 200, 1001, 1024       # C4 50: past KMAX vec4s per 4-lane subgroup; 19 rows: odd
    x = (r.standard_normal((n, c)) * 2 + 3).astype(np.float32)
    w, b = r.standard_normal((2, c)).astype(np.float32)
    dout = r.standard_normal((n, c)).astype(np.float32)
    logits = (r.standard_normal((n, vp)) * 3).astype(np.float32)
    logits[:, v:] = 1e4
    targets = r.integers(0, v, n).astype(np.uint32)
    enc = {k: base64.b64encode(a.tobytes()).decode() for k, a in
           dict(x=x, w=w, b=b, dout=dout, logits=logits, targets=targets).items()}
    code = f"""
import base64, json
from tabgpt import gpu
from tabgpt.ops.layernorm import LayerNorm
from tabgpt.ops.crossentropy import CrossEntropy
dev = await gpu.open_device()
enc = {enc!r}
up = lambda k: dev.buffer(len(base64.b64decode(enc[k])), k, base64.b64decode(enc[k]))
res = {{"available": dev.has_subgroup_ops(), "features": sorted(dev.features)}}
for sg in (False, True):
    ln = await LayerNorm.create(dev, {n}, {c}, 3, subgroups=sg)
    ce = await CrossEntropy.create(dev, {n}, {v}, {vp}, subgroups=sg)
    bufs = dict(out=dev.buffer(4 * {n * c}), mean=dev.buffer(4 * {n}), rstd=dev.buffer(4 * {n}),
                dinp=dev.buffer(4 * {n * c}), dw=dev.buffer(4 * {c}), db=dev.buffer(4 * {c}),
                losses=dev.buffer(4 * {n}), dlogits=up("logits"))
    bx, bw = up("x"), up("w")
    seq = dev.sequence("t")
    ln.forward(seq, out=bufs["out"], mean=bufs["mean"], rstd=bufs["rstd"], inp=bx, weight=bw, bias=up("b"))
    ln.backward(seq, dinp=bufs["dinp"], dweight=bufs["dw"], dbias=bufs["db"], dout=up("dout"), inp=bx, weight=bw,
                mean=bufs["mean"], rstd=bufs["rstd"])
    ce.forward_backward(seq, losses=bufs["losses"], logits=bufs["dlogits"], targets=up("targets"))
    await seq.build()
    seq.run()
    res[str(sg)] = {{k: base64.b64encode(await dev.read(bf)).decode() for k, bf in bufs.items()}}
json.dumps(res)
"""
    res = run_py(check_page, code)
    assert "subgroups" in res["features"] and res["available"], res.get("features")
    ref_out, ref_mean, ref_rstd = reference.layernorm_forward(x, w, b)
    ref_dinp, ref_dw, ref_db = reference.layernorm_backward(dout, x, w, ref_mean, ref_rstd)
    ref_losses = reference.crossentropy_forward(logits, targets, v)
    ref_d = reference.crossentropy_softmax_backward(reference.softmax_forward(logits, v), targets, 1.0 / n)
    refs = dict(out=(ref_out, 1e-5), mean=(ref_mean, 1e-5), rstd=(ref_rstd, 1e-5), dinp=(ref_dinp, 1e-5),
                dw=(ref_dw, 1e-4), db=(ref_db, 1e-4), losses=(ref_losses, 1e-5), dlogits=(ref_d, 1e-6))
    for sg in ("False", "True"):
        for k, (ref, tol) in refs.items():
            got = np.frombuffer(base64.b64decode(res[sg][k]), np.float32).reshape(np.shape(ref))
            err = np.abs(got.astype(np.float64) - ref).max()
            assert err <= tol * (1 + np.abs(ref).max()), f"subgroups={sg} {k}: max abs error {err:.3g}"


def test_attention_backward_through_products_matches_reference_in_browser(check_page):
    """The backward as batched products (matmul.wgsl's BATCHED and SOFTMAX blocks) and the fused
    kernels, in Pyodide on the page's WebGPU, against NumPy: T = 150 reaches past the 128-column band."""
    import base64
    import reference
    B, T, C, NH = 2, 150, 48, 2
    r = np.random.default_rng(12)
    qkv = r.standard_normal((B, T, 3 * C)).astype(np.float32)
    dout = r.standard_normal((B, T, C)).astype(np.float32)
    enc = {k: base64.b64encode(a.tobytes()).decode() for k, a in dict(qkv=qkv, dout=dout).items()}
    code = f"""
import base64, json
from tabgpt import gpu
from tabgpt.ops.attention import Attention
dev = await gpu.open_device()
enc = {enc!r}
up = lambda k: dev.buffer(len(base64.b64decode(enc[k])), k, base64.b64decode(enc[k]))
res = {{}}
for mode in ("flash", "products"):
    attn = await Attention.create(dev, B={B}, T={T}, C={C}, n_head={NH}, backward=mode)
    out, lse = dev.buffer(4 * {B * T * C}), dev.buffer(4 * {B * NH * T})
    dqkv, qkv = dev.buffer(4 * {B * T * 3 * C}), up("qkv")
    seq = dev.sequence("t")
    attn.forward(seq, out=out, lse=lse, qkv=qkv)
    attn.backward(seq, dqkv=dqkv, dout=up("dout"), qkv=qkv, out=out, lse=lse)
    await seq.build()
    seq.run()
    res[mode] = [attn.backward_mode, base64.b64encode(await dev.read(dqkv)).decode()]
json.dumps(res)
"""
    res = run_py(check_page, code)
    _, att = reference.attention_forward(qkv, NH)
    ref = reference.attention_backward(dout, qkv, att, NH)
    for mode in ("flash", "products"):
        assert res[mode][0] == mode
        got = np.frombuffer(base64.b64decode(res[mode][1]), np.float32).reshape(ref.shape)
        err = np.abs(got - ref).max() / max(1.0, np.abs(ref).max())
        assert err < 2e-5, f"{mode}: max relative error {err:.3g}"
