"""The whole GPT-2 training step on the GPU (natively, lavapipe in CI) against the NumPy reference
(tests/reference.py, itself proven against PyTorch): logits, loss, every gradient tensor, a 10-step AdamW loss
curve and the parameters after it; determinism, GPU init statistics, gradient accumulation, the skipped
non-finite step, evaluation metrics, the training loop, and cached generation against a full forward.

Shapes are awkward on purpose: B=3, T=37 (block_size 48, so wpe has rows no position reaches), C=72,
n_head=3 (head size 24), V=1001 padded to 1024, L=2. Errors are per tensor, max|gpu - ref| / max|ref|,
printed as a table (pytest -s shows it).
"""

import array
import math
import struct

import numpy as np
import pytest

import reference as ref
from tabgpt.config import Config
from tabgpt.gpt import GPT
from tabgpt.gpu import wait

B, T = 3, 37
CLIP = 0.85    # about the norms of the 10-step test: some steps are clipped, some not
RCFG = ref.GPTConfig(n_layer=2, n_head=3, n_embd=72, block_size=48, vocab_size=1001)
C, V = RCFG.n_embd, RCFG.vocab_size
KEY_BIAS = slice(C, 2 * C)   # c_attn.bias[C:2C]: its true gradient is exactly 0 (see reference.adamw_step)

# Tolerances about 10x what lavapipe measured (float32 kernels against the float64-inside reference):
TOL_LOGITS = 5e-6      # logits, relative to the largest |logit| (measured 4e-7; cached generation 4e-7)
TOL_LOSS = 2e-6        # mean loss, relative (measured 1e-7)
TOL_GRAD = 2e-5        # each gradient tensor, relative to its largest entry (measured at most 1.1e-6)
TOL_KEY_BIAS = 1e-9    # the key bias gradient (true value 0), absolute (measured 1.4e-11)
TOL_STEP_LOSS = 2e-6   # each of the 10 losses, relative (measured 1.4e-7)
TOL_NORM = 2e-5        # each step's gradient norm, relative
ADAM_CLOSE = 1e-6      # params after 10 AdamW steps (lr 1e-3): absolute difference of almost every element ...
ADAM_SHARE = 1e-3      # ... all but this share of them (measured 1.2e-4) ...
ADAM_MAX = 1e-4        # ... and no element off by more than a tenth of one step (measured 1.1e-5)


def config(**kw) -> Config:
    base = dict(n_layer=RCFG.n_layer, n_head=RCFG.n_head, n_embd=C, block_size=RCFG.block_size, vocab_size=V,
                batch_size=B, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=CLIP)
    return Config(**{**base, **kw})


@pytest.fixture(scope="module")
def model(dev):
    return wait(GPT.create(dev, config(), B, T))


def noisy_params(seed=0):
    """GPT-2 init plus noise on LayerNorm weights and all biases (fresh ones are 1s and 0s: they hide mistakes)."""
    rng = np.random.default_rng(seed + 100)
    params = ref.init_params(RCFG, seed)
    for name, p in params.items():
        if p.ndim == 1:
            p += (0.1 * rng.standard_normal(p.shape)).astype(np.float32)
    return params


def batch(seed, b=B, t=T):
    """Token ids with repeats (the embedding backward must add up rows of one token) and random targets."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, size=(b, t))
    x[:, ::3] = rng.integers(0, 8, size=x[:, ::3].shape)
    return x, rng.integers(0, V, size=(b, t))


def u32(a) -> array.array:
    return array.array("I", np.asarray(a, dtype=np.uint32).reshape(-1).tobytes())


def upload(model, params):
    """Reset the model (init zeroes grads, moments, stats) and load these parameters."""
    wait(model.init_weights(0))
    model.load_params({k: (v.shape, v.tobytes()) for k, v in params.items()})


def as_numpy(tensors) -> dict:
    return {k: np.frombuffer(data, np.float32).reshape(shape) for k, (shape, data) in tensors.items()}


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def report(title, rows, tol):
    print(f"\n{title} (tolerance {tol:.0e})")
    for name, err in rows:
        print(f"  {err:9.2e}  {name}{'  <-- FAIL' if err > tol else ''}")
    bad = [(n, e) for n, e in rows if e > tol]
    assert not bad, f"{title}: {len(bad)} over {tol:.0e}: " + ", ".join(f"{n} {e:.2e}" for n, e in bad)


def read_floats(model, buf, count=None):
    return np.frombuffer(wait(model.dev.read(buf, 0, None if count is None else 4 * count)), np.float32)


def train_gpu(model, batches, n, lr, micro=1):
    """n steps on the GPU as tabgpt.train drives them (train_step, `micro` micro-batches each: one submission a
    step for one); returns the (loss, norm, skipped) of each."""
    for step in range(n):
        model.train_step(step, lr(step + 1), [tuple(u32(a) for a in batches[(step * micro + i) % len(batches)])
                                              for i in range(micro)])
    return wait(model.read_step_stats(range(n)))


def train_apart(model, batches, n, lr, micro=1):
    """train_gpu's steps made from the separate sequences: zero_grad, forward-backward per micro-batch, update
    (three submissions a step or more)."""
    for step in range(n):
        model.set_step(step, lr(step + 1))
        model.run_zero_grad()
        for i in range(micro):
            model.set_batch(*(u32(a) for a in batches[(step * micro + i) % len(batches)]))
            model.run_forward_backward()
        model.run_update(slot=step)
    return wait(model.read_step_stats(range(n)))


# ------------------------------------------------------------------------------------------------------------

def test_layout_is_hugging_face_and_aligned(model):
    shapes = ref.param_shapes(RCFG)
    assert [s.name for s in model.specs] == list(shapes)
    assert all(s.shape == shapes[s.name] for s in model.specs)
    assert all(s.offset % 64 == 0 for s in model.specs), "every tensor must start 256-byte aligned"
    assert model.n_params == config().n_params() == sum(math.prod(s) for s in shapes.values())
    ends = [(s.offset, s.offset + s.numel) for s in model.specs]
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:])), "tensors overlap"
    assert model.P >= ends[-1][1] and model.gpu_bytes > 4 * 4 * model.P and model.kernel_count > 10


def test_forward_logits_and_loss_match_reference(model):
    params = noisy_params()
    x, y = batch(1)
    upload(model, params)
    model.set_batch(u32(x), u32(y))
    model.run_eval()
    loss = wait(model.read_eval_loss())
    logits = np.frombuffer(wait(model.read_logits()), np.float32).reshape(B, T, -1)
    want_loss, want_logits, _ = ref.forward(params, RCFG, x, y)
    print(f"\nloss {loss:.7f} reference {want_loss:.7f}; logits max rel err {rel_err(logits, want_logits):.2e}")
    assert rel_err(logits, want_logits) < TOL_LOGITS
    assert abs(loss - want_loss) / want_loss < TOL_LOSS
    assert np.all(logits[..., V:] == 0), "padded wte rows are 0, so padded logits must be exactly 0"


def test_every_gradient_matches_reference(model):
    # the layers' weight gradients in pairs, one dispatch each (MatmulPair)
    assert model.ops.mlp_pair is not None and model.ops.attn_pair is not None
    check_every_gradient(model)


def test_every_gradient_matches_reference_with_the_weight_gradients_apart(dev, monkeypatch):
    """TABGPT_MATMUL_PAIRS=0: each Conv1D makes its own weight (and bias) gradient."""
    monkeypatch.setenv("TABGPT_MATMUL_PAIRS", "0")
    m = wait(GPT.create(dev, config(), B, T))
    assert m.ops.mlp_pair is None and m.ops.attn_pair is None
    check_every_gradient(m)


def test_every_gradient_matches_reference_with_the_attention_backward_as_products(dev, monkeypatch):
    """TABGPT_ATTENTION_BACKWARD=products (the default from 384 positions) on the test model's short sequences."""
    monkeypatch.setenv("TABGPT_ATTENTION_BACKWARD", "products")
    m = wait(GPT.create(dev, config(), B, T))
    assert m.ops.attn.backward_mode == "products"
    check_every_gradient(m)


def test_every_gradient_matches_reference_with_subgroup_reductions(dev, monkeypatch):
    """TABGPT_SUBGROUPS=1: the model's layernorms and cross-entropies take the subgroup kernels (the test devices,
    lavapipe among them, have subgroups), and the whole model still matches the reference."""
    monkeypatch.setenv("TABGPT_SUBGROUPS", "1")
    m = wait(GPT.create(dev, config(), B, T))
    assert m.ops.ln.subgroups and m.ops.ce.subgroups and m.ops.ce_eval.subgroups, "subgroup kernels not used"
    check_every_gradient(m)
    test_forward_logits_and_loss_match_reference(m)


def test_deferred_layernorm_gradients_are_bit_identical(dev, model, monkeypatch):
    """The layernorms' parameter gradients made together at the end of the backward (one dispatch for all 2 L + 1
    of them; TABGPT_LAYERNORM_FOLD, on by default) or each after its backward (TABGPT_LAYERNORM_FOLD=0): every
    gradient matches the reference either way, and the two agree to the bit over two accumulated micro-batches."""
    models = []
    monkeypatch.setenv("TABGPT_SUBGROUPS", "0")   # the subgroup kernels do not defer
    for fold in ("0", "1"):
        monkeypatch.setenv("TABGPT_LAYERNORM_FOLD", fold)
        models.append(wait(GPT.create(dev, config(), B, T)))
    monkeypatch.delenv("TABGPT_LAYERNORM_FOLD")
    assert [m.ops.ln.defers for m in models] == [False, True]
    assert model.ops.ln.defers is not model.ops.ln.subgroups, "folded by default (not with the subgroup kernels)"
    check_every_gradient(models[0])
    got = []
    for each in models:
        upload(each, noisy_params(3))
        each.run_zero_grad()
        for seed in (4, 5):
            each.set_batch(*(u32(a) for a in batch(seed)))
            each.run_forward_backward()
        got.append(as_numpy(wait(each.get_grads())))
    for name in got[0]:
        assert got[0][name].tobytes() == got[1][name].tobytes(), f"{name}: deferred differs from the default"


def check_every_gradient(model):
    params = noisy_params()
    x, y = batch(2)
    upload(model, params)
    model.run_zero_grad()
    model.set_batch(u32(x), u32(y))
    model.run_forward_backward()
    grads = as_numpy(wait(model.get_grads()))
    loss = float(read_floats(model, model.loss)[0])
    want_loss, _, cache = ref.forward(params, RCFG, x, y)
    want = ref.backward(params, RCFG, cache)
    rows = [("loss", abs(loss - want_loss) / want_loss)]
    for name, w in want.items():
        g = grads[name]
        assert g.shape == w.shape, name
        if name.endswith("c_attn.bias"):
            key = float(np.abs(g[KEY_BIAS]).max())
            print(f"\n{name}[C:2C] (true gradient 0): max |gpu| {key:.2e}, reference {np.abs(w[KEY_BIAS]).max():.2e}")
            assert key < TOL_KEY_BIAS, f"{name} key part: {key:.2e}"
            g, w = np.delete(g, KEY_BIAS), np.delete(w, KEY_BIAS)
        rows.append((name, rel_err(g, w)))
    report("gradients, max|gpu - ref| / max|ref|", rows, TOL_GRAD)
    assert np.all(grads["transformer.wte.weight"][V:] == 0), "padded wte rows must get no gradient"
    assert np.all(grads["transformer.wpe.weight"][T:] == 0), "positions >= T must get no gradient"


def test_ten_adamw_steps_match_reference(model):
    params = noisy_params()
    batches = [batch(10), batch(11)]
    lr = lambda t: 1e-3 * min(1.0, t / 3)   # noqa: E731  (warmup: bias corrections and lr change every step)
    upload(model, params)
    stats = train_gpu(model, batches, 10, lr)
    want_params = {k: v.copy() for k, v in params.items()}
    state, want_losses, want_norms = {}, [], []
    for i in range(10):
        loss, norm = ref.train_step(want_params, RCFG, *batches[i % 2], state, lr, max_norm=CLIP)
        want_losses.append(loss)
        want_norms.append(norm)
    worst_norm = 0.0
    print("\nstep   loss gpu     loss ref     norm gpu   norm ref")
    for i, ((loss, norm, skipped), wl, wn) in enumerate(zip(stats, want_losses, want_norms)):
        print(f"{i:4d}  {loss:.7f}  {wl:.7f}  {norm:.5f}  {wn:.5f}")
        assert not skipped
        assert abs(loss - wl) / wl < TOL_STEP_LOSS, f"step {i}: loss {loss} vs {wl}"
        assert abs(norm - wn) / wn < TOL_NORM, f"step {i}: norm {norm} vs {wn}"
        worst_norm = max(worst_norm, abs(norm - wn) / wn)
    print(f"norms: max rel err {worst_norm:.2e}")
    assert min(want_norms) < CLIP < max(want_norms), "the test should clip some steps and not others"
    # Adam divides by sqrt(v): where a gradient is near 0, rounding noise becomes a visible share of a step.
    # So: almost every element within ADAM_CLOSE, and none off by more than a tenth of one step (lr).
    got = as_numpy(wait(model.get_params(padded=True)))
    print(f"\nparams after 10 steps: max |gpu - ref|, elements off by more than {ADAM_CLOSE:.0e} (key bias left out)")
    worst, n_off, n_all = 0.0, 0, 0
    for name, w in want_params.items():
        g = got[name]
        if name.endswith("c_attn.bias"):
            g, w = np.delete(g, KEY_BIAS), np.delete(w, KEY_BIAS)
        d = np.abs(g.astype(np.float64) - w)
        print(f"  {d.max():9.2e}  {int((d > ADAM_CLOSE).sum()):4d} of {d.size:6d}  {name}")
        worst, n_off, n_all = max(worst, d.max()), n_off + int((d > ADAM_CLOSE).sum()), n_all + d.size
    assert worst < ADAM_MAX, f"an element is off by {worst:.2e} after 10 steps"
    assert n_off / n_all < ADAM_SHARE, f"{n_off} of {n_all} elements off by more than {ADAM_CLOSE}"


def test_same_seed_gives_bit_identical_losses(model):
    x, y = batch(3)
    runs = []
    for _ in range(2):
        wait(model.init_weights(1234))
        stats = train_gpu(model, [(x, y)], 4, lambda t: 3e-3)
        runs.append([struct.pack("<2f", loss, norm) for loss, norm, _ in stats])
    assert runs[0] == runs[1], f"losses and norms differ between two runs: {runs}"
    wait(model.init_weights(1235))
    other = train_gpu(model, [(x, y)], 1, lambda t: 3e-3)
    assert struct.pack("<2f", *other[0][:2]) != runs[0][0], "another seed should give other weights"


def test_train_step_is_the_separate_sequences(model):
    """train_step (one submission a step for one micro-batch, step_seq) trains to the bit as the separate
    zero_grad, forward-backward and update sequences do: stats of every step and the parameters after them.
    It takes as many micro-batches as the model's grad_accum (its loss scale), no other number."""
    batches = [batch(20), batch(21), batch(22)]
    lr = lambda t: 2e-3 * min(1.0, t / 2)   # noqa: E731
    got = []
    for run in (train_gpu, train_apart):
        upload(model, noisy_params(6))
        stats = run(model, batches, 3, lr)
        params = wait(model.get_params(padded=True))
        got.append(([struct.pack("<2f?", *s) for s in stats], params))
    assert got[0][0] == got[1][0], f"step stats differ: {got[0][0]} against {got[1][0]}"
    assert got[0][1] == got[1][1], "parameters differ after three steps"
    assert len(model.step_seq) == len(model.zero_seq) + len(model.fwd_bwd_seq) + len(model.update_seq)
    with pytest.raises(ValueError, match="grad_accum = 1 micro-batches, got 2"):
        model.train_step(0, 1e-3, [tuple(u32(a) for a in b) for b in batches[:2]])


def test_init_statistics(model):
    wait(model.init_weights(7))
    got = as_numpy(wait(model.get_params(padded=True)))
    L = RCFG.n_layer
    print("\ntensor                                  std        want")
    for s in model.specs:
        p = got[s.name].astype(np.float64)
        kind, value = s.init
        if kind == "const":
            assert np.all(p == value), f"{s.name} should be all {value}"
            continue
        if s.name == "transformer.wte.weight":
            assert np.all(p[V:] == 0), "padded wte rows must be 0"
            p = p[:V]
        want = 0.02 / math.sqrt(2 * L) if s.name.endswith("c_proj.weight") else 0.02
        assert value == pytest.approx(want)
        std, mean = p.std(), p.mean()
        print(f"{s.name:38s}  {std:.5f}  {want:.5f}")
        assert abs(std / want - 1) < 0.05, f"{s.name}: std {std:.5f}, want {want:.5f}"
        assert abs(mean) < 5 * want / math.sqrt(p.size), f"{s.name}: mean {mean:.2e}"
    a, b = got["transformer.h.0.mlp.c_fc.weight"], got["transformer.h.1.mlp.c_fc.weight"]
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.05, "two tensors drew the same random numbers"
    again = as_numpy(wait(model.get_params(padded=True)))
    wait(model.init_weights(7))
    assert all(np.array_equal(again[k], v) for k, v in as_numpy(wait(model.get_params(padded=True))).items())


def test_grad_accumulation_equals_the_full_batch(dev, model):
    """grad_accum=2 on two half batches (the module's model, B=3) == one batch of B=6."""
    full = wait(GPT.create(dev, config(batch_size=6), 6, T))
    params = noisy_params(1)
    x, y = batch(4, b=6)
    upload(full, params)
    full.run_zero_grad()
    full.set_batch(u32(x), u32(y))
    full.run_forward_backward()
    want = as_numpy(wait(full.get_grads()))
    want_loss = float(read_floats(full, full.loss)[0])

    half = wait(GPT.create(dev, config(grad_accum=2), B, T))
    upload(half, params)
    half.run_zero_grad()
    for rows in (slice(0, 3), slice(3, 6)):
        half.set_batch(u32(x[rows]), u32(y[rows]))
        half.run_forward_backward()
    got = as_numpy(wait(half.get_grads()))
    loss = float(read_floats(half, half.loss)[0])
    ref_loss, _, _ = ref.forward(params, RCFG, x, y)
    rows = [("loss vs B=6", abs(loss - want_loss) / want_loss), ("loss vs reference", abs(loss - ref_loss) / ref_loss)]
    for name, w in want.items():
        g = got[name]
        if name.endswith("c_attn.bias"):
            g, w = np.delete(g, KEY_BIAS), np.delete(w, KEY_BIAS)
        rows.append((name, rel_err(g, w)))
    report("grad_accum=2 of B=3 vs one batch of B=6", rows, TOL_GRAD)


def test_non_finite_step_is_skipped_and_reported(model):
    params = noisy_params()
    x, y = batch(5)
    upload(model, params)
    train_gpu(model, [(x, y)], 1, lambda t: 1e-3)
    before = wait(model.dev.read(model.params))
    m_before = wait(model.dev.read(model.m))
    name = "transformer.h.1.mlp.c_fc.weight"
    spec = next(s for s in model.specs if s.name == name)
    model.dev.write(model.params, struct.pack("<f", float("nan")), 4 * (spec.offset + 5))
    model.set_step(1, 1e-3)
    model.run_zero_grad()
    model.run_forward_backward()
    model.run_update(slot=1)
    (loss, norm, skipped), = wait(model.read_step_stats([1]))
    print(f"\nNaN in {name}: loss {loss}, norm {norm}, skipped {skipped}")
    assert skipped and not math.isfinite(norm) and not math.isfinite(loss)
    after = bytearray(wait(model.dev.read(model.params)))
    nan_at = 4 * (spec.offset + 5)
    assert after[nan_at:nan_at + 4] == struct.pack("<f", float("nan"))
    after[nan_at:nan_at + 4] = before[nan_at:nan_at + 4]
    assert bytes(after) == before, "a skipped step must leave the parameters untouched"
    assert wait(model.dev.read(model.m)) == m_before, "a skipped step must leave the moments untouched"
    # Repaired, the next step goes through again.
    model.dev.write(model.params, before[nan_at:nan_at + 4], nan_at)
    stats = train_gpu(model, [(x, y)], 1, lambda t: 1e-3)
    assert not stats[0][2] and math.isfinite(stats[0][0])
    assert wait(model.read_step_stats([1]))[0][2], "slot 1 still reports the skipped step"


def test_eval_metrics_match_reference(model):
    params = noisy_params(2)
    upload(model, params)
    x, y = batch(6)
    loss_sum, n, correct = wait(model.eval_metrics(u32(x), u32(y)))
    want_loss, logits, cache = ref.forward(params, RCFG, x, y)
    top1 = (logits[..., :V].argmax(-1) == y).sum()
    print(f"\nloss sum {loss_sum:.5f} reference {want_loss * x.size:.5f}; top-1 {correct} reference {top1}")
    assert n == x.size and correct == top1
    assert abs(loss_sum - want_loss * x.size) / (want_loss * x.size) < TOL_LOSS
    # a short batch: the first 50 tokens only (rows of T, the second one cut short)
    loss_sum, n, correct = wait(model.eval_metrics(u32(x.reshape(-1)[:50]), u32(y.reshape(-1)[:50])))
    losses = cache["losses"].reshape(-1)[:50].astype(np.float64)
    assert n == 50 and correct == (logits[..., :V].argmax(-1) == y).reshape(-1)[:50].sum()
    assert abs(loss_sum - losses.sum()) / losses.sum() < 1e-5
    # targets that are the argmax at every other position: exactly those count
    y2 = y.copy()
    y2[:, ::2] = logits[:, ::2, :V].argmax(-1)
    _, _, correct = wait(model.eval_metrics(u32(x), u32(y2)))
    assert correct == (logits[..., :V].argmax(-1) == y2).sum() >= y2[:, ::2].size


def test_params_round_trip_in_hugging_face_shapes(model):
    params = noisy_params(3)
    upload(model, params)
    got = wait(model.get_params())
    assert got["transformer.wte.weight"][0] == (V, C), "get_params gives wte with vocab_size rows"
    np.testing.assert_array_equal(as_numpy(got)["transformer.wte.weight"], params["transformer.wte.weight"][:V])
    wait(model.init_weights(0))
    model.load_params({k: ("F32", shape, data) for k, (shape, data) in got.items()})
    back = as_numpy(wait(model.get_params(padded=True)))
    assert all(np.array_equal(back[k], v) for k, v in params.items())
    state = wait(model.get_state())
    assert len(state["m"]) == len(state["v"]) == 4 * model.P
    with pytest.raises(ValueError, match="shape"):
        model.load_params({**got, "transformer.wpe.weight": ((3, C), bytes(12 * C))})


def test_training_loop_drives_the_model(model):
    """tabgpt.train's loop on this model: steps, reported losses, evaluation; the loss falls on a repetitive text."""
    from tabgpt.train import TokenData, train
    cfg = config(max_steps=12, warmup_steps=2, learning_rate=1e-2, min_lr=1e-3, eval_interval=6, eval_steps=1,
                 log_interval=2, block_size=RCFG.block_size)
    tokens = array.array("I", [(i * 7) % 23 for i in range(2000)])
    data = TokenData(train=tokens, val=tokens[:500])
    wait(model.init_weights(cfg.seed))

    async def run():
        return [e async for e in train(model, data, cfg)]

    events = wait(run())   # natively nothing in the loop suspends (no asyncio loop needed)
    steps = [e for e in events if e["type"] == "step"]
    evals = [e for e in events if e["type"] == "eval"]
    assert [e["step"] for e in steps] == list(range(1, 13)) and events[-1]["type"] == "done"
    assert len(evals) == 2 and all(math.isfinite(e["val_loss"]) for e in evals)
    print("\nlosses", [round(e["loss"], 3) for e in steps])
    assert steps[-1]["loss"] < 0.8 * steps[0]["loss"], "the loss should fall on a repetitive text"


def test_cached_generation_matches_full_forward(model):
    params = noisy_params(4)
    upload(model, params)
    x, _ = batch(7)
    seq = x[0]                                            # T = 37 tokens
    model.set_batch(u32(x), u32(x))
    model.run_eval()
    full = np.frombuffer(wait(model.read_logits()), np.float32).reshape(B, T, -1)[0]
    scale = np.abs(full).max()
    errs = []
    for n_prompt in (1, 20):                              # prefill shapes 16 and 32
        got = [np.asarray(wait(model.prefill(u32(seq[:n_prompt]))))]
        for t in range(n_prompt, T):
            got.append(np.asarray(wait(model.decode(int(seq[t])))))
        got = np.stack(got)                               # logits after positions n_prompt-1 .. T-1
        err = float(np.abs(got - full[n_prompt - 1:]).max() / scale)
        errs.append(err)
        print(f"\nprompt {n_prompt:2d}: cached logits vs full forward, max rel err {err:.2e}")
        assert err < TOL_LOGITS, f"prompt {n_prompt}: {err:.2e}"
    # A prompt of the whole block, then the cache is full.
    long = np.resize(seq, RCFG.block_size)
    wait(model.prefill(u32(long)))
    with pytest.raises(ValueError, match="block_size"):
        wait(model.decode(1))
    # generate() samples with the cache: greedy decoding picks the argmax of the full forward's rows.
    out = wait(model.generate(u32(seq[:5]), 4, temperature=0))
    assert out[0] == int(np.argmax(full[4, :V]))
    assert len(out) == 4 and all(0 <= t < V for t in out)


def test_attention_stores_ds_only_where_there_is_a_backward(dev):
    # Training ops keep the attention backward's dS for the dq pass (it fits here); forward-only ops (prompt
    # prefill) allocate none; nor the products' scratches.
    from tabgpt.config import preset
    from tabgpt.gpt import Ops
    cfg = preset("tiny")
    train = wait(Ops.create(dev, cfg, 2, 16))
    prompt = wait(Ops.create(dev, cfg, 1, 16, backward=False, head=False))
    assert train.attn.dq == "ds" and train.attn.ds is not None
    assert prompt.attn.dq == "recompute" and prompt.attn.ds is None
    # from 384 positions training runs the backward as products; a forward-only model allocates no scratch for it
    long_train = wait(Ops.create(dev, cfg.replace(block_size=1024), 1, 1024))
    long_prompt = wait(Ops.create(dev, cfg.replace(block_size=1024), 1, 1024, backward=False, head=False))
    assert long_train.attn.backward_mode == "products" and long_train.attn.products is not None
    assert long_prompt.attn.backward_mode == "none" and long_prompt.attn.products is None


def test_free_gives_the_models_own_storage_back(dev):
    import gc
    from tabgpt.gpu import GPUError
    wait(dev.sync())
    gc.collect()
    start = dev.bytes_allocated
    m = wait(GPT.create(dev, config(), B, T))
    other = wait(GPT.create(dev, config(), B, T))     # may share m's split-K scratch
    for x in (m, other):
        wait(x.init_weights(0))
    wait(m.generate([1, 2, 3], 2))               # its generation's caches are its own too
    before, own = dev.bytes_allocated, list(m.own)
    labels = {b.label for b in own}
    assert {"params", "adam_v", "logits", "layernorm-deferred-partials", "kv_cache.0"} <= labels, labels
    m.free()
    assert all(b.freed != b.shared for b in own)
    # a freed model says so at any use, instead of reaching buffers that are gone; its sizes remain
    assert m.cfg == config() and m.P > 0
    m.free()                                     # twice: nothing more to give
    for use in (lambda: m.train_step, lambda: m.run_eval(), lambda: wait(m.generate([1], 1)), lambda: m.own):
        with pytest.raises(GPUError, match="given back .GPT.free.*build a new model"):
            use()
    freed, shared = before - dev.bytes_allocated, sum(b.size for b in own if b.shared)
    assert freed == sum(b.size for b in own if not b.shared) > m.gpu_bytes - shared, (freed, shared, m.gpu_bytes)
    # the other model still trains: nothing it uses was given back
    tokens = np.arange(B * (T + 1)).reshape(B, T + 1) % V
    other.train_step(0, 1e-3, [(u32(tokens[:, :-1]), u32(tokens[:, 1:]))])
    loss, norm, skipped = wait(other.read_step_stats([0]))[0]
    assert math.isfinite(loss) and norm > 0 and not skipped
    # once both are gone, the shared scratch goes with the last user: back to where it started
    other.free()
    del m, other, own, x
    gc.collect()
    assert dev.bytes_allocated == start
