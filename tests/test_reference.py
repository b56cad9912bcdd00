"""The NumPy reference (tests/reference.py) against PyTorch on CPU: each op, the whole model's logits, loss and
every gradient, and a 10-step AdamW loss curve; and against transformers' GPT2LMHeadModel when it is installed.

Shapes are awkward on purpose (B=3, T=37, C=72, n_head=3 so hs=24, V=1001 padded to 1024, L=2).
Errors are measured per tensor as max|ref - torch| / max|torch| and printed as a table (pytest -s shows it).
Against torch in float64 the only difference is the reference's float32 rounding between ops (tolerance 2e-5);
against torch in float32 both sides round (tolerance 1e-4).
"""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference as ref  # noqa: E402

torch = pytest.importorskip("torch", reason="the reference is proven against PyTorch: install torch (CPU)")
F = torch.nn.functional

B, T = 3, 37
CONFIG = ref.GPTConfig(n_layer=2, n_head=3, n_embd=72, block_size=64, vocab_size=1001)
TOL64 = 2e-5   # reference (float32 between ops) vs torch float64, relative to the tensor's largest entry
TOL32 = 1e-4   # reference vs torch float32
TOL_AFTER_ADAM = 3e-4  # params after 10 AdamW steps: Adam divides by sqrt(v), which magnifies the differences
                       # of gradients near 0 (measured: up to 1.7e-5 against float64, 8.9e-5 against float32)


def data(seed, b=B, t=T, vocab_size=CONFIG.vocab_size):
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=(b, t)), rng.integers(0, vocab_size, size=(b, t))


def trained_params(seed=0):
    """Params with non-trivial LayerNorm weights and biases (fresh init has 1s and 0s, which hide mistakes)."""
    rng = np.random.default_rng(seed + 100)
    params = ref.init_params(CONFIG, seed)
    for name, p in params.items():
        if p.ndim == 1:
            p += rng.normal(0.0, 0.1, size=p.shape).astype(np.float32)
    return params


def relerr(got, want):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def check_all(pairs, tol, title):
    """pairs: {name: (got, want)}. Prints every tensor's relative error and fails listing those above tol."""
    lines, bad = [f"{title} (tolerance {tol:g}, max|diff| / max|torch|):"], []
    for name, (got, want) in pairs.items():
        err = relerr(got, want)
        lines.append(f"  {'FAIL' if err > tol else 'ok  '} {err:.2e}  {name} {tuple(np.shape(want))}")
        if not err <= tol:
            bad.append(name)
    print("\n".join(lines))
    assert not bad, "\n".join(lines)


def t(x, dtype=torch.float64, grad=False):
    return torch.tensor(np.asarray(x), dtype=dtype, requires_grad=grad)


# ----------------------------------------------------------------------------------------------------------------
# torch's version of the same model, built from the reference's params

def torch_forward(tp, idx, targets, config=CONFIG):
    """tp: {name: torch tensor}. Returns (loss, logits (B, T, Vp))."""
    L, NH, C, V = config.n_layer, config.n_head, config.n_embd, config.vocab_size
    b, tt = idx.shape
    x = tp["transformer.wte.weight"][idx] + tp["transformer.wpe.weight"][:tt]
    for i in range(L):
        h = f"transformer.h.{i}."
        y = F.layer_norm(x, (C,), tp[h + "ln_1.weight"], tp[h + "ln_1.bias"], eps=1e-5)
        q, k, v = (y @ tp[h + "attn.c_attn.weight"] + tp[h + "attn.c_attn.bias"]).split(C, dim=2)
        q, k, v = (z.view(b, tt, NH, C // NH).transpose(1, 2) for z in (q, k, v))   # (B, NH, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, tt, C)
        x = x + y @ tp[h + "attn.c_proj.weight"] + tp[h + "attn.c_proj.bias"]
        y = F.layer_norm(x, (C,), tp[h + "ln_2.weight"], tp[h + "ln_2.bias"], eps=1e-5)
        y = F.gelu(y @ tp[h + "mlp.c_fc.weight"] + tp[h + "mlp.c_fc.bias"], approximate="tanh")
        x = x + y @ tp[h + "mlp.c_proj.weight"] + tp[h + "mlp.c_proj.bias"]
    x = F.layer_norm(x, (C,), tp["transformer.ln_f.weight"], tp["transformer.ln_f.bias"], eps=1e-5)
    logits = x @ tp["transformer.wte.weight"].T
    loss = F.cross_entropy(logits[..., :V].reshape(-1, V), targets.reshape(-1))
    return loss, logits


def torch_params(params, dtype):
    return {name: t(p, dtype, grad=True) for name, p in params.items()}


# ----------------------------------------------------------------------------------------------------------------
# one op at a time

def test_ops_forward_and_backward_match_torch():
    rng = np.random.default_rng(1)
    C, NH, V, Vp = 72, 3, 1001, 1024
    r = lambda *shape, s=1.0: (rng.normal(0, s, size=shape)).astype(np.float32)  # noqa: E731
    pairs = {}

    # layernorm
    x, w, bb, dy = r(B, T, C, s=3.0) + 1.5, r(C) + 1, r(C), r(B, T, C)
    out, mean, rstd = ref.layernorm_forward(x, w, bb)
    dx, dw, db = ref.layernorm_backward(dy, x, w, mean, rstd)
    tx, tw, tb = t(x, grad=True), t(w, grad=True), t(bb, grad=True)
    to = F.layer_norm(tx, (C,), tw, tb, eps=1e-5)
    to.backward(t(dy))
    var = tx.detach().var(dim=-1, unbiased=False)
    pairs.update({"layernorm out": (out, to.detach()), "layernorm mean": (mean, tx.detach().mean(-1)),
                  "layernorm rstd": (rstd, 1 / torch.sqrt(var + 1e-5)), "layernorm dinp": (dx, tx.grad),
                  "layernorm dweight": (dw, tw.grad), "layernorm dbias": (db, tb.grad)})

    # matmul (Conv1D layout) with bias, and the tied lm_head's transposed weight
    x, w, bb, dy = r(B, T, C), r(C, 4 * C), r(4 * C), r(B, T, 4 * C)
    out = ref.matmul_forward(x, w, bb)
    dx, dw, db = ref.matmul_backward(dy, x, w)
    tx, tw, tb = t(x, grad=True), t(w, grad=True), t(bb, grad=True)
    to = tx @ tw + tb
    to.backward(t(dy))
    pairs.update({"matmul out": (out, to.detach()), "matmul dinp": (dx, tx.grad), "matmul dweight": (dw, tw.grad),
                  "matmul dbias": (db, tb.grad)})
    wte, dy = r(Vp, C), r(B, T, Vp)
    out = ref.matmul_forward(x, wte.T)
    dx, dwt, db = ref.matmul_backward(dy, x, wte.T, has_bias=False)
    assert db is None
    tx, tw = t(x, grad=True), t(wte, grad=True)
    to = tx @ tw.T
    to.backward(t(dy))
    pairs.update({"lm_head logits": (out, to.detach()), "lm_head dinp": (dx, tx.grad),
                  "lm_head dwte": (dwt.T, tw.grad)})

    # attention: probabilities against an explicit softmax, output and dqkv against torch's fused kernel
    qkv, dy = r(B, T, 3 * C), r(B, T, C)
    out, att = ref.attention_forward(qkv, NH)
    dqkv = ref.attention_backward(dy, qkv, att, NH)
    tq = t(qkv, grad=True)
    q, k, v = (z.view(B, T, NH, C // NH).transpose(1, 2) for z in tq.split(C, dim=2))
    to = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
    to.backward(t(dy))
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    tatt = ((q @ k.transpose(-1, -2)) / math.sqrt(C // NH)).masked_fill(~mask, float("-inf")).softmax(-1)
    pairs.update({"attention out": (out, to.detach()), "attention att": (att, tatt.detach()),
                  "attention dqkv": (dqkv, tq.grad)})
    assert (att[..., ~mask.numpy()] == 0).all(), "attention reaches into the future"

    # gelu (tanh form), including large |x| where tanh saturates
    x, dy = r(B, T, 4 * C, s=3.0), r(B, T, 4 * C)
    x[0, 0, :4] = [-12.0, -6.0, 6.0, 12.0]
    tx = t(x, grad=True)
    to = F.gelu(tx, approximate="tanh")
    to.backward(t(dy))
    pairs.update({"gelu out": (ref.gelu_forward(x), to.detach()), "gelu dinp": (ref.gelu_backward(dy, x), tx.grad)})

    # encoder (embedding + position), with repeated tokens so that rows accumulate
    wte, wpe = r(Vp, C), r(64, C)
    idx = rng.integers(0, 5, size=(B, T))
    dy = r(B, T, C)
    out = ref.encoder_forward(wte, wpe, idx)
    dwte, dwpe = ref.encoder_backward(dy, idx, Vp, 64)
    tw, tp = t(wte, grad=True), t(wpe, grad=True)
    to = tw[torch.tensor(idx)] + tp[:T]
    to.backward(t(dy))
    pairs.update({"encoder out": (out, to.detach()), "encoder dwte": (dwte, tw.grad),
                  "encoder dwpe": (dwpe, tp.grad)})

    # softmax + cross-entropy over the real vocabulary; the padding columns hold huge logits that must not count
    logits, targets = r(B, T, Vp, s=4.0), rng.integers(0, V, size=(B, T))
    logits[..., V:] = 50.0
    probs = ref.softmax_forward(logits, V)
    losses = ref.crossentropy_forward(logits, targets, V)
    dlogits = ref.crossentropy_softmax_backward(probs, targets, 1.0 / (B * T))
    tl = t(logits, grad=True)
    tloss = F.cross_entropy(tl[..., :V].reshape(-1, V), torch.tensor(targets).reshape(-1), reduction="none")
    tloss.mean().backward()
    pairs.update({"crossentropy losses": (losses, tloss.detach().view(B, T)),
                  "softmax probs": (probs[..., :V], tl.detach()[..., :V].softmax(-1)),
                  "crossentropy dlogits": (dlogits, tl.grad)})
    assert (probs[..., V:] == 0).all() and (dlogits[..., V:] == 0).all(), "padding columns got probability"

    for name, (got, _) in pairs.items():
        assert np.asarray(got).dtype == np.float32, f"{name} is {np.asarray(got).dtype}, not float32"
    check_all(pairs, TOL64, "ops vs torch float64")


# ----------------------------------------------------------------------------------------------------------------
# the whole model

def test_init_follows_gpt2():
    """Names and shapes as GPT2LMHeadModel; std 0.02 (residual projections 0.02/sqrt(2L)); padded wte rows 0."""
    config = ref.GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=1001)
    params = ref.init_params(config, seed=7)
    assert list(params) == list(ref.param_shapes(config))
    assert len(params) == 2 + 12 * 4 + 2
    for name, p in params.items():
        assert p.shape == ref.param_shapes(config)[name] and p.dtype == np.float32, name
    wte = params["transformer.wte.weight"]
    assert wte.shape == (1024, 128) and (wte[1001:] == 0).all() and (wte[:1001] != 0).all()
    problems = []
    for name, p in params.items():
        if p.ndim == 2:
            want = 0.02 / math.sqrt(8) if name.endswith("c_proj.weight") else 0.02
            got = (p[:1001] if name == "transformer.wte.weight" else p).std()
            if abs(got / want - 1) > 0.05:
                problems.append(f"{name}: std {got:.5f}, want {want:.5f}")
        elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            if not (p == 1).all():
                problems.append(f"{name}: not all ones")
        elif not (p == 0).all():
            problems.append(f"{name}: not all zeros")
    assert not problems, "\n".join(problems)
    again = ref.init_params(config, seed=7)
    other = ref.init_params(config, seed=8)
    assert all((again[n] == p).all() for n, p in params.items()), "the same seed gave different params"
    assert not (other["transformer.wpe.weight"] == params["transformer.wpe.weight"]).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, TOL64), (torch.float32, TOL32)], ids=["f64", "f32"])
def test_logits_loss_and_every_gradient_match_torch(dtype, tol):
    params = trained_params()
    idx, targets = data(seed=3)
    loss, logits, cache = ref.forward(params, CONFIG, idx, targets)
    grads = ref.backward(params, CONFIG, cache)

    tp = torch_params(params, dtype)
    tloss, tlogits = torch_forward(tp, torch.tensor(idx), torch.tensor(targets))
    tloss.backward()
    print(f"\nloss: reference {loss:.8f}, torch {tloss.item():.8f}")
    assert abs(loss - tloss.item()) <= tol * abs(tloss.item()), f"loss {loss} vs torch {tloss.item()}"
    assert logits.shape == (B, T, 1024) and logits.dtype == np.float32
    assert list(grads) == list(params), "gradient names differ from parameter names"
    pairs = {"logits": (logits, tlogits.detach())}
    pairs.update({name: (grads[name], tp[name].grad) for name in params})
    check_all(pairs, tol, f"model vs torch {dtype}")
    assert (grads["transformer.wte.weight"][CONFIG.vocab_size:] == 0).all(), "padded wte rows got gradient"
    C = CONFIG.n_embd
    for i in range(CONFIG.n_layer):  # the softmax ignores the key bias: only rounding noise may reach it
        db = grads[f"transformer.h.{i}.attn.c_attn.bias"]
        assert np.abs(db[C:2 * C]).max() <= 1e-6 * np.abs(db).max(), f"key bias gradient {np.abs(db[C:2 * C]).max()}"
    assert (grads["transformer.wpe.weight"][T:] == 0).all(), "unused positions got gradient"


def test_padding_is_invisible():
    """Padded wte rows take no part in the loss: changing them changes only the padded logits."""
    params = trained_params()
    idx, targets = data(seed=3)
    loss, logits, _ = ref.forward(params, CONFIG, idx, targets)
    params["transformer.wte.weight"][CONFIG.vocab_size:] = 1.0
    loss2, logits2, _ = ref.forward(params, CONFIG, idx, targets)
    assert loss2 == loss, f"loss moved from {loss} to {loss2} when only padding changed"
    assert (logits2[..., :CONFIG.vocab_size] == logits[..., :CONFIG.vocab_size]).all()
    assert not (logits2[..., CONFIG.vocab_size:] == logits[..., CONFIG.vocab_size:]).all()


def test_adamw_update_matches_torch_per_tensor():
    """One tensor, several steps, with weight decay and a clipping factor: torch.optim.AdamW's exact rule."""
    rng = np.random.default_rng(5)
    p = rng.normal(0, 0.5, size=(40, 24)).astype(np.float32)
    grads = [rng.normal(0, s, size=p.shape).astype(np.float32) for s in (1.0, 1e-3, 10.0, 1e-6)]
    tp = t(p, torch.float64, grad=True)
    opt = torch.optim.AdamW([tp], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    m, v = np.zeros_like(p), np.zeros_like(p)
    pairs = {}
    for step, g in enumerate(grads, start=1):
        p, m, v = ref.adamw_update(p, g, m, v, lr=0.01, step=step, weight_decay=0.1, grad_scale=0.5)
        tp.grad = t(g) * 0.5
        opt.step()
        st = opt.state[tp]
        pairs.update({f"step {step} param": (p, tp.detach().clone()), f"step {step} m": (m, st["exp_avg"].clone()),
                      f"step {step} v": (v, st["exp_avg_sq"].clone())})  # torch updates its tensors in place
    check_all(pairs, 1e-6, "adamw_update vs torch.optim.AdamW float64")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, TOL64), (torch.float32, TOL32)], ids=["f64", "f32"])
def test_ten_adamw_steps_match_torch(dtype, tol):
    """10 steps over two batches: loss, gradient norm and final params as torch's AdamW (decay on 2-D weights
    only) after clip_grad_norm_; max_norm 2.0 sits inside the norms seen, so some steps are clipped and some not."""
    params = ref.init_params(CONFIG, seed=1)
    batches = [data(seed=11), data(seed=12)]
    lr = lambda step: 3e-3 * min(1.0, step / 3)  # noqa: E731  (a short warmup: the schedule reaches the step)

    tp = torch_params(params, dtype)
    groups = [{"params": [p for n, p in tp.items() if p.ndim == 2], "weight_decay": 0.1},
              {"params": [p for n, p in tp.items() if p.ndim != 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr(1), betas=(0.9, 0.95), eps=1e-8)
    state, losses, norms, tlosses, tnorms = {}, [], [], [], []
    for i in range(10):
        idx, targets = batches[i % 2]
        loss, norm = ref.train_step(params, CONFIG, idx, targets, state, lr, max_norm=2.0)
        losses.append(loss)
        norms.append(norm)
        for group in opt.param_groups:
            group["lr"] = lr(i + 1)
        opt.zero_grad()
        tloss, _ = torch_forward(tp, torch.tensor(idx), torch.tensor(targets))
        tloss.backward()
        tnorms.append(torch.nn.utils.clip_grad_norm_(list(tp.values()), 2.0).item())
        opt.step()
        tlosses.append(tloss.item())
    print("\nstep  loss (ref)   loss (torch)  grad norm (ref)  grad norm (torch)")
    for i in range(10):
        print(f"{i + 1:4d}  {losses[i]:.7f}   {tlosses[i]:.7f}     {norms[i]:.6f}         {tnorms[i]:.6f}")
    assert state["step"] == 10
    assert losses[-1] < losses[0] - 0.5, f"the loss did not fall: {losses}"
    assert any(n > 2.0 for n in norms) and any(n < 2.0 for n in norms), f"clipping not exercised: {norms}"
    check_all({"losses": (losses, tlosses), "grad norms": (norms, tnorms)}, tol, f"10 AdamW steps vs torch {dtype}")
    # The key bias (c_attn.bias[C:2C]) has a gradient that is exactly 0 in exact arithmetic (it adds the same
    # q.b_k to every score of a row, which the softmax ignores); Adam normalises its rounding noise into lr-sized
    # steps in arbitrary directions, so it drifts differently in every implementation, harmlessly. Left out here.
    C = CONFIG.n_embd
    not_key = np.r_[0:C, 2 * C:3 * C]
    pairs = {}
    for n in params:
        got, want = params[n], tp[n].detach().numpy()
        if n.endswith("c_attn.bias"):
            got, want, n = got[not_key], want[not_key], n + " [q, v thirds]"
        pairs[f"final {n}"] = (got, want)
    check_all(pairs, TOL_AFTER_ADAM, f"params after 10 AdamW steps vs torch {dtype}")
    # train_steps is the same loop: from the same start it gives the same curve
    again = ref.init_params(CONFIG, seed=1)
    curve = ref.train_steps(again, CONFIG, batches, n=10, lr=lr, max_norm=2.0)
    assert curve == losses, f"train_steps {curve} != train_step loop {losses}"


def test_gpt2lmheadmodel_gives_the_same_logits():
    """model.safetensors must load into transformers' GPT2LMHeadModel: same names, shapes and maths."""
    transformers = pytest.importorskip("transformers")
    params = trained_params()
    idx, targets = data(seed=3)
    _, logits, _ = ref.forward(params, CONFIG, idx, targets)
    hf_config = transformers.GPT2Config(
        vocab_size=CONFIG.padded_vocab_size, n_positions=CONFIG.block_size, n_embd=CONFIG.n_embd,
        n_layer=CONFIG.n_layer, n_head=CONFIG.n_head, activation_function="gelu_new", layer_norm_epsilon=1e-5,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=CONFIG.vocab_size - 1, eos_token_id=CONFIG.vocab_size - 1)
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    missing, unexpected = model.load_state_dict({n: torch.tensor(p) for n, p in params.items()}, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "lm_head is not tied"
    with torch.no_grad():
        hf_logits = model(torch.tensor(idx)).logits
    check_all({"GPT2LMHeadModel logits": (logits, hf_logits)}, TOL32, "reference vs transformers float32")
