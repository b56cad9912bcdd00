"""Source-level variants of matmul_tiled's inner loop, side by side with cuBLAS (experiments for the kernel).

The variants are made from shaders/matmul.wgsl by rewriting the loop over the BK rows of a staged slice:
  base      as written (the driver decides whether to unroll)
  unroll2   two rows per iteration, each in its own block
  unroll4   four rows per iteration
  unrollBK  eight rows per iteration (the whole slice at BK = 8)
  literal   the whole slice as straight-line code, each row's index a literal (needs the tiles' BK): the tile
            flag LITERAL's form (gpu.unroll_loops), for tiles of any shape
  wrap      the next row's reads unconditional (the last row reads row 0 again): no compare and branch
  peel      the last row after the loop, the others reading the next row unconditionally
  fence     FENCE on: the next row's reads placed after the row's first fma and made to depend on it
  rowindex  ROW_STEP off: the next row's tile indices made from the row number kk (the kernel before 2026-12-04)
            instead of stepped by one add per row
  nolean    LEAN off: each slice's global reads worked out from scratch (row, column, bounds, index), as before
            2026-12-04, instead of planned once before the loop over slices
  guarded   (with LEAN off) the next slice's global reads only where there is a next slice (shaders/matmul.wgsl before
            it read them unconditionally: the registers' phi with their old values made the driver copy
            them, waiting for the reads before the products)
  select    the global reads unconditional at a clamped index, zeros chosen by select() (no predicated load)
  a+b       one variant applied to another, e.g. wrap+unroll2, fence+literal
  f16       (needs shader-f16; 8x8 outputs per thread) the tiles in workgroup memory as f16 and each slice's
            products as vec2<f16> fma chains (two FMAs per instruction where the GPU pairs them), added into the
            f32 accumulators after every slice: f16 arithmetic with f32 accumulation across slices. On an H200
            such an fma issues at half the f32 rate (bench_peak.py --f16), and this form was 7-9% slower.
  rowmajor, colmajor, grouped, reverse  (8x8 outputs per thread) the row's 16 outer products in another order
            (shaders/matmul.wgsl: rowmajor; before 2026-12-03: grouped, column group by column group of each row
            half): each accumulator's chain is unchanged (bit-identical results), but NVIDIA's compiler assigns
            registers and schedules by the order it is given (FENCE moved single products by up to 16 points)
  nobarrier diagnostic, wrong results: no workgroupBarrier() in the loop over slices (what the barriers cost)
  midfence  the next row's reads after the row's first 32 fmas, their indices depending on the 32nd (FENCE's trick
            on the middle of the row): with literal, the reads of row r + 1 sit in the second half of row r
  nolds     diagnostic, wrong results: no tile reads inside the loop over a slice's rows (every row multiplies
            the slice's first row again: what the rows' workgroup-memory reads and their indices cost)
  breakif   the loop over rows with its exit test at its end (`loop { ..; continuing { kk++; break if ..; } }`)
            instead of at its top, as naga translates `for` (last in a combination: it removes the `for` line
            that the others find)
  noglobal  diagnostic, wrong results: the slices' global-memory reads replaced by a constant (what they cost)
  frag      (for kernels that read a row's tile values at the top of its iteration) the next row's values
            read before this row's products: software pipelining by hand, which shaders/matmul.wgsl now does
            itself (this variant measured +10% on an H100 and was adopted)
  --file NAME=PATH: a whole other matmul.wgsl (an earlier or experimental version)
Each is timed with the same tiles on the same products; results are checked against NumPy.

    python bench/bench_matmul_variants.py --sizes 4096x4096x4096 nt:8192x768x3072 --variants base unroll2 frag
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

from bench_matmul import parse_size, parse_tiles, time_cublas, time_ours  # noqa: E402
from common import append_result, device_label  # noqa: E402
from tabgpt import gpu  # noqa: E402
from tabgpt.gpu import block_end, wait  # noqa: E402
from tabgpt.ops.matmul import FILE, TILES_LARGE, tiles_label  # noqa: E402

LOOP = "for (var kk = 0u; kk < BK; kk++) {"


def split_loop(src: str) -> tuple[str, str, str]:
    """(text before the kk loop, the loop body, text after it)."""
    i = src.index(LOOP)
    k = block_end(src, i + len(LOOP) - 1)
    return src[:i], src[i + len(LOOP):k - 1], src[k:]


def with_row(body: str, expr: str) -> str:
    return re.sub(r"\bkk\b", f"({expr})", body)


NEXT_ROW = "if (kk + 1u < BK) {"


def next_row_block(body: str) -> tuple[int, int]:
    """Start and end of the block in the loop body that reads the next row's tile values."""
    i = body.index(NEXT_ROW)
    return i, block_end(body, i + len(NEXT_ROW) - 1)


def variant(src: str, name: str, bk: int = 8) -> str:
    """Variant `name` of the kernel source; "a+b" applies a, then b (e.g. wrap+unroll2)."""
    for part in name.split("+"):
        src = one_variant(src, part, bk)
    return src


def f16_variant(src: str) -> str:
    """The f16 form (module docstring): tiles as vec4<f16>, h[4 r + q] (row r of 8, column pair q of 4) as
    vec2<f16> chains over a slice, added into acc[2 r + q / 2] after it. For TM = TN = 8 only."""
    def sub(old, new, count=1):
        nonlocal src
        if src.count(old) < count:
            raise ValueError(f"f16: {old!r} not in the kernel")
        src = src.replace(old, new)
    src = "enable f16;\n" + src
    for t in ("as_tile", "bs_tile"):
        sub(f"var<workgroup> {t}: array<vec4<f32>,", f"var<workgroup> {t}: array<vec4<f16>,")
        sub(f"{t}[o + v] = x;", f"{t}[o + v] = vec4<f16>(x);")
    src = re.sub(r"((?:as|bs)_tile\[r[^\]]*\]\[c\]) = x\.([xyzw]);", r"\1 = f16(x.\2);", src)
    for v in ("f_a_hi", "f_b_hi", "f_b_2", "f_b_3"):
        sub(f"var {v} = vec4(0.0);", f"var {v} = vec4<f16>(0.0);")
    sub("            if (FENCE) { acc[0] = outer4(acc[0], a_lo.x, b_lo); }\n", "")
    i = src.index("            if (!FENCE) { acc[0] = outer4(acc[0], a_lo.x, b_lo); }")
    j = src.index("            if (TN == 16u) {\n                acc[16]")
    rows = ("a_lo.x", "a_lo.y", "a_lo.z", "a_lo.w", "a_hi.x", "a_hi.y", "a_hi.z", "a_hi.w")
    pairs = ("b_lo.xy", "b_lo.zw", "b_hi.xy", "b_hi.zw")
    fmas = "".join(f"            h[{4 * r + q}] = fma(vec2<f16>({a}), {b}, h[{4 * r + q}]);\n"
                   for r, a in enumerate(rows) for q, b in enumerate(pairs))
    src = src[:i] + "            if (TM != 8u || TN != 8u) { return; }\n" + fmas + src[j:]
    # BIAS_ROW's column sums (unused here) read and write the f16 tiles
    sub("bsum += bs_tile[ob + kk * (BN / 4u) + tid % (BN / 4u)];",
        "bsum += vec4<f32>(bs_tile[ob + kk * (BN / 4u) + tid % (BN / 4u)]);")
    sub("bs_tile[tid] = bsum;", "bs_tile[tid] = vec4<f16>(bsum);")
    sub("var s = bs_tile[tid];", "var s = vec4<f32>(bs_tile[tid]);")
    sub("s += bs_tile[g * (BN / 4u) + tid];", "s += vec4<f32>(bs_tile[g * (BN / 4u) + tid]);")
    src = re.sub(r"outer4\((acc\[\d+\]), (a_(?:lo|hi)\.[xyzw]), (b_[23])\)",    # TN = 16 code, unused here
                 r"outer4(\1, f32(\2), vec4<f32>(\3))", src)
    acc = "    var acc: array<vec4<f32>, 32>;\n"
    sub(acc, acc + "    var h: array<vec2<f16>, 32>;\n")
    flush = "".join(f"        acc[{2 * r + q}] += vec4<f32>(vec2<f32>(h[{4 * r + 2 * q}]), "
                    f"vec2<f32>(h[{4 * r + 2 * q + 1}]));\n" for r in range(8) for q in range(2))
    k = src.index("        if (DB) {\n            // Slice i+1 into the other copy")
    return src[:k] + flush + "        h = array<vec2<f16>, 32>();\n" + src[k:]


ORDERS = {   # acc index 2 i + q: row i (0-3: a_lo.xyzw, 4-7: a_hi.xyzw), column group q (0: b_lo, 1: b_hi)
    "rowmajor": [2 * i + q for i in range(8) for q in range(2)],
    "colmajor": [2 * i + q for q in range(2) for i in range(8)],
    "grouped": [2 * i + q for half in (0, 4) for q in range(2) for i in range(half, half + 4)],
}
ORDERS["reverse"] = ORDERS["grouped"][::-1]


def order_variant(src: str, name: str) -> str:
    """The row's outer products of an 8x8-per-thread kernel in ORDERS[name] (FENCE's first one stays first)."""
    i = src.index("            if (!FENCE) { acc[0] = outer4(acc[0], a_lo.x, b_lo); }")
    j = src.index("            if (TN == 16u) {\n                acc[16]")
    calls = []
    for n in ORDERS[name]:
        r, q = divmod(n, 2)
        a = ("a_lo", "a_hi")[r // 4] + "." + "xyzw"[r % 4]
        call = f"acc[{n}] = outer4(acc[{n}], {a}, {('b_lo', 'b_hi')[q]});"
        calls.append(f"            if (!FENCE) {{ {call} }}\n" if n == 0 else f"            {call}\n")
    return src[:i] + "            if (TM != 8u || TN != 8u) { return; }\n" + "".join(calls) + src[j:]


def one_variant(src: str, name: str, bk: int) -> str:
    if name == "base":
        return src
    if name in ORDERS:
        return order_variant(src, name)
    if name == "f16":
        return f16_variant(src)
    if name in ("guarded", "fence", "rowindex", "nolean"):
        if name == "guarded":   # the reads as fetch_a / fetch_b make them (LEAN off), with the guard
            src = one_variant(src, "nolean", bk)
        first = "            pa0 = fetch_a(m0, k1, va.x);"
        old, new = {"guarded": ("        } else if (PREFETCH) {\n" + first,
                                "        } else if (PREFETCH && k1 < k_end) {\n" + first),
                    # The kernel's FENCE form (shaders/matmul.wgsl; the autotuner tries it) for any tiles.
                    "fence": ("override FENCE: bool = false;", "override FENCE: bool = true;"),
                    "rowindex": ("override ROW_STEP: bool = true;", "override ROW_STEP: bool = false;"),
                    "nolean": ("override LEAN: bool = true;", "override LEAN: bool = false;")}[name]
        if old not in src:
            raise ValueError(f"{name}: {old!r} not in the kernel")
        return src.replace(old, new, 1)
    if name == "select":
        for arr, idx, cond in (("a4", "(k * cols + m) / 4u", "k < mp.K && m < cols"),
                               ("a4", "(m * mp.K + k) / 4u", "m < mp.M && k < mp.K"),
                               ("b4", "(n * mp.K + k) / 4u", "n < mp.N && k < mp.K"),
                               ("b4", "(k * mp.N + n) / 4u", "k < mp.K && n < mp.N")):
            old = f"if ({cond}) {{ x = {arr}[{idx}]; }}"
            if old not in src:
                raise ValueError(f"select: {old!r} not in the kernel")
            src = src.replace(old, f"x = select(vec4(0.0), {arr}[min({idx}, arrayLength(&{arr}) - 1u)], {cond});")
        return src
    head, body, tail = split_loop(src)
    if name == "wrap":
        # The next row's reads unconditionally, the last row reading row 0 again (no compare and branch).
        # (the row's indices made from kk: ROW_STEP's stepped indices would run past the slice)
        old = ("                let ra = select(oa + (kk + 1u) * (BM / 4u) + ga_lo, ia, ROW_STEP) + dep;\n"
               "                let rb = select(ob + (kk + 1u) * (BN / 4u) + gb_lo, ib, ROW_STEP) + dep;")
        if old not in src:
            raise ValueError(f"wrap: {old!r} not in the kernel")
        i = src.index(NEXT_ROW)
        rows = ("                let ra = oa + kn * (BM / 4u) + ga_lo + dep;\n"
                "                let rb = ob + kn * (BN / 4u) + gb_lo + dep;")
        return (src[:i] + "{\n                let kn = (kk + 1u) & (BK - 1u);"
                + src[i + len(NEXT_ROW):].replace(old, rows, 1))
    if name == "peel":
        # Rows 0..BK-2 in the loop, each reading the next row unconditionally; the last row after it, no reads.
        i, j = next_row_block(body)
        uncond = body[:i] + "{" + body[i + len(NEXT_ROW):]
        return (head + "for (var kk = 0u; kk + 1u < BK; kk++) {" + uncond + "}\n{"
                + with_row(body[:i] + body[j:], "BK - 1u") + "}" + tail)
    if name == "literal":
        # what the tile flag LITERAL compiles: the loop marked `// #unroll LITERAL BK` written out BK times
        return gpu.unroll_loops(src, {"LITERAL"}, {"BK": bk}, FILE)
    if name == "nobarrier":
        i = src.index("fn matmul_tiled(")
        j = src.index("fn matmul_split_sum(")
        return src[:i] + src[i:j].replace("workgroupBarrier();", "") + src[j:]
    if name == "midfence":
        # The next row's reads after the row's first 32 fmas (a_lo's), their indices depending on the last of them
        # (as FENCE does on the first): in straight-line code (literal) they cannot be hoisted into the row before.
        i, j = next_row_block(body)
        block = body[i:j].replace("select(0u, bitcast<u32>(acc[0].x) & kzero, FENCE)", "bitcast<u32>(acc[7].x) & kzero")
        rest = body[:i] + body[j:]
        anchor = "            if (TN >= 8u) { acc[7] = outer4(acc[7], a_lo.w, b_hi); }\n"
        if anchor not in rest or block == body[i:j]:
            raise ValueError("midfence: the row's anchors are not in the kernel")
        return head + LOOP + rest.replace(anchor, anchor + "            " + block + "\n", 1) + "}" + tail
    if name == "nolds":
        i, j = next_row_block(body)
        return head + LOOP + body[:i] + body[j:] + "}" + tail
    if name == "breakif":
        return head + "{\nvar kk = 0u;\nloop {" + body + "continuing {\nkk++;\nbreak if kk >= BK;\n}\n}\n}" + tail
    if name == "noglobal":
        return (src.replace("x = a4[(k * cols + m) / 4u];", "x = vec4(f32(k & 1u));")
                   .replace("x = a4[(m * mp.K + k) / 4u];", "x = vec4(f32(k & 1u));")
                   .replace("x = b4[(n * mp.K + k) / 4u];", "x = vec4(f32(k & 1u));")
                   .replace("x = b4[(k * mp.N + n) / 4u];", "x = vec4(f32(k & 1u));"))
    if name.startswith("unroll"):
        n = {"unroll2": 2, "unroll4": 4, "unrollBK": 8}[name]
        copies = "".join("{" + with_row(body, f"kq + {r}u") + "}\n" for r in range(n))
        return head + f"for (var kq = 0u; kq < BK; kq += {n}u) {{\n" + copies + "}" + tail
    if name == "frag":
        # Tile values of row kk come from registers loaded during row kk - 1.
        loads = re.findall(r"let (a_lo|b_lo|a_hi|b_hi|b_2|b_3) = ((?:as|bs)_tile\[[^\]]*\]);", body)
        if not loads:
            raise ValueError("frag: the kernel's loop reads no tile values at the top of its rows (done already)")
        names = dict(loads)                               # first load of each name
        body2 = body
        for n_, expr in names.items():
            body2 = re.sub(rf"let {n_} = {re.escape(expr)};", f"let {n_} = f_{n_};", body2)
        pre = "".join(f"var f_{n_} = {with_row(expr, '0u')};\n" for n_, expr in names.items())
        nxt = "".join(f"    f_{n_} = {with_row(expr, 'kk + 1u')};\n" for n_, expr in names.items())
        loop = (pre + LOOP + "\n" + "".join(f"let {n_} = f_{n_};\n" for n_ in names)
                + "if (kk + 1u < BK) {\n" + nxt + "}\n"
                + re.sub(r"let (a_lo|b_lo|a_hi|b_hi|b_2|b_3) = f_\1;", "", body2) + "}")
        return head + loop + tail
    raise ValueError(name)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["4096x4096x4096"])
    ap.add_argument("--variants", nargs="*", default=["base", "unroll2", "unroll4", "unrollBK"])
    ap.add_argument("--file", action="append", default=[], metavar="NAME=PATH",
                    help="also time a whole other matmul.wgsl (e.g. an earlier or experimental version) as NAME")
    ap.add_argument("--tiles", type=parse_tiles, default=None)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    tiles = dict(args.tiles or TILES_LARGE)
    dev = wait(gpu.open_device())
    base = dev.source(FILE)
    rows = []
    for s in args.sizes:
        layout, M, N, K = parse_size(s, "nn")
        cublas = time_cublas(M, N, K, layout, args.trials)
        files = dict(f.split("=", 1) for f in args.file)
        for name in args.variants + list(files):
            dev._sources[FILE] = Path(files[name]).read_text() if name in files else variant(base, name, tiles['BK'])
            dev._kernels.clear()
            sec, err, mm = time_ours(dev, M, N, K, layout, None, tiles, 1, 1 if args.quick else args.trials)
            gf = 2.0 * M * N * K / sec / 1e9
            share = "-" if cublas is None else f"{100 * cublas / sec:.0f}%"
            rows.append(f"| {layout} | {M}x{N}x{K} | {name} | {sec * 1e3:.3f} | {gf:.1f} | {share} | {err:.1e} |")
            print(rows[-1], flush=True)
    dev._sources[FILE] = base
    text = (f"## Inner-loop variants of matmul_tiled, {datetime.date.today()}, {device_label(dev)}\n\n"
            f"`python bench/bench_matmul_variants.py {' '.join(sys.argv[1:])}`: tiles {tiles_label(tiles)}, "
            "no split-K; best of the trials; cuBLAS fp32 (TF32 off) in the same run.\n\n"
            "| layout | M x N x K | variant | ms | GFLOP/s | of cuBLAS | max rel err |\n"
            "| --- | --- | --- | ---: | ---: | ---: | ---: |\n" + "\n".join(rows) + "\n")
    print(text)
    if not args.no_write:
        append_result("matmul", text)


if __name__ == "__main__":
    main()
