"""The training step's other kernels natively (lavapipe in CI) against tests/reference.py (NumPy, float64 inside):
embedding, layernorm, GELU / residual / fill, fused softmax + cross-entropy, and AdamW with global-norm
clipping. Awkward shapes on purpose (B=3, T=37, C=72, V=1001, Vp=1024); every backward accumulates into
gradients that already hold values, and every reduction is checked to be bit-identical run to run."""

import math

import numpy as np
import pytest
import reference

from tabgpt.gpu import GPUError, wait
from tabgpt.ops.crossentropy import CrossEntropy
from tabgpt.ops.elementwise import Elementwise, chunk_views
from tabgpt.ops.embedding import Embedding
from tabgpt.ops.layernorm import LayerNorm
from tabgpt.ops.optim import AdamW, decay_mask

B, T, C, V, Vp = 3, 37, 72, 1001, 1024
N = B * T


# ---------------------------------------------------------------------------------------------
# helpers

def upload(dev, a, label="x"):
    a = np.ascontiguousarray(a)
    return dev.buffer(a.nbytes, label, a)


def download(dev, buf, dtype=np.float32, shape=None):
    out = np.frombuffer(wait(dev.read(buf)), dtype=dtype)
    return out.reshape(shape) if shape is not None else out


def run(dev, append):
    """Build a sequence from append(seq), run it once and wait for it."""
    seq = dev.sequence("test")
    append(seq)
    wait(seq.build())
    seq.run()
    wait(dev.sync())


def assert_close(name, got, ref, atol, rtol=0.0):
    """|got - ref| <= atol + rtol * |ref| everywhere; the message says where and by how much it failed."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != reference {ref.shape}"
    diff = np.abs(got - ref)
    bad = diff > atol + rtol * np.abs(ref)
    if bad.any():
        i = np.unravel_index(np.argmax(diff), diff.shape)
        raise AssertionError(f"{name}: {bad.sum()} of {bad.size} entries off (atol {atol}, rtol {rtol}); max abs diff "
                             f"{diff.max():.3g} at {i}: got {got[i]!r}, reference {ref[i]!r}")


def rng(seed):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# references: tests/reference.py's ops (float64 inside, float32 out), adapted to flat rows and accumulation

def crossentropy_ref(logits, targets, grad_scale, v=V):
    """losses (N,) and dlogits (N, Vp) = (softmax - onehot) * grad_scale, 0 in the padded columns."""
    losses = reference.crossentropy_forward(logits, targets, v)
    probs = reference.softmax_forward(logits, v)
    return losses, reference.crossentropy_softmax_backward(probs, targets, grad_scale)


def adamw_ref(p, g, m, v, t, lr, beta1, beta2, eps, wd, max_norm, decay):
    """clip_grad_norm_ (max_norm <= 0: no clipping) then torch.optim.AdamW; decay: bool per element."""
    norm = reference.grad_norm({"g": g})
    scale = reference.clip_scale(norm, max_norm) if max_norm > 0 else 1.0
    with_decay = reference.adamw_update(p, g, m, v, lr, t, beta1, beta2, eps, wd, grad_scale=scale)
    without = reference.adamw_update(p, g, m, v, lr, t, beta1, beta2, eps, 0.0, grad_scale=scale)
    return (*(np.where(decay, a, b) for a, b in zip(with_decay, without)), norm)


# ---------------------------------------------------------------------------------------------
# embedding

def test_embedding_forward_adds_token_and_position_rows(dev):
    r = rng(0)
    idx = r.integers(0, V, N).astype(np.uint32)
    wte = r.standard_normal((Vp, C)).astype(np.float32)
    wpe = r.standard_normal((T + 5, C)).astype(np.float32)   # more positions than T, as block_size > T
    emb = wait(Embedding.create(dev, B, T, C, Vp))
    out = dev.buffer(4 * N * C, "out")
    run(dev, lambda s: emb.forward(s, out=out, idx=upload(dev, idx), wte=upload(dev, wte), wpe=upload(dev, wpe)))
    ref = reference.encoder_forward(wte, wpe, idx.reshape(B, T)).reshape(N, C)
    assert_close("embedding out", download(dev, out, shape=(N, C)), ref, atol=1e-6)


def embedding_backward(dev, Bb, Tt, Cc, Vpp, idx, dout, dwte0, dwpe0, block=None, threads=None):
    emb = wait(Embedding.create(dev, Bb, Tt, Cc, Vpp, block=block, threads=threads))
    dwte, dwpe = upload(dev, dwte0, "dwte"), upload(dev, dwpe0, "dwpe")
    run(dev, lambda s: emb.backward(s, dwte=dwte, dwpe=dwpe, dout=upload(dev, dout), idx=upload(dev, idx)))
    # The rows of each token must end up side by side: the sorted keys tok * N + n, then the padding.
    n = len(idx)
    want = np.full(emb.n_pad, 0xFFFFFFFF, np.uint32)
    want[:n] = np.sort(idx.astype(np.uint64) * n + np.arange(n)).astype(np.uint32)
    keys = download(dev, emb.keys, np.uint32)
    assert np.array_equal(keys, want), f"sort keys wrong at {np.flatnonzero(keys != want)[:10]} of {emb.n_pad}"
    return download(dev, dwte, shape=dwte0.shape), download(dev, dwpe, shape=dwpe0.shape)


def embedding_backward_ref(idx, dout, dwte0, dwpe0, Tt):
    """The reference's gradients added to what the gradient buffers held before."""
    Cc = dout.shape[1]
    dwte, dwpe = reference.encoder_backward(dout.reshape(-1, Tt, Cc), idx.reshape(-1, Tt), len(dwte0), len(dwpe0))
    return dwte0.astype(np.float64) + dwte, dwpe0.astype(np.float64) + dwpe


def test_embedding_backward_accumulates_and_is_deterministic(dev):
    r = rng(1)
    # Many repeats (tokens 0..19), the last padded row, and singletons across the vocabulary.
    idx = np.where(r.random(N) < 0.6, r.integers(0, 20, N), r.integers(0, V, N)).astype(np.uint32)
    idx[5] = idx[77] = Vp - 1
    dout = r.standard_normal((N, C)).astype(np.float32)
    dwte0 = r.standard_normal((Vp, C)).astype(np.float32)
    dwpe0 = r.standard_normal((T + 3, C)).astype(np.float32)
    got_wte, got_wpe = embedding_backward(dev, B, T, C, Vp, idx, dout, dwte0, dwpe0)
    ref_wte, ref_wpe = embedding_backward_ref(idx, dout, dwte0, dwpe0, T)
    assert_close("dwte", got_wte, ref_wte, atol=1e-5, rtol=1e-5)
    assert_close("dwpe", got_wpe, ref_wpe, atol=1e-5, rtol=1e-5)
    again_wte, again_wpe = embedding_backward(dev, B, T, C, Vp, idx, dout, dwte0, dwpe0)
    assert np.array_equal(got_wte.view(np.uint32), again_wte.view(np.uint32)), "dwte differs between two runs"
    assert np.array_equal(got_wpe.view(np.uint32), again_wpe.view(np.uint32)), "dwpe differs between two runs"


def test_embedding_backward_sort_across_several_blocks(dev):
    # 2800 rows: keys padded to 4096, so the long-range bitonic stages (global and local merges) all run;
    # 64 tokens only: long runs of one token, spread over every block.
    Bb, Tt, Cc, Vpp = 4, 700, 8, 64
    r = rng(2)
    idx = r.integers(0, 50, Bb * Tt).astype(np.uint32)
    dout = r.standard_normal((Bb * Tt, Cc)).astype(np.float32)
    dwte0 = np.zeros((Vpp, Cc), np.float32)
    dwpe0 = np.zeros((Tt, Cc), np.float32)
    got_wte, got_wpe = embedding_backward(dev, Bb, Tt, Cc, Vpp, idx, dout, dwte0, dwpe0)
    ref_wte, ref_wpe = embedding_backward_ref(idx, dout, dwte0, dwpe0, Tt)
    assert_close("dwte (long runs)", got_wte, ref_wte, atol=2e-5, rtol=1e-5)
    assert_close("dwpe", got_wpe, ref_wpe, atol=1e-5, rtol=1e-5)
    assert not got_wte[50:].any(), "tokens never seen got a gradient"


@pytest.mark.parametrize("block, threads", [(64, None), (512, None), (2048, 64), (4096, None), (8192, None)])
def test_embedding_backward_any_sort_block_gives_the_same_bits(dev, block, threads):
    # The keys are unique, so every block size sorts them into the same order and the sums run in the same order:
    # bit-identical gradients. 2800 rows padded to 4096 keys: blocks of 64 take many long-range stages (dispatches),
    # 4096 none (blocks of 1024, then one workgroup merges them all, as a GPU's 8192 keys of the presets are). The
    # device held to WebGPU's default limits (16 KiB of workgroup memory) refuses blocks of 8192.
    Bb, Tt, Cc, Vpp = 4, 700, 8, 64
    r = rng(2)
    idx = r.integers(0, 50, Bb * Tt).astype(np.uint32)
    dout = r.standard_normal((Bb * Tt, Cc)).astype(np.float32)
    dwte0 = r.standard_normal((Vpp, Cc)).astype(np.float32)
    dwpe0 = np.zeros((Tt, Cc), np.float32)
    if 4 * block > dev.limits["max-compute-workgroup-storage-size"]:
        with pytest.raises(GPUError, match="fit the workgroup memory"):
            wait(Embedding.create(dev, Bb, Tt, Cc, Vpp, block=block))
        return
    got, _ = embedding_backward(dev, Bb, Tt, Cc, Vpp, idx, dout, dwte0, dwpe0, block=block, threads=threads)
    want, _ = embedding_backward(dev, Bb, Tt, Cc, Vpp, idx, dout, dwte0, dwpe0, block=1024)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), f"blocks of {block} sum differently"
    ref_wte, _ = embedding_backward_ref(idx, dout, dwte0, dwpe0, Tt)
    assert_close("dwte", got, ref_wte, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("Bb, Tt", [(8, 1024), (20, 1000)])
def test_embedding_backward_with_the_adapters_own_limits(Bb, Tt):
    # What a GPU runs: the device opened with the adapter's limits, blocks of 8192 keys (32 KiB) and as many threads
    # as it allows up to 1024 (lavapipe 1024, SwiftShader 256). 8192 keys: blocks of 1024, then one workgroup merges
    # all; 20000: padded to 32768, so long-range stages (dispatches) run between the large blocks' merges too.
    from tabgpt import gpu
    from tabgpt.ops.embedding import sort_shape
    full = wait(gpu.open_device())
    lim = full.limits
    if lim["max-compute-workgroup-storage-size"] < 4 * 8192:
        pytest.skip("this adapter's workgroup memory holds fewer than 8192 keys")
    threads = min(1024, lim["max-compute-invocations-per-workgroup"], lim["max-compute-workgroup-size-x"])
    assert sort_shape(full, Bb * Tt, 8192, threads) == (8192, threads)     # nothing cut
    Cc, Vpp = 4, 64
    r = rng(4)
    idx = np.where(r.random(Bb * Tt) < 0.5, r.integers(0, 8, Bb * Tt), r.integers(0, Vpp, Bb * Tt)).astype(np.uint32)
    dout = r.standard_normal((Bb * Tt, Cc)).astype(np.float32)
    dwte0 = r.standard_normal((Vpp, Cc)).astype(np.float32)
    dwpe0 = r.standard_normal((Tt, Cc)).astype(np.float32)
    got_wte, got_wpe = embedding_backward(full, Bb, Tt, Cc, Vpp, idx, dout, dwte0, dwpe0, block=8192, threads=threads)
    want_wte, want_wpe = embedding_backward(full, Bb, Tt, Cc, Vpp, idx, dout, dwte0, dwpe0, block=1024, threads=256)
    assert np.array_equal(got_wte.view(np.uint32), want_wte.view(np.uint32)), "large blocks sum differently"
    ref_wte, ref_wpe = embedding_backward_ref(idx, dout, dwte0, dwpe0, Tt)
    assert_close("dwte", got_wte, ref_wte, atol=1e-4, rtol=1e-5)
    assert_close("dwpe", got_wpe, ref_wpe, atol=1e-5, rtol=1e-5)


class _Limits:
    """A device with the given workgroup limits, CPU driver or GPU, for sort_shape."""

    def __init__(self, storage, threads, cpu=False):
        self.limits = {"max-compute-workgroup-storage-size": storage, "max-compute-invocations-per-workgroup": threads,
                       "max-compute-workgroup-size-x": threads}
        self.info = {"adapter_type": "CPU" if cpu else "DiscreteGPU", "device": "", "description": ""}
        self.backend = "wgpu-native"


def test_embedding_sort_shape_fills_the_workgroup_memory_on_gpus():
    from tabgpt.ops.embedding import sort_shape
    assert sort_shape(_Limits(32768, 1024), 8192) == (8192, 1024)     # the presets' batches: one workgroup
    assert sort_shape(_Limits(49152, 1024), 8192) == (8192, 1024)
    assert sort_shape(_Limits(49152, 1024), 65536) == (8192, 1024)    # larger batches: blocks of 8192 keys
    assert sort_shape(_Limits(16384, 256), 8192) == (4096, 256)       # WebGPU's default limits
    assert sort_shape(_Limits(32768, 1024), 3000) == (4096, 1024)     # no larger than the padded keys
    assert sort_shape(_Limits(32768, 1024), 100) == (1024, 256)
    assert sort_shape(_Limits(32768, 1024, cpu=True), 8192) == (1024, 256)   # CPU drivers: as before
    assert sort_shape(_Limits(32768, 1024), 8192, block=64) == (64, 32)
    assert sort_shape(_Limits(32768, 256), 8192, threads=1024) == (8192, 256)
    assert sort_shape(_Limits(32768, 1024), 8192, threads=100) == (8192, 64)
    with pytest.raises(GPUError, match="power of two"):
        sort_shape(_Limits(32768, 1024), 8192, block=3000)
    with pytest.raises(GPUError, match="at least one thread"):
        sort_shape(_Limits(32768, 1024), 8192, threads=0)


# ---------------------------------------------------------------------------------------------
# layernorm

@pytest.mark.parametrize("rows_per_block", [None, 4])
def test_layernorm_forward_and_backward(dev, rows_per_block):
    r = rng(3)
    x = (r.standard_normal((N, C)) * 2 + 5).astype(np.float32)   # a large mean: the variance must be centred
    w = r.standard_normal(C).astype(np.float32)
    b = r.standard_normal(C).astype(np.float32)
    dout = r.standard_normal((N, C)).astype(np.float32)
    dinp0 = r.standard_normal((N, C)).astype(np.float32)
    dw0 = r.standard_normal(C).astype(np.float32)
    db0 = r.standard_normal(C).astype(np.float32)
    ln = wait(LayerNorm.create(dev, N, C, rows_per_block))
    bx, bw, bb = upload(dev, x), upload(dev, w), upload(dev, b)
    out, mean, rstd = dev.buffer(4 * N * C, "out"), dev.buffer(4 * N, "mean"), dev.buffer(4 * N, "rstd")
    dinp, dw, db = upload(dev, dinp0), upload(dev, dw0), upload(dev, db0)

    def append(s):
        ln.forward(s, out=out, mean=mean, rstd=rstd, inp=bx, weight=bw, bias=bb)
        ln.backward(s, dinp=dinp, dweight=dw, dbias=db, dout=upload(dev, dout), inp=bx, weight=bw, mean=mean,
                    rstd=rstd)
    run(dev, append)
    ref_out, ref_mean, ref_rstd = reference.layernorm_forward(x, w, b)
    assert_close("layernorm out", download(dev, out, shape=(N, C)), ref_out, atol=1e-5, rtol=1e-5)
    assert_close("mean", download(dev, mean), ref_mean, atol=1e-6, rtol=1e-6)
    assert_close("rstd", download(dev, rstd), ref_rstd, atol=1e-6, rtol=1e-5)
    ref_dinp, ref_dw, ref_db = reference.layernorm_backward(dout, x, w, ref_mean, ref_rstd)
    assert_close("dinp (accumulated)", download(dev, dinp, shape=(N, C)), dinp0 + ref_dinp, atol=1e-5, rtol=1e-5)
    assert_close("dweight (accumulated)", download(dev, dw), dw0 + ref_dw, atol=1e-4, rtol=1e-5)
    assert_close("dbias (accumulated)", download(dev, db), db0 + ref_db, atol=1e-4, rtol=1e-5)


def test_layernorm_backward_is_deterministic(dev):
    r = rng(4)
    x, dout = r.standard_normal((2, N, C)).astype(np.float32)
    w, b = r.standard_normal((2, C)).astype(np.float32)
    ln = wait(LayerNorm.create(dev, N, C, rows_per_block=8))
    results = []
    for _ in range(2):
        bx, bw = upload(dev, x), upload(dev, w)
        out, mean, rstd = dev.buffer(4 * N * C, "out"), dev.buffer(4 * N, "mean"), dev.buffer(4 * N, "rstd")
        dinp, dw, db = dev.buffer(4 * N * C, "dinp"), dev.buffer(4 * C, "dw"), dev.buffer(4 * C, "db")

        def append(s):
            ln.forward(s, out=out, mean=mean, rstd=rstd, inp=bx, weight=bw, bias=upload(dev, b))
            ln.backward(s, dinp=dinp, dweight=dw, dbias=db, dout=upload(dev, dout), inp=bx, weight=bw, mean=mean,
                        rstd=rstd)
        run(dev, append)
        results.append([wait(dev.read(buf)) for buf in (out, dinp, dw, db)])
    for name, first, second in zip(("out", "dinp", "dweight", "dbias"), *results):
        assert first == second, f"layernorm {name} differs between two runs"


def layernorm_run(dev, n, c, x, w, b, dout, dinp0, dw0, db0, rows_per_block=None, threads_per_row=None,
                  subgroups=False):
    """Forward then backward (accumulating into dinp0, dw0, db0) of one LayerNorm; the downloaded
    out, mean, rstd, dinp, dweight, dbias, and the LayerNorm."""
    ln = wait(LayerNorm.create(dev, n, c, rows_per_block, threads_per_row, subgroups=subgroups))
    assert ln.subgroups == subgroups
    bx, bw = upload(dev, x), upload(dev, w)
    out, mean, rstd = dev.buffer(4 * n * c, "out"), dev.buffer(4 * n, "mean"), dev.buffer(4 * n, "rstd")
    dinp, dw, db = upload(dev, dinp0), upload(dev, dw0), upload(dev, db0)

    def append(s):
        ln.forward(s, out=out, mean=mean, rstd=rstd, inp=bx, weight=bw, bias=upload(dev, b))
        ln.backward(s, dinp=dinp, dweight=dw, dbias=db, dout=upload(dev, dout), inp=bx, weight=bw, mean=mean,
                    rstd=rstd)
    run(dev, append)
    got = (download(dev, out, shape=(n, c)), download(dev, mean), download(dev, rstd),
           download(dev, dinp, shape=(n, c)), download(dev, dw), download(dev, db))
    return got, ln


def layernorm_inputs(seed, n, c, loc=0.0, scale=1.0):
    r = rng(seed)
    x = (r.standard_normal((n, c)) * scale + loc).astype(np.float32)
    w, b = r.standard_normal((2, c)).astype(np.float32)
    dout, dinp0 = r.standard_normal((2, n, c)).astype(np.float32)
    dw0, db0 = r.standard_normal((2, c)).astype(np.float32)
    return x, w, b, dout, dinp0, dw0, db0


# (N, C, rows_per_block, threads_per_row): N not a multiple of the rows per workgroup (64 / threads_per_row) or of
# rows_per_block; C / 4 smaller than the threads per row; C / 4 past KMAX (8) vec4s per thread (read again per pass);
# fewer rows than one workgroup's; the browser preset's C = 384. The backward's step 1 takes min(64 / threads_per_row,
# rows_per_block rounded up to a power of two) rows at a time: one partly filled round, or several (20, 72, 64, 32).
LN_SHAPES = [
    (45, 64, 5, 8),      # C4 16, 8 rows per workgroup: 45 = 5 x 8 + 5
    (37, 8, 3, 64),      # C4 2 < 64 threads per row: one row per workgroup, 62 threads idle
    (50, 4, 8, None),    # C4 1: 1 thread per row, 64 rows per workgroup, 14 past N
    (20, 72, 64, 32),    # C4 18 < 32 threads; one block of 20 rows (rows_per_block 64 > N)
    (70, 36, 7, 4),      # C4 9: 4 threads per row (3, 2, 2, 2 vec4s), 16 rows per workgroup
    (33, 200, 4, 2),     # C4 50 > 2 x KMAX: 34 vec4s of each row re-read per pass; 32 rows per workgroup
    (29, 136, 2, 1),     # C4 34 > KMAX with 1 thread per row
    (130, 12, 64, None),  # C4 3: 1 thread per row, 64 rows at once in the forward and the backward; 130 = 2 x 64 + 2
    (23, 384, 8, None),  # the browser preset's C: 16 threads per row, 4 rows per workgroup
    (1, 384, None, None),   # one row (the decoder's)
    (11, 1040, 3, None),  # C4 260: past KMAX vec4s per lane for subgroups of up to 32 (the tail re-read per pass)
]


def has_subgroups(dev):
    return dev.has_subgroup_ops()


# The subgroup kernels (a subgroup per row; lavapipe's subgroups have 8 lanes, SwiftShader's 4, NVIDIA's 32) and
# the workgroup-memory trees. Every device the tests run on (lavapipe, SwiftShader) has subgroups; one without
# must refuse subgroups=True with a clear error.
@pytest.mark.parametrize("subgroups", [False, True], ids=["trees", "subgroups"])
@pytest.mark.parametrize("n,c,rows_per_block,tpr", LN_SHAPES)
def test_layernorm_shapes(dev, n, c, rows_per_block, tpr, subgroups):
    x, w, b, dout, dinp0, dw0, db0 = layernorm_inputs(5, n, c, loc=3.0, scale=2.0)
    if subgroups and not has_subgroups(dev):
        with pytest.raises(GPUError, match="subgroups=False"):
            wait(LayerNorm.create(dev, n, c, rows_per_block, tpr, subgroups=True))
        return
    (out, mean, rstd, dinp, dw, db), ln = layernorm_run(dev, n, c, x, w, b, dout, dinp0, dw0, db0,
                                                        rows_per_block, tpr, subgroups)
    if tpr and not subgroups:
        assert ln.tpr == tpr and ln.rows_per_group == 64 // tpr
    ref_out, ref_mean, ref_rstd = reference.layernorm_forward(x, w, b)
    assert_close("layernorm out", out, ref_out, atol=1e-5, rtol=1e-5)
    assert_close("mean", mean, ref_mean, atol=1e-6, rtol=1e-6)
    assert_close("rstd", rstd, ref_rstd, atol=1e-6, rtol=1e-5)
    ref_dinp, ref_dw, ref_db = reference.layernorm_backward(dout, x, w, ref_mean, ref_rstd)
    assert_close("dinp (accumulated)", dinp, dinp0 + ref_dinp, atol=1e-5, rtol=1e-5)
    assert_close("dweight (accumulated)", dw, dw0 + ref_dw, atol=1e-4, rtol=1e-5)
    assert_close("dbias (accumulated)", db, db0 + ref_db, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("c,tpr,subgroups", [(72, None, False), (384, None, False), (200, 2, False),
                                             (384, None, True), (1040, None, True)])
def test_layernorm_large_mean(dev, c, tpr, subgroups):
    """Rows of mean 1000, std 1: the variance from E[x^2] - mean^2 in f32 would lose most of its digits (x^2 ~ 1e6,
    f32 spacing 0.06 there, against a variance of 1); the centred second pass keeps rstd to f32 rounding. The
    output's error is the f32 mean's (its spacing near 1000 is 6e-5), times rstd and weight."""
    n = 41
    x, w, b, dout, dinp0, dw0, db0 = layernorm_inputs(6, n, c, loc=1000.0, scale=1.0)
    if subgroups and not has_subgroups(dev):
        pytest.skip("no subgroups on this device (the shapes test checks the refusal)")
    (out, mean, rstd, dinp, dw, db), _ = layernorm_run(dev, n, c, x, w, b, dout, dinp0, dw0, db0, 4, tpr, subgroups)
    ref_out, ref_mean, ref_rstd = reference.layernorm_forward(x, w, b)
    assert_close("mean", mean, ref_mean, atol=0, rtol=1e-6)
    assert_close("rstd", rstd, ref_rstd, atol=0, rtol=1e-5)
    assert_close("layernorm out", out, ref_out, atol=1e-3, rtol=1e-5)
    ref_dinp, ref_dw, ref_db = reference.layernorm_backward(dout, x, w, ref_mean, ref_rstd)
    assert_close("dinp (accumulated)", dinp, dinp0 + ref_dinp, atol=3e-4, rtol=1e-5)
    assert_close("dweight (accumulated)", dw, dw0 + ref_dw, atol=5e-3, rtol=1e-5)
    assert_close("dbias (accumulated)", db, db0 + ref_db, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("n,c,rows_per_block,tpr,subgroups", [
    (N, C, 8, None, False), (33, 200, 4, 2, False), (45, 64, 5, 8, False), (37, 384, 3, None, False),
    (N, C, 8, None, True), (37, 384, 3, None, True), (11, 1040, 3, None, True)])
def test_layernorm_is_bit_identical(dev, n, c, rows_per_block, tpr, subgroups):
    """Two runs (fresh buffers, the same LayerNorm) give the same bits in every output."""
    if subgroups and not has_subgroups(dev):
        pytest.skip("no subgroups on this device (the shapes test checks the refusal)")
    inputs = layernorm_inputs(7, n, c, loc=2.0, scale=3.0)
    first, ln = layernorm_run(dev, n, c, *inputs, rows_per_block, tpr, subgroups)
    second, _ = layernorm_run(dev, n, c, *inputs, rows_per_block, tpr, subgroups)
    for name, a, b in zip(("out", "mean", "rstd", "dinp", "dweight", "dbias"), first, second):
        assert a.tobytes() == b.tobytes(), f"layernorm {name} differs between two runs"


@pytest.mark.parametrize("n,c,rows_per_block,layers,max_binding", [
    (45, 64, 5, 3, None), (23, 384, 8, 3, None), (130, 12, 64, 5, None), (11, 1040, 3, 2, None),
    (45, 64, 5, 5, 4096),   # a small binding limit: the gradients' span splits the layernorms into several dispatches
], ids=["C64", "C384", "C12-5ln", "C1040", "C64-split"])
def test_layernorm_deferred_param_grads_are_bit_identical(dev, monkeypatch, n, c, rows_per_block, layers,
                                                          max_binding):
    """Several layernorms' backwards in one sequence, each leaving its dweight / dbias to finish(), which makes
    them in one dispatch (layernorm_param_grads_deferred): the same bits as plain backwards, which match the
    reference. The gradients lie in one buffer as a model's do (each tensor 256-byte aligned), one pair of them
    given apart (their own buffers: made on their own by finish)."""
    if max_binding:
        monkeypatch.setitem(dev.limits, "max-storage-buffer-binding-size", max_binding)
    inputs = [layernorm_inputs(20 + i, n, c, loc=1.0, scale=2.0) for i in range(layers)]
    stride = -(-4 * c // 256) * 256

    def go(fold):
        ln = wait(LayerNorm.create(dev, n, c, rows_per_block, subgroups=False, deferred=layers, fold=fold))
        assert ln.defers is fold
        grads = dev.buffer(2 * layers * stride, "grads")
        for i, (*_, dw0, db0) in enumerate(inputs):
            dev.write(grads, dw0, 2 * i * stride)
            dev.write(grads, db0, (2 * i + 1) * stride)
        bufs = [dict(x=upload(dev, x), w=upload(dev, w), b=upload(dev, b), dout=upload(dev, dout),
                     dinp=upload(dev, dinp0), out=dev.buffer(4 * n * c, "out"), mean=dev.buffer(4 * n, "mean"),
                     rstd=dev.buffer(4 * n, "rstd"),
                     dw=grads.view(2 * i * stride, 4 * c), db=grads.view((2 * i + 1) * stride, 4 * c))
                for i, (x, w, b, dout, dinp0, dw0, db0) in enumerate(inputs)]
        apart = bufs[1]
        apart["dw"], apart["db"] = upload(dev, inputs[1][5]), upload(dev, inputs[1][6])

        def append(s):
            for t in bufs:
                ln.forward(s, out=t["out"], mean=t["mean"], rstd=t["rstd"], inp=t["x"], weight=t["w"], bias=t["b"])
            for t in bufs:
                ln.backward(s, dinp=t["dinp"], dweight=t["dw"], dbias=t["db"], dout=t["dout"], inp=t["x"],
                            weight=t["w"], mean=t["mean"], rstd=t["rstd"], defer=True)
            assert len(ln.pending) == (layers if fold else 0)
            before = len(s.ops)
            ln.finish(s)
            assert not ln.pending
            made = [op.label for op in s.ops[before:]]
            if not fold:
                assert made == []
            elif not max_binding:   # the pair apart on its own, then all the others in one dispatch
                assert made == ["layernorm_param_grads", "layernorm_param_grads_deferred"], made
            else:
                assert made.count("layernorm_param_grads_deferred") > 1, made
        run(dev, append)
        return [[download(dev, t["dinp"], shape=(n, c)), download_view(dev, t["dw"]), download_view(dev, t["db"])]
                for t in bufs]

    plain, folded = go(False), go(True)
    for i, ((x, w, b, dout, dinp0, dw0, db0), p, f) in enumerate(zip(inputs, plain, folded)):
        ref_out, ref_mean, ref_rstd = reference.layernorm_forward(x, w, b)
        ref = reference.layernorm_backward(dout, x, w, ref_mean, ref_rstd)
        for name, got, want, start in zip(("dinp", "dweight", "dbias"), p, ref, (dinp0, dw0, db0)):
            assert_close(f"layer {i} {name}", got, start + want, atol=1e-4, rtol=1e-5)
        for name, a, b in zip(("dinp", "dweight", "dbias"), p, f):
            assert a.tobytes() == b.tobytes(), f"layer {i} {name}: deferred differs from plain"


def download_view(dev, x):
    """A buffer's or view's f32s."""
    if hasattr(x, "buffer"):
        data = np.frombuffer(wait(dev.read(x.buffer)), dtype=np.float32)
        return data[x.offset // 4:(x.offset + x.size) // 4].copy()
    return download(dev, x)


def test_layernorm_deferred_scratch_is_in_the_memory_estimate(dev, monkeypatch):
    from tabgpt.config import preset
    from tabgpt.ops.layernorm import deferred_bytes, rows_per_block_for
    # (the GPUs' blocks, as the estimate counts them; CPU drivers make fewer, larger ones)
    ln = wait(LayerNorm.create(dev, 8192, 384, rows_per_block=rows_per_block_for(8192), subgroups=False, deferred=13,
                               fold=True))
    assert ln.slots[0].size == deferred_bytes(8192, 384, 13, fold=True) == 13 * 1024 * 2 * 384 * 4
    monkeypatch.setenv("TABGPT_LAYERNORM_FOLD", "0")
    base = preset("browser").gpu_bytes_estimate()
    monkeypatch.setenv("TABGPT_LAYERNORM_FOLD", "1")
    assert preset("browser").gpu_bytes_estimate() - base == ln.slots[0].size
    # 49 layernorms of 1024 channels: 49 x 1024 blocks x 2 x 1024 x 4 bytes = 392 MiB, over WebGPU's default 256 MiB
    # buffer, where each backward makes its own gradients: not counted
    big = preset("gpt2").replace(n_layer=24, n_embd=1024, n_head=16)
    assert big.n_layernorms == 49 and deferred_bytes(big.batch_size * big.block_size, 1024, 49) == 392 << 20
    monkeypatch.setenv("TABGPT_LAYERNORM_FOLD", "0")
    without = big.gpu_bytes_estimate()
    monkeypatch.setenv("TABGPT_LAYERNORM_FOLD", "1")
    assert big.gpu_bytes_estimate() == without
    # where the device's buffers are larger (limits raised to the adapter's), it makes them: counted
    assert big.gpu_bytes_estimate(max_buffer=1 << 30) - without == 392 << 20


def test_layernorm_blocks_are_larger_on_cpu_drivers(dev):
    from tabgpt.ops.layernorm import rows_per_block_for
    from tabgpt.gpu import is_cpu_adapter
    # GPUs: about 1024 blocks; CPU drivers: about 16 blocks of 16 to 64 rows (fewer threads a row, shorter trees)
    assert [rows_per_block_for(n) for n in (8, 256, 8192, 10 ** 6)] == [1, 1, 8, 64]
    assert [rows_per_block_for(n, cpu=True) for n in (8, 256, 1000, 8192)] == [16, 16, 63, 64]
    ln = wait(LayerNorm.create(dev, 256, 64, subgroups=False))
    assert ln.rows_per_block == rows_per_block_for(256, is_cpu_adapter(dev))


def test_layernorm_deferral_is_checked(dev, monkeypatch):
    ln = wait(LayerNorm.create(dev, 8, 16, subgroups=False, deferred=2, fold=True))
    big = {k: dev.buffer(4 * 8 * 16, k) for k in ("x", "dout", "dinp")}
    small = {k: dev.buffer(4 * 16, k) for k in ("w", "dw", "db")}
    stats = {k: dev.buffer(4 * 8, k) for k in ("mean", "rstd")}
    s1, s2 = dev.sequence("one"), dev.sequence("two")
    kw = dict(dinp=big["dinp"], dweight=small["dw"], dbias=small["db"], dout=big["dout"], inp=big["x"],
              weight=small["w"], mean=stats["mean"], rstd=stats["rstd"])
    ln.backward(s1, **kw, defer=True)
    with pytest.raises(GPUError, match="pending on another sequence"):
        ln.backward(s2, **kw)
    with pytest.raises(GPUError, match="recorded on another sequence"):
        ln.finish(s2)
    ln.backward(s1, **kw, defer=True)
    with pytest.raises(GPUError, match="more than 2 deferred layernorm backwards"):
        ln.backward(s1, **kw, defer=True)
    # gradients left pending would never be made: the sequence refuses to build, run or be appended
    for use in (lambda: wait(s1.build()), lambda: s1.run(), lambda: dev.sequence("three").extend(s1)):
        with pytest.raises(GPUError, match="'one' has unfinished work: deferred layernorm backwards pending"):
            use()
    ln.finish(s1)
    wait(s1.build())
    ln.finish(s2)   # nothing pending: nothing to do
    grads = dev.buffer(512, "grads")   # dweight and dbias in one buffer, as a model's
    both = dict(kw, dweight=grads.view(0, 4 * 16), dbias=grads.view(256, 4 * 16))
    ln.backward(s1, **both, defer=True)
    ln.backward(s1, **both, defer=True)
    before = len(s1.ops)
    ln.finish(s1)   # both into the same gradients: one dispatch each, in order (one together would race)
    assert [op.label for op in s1.ops[before:]] == ["layernorm_param_grads_deferred"] * 2
    monkeypatch.setenv("TABGPT_LAYERNORM_FOLD", "on")
    with pytest.raises(GPUError, match="TABGPT_LAYERNORM_FOLD must be 0 or 1"):
        wait(LayerNorm.create(dev, 8, 16, subgroups=False, deferred=2))
    monkeypatch.setenv("TABGPT_LAYERNORM_FOLD", "1")
    assert wait(LayerNorm.create(dev, 8, 16, subgroups=False, deferred=2)).defers
    assert not wait(LayerNorm.create(dev, 8, 16, subgroups=False)).defers          # no slots asked for
    slots = wait(LayerNorm.create(dev, 8, 16, subgroups=False, deferred=2)).slots
    monkeypatch.setitem(dev.limits, "max-buffer-size", slots[0].size - 4)   # slots that outgrow one buffer
    assert not wait(LayerNorm.create(dev, 8, 16, subgroups=False, deferred=2)).defers   # each makes its own
    if dev.has_subgroup_ops():
        assert not wait(LayerNorm.create(dev, 8, 16, subgroups=True, deferred=2)).defers   # not the subgroup kernels


def test_layernorm_threads_per_row_choice():
    from tabgpt.ops.layernorm import pick_threads_per_row
    assert [pick_threads_per_row(c) for c in (4, 32, 36, 64, 72, 128, 384, 768, 2048, 4096)] == \
        [1, 1, 2, 2, 4, 4, 16, 32, 64, 64]


# ---------------------------------------------------------------------------------------------
# elementwise

def test_gelu_forward_backward_and_inplace(dev):
    r = rng(5)
    n = N * 4 * C
    x = (r.standard_normal(n) * 3).astype(np.float32)
    x[:8] = [-30, -12, -9.5, 0, 9.5, 12, 30, 1e-3]   # saturated tanh must stay finite
    dout = r.standard_normal(n).astype(np.float32)
    ew = wait(Elementwise.create(dev))
    bx, bd = upload(dev, x), upload(dev, dout)
    out, dinp, dio = dev.buffer(4 * n, "out"), dev.buffer(4 * n, "dinp"), upload(dev, dout, "dio")

    def append(s):
        ew.gelu_forward(s, out=out, inp=bx, n=n)
        ew.gelu_backward(s, dinp=dinp, inp=bx, dout=bd, n=n)
        ew.gelu_backward_inplace(s, dinout=dio, inp=bx, n=n)
    run(dev, append)
    # f32 tanh is good to a few ulp; gelu' is a difference of O(1) terms, so its error is absolute, ~1e-6
    assert_close("gelu", download(dev, out), reference.gelu_forward(x), atol=2e-6, rtol=1e-5)
    ref = reference.gelu_backward(dout, x)
    assert_close("gelu backward", download(dev, dinp), ref, atol=1e-5, rtol=1e-5)
    assert_close("gelu backward in place", download(dev, dio), ref, atol=1e-5, rtol=1e-5)


def test_residual_add_and_accumulate(dev):
    r = rng(6)
    a, b, acc = r.standard_normal((3, N * C)).astype(np.float32)
    ew = wait(Elementwise.create(dev))
    out, dacc = dev.buffer(4 * N * C, "out"), upload(dev, acc)
    ba, bb = upload(dev, a), upload(dev, b)
    run(dev, lambda s: (ew.add(s, out=out, a=ba, b=bb), ew.accumulate(s, out=dacc, inp=bb)))
    assert_close("add", download(dev, out), a.astype(np.float64) + b, atol=1e-6)
    assert_close("accumulate", download(dev, dacc), acc.astype(np.float64) + b, atol=1e-6)
    with pytest.raises(Exception, match="multiple of 4"):
        ew.add(dev.sequence(), out=out, a=ba, b=bb, n=N * C - 1)


def test_fill_scale_copy_touch_only_their_range(dev):
    r = rng(7)
    n = 5000
    x = r.standard_normal(n).astype(np.float32)
    ew = wait(Elementwise.create(dev))
    buf, src = upload(dev, x, "buf"), upload(dev, x[::-1].copy(), "src")
    # ranges given as views at 256-byte offsets, with awkward lengths; the rest must stay as it was
    run(dev, lambda s: (ew.zero(s, buf.view(256, 4 * 1001)),
                        ew.fill(s, buf.view(1024 * 4, 4 * 7), 2.5),
                        ew.scale(s, buf.view(2048 * 4, 4 * 333), -3.0),
                        ew.copy(s, buf.view(3072 * 4, 4 * 999), src.view(0, 4 * 999))))
    ref = x.copy()                      # float32 arithmetic: the results must match exactly
    ref[64:64 + 1001] = 0
    ref[1024:1031] = 2.5
    ref[2048:2048 + 333] *= np.float32(-3)
    ref[3072:3072 + 999] = x[::-1][:999]
    assert_close("fill/zero/scale/copy", download(dev, buf), ref, atol=0)


def test_operands_beyond_the_binding_limit_are_split_into_aligned_views(dev):
    bufs = {"a": dev.buffer(4 * 1000, "a"), "b": dev.buffer(4 * 1064, "b").view(256, 4 * 1000)}
    pieces = chunk_views(dev, 1000, bufs, unit=4, limit=1024)
    assert [count for count, _ in pieces] == [256, 256, 256, 232]
    for i, (count, views) in enumerate(pieces):
        assert views["a"].offset == 1024 * i and views["a"].size == 4 * count
        assert views["b"].offset == 256 + 1024 * i and views["b"].offset % 256 == 0


# ---------------------------------------------------------------------------------------------
# cross-entropy

def crossentropy_inputs(seed, v=V, vp=Vp):
    r = rng(seed)
    logits = (r.standard_normal((N, vp)) * 3).astype(np.float32)
    logits[:, v:] = 1e4                 # padding columns: garbage that must not enter the softmax
    logits[7, 123] = 88.0               # exp would overflow without the max subtraction
    targets = r.integers(0, v, N).astype(np.uint32)
    targets[0], targets[1], targets[7] = 0, v - 1, 123
    return logits, targets


def make_crossentropy(dev, subgroups, v=V, vp=Vp, **kw):
    """The CrossEntropy with the subgroup kernels or the trees; None where the device refuses subgroups (checked)."""
    if subgroups and not has_subgroups(dev):
        with pytest.raises(GPUError, match="subgroups=False"):
            wait(CrossEntropy.create(dev, N, v, vp, subgroups=True, **kw))
        return None
    ce = wait(CrossEntropy.create(dev, N, v, vp, subgroups=subgroups, **kw))
    assert ce.subgroups == subgroups
    return ce


# V 1001: 251 vec4s, fewer than the 256 threads (the last five read nothing); V 3001 in Vp 3008: the two running
# pairs per thread both in use, padding inside the last vec4.
# threads a row: a GPU's 256, a CPU driver's 32, and 1 (no tree); the subgroup kernels with a GPU's
@pytest.mark.parametrize("subgroups,threads", [(False, 256), (False, 32), (False, 1), (True, 256)],
                         ids=["trees", "trees-32", "trees-1", "subgroups"])
@pytest.mark.parametrize("v,vp", [(V, Vp), (3001, 3008)])
def test_crossentropy_forward_backward_and_mean(dev, subgroups, v, vp, threads):
    logits, targets = crossentropy_inputs(8, v, vp)
    ce = make_crossentropy(dev, subgroups, v, vp, threads=threads)
    if ce is None:
        return
    blog, bt = upload(dev, logits), upload(dev, targets)
    losses_fwd, losses = dev.buffer(4 * N, "losses_fwd"), dev.buffer(4 * N, "losses")
    loss = dev.buffer(16, "loss")

    def append(s):
        ce.forward(s, losses=losses_fwd, logits=blog, targets=bt)
        ce.forward_backward(s, losses=losses, logits=blog, targets=bt)   # blog now holds dlogits
        ce.mean(s, loss=loss.view(0, 4), losses=losses)
        ce.mean(s, loss=loss, losses=losses, accumulate=True)            # += : twice the mean
    run(dev, append)
    ref_losses, ref_d = crossentropy_ref(logits, targets, 1.0 / N, v)
    assert_close("losses (forward)", download(dev, losses_fwd), ref_losses, atol=1e-5, rtol=1e-5)
    assert_close("losses (forward_backward)", download(dev, losses), ref_losses, atol=1e-5, rtol=1e-5)
    d = download(dev, blog, shape=(N, vp))
    assert_close("dlogits", d, ref_d, atol=1e-8, rtol=1e-4)
    assert not d[:, v:].any(), "padded columns got a gradient"
    ref_mean = 2 * ref_losses.astype(np.float64).mean()
    assert_close("mean loss, accumulated twice", download(dev, loss)[0], ref_mean, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("subgroups", [False, True], ids=["trees", "subgroups"])
def test_crossentropy_is_deterministic(dev, subgroups):
    logits, targets = crossentropy_inputs(9)
    ce = make_crossentropy(dev, subgroups, grad_scale=0.25)
    if ce is None:
        return
    results = []
    for _ in range(2):
        blog, losses, loss = upload(dev, logits), dev.buffer(4 * N, "losses"), dev.buffer(4, "loss")
        run(dev, lambda s: (ce.forward_backward(s, losses=losses, logits=blog, targets=upload(dev, targets)),
                            ce.mean(s, loss=loss, losses=losses)))
        results.append([wait(dev.read(b)) for b in (blog, losses, loss)])
    assert results[0] == results[1], "cross-entropy results differ between two runs"
    _, ref_d = crossentropy_ref(logits, targets, 0.25)
    assert_close("dlogits (grad_scale 0.25)", np.frombuffer(results[0][0], np.float32).reshape(N, Vp), ref_d,
                 atol=1e-8, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# AdamW with global-norm clipping

P = 5003                                       # not a multiple of 4, 32 or 256
DECAY = [(0, 1500), (1717, 2001), (5000, 3)]   # ranges that start and end inside bit-mask words
HYPER = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def decay_flags():
    flags = np.zeros(P, bool)
    for off, count in DECAY:
        flags[off:off + count] = True
    return flags


def test_decay_mask_bits_follow_the_ranges():
    words = np.array(decay_mask(P, DECAY), np.uint32)
    bits = ((words[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(bool).ravel()[:P]
    assert np.array_equal(bits, decay_flags())


class AdamWRun:
    """params, grads, m, v on the GPU plus their NumPy twins (the reference's AdamW), stepped together."""

    def __init__(self, dev, seed, max_binding=None, threads=None):
        r = rng(seed)
        self.dev = dev
        self.p = r.standard_normal(P).astype(np.float32)
        self.m = np.zeros(P, np.float32)
        self.v = np.zeros(P, np.float32)
        self.ref_p = self.p.copy()
        self.bufs = {"params": upload(dev, self.p, "params"), "grads": dev.buffer(4 * P, "grads"),
                     "m": dev.buffer(4 * P, "m"), "v": dev.buffer(4 * P, "v")}
        self.opt = wait(AdamW.create(dev, P, DECAY, ring=8, max_binding=max_binding, threads=threads))
        self.seq = dev.sequence("adamw")
        self.opt.step(self.seq, **self.bufs)
        wait(self.seq.build())
        self.rng = r

    def step(self, t, lr, max_norm, grads=None, scale=1.0):
        g = (self.rng.standard_normal(P) * scale).astype(np.float32) if grads is None else grads
        self.dev.write(self.bufs["grads"], g)
        self.opt.write_step(t=t, lr=lr, max_norm=max_norm, **HYPER)
        self.seq.run()
        wait(self.dev.sync())
        return g

    def reference_step(self, g, t, lr, max_norm):
        self.ref_p, self.m, self.v, norm = adamw_ref(self.ref_p, g, self.m, self.v, t, lr, HYPER["beta1"],
                                                     HYPER["beta2"], HYPER["eps"], HYPER["weight_decay"],
                                                     max_norm, decay_flags())
        return norm

    def state(self):
        return {name: download(self.dev, self.bufs[name]) for name in ("params", "m", "v")}


# threads: a GPU's 256 and a CPU driver's 32 (every device runs both)
@pytest.mark.parametrize("threads", [256, 32])
@pytest.mark.parametrize("max_norm,clipped", [(1.0, True), (1e6, False), (0.0, False)])
def test_adamw_three_steps_match_numpy(dev, max_norm, clipped, threads):
    # max_binding 4096 bytes: the 5003 parameters are bound in 5 chunks of views, as a 124M model would be
    run_ = AdamWRun(dev, seed=10, max_binding=4096, threads=threads)
    assert len(run_.opt.pieces) == 5 and run_.opt.wg == threads
    for t in (1, 2, 3):
        lr = 1e-2 * t
        g = run_.step(t, lr, max_norm, scale=0.5)
        norm = run_.reference_step(g, t, lr, max_norm)
        stats = wait(run_.opt.read_stats())
        assert_close(f"grad norm at step {t}", stats["norm"], norm, atol=0, rtol=1e-5)
        want_scale = min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0
        assert (want_scale < 1) == clipped, f"clipping should be {'on' if clipped else 'off'} (norm {norm})"
        assert_close("clip scale", stats["scale"], want_scale, atol=0, rtol=1e-5)
        assert not stats["skip"] and stats["skipped"] == 0
        got = run_.state()
        assert_close(f"params after step {t}", got["params"], run_.ref_p, atol=1e-6, rtol=1e-5)
        assert_close(f"m after step {t}", got["m"], run_.m, atol=1e-7, rtol=1e-4)
        assert_close(f"v after step {t}", got["v"], run_.v, atol=1e-9, rtol=1e-4)
    norms = wait(run_.opt.read_norms([1, 2, 3]))
    assert norms[2] == wait(run_.opt.read_stats())["norm"] and all(n > 0 for n in norms)


def test_cpu_drivers_get_shorter_trees_and_bad_thread_counts_are_refused(dev):
    from tabgpt.ops.elementwise import TREE_WG, TREE_WG_CPU
    from tabgpt.gpu import is_cpu_adapter
    cpu = is_cpu_adapter(dev)
    assert wait(AdamW.create(dev, P)).wg == (TREE_WG_CPU if cpu else TREE_WG) and TREE_WG_CPU < TREE_WG
    ce = wait(CrossEntropy.create(dev, N, V, Vp, subgroups=False))
    assert ce.k["crossentropy_forward_backward"].constants["WG"] == (TREE_WG_CPU if cpu else TREE_WG)
    for bad in (3, 512):
        with pytest.raises(GPUError, match="power of two in 1..256"):
            wait(AdamW.create(dev, P, threads=bad))
        with pytest.raises(GPUError, match="power of two in 1..256"):
            wait(CrossEntropy.create(dev, N, V, Vp, threads=bad))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_adamw_skips_non_finite_gradients(dev, bad):
    run_ = AdamWRun(dev, seed=11)
    g1 = run_.step(1, 1e-2, 1.0)
    run_.reference_step(g1, 1, 1e-2, 1.0)
    before = run_.state()
    g2 = run_.rng.standard_normal(P).astype(np.float32)
    g2[4321] = bad
    run_.step(2, 1e-2, 1.0, grads=g2)
    stats = wait(run_.opt.read_stats())
    assert stats["skip"] and stats["skipped"] == 1, stats
    assert not math.isfinite(stats["norm"])
    after = run_.state()
    for name in ("params", "m", "v"):
        assert np.array_equal(before[name], after[name]), f"{name} changed on a skipped step"
    # the next finite step updates again (step 3 for the optimizer's bias correction)
    g3 = run_.step(3, 1e-2, 1.0)
    run_.reference_step(g3, 3, 1e-2, 1.0)
    stats = wait(run_.opt.read_stats())
    assert not stats["skip"] and stats["skipped"] == 1, stats
    assert_close("params after a skipped step", run_.state()["params"], run_.ref_p, atol=1e-6, rtol=1e-5)
    norms = wait(run_.opt.read_norms([1, 2, 3]))
    assert math.isfinite(norms[0]) and not math.isfinite(norms[1]) and math.isfinite(norms[2]), norms


def test_adamw_is_deterministic(dev):
    results = []
    for _ in range(2):
        run_ = AdamWRun(dev, seed=12, max_binding=8192)
        for t in (1, 2):
            run_.step(t, 3e-3, 1.0, scale=2.0)
        results.append([wait(dev.read(run_.bufs[k])) for k in ("params", "m", "v")]
                       + [wait(dev.read(run_.opt.stats))])
    assert results[0] == results[1], "AdamW results differ between two runs"
