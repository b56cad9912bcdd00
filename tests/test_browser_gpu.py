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
    mp=dev.uniform(struct.pack('<4I', {M}, {N}, {K}, 0)), a=dev.buffer(len(a) * 4, 'a', a), b=dev.buffer(len(b) * 4, 'b', b), out=out)
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
bad = "@group(0) @binding(0) var<storage, read_write> x: array<f32>;\\n@compute @workgroup_size(1) fn main() { x[0] = undefined_thing; }\\n"
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


def test_no_webgpu_shows_which_browsers_have_it(chromium, site_url):
    text = status_without_webgpu(chromium, site_url, "/check/index.html",
                                 "window.tabgptCheck && window.tabgptCheck.stage === 'error'")
    assert "WebGPU" in text and "Chrome" in text and "Safari" in text, text
