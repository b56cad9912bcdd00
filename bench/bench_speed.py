"""The check page's "Measure speed" (tabgpt.speed) natively and in the browser, side by side on one machine.

Natively on the default adapter (a GPU where there is one, else lavapipe), natively on SwiftShader (the Vulkan
driver Chromium ships, reached by pointing the Vulkan loader at its ICD), and in headless Chromium's Pyodide
worker (WebGPU on SwiftShader where there is no GPU): the same products and the same training loop, so that the
native SwiftShader row and the browser row differ only by the browser's layers (its WebGPU implementation, the
shader translation with its bounds checks, Pyodide). One after the other, one run.

    python bench/bench_speed.py [--preset tiny] [--seconds 10] [--matmul-seconds 15] [--no-browser] [--write]
                                [--dawn-features disable_workgroup_init ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "pkg"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "build"))

from browser_support import swiftshader_icd  # noqa: E402  (tests/browser_support.py)
from common import append_result  # noqa: E402  (bench/common.py)

MEASURE = """
import json
from tabgpt import gpu, speed
dev = await gpu.open_device()
r = {{"adapter": dev.info.get("device") or dev.info.get("architecture") or dev.info.get("vendor"),
      "matmul": await speed.matmul_speed(dev, seconds={matmul_seconds}),
      "train": await speed.train_speed(dev, {preset!r}, {seconds})}}
json.dumps(r)
"""


def native(args, icd: str | None = None) -> dict:
    """MEASURE natively, in a process of its own (VK_ICD_FILENAMES picks the driver before wgpu loads)."""
    env = dict(os.environ, **({"VK_ICD_FILENAMES": icd} if icd else {}))
    r = subprocess.run([sys.executable, __file__, "--child", "--preset", args.preset, "--seconds", str(args.seconds),
                        "--matmul-seconds", str(args.matmul_seconds)], capture_output=True, text=True, env=env,
                       timeout=1800)
    if r.returncode:
        raise SystemExit(f"native run failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def child(args):
    """The native side of native(): MEASURE's figures as one JSON line."""
    from tabgpt import gpu, speed
    dev = gpu.wait(gpu.open_device())
    print(json.dumps({"adapter": dev.info.get("device") or dev.info.get("architecture") or dev.info.get("vendor"),
                      "matmul": gpu.wait(speed.matmul_speed(dev, seconds=args.matmul_seconds)),
                      "train": gpu.wait(speed.train_speed(dev, args.preset, args.seconds))}))


def browser(args, dawn_features: str = "") -> dict:
    from playwright.sync_api import sync_playwright
    import serve
    from browser_support import CHROMIUM, CHROMIUM_ARGS, ensure_site, run_py
    httpd, url = serve.start(ensure_site())
    try:
        with sync_playwright() as p:
            extra = [f"--enable-dawn-features={dawn_features}"] if dawn_features else []
            b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + extra)
            page = b.new_page()
            page.goto(url + "/check/index.html")
            page.wait_for_function("window.tabgptCheck && window.tabgptCheck.stage !== 'loading'", timeout=180_000)
            r = run_py(page, MEASURE.format(**vars(args)), timeout_ms=1_800_000)
            r["where"] = f"browser: Chromium {b.version} (headless), Pyodide" + \
                (f", Dawn features {dawn_features}" if dawn_features else "")
            b.close()
    finally:
        httpd.shutdown()
    return r


def report(rows: list[dict], args) -> str:
    sizes = sorted({m["n"] for r in rows for m in r["matmul"]})
    head = "| where | adapter | " + " | ".join(f"{n}^3 GFLOP/s" for n in sizes) + \
        f" | training, preset {args.preset}: tokens/s | GFLOP/s | build s |"
    lines = [head, "| --- | --- | " + " | ".join("---:" for _ in sizes) + " | ---: | ---: | ---: |"]
    for r in rows:
        by_n = {m["n"]: m for m in r["matmul"]}
        cells = [("failed" if "error" in by_n[n] else f"{by_n[n]['gflops']:.2f}" if by_n[n]["ok"] else "WRONG")
                 if n in by_n else "" for n in sizes]
        t = r["train"]
        train = ([f"{t['tokens_per_s']:,.0f}", f"{t['gflops']:.2f}", f"{t['compile_seconds']:.1f}"]
                 if "error" not in t else [t["error"], "", ""])
        lines.append(f"| {r['where']} | {r['adapter']} | " + " | ".join(cells + train) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seconds", type=float, default=10.0, help="training time per row")
    ap.add_argument("--matmul-seconds", type=float, default=15.0, help="the products' budget per row")
    ap.add_argument("--no-browser", action="store_true")
    ap.add_argument("--dawn-features", action="append", default=[], metavar="LIST",
                    help="another browser row with these Dawn toggles on (comma-separated), for diagnosis: e.g. "
                         "disable_workgroup_init (WebGPU zeroes workgroup memory at every workgroup's start) or "
                         "disable_robustness (the index clamps); repeatable")
    ap.add_argument("--write", action="store_true", help="append the table to bench/results/speed.md")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    icd = swiftshader_icd()
    rows = [dict(native(args), where="native (wgpu-py), default adapter")]
    if icd:
        rows.append(dict(native(args, icd), where="native (wgpu-py), SwiftShader"))
    if not args.no_browser:
        rows.append(browser(args))
        rows += [browser(args, features) for features in args.dawn_features]
    text = (f"### tabgpt.speed natively and in the browser, {datetime.date.today()} "
            f"(`bench/bench_speed.py {' '.join(sys.argv[1:])}`)\n\n" + report(rows, args))
    print(text)
    if args.write:
        print(f"appended to {append_result('speed', text)}")


if __name__ == "__main__":
    main()
