"""Shared fixtures: one native WebGPU device (lavapipe in CI) for the whole test session."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import reference` from tests/
sys.path.insert(0, str(ROOT / "build"))  # `import serve`
os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp/tabgpt-xdg-%d" % os.getuid())
os.makedirs(os.environ["XDG_RUNTIME_DIR"], mode=0o700, exist_ok=True)

# TABGPT_TEST_ADAPTER=swiftshader runs the native tests on SwiftShader, the Vulkan driver that Chromium ships and
# browsers without a GPU fall back to (no shader-f16, subgroups of 4 lanes, 1 GiB bindings), instead of lavapipe:
# `make test` runs the GPU tests on both. The Vulkan loader is pointed at SwiftShader's ICD alone, before wgpu
# loads, and the CLI tests' processes inherit it.
TEST_ADAPTER = os.environ.get("TABGPT_TEST_ADAPTER", "")
if TEST_ADAPTER not in ("", "swiftshader"):
    raise pytest.UsageError(f"TABGPT_TEST_ADAPTER={TEST_ADAPTER!r}: give swiftshader, or leave it unset for the "
                            "default adapter (lavapipe on a machine without a GPU)")


if TEST_ADAPTER == "swiftshader":
    from browser_support import swiftshader_icd
    icd = swiftshader_icd()
    if icd is None:
        raise pytest.UsageError("TABGPT_TEST_ADAPTER=swiftshader: no vk_swiftshader_icd.json found (it comes with "
                                "Chromium: apt-get install chromium); TABGPT_SWIFTSHADER_ICD=/path/to/"
                                "vk_swiftshader_icd.json names it")
    os.environ["VK_ICD_FILENAMES"] = icd


@pytest.fixture(scope="session")
def dev():
    """The native device held to WebGPU's default limits (what SwiftShader in Chromium grants), so that a
    kernel that would fail in the browser fails here too. Tests drive its coroutines with gpu.wait()."""
    from tabgpt import gpu
    d = gpu.wait(gpu.open_device(limits=gpu.DEFAULT_LIMITS))
    if TEST_ADAPTER == "swiftshader" and "SwiftShader" not in d.info["device"]:
        pytest.exit(f"TABGPT_TEST_ADAPTER=swiftshader, but wgpu opened {d.info['device']!r}", returncode=3)
    return d


def pytest_terminal_summary(terminalreporter):
    if TEST_ADAPTER == "swiftshader":
        terminalreporter.write_line(f"native GPU tests ran on SwiftShader ({os.environ['VK_ICD_FILENAMES']})")


# Browser fixtures, module-scoped: Playwright's sync API keeps an asyncio loop running while it is open, so each
# browser module closes its own before the next module (or a test that calls asyncio.run) starts.
@pytest.fixture(scope="module")
def site_url():
    """The built site (rebuilt when pkg/, shaders/ or site/ changed) served on 127.0.0.1."""
    import serve  # build/serve.py
    from browser_support import ensure_site
    httpd, url = serve.start(ensure_site())
    yield url
    httpd.shutdown()


@pytest.fixture(scope="module")
def chromium():
    """Debian's Chromium, headless, with WebGPU enabled (SwiftShader without a GPU)."""
    from playwright.sync_api import sync_playwright
    from browser_support import CHROMIUM, CHROMIUM_ARGS
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def check_page(chromium, site_url):
    """The WebGPU check page, after its self-test finished; its worker stays up for further snippets.
    (Module-scoped like the browser: Playwright's sync API keeps an event loop running while it is open.)"""
    from browser_support import guarded_context
    ctx, guard = guarded_context(chromium, site_url)
    page = ctx.new_page()
    logs = []
    page.on("console", lambda m: logs.append(m.text))
    page.goto(site_url + "/check/index.html")
    page.wait_for_function("window.tabgptCheck && ['done', 'error'].includes(window.tabgptCheck.stage)",
                           timeout=180_000)
    page.guard = guard
    page.logs = logs
    yield page
    assert guard.outside == [], f"requests left 127.0.0.1: {guard.outside}"
    ctx.close()
