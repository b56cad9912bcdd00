"""Source-level variants of the attention kernels, timed side by side: what bounds them (experiments for the kernels).

Diagnostics (wrong results, timing only), each made from shaders/attention.wgsl by a rewrite of its text:
  base      as written
  nostore   no dS stores (attention_backward_dkv's STORE_DS block): what writing dS costs dkv (dq_ds then reads
            whatever the scratch holds)
  nodsread  attention_backward_dq_ds reads no dS (a constant instead): what reading it costs
  noexp     every exp(x) replaced by x: what the exponentials cost (forward, dq, dkv)
  noglobal  the blocks' and streamed tiles' global reads replaced by a constant (load_qkv, load_dout and the
            prefetches): what reading Q, K, V and dO costs
  nobarrier no workgroupBarrier() in attention_backward_dkv: what its barriers cost
  a+b       several at once, e.g. nostore+nodsread
Each variant compiles its own kernels (the device's source of attention.wgsl swapped); the forward and the whole
backward (delta, dk/dv, dq) are timed as bench_attention.py times them, best of the trials, and compared with
the base variant's results (max relative difference: 0 where the variant leaves that pass unchanged).

    python bench/bench_attention_variants.py --sizes 32x256x6x64 8x1024x12x64 --variants base nostore noexp
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "pkg"))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402

from bench_attention import parse_size, time_ours  # noqa: E402
from common import append_result, device_label  # noqa: E402
from tabgpt import gpu  # noqa: E402
from tabgpt.gpu import wait  # noqa: E402
from tabgpt.ops.attention import FILE  # noqa: E402

STORE = "if (STORE_DS && wg.y % DS == 0u) {"
GLOBAL_READS = [r"v = qkv\[[^;]*\];", r"v = dout\[[^;]*\];"]
DS_READS = [r"v = vec4\(ds_in\[o\], ds_in\[o \+ 1u\], ds_in\[o \+ 2u\], ds_in\[o \+ 3u\]\);",
            r"v\.([xyzw]) = ds_in\[[^\]]*\];"]
VARIANTS = ("base", "nostore", "nodsread", "noexp", "noglobal", "nobarrier")


def function_span(src: str, name: str) -> tuple[int, int]:
    """(start, end) of the text of WGSL function `name` (its signature to its closing brace)."""
    i = src.index(f"fn {name}(")
    return i, gpu.block_end(src, src.index("{", src.index(")", i)))


def variant(src: str, name: str) -> str:
    """The source of one variant (names joined by + apply in turn)."""
    for part in name.split("+"):
        src = one_variant(src, part)
    return src


def one_variant(src: str, name: str) -> str:
    if name == "base":
        return src
    if name == "nostore":
        if STORE not in src:
            raise ValueError("nostore: the kernel's dS stores are not where this script looks for them")
        return src.replace(STORE, "if (false && STORE_DS) {")
    if name == "nodsread":
        out = src
        out = re.sub(DS_READS[0], "v = vec4(f32(o & 1u));", out)
        out = re.sub(DS_READS[1], r"v.\1 = f32(o & 1u);", out)
        if out == src:
            raise ValueError("nodsread: no dS reads found")
        return out
    if name == "noexp":
        out = re.sub(r"\bexp\(", "(", src)
        if out == src:
            raise ValueError("noexp: no exp found")
        return out
    if name == "noglobal":
        out = src
        for pattern in GLOBAL_READS:
            out = re.sub(pattern, "v = vec4(f32(t & 1u));", out)
        if out == src:
            raise ValueError("noglobal: no global reads found")
        return out
    if name == "nobarrier":
        i, j = function_span(src, "attention_backward_dkv")
        return src[:i] + src[i:j].replace("workgroupBarrier();", "") + src[j:]
    raise ValueError(f"unknown variant {name!r}; choose among {', '.join(VARIANTS)} (joined by +)")


def rel_diff(a, b) -> float:
    scale = max(1.0, float(np.abs(b).max()))
    return float(np.nan_to_num(np.abs(a.astype(np.float64) - b), nan=np.inf).max() / scale)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["32x256x6x64"], help="BxTxNHxhs")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="do not append to bench/results/attention.md")
    args = ap.parse_args()
    dev = wait(gpu.open_device())
    base_src = dev.source(FILE)
    sources = {name: variant(base_src, name) for name in args.variants}   # every rewrite checked before timing
    rows = []
    for size in args.sizes:
        B, T, NH, hs = parse_size(size)
        ref = None
        for name in args.variants:
            dev._sources[FILE] = sources[name]
            dev._kernels.clear()
            t_fwd, t_bwd, out, dqkv, _ = time_ours(dev, B, T, NH, hs, None, args.trials)
            if ref is None:
                ref = (out, dqkv)
            d_out, d_dqkv = rel_diff(out, ref[0]), rel_diff(dqkv, ref[1])
            rows.append(f"| {B}x{T}x{NH}x{hs} | {name} | {t_fwd * 1e3:.3f} | {t_bwd * 1e3:.3f} | "
                        f"{d_out:.1e} / {d_dqkv:.1e} |")
            print(rows[-1], flush=True)
    dev._sources[FILE] = base_src
    dev._kernels.clear()
    text = (f"## Attention kernel variants, {datetime.date.today()}, {device_label(dev)}\n\n"
            f"`python bench/bench_attention_variants.py {' '.join(sys.argv[1:])}`: best of {args.trials}; each "
            "variant's out and dqkv against the first variant's (diagnostics are wrong on purpose).\n\n"
            "| B x T x NH x hs | variant | fwd ms | bwd ms | max rel diff out / dqkv |\n"
            "| --- | --- | ---: | ---: | ---: |\n" + "\n".join(rows) + "\n")
    print(text)
    if not args.no_write:
        append_result("attention", text)


if __name__ == "__main__":
    main()
