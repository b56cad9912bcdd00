"""Matrix products (shaders/matmul.wgsl, tabgpt.ops.matmul) natively against float64 NumPy.

Every layout (nn, nt, tn) with both kernels (tiled and simple) and several tile shapes, on awkward sizes
(M = B*T = 111, C = 72, 3C = 216, Vp = 1024); bias and no bias; accumulation (+= twice gives twice); products
split into row chunks; the Conv1D and lm_head forward and backward against tests/reference.py; bit-identical
results run to run, and between the PREFETCH kernel and its DOUBLE_BUFFER variant. Tolerance: |got - ref| <= RTOL *
(|A| @ |B| + |bias|) elementwise, a bound that scales with the length and size of each dot product (f32 rounding of
K terms is about sqrt(K) * 6e-8 of it).
"""

import gc
import json
import re

import numpy as np
import pytest

import reference
from tabgpt.gpu import DEFAULT_LIMITS, GPUError, is_cpu_adapter, wait
from tabgpt.ops.matmul import (TILES_CPU, TILES_LARGE, TILES_MEDIUM, TILES_CPU_BROWSER, TUNE_TILES, BiasGrad, Conv1D,
                               LMHead, Matmul, MatmulPair, check_tiles, cpu_tiles, default_splits, default_tiles)

RTOL = 1e-5
B, T, C, Vp = 3, 37, 72, 1024
M = B * T  # 111 rows
TILE_SHAPES = {
    "cpu": TILES_CPU,                                            # 64x64x16, 8x8 per thread (lavapipe)
    "cpu-browser": TILES_CPU_BROWSER,                            # 64x64x8, 8x8 per thread
    "medium": TILES_MEDIUM,                                      # 64x64x8, 4x4, prefetch
    "large": TILES_LARGE,                                        # 128x128x8, 8x8, 256 threads, spread, prefetch, double
    "uneven": {"BM": 16, "BN": 64, "BK": 12, "TM": 8, "TN": 4},  # BK not a power of 2, BM != BN, TM != TN
}
# (M, N, K) of op(A) (M, K) @ op(B) (K, N) per layout, as the model uses them.
SHAPES = {"nn": (M, 3 * C, C),          # c_attn forward
          "nt": (M, C, 4 * C),          # mlp c_proj dinp = dout (M, C) @ W (4C, C)^T
          "tn": (C, 4 * C, M)}          # c_fc dW (C, 4C) += inp^T @ dout, reduced over the 111 rows


def upload(dev, a, label="x"):
    a = np.ascontiguousarray(a, dtype=np.float32)
    return dev.buffer(a.nbytes, label, a)


def download(dev, buf, shape):
    return np.frombuffer(wait(dev.read(buf)), dtype=np.float32)[:int(np.prod(shape))].reshape(shape)


def run(dev, append, times=1):
    seq = dev.sequence("test")
    append(seq)
    wait(seq.build())
    for _ in range(times):
        seq.run()
    wait(dev.sync())


def operands(layout, M, N, K, seed):
    """A and B as stored for the layout, and op(A), op(B) in float64."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((K, M) if layout == "tn" else (M, K)).astype(np.float32)
    b = rng.standard_normal((N, K) if layout == "nt" else (K, N)).astype(np.float32)
    a64 = a.astype(np.float64).T if layout == "tn" else a.astype(np.float64)
    b64 = b.astype(np.float64).T if layout == "nt" else b.astype(np.float64)
    return a, b, a64, b64


def assert_product(name, got, ref, scale):
    """|got - ref| <= RTOL * scale elementwise; on failure say where and by how much."""
    got = np.asarray(got, np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != reference {ref.shape}"
    excess = np.abs(got - ref) / (RTOL * scale + 1e-30)
    if not (excess <= 1).all():
        i = np.unravel_index(np.argmax(excess), excess.shape)
        raise AssertionError(f"{name}: {(excess > 1).sum()} of {excess.size} entries off by more than RTOL={RTOL} "
                             f"of |A|@|B|; worst at {i}: got {got[i]!r}, reference {ref[i]!r}, "
                             f"{excess[i]:.2f}x the tolerance; max abs diff {np.abs(got - ref).max():.3g}")


def product(dev, layout, M, N, K, seed, bias=False, accumulate=False, variant=None, tiles=None, init=None,
            times=1, splits=None, max_binding=None):
    """Run out [+]= op(a) @ op(b) [+ bias] on the GPU `times` times; return (got, reference, error scale)."""
    a, b, a64, b64 = operands(layout, M, N, K, seed)
    rng = np.random.default_rng(seed + 1)
    bv = rng.standard_normal(N).astype(np.float32) if bias else None
    init = np.zeros((M, N), np.float32) if init is None else init
    mm = wait(Matmul.create(dev, M, N, K, layout, bias=bias, accumulate=accumulate, variant=variant, tiles=tiles,
                            splits=splits, max_binding=max_binding))
    out = upload(dev, init, "out")
    ba, bb = upload(dev, a, "a"), upload(dev, b, "b")
    bbias = upload(dev, bv, "bias") if bias else None
    run(dev, lambda seq: mm.dispatch(seq, out=out, a=ba, b=bb, bias=bbias), times)
    once = a64 @ b64 + (bv.astype(np.float64) if bias else 0.0)
    ref = init + times * once if accumulate else once
    scale = times * (np.abs(a64) @ np.abs(b64) + (np.abs(bv) if bias else 0.0)) + np.abs(init)
    return download(dev, out, (M, N)), ref, scale, mm


# ---------------------------------------------------------------------------------------------
# The product itself

@pytest.mark.parametrize("layout", ["nn", "nt", "tn"])
@pytest.mark.parametrize("variant", ["simple", "tiled"])
def test_product_matches_numpy_for_each_layout_and_kernel(dev, layout, variant):
    Mm, N, K = SHAPES[layout]
    got, ref, scale, mm = product(dev, layout, Mm, N, K, seed=1, variant=variant)
    assert mm.variant == variant
    assert_product(f"{layout} {variant} {Mm}x{N}x{K}", got, ref, scale)


@pytest.mark.parametrize("tiles", list(TILE_SHAPES), ids=list(TILE_SHAPES))
@pytest.mark.parametrize("layout", ["nn", "nt", "tn"])
def test_tiled_product_is_right_for_every_tile_shape(dev, layout, tiles):
    # Sizes that are no multiple of any tile edge: partial tiles at every border, including along K.
    Mm, N, K = {"nn": (37, 20, 44), "nt": (37, 20, 44), "tn": (20, 44, 37)}[layout]
    got, ref, scale, _ = product(dev, layout, Mm, N, K, seed=2, variant="tiled", tiles=TILE_SHAPES[tiles])
    assert_product(f"{layout} tiled {tiles} {Mm}x{N}x{K}", got, ref, scale)


@pytest.mark.parametrize("flags", [{"SPREAD": True}, {"PREFETCH": True}, {"SPREAD": True, "PREFETCH": True}],
                         ids=["spread", "prefetch", "spread+prefetch"])
@pytest.mark.parametrize("tiles", list(TILE_SHAPES), ids=list(TILE_SHAPES))
@pytest.mark.parametrize("layout", ["nn", "nt", "tn"])
def test_tiled_product_is_right_with_spread_threads_and_prefetch(dev, layout, tiles, flags):
    # Spread thread groups and register prefetch of the next K slice, on partial tiles everywhere; K spans
    # several slices (so the prefetch crosses slices) and ends in a partial one. "uneven" here has 64 threads
    # (TM = 4) for 48 vec4s of A and 192 of B: some threads prefetch nothing of A, each 3 vec4s of B.
    Mm, N, K = {"nn": (37, 20, 44), "nt": (37, 20, 44), "tn": (20, 44, 37)}[layout]
    t = dict(TILE_SHAPES[tiles], **flags)
    if tiles == "uneven":
        t["TM"] = 4
    got, ref, scale, mm = product(dev, layout, Mm, N, K, seed=16, variant="tiled", tiles=t, bias=layout == "nn")
    assert mm.tiles == t
    assert_product(f"{layout} tiled {t} {Mm}x{N}x{K}", got, ref, scale)


@pytest.mark.parametrize("layout,accumulate", [("nt", False), ("tn", True)])
def test_prefetch_with_split_k_matches(dev, layout, accumulate):
    # Each split-K slice starts its own prefetch at k_begin and stops at its own end.
    Mm, N, K = SHAPES[layout]
    init = np.random.default_rng(17).standard_normal((Mm, N)).astype(np.float32)
    t = dict(TILES_LARGE, SPREAD=True, PREFETCH=True)
    got, ref, scale, mm = product(dev, layout, Mm, N, K, seed=17, accumulate=accumulate, init=init,
                                  variant="tiled", tiles=t, splits=3, times=2)
    assert mm.splits == 3
    assert_product(f"{layout} spread+prefetch split-K x3", got, ref, scale)


# DOUBLE_BUFFER (with PREFETCH): two copies of the workgroup tiles, one barrier per K slice. Tiles whose doubled
# workgroup memory, 8*BK*(BM+BN) bytes, fits the fixture device's 16384.
DB_TILES = {
    "64x64x8/8x8": {"BM": 64, "BN": 64, "BK": 8, "TM": 8, "TN": 8},               # 8 KiB doubled, 64 threads
    "64x64x8/4x4": {"BM": 64, "BN": 64, "BK": 8, "TM": 4, "TN": 4},               # 256 threads, 1 vec4 each
    "32x32x8/4x4": {"BM": 32, "BN": 32, "BK": 8, "TM": 4, "TN": 4},
    "128x128x8/8x8": {"BM": 128, "BN": 128, "BK": 8, "TM": 8, "TN": 8},           # exactly 16 KiB doubled
    "128x96x8/8x8": {"BM": 128, "BN": 96, "BK": 8, "TM": 8, "TN": 8},             # 192 threads, 2 vec4s of A each
    "96x128x8/8x8": {"BM": 96, "BN": 128, "BK": 8, "TM": 8, "TN": 8},             # 2 vec4s of B, the last partial
    "uneven": {"BM": 16, "BN": 64, "BK": 12, "TM": 4, "TN": 4},                   # 0-1 vec4 of A, 3 of B per thread
}
# (M, N, K) per layout, no multiple of any tile edge; K = 100 and 93 make 13 and 12 slices of BK = 8 (an odd and
# an even count: the last slice is multiplied from either copy) and 9 and 8 of BK = 12.
DB_SHAPES = {"nn": (37, 20, 100), "nt": (45, 36, 100), "tn": (20, 44, 93)}


@pytest.mark.parametrize("splits", [1, 3], ids=["whole-K", "split-K"])
@pytest.mark.parametrize("spread", [False, True], ids=["adjacent", "spread"])
@pytest.mark.parametrize("tiles", list(DB_TILES), ids=list(DB_TILES))
@pytest.mark.parametrize("layout", ["nn", "nt", "tn"])
def test_double_buffer_product_matches_numpy(dev, layout, tiles, spread, splits):
    # Partial tiles at every border and along K; bias on nn, accumulation (twice, into random values) on tn;
    # split-K slices that each start their own double buffering at k_begin.
    Mm, N, K = DB_SHAPES[layout]
    t = dict(DB_TILES[tiles], PREFETCH=True, DOUBLE_BUFFER=True, SPREAD=spread)
    accumulate = layout == "tn"
    init = np.random.default_rng(18).standard_normal((Mm, N)).astype(np.float32) if accumulate else None
    got, ref, scale, mm = product(dev, layout, Mm, N, K, seed=18, bias=layout == "nn", accumulate=accumulate,
                                  init=init, times=2 if accumulate else 1, variant="tiled", tiles=t, splits=splits)
    assert mm.tiles == t and mm.splits == splits
    assert_product(f"{layout} tiled {t} x{splits} {Mm}x{N}x{K}", got, ref, scale)


LOOP_TILES = {     # DB_TILES' shapes and two with 16 columns per thread, each with SPREAD as given
    **{name: dict(DB_TILES[name], SPREAD=True) for name in ("64x64x8/8x8", "128x96x8/8x8", "uneven")},
    "64x64x8/4x4": dict(DB_TILES["64x64x8/4x4"], SPREAD=False),
    "32x128x4/4x16": {"BM": 32, "BN": 128, "BK": 4, "TM": 4, "TN": 16, "SPREAD": False},
    "64x128x8/8x16": {"BM": 64, "BN": 128, "BK": 8, "TM": 8, "TN": 16, "SPREAD": True},
}


@pytest.mark.parametrize("splits", [1, 3], ids=["whole-K", "split-K"])
@pytest.mark.parametrize("tiles", list(LOOP_TILES))
@pytest.mark.parametrize("double", [False, True], ids=["prefetch", "double"])
@pytest.mark.parametrize("layout,bias,accumulate", [("nn", True, False), ("nt", False, False), ("tn", False, True)])
def test_loop_forms_are_bit_identical(dev, layout, bias, accumulate, double, tiles, splits):
    # FENCE only orders the next row's tile reads after the row's first fma (through an always-zero term in their
    # addresses); ROW_STEP off makes the next row's tile indices from the row number instead of stepping them:
    # the same fmas in the same order either way, so the same bits, and NumPy's result within tolerance.
    Mm, N, K = DB_SHAPES[layout]
    init = np.random.default_rng(45).standard_normal((Mm, N)).astype(np.float32)
    results = {}
    for fence, step in ((False, True), (True, True), (False, False), (True, False)):
        t = dict(LOOP_TILES[tiles], PREFETCH=True, DOUBLE_BUFFER=double, FENCE=fence, ROW_STEP=step)
        got, ref, scale, mm = product(dev, layout, Mm, N, K, seed=45, bias=bias, accumulate=accumulate, init=init,
                                      variant="tiled", tiles=t, splits=splits)
        assert mm.tiles == t
        assert_product(f"{layout} {t} x{splits}", got, ref, scale)
        results[fence, step] = got
    for form, got in results.items():
        differ = got.view(np.uint32) != results[False, True].view(np.uint32)
        assert not differ.any(), f"{layout} {tiles} x{splits}: {differ.sum()} differ with FENCE, ROW_STEP {form}"


@pytest.mark.parametrize("splits", [1, 3], ids=["whole-K", "split-K"])
@pytest.mark.parametrize("tiles", ["64x64x8/8x8", "32x32x8/4x4", "uneven"])
@pytest.mark.parametrize("layout,bias,accumulate", [("nn", True, False), ("nt", False, False), ("tn", False, True),
                                                    ("tn", True, True)])
def test_double_buffer_is_bit_identical_to_prefetch(dev, layout, bias, accumulate, tiles, splits):
    # The same fma chains in the same order: only where the tiles live and when the barriers come differ.
    Mm, N, K = DB_SHAPES[layout]
    init = np.random.default_rng(19).standard_normal((Mm, N)).astype(np.float32)
    results = []
    for double in (False, True):
        t = dict(DB_TILES[tiles], SPREAD=True, PREFETCH=True, DOUBLE_BUFFER=double)
        got, ref, scale, _ = product(dev, layout, Mm, N, K, seed=19, bias=bias, accumulate=accumulate, init=init,
                                     variant="tiled", tiles=t, splits=splits)
        assert_product(f"{layout} {t} x{splits}", got, ref, scale)
        results.append(got)
    differ = results[0].view(np.uint32) != results[1].view(np.uint32)
    assert not differ.any(), f"{layout} {tiles} x{splits}: {differ.sum()} entries differ with DOUBLE_BUFFER"


class FakeDevice:
    def __init__(self, **limits):
        self.limits = dict(DEFAULT_LIMITS, **limits)


def test_double_buffer_tiles_are_checked(dev):
    with pytest.raises(GPUError, match="DOUBLE_BUFFER needs PREFETCH"):
        check_tiles(dev, dict(TILES_CPU, DOUBLE_BUFFER=True))
    # 128 x 128 x 16: 16 KiB of tiles fit the default limits once, not twice; 128 x 128 x 8 twice.
    big = dict(TILES_LARGE, BK=16)
    check_tiles(dev, dict(big, DOUBLE_BUFFER=False))
    check_tiles(dev, dict(big, BK=8))
    with pytest.raises(GPUError, match="32768 bytes of workgroup memory"):
        wait(Matmul.create(dev, 64, 64, 64, tiles=big))
    check_tiles(FakeDevice(**{"max-compute-workgroup-storage-size": 32768}), big)
    for t in DB_TILES.values():
        check_tiles(dev, dict(t, PREFETCH=True, DOUBLE_BUFFER=True))
        check_tiles(dev, dict(t, DOUBLE_BUFFER=False))


def test_tiled_and_simple_kernels_agree(dev):
    Mm, N, K = SHAPES["nt"]
    got_t, ref, scale, _ = product(dev, "nt", Mm, N, K, seed=3, variant="tiled")
    got_s, _, _, _ = product(dev, "nt", Mm, N, K, seed=3, variant="simple")
    assert_product("tiled vs simple", got_t, got_s.astype(np.float64), scale)


@pytest.mark.parametrize("layout", ["nn", "nt", "tn"])
def test_simple_kernel_handles_sizes_that_are_no_multiple_of_4(dev, layout):
    got, ref, scale, mm = product(dev, layout, 37, 45, 53, seed=4, bias=True)
    assert mm.variant == "simple", "unaligned rows must fall back to the simple kernel"
    assert_product(f"{layout} 37x45x53 with bias", got, ref, scale)


@pytest.mark.parametrize("variant", ["simple", "tiled"])
def test_bias_is_added_to_every_row(dev, variant):
    got, ref, scale, _ = product(dev, "nn", M, 4 * C, C, seed=5, bias=True, variant=variant)
    assert_product(f"nn {variant} with bias", got, ref, scale)


@pytest.mark.parametrize("variant", ["simple", "tiled"])
def test_accumulate_adds_into_out_so_two_runs_give_twice(dev, variant):
    Mm, N, K = SHAPES["tn"]
    init = np.random.default_rng(6).standard_normal((Mm, N)).astype(np.float32)
    got, ref, scale, _ = product(dev, "tn", Mm, N, K, seed=6, accumulate=True, variant=variant, init=init, times=2)
    assert_product(f"tn {variant}: init + 2 * product", got, ref, scale)


def test_without_accumulate_out_is_overwritten(dev):
    init = np.full((M, 3 * C), 1e3, np.float32)   # stale values that must vanish
    got, ref, scale, _ = product(dev, "nn", M, 3 * C, C, seed=7, init=init, times=2)
    assert_product("nn written twice", got, ref, scale)


@pytest.mark.parametrize("layout,accumulate", [("nn", False), ("nt", False), ("tn", False), ("tn", True)])
def test_products_split_into_row_chunks_match(dev, layout, accumulate):
    # A binding limit of a few rows forces several dispatches: out rows for nn/nt, the reduction for tn
    # (the first chunk writes or adds as asked, the rest add).
    Mm, N, K = (40, 64, 300) if layout == "tn" else (300, 40, 64)
    init = np.random.default_rng(8).standard_normal((Mm, N)).astype(np.float32)
    got, ref, scale, mm = product(dev, layout, Mm, N, K, seed=8, bias=layout == "nn", accumulate=accumulate,
                                  init=init, max_binding=64 * 4 * 64)
    assert len(mm.chunks) == 5, [c[:2] for c in mm.chunks]
    assert_product(f"{layout} in {len(mm.chunks)} chunks, accumulate={accumulate}", got, ref, scale)


@pytest.mark.parametrize("layout,bias,accumulate", [("nn", True, False), ("nt", False, False), ("tn", False, True),
                                                    ("tn", True, False)])
def test_split_k_slices_summed_in_order_match(dev, layout, bias, accumulate):
    # K = 72, 288 and 111 in 3 slices of a multiple of BK (8 or 16; the last one shorter); bias and accumulation
    # happen once, in the sum of the slices.
    Mm, N, K = SHAPES[layout]
    init = np.random.default_rng(14).standard_normal((Mm, N)).astype(np.float32)
    got, ref, scale, mm = product(dev, layout, Mm, N, K, seed=14, bias=bias, accumulate=accumulate, init=init,
                                  variant="tiled", splits=3, times=2)
    assert mm.splits == 3 and mm.chunks[0][3][2] == 3, (mm.splits, mm.chunks[0][3])
    assert_product(f"{layout} split-K x3, bias={bias}, accumulate={accumulate}", got, ref, scale)


@pytest.mark.parametrize("M,N", [(690, 200), (1100, 68), (64, 900)])
def test_every_block_is_made_once_in_the_grouped_order(dev, M, N):
    # GROUP = 8: workgroups take blocks down groups of 8 block rows, column by column; 11 and 18 block rows leave
    # a last group of 3 and 2 rows (partial blocks at the edges); one block row is a group of one. A block never
    # made stays zero in out, far from the reference.
    got, ref, scale, mm = product(dev, "nn", M, N, 24, seed=16, variant="tiled", tiles=TILES_MEDIUM, splits=1)
    assert_product(f"nn {M}x{N}x24 in the grouped order", got, ref, scale)


@pytest.mark.parametrize("n_slices", [2, 8, 9, 13, 29])
def test_split_k_sum_adds_the_slabs_in_slice_order_to_the_bit(dev, n_slices):
    # The second pass loads eight slabs a step and adds them in order, skipping those past the last slice: its sum
    # must be the float32 sum slab 0 + slab 1 + ... of the slices' own products, each made here as a product of
    # its K-slice alone (same kernel and tiles, one slice: the same fma chain).
    M, N, bk = 20, 36, TILES_MEDIUM["BK"]
    K = n_slices * bk
    rng = np.random.default_rng(n_slices)
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)

    def tiled(a, b, splits):
        mm = wait(Matmul.create(dev, M, N, a.shape[1], "nn", variant="tiled", tiles=TILES_MEDIUM, splits=splits))
        out = upload(dev, np.zeros((M, N), np.float32), "out")
        ba, bb = upload(dev, a, "a"), upload(dev, b, "b")
        run(dev, lambda seq: mm.dispatch(seq, out=out, a=ba, b=bb))
        return download(dev, out, (M, N)), mm

    got, mm = tiled(a, b, n_slices)
    assert mm.splits == n_slices and mm.chunks[0][3][2] == n_slices
    want = np.zeros((M, N), np.float32)
    for z in range(n_slices):
        ks = slice(z * bk, (z + 1) * bk)
        slab = tiled(np.ascontiguousarray(a[:, ks]), np.ascontiguousarray(b[ks]), 1)[0]
        want = slab if z == 0 else want + slab
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), np.abs(got - want).max()


def test_split_k_with_row_chunks_matches(dev):
    init = np.random.default_rng(15).standard_normal((20, 64)).astype(np.float32)
    got, ref, scale, mm = product(dev, "tn", 20, 64, 300, seed=15, bias=True, init=init, variant="tiled", splits=2,
                                  max_binding=64 * 4 * 64)
    assert len(mm.chunks) == 5 and mm.splits == 2
    assert_product("tn in 5 chunks of 2 slices, with bias", got, ref, scale)


class FakeAdapter:
    def __init__(self, **info):
        self.info = info
        self.backend = "webgpu-browser" if info.get("is_fallback_adapter") else "wgpu-native"


def test_default_split_k_fills_a_gpu_but_not_a_cpu():
    gpu = FakeAdapter(vendor="NVIDIA", device="NVIDIA H100 80GB HBM3", adapter_type="DiscreteGPU")
    cpu = FakeAdapter(vendor="llvmpipe", device="llvmpipe (LLVM 15.0.6, 256 bits)", adapter_type="CPU")
    browser_cpu = FakeAdapter(vendor="google", architecture="swiftshader", is_fallback_adapter=True)
    assert default_splits(cpu, 36, 8192) == 1                   # CPU adapters: no gain from more workgroups
    assert default_splits(browser_cpu, 36, 8192) == 1
    assert default_splits(gpu, 144, 8192) == 7                  # C x 4C weight gradient at B*T = 8192, C = 768
    assert default_splits(gpu, 1152, 768) == 1                  # enough workgroups already
    # CPU drivers: 16-deep slices of K between barriers natively, 8 in a browser (where deeper ones built slowly)
    native_ss = FakeAdapter(vendor="Google", device="SwiftShader Device (Subzero)", adapter_type="CPU")
    assert [is_cpu_adapter(a) for a in (gpu, cpu, browser_cpu, native_ss)] == [False, True, True, True]
    assert is_cpu_adapter(FakeAdapter(vendor="mesa", description="llvmpipe (LLVM 19)"))   # by name alone
    assert default_tiles(cpu, 8192, 768, 768) == default_tiles(native_ss, 64, 64) == TILES_CPU
    assert default_tiles(browser_cpu, 8192, 768, 768) == TILES_CPU_BROWSER
    assert (TILES_CPU["BK"], TILES_CPU_BROWSER["BK"]) == (16, 8)
    assert default_splits(gpu, 4, 600) == 2                     # slices of at least 256


@pytest.mark.parametrize("variant,splits", [("tiled", 1), ("tiled", 3), ("simple", 1)])
def test_product_is_bit_identical_run_to_run(dev, variant, splits):
    first, _, _, _ = product(dev, "tn", C, 4 * C, M, seed=9, variant=variant, splits=splits)
    again, _, _, _ = product(dev, "tn", C, 4 * C, M, seed=9, variant=variant, splits=splits)
    assert np.array_equal(first.view(np.uint32), again.view(np.uint32)), f"{variant} x{splits}: runs differ"


# ---------------------------------------------------------------------------------------------
# The bias gradient

@pytest.mark.parametrize("rows,max_binding", [(M, None), (300, 128 * 4 * 72)])
def test_bias_grad_accumulates_column_sums_deterministically(dev, rows, max_binding):
    rng = np.random.default_rng(10)
    dout = rng.standard_normal((rows, C)).astype(np.float32)
    init = rng.standard_normal(C).astype(np.float32)
    bg = wait(BiasGrad.create(dev, rows, C, max_binding=max_binding))
    assert len(bg.chunks) == (1 if max_binding is None else 3)
    results = []
    for _ in range(2):
        db = upload(dev, init, "dbias")
        bdout = upload(dev, dout, "dout")
        run(dev, lambda seq: bg.dispatch(seq, dbias=db, dout=bdout), times=2)
        results.append(download(dev, db, (C,)))
    ref = init + 2 * dout.astype(np.float64).sum(axis=0)
    scale = np.abs(init) + 2 * np.abs(dout).astype(np.float64).sum(axis=0)
    assert_product(f"dbias += 2 column sums of ({rows}, {C})", results[0], ref, scale)
    assert np.array_equal(results[0].view(np.uint32), results[1].view(np.uint32)), "bias grad runs differ"


def test_bias_grad_refuses_a_too_small_dout(dev):
    bg = wait(BiasGrad.create(dev, 10, C))
    small = dev.buffer(4 * 10 * C - 4, "dout")
    with pytest.raises(GPUError, match=rf"bias grad: dout binds {4 * 10 * C - 4} bytes, needs \(10, {C}\) f32"):
        bg.dispatch(dev.sequence("t"), dbias=dev.buffer(4 * C, "dbias"), dout=small)


# ---------------------------------------------------------------------------------------------
# The model's layers against tests/reference.py

def test_conv1d_forward_and_backward_match_reference(dev):
    K, N = C, 3 * C
    rng = np.random.default_rng(11)
    inp = rng.standard_normal((M, K)).astype(np.float32)
    w = (0.1 * rng.standard_normal((K, N))).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    dout = rng.standard_normal((M, N)).astype(np.float32)
    dw0 = rng.standard_normal((K, N)).astype(np.float32)    # gradients already holding values: += must add
    db0 = rng.standard_normal(N).astype(np.float32)
    fc = wait(Conv1D.create(dev, M, K, N))
    b = {k: upload(dev, v, k) for k, v in dict(inp=inp, w=w, bias=bias, dout=dout, dw=dw0, db=db0).items()}
    b["out"] = dev.buffer(4 * M * N, "out")
    b["dinp"] = upload(dev, np.full((M, K), 7.0, np.float32), "dinp")   # stale: dinp is written, not added
    run(dev, lambda seq: (fc.forward(seq, out=b["out"], inp=b["inp"], weight=b["w"], bias=b["bias"]),
                          fc.backward(seq, dinp=b["dinp"], dweight=b["dw"], dbias=b["db"], dout=b["dout"],
                                      inp=b["inp"], weight=b["w"])))
    out_ref = reference.matmul_forward(inp, w, bias)
    dinp_ref, dw_ref, db_ref = reference.matmul_backward(dout, inp, w)
    x, wa, d = np.abs(inp.astype(np.float64)), np.abs(w.astype(np.float64)), np.abs(dout.astype(np.float64))
    assert_product("out", download(dev, b["out"], (M, N)), out_ref.astype(np.float64), x @ wa + np.abs(bias))
    assert_product("dinp", download(dev, b["dinp"], (M, K)), dinp_ref.astype(np.float64), d @ wa.T)
    assert_product("dweight", download(dev, b["dw"], (K, N)), dw0 + dw_ref.astype(np.float64), x.T @ d + np.abs(dw0))
    assert_product("dbias", download(dev, b["db"], (N,)), db0 + db_ref.astype(np.float64), d.sum(0) + np.abs(db0))


def test_conv1d_without_bias(dev):
    rng = np.random.default_rng(12)
    inp = rng.standard_normal((M, C)).astype(np.float32)
    w = rng.standard_normal((C, C)).astype(np.float32)
    fc = wait(Conv1D.create(dev, M, C, C, bias=False))
    out = dev.buffer(4 * M * C, "out")
    run(dev, lambda seq: fc.forward(seq, out=out, inp=upload(dev, inp), weight=upload(dev, w)))
    x, wa = np.abs(inp.astype(np.float64)), np.abs(w.astype(np.float64))
    assert_product("out", download(dev, out, (M, C)), reference.matmul_forward(inp, w).astype(np.float64), x @ wa)


def test_lm_head_forward_and_backward_match_reference(dev):
    rng = np.random.default_rng(13)
    x = rng.standard_normal((M, C)).astype(np.float32)
    wte = (0.1 * rng.standard_normal((Vp, C))).astype(np.float32)
    dlogits = (rng.standard_normal((M, Vp)) / Vp).astype(np.float32)
    dwte0 = rng.standard_normal((Vp, C)).astype(np.float32)
    head = wait(LMHead.create(dev, M, C, Vp))
    b = {k: upload(dev, v, k) for k, v in dict(x=x, wte=wte, dlogits=dlogits, dwte=dwte0).items()}
    b["logits"] = dev.buffer(4 * M * Vp, "logits")
    b["dx"] = upload(dev, np.full((M, C), 7.0, np.float32), "dx")
    run(dev, lambda seq: (head.forward(seq, logits=b["logits"], x=b["x"], wte=b["wte"]),
                          head.backward(seq, dx=b["dx"], dwte=b["dwte"], dlogits=b["dlogits"], x=b["x"],
                                        wte=b["wte"])))
    logits_ref = reference.matmul_forward(x, wte.T)
    dx_ref, dwteT_ref, _ = reference.matmul_backward(dlogits, x, wte.T, has_bias=False)
    xa, wa, da = (np.abs(v.astype(np.float64)) for v in (x, wte, dlogits))
    assert_product("logits", download(dev, b["logits"], (M, Vp)), logits_ref.astype(np.float64), xa @ wa.T)
    assert_product("dx", download(dev, b["dx"], (M, C)), dx_ref.astype(np.float64), da @ wa)
    assert_product("dwte", download(dev, b["dwte"], (Vp, C)), dwte0 + dwteT_ref.T.astype(np.float64),
                   da.T @ xa + np.abs(dwte0))


# ---------------------------------------------------------------------------------------------
# Errors and choices

def test_tiled_kernel_refuses_rows_that_are_no_multiple_of_4(dev):
    with pytest.raises(GPUError, match="multiples of 4"):
        wait(Matmul.create(dev, 37, 45, 53, "nn", variant="tiled"))


def test_tiles_beyond_the_webgpu_limits_are_refused(dev):
    with pytest.raises(GPUError, match="PREFETCH holds at most 4"):
        wait(Matmul.create(dev, 64, 64, 64, tiles={"BM": 64, "BN": 64, "BK": 32, "TM": 8, "TN": 8,
                                                   "PREFETCH": True}))   # 64 threads for 512 vec4s
    with pytest.raises(GPUError, match="unknown tile keys"):
        wait(Matmul.create(dev, 64, 64, 64, tiles=dict(TILES_CPU, SPRED=True)))
    with pytest.raises(GPUError, match="threads per workgroup"):
        wait(Matmul.create(dev, 64, 64, 64, tiles={"BM": 128, "BN": 128, "BK": 8, "TM": 4, "TN": 4}))
    with pytest.raises(GPUError, match="workgroup memory"):
        wait(Matmul.create(dev, 64, 64, 64, tiles={"BM": 128, "BN": 128, "BK": 32, "TM": 8, "TN": 8}))


def test_every_preset_tile_shape_fits_the_webgpu_default_limits(dev):
    for name, t in TILE_SHAPES.items():
        check_tiles(dev, t)   # the fixture device holds exactly the default limits; raises if a shape exceeds them
    # the CPU tiles on a CPU adapter (lavapipe, SwiftShader); on a GPU (these tests also run on an H200) the large
    assert default_tiles(dev, 8192, 768, 768) == (cpu_tiles(dev) if is_cpu_adapter(dev) else TILES_LARGE)


def test_default_tiles_are_large_where_they_fill_a_gpu():
    gpu = FakeAdapter(vendor="NVIDIA", device="NVIDIA H100 80GB HBM3", adapter_type="DiscreteGPU")
    assert default_tiles(gpu, 8192, 768, 768) == TILES_LARGE      # 384 workgroups of 128 x 128
    assert default_tiles(gpu, 768, 768, 8192) == TILES_LARGE      # 36 workgroups, times 16 slices of split-K
    assert default_tiles(gpu, 2048, 384, 128) == TILES_MEDIUM     # a small model: 48 workgroups, K too short to split


# ---------------------------------------------------------------------------------------------
# Autotune: timed choice of tiles and split-K per shape, remembered per device and on disk

@pytest.fixture
def tune_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TABGPT_CACHE", str(tmp_path))
    monkeypatch.delenv("TABGPT_AUTOTUNE", raising=False)
    return tmp_path / "matmul-tune.json"


@pytest.mark.parametrize("layout", ["nn", "nt", "tn"])
def test_autotuned_product_matches_numpy_and_is_remembered(dev, tune_cache, layout):
    from tabgpt.ops import matmul
    matmul._tuned.pop(dev, None)
    Mx, Nx, Kx = SHAPES[layout]
    log_before = len(dev.tune_log)
    got, ref, scale, mm = product(dev, layout, Mx, Nx, Kx, seed=21, bias=layout == "nn", tiles="auto")
    assert_product(f"{layout} autotuned", got, ref, scale)
    assert len(dev.tune_log) == log_before + 1 and f"{layout}:{Mx}x{Nx}x{Kx}" in dev.tune_log[-1]
    # one of the candidates that fit here, or one changed as TUNE_REFINE says
    assert mm.tiles in [dict(t, **r) for t in matmul.TUNE_TILES for r in [{}] + matmul.TUNE_REFINE]
    check_tiles(dev, mm.tiles)
    # a second product of the shape reuses the choice without timing again
    again = wait(Matmul.create(dev, Mx, Nx, Kx, layout, tiles="auto"))
    assert (again.tiles, again.splits) == (mm.tiles, mm.splits) and len(dev.tune_log) == log_before + 1
    # and so does a fresh process: the choice is on disk, keyed by the adapter
    saved = json.loads(tune_cache.read_text())
    assert any(f"{layout}:{Mx}x{Nx}x{Kx}" in choices for choices in saved.values())
    matmul._tuned.pop(dev, None)
    fresh = wait(Matmul.create(dev, Mx, Nx, Kx, layout, tiles="auto"))
    assert (fresh.tiles, fresh.splits) == (mm.tiles, mm.splits) and len(dev.tune_log) == log_before + 1


@pytest.mark.parametrize("layout", ["nn", "nt", "tn"])
@pytest.mark.parametrize("candidate", range(len(TUNE_TILES)))
def test_every_autotune_candidate_matches_numpy(dev, layout, candidate):
    """Each tile shape the autotuner may pick, on an awkward shape (no edge a multiple of a tile's) with split-K."""
    t = TUNE_TILES[candidate]
    if (8 if t.get("DOUBLE_BUFFER") else 4) * t["BK"] * (t["BM"] + t["BN"]) > \
            dev.limits["max-compute-workgroup-storage-size"]:
        with pytest.raises(GPUError, match="bytes of workgroup memory"):   # the autotuner passes it over here
            check_tiles(dev, t)
        t = dict(t, DOUBLE_BUFFER=False)                                   # and the kernel is tested without
    Mx, Nx, Kx = {"nn": (100, 76, 52), "nt": (76, 100, 52), "tn": (52, 76, 300)}[layout]
    got, ref, scale, mm = product(dev, layout, Mx, Nx, Kx, seed=22, bias=layout == "nn", tiles=t,
                                  splits=1 if layout == "nn" else 3)
    assert_product(f"{layout} {t}", got, ref, scale)


def test_autotune_times_on_normal_operands_by_default_and_each_setting_tunes_into_its_own_section(dev, tune_cache,
                                                                                                  monkeypatch):
    """The trial operands filled with N(0, 1) floats on the GPU (TABGPT_AUTOTUNE_DATA=normal, the default), or left
    as zeros; TABGPT_TUNE_FLUSH=1 copies a buffer bigger than the GPU's cache before each timed run; each setting
    keeps its choices in a section of the tune file of its own; bad values refused."""
    from tabgpt import gpu
    from tabgpt.ops import matmul
    bufs = [dev.buffer(4 * 3000, "a"), dev.buffer(4 * 1000, "b")]
    wait(matmul.fill_tune_operands(dev, bufs))
    vals = [np.frombuffer(wait(dev.read(b)), dtype=np.float32) for b in bufs]
    for v in vals:
        assert np.isfinite(v).all() and np.count_nonzero(v) == v.size
        assert abs(v.mean()) < 0.15 and 0.85 < v.std() < 1.15 and np.abs(v).max() <= 6.0
    assert not np.array_equal(vals[0][:1000], vals[1])               # a stream of its own per buffer
    filled, copies = [], []
    fill, copy = matmul.fill_tune_operands, gpu.Sequence.copy
    monkeypatch.setattr(matmul, "fill_tune_operands", lambda d, b, seed=1: filled.append(len(b)) or fill(d, b, seed))
    monkeypatch.setattr(gpu.Sequence, "copy", lambda seq, src, dst, *a: copies.append((src.size, dst.size)) or
                        copy(seq, src, dst, *a))
    monkeypatch.delenv("TABGPT_AUTOTUNE_DATA", raising=False)
    matmul._tuned.pop(dev, None)
    got, ref, scale, mm = product(dev, "nn", 64, 96, 40, seed=5, tiles="auto")            # the default: normal
    assert filled == [2] and copies == []                                                  # on filled a and b
    assert_product("autotuned on normal operands", got, ref, scale)
    wait(MatmulPair.create(dev, (16, 24), (8, 32), 64, accumulate=False, tiles="auto"))
    assert filled == [2, 4]                                                      # a pair: both members' operands
    monkeypatch.setenv("TABGPT_AUTOTUNE_DATA", "zeros")
    matmul._tuned.pop(dev, None)
    got, ref, scale, mm = product(dev, "nn", 64, 96, 40, seed=5, tiles="auto")           # tuned again, on zeros
    assert filled == [2, 4] and copies == []
    assert_product("autotuned on zeros", got, ref, scale)
    monkeypatch.setenv("TABGPT_TUNE_FLUSH", "1")
    matmul._tuned.pop(dev, None)
    got, ref, scale, mm = product(dev, "nn", 64, 96, 40, seed=5, tiles="auto")           # again, with the flush
    flush = min(matmul.TUNE_FLUSH_BYTES, dev.limits["max-buffer-size"])
    assert len(copies) >= 2 and set(copies) == {(flush, flush)}             # in every candidate's sequence
    assert_product("autotuned with the flush", got, ref, scale)
    monkeypatch.setenv("TABGPT_TUNE_MARGIN", "0.01")
    matmul._tuned.pop(dev, None)
    margins, pick = [], matmul.pick_finalist
    monkeypatch.setattr(matmul, "pick_finalist", lambda f, m=0.0: margins.append(m) or pick(f, m))
    product(dev, "nn", 64, 96, 40, seed=5, tiles="auto")
    assert margins == [0.01]                                                # the pick made with the margin
    sections = json.loads(tune_cache.read_text())
    suffixes = sorted(k.split(" / candidates ")[1][8:] for k in sections)
    assert suffixes == ["", " / data normal", " / flush", " / flush / margin 0.01"], suffixes
    assert all("nn:64x96x40" in choices for choices in sections.values())
    for name, bad, message in (("TABGPT_AUTOTUNE_DATA", "ones", "TABGPT_AUTOTUNE_DATA must be normal"),
                               ("TABGPT_TUNE_FLUSH", "yes", "TABGPT_TUNE_FLUSH must be 0 or 1"),
                               ("TABGPT_TUNE_MARGIN", "0.2", "TABGPT_TUNE_MARGIN must be a fraction from 0"),
                               ("TABGPT_TUNE_MARGIN", "nan", "TABGPT_TUNE_MARGIN must be a fraction from 0")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(GPUError, match=message):
            matmul._adapter_key(dev)
        monkeypatch.delenv(name)
    matmul._tuned.pop(dev, None)


def test_pick_finalist_keeps_the_fastest_or_within_a_margin_the_fewest_slices():
    from tabgpt.ops import matmul
    f = [[1.000, "a", 11], [1.004, "b", 2], [1.008, "c", 1], [1.030, "d", 1]]
    assert matmul.pick_finalist(f)[1] == "a"
    assert matmul.pick_finalist(f, 0.005)[1] == "b"          # within half a percent: 2 slices rather than 11
    assert matmul.pick_finalist(f, 0.01)[1] == "c"
    assert matmul.pick_finalist(f, 0.1)[1] == "c"            # the fewest slices, and of those the fastest
    assert matmul.pick_finalist([[2.0, "x", 4]], 0.01)[1] == "x"


def test_autotune_survives_a_corrupt_cache_file_and_can_be_turned_off(dev, tune_cache, monkeypatch):
    from tabgpt.ops import matmul
    matmul._tuned.pop(dev, None)
    tune_cache.write_text("{not json")
    got, ref, scale, mm = product(dev, "nn", 64, 96, 40, seed=5, tiles="auto")
    assert_product("autotuned after a corrupt cache", got, ref, scale)
    assert "nn:64x96x40" in json.dumps(json.loads(tune_cache.read_text()))   # rewritten whole
    gpu = FakeAdapter(vendor="NVIDIA", device="NVIDIA H100 80GB HBM3", adapter_type="DiscreteGPU")
    gpu.backend = "wgpu-native"
    cpu = FakeAdapter(vendor="llvmpipe", device="llvmpipe (LLVM 15.0.6, 256 bits)", adapter_type="CPU")
    cpu.backend = "wgpu-native"
    assert matmul.autotune_enabled(gpu) and not matmul.autotune_enabled(cpu)   # GPUs only, lavapipe not
    monkeypatch.setenv("TABGPT_AUTOTUNE", "0")
    assert not matmul.autotune_enabled(gpu)
    monkeypatch.setenv("TABGPT_AUTOTUNE", "yes")
    with pytest.raises(GPUError, match="TABGPT_AUTOTUNE must be 0"):
        matmul.autotune_enabled(gpu)


# ---------------------------------------------------------------------------------------------
# ROWS: k-running operands staged by rows (conflict-free stores into the tiles); same products, same order

@pytest.mark.parametrize("layout", ["nn", "nt", "tn"])
@pytest.mark.parametrize("tiles", [dict(TILES_LARGE), dict(TILES_MEDIUM), dict(TILE_SHAPES["uneven"])],
                         ids=["large", "medium", "uneven"])
@pytest.mark.parametrize("splits", [1, 3])
def test_rows_staging_matches_numpy_and_is_bit_identical(dev, layout, tiles, splits):
    Mm, N, K = SHAPES[layout]
    bias = layout == "nn"
    got, ref, scale, _ = product(dev, layout, Mm, N, K, seed=31, bias=bias, tiles=dict(tiles, ROWS=True),
                                 splits=splits)
    assert_product(f"{layout} ROWS", got, ref, scale)
    plain, _, _, _ = product(dev, layout, Mm, N, K, seed=31, bias=bias, tiles=tiles, splits=splits)
    assert np.array_equal(got.view(np.uint32), plain.view(np.uint32)), "ROWS changed the sums"


# ---------------------------------------------------------------------------------------------
# TN = 16: a thread owns 4 column groups (8 x 16 or 4 x 16 outputs): fewer tile reads per product

TN16_TILES = {
    "64x128 spread double": {"BM": 64, "BN": 128, "BK": 8, "TM": 8, "TN": 16, "SPREAD": True, "PREFETCH": True,
                             "DOUBLE_BUFFER": True},
    "64x128 rows": {"BM": 64, "BN": 128, "BK": 8, "TM": 8, "TN": 16, "SPREAD": True, "PREFETCH": True,
                    "ROWS": True},
    "32x64 plain": {"BM": 32, "BN": 64, "BK": 4, "TM": 4, "TN": 16},
}


@pytest.mark.parametrize("layout", ["nn", "nt", "tn"])
@pytest.mark.parametrize("name", list(TN16_TILES))
@pytest.mark.parametrize("splits", [1, 3])
def test_sixteen_columns_per_thread_match_numpy(dev, layout, name, splits):
    Mm, N, K = SHAPES[layout]
    init = np.random.default_rng(41).standard_normal((Mm, N)).astype(np.float32)
    got, ref, scale, _ = product(dev, layout, Mm, N, K, seed=41, bias=layout != "tn", accumulate=layout == "tn",
                                 init=init if layout == "tn" else None, tiles=dict(TN16_TILES[name]),
                                 splits=splits)
    assert_product(f"{layout} TN=16 {name}", got, ref, scale)


# ---------------------------------------------------------------------------------------------
# Fused epilogues (EPILOGUE, aux4): after product, bias and accumulation, in the product's stores or, with split-K,
# in the sum of the slices. "gelu": out = y, aux = gelu(y); "residual": out = y + aux; "gelu_grad":
# out = y * gelu'(aux); "gelu_keep": out = gelu'(y), aux = gelu(y); "mul": out = y * aux. Against float64 NumPy
# (tanh GELU, as tests/reference.py).

GELU_SCALE = np.sqrt(2.0 / np.pi)
# (M, N, K) per layout, no multiple of any tile edge, K long enough for 3 slices of BK = 8
EPILOGUE_SHAPES = {"nn": (37, 20, 100), "nt": (45, 36, 100), "tn": (20, 44, 93)}


def gelu64(x):
    return 0.5 * x * (1.0 + np.tanh(GELU_SCALE * (x + 0.044715 * x ** 3)))


def gelu_grad64(x):
    t = np.tanh(GELU_SCALE * (x + 0.044715 * x ** 3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_SCALE * (1.0 + 3 * 0.044715 * x * x)


def epilogue_product(dev, layout, Mm, N, K, seed, epilogue, bias=False, accumulate=False, splits=None, tiles=None,
                     max_binding=None):
    """Run the product with an epilogue once, check out and aux against NumPy; return the Matmul and (out, aux)."""
    a, b, a64, b64 = operands(layout, Mm, N, K, seed)
    rng = np.random.default_rng(seed + 2)
    bv = rng.standard_normal(N).astype(np.float32) if bias else None
    init = rng.standard_normal((Mm, N)).astype(np.float32)      # accumulated into, else stale values to overwrite
    aux = (3 * rng.standard_normal((Mm, N))).astype(np.float32)  # residual / pre-activation (gelu: stale values)
    aux[0, :4] = [-30.0, -9.5, 9.5, 30.0]                        # saturated tanh stays finite
    mm = wait(Matmul.create(dev, Mm, N, K, layout, bias=bias, accumulate=accumulate, variant="tiled", tiles=tiles,
                            splits=splits, max_binding=max_binding, epilogue=epilogue))
    assert mm.epilogue == epilogue
    out, baux = upload(dev, init, "out"), upload(dev, aux, "aux")
    ba, bb = upload(dev, a, "a"), upload(dev, b, "b")
    bbias = upload(dev, bv, "bias") if bias else None
    run(dev, lambda seq: mm.dispatch(seq, out=out, a=ba, b=bb, bias=bbias, aux=baux))
    y = a64 @ b64 + (bv.astype(np.float64) if bias else 0.0) + (init if accumulate else 0.0)
    scale = np.abs(a64) @ np.abs(b64) + (np.abs(bv) if bias else 0.0) + (np.abs(init) if accumulate else 0.0)
    got, got_aux = download(dev, out, (Mm, N)), download(dev, baux, (Mm, N))
    name = f"{layout} {epilogue} {Mm}x{N}x{K} bias={bias} accumulate={accumulate} x{mm.splits}"
    aux64 = aux.astype(np.float64)
    if epilogue in ("gelu", "gelu_keep"):
        if epilogue == "gelu":
            assert_product(name + " out", got, y, scale)
        else:
            # |gelu''| <= 0.8 carries y's error; gelu' in f32 is good to about 1e-5 absolute
            assert_product(name + " out = gelu'(y)", got, gelu_grad64(y), 0.8 * scale + 1e-5 / RTOL)
        # |gelu'| <= 1.13 carries y's error; f32 tanh adds a few ulp (as tests/test_ops_common.py allows)
        g = gelu64(y)
        assert_product(name + " aux = gelu(y)", got_aux, g, 1.13 * scale + (2e-6 + 1e-5 * np.abs(g)) / RTOL)
    else:
        assert np.array_equal(got_aux, aux), f"{name}: aux was written"
        if epilogue == "residual":
            assert_product(name, got, y + aux64, scale + np.abs(aux64))
        elif epilogue == "mul":
            assert_product(name, got, y * aux64, scale * np.abs(aux64))
        else:
            # gelu' in f32 is good to about 1e-5 absolute (a difference of O(1) terms)
            gg = gelu_grad64(aux64)
            assert_product(name, got, y * gg, scale * np.abs(gg) + np.abs(y) * 1e-5 / RTOL)
    return mm, (got, got_aux)


EPILOGUE_CASES = [(lay, ep) for ep in Matmul.EPILOGUES for lay in ("nn", "nt", "tn")]


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("splits", [1, 3], ids=["whole-K", "split-K"])
@pytest.mark.parametrize("layout,epilogue", EPILOGUE_CASES)
def test_epilogue_matches_numpy(dev, layout, epilogue, splits, bias):
    # In store_rows4 (whole K) or in matmul_split_sum (split-K: the slabs hold partial sums, the epilogue comes once).
    Mm, N, K = EPILOGUE_SHAPES[layout]
    mm, _ = epilogue_product(dev, layout, Mm, N, K, seed=40, epilogue=epilogue, bias=bias, splits=splits)
    assert mm.splits == splits and len(mm.chunks) == 1


@pytest.mark.parametrize("splits", [1, 3], ids=["whole-K", "split-K"])
@pytest.mark.parametrize("layout,epilogue", [("tn", "gelu"), ("tn", "residual"), ("nn", "gelu_grad"),
                                             ("nt", "residual"), ("tn", "gelu_keep"), ("nn", "mul")])
def test_epilogue_comes_after_bias_and_accumulation(dev, layout, epilogue, splits):
    # out = epilogue(init + product + bias): the epilogue sees the accumulated value.
    Mm, N, K = EPILOGUE_SHAPES[layout]
    epilogue_product(dev, layout, Mm, N, K, seed=41, epilogue=epilogue, bias=True, accumulate=True, splits=splits)


@pytest.mark.parametrize("tiles", ["large", "medium", "uneven"])
@pytest.mark.parametrize("layout,epilogue", [("nn", "gelu"), ("nn", "residual"), ("nt", "gelu_grad"),
                                             ("nn", "gelu_keep"), ("nt", "mul")])
def test_epilogue_with_other_tile_shapes(dev, layout, epilogue, tiles):
    # Every store of the thread's TM x TN block (spread groups, 8 x 8, 4 x 4) goes through the epilogue once.
    Mm, N, K = EPILOGUE_SHAPES[layout]
    epilogue_product(dev, layout, Mm, N, K, seed=42, epilogue=epilogue, bias=True, tiles=dict(TILE_SHAPES[tiles]),
                     splits=1)


@pytest.mark.parametrize("splits", [1, 2], ids=["whole-K", "split-K"])
@pytest.mark.parametrize("layout,epilogue", [("nn", "gelu"), ("nn", "residual"), ("nt", "gelu_grad"),
                                             ("nt", "gelu"), ("tn", "gelu"), ("tn", "residual"),
                                             ("tn", "gelu_grad"), ("nn", "gelu_keep"), ("tn", "gelu_keep"),
                                             ("nt", "mul"), ("tn", "mul")])
def test_epilogue_with_row_chunks(dev, layout, epilogue, splits):
    # nn/nt: chunks of out rows, aux chunked the same way; tn: chunks of the reduction add into out, and only the
    # last applies the epilogue (to the whole sum, bias added once by the first).
    Mm, N, K = (20, 64, 300) if layout == "tn" else (300, 20, 64)
    mm, _ = epilogue_product(dev, layout, Mm, N, K, seed=43, epilogue=epilogue, bias=True, splits=splits,
                             max_binding=64 * 4 * 64)
    assert len(mm.chunks) == 5 and mm.splits == splits, ([c[:2] for c in mm.chunks], mm.splits)


@pytest.mark.parametrize("splits", [1, 3], ids=["whole-K", "split-K"])
def test_epilogues_are_bit_identical_to_the_separate_elementwise_passes(dev, splits):
    # The copied GELU formulas and the add give exactly what the product followed by elementwise.wgsl gave; the
    # multiply exactly the product times aux in f32.
    from tabgpt.ops.elementwise import Elementwise
    ew = wait(Elementwise.create(dev))
    for layout, epilogue in (("nn", "gelu"), ("nn", "residual"), ("nt", "gelu_grad"), ("nn", "gelu_keep"),
                             ("nt", "mul")):
        Mm, N, K = EPILOGUE_SHAPES[layout]
        a, b, _, _ = operands(layout, Mm, N, K, seed=44)
        rng = np.random.default_rng(45)
        bv = rng.standard_normal(N).astype(np.float32)
        aux = (3 * rng.standard_normal((Mm, N))).astype(np.float32)
        ba, bb, bbias = upload(dev, a, "a"), upload(dev, b, "b"), upload(dev, bv, "bias")
        fused = wait(Matmul.create(dev, Mm, N, K, layout, bias=True, variant="tiled", splits=splits,
                                   epilogue=epilogue))
        plain = wait(Matmul.create(dev, Mm, N, K, layout, bias=True, variant="tiled", splits=splits))
        out_f, aux_f = dev.buffer(4 * Mm * N, "out_f"), upload(dev, aux, "aux_f")
        out_p, aux_p, y = dev.buffer(4 * Mm * N, "out_p"), upload(dev, aux, "aux_p"), dev.buffer(4 * Mm * N, "y")

        def append(seq):
            fused.dispatch(seq, out=out_f, a=ba, b=bb, bias=bbias, aux=aux_f)
            if epilogue == "gelu":
                plain.dispatch(seq, out=out_p, a=ba, b=bb, bias=bbias)
                ew.gelu_forward(seq, out=aux_p, inp=out_p, n=Mm * N)
            elif epilogue == "residual":
                plain.dispatch(seq, out=y, a=ba, b=bb, bias=bbias)
                ew.add(seq, out=out_p, a=aux_p, b=y, n=Mm * N)
            elif epilogue == "gelu_grad":
                plain.dispatch(seq, out=out_p, a=ba, b=bb, bias=bbias)
                ew.gelu_backward_inplace(seq, dinout=out_p, inp=aux_p, n=Mm * N)
            elif epilogue == "gelu_keep":   # aux_p = gelu(y), out_p = gelu'(y) * 1
                plain.dispatch(seq, out=y, a=ba, b=bb, bias=bbias)
                ew.gelu_forward(seq, out=aux_p, inp=y, n=Mm * N)
                ew.fill(seq, out_p, 1.0, n=Mm * N)
                ew.gelu_backward_inplace(seq, dinout=out_p, inp=y, n=Mm * N)
            else:
                plain.dispatch(seq, out=y, a=ba, b=bb, bias=bbias)
        run(dev, append)
        if epilogue == "mul":
            out_p = upload(dev, download(dev, y, (Mm, N)) * aux, "out_p")   # f32 times f32, rounded once
        for what, f, p in (("out", out_f, out_p), ("aux", aux_f, aux_p)):
            got_f, got_p = download(dev, f, (Mm, N)), download(dev, p, (Mm, N))
            differ = got_f.view(np.uint32) != got_p.view(np.uint32)
            assert not differ.any(), f"{layout} {epilogue} x{splits} {what}: {differ.sum()} entries differ"


def test_epilogue_misuse_is_refused(dev):
    with pytest.raises(GPUError, match="epilogue must be None or one of"):
        wait(Matmul.create(dev, 64, 64, 64, epilogue="relu"))
    with pytest.raises(GPUError, match="needs the tiled kernel"):
        wait(Matmul.create(dev, 37, 45, 53, epilogue="gelu"))          # rows no multiple of 4: simple only
    mm = wait(Matmul.create(dev, 8, 8, 8, epilogue="residual"))
    plain = wait(Matmul.create(dev, 8, 8, 8))
    x, y = dev.buffer(256, "x"), dev.buffer(256, "y")
    with pytest.raises(GPUError, match="pass aux"):
        mm.dispatch(dev.sequence(), out=x, a=x, b=x)
    with pytest.raises(GPUError, match="different buffers"):
        mm.dispatch(dev.sequence(), out=x.view(0, 256), a=y, b=y, aux=x)
    with pytest.raises(GPUError, match="no epilogue"):
        plain.dispatch(dev.sequence(), out=x, a=y, b=y, aux=y)
    with pytest.raises(GPUError, match="forward_epilogue must be"):
        wait(Conv1D.create(dev, 8, 8, 8, forward_epilogue="gelu_grad"))
    fc = wait(Conv1D.create(dev, 8, 8, 8, forward_epilogue="gelu", backward=False))
    assert fc.dinp is None
    with pytest.raises(GPUError, match="pass gelu_out"):
        fc.forward(dev.sequence(), out=x, inp=y, weight=y, bias=y)
    with pytest.raises(GPUError, match="residual needs forward_epilogue='residual'"):
        fc.forward(dev.sequence(), out=x, inp=y, weight=y, bias=y, gelu_out=y, residual=y)
    with pytest.raises(GPUError, match="gelu_out needs forward_epilogue='gelu' or 'gelu_keep'"):
        plain_fc = wait(Conv1D.create(dev, 8, 8, 8, backward=False))
        plain_fc.forward(dev.sequence(), out=x, inp=y, weight=y, bias=y, gelu_out=y)
    with pytest.raises(GPUError, match="dinp_gelu_grad must be False, True or 'kept'"):
        wait(Conv1D.create(dev, 8, 8, 8, dinp_gelu_grad="stored"))
    kept = wait(Conv1D.create(dev, 8, 8, 8, dinp_gelu_grad="kept"))
    computed = wait(Conv1D.create(dev, 8, 8, 8, dinp_gelu_grad=True))
    grads = dict(dinp=x, dweight=x, dbias=x, dout=y, inp=y, weight=y)
    with pytest.raises(GPUError, match="dinp_gelu_grad='kept': pass gelu_grad"):
        kept.backward(dev.sequence(), **grads, gelu_pre=y)
    with pytest.raises(GPUError, match="gelu_grad needs a Conv1D created with dinp_gelu_grad='kept'"):
        computed.backward(dev.sequence(), **grads, gelu_pre=y, gelu_grad=y)
    with pytest.raises(GPUError, match="gelu_pre needs a Conv1D created with dinp_gelu_grad=True"):
        wait(Conv1D.create(dev, 8, 8, 8)).backward(dev.sequence(), **grads, gelu_pre=y)


@pytest.mark.parametrize("keep", [False, True], ids=["gelu", "gelu_keep"])
def test_conv1d_fused_epilogues_match_reference(dev, keep):
    # The MLP as the model runs it: h = c_fc(x) with gelu(h) written alongside; out = res + c_proj(gelu(h));
    # backward: d4C = (dout @ W_proj^T) * gelu'(h) in the dinp product. keep (as the model trains): c_fc writes
    # gelu'(h) in place of h, and the dinp product multiplies by it.
    rng = np.random.default_rng(46)
    x = rng.standard_normal((M, C)).astype(np.float32)
    res = rng.standard_normal((M, C)).astype(np.float32)
    w_fc = (0.1 * rng.standard_normal((C, 4 * C))).astype(np.float32)
    b_fc = rng.standard_normal(4 * C).astype(np.float32)
    w_pr = (0.1 * rng.standard_normal((4 * C, C))).astype(np.float32)
    b_pr = rng.standard_normal(C).astype(np.float32)
    dout = rng.standard_normal((M, C)).astype(np.float32)
    fc = wait(Conv1D.create(dev, M, C, 4 * C, forward_epilogue="gelu_keep" if keep else "gelu"))
    pr = wait(Conv1D.create(dev, M, 4 * C, C, forward_epilogue="residual", dinp_gelu_grad="kept" if keep else True))
    b = {k: upload(dev, v, k) for k, v in dict(x=x, res=res, w_fc=w_fc, b_fc=b_fc, w_pr=w_pr, b_pr=b_pr,
                                                dout=dout).items()}
    for name, n in (("h", 4 * C), ("g", 4 * C), ("out", C), ("dh", 4 * C), ("dw", 4 * C * C), ("db", C)):
        b[name] = upload(dev, np.zeros((M if name not in ("dw", "db") else 1, n), np.float32), name)
    run(dev, lambda seq: (
        fc.forward(seq, out=b["h"], inp=b["x"], weight=b["w_fc"], bias=b["b_fc"], gelu_out=b["g"]),
        pr.forward(seq, out=b["out"], inp=b["g"], weight=b["w_pr"], bias=b["b_pr"], residual=b["res"]),
        pr.backward(seq, dinp=b["dh"], dweight=b["dw"], dbias=b["db"], dout=b["dout"], inp=b["g"],
                    weight=b["w_pr"], **{"gelu_grad" if keep else "gelu_pre": b["h"]})))
    g = download(dev, b["g"], (M, 4 * C))
    xa, wfa, wpa, da = (np.abs(v.astype(np.float64)) for v in (x, w_fc, w_pr, dout))
    h_scale = xa @ wfa + np.abs(b_fc)
    h_ref = reference.matmul_forward(x, w_fc, b_fc).astype(np.float64)
    if keep:
        # h is not kept: gelu'(h) is, made from the same tanh as gelu(h) (|gelu''| <= 0.8, |gelu'| <= 1.13)
        h = h_ref.astype(np.float32)
        assert_product("c_fc gelu'", download(dev, b["h"], (M, 4 * C)), gelu_grad64(h_ref),
                       0.8 * h_scale + 1e-5 / RTOL)
        g_ref = gelu64(h_ref)
        assert_product("c_fc gelu", g, g_ref, 1.13 * h_scale + (2e-6 + 1e-5 * np.abs(g_ref)) / RTOL)
    else:
        h = download(dev, b["h"], (M, 4 * C))
        assert_product("c_fc out", h, h_ref, h_scale)
        g_ref = reference.gelu_forward(h).astype(np.float64)          # of the GPU's h: the GELU alone
        assert_product("c_fc gelu", g, g_ref, (2e-6 + 1e-5 * np.abs(g_ref)) / RTOL)
    out_ref = res.astype(np.float64) + reference.matmul_forward(g, w_pr, b_pr)
    assert_product("c_proj + residual", download(dev, b["out"], (M, C)), out_ref,
                   np.abs(g.astype(np.float64)) @ wpa + np.abs(b_pr) + np.abs(res) + 1e-7 / RTOL)
    dg, dw_ref, db_ref = reference.matmul_backward(dout, g, w_pr)
    dh_ref = reference.gelu_backward(dg, h).astype(np.float64)
    gg = np.abs(gelu_grad64(h.astype(np.float64)))
    # keep: h is the float64 reference's rounded, gelu'(h) carries c_fc's error times |gelu''| <= 0.8
    h_err = 0.8 * h_scale * np.abs(dg.astype(np.float64)) if keep else 0.0
    assert_product("dinp * gelu'", download(dev, b["dh"], (M, 4 * C)), dh_ref,
                   (da @ wpa.T) * gg + np.abs(dg.astype(np.float64)) * 1e-5 / RTOL + 1e-7 / RTOL + h_err)
    assert_product("dweight", download(dev, b["dw"], (4 * C, C)), dw_ref.astype(np.float64),
                   np.abs(g.astype(np.float64)).T @ da)
    assert_product("dbias", download(dev, b["db"], (C,)), db_ref.astype(np.float64), da.sum(0))


# ---------------------------------------------------------------------------------------------
# bias_row: the bias gradient as a last row of ones in op(A) of the weight gradient's product

@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("tiles", ["large", "medium", "uneven", "tn16", "tn16 plain"])
@pytest.mark.parametrize("max_binding", [None, 90000])   # 90000: two chunks of the 111 rows
def test_bias_row_product_gives_weight_and_bias_gradients(dev, splits, tiles, max_binding):
    # dW (K_in, N) += inp^T @ dout and db (N,) += column sums of dout, in one product into [dW; db]
    Kin, Nout, rows = C, 4 * C, M
    rng = np.random.default_rng(51)
    inp = rng.standard_normal((rows, Kin)).astype(np.float32)
    dout = rng.standard_normal((rows, Nout)).astype(np.float32)
    init = rng.standard_normal((Kin + 1, Nout)).astype(np.float32)
    t = {"tn16": TN16_TILES["64x128 spread double"], "tn16 plain": TN16_TILES["32x64 plain"]}.get(tiles)
    mm = wait(Matmul.create(dev, Kin, Nout, rows, "tn", accumulate=True, bias_row=True,
                            tiles=dict(t or TILE_SHAPES[tiles]), splits=splits, max_binding=max_binding))
    assert mm.out_rows == Kin + 1 and (max_binding is None or len(mm.chunks) > 1)
    out = upload(dev, init, "out")
    run(dev, lambda seq: mm.dispatch(seq, out=out, a=upload(dev, inp, "inp"), b=upload(dev, dout, "dout")), 2)
    got = download(dev, out, (Kin + 1, Nout))
    i64, d64 = inp.astype(np.float64), dout.astype(np.float64)
    ref = init + 2 * np.vstack([i64.T @ d64, d64.sum(0, keepdims=True)])
    scale = 2 * np.vstack([np.abs(i64).T @ np.abs(d64), np.abs(d64).sum(0, keepdims=True)]) + np.abs(init)
    assert_product(f"bias_row {tiles} x{splits}", got, ref, scale)


def test_bias_row_needs_a_thread_for_each_column_vec4(dev):
    # each of the block's BN/4 column vec4s is summed by threads of its own (BIAS_G row groups of them)
    t = {"BM": 8, "BN": 128, "BK": 8, "TM": 8, "TN": 16}     # 8 threads, 32 column vec4s
    with pytest.raises(GPUError, match="bias_row needs a thread for each of the block's 32 column vec4s"):
        wait(Matmul.create(dev, 16, 128, 64, "tn", bias_row=True, tiles=dict(t), splits=1))
    wait(Matmul.create(dev, 16, 128, 64, "tn", tiles=dict(t), splits=1))      # without the row: fine
    # the autotuner passes over such tiles for a bias-row product
    from tabgpt.ops.matmul import autotune
    good = dict(TILES_MEDIUM)
    tiles, _ = wait(autotune(dev, 16, 128, 64, "tn", candidates=[dict(t), good], persist=False, bias_row=True))
    assert {k: tiles[k] for k in ("BM", "BN", "TM", "TN")} == {k: good[k] for k in ("BM", "BN", "TM", "TN")}


def test_conv1d_fused_bias_grad_matches_the_separate_pass(dev):
    Kin, Nout = C, 3 * C
    rng = np.random.default_rng(53)
    inp, dout = rng.standard_normal((M, Kin)).astype(np.float32), rng.standard_normal((M, Nout)).astype(np.float32)
    w = rng.standard_normal((Kin, Nout)).astype(np.float32)
    grads = {}
    for fuse in (False, True):
        conv = wait(Conv1D.create(dev, M, Kin, Nout, fuse_bias_grad=fuse))
        g = dev.buffer(4 * (Kin * Nout + Nout), "grads")      # dW then db, contiguous, zero
        dinp = dev.buffer(4 * M * Kin, "dinp")
        bi, bd, bw = upload(dev, inp, "inp"), upload(dev, dout, "dout"), upload(dev, w, "w")
        run(dev, lambda seq: conv.backward(seq, dinp=dinp, dweight=g.view(0, 4 * Kin * Nout),
                                           dbias=g.view(4 * Kin * Nout, 4 * Nout), dout=bd, inp=bi, weight=bw))
        grads[fuse] = download(dev, g, (Kin * Nout + Nout,))
        assert (conv.dbias is None) == fuse
    np.testing.assert_allclose(grads[True], grads[False], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[True][-Nout:], dout.astype(np.float64).sum(0), rtol=1e-5, atol=1e-4)
    # dbias elsewhere than right after dweight is refused, not silently wrong
    conv = wait(Conv1D.create(dev, M, Kin, Nout, fuse_bias_grad=True))
    g = dev.buffer(4 * (Kin * Nout + 2 * Nout), "grads")
    with pytest.raises(GPUError, match="right after dweight"):
        run(dev, lambda seq: conv.backward(seq, dinp=dev.buffer(4 * M * Kin), dweight=g.view(0, 4 * Kin * Nout),
                                           dbias=g.view(4 * (Kin * Nout + Nout), 4 * Nout),
                                           dout=upload(dev, dout), inp=upload(dev, inp), weight=upload(dev, w)))


def test_autotune_retunes_stale_cache_entries(dev, tune_cache):
    from tabgpt.ops import matmul
    matmul._tuned.pop(dev, None)
    key = matmul._adapter_key(dev)
    bad = {"BM": 256, "BN": 256, "BK": 64, "TM": 8, "TN": 8}              # beyond the device: must not be used
    tune_cache.write_text(json.dumps({key: {"nn:64x96x40": [bad, 1], "nt:64x96x40": "garbage"}}))
    for layout in ("nn", "nt"):
        got, ref, scale, mm = product(dev, layout, 64, 96, 40, seed=7, tiles="auto")
        assert_product(f"{layout} after a stale cache entry", got, ref, scale)
        check_tiles(dev, mm.tiles)
    saved = json.loads(tune_cache.read_text())[key]
    assert saved["nn:64x96x40"][0] != bad


def test_autotune_falls_back_to_the_default_when_no_candidate_fits(dev, tune_cache):
    from tabgpt.ops import matmul
    matmul._tuned.pop(dev, None)
    tiles, splits = wait(matmul.autotune(dev, 64, 96, 40, "nn", candidates=[{"BM": 512, "BN": 512, "BK": 64,
                                                                             "TM": 8, "TN": 8}]))
    assert tiles == default_tiles(dev, 64, 96, 40) and splits >= 1


def timed_candidates(dev) -> int:
    """How many candidates the last autotune timed (its tune_log line)."""
    return int(re.search(r"of (\d+) timed", dev.tune_log[-1]).group(1))


def test_autotune_times_the_fastest_shape_again_with_each_refinement(dev, tune_cache, monkeypatch):
    # After the candidates, the fastest is timed once more with each change in TUNE_REFINE (FENCE), then split-K.
    from tabgpt.ops import matmul
    timed = {}
    for refine in ([], [{"FENCE": True}]):
        matmul._tuned.pop(dev, None)
        monkeypatch.setattr(matmul, "TUNE_REFINE", refine)
        tiles, _ = wait(matmul.autotune(dev, 64, 96, 40, "nn", candidates=[dict(TILES_MEDIUM)], persist=False))
        assert tiles in (TILES_MEDIUM, dict(TILES_MEDIUM, FENCE=True))
        timed[len(refine)] = timed_candidates(dev)
    assert timed[1] == timed[0] + 1, timed
    matmul._tuned.pop(dev, None)


def test_autotune_file_from_another_candidate_set_is_not_used(dev, tune_cache, monkeypatch):
    # A choice saved when the candidates were different (here: one valid tile shape only) is tuned again once the
    # candidate list changes: the file's key names the candidates.
    from tabgpt.ops import matmul
    matmul._tuned.pop(dev, None)
    only = dict(TILES_MEDIUM)
    monkeypatch.setattr(matmul, "TUNE_TILES", [only])
    old_key = matmul._adapter_key(dev)
    tune_cache.write_text(json.dumps({old_key: {"nn:64x96x40": [only, 3]}}))
    assert wait(matmul.autotune(dev, 64, 96, 40, "nn")) == (only, 3)       # read from the file, not timed
    matmul._tuned.pop(dev, None)
    monkeypatch.setattr(matmul, "TUNE_TILES", [dict(TILES_MEDIUM, BK=12), only])
    assert matmul._adapter_key(dev) != old_key
    tiles, splits = wait(matmul.autotune(dev, 64, 96, 40, "nn"))
    assert splits != 3 or tiles != only                                    # timed again: split-K 3 is no candidate
    saved = json.loads(tune_cache.read_text())
    assert old_key in saved and matmul._adapter_key(dev) in saved


def test_autotune_times_every_split_count_for_the_fastest_shapes(dev, tune_cache, monkeypatch):
    # Split-K counts are timed jointly with tile shapes: each of the TUNE_SPLIT_SHAPES fastest shapes with every
    # count of TUNE_SPLITS that the reduction allows (slices >= 128 long: K = 512 allows 1-4).
    from tabgpt.ops import matmul
    monkeypatch.setattr(matmul, "TUNE_REFINE", [])
    shapes = [dict(TILES_MEDIUM), dict(TILES_MEDIUM, BK=4), dict(TILES_MEDIUM, BK=12)]
    timed = {}
    for n_shapes in (1, 2):
        matmul._tuned.pop(dev, None)
        monkeypatch.setattr(matmul, "TUNE_SPLIT_SHAPES", n_shapes)
        tiles, splits = wait(matmul.autotune(dev, 64, 96, 512, "nn", candidates=shapes, persist=False))
        assert tiles in shapes and splits in (1, 2, 3, 4)
        timed[n_shapes] = timed_candidates(dev)
    # three shapes at their default count (1 on a CPU adapter), then 2, 3 and 4 for each of the fastest
    assert timed == {1: 3 + 3, 2: 3 + 6}, timed
    matmul._tuned.pop(dev, None)
    got, ref, scale, mm = product(dev, "nn", 64, 96, 512, seed=9, tiles=tiles, splits=splits)
    assert_product("the tuned split count", got, ref, scale)


def test_autotune_times_every_split_count_up_to_the_fine_limit(dev, tune_cache, monkeypatch):
    # After TUNE_SPLITS, the fastest shape is timed with every other count up to TUNE_FINE_SPLITS (the count that
    # fills the GPU's last wave of workgroups), within slices of at least 128.
    from tabgpt.ops import matmul
    monkeypatch.setattr(matmul, "TUNE_REFINE", [])
    monkeypatch.setattr(matmul, "TUNE_SPLITS", (1, 2))
    # the default count as on a CPU adapter (1) on every adapter: a GPU's (4 at K = 1024) would be one count more
    monkeypatch.setattr(matmul, "default_splits", lambda dev, workgroups, K: 1)
    timed = {}
    for fine, K in ((0, 512), (4, 512), (8, 384)):
        matmul._tuned.pop(dev, None)
        monkeypatch.setattr(matmul, "TUNE_FINE_SPLITS", fine)
        tiles, splits = wait(matmul.autotune(dev, 64, 96, K, "nn", candidates=[dict(TILES_MEDIUM)], persist=False))
        assert splits in range(1, max(2, fine) + 1) and splits <= K // 128
        timed[fine] = timed_candidates(dev)
    # the default count (1) and 2; then 3 and 4; K = 384 allows 3 slices at most
    assert timed == {0: 2, 4: 4, 8: 3}, timed
    key = matmul._adapter_key(dev)
    monkeypatch.setattr(matmul, "TUNE_FINE_SPLITS", 32)
    assert matmul._adapter_key(dev) != key                 # a tune file made with another limit is tuned again
    # beyond TUNE_SPLITS, counts whose scratch would pass TUNE_FINE_SCRATCH are not timed: 3 x 64 x 96 floats fit
    monkeypatch.setattr(matmul, "TUNE_FINE_SCRATCH", 4 * 3 * 64 * 96)
    matmul._tuned.pop(dev, None)
    wait(matmul.autotune(dev, 64, 96, 1024, "nn", candidates=[dict(TILES_MEDIUM)], persist=False))
    assert timed_candidates(dev) == 3                       # counts 1, 2 and 3


def test_runoff_finalists_are_the_fastest_distinct_candidates():
    from tabgpt.ops.matmul import runoff_finalists
    t1, t2, t3 = dict(TILES_MEDIUM), dict(TILES_LARGE), dict(TILES_MEDIUM, FENCE=True)
    results = [(3.0, t1, 1), (1.0, t2, 2), (2.0, t1, 1), (1.5, t2, 4), (0.5, t3, 1), (1.2, t2, 2)]
    # fastest first; a (tiles, splits) timed twice counts once, at its best time
    assert runoff_finalists(results, 3) == [[0.5, t3, 1], [1.0, t2, 2], [1.5, t2, 4]]
    assert runoff_finalists(results, 5) == [[0.5, t3, 1], [1.0, t2, 2], [1.5, t2, 4], [2.0, t1, 1]]
    assert runoff_finalists(results, 1) == []            # nothing to compare
    assert runoff_finalists(results[:1], 3) == []
    assert runoff_finalists([(1.0, t1, 1), (0.9, t1, 1)], 3) == []


def test_autotune_runoff_times_the_finalists_again(dev, tune_cache, monkeypatch):
    # With the runoff the choice is one of its finalists, which are timed TUNE_RUNOFF_ROUNDS times more.
    from tabgpt.ops import matmul
    created = []
    real_create = matmul.Matmul.create

    async def counting_create(*args, **kwargs):
        created.append(kwargs.get("splits"))
        return await real_create(*args, **kwargs)

    monkeypatch.setattr(matmul.Matmul, "create", counting_create)
    monkeypatch.setattr(matmul, "TUNE_FINE_SPLITS", 0)
    monkeypatch.setattr(matmul, "TUNE_REFINE", [{"FENCE": True}])
    monkeypatch.setattr(matmul, "TUNE_SPLIT_SHAPES", 2)
    cands = [dict(TILES_MEDIUM), dict(TILES_MEDIUM, BK=16)]
    made = {}
    for n in (0, 2, 3):
        matmul._tuned.pop(dev, None)
        created.clear()
        monkeypatch.setattr(matmul, "TUNE_RUNOFF", n)
        tiles, splits = wait(matmul.autotune(dev, 64, 96, 256, "nn", candidates=cands, persist=False))
        assert {k: v for k, v in tiles.items() if k != "FENCE"} in cands and splits in (1, 2)
        assert f"{n} in the runoff" in dev.tune_log[-1], dev.tune_log[-1]
        made[n] = len(created)
    # 2 shapes, the faster with FENCE, both with split-K 2 (5 timed), then each finalist built again for the runoff
    assert made == {0: 5, 2: 7, 3: 8}, made
    key = matmul._adapter_key(dev)
    monkeypatch.setattr(matmul, "TUNE_RUNOFF_ROUNDS", 5)
    assert matmul._adapter_key(dev) != key                 # a tune file made with another runoff is tuned again


def test_split_k_scratch_is_shared_while_used_and_freed_after(dev):
    from tabgpt.ops import matmul
    gc.collect()                                               # earlier tests' products that are garbage now
    held = list(matmul._scratch.get(dev, {}).values())         # the scratch of products still alive (fixtures)
    # slabs of 16 MiB, more than any test model's, so that this product gets a buffer of its own
    a = wait(Matmul.create(dev, 1024, 1024, 2048, "nn", tiles=dict(TILES_MEDIUM), splits=4))
    b = wait(Matmul.create(dev, 1024, 1024, 2048, "nn", tiles=dict(TILES_MEDIUM), splits=2))
    assert a.scratch is not None and b.scratch is a.scratch            # the smaller need reuses the larger buffer
    pool = matmul._scratch[dev]
    assert [s for s in pool.values() if all(s is not h for h in held)] == [a.scratch]
    del a, b
    gc.collect()
    assert all(any(s is h for h in held) for s in pool.values())     # nothing more held once no product uses it


# ---------------------------------------------------------------------------------------------
# MatmulPair: two weight-gradient products (tn, the same K) in one grouped dispatch, each summed by its own pass

PAIR_TILES = {"large": dict(TILES_LARGE), "medium": dict(TILES_MEDIUM), "uneven": dict(TILE_SHAPES["uneven"]),
              "64x128 tn16": {"BM": 64, "BN": 128, "BK": 8, "TM": 8, "TN": 16, "SPREAD": True, "PREFETCH": True,
                              "DOUBLE_BUFFER": True},
              "128x64 literal": dict(TILES_LARGE, BN=64, LITERAL=True)}


@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.parametrize("tiles", list(PAIR_TILES))
@pytest.mark.parametrize("bias_row", [False, True], ids=["plain", "bias_row"])
def test_pair_is_bit_identical_to_its_products_apart(dev, tiles, splits, bias_row):
    # Awkward shapes: M, N no multiple of any tile edge (multiples of 4), K = 93 rows; out accumulated into twice.
    K, shapes = 93, [(36, 20), (20, 52)]
    rng = np.random.default_rng(60)
    ops = [(rng.standard_normal((K, m)).astype(np.float32), rng.standard_normal((K, n)).astype(np.float32),
            rng.standard_normal((m + bias_row, n)).astype(np.float32)) for m, n in shapes]
    t = PAIR_TILES[tiles]
    pair = wait(MatmulPair.create(dev, shapes[0], shapes[1], K, accumulate=True, bias_row=bias_row, tiles=t,
                                  splits=splits))
    assert pair.grid[0] == sum(-(-n // t["BN"]) * -(-m // t["BM"]) for m, n in shapes)
    bufs = [(upload(dev, a, "a"), upload(dev, b, "b"), upload(dev, init, "out")) for a, b, init in ops]
    run(dev, lambda seq: pair.dispatch(seq, out1=bufs[0][2], a1=bufs[0][0], b1=bufs[0][1], out2=bufs[1][2],
                                       a2=bufs[1][0], b2=bufs[1][1]), times=2)
    for (m, n), (a, b, init), (_, _, out), member in zip(shapes, ops, bufs, (pair.m1, pair.m2)):
        got = download(dev, out, (m + bias_row, n))
        # apart: the same tiles and slices, one Matmul each
        alone = wait(Matmul.create(dev, m, n, K, "tn", accumulate=True, bias_row=bias_row, tiles=t, splits=splits))
        assert (alone.tiles, alone.splits) == (member.tiles, member.splits)
        o = upload(dev, init, "out-alone")
        run(dev, lambda seq: alone.dispatch(seq, out=o, a=upload(dev, a, "a"), b=upload(dev, b, "b")), times=2)
        want = download(dev, o, (m + bias_row, n))
        differ = got.view(np.uint32) != want.view(np.uint32)
        assert not differ.any(), f"{tiles} x{splits} {m}x{n}: {differ.sum()} entries differ from the product apart"
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        ref = a64.T @ b64
        scale = np.abs(a64).T @ np.abs(b64)
        if bias_row:
            ref, scale = np.vstack([ref, b64.sum(0)]), np.vstack([scale, np.abs(b64).sum(0)])
        assert_product(f"pair {tiles} x{splits} {m}x{n}", got, init + 2 * ref, 2 * scale + np.abs(init))


def test_pair_checks_its_operands_and_needs_one_reduction(dev):
    pair = wait(MatmulPair.create(dev, (8, 12), (16, 4), 40, tiles=dict(TILES_MEDIUM), splits=2))
    small, ok = dev.buffer(16, "small"), dev.buffer(4096, "ok")
    seq = dev.sequence("pair")
    with pytest.raises(GPUError, match="matmul pair 2: tn 16x4x40"):
        pair.dispatch(seq, out1=ok, a1=ok, b1=ok, out2=ok, a2=small, b2=ok)
    assert pair.splits == 2 and len(seq) == 0


def test_autotuned_pair_matches_numpy_and_is_remembered(dev, tune_cache):
    from tabgpt.ops import matmul
    matmul._tuned.pop(dev, None)
    K, shapes = 256, [(64, 96), (32, 128)]
    pair = wait(MatmulPair.create(dev, shapes[0], shapes[1], K, accumulate=False, bias_row=True, tiles="auto"))
    keys = [k for choices in json.loads(tune_cache.read_text()).values() for k in choices if "+pair:" in k]
    assert keys == ["tn:64x96x256+bias_row+pair:32x128"], keys
    assert "+pair:32x128" in dev.tune_log[-1]
    assert pair.tiles in [dict(t, **r) for t in matmul.TUNE_TILES for r in [{}] + matmul.TUNE_REFINE] \
        or pair.tiles == matmul.default_tiles(dev, 96, 128, K)
    rng = np.random.default_rng(61)
    ops = [(rng.standard_normal((K, m)).astype(np.float32), rng.standard_normal((K, n)).astype(np.float32))
           for m, n in shapes]
    outs = [dev.buffer(4 * (m + 1) * n, "out") for m, n in shapes]
    run(dev, lambda seq: pair.dispatch(seq, out1=outs[0], a1=upload(dev, ops[0][0]), b1=upload(dev, ops[0][1]),
                                       out2=outs[1], a2=upload(dev, ops[1][0]), b2=upload(dev, ops[1][1])))
    for (m, n), (a, b), out in zip(shapes, ops, outs):
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        ref = np.vstack([a64.T @ b64, b64.sum(0)])
        scale = np.vstack([np.abs(a64).T @ np.abs(b64), np.abs(b64).sum(0)])
        assert_product(f"autotuned pair {m}x{n}", download(dev, out, (m + 1, n)), ref, scale)


# ---------------------------------------------------------------------------------------------
# BatchedMatmul: one product per (batch element, head), each a strided matrix inside a larger one

def embed(rng, batches, heads, rows, cols, st, fill):
    """A buffer's floats holding a (batches, heads, rows, cols) stack of matrices at Strided st, everything else
    `fill` (random finite values where None); returns (flat array, the matrices)."""
    n = st.floats(batches, heads, rows, cols)
    flat = rng.standard_normal(n).astype(np.float32) if fill is None else np.full(n, fill, np.float32)
    mats = rng.standard_normal((batches, heads, rows, cols)).astype(np.float32)
    for bi in range(batches):
        for h in range(heads):
            o = st.base + bi * st.per_batch + h * st.per_head
            for r in range(rows):
                flat[o + r * st.ld: o + r * st.ld + cols] = mats[bi, h, r]
    return flat, mats


def extract(flat, batches, heads, rows, cols, st):
    return np.array([[[flat[st.base + bi * st.per_batch + h * st.per_head + r * st.ld:][:cols] for r in range(rows)]
                      for h in range(heads)] for bi in range(batches)])


@pytest.mark.parametrize("literal", [False, True], ids=["loop", "literal"])
@pytest.mark.parametrize("layout", ["nn", "nt", "tn"])
def test_batched_products_match_numpy(dev, layout, literal):
    from tabgpt.ops.matmul import BatchedMatmul, Strided
    rng = np.random.default_rng(70)
    # odd M and K: rows' last vec4s read their padding (nt reads both operands along K: K % 4 == 0 there)
    batches, heads, M, N, K = 2, 3, 37, 20, 44 if layout == "nt" else 41
    a_rows, a_cols = (K, M) if layout == "tn" else (M, K)
    b_rows, b_cols = (N, K) if layout == "nt" else (K, N)
    # heads side by side in a row (as in qkv), batch elements one after another, a base offset
    sa = Strided(ld=heads * 44 + 8, base=4, per_batch=a_rows * (heads * 44 + 8), per_head=44)
    sb = Strided(ld=48, base=8, per_batch=heads * b_rows * 48, per_head=b_rows * 48)
    so = Strided(ld=heads * 20, base=12, per_batch=M * heads * 20, per_head=20)
    a, am = embed(rng, batches, heads, a_rows, a_cols, sa, None)
    b, bm = embed(rng, batches, heads, b_rows, b_cols, sb, None)
    out0, _ = embed(rng, batches, heads, M, N, so, 5.0)
    tiles = {"BM": 16, "BN": 8, "BK": 8, "TM": 4, "TN": 4, "PREFETCH": True, **({"LITERAL": True} if literal else {})}
    mm = wait(BatchedMatmul.create(dev, M, N, K, layout, batches, heads, sa, sb, so, tiles=tiles))
    bo = upload(dev, out0, "out")
    run(dev, lambda seq: mm.dispatch(seq, out=bo, a=upload(dev, a, "a"), b=upload(dev, b, "b")))
    got = np.frombuffer(wait(dev.read(bo)), np.float32)
    A = am.transpose(0, 1, 3, 2) if layout == "tn" else am
    B = bm.transpose(0, 1, 3, 2) if layout == "nt" else bm
    ref = A.astype(np.float64) @ B.astype(np.float64)
    scale = np.abs(A).astype(np.float64) @ np.abs(B).astype(np.float64)
    assert_product(f"batched {layout}", extract(got, batches, heads, M, N, so), ref, scale)
    # and nothing outside the matrices of out was written (N % 4 == 0 here: no padding written either)
    mask = np.ones(got.size, bool)
    for bi in range(batches):
        for h in range(heads):
            o = so.base + bi * so.per_batch + h * so.per_head
            for r in range(M):
                mask[o + r * so.ld: o + r * so.ld + N] = False
    assert (got[mask] == 5.0).all()


def test_batched_causal_products_read_only_the_band_and_skip_the_upper_blocks(dev):
    """The backward's products of causal attention: P and dS are zero above the diagonal up to 128 columns past it
    and NaN beyond (never to be read); S's blocks wholly above the diagonal are never written."""
    from tabgpt.ops.matmul import BatchedMatmul, Strided
    rng = np.random.default_rng(71)
    T, Tp, hs, heads = 301, 304, 12, 2
    sp = Strided(ld=Tp, per_head=T * Tp)
    P = rng.standard_normal((heads, T, Tp)).astype(np.float32)
    i, j = np.indices((T, Tp))
    P[:, j > i] = 0.0
    P[:, j > i + 131] = np.nan
    X = rng.standard_normal((heads, T, hs)).astype(np.float32)          # dO or Q (tn), K (nn)
    sx = Strided(ld=hs, per_head=T * hs)
    tiles = {"BM": 32, "BN": 8, "BK": 8, "TM": 4, "TN": 4, "PREFETCH": True}
    Pl = np.tril(P[:, :, :T].astype(np.float64))
    for layout, causal, ref in [("tn", "k_from_row", Pl.transpose(0, 2, 1) @ X), ("nn", "k_to_row", Pl @ X)]:
        mm = wait(BatchedMatmul.create(dev, T, hs, T, layout, 1, heads, sp, sx, sx, causal=causal, tiles=tiles))
        bo = dev.buffer(4 * heads * T * hs, "out")
        run(dev, lambda seq: mm.dispatch(seq, out=bo, a=upload(dev, P, "p"), b=upload(dev, X, "x")))
        got = download(dev, bo, (heads, T, hs))
        assert np.isfinite(got).all(), f"{layout} read past the band"
        scale = np.abs(Pl).transpose(0, 2, 1) @ np.abs(X) if layout == "tn" else np.abs(Pl) @ np.abs(X)
        assert_product(f"causal {layout}", got, ref, scale)
    Q = rng.standard_normal((heads, T, hs)).astype(np.float32)
    mm = wait(BatchedMatmul.create(dev, T, T, hs, "nt", 1, heads, sx, sx, sp, causal="skip_upper", tiles=tiles))
    bo = upload(dev, np.full(heads * T * Tp, 7.0, np.float32), "s")
    run(dev, lambda seq: mm.dispatch(seq, out=bo, a=upload(dev, Q, "q"), b=upload(dev, X, "k")))
    S = download(dev, bo, (heads, T, Tp))
    ref = Q.astype(np.float64) @ X.astype(np.float64).transpose(0, 2, 1)
    low = j[:, :T] <= i[:, :T]
    assert_product("causal nt", S[:, :, :T][:, low], ref[:, low],
                   (np.abs(Q).astype(np.float64) @ np.abs(X).transpose(0, 2, 1))[:, low])
    above = (j // 8) * 8 > (i // 32) * 32 + 31                           # blocks of 32 x 8 wholly above
    assert above.any() and (S[:, above] == 7.0).all()


def test_batched_softmax_stores_match_numpy(dev):
    """softmax "p": S = Q K^T's blocks store P = exp(scale S - lse) on and below the diagonal, zeros past it and in
    the rows' padding; "ds": dP = dO V^T's store scale P (dP - delta), P read at out's place. Blocks wholly above
    the diagonal keep what they held. T odd (rows padded to Tp), heads side by side in the operands' rows."""
    from tabgpt.ops.matmul import BatchedMatmul, Strided
    rng = np.random.default_rng(72)
    batches, heads, T, Tp, hs = 2, 3, 45, 48, 12
    sx = Strided(ld=heads * hs, per_batch=T * heads * hs, per_head=hs)
    sp = Strided(ld=Tp, per_batch=heads * T * Tp, per_head=T * Tp)
    X = rng.standard_normal((4, batches, T, heads * hs)).astype(np.float32)      # Q, K, dO, V
    r = rng.standard_normal((2, batches * heads * T)).astype(np.float32)          # lse, delta
    tiles = {"BM": 16, "BN": 8, "BK": 8, "TM": 4, "TN": 4, "PREFETCH": True}
    mm = {kind: wait(BatchedMatmul.create(dev, T, T, hs, "nt", batches, heads, sx, sx, sp, causal="skip_upper",
                                          tiles=tiles, softmax=kind)) for kind in ("p", "ds")}
    bufs = [upload(dev, x, f"x{i}") for i, x in enumerate(X)]
    rows = [upload(dev, x, f"r{i}") for i, x in enumerate(r)]
    bp, bds = (upload(dev, np.full(batches * heads * T * Tp, 7.0, np.float32), n) for n in ("p", "ds"))
    run(dev, lambda seq: (mm["p"].dispatch(seq, out=bp, a=bufs[0], b=bufs[1], row_in=rows[0]),
                          mm["ds"].dispatch(seq, out=bds, a=bufs[2], b=bufs[3], row_in=rows[1], aux=bp)))
    got = {n: np.frombuffer(wait(dev.read(b)), np.float32).reshape(batches, heads, T, Tp) for n, b in
           (("p", bp), ("ds", bds))}
    heads_of = lambda x: x.astype(np.float64).reshape(batches, T, heads, hs).transpose(0, 2, 1, 3)  # noqa: E731
    scale = 1 / np.sqrt(hs)
    i, j = np.indices((T, Tp))
    low, made = j <= i, (j // 8) * 8 <= (i // 16) * 16 + 15
    S = np.zeros((batches, heads, T, Tp))
    S[..., :T] = heads_of(X[0]) @ heads_of(X[1]).transpose(0, 1, 3, 2)
    dP = np.zeros_like(S)
    dP[..., :T] = heads_of(X[2]) @ heads_of(X[3]).transpose(0, 1, 3, 2)
    lse, delta = (x.reshape(batches, heads, T, 1).astype(np.float64) for x in r)
    P = np.where(low, np.exp(scale * S - lse), 0.0)
    dS = np.where(low, scale * P * (dP - delta), 0.0)
    for name, ref in (("p", P), ("ds", dS)):
        g = got[name]
        assert np.abs(g[..., made] - ref[..., made]).max() < 1e-5 * max(1.0, np.abs(ref).max()), name
        assert (g[..., made & ~low] == 0.0).all() and (g[..., ~made] == 7.0).all(), name
    with pytest.raises(GPUError, match="needs row_in"):
        run(dev, lambda seq: mm["p"].dispatch(seq, out=bp, a=bufs[0], b=bufs[1]))
    with pytest.raises(GPUError, match="needs aux"):
        run(dev, lambda seq: mm["ds"].dispatch(seq, out=bds, a=bufs[2], b=bufs[3], row_in=rows[1]))
    with pytest.raises(GPUError, match="row_in binds"):
        run(dev, lambda seq: mm["p"].dispatch(seq, out=bp, a=bufs[0], b=bufs[1], row_in=upload(dev, r[0][:9])))
    with pytest.raises(GPUError, match="pass out"):
        run(dev, lambda seq: mm["p"].dispatch(seq, out=None, a=bufs[0], b=bufs[1], row_in=rows[0]))
    with pytest.raises(GPUError, match="aux is for softmax 'ds' stores, this product's softmax is 'p'"):
        run(dev, lambda seq: mm["p"].dispatch(seq, out=bp, a=bufs[0], b=bufs[1], row_in=rows[0], aux=bds))
    with pytest.raises(GPUError, match="square causal products"):
        wait(BatchedMatmul.create(dev, T, T, hs, "nt", 1, 1, sx, sx, sp, tiles=tiles, softmax="p"))
    with pytest.raises(GPUError, match="softmax must be"):
        wait(BatchedMatmul.create(dev, T, T, hs, "nt", 1, 1, sx, sx, sp, causal="skip_upper", softmax="q"))


@pytest.mark.parametrize("causal", [None, "k_from_row"])
def test_batched_pair_is_bit_identical_to_its_products_apart(dev, causal):
    """second (PAIRED): two tn products of one shape in one dispatch, as dV = P^T dO and dK = dS^T Q: A's in buffers
    of their own, B's with other strides (dO's rows C long, Q's inside qkv's 3C), both outs in one buffer (dqkv's
    v and k thirds); the same floats as the two products apart, and nothing else of out written."""
    from tabgpt.ops.matmul import BatchedMatmul, Strided
    rng = np.random.default_rng(73)
    batches, heads, T, Tp, hs = 2, 3, 45, 48, 12
    C = heads * hs
    sp = Strided(ld=Tp, per_batch=heads * T * Tp, per_head=T * Tp)
    sdo = Strided(ld=C, per_batch=T * C, per_head=hs)
    third = lambda i: Strided(ld=3 * C, base=i * C, per_batch=T * 3 * C, per_head=hs)   # noqa: E731
    bufs = {n: upload(dev, rng.standard_normal(n_).astype(np.float32), n) for n, n_ in
            (("p", batches * heads * T * Tp), ("ds", batches * heads * T * Tp), ("do", batches * T * C),
             ("qkv", batches * T * 3 * C))}
    tiles = {"BM": 16, "BN": 8, "BK": 8, "TM": 4, "TN": 4, "PREFETCH": True}
    create = lambda b, out, **kw: wait(BatchedMatmul.create(  # noqa: E731
        dev, T, hs, T, "tn", batches, heads, sp, b, out, causal=causal, tiles=tiles, **kw))
    pair = create(sdo, third(2), second=(sp, third(0), third(1)))
    apart = [create(sdo, third(2)), create(third(0), third(1))]
    outs = [upload(dev, np.full(batches * T * 3 * C, 5.0, np.float32), f"out{i}") for i in range(2)]
    run(dev, lambda seq: pair.dispatch(seq, out=outs[0], a=bufs["p"], b=bufs["do"], a2=bufs["ds"], b2=bufs["qkv"]))
    run(dev, lambda seq: (apart[0].dispatch(seq, out=outs[1], a=bufs["p"], b=bufs["do"]),
                          apart[1].dispatch(seq, out=outs[1], a=bufs["ds"], b=bufs["qkv"])))
    got, ref = (np.frombuffer(wait(dev.read(o)), np.float32) for o in outs)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))
    assert (got.reshape(batches, T, 3, C)[:, :, 0] == 5.0).all() and (got != 5.0).sum() > 0
    with pytest.raises(GPUError, match="a pair needs a2 and b2"):
        run(dev, lambda seq: pair.dispatch(seq, out=outs[0], a=bufs["p"], b=bufs["do"]))
    with pytest.raises(GPUError, match="a2 and b2 are for a pair"):
        run(dev, lambda seq: apart[0].dispatch(seq, out=outs[0], a=bufs["p"], b=bufs["do"], a2=bufs["ds"],
                                               b2=bufs["qkv"]))
    with pytest.raises(GPUError, match="b2 binds"):
        run(dev, lambda seq: pair.dispatch(seq, out=outs[0], a=bufs["p"], b=bufs["do"], a2=bufs["ds"],
                                           b2=bufs["do"]))
    with pytest.raises(GPUError, match="two tn products without softmax stores whose outs have one row length"):
        create(sdo, third(2), second=(sp, third(0), sdo))


def test_batched_matmul_refuses_unaligned_strides_and_small_buffers(dev):
    from tabgpt.ops.matmul import BatchedMatmul, Strided
    with pytest.raises(GPUError, match="multiples of 4"):
        wait(BatchedMatmul.create(dev, 8, 8, 8, "nn", 1, 1, Strided(ld=10), Strided(ld=8), Strided(ld=8)))
    with pytest.raises(GPUError, match="need ld >= 12"):
        wait(BatchedMatmul.create(dev, 8, 8, 9, "nn", 1, 1, Strided(ld=8), Strided(ld=8), Strided(ld=8)))
    with pytest.raises(GPUError, match="K % 4"):
        wait(BatchedMatmul.create(dev, 8, 8, 9, "nt", 1, 1, Strided(ld=12), Strided(ld=12), Strided(ld=8)))
    mm = wait(BatchedMatmul.create(dev, 8, 8, 8, "nn", 2, 1, Strided(ld=8, per_batch=64), Strided(ld=8),
                                   Strided(ld=8, per_batch=64)))
    seq = dev.sequence("small")
    with pytest.raises(GPUError, match="binds 256 bytes"):
        mm.dispatch(seq, out=dev.buffer(512), a=dev.buffer(256), b=dev.buffer(256))
    assert len(seq) == 0


def test_autotune_gives_its_trial_buffers_back(dev, tune_cache):
    from tabgpt.ops import matmul
    matmul._tuned.pop(dev, None)
    M = N = 32
    K = 4096
    before = dev.bytes_allocated
    with dev.recording() as outer:
        wait(matmul.autotune(dev, M, N, K, "tn", persist=False))
    # its operands (512 KiB each) and trial products' buffers are freed; what stays is the split-K scratch that
    # products share (up to TUNE_FINE_SPLITS slices of the 4 KiB output, 128 KiB, and smaller ones made before it),
    # none of it the caller's
    assert dev.bytes_allocated - before < 2 * 4 * matmul.TUNE_FINE_SPLITS * M * N < 4 * K * M
    assert outer == []       # (an inner recording keeps its buffers from the outer one)
