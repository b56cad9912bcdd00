"""What the fused epilogues cost: the browser preset's products that carry one, with it and without, in turn.

Each product made as training makes it (c_fc's forward with its bias and GELU: GELU' of the pre-activation and
the activation written at once, "gelu_keep"; mlp c_proj's dinp times that GELU', "mul"; both c_proj forwards with
the residual added), and the GELU pair as a forward-only model makes it, the form training used before (c_fc
writing the pre-activation, "gelu"; the dinp making GELU' of it, "gelu_grad"), each autotuned with its epilogue,
then timed in rounds in four forms with those same tiles and split-K count:
  epilogue   as training runs it
  none       the same product without the epilogue (no aux read or written)
  free       the epilogue's memory traffic kept, its arithmetic left out (GELU and GELU' the identity: a diagnostic,
             wrong results; the residual and the multiply have no arithmetic to leave out)
  autotuned  the product without the epilogue, autotuned on its own (what it costs alone)
each keeping its best round. So the gap epilogue - none splits into its arithmetic (epilogue - free) and its
memory traffic (free - none).

    python bench/probe_epilogues.py
    python bench/probe_epilogues.py --quick       # tiny shapes (lavapipe): checks that it runs
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "pkg"))

from tabgpt import gpu  # noqa: E402
from tabgpt.gpu import wait  # noqa: E402
from tabgpt.ops.matmul import FILE, Matmul, tiles_label  # noqa: E402

from common import device_label, probe_args, probe_parser, time_in_turn  # noqa: E402  (bench/)
from probe_pair_sum import QUICK_FIXED as PAIR_FIXED  # noqa: E402

# name: (layout, M, N, K, bias, epilogue), the browser preset's (B*T = 8192, C = 384)
PRODUCTS = {"c_fc forward": ("nn", 8192, 1536, 384, True, "gelu_keep"),
            "c_fc forward (gelu)": ("nn", 8192, 1536, 384, True, "gelu"),
            "mlp c_proj dinp": ("nt", 8192, 1536, 384, False, "mul"),
            "mlp c_proj dinp (gelu_grad)": ("nt", 8192, 1536, 384, False, "gelu_grad"),
            "mlp c_proj forward": ("nn", 8192, 384, 1536, True, "residual"),
            "attn c_proj forward": ("nn", 8192, 384, 384, True, "residual")}
QUICK_PRODUCTS = {"small gelu": ("nn", 40, 24, 12, True, "gelu"), "small gelu_grad": ("nt", 40, 24, 12, False,
                                                                                       "gelu_grad"),
                  "small gelu_keep": ("nn", 40, 24, 12, True, "gelu_keep"), "small mul": ("nt", 40, 24, 12, False,
                                                                                         "mul")}
QUICK_FIXED = dict(PAIR_FIXED, splits=1)   # --quick: no autotune (probe_pair_sum's tiles)
FREE = [(r"fn mm_gelu\(x: vec4<f32>\) -> vec4<f32> \{", "fn mm_gelu(x: vec4<f32>) -> vec4<f32> {\n    return x;"),
        (r"fn mm_gelu_grad\(x: vec4<f32>\) -> vec4<f32> \{",
         "fn mm_gelu_grad(x: vec4<f32>) -> vec4<f32> {\n    return x;"),
        (r"fn mm_gelu_keep\(x: vec4<f32>\) -> GeluKeep \{",
         "fn mm_gelu_keep(x: vec4<f32>) -> GeluKeep {\n    return GeluKeep(x, x);")]


def free_source(src: str) -> str:
    """matmul.wgsl with GELU and GELU' returning their argument first thing (the rest of each body unreached)."""
    for pattern, repl in FREE:
        src, n = re.subn(pattern, repl, src)
        if n != 1:
            raise ValueError(f"probe_epilogues: {pattern!r} is not in {FILE} once")
    return src


def main():
    args = probe_args(probe_parser(__doc__, rounds=5))
    products = QUICK_PRODUCTS if args.quick else PRODUCTS
    fixed = QUICK_FIXED if args.quick else {}
    dev = wait(gpu.open_device())
    rng = np.random.default_rng(0)
    base_src = dev.source(FILE)
    arms = {}
    for name, (layout, M, N, K, bias, epilogue) in products.items():
        a = dev.buffer(4 * M * K, "a", rng.standard_normal(M * K, np.float32))
        b = dev.buffer(4 * K * N, "b", rng.standard_normal(K * N, np.float32))
        out = dev.buffer(4 * M * N, "out")
        aux = dev.buffer(4 * M * N, "aux", rng.standard_normal(M * N, np.float32))
        bias_buf = dev.buffer(4 * N, "bias", rng.standard_normal(N, np.float32)) if bias else None
        first = wait(Matmul.create(dev, M, N, K, layout, bias=bias, epilogue=epilogue, **fixed))
        same = dict(tiles=first.tiles, splits=first.splits)
        for form in ("epilogue", "none", "free", "autotuned"):
            if form == "epilogue":
                mm = first
            elif form == "free":
                if epilogue in ("residual", "mul"):
                    continue
                dev._sources[FILE] = free_source(base_src)   # its kernels compiled from the free source, then
                dev._kernels.clear()                         # the device's own source and cache back
                mm = wait(Matmul.create(dev, M, N, K, layout, bias=bias, epilogue=epilogue, **same))
                dev._sources[FILE] = base_src
                dev._kernels.clear()
            else:
                mm = wait(Matmul.create(dev, M, N, K, layout, bias=bias,
                                        **(fixed if form == "autotuned" else same)))
            seq = dev.sequence(f"{name} {form}")
            mm.dispatch(seq, out=out, a=a, b=b, **({"bias": bias_buf} if bias else {}),
                        **({"aux": aux} if mm.epilogue else {}))
            wait(seq.build())
            arms[name, form] = (seq, f"{tiles_label(mm.tiles)}, {mm.splits}", [])
    time_in_turn(dev, ((seq, times) for seq, _, times in arms.values()), args)
    print(f"## The fused epilogues' cost, {device_label(dev)}, best of {args.rounds} rounds\n")
    print("| product | form | tiles, split-K | ms | against none |")
    print("| --- | --- | --- | ---: | ---: |")
    for (name, form), (_, label, times) in arms.items():
        ratio = min(times) / min(arms[name, "none"][2])
        print(f"| {name} | {form} | {label} | {min(times) * 1e3:.4f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
