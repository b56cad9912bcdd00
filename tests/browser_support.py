"""Helpers for the headless-Chromium tests: the served site, the browser, and outside-request blocking."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "dist" / "site"
CHROMIUM = os.environ.get("TABGPT_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--enable-unsafe-webgpu", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage",
]


# SwiftShader, the Vulkan driver Chromium ships (WebGPU's fallback adapter without a GPU): where Debian's and
# Ubuntu's Chromium keep its ICD file, for native runs on it (tests/conftest.py, bench/bench_speed.py)
SWIFTSHADER_ICDS = ["/usr/lib/chromium/vk_swiftshader_icd.json", "/usr/lib/chromium-browser/vk_swiftshader_icd.json",
                    "/snap/chromium/current/usr/lib/chromium-browser/vk_swiftshader_icd.json"]


def swiftshader_icd() -> str | None:
    """The SwiftShader ICD file of the installed Chromium (TABGPT_SWIFTSHADER_ICD names another), or None."""
    for icd in [os.environ.get("TABGPT_SWIFTSHADER_ICD", "")] + SWIFTSHADER_ICDS:
        if icd and Path(icd).is_file():
            return icd
    return None


def ensure_site() -> Path:
    """Build the site if it is missing or older than the package (make test builds it first anyway)."""
    manifest = SITE / "runtime" / "manifest.json"
    newest = max(p.stat().st_mtime for d in ("pkg", "shaders", "site") for p in (ROOT / d).rglob("*") if p.is_file())
    if not manifest.exists() or manifest.stat().st_mtime < newest:
        env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
        subprocess.run([sys.executable, "-m", "mkdocs", "build", "-q"], cwd=ROOT, check=True, env=env)
        subprocess.run([sys.executable, str(ROOT / "build" / "bundle.py")], cwd=ROOT, check=True, env=env)
    return SITE


class RequestGuard:
    """Aborts every request that does not go to the local server, and remembers it."""

    def __init__(self, base_url: str):
        self.host = urlparse(base_url).netloc
        self.outside: list[str] = []
        self.local: list[str] = []

    def __call__(self, route):
        url = route.request.url
        parsed = urlparse(url)
        if parsed.scheme in ("data", "blob") or parsed.netloc == self.host:
            self.local.append(url)
            route.continue_()
        else:
            self.outside.append(url)
            route.abort()


def run_py(page, code: str, timeout_ms: int = 120_000):
    """Run Python in the page's tabgpt worker; the snippet's value is returned (JSON strings are decoded)."""
    page.set_default_timeout(timeout_ms)
    result = page.evaluate("code => window.tabgptWorker.run(code)", code)
    if isinstance(result, str):
        try:
            return json.loads(result)
        except ValueError:
            return result
    return result


def guarded_context(chromium, base_url: str, **options):
    """A new browser context whose requests outside base_url are aborted and counted: (context, guard)."""
    ctx = chromium.new_context(**options)
    guard = RequestGuard(base_url)
    ctx.route("**/*", guard)
    return ctx, guard


def status_without_webgpu(chromium, base_url: str, path: str, error_stage: str) -> str:
    """Open a page with navigator.gpu hidden, wait until `error_stage` (a JS condition) holds, and return the
    text of its #status; no request may leave 127.0.0.1."""
    ctx, guard = guarded_context(chromium, base_url)
    ctx.add_init_script("Object.defineProperty(Navigator.prototype, 'gpu', {get: () => undefined});")
    page = ctx.new_page()
    page.goto(base_url + path)
    page.wait_for_function(error_stage, timeout=30_000)
    text = page.inner_text("#status")
    ctx.close()
    assert guard.outside == [], f"requests left 127.0.0.1: {guard.outside}"
    return text
