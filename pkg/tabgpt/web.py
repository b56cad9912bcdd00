"""Browser glue: what the page's Web Worker calls inside Pyodide.

The worker (site/js/tabgpt-worker.js) loads Pyodide, installs this wheel with micropip and then runs small
Python snippets such as ``await tabgpt.web.check()``. Long jobs report progress with ``post(event)``, which
becomes a ``message`` event on the page; the page only displays events.
"""

from __future__ import annotations

import json
import time

from tabgpt import IN_BROWSER, __version__


def post(event: dict) -> None:
    """Send one event (a JSON-able dict) to the page; natively it is printed, which helps when testing."""
    if IN_BROWSER:
        import js
        js.postMessage(json.dumps({"type": "event", **event}))
    else:  # pragma: no cover - only used when running page code natively
        print(json.dumps(event))


async def check() -> str:
    """The WebGPU check page: adapter, features, limits, kernel self-test and dispatch cost, as JSON."""
    from tabgpt import gpu, selftest
    out = {"version": __version__, "backend": None}
    t0 = time.perf_counter()
    try:
        dev = await gpu.open_device()
    except gpu.GPUError as e:
        out["error"] = str(e)
        return json.dumps(out)
    out["backend"] = dev.backend
    out["info"] = dev.info
    out["features"] = sorted(dev.features)
    out["limits"] = dev.limits
    post({"stage": "selftest", "message": "running the kernel self-test"})
    out["selftest"] = await selftest.run_selftest(dev)
    post({"stage": "dispatch", "message": "measuring the cost of a replayed dispatch"})
    out["dispatch"] = await selftest.dispatch_cost(dev, n=1000, reps=3)
    out["seconds"] = time.perf_counter() - t0
    return json.dumps(out)
