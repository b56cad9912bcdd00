"""Assemble the static runtime bundle beside the built site, offline and reproducibly.

dist/site/runtime/
    pyodide/     the Pyodide runtime from the npm package (build/node_modules/pyodide)
    uplot/       the chart library from npm
    micropip-*.whl, tabgpt-*.whl, manifest.json (file names and versions the worker loads)
    shaders/     the WGSL files, also served as plain files for reading along

Inputs: `npm ci` in build/ (package-lock.json pins the versions) and the micropip wheel, downloaded once into
.cache/wheels by pip. Usage: python build/bundle.py [--out dist/site]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NODE = ROOT / "build" / "node_modules"
CACHE = ROOT / ".cache" / "wheels"
MICROPIP = "0.11.1"
PYODIDE_FILES = ["pyodide.mjs", "pyodide.asm.mjs", "pyodide.asm.wasm", "python_stdlib.zip", "pyodide-lock.json"]


def sh(*cmd):
    print("+", " ".join(map(str, cmd)), file=sys.stderr)
    subprocess.run(cmd, check=True)


def build_wheel(out: Path) -> Path:
    for old in out.glob("tabgpt-*.whl"):
        old.unlink()
    sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT))
    (wheel,) = out.glob("tabgpt-*.whl")
    return wheel


def micropip_wheel() -> Path:
    found = sorted(CACHE.glob(f"micropip-{MICROPIP}-*.whl"))
    if not found:
        CACHE.mkdir(parents=True, exist_ok=True)
        sh(sys.executable, "-m", "pip", "download", "-q", f"micropip=={MICROPIP}", "--no-deps",
           "--python-version", "3.14", "--only-binary=:all:", "-d", str(CACHE))
        found = sorted(CACHE.glob(f"micropip-{MICROPIP}-*.whl"))
    return found[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "dist" / "site"))
    args = ap.parse_args(argv)
    rt = Path(args.out) / "runtime"
    if not (NODE / "pyodide" / "pyodide.mjs").exists():
        sys.exit("build/node_modules is missing: run `npm ci --prefix build` first (make does this)")
    (rt / "pyodide").mkdir(parents=True, exist_ok=True)
    for name in PYODIDE_FILES:
        shutil.copy2(NODE / "pyodide" / name, rt / "pyodide" / name)
    (rt / "uplot").mkdir(exist_ok=True)
    for name in ["uPlot.iife.min.js", "uPlot.min.css"]:
        shutil.copy2(NODE / "uplot" / "dist" / name, rt / "uplot" / name)
    if (rt / "shaders").exists():
        shutil.rmtree(rt / "shaders")
    shutil.copytree(ROOT / "shaders", rt / "shaders")
    wheel = build_wheel(rt)
    mp = micropip_wheel()
    shutil.copy2(mp, rt / mp.name)
    pyodide_version = json.loads((NODE / "pyodide" / "package.json").read_text())["version"]
    manifest = {
        "wheel": wheel.name,
        "wheel_sha256": sha256(wheel),
        "micropip": mp.name,
        "pyodide": pyodide_version,
        "shaders": sorted(p.name for p in (ROOT / "shaders").glob("*.wgsl")),
    }
    (rt / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"runtime bundle in {rt}: {wheel.name}, {mp.name}, pyodide {pyodide_version}")


if __name__ == "__main__":
    main()
