"""What NVIDIA's driver compiled our WGSL kernels into (SASS), read from the driver's shader disk cache.

WGSL reaches an NVIDIA GPU as SPIR-V (wgpu's naga) that the driver compiles to SASS at pipeline creation, and the
driver keeps the result in its shader disk cache (zstd-compressed records). This tool points that cache at a
folder of its own while a command runs, then disassembles what was written: for each kernel its instruction
count, highest register (occupancy: at 256 threads per workgroup, two workgroups fit an SM only up to 128
registers a thread), local-memory traffic (spills, STL/LDL), shared-memory and global accesses, barriers, and
each loop: its instructions, FFMAs and the stall cycles the compiler scheduled statically (the control bits of
every instruction), so unrolling, hoisting and register pressure can be read instead of guessed.

On the GPU machine (NVIDIA's proprietary driver, through Vulkan):

    python bench/sass.py collect runs/sass -- python bench/bench_matmul.py --sizes 4096x4096x4096 --no-cublas
    python bench/sass.py collect runs/step -- python bench/profile_step.py --preset browser

Anywhere afterwards (needs `pip install zstandard nvidia-cuda-nvdisasm`, or nvdisasm of a CUDA toolkit on PATH):

    python bench/sass.py show runs/sass                 # the table; --sass DIR also writes each kernel's SASS

The cache's record format is the driver's own and undocumented: code is found by the kernel's final
self-branch and the earliest offset nvdisasm decodes up to it. The kernels appear in the order the driver
compiled them (wgpu's few internal kernels first); one workload per folder keeps them apart.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
NVVM_MAGIC = b"NVDANVVM"
# The terminal `BRA` to itself that ends every kernel (Volta to Hopper encoding, offset -16).
SELF_BRANCH = bytes.fromhex("4779fc00fcffffff")


def collect(out: Path, command: list[str]) -> list[Path]:
    """Run `command` with the NVIDIA shader disk cache in out/cache; returns the cache files written."""
    if not command:
        raise SystemExit("collect: give the command to run after --, e.g. -- python bench/bench_peak.py")
    cache = out / "cache"
    if cache.exists():
        shutil.rmtree(cache)
    cache.mkdir(parents=True)
    env = dict(os.environ, __GL_SHADER_DISK_CACHE="1", __GL_SHADER_DISK_CACHE_PATH=str(cache.resolve()),
               __GL_SHADER_DISK_CACHE_SKIP_CLEANUP="1")
    rc = subprocess.run(command, env=env).returncode
    files = sorted(p for p in cache.rglob("*.bin") if p.is_file())
    if rc != 0:
        raise SystemExit(f"collect: the command exited with {rc}")
    if not files:
        raise SystemExit("collect: the driver wrote no shader cache. This works only with NVIDIA's proprietary "
                         "driver (Vulkan); check that wgpu runs on the NVIDIA adapter (python -m tabgpt device).")
    # One flat copy per cache file, so that tools that do not keep deep folders carry them too (earlier copies in
    # the folder go first: show reads every cache*.bin).
    for old in out.glob("cache*.bin"):
        old.unlink()
    for i, f in enumerate(files):
        shutil.copy(f, out / f"cache{i}.bin")
    print(f"{len(files)} cache file(s) in {out}: python bench/sass.py show {out}")
    return files


def find_nvdisasm() -> str:
    exe = shutil.which("nvdisasm")
    if exe:
        return exe
    base = Path(sysconfig.get_paths()["purelib"]) / "nvidia"
    for p in sorted(base.glob("*/bin/nvdisasm")) + sorted(base.glob("cuda_nvdisasm/bin/nvdisasm")):
        if not os.access(p, os.X_OK):
            try:
                p.chmod(p.stat().st_mode | 0o111)
            except OSError:
                raise SystemExit(f"show: {p} is not executable and cannot be made so: chmod +x it")
        return str(p)
    raise SystemExit("show: nvdisasm not found: pip install nvidia-cuda-nvdisasm (or put a CUDA toolkit's "
                     "nvdisasm on PATH)")


def records(data: bytes):
    """The decompressed zstd frames of a cache file."""
    try:
        import zstandard
    except ImportError:
        raise SystemExit("show: pip install zstandard (the driver compresses its cache records with zstd)")
    i = 0
    while (j := data.find(ZSTD_MAGIC, i)) >= 0:
        try:
            yield zstandard.ZstdDecompressor().decompressobj().decompress(data[j:])
        except zstandard.ZstdError:
            pass
        i = j + 4


class Disassembler:
    def __init__(self, arch: str):
        self.exe = find_nvdisasm()
        self.arch = arch
        self.tmp = Path(tempfile.mkdtemp(prefix="sass"))
        atexit.register(shutil.rmtree, self.tmp, True)

    def run(self, code: bytes, *flags: str) -> str | None:
        f = self.tmp / "code.bin"
        f.write_bytes(code)
        r = subprocess.run([self.exe, "-b", self.arch, *flags, str(f)], capture_output=True, text=True)
        return r.stdout if r.returncode == 0 else None

    def kernels(self, record: bytes):
        """Each kernel's code in a compiled record: from the earliest offset (16 bytes apart, counted back from
        the final self-branch) from which nvdisasm decodes every instruction. Every start inside the code
        decodes; the record's header before it is taken not to (true of every record seen), so the boundary is
        found by bisection."""
        for m in re.finditer(re.escape(SELF_BRANCH), record):
            end = m.start() + 16              # the pattern is the first half of the branch's 16 bytes
            if m.start() % 8:
                continue
            if self.run(record[end - 16:end]) is None:
                continue
            lo, hi = 1, end // 16             # starts end - 16 * i: i = 1 (the branch alone) decodes
            while lo < hi:                    # largest i that decodes: lo decodes, everything above hi fails
                mid = (lo + hi + 1) // 2
                if self.run(record[end - 16 * mid:end]) is not None:
                    lo = mid
                else:
                    hi = mid - 1
            yield record[end - 16 * lo:end]


def decode(dis: Disassembler, code: bytes) -> list[dict]:
    """Instructions with their scheduling control bits (stall cycles, barriers waited on)."""
    text = dis.run(code, "-hex")
    out = []
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s*/\* (0x[0-9a-f]+) \*/\s*\n\s*/\* (0x[0-9a-f]+) \*/",
                         text or ""):
        ctrl = int(m.group(4), 16) >> 41
        out.append(dict(addr=int(m.group(1), 16), text=m.group(2), stall=ctrl & 15, barrier=(ctrl >> 5) & 7,
                        wait=(ctrl >> 11) & 63))
    return out


EARLY_WAIT = 32     # a global load waited for within this many instructions, no loop between: its latency is exposed


def back_edges(ins: list[dict]) -> list[tuple[int, int]]:
    """(target, branch) addresses of the backward branches: each loop's first and last instruction."""
    edges = []
    for i in ins:
        m = re.search(r"\bBRA (0x[0-9a-f]+)", i["text"])
        if m and int(m.group(1), 16) < i["addr"]:
            edges.append((int(m.group(1), 16), i["addr"]))
    return edges


def early_waits(ins: list[dict], back: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(load, waiting instruction) addresses of the global loads whose result the warp waits for (the
    instruction's wait mask holds the scoreboard barrier the load sets) within EARLY_WAIT instructions, with no
    loop start or back edge between: nothing else runs while that load is in flight. Loads in a prologue do this
    by necessity; inside a loop it is what a prefetch exists to avoid (see BENCHMARKS.md, "What the driver
    compiles": a phi on the prefetch registers made the compiler copy them right after their loads)."""
    starts, ends = {lo for lo, _ in back}, {hi for _, hi in back}
    out = []
    for k, x in enumerate(ins):
        if not re.search(r"\bLDG", x["text"]) or x["barrier"] == 7:      # 7: no barrier set
            continue
        for y in ins[k + 1:k + 1 + EARLY_WAIT]:
            if y["addr"] in starts:
                break
            if y["wait"] >> x["barrier"] & 1:
                out.append((x["addr"], y["addr"]))
                break
            if y["addr"] in ends:
                break
    return out


def summary(ins: list[dict]) -> dict:
    text = [i["text"] for i in ins]

    def count(pattern):
        return sum(bool(re.search(pattern, t)) for t in text)

    regs = [int(r) for t in text for r in re.findall(r"\bR(\d+)\b", t)]
    back = back_edges(ins)
    waits = early_waits(ins, back)
    loops = []
    for lo, hi in back:
        body = [x for x in ins if lo <= x["addr"] <= hi]
        loops.append(dict(start=lo, end=hi, n=len(body),
                          ffma=sum("FFMA" in x["text"] for x in body),
                          lds=sum("LDS" in x["text"] for x in body),
                          mov=sum(bool(re.search(r"\bMOV\b|IMAD\.MOV", x["text"])) for x in body),
                          stall=sum(x["stall"] for x in body),
                          early=sum(lo <= a <= hi for a, _ in waits)))
    return dict(n=len(ins), regs=(max(regs) + 1) if regs else 0, ffma=count(r"\bFFMA"), mufu=count(r"\bMUFU"),
                lds=count(r"\bLDS"), sts=count(r"\bSTS"), ldg=count(r"\bLDG"), stg=count(r"\bSTG"),
                local=count(r"\b(STL|LDL)"), bar=count(r"\bBAR\.SYNC"), loops=loops)


def show(folder: Path, arch: str, sass_dir: Path | None, min_instructions: int) -> list[dict]:
    files = sorted(folder.glob("cache*.bin")) or sorted(folder.rglob("*.bin"))
    if not files:
        raise SystemExit(f"show: no cache files in {folder}: run `python bench/sass.py collect {folder} -- ...` "
                         "on the GPU machine first")
    dis = Disassembler(arch)
    rows = []
    for f in files:
        for rec in records(f.read_bytes()):
            if not rec.startswith(NVVM_MAGIC):
                continue
            for code in dis.kernels(rec):
                ins = decode(dis, code)
                if len(ins) < min_instructions:
                    continue
                s = summary(ins)
                s["name"] = f"{f.stem}:{len(rows)}"
                rows.append(s)
                if sass_dir:
                    sass_dir.mkdir(parents=True, exist_ok=True)
                    (sass_dir / f"kernel{len(rows) - 1}.sass").write_text(dis.run(code))
    print("| kernel | instructions | registers | local (STL/LDL) | FFMA | MUFU | LDS | STS | LDG | STG | barriers |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for s in rows:
        print(f"| {s['name']} | {s['n']} | {s['regs']} | {s['local']} | {s['ffma']} | {s['mufu']} | {s['lds']} | "
              f"{s['sts']} | {s['ldg']} | {s['stg']} | {s['bar']} |")
    print("\nLoops (backward branches; static stall cycles: what the compiler scheduled for one warp, "
          "before any wait on memory or barriers; loads waited for at once: global loads in the loop whose result "
          f"is waited for within {EARLY_WAIT} instructions with no inner loop between, their latency exposed):\n")
    print("| kernel | loop | instructions | FFMA | LDS | moves | static stall cycles | FFMA per static cycle | "
          "loads waited for at once |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for s in rows:
        for lp in s["loops"]:
            print(f"| {s['name']} | {lp['start']:#x}-{lp['end']:#x} | {lp['n']} | {lp['ffma']} | {lp['lds']} | "
                  f"{lp['mov']} | {lp['stall']} | {lp['ffma'] / max(lp['stall'], 1):.2f} | {lp['early']} |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("collect", help="run a command with the driver's shader cache in DIR (GPU machine)")
    c.add_argument("dir", type=Path)
    c.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    s = sub.add_parser("show", help="disassemble what collect gathered")
    s.add_argument("dir", type=Path)
    s.add_argument("--arch", default="SM90", help="nvdisasm's architecture of the cached code (H100: SM90)")
    s.add_argument("--sass", type=Path, help="also write each kernel's SASS into this folder")
    s.add_argument("--min-instructions", type=int, default=120,
                   help="leave out smaller kernels (wgpu's internal ones)")
    args = ap.parse_args()
    if args.what == "collect":
        cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
        collect(args.dir, cmd)
    else:
        show(args.dir, args.arch, args.sass, args.min_instructions)


if __name__ == "__main__":
    main()
