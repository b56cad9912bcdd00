"""Per-dispatch cost of a replayed sequence, natively (wgpu-py) and in the browser (Pyodide + Chromium).

A sequence of N tiny dispatches (one workgroup each, bind groups made once) is submitted and waited for; the
best of several runs divided by N is the cost of one replayed dispatch: encoding, submission and the GPU's own
launch overhead. Usage: python bench/bench_dispatch.py [--n 1000] [--no-browser] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "build"))

from common import append_result  # noqa: E402  (bench/common.py)


def native(n):
    from tabgpt import gpu, selftest
    dev = gpu.wait(gpu.open_device())
    r = gpu.wait(selftest.dispatch_cost(dev, n=n, reps=5))
    return dev.info.get("device") or dev.info.get("vendor"), r["us_per_dispatch"]


def browser(n):
    from playwright.sync_api import sync_playwright
    import serve
    from browser_support import CHROMIUM, CHROMIUM_ARGS, ensure_site, run_py
    httpd, url = serve.start(ensure_site())
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = b.new_page()
        page.goto(url + "/check/index.html")
        page.wait_for_function("window.tabgptCheck && window.tabgptCheck.stage !== 'loading'", timeout=180_000)
        r = run_py(page, f"import json\nfrom tabgpt import gpu, selftest\n"
                         f"dev = await gpu.open_device()\n"
                         f"json.dumps([dev.info, await selftest.dispatch_cost(dev, n={n}, reps=5)])")
        b.close()
    httpd.shutdown()
    info, res = r
    return f"{info.get('vendor')} {info.get('architecture')} (Chromium)", res["us_per_dispatch"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--no-browser", action="store_true")
    ap.add_argument("--write", action="store_true", help="append the result to bench/results/dispatch.md")
    args = ap.parse_args()
    rows = [("native (wgpu-py)", *native(args.n))]
    if not args.no_browser:
        rows.append(("browser (Pyodide worker)", *browser(args.n)))
    lines = [f"## Replayed dispatch cost, {datetime.date.today()}, {args.n} dispatches per sequence", "",
             "| backend | adapter | µs per dispatch |", "| --- | --- | --- |"]
    lines += [f"| {b} | {a} | {us:.1f} |" for b, a, us in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        append_result("dispatch", text)


if __name__ == "__main__":
    main()
