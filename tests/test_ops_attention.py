"""Fused causal attention (shaders/attention.wgsl) against the float64 NumPy reference: forward (out, lse) and
backward (dqkv) on awkward shapes and forced tile shapes, T=1, peaky softmaxes, determinism; the software-pipelined
inner loops (PIPELINE) bit-identical to the plain ones (the default); the register prefetch of the streamed tiles
(PREFETCH) against the reference and bit-identical to the plain loads, alone and with PIPELINE."""

import numpy as np
import pytest

import reference
from tabgpt import gpu
from tabgpt.gpu import wait
from tabgpt.ops import attention as attention_op
from tabgpt.ops.attention import (ENTRIES, MAX_PREFETCH_VEC4S, Attention, Tile, pick_tile, prefetch_problem,
                                  prefetch_vec4s, tile_problem)

# Errors are relative to max(1, max |reference|) of each output; float32 accumulation over T <= 130 keys
# measures 1e-7 to 2e-6 here, so these leave a margin of 5x or more.
TOL_OUT = 1e-5
TOL_LSE = 1e-5
TOL_GRAD = 2e-5


def lse_reference(qkv, n_head):
    """(B, NH, T) logsumexp over the visible keys of each row's scaled scores, in float64."""
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    x = qkv.astype(np.float64).reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)
    s = x[0] @ x[1].transpose(0, 1, 3, 2) / np.sqrt(hs)                       # (B, NH, T, T)
    s[..., np.triu(np.ones((T, T), dtype=bool), k=1)] = -np.inf
    m = s.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(s - m).sum(axis=-1, keepdims=True)))[..., 0]


def tiles_of(tile):
    """{entry: Tile} from one Tile for all three kernels, a dict of them, or None (each picks its own)."""
    return tile if isinstance(tile, dict) or tile is None else {e: tile for e in ENTRIES}


def run_attention(dev, B, T, C, NH, qkv, dout, tile=None, garbage_dqkv=True, pipeline=True, prefetch=False,
                  dq="auto", dq_rows=None, backward="auto", heavy_first=None, heavy_group=None, dq_options=None):
    """Forward and backward on the GPU; returns (out (B, T, C), lse (B, NH, T), dqkv (B, T, 3C)).
    tile: a Tile forced on all three tiled kernels, or {entry: Tile} (None: each picks its own);
    pipeline, prefetch: the PIPELINE and PREFETCH overrides (PREFETCH only where the tile allows it)."""
    attn = wait(Attention.create(dev, B=B, T=T, C=C, n_head=NH, tiles=tiles_of(tile), pipeline=pipeline,
                                 prefetch=prefetch, dq=dq, dq_rows=dq_rows, backward=backward,
                                 heavy_first=heavy_first, heavy_group_size=heavy_group, dq_options=dq_options))
    assert dq == "auto" or attn.dq == dq
    if dq_options is not None:
        c = attn.k["attention_backward_dq_ds"].constants
        want = attention_op.dq_ds_options(**dq_options, hs=C // NH, limits=dev.limits)
        assert (c["KS"], c["DQ_PREFETCH"], c["DS_VEC4"]) == (want["ks"], want["prefetch"], want["vec4"] and T % 4 == 0)
    assert backward == "auto" or attn.backward_mode == backward
    assert all(attn.k[e].constants["PIPELINE"] is pipeline for e in attn.tiles)
    if heavy_first is not None:
        assert all(attn.k[e].constants["HEAVY_FIRST"] is heavy_first for e in attn.tiles)
        assert all(attn.k[e].constants["HEAVY_GROUP"] == (heavy_group or 0) for e in attn.tiles)
    hs = C // NH
    assert attn.prefetch == {e: prefetch and not attention_op.prefetch_problem(hs, attn.tiles[e]) for e in attn.tiles}
    assert all(attn.k[e].constants["PREFETCH"] is attn.prefetch[e] for e in attn.tiles)
    print("tiles:", {e[len("attention_"):]: tuple(vars(t).values()) for e, t in attn.tiles.items()},
          "prefetch:", attn.prefetch)
    b_qkv = dev.buffer(qkv.nbytes, "qkv", qkv)
    b_out = dev.buffer(4 * B * T * C, "out")
    b_lse = dev.buffer(4 * B * NH * T, "lse")
    b_dout = dev.buffer(dout.nbytes, "dout", dout)
    # NaN-filled: the backward must write every element of dqkv, not add to it.
    fill = np.full(B * T * 3 * C, np.nan if garbage_dqkv else 0.0, dtype=np.float32)
    b_dqkv = dev.buffer(fill.nbytes, "dqkv", fill)
    if attn.products:   # NaN-filled too: the products must read only the entries of P and dS that are stored
        for scratch in (attn.products["s_buf"], attn.products["dp_buf"]):
            dev.write(scratch, np.full(scratch.size // 4, np.nan, np.float32))
    seq = dev.sequence("attention")
    attn.forward(seq, out=b_out, lse=b_lse, qkv=b_qkv)
    attn.backward(seq, dqkv=b_dqkv, dout=b_dout, qkv=b_qkv, out=b_out, lse=b_lse)
    wait(seq.build())
    seq.run()
    read = lambda buf, shape: np.frombuffer(wait(dev.read(buf)), dtype=np.float32).reshape(shape)
    return read(b_out, (B, T, C)), read(b_lse, (B, NH, T)), read(b_dqkv, (B, T, 3 * C))


def rel_err(got, ref):
    return float(np.abs(got.astype(np.float64) - ref).max() / max(1.0, np.abs(ref).max()))


def inputs(B, T, C, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    qkv = (scale * rng.standard_normal((B, T, 3 * C))).astype(np.float32)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    return qkv, dout


def check(dev, B, T, C, NH, seed=0, scale=1.0, tile=None, pipeline=True, prefetch=False, backward="auto"):
    qkv, dout = inputs(B, T, C, seed, scale)
    out, lse, dqkv = run_attention(dev, B, T, C, NH, qkv, dout, tile, pipeline=pipeline, prefetch=prefetch,
                                   backward=backward)
    ref_out, att = reference.attention_forward(qkv, NH)
    ref_dqkv = reference.attention_backward(dout, qkv, att, NH)
    ref_lse = lse_reference(qkv, NH)
    errs = {"out": rel_err(out, ref_out), "lse": rel_err(lse, ref_lse), "dqkv": rel_err(dqkv, ref_dqkv)}
    for part, name in enumerate("qkv"):   # per third, so that a failure says which gradient is off
        errs["d" + name] = rel_err(dqkv[..., part * C:(part + 1) * C], ref_dqkv[..., part * C:(part + 1) * C])
    shape = (f"B={B} T={T} C={C} NH={NH} hs={C // NH} scale={scale} tile={tile} pipeline={pipeline} "
             f"prefetch={prefetch} backward={backward}")
    assert np.isfinite(dqkv).all(), f"{shape}: dqkv has non-finite entries (not every element written)"
    assert errs["out"] < TOL_OUT, f"{shape}: out max rel err {errs['out']:.3g} > {TOL_OUT}"
    assert errs["lse"] < TOL_LSE, f"{shape}: lse max rel err {errs['lse']:.3g} > {TOL_LSE}"
    assert errs["dqkv"] < TOL_GRAD, f"{shape}: dqkv max rel err {errs} > {TOL_GRAD}"
    print(shape, {k: f"{v:.2g}" for k, v in errs.items()})
    return errs


# Both forms of the kernels' inner loops: software-pipelined (PIPELINE) and plain (the default).
PIPELINES = pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "plain"])
# Both ways of loading the streamed tiles: prefetched into registers one tile ahead (PREFETCH, where the tile
# allows it) and loaded between two barriers (the default).
PREFETCHES = pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "direct"])


@PREFETCHES
@PIPELINES
@pytest.mark.parametrize("B,T,C,NH", [(3, 37, 72, 3), (2, 64, 64, 4), (1, 130, 48, 2)])
def test_attention_matches_reference(dev, B, T, C, NH, pipeline, prefetch):
    check(dev, B, T, C, NH, seed=T, pipeline=pipeline, prefetch=prefetch)


@pytest.mark.parametrize("B,T,C,NH", [(3, 37, 72, 3), (2, 64, 64, 4), (1, 130, 48, 2), (2, 301, 32, 2), (2, 1, 24, 3)])
def test_attention_backward_through_products_matches_reference(dev, B, T, C, NH):
    """backward="products": S's and dP's batched products storing P and dS, then dV, dK, dQ as batched products;
    T = 130 and 301: S's blocks of 64 (lavapipe's tiles) above the diagonal are skipped."""
    check(dev, B, T, C, NH, seed=T + 1, backward="products")


def test_products_pair_dv_and_dk_bit_identically(dev, monkeypatch):
    """dV's and dK's products as one batched pair (the default) or apart (TABGPT_MATMUL_PAIRS=0): the same bits."""
    B, T, C, NH = 2, 77, 48, 3
    qkv, dout = inputs(B, T, C, seed=5)
    grads = {}
    for pairs in ("1", "0"):
        monkeypatch.setenv("TABGPT_MATMUL_PAIRS", pairs)
        attn = wait(Attention.create(dev, B=B, T=T, C=C, n_head=NH, backward="products"))
        assert ("dvk" in attn.products) == (pairs == "1") and ("dv" in attn.products) == (pairs == "0")
        grads[pairs] = run_attention(dev, B, T, C, NH, qkv, dout, backward="products")[2]
    assert np.array_equal(grads["1"].view(np.uint32), grads["0"].view(np.uint32))


def test_products_read_only_blocks_that_are_stored():
    """The products that read P and dS past the diagonal (within squares of their rows on it) must find blocks that
    S's and dP's products store; other tiles are refused before anything runs."""
    tiles = lambda bm, bn: {"BM": bm, "BN": bn}   # noqa: E731
    for T in (1, 64, 130, 256, 301, 1024):
        attention_op.reads_made_blocks(T, tiles(128, 128), 128, "x")
        attention_op.reads_made_blocks(T, tiles(128, 64), 128, "x")
        attention_op.reads_made_blocks(T, tiles(64, 64), 64, "x")
        attention_op.reads_made_blocks(T, tiles(128, 128), 64, "x")
    with pytest.raises(gpu.GPUError, match=r"rows of 96 read entry \(96, 191\), in a block of 128 x 128"):
        attention_op.reads_made_blocks(300, tiles(128, 128), 96, "s read by dv")
    with pytest.raises(gpu.GPUError, match="not made"):
        attention_op.reads_made_blocks(256, tiles(64, 64), 128, "s read by dv")


def test_only_the_kernels_that_run_are_compiled(dev):
    """flash: the forward, dk/dv, delta and one dq kernel (that of the dq mode); products: the forward and delta
    (and the batched products); none (forward only): the forward alone, and backward refuses to run."""
    make = lambda **kw: wait(Attention.create(dev, B=2, T=16, C=32, n_head=2, **kw))   # noqa: E731
    fwd, dq, dkv, dq_ds, delta = (*ENTRIES, "attention_backward_dq_ds", "attention_backward_delta")
    assert set(make(backward="flash", dq="ds").k) == {fwd, dkv, dq_ds, delta}
    assert set(make(backward="flash", dq="recompute").k) == {fwd, dq, dkv, delta}
    products = make(backward="products")
    assert set(products.k) == {fwd, delta} and set(products.tiles) == {fwd} and products.products
    none = make(backward="none")
    assert set(none.k) == {fwd} and none.backward_mode == "none" and none.delta is None and not none.products
    b = {n: dev.buffer(4 * 2 * 16 * 3 * 32, n) for n in ("qkv", "out", "lse", "dout", "dqkv")}
    seq = dev.sequence("forward only")
    none.forward(seq, out=b["out"], lse=b["lse"], qkv=b["qkv"])
    with pytest.raises(gpu.GPUError, match="forward only.*backward='auto' to train"):
        none.backward(seq, dqkv=b["dqkv"], dout=b["dout"], qkv=b["qkv"], out=b["out"], lse=b["lse"])


def test_attention_backward_mode_is_checked(dev, monkeypatch):
    with pytest.raises(gpu.GPUError, match="must be auto, flash or products"):
        wait(Attention.create(dev, B=1, T=8, C=32, n_head=2, backward="gemm"))
    monkeypatch.setenv("TABGPT_ATTENTION_BACKWARD", "products")
    assert wait(Attention.create(dev, B=1, T=8, C=32, n_head=2)).backward_mode == "products"
    monkeypatch.delenv("TABGPT_ATTENTION_BACKWARD")
    # "auto": the products from PRODUCTS_MIN_T positions where their scratches fit (DS_MAX_BYTES, a binding)
    mode = lambda B, T, NH: attention_op.backward_mode(dev, B, T, NH)   # noqa: E731
    assert mode(1, 383, 2) == "flash" and mode(1, 384, 2) == "products" and mode(1, 1024, 2) == "products"
    assert mode(64, 1024, 8) == "flash"                          # 2 GiB each: the fused kernels, without a word
    with pytest.raises(gpu.GPUError, match="use a smaller batch or backward=.flash."):
        wait(Attention.create(dev, B=64, T=1024, C=32, n_head=8, backward="products"))


def test_attention_single_token(dev):
    # T=1: the output is v itself, lse the single scaled score, dv = dout, and dq = dk = 0 up to the rounding
    # of dout.v - dout.out (the two dots are summed in different orders).
    errs = check(dev, 2, 1, 24, 3, seed=1)
    assert errs["out"] == 0.0 and errs["dq"] < 1e-6 and errs["dk"] < 1e-6, errs


def test_attention_peaky_softmax(dev):
    # Large scores (std ~10 after scaling): the online softmax must rescale its running sums correctly.
    check(dev, 1, 70, 32, 2, seed=5, scale=3.5)


@PREFETCHES
@PIPELINES
@pytest.mark.parametrize("tile", [Tile(4, 8), Tile(8, 4), Tile(2, 8), Tile(1, 4)])
def test_attention_workgroup_shapes(dev, tile, pipeline, prefetch):
    # Blocks and streamed tiles of different lengths cut the diagonal unevenly (tiles with fully masked rows);
    # hs=20 (5 vec4s) leaves threads without output dims, and TC=2 or 1 splits each head into 2 or 3 chunks.
    # (PREFETCH: Tile(4, 8) and Tile(2, 8) prefetch 3 vec4s a thread; NR = 4 would need 5: loaded directly.)
    check(dev, 2, 29, 40, 2, seed=7, tile=tile, pipeline=pipeline, prefetch=prefetch)


@PREFETCHES
@PIPELINES
@pytest.mark.parametrize("tile", [Tile(4, 4, 4), Tile(8, 2, 4), Tile(2, 4, 4), Tile(1, 2, 4)])
def test_attention_four_rows_per_thread(dev, tile, pipeline, prefetch):
    # RPT = 4: blocks of 4 NR rows (8 to 16 here) against streamed tiles of 4 to 32 rows; T = 29 leaves partial
    # blocks whose last rows lie past T, and TC = 2 or 1 splits the hs=20 heads into chunks.
    # (These NR <= 4 would need 5 to 10 prefetch vec4s a thread: PREFETCH falls back to direct loads.)
    check(dev, 2, 29, 40, 2, seed=8, tile=tile, pipeline=pipeline, prefetch=prefetch)


def test_rows_per_thread_must_be_2_or_4():
    assert "RPT=3" in tile_problem(ENTRIES[0], 64, Tile(8, 4, 3), gpu.DEFAULT_LIMITS)


@pytest.fixture(scope="module")
def dev_full():
    """The device at the adapter's own limits (32 KiB of workgroup memory on lavapipe): the bigger tiles."""
    return wait(gpu.open_device())


@pytest.mark.parametrize("tile", [None, Tile(8, 16), Tile(4, 32), Tile(8, 8, 4), Tile(4, 16, 4)])
def test_attention_big_tiles(dev_full, tile):
    # Blocks of 32 and 64 rows, as a GPU with 32-48 KiB of workgroup memory runs them.
    if tile and any(tile_problem(e, 20, tile, dev_full.limits) for e in ENTRIES):
        pytest.skip(f"this adapter grants only {dev_full.limits['max-compute-workgroup-storage-size']} bytes")
    check(dev_full, 2, 70, 40, 2, seed=11, tile=tile)


def test_attention_four_rows_per_thread_gpt2_head_size(dev_full):
    # hs = 64 in one chunk, blocks of 16 rows: 24-31 KiB of workgroup memory, as GPUs grant.
    if any(tile_problem(e, 64, Tile(8, 4, 4), dev_full.limits) for e in ENTRIES):
        pytest.skip(f"this adapter grants only {dev_full.limits['max-compute-workgroup-storage-size']} bytes")
    check(dev_full, 1, 45, 128, 2, seed=9, tile=Tile(8, 4, 4))


@pytest.mark.parametrize("memory", [16384, 32768, 49152])
def test_every_head_size_gets_a_fitting_tile(memory):
    limits = dict(gpu.DEFAULT_LIMITS, **{"max-compute-workgroup-storage-size": memory})
    for hs in range(4, 129, 4):
        for entry in ENTRIES:
            for rpt in (2, 4):
                t = pick_tile(entry, hs, 1024, limits, rpt)
                assert t.RPT == rpt and tile_problem(entry, hs, t, limits) == "", (entry, hs, t)
                if hs <= 64 and memory >= 32768:
                    assert t.chunks(hs) == 1, f"{entry} hs={hs}: {t} splits heads although memory allows whole ones"
    # GPT-2 on an H100 natively (48 KiB, 1024 threads): the shapes measured fastest there.
    h100 = dict(limits, **{"max-compute-invocations-per-workgroup": 1024, "max-compute-workgroup-size-x": 1024})
    if memory == 49152:
        assert [pick_tile(e, 64, 1024, h100, 2) for e in ENTRIES] == [Tile(8, 32), Tile(8, 16), Tile(8, 16)]
        assert [pick_tile(e, 64, 1024, h100, 4) for e in ENTRIES] == [Tile(8, 16, 4), Tile(8, 8, 4), Tile(8, 8, 4)]


@pytest.mark.parametrize("B,T,C,NH", [(1, 21, 128, 2), (1, 18, 256, 2)])
def test_attention_gpt2_head_sizes(dev, B, T, C, NH):
    # hs=64 (GPT-2) and hs=128 (the largest supported: heads split into chunks to fit 16 KiB).
    check(dev, B, T, C, NH, seed=C)


def test_attention_memory_is_linear_in_T_when_dq_is_recomputed(dev):
    # backward "flash", dq "recompute": no (T, T) buffer anywhere, the op's only scratch is delta (B, NH, T) (and a
    # 16-byte dummy); dq "ds": the stored dS (B, NH, T, T) besides.
    # backward "products" (the default from T = 384 where it fits): two (B, NH, T, T) scratches instead.
    # (each op kept while the next is made: Device.bytes_allocated counts a collected one out)
    kept = []
    before = dev.bytes_allocated
    attn = wait(Attention.create(dev, B=2, T=1024, C=64, n_head=4, dq="recompute", backward="flash"))
    assert attn.dq == "recompute" and attn.ds is None
    assert dev.bytes_allocated - before <= 16 + 16 + 4 * 2 * 4 * 1024, dev.bytes_allocated - before
    kept.append(attn)
    before = dev.bytes_allocated
    attn = wait(Attention.create(dev, B=2, T=1024, C=64, n_head=4, backward="flash"))
    assert attn.dq == "ds" and dev.bytes_allocated - before == 4 * 2 * 4 * 1024 * (1 + 1024)   # delta, dS
    kept.append(attn)
    before = dev.bytes_allocated
    attn = wait(Attention.create(dev, B=2, T=1024, C=64, n_head=4))
    assert attn.backward_mode == "products" and attn.ds is None
    # delta, S and dP, the 16-byte dummies (each product's bias and epilogue operand; no dkv kernel to bind one):
    # four products, dV's and dK's a pair
    assert sorted(k for k in attn.products if not k.endswith("_buf")) == ["dp", "dq", "dvk", "s"]
    assert dev.bytes_allocated - before == 4 * 2 * 4 * 1024 * (1 + 2 * 1024) + 4 * 32
    kept.append(attn)
    before = dev.bytes_allocated
    attn = wait(Attention.create(dev, B=2, T=1024, C=64, n_head=4, backward="none"))
    assert dev.bytes_allocated == before                              # forward only: nothing besides its params


@pytest.mark.parametrize("B,T,C,NH", [(3, 37, 72, 3), (2, 130, 48, 3), (1, 1, 32, 2), (2, 67, 128, 2),
                                      (1, 40, 256, 2), (2, 64, 24, 1), (2, 23, 40, 2), (1, 70, 124, 1)])
def test_dq_from_stored_ds_matches_the_recomputed_dq(dev, B, T, C, NH):
    # The same dS values and the same fma chain over the keys in order: dQ equal to attention_backward_dq's (hs
    # 20, 24, 64, 124, 128: 4 and 8 query rows per thread), dK and dV unchanged, and both against the reference.
    qkv, dout = inputs(B, T, C, seed=T)
    runs = {m: run_attention(dev, B, T, C, NH, qkv, dout, dq=m) for m in ("recompute", "ds")}
    (_, _, d_rec), (_, _, d_ds) = runs["recompute"], runs["ds"]
    assert not np.isnan(d_ds).any(), "dqkv not written everywhere"
    assert np.array_equal(d_rec.view(np.uint32), d_ds.view(np.uint32)), \
        f"dqkv differs in {(d_rec != d_ds).sum()} of {d_rec.size} (max {np.abs(d_rec - d_ds).max():.3g})"
    _, att = reference.attention_forward(qkv, NH)
    assert rel_err(d_ds, reference.attention_backward(dout, qkv, att, NH)) < TOL_GRAD


@pytest.mark.parametrize("B,T,C,NH", [(3, 37, 72, 3), (2, 130, 128, 2)])
def test_dq_from_stored_ds_with_eight_rows_per_thread(dev, B, T, C, NH):
    qkv, dout = inputs(B, T, C, seed=T + 1)
    _, _, d_rec = run_attention(dev, B, T, C, NH, qkv, dout, dq="recompute")
    _, _, d_ds = run_attention(dev, B, T, C, NH, qkv, dout, dq="ds", dq_rows=8)
    assert np.array_equal(d_rec.view(np.uint32), d_ds.view(np.uint32))
    with pytest.raises(gpu.GPUError, match="4 or 8 query rows"):
        wait(Attention.create(dev, B=1, T=8, C=C, n_head=NH, dq="ds", dq_rows=2))
    with pytest.raises(gpu.GPUError, match="512 threads"):     # hs 128: 16 x 32 threads with 4 rows each
        wait(Attention.create(dev, B=1, T=8, C=256, n_head=2, dq="ds", dq_rows=4))


@pytest.mark.parametrize("B,T,C,NH,rows", [(3, 37, 72, 3, 4), (2, 130, 128, 2, 4), (2, 132, 128, 2, 8),
                                           (1, 64, 64, 1, 4), (2, 67, 128, 2, 8), (1, 1, 32, 2, 4)])
@pytest.mark.parametrize("opts", [dict(prefetch=False, vec4=False, ks=16), dict(prefetch=True, vec4=False, ks=16),
                                  dict(prefetch=False, vec4=True, ks=16), dict(prefetch=False, vec4=False, ks=32),
                                  dict(prefetch=True, vec4=False, ks=32), {}])
def test_dq_from_stored_ds_loading_options_give_the_same_bits(dev, B, T, C, NH, rows, opts):
    # Prefetched keys (1 or 2 vec4s a thread of K and of dS: hs 16, 24 and 64, 4 and 8 rows, KS 16 and 32; beyond 2
    # the plain loads), dS read as vec4s (T % 4 == 0: 132, 64; T = 37, 130, 67, 1 keep the scalar reads), 32 keys a
    # step, and {}: the defaults (all three here). Only how K and dS reach workgroup memory changes, so dQ equals
    # attention_backward_dq's to the bit, with blocks cut by T.
    qkv, dout = inputs(B, T, C, seed=T + 7)
    _, _, d_rec = run_attention(dev, B, T, C, NH, qkv, dout, dq="recompute")
    _, _, d_ds = run_attention(dev, B, T, C, NH, qkv, dout, dq="ds", dq_rows=rows, dq_options=opts)
    assert not np.isnan(d_ds).any(), "dqkv not written everywhere"
    assert np.array_equal(d_rec.view(np.uint32), d_ds.view(np.uint32)), \
        f"dqkv differs in {(d_rec != d_ds).sum()} of {d_rec.size} (max {np.abs(d_rec - d_ds).max():.3g})"


def test_dq_ds_options_come_from_the_environment_and_refuse_what_they_do_not_know(monkeypatch):
    assert attention_op.dq_ds_options() == {"prefetch": True, "vec4": True, "ks": 32}       # DQ_LOADING
    small = {"max-compute-workgroup-storage-size": 16384}                                  # WebGPU's default
    assert attention_op.dq_ds_options(hs=64, limits=small)["ks"] == 32                     # 32 x 32 vec4s: 16 KiB
    assert attention_op.dq_ds_options(hs=128, limits=small)["ks"] == 16                    # 32 x 48 would not fit
    monkeypatch.setenv("TABGPT_ATTENTION_DQ_PREFETCH", "0")
    monkeypatch.setenv("TABGPT_ATTENTION_DS_VEC4", "0")
    monkeypatch.setenv("TABGPT_ATTENTION_DQ_KS", "16")
    assert attention_op.dq_ds_options() == {"prefetch": False, "vec4": False, "ks": 16}
    assert attention_op.dq_ds_options(prefetch=True, ks=32) == {"prefetch": True, "vec4": False, "ks": 32}
    monkeypatch.setenv("TABGPT_ATTENTION_DQ_KS", "24")
    with pytest.raises(gpu.GPUError, match="16 or 32 keys"):
        attention_op.dq_ds_options()
    monkeypatch.setenv("TABGPT_ATTENTION_DQ_KS", "32")
    monkeypatch.setenv("TABGPT_ATTENTION_DS_VEC4", "yes")
    with pytest.raises(gpu.GPUError, match="TABGPT_ATTENTION_DS_VEC4 must be 0 or 1"):
        attention_op.dq_ds_options()


def test_the_pages_memory_estimate_counts_the_stored_ds_where_auto_keeps_it(monkeypatch):
    # Config.gpu_bytes_estimate (the page's figure) asks the same rule as dq_mode, at WebGPU's default binding.
    from tabgpt.config import preset
    small, big = preset("browser"), preset("browser", batch_size=128)       # dS 48 MiB, 192 MiB
    with_ds = [small.gpu_bytes_estimate(), big.gpu_bytes_estimate()]
    assert attention_op.ds_bytes(32, 6, 256) == 48 << 20
    assert attention_op.ds_by_default(32, 6, 256, 128 << 20)
    assert not attention_op.ds_by_default(128, 6, 256, 128 << 20)
    monkeypatch.setattr(attention_op, "DS_MAX_BYTES", 0)                   # nothing stored: dS drops out
    assert with_ds[0] - small.gpu_bytes_estimate() == 48 << 20
    assert with_ds[1] == big.gpu_bytes_estimate()
    # from PRODUCTS_MIN_T positions the products' two scratches, where each fits the binding: 4 x 4 x 1024 x 1024
    # floats
    monkeypatch.undo()
    long_, longer = preset("tiny", block_size=1024, batch_size=4), preset("tiny", block_size=1024, batch_size=32)
    products = [long_.gpu_bytes_estimate(), longer.gpu_bytes_estimate()]
    monkeypatch.setattr(attention_op, "PRODUCTS_MIN_T", 4096)                # the stored dS instead
    assert products[0] - long_.gpu_bytes_estimate() == attention_op.products_bytes(4, long_.n_head, 1024) - \
        attention_op.ds_bytes(4, long_.n_head, 1024) == 32 << 20
    assert products[1] == longer.gpu_bytes_estimate()      # 32 sequences: 256 MiB each, over the binding: neither


def test_buffers_smaller_than_their_shapes_are_refused(dev):
    # The kernels index without clamps (gpu.UNCLAMPED_FILES): a buffer too small for B, T, C must not reach them.
    B, T, C, NH = 2, 16, 32, 2
    attn = wait(Attention.create(dev, B=B, T=T, C=C, n_head=NH))
    full = lambda n: dev.buffer(4 * n, "x")  # noqa: E731
    qkv, out, lse, dout, dqkv = full(B * T * 3 * C), full(B * T * C), full(B * NH * T), full(B * T * C), \
        full(B * T * 3 * C)
    seq = dev.sequence("attention")
    attn.forward(seq, out=out, lse=lse, qkv=qkv)
    attn.backward(seq, dqkv=dqkv, dout=dout, qkv=qkv, out=out, lse=lse)
    with pytest.raises(gpu.GPUError, match=r"qkv binds 12284 bytes, needs \(32, 96\) f32 = 12288"):
        attn.forward(seq, out=out, lse=lse, qkv=full(B * T * 3 * C - 1))
    with pytest.raises(gpu.GPUError, match="lse binds"):
        attn.forward(seq, out=out, lse=full(B * NH * T - 1), qkv=qkv)
    with pytest.raises(gpu.GPUError, match="dqkv binds"):
        attn.backward(seq, dqkv=out, dout=dout, qkv=qkv, out=out, lse=lse)


def test_dq_mode_follows_the_binding_limit_and_refuses_what_does_not_fit(dev, monkeypatch):
    assert attention_op.dq_mode(dev, 2, 1024, 4, 16) == "ds"                     # 32 MiB of dS
    assert attention_op.dq_mode(dev, 8, 2048, 4, 16) == "recompute"              # 512 MiB: over the limits
    with pytest.raises(gpu.GPUError, match="smaller batch"):
        attention_op.dq_mode(dev, 8, 2048, 4, 16, "ds")
    assert attention_op.dq_mode(dev, 2, 1024, 4, 16, "recompute") == "recompute"
    monkeypatch.setenv("TABGPT_ATTENTION_DQ", "recompute")
    assert attention_op.dq_mode(dev, 2, 1024, 4, 16) == "recompute"
    monkeypatch.setenv("TABGPT_ATTENTION_DQ_ROWS", "8")
    assert attention_op.dq_ds_shape(64, dev.limits) == (8, "")
    monkeypatch.setenv("TABGPT_ATTENTION_DQ_ROWS", "eight")
    with pytest.raises(gpu.GPUError, match="4 or 8 query rows per thread .* got 'eight'"):
        attention_op.dq_ds_shape(64, dev.limits)
    monkeypatch.delenv("TABGPT_ATTENTION_DQ_ROWS")
    assert attention_op.dq_ds_shape(64, dev.limits) == (4, "")
    monkeypatch.setenv("TABGPT_ATTENTION_DQ", "fast")
    with pytest.raises(gpu.GPUError, match="auto, ds or recompute"):
        attention_op.dq_mode(dev, 2, 1024, 4, 16)


def test_dq_kernel_stages_16_keys_where_32_would_not_fit(dev, monkeypatch):
    # WebGPU's default 16 KiB of workgroup memory: 32 keys of K and dS rows fit at head size 64 (16 KiB), not at
    # 128 (24 KiB), where the kernel stages 16 (12 KiB) as before rather than leaving the stored dS for recompute.
    monkeypatch.setattr(dev, "limits", {**dev.limits, "max-compute-workgroup-storage-size": 16384})
    for C, ks in ((128, 32), (256, 16)):
        attn = wait(Attention.create(dev, B=1, T=8, C=C, n_head=2))
        assert attn.dq == "ds" and attn.k["attention_backward_dq_ds"].constants["KS"] == ks, (C, attn.dq)
    with pytest.raises(gpu.GPUError, match="24576 bytes of workgroup memory"):     # 32 asked for by name
        wait(Attention.create(dev, B=1, T=8, C=256, n_head=2, dq="ds", dq_options={"ks": 32}))


def test_attention_is_deterministic(dev):
    B, T, C, NH = 2, 45, 48, 3
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((B, T, 3 * C)).astype(np.float32)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    first = run_attention(dev, B, T, C, NH, qkv, dout)
    second = run_attention(dev, B, T, C, NH, qkv, dout, garbage_dqkv=False)
    for name, a, b in zip(("out", "lse", "dqkv"), first, second):
        assert np.array_equal(a, b), f"{name}: two runs differ in {int((a != b).sum())} elements"


@pytest.mark.parametrize("B,T,C,NH,tile", [
    (2, 29, 64, 2, Tile(4, 8)),       # hs=32: blocks and streamed tiles of 16 rows, T=29 cuts the last ones
    (2, 29, 64, 2, Tile(4, 4, 4)),    # hs=32, RPT=4
    (2, 37, 64, 2, Tile(8, 2, 4)),    # hs=32, RPT=4: blocks of 8 rows against streamed tiles of 32
    (2, 29, 40, 2, Tile(1, 2, 4)),    # hs=20, RPT=4, heads split into 3 chunks
    (1, 45, 128, 2, Tile(8, 8)),      # hs=64 (GPT-2) in one chunk
    (1, 45, 128, 2, Tile(8, 4, 4)),   # hs=64, RPT=4
    (1, 21, 128, 2, Tile(2, 4, 4)),   # hs=64, RPT=4, heads split into 4 chunks
    (1, 70, 128, 2, None),            # hs=64, the tiles the device picks
])
def test_attention_pipeline_is_bit_identical(dev_full, B, T, C, NH, tile):
    # PIPELINE only moves the inner loops' workgroup-memory reads one step earlier: the same FMAs in the same
    # order, so out, lse and dqkv must agree to the bit with the plain loops.
    if tile and any(tile_problem(e, C // NH, tile, dev_full.limits) for e in ENTRIES):
        pytest.skip(f"this adapter grants only {dev_full.limits['max-compute-workgroup-storage-size']} bytes")
    qkv, dout = inputs(B, T, C, seed=T + C)
    piped = run_attention(dev_full, B, T, C, NH, qkv, dout, tile, pipeline=True)
    plain = run_attention(dev_full, B, T, C, NH, qkv, dout, tile, pipeline=False)
    for name, a, b in zip(("out", "lse", "dqkv"), piped, plain):
        assert np.isfinite(a).all(), f"{name}: non-finite entries"
        differ = int((a.view(np.uint32) != b.view(np.uint32)).sum())
        assert differ == 0, f"{name}: PIPELINE true and false differ in {differ} of {a.size} elements"


# Shapes on which every tiled kernel prefetches (NR >= hs/4: at most 4 vec4s per thread and streamed matrix):
# RPT 2 and 4, head sizes 4 to 64, T not a multiple of the tiles (several streamed tiles each), heads split into
# 2 to 4 chunks, threads that do not divide the tile (a thread's last vec4 past it), and NR < 4 (2 or 4 lse/delta
# pairs a thread in dkv).
PREFETCH_CASES = [
    (2, 29, 40, 2, Tile(4, 8)),           # hs=20: 3 vec4s a thread, streamed tiles of 16 rows
    (2, 29, 40, 2, Tile(2, 8)),           # hs=20, 2 chunks, tiles of 8
    (2, 29, 40, 2, Tile(1, 8)),           # hs=20, 3 chunks, tiles of 4
    (2, 29, 40, 2, Tile(4, 6)),           # hs=20, 24 threads for 80 vec4s: 4 a thread, the last 16 past the tile
    (2, 37, 40, 2, Tile(8, 6)),           # hs=20, 48 threads for 160 vec4s, tiles of 32 rows
    (2, 29, 40, 2, Tile(4, 8, 4)),        # hs=20, RPT=4: blocks of 32 rows, longer than T
    (2, 29, 40, 2, Tile(2, 8, 4)),        # hs=20, RPT=4, 2 chunks
    (2, 37, 40, 2, Tile(1, 5, 4)),        # hs=20, RPT=4, 3 chunks, 4 vec4s a thread exactly
    (2, 23, 8, 2, Tile(4, 1)),            # hs=4: NR=1, 4 vec4s and 4 lse/delta pairs a thread
    (2, 23, 16, 2, Tile(4, 2)),           # hs=8: NR=2, 4 vec4s and 2 pairs a thread
    (2, 23, 16, 2, Tile(2, 2, 4)),        # hs=8, RPT=4, NR=2
    (2, 37, 64, 2, Tile(4, 8)),           # hs=32: 4 vec4s a thread
    (2, 37, 64, 2, Tile(8, 8)),           # hs=32, tiles of 32 rows
    (2, 37, 64, 2, Tile(2, 8, 4)),        # hs=32, RPT=4, 2 chunks
    (2, 45, 64, 2, Tile(4, 8, 4)),        # hs=32, RPT=4
    (1, 45, 128, 2, Tile(4, 16)),         # hs=64: 4 vec4s a thread, 2 chunks
    (1, 45, 128, 2, Tile(2, 16)),         # hs=64, 4 chunks, tiles of 8
    (1, 70, 128, 2, {"attention_forward": Tile(8, 16), "attention_backward_dq": Tile(4, 16),
                     "attention_backward_dkv": Tile(4, 16)}),   # hs=64, the forward in one chunk
]
PREFETCH_IDS = [f"T{T}-hs{C // NH}-" + ("mixed" if isinstance(t, dict) else f"{t.TC},{t.NR},{t.RPT}")
                for B, T, C, NH, t in PREFETCH_CASES]


def skip_unless_fits(dev, hs, tile):
    tiles = tiles_of(tile)
    if tiles and any(tile_problem(e, hs, tiles[e], dev.limits) for e in ENTRIES):
        pytest.skip(f"this adapter grants only {dev.limits['max-compute-workgroup-storage-size']} bytes")


@pytest.mark.parametrize("B,T,C,NH,tile", PREFETCH_CASES, ids=PREFETCH_IDS)
def test_prefetch_cases_prefetch(B, T, C, NH, tile):
    tiles = tiles_of(tile)
    assert all(not prefetch_problem(C // NH, tiles[e]) for e in ENTRIES), {e: prefetch_vec4s(C // NH, tiles[e])
                                                                            for e in ENTRIES}


@PIPELINES
@pytest.mark.parametrize("B,T,C,NH,tile", PREFETCH_CASES, ids=PREFETCH_IDS)
def test_attention_prefetch_matches_reference(dev_full, B, T, C, NH, tile, pipeline):
    skip_unless_fits(dev_full, C // NH, tile)
    check(dev_full, B, T, C, NH, seed=T + C, tile=tile, pipeline=pipeline, prefetch=True)


@pytest.mark.parametrize("B,T,C,NH,tile", PREFETCH_CASES + [(1, 70, 128, 2, None), (2, 29, 40, 2, Tile(8, 4))],
                         ids=PREFETCH_IDS + ["T70-hs64-picked", "T29-hs20-8,4,2-fallback"])
def test_attention_prefetch_is_bit_identical(dev_full, B, T, C, NH, tile):
    # PREFETCH only moves the streamed tiles' global-memory reads one tile earlier (same values in the same
    # places of workgroup memory, the same FMAs in the same order): out, lse and dqkv must agree to the bit with
    # the direct loads, with and without PIPELINE.
    skip_unless_fits(dev_full, C // NH, tile)
    qkv, dout = inputs(B, T, C, seed=T + C + 1)
    base = run_attention(dev_full, B, T, C, NH, qkv, dout, tile, pipeline=False, prefetch=False)
    for pipeline, prefetch in ((False, True), (True, True), (True, False)):
        got = run_attention(dev_full, B, T, C, NH, qkv, dout, tile, pipeline=pipeline, prefetch=prefetch)
        for name, a, b in zip(("out", "lse", "dqkv"), got, base):
            assert np.isfinite(a).all(), f"{name}: non-finite entries"
            differ = int((a.view(np.uint32) != b.view(np.uint32)).sum())
            assert differ == 0, (f"{name}: PIPELINE={pipeline} PREFETCH={prefetch} differ from both false in "
                                 f"{differ} of {a.size} elements")


@pytest.mark.parametrize("B,T,C,NH,tile,dq", [
    (2, 29, 64, 2, Tile(4, 8), "ds"),            # hs=32, T=29 cuts the last blocks; dQ from the stored dS
    (3, 37, 72, 3, None, "recompute"),           # hs=24, attention_backward_dq
    (2, 37, 64, 2, Tile(8, 2, 4), "ds"),         # RPT=4: blocks of 8 rows against streamed tiles of 32
    (2, 29, 40, 2, Tile(1, 2, 4), "recompute"),  # hs=20, heads split into 3 chunks (wg.y = h * DS + chunk)
    (1, 70, 128, 2, None, "ds"),                 # hs=64, the tiles the device picks
], ids=["T29-hs32-ds", "T37-hs24-dq", "T37-rpt4-ds", "T29-hs20-chunks-dq", "T70-hs64-ds"])
def test_heavy_first_is_bit_identical(dev_full, B, T, C, NH, tile, dq):
    # HEAVY_FIRST changes which workgroup computes which block (each block still computed once, the same way):
    # out, lse and dqkv agree to the bit with it off, which matches the reference.
    skip_unless_fits(dev_full, C // NH, tile)
    qkv, dout = inputs(B, T, C, seed=T + C + 2)
    base = run_attention(dev_full, B, T, C, NH, qkv, dout, tile, pipeline=False, prefetch=True, dq=dq,
                         heavy_first=False)
    ref_out, att = reference.attention_forward(qkv, NH)
    assert rel_err(base[0], ref_out) < TOL_OUT
    assert rel_err(base[2], reference.attention_backward(dout, qkv, att, NH)) < TOL_GRAD
    for group in (0, 1, 4):   # all heads at once; one head a group; groups of 4 (the last one short)
        got = run_attention(dev_full, B, T, C, NH, qkv, dout, tile, pipeline=False, prefetch=True, dq=dq,
                            heavy_first=True, heavy_group=group)
        for name, a, b in zip(("out", "lse", "dqkv"), got, base):
            assert np.isfinite(a).all(), f"{name}: non-finite entries"
            differ = int((a.view(np.uint32) != b.view(np.uint32)).sum())
            assert differ == 0, (f"{name}: HEAVY_FIRST (groups of {group}) differs from the launch order in {differ} "
                                 f"of {a.size} elements")


def test_order_switch_is_checked(monkeypatch):
    monkeypatch.setenv("TABGPT_ATTENTION_ORDER", "yes")
    with pytest.raises(gpu.GPUError, match="TABGPT_ATTENTION_ORDER must be 0 or 1"):
        attention_op.heavy_first_enabled()
    monkeypatch.setenv("TABGPT_ATTENTION_ORDER", "0")
    assert attention_op.heavy_first_enabled() is False
    assert attention_op.heavy_first_enabled(True) is True
    monkeypatch.delenv("TABGPT_ATTENTION_ORDER")
    assert attention_op.heavy_first_enabled() is True, "heaviest first by default"
    assert attention_op.heavy_first_enabled(False) is False
    monkeypatch.setenv("TABGPT_ATTENTION_ORDER_GROUP", "-2")
    with pytest.raises(gpu.GPUError, match="TABGPT_ATTENTION_ORDER_GROUP must be a count of heads"):
        attention_op.heavy_group()
    monkeypatch.setenv("TABGPT_ATTENTION_ORDER_GROUP", "16")
    assert attention_op.heavy_group() == 16 and attention_op.heavy_group(0) == 0


def test_prefetch_vec4s():
    # ceil(BS * hs/4 / (NR * TC)), BS = 4 TC: GPT-2's hs=64 on the tiles picked for an H100 (48 KiB, 1024 threads)
    # prefetches 2 (forward, 256 threads) and 4 (dq, dkv, 128 threads) vec4s a thread and matrix.
    assert [prefetch_vec4s(64, t) for t in (Tile(8, 32), Tile(8, 16), Tile(8, 16))] == [2, 4, 4]
    assert prefetch_vec4s(20, Tile(4, 6)) == 4 and prefetch_vec4s(20, Tile(4, 8)) == 3
    assert prefetch_vec4s(64, Tile(8, 8, 4)) == 8 > MAX_PREFETCH_VEC4S
    assert "8 vec4" in prefetch_problem(64, Tile(8, 8, 4)) and prefetch_problem(64, Tile(8, 16, 4)) == ""
    for hs in range(4, 129, 4):
        for tc in (1, 2, 4, 8):
            for nr in range(1, 33):
                t = Tile(tc, nr)
                assert (prefetch_problem(hs, t) == "") == (nr >= hs // 4), (hs, t)


def test_prefetch_falls_back_per_kernel(dev_full):
    # A tile whose share would need more than 4 registers compiles without PREFETCH; the others keep it.
    tiles = {"attention_forward": Tile(4, 8), "attention_backward_dq": Tile(8, 4), "attention_backward_dkv": Tile(1, 4)}
    make = lambda **kw: wait(Attention.create(dev_full, B=1, T=29, C=40, n_head=2, tiles=tiles, dq="recompute",  # noqa
                                              **kw))
    attn = make(prefetch=True)
    assert attn.prefetch == {"attention_forward": True, "attention_backward_dq": False,
                             "attention_backward_dkv": False}
    assert [attn.k[e].constants["PREFETCH"] for e in ENTRIES] == [True, False, False]
    off = make(prefetch=False)
    assert off.prefetch == {e: False for e in ENTRIES}
    default = make()   # on where it fits
    assert default.prefetch == attn.prefetch


def test_prefetch_shader_ignores_oversized_shares(dev, monkeypatch):
    # The shader's own guard: PREFETCH passed true for tiles needing 5 and 10 vec4s a thread is ignored there
    # (PF false: 4 registers would not hold the share), so the results stay right even if the Python side let it
    # through.
    monkeypatch.setattr(attention_op, "prefetch_problem", lambda hs, t: "")
    for tile in (Tile(8, 4), Tile(1, 2, 4)):
        check(dev, 2, 29, 40, 2, seed=12, tile=tile, prefetch=True)   # run_attention: PREFETCH passed true
