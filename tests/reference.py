"""NumPy reference of the whole GPT-2 training step: the slow, trusted model the WGSL kernels are checked against.

Written as llm.c writes it: every op has a `*_forward` and a `*_backward` as free functions side by side, the
model's forward and backward call them in order, and the optimizer step is written out in full. Parameters carry
Hugging Face GPT2LMHeadModel's names and shapes (Conv1D weights are (in, out): y = x @ W + b; lm_head is tied to
wte). tests/test_reference.py proves all of it against PyTorch.

Precision: arrays are float32 between ops, as in the GPU buffers; each op upcasts its inputs to float64, computes,
and returns float32, so the only rounding left is the one the GPU must also do when it stores a result.

    config = GPTConfig(n_layer=2, n_head=3, n_embd=72, block_size=64, vocab_size=1001)
    params = init_params(config, seed=0)                       # {name: float32 array}
    loss, logits, cache = forward(params, config, idx, targets)
    grads = backward(params, config, cache)                    # {name: float32 array}, same names
    losses = train_steps(params, config, [(idx, targets)], n=10, lr=1e-3)   # updates params in place
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

f32, f64 = np.float32, np.float64
LN_EPS = 1e-5
GELU_SCALE = math.sqrt(2.0 / math.pi)


def padded_vocab_size(vocab_size: int) -> int:
    """The vocabulary rounded up to a multiple of 64 (llm.c): wte rows, logits columns."""
    return (vocab_size + 63) // 64 * 64


@dataclass
class GPTConfig:
    """The model's shape with nanoGPT's names. Any object with these five attributes (tabgpt's Config) also works."""
    n_layer: int = 2
    n_head: int = 3
    n_embd: int = 72
    block_size: int = 64
    vocab_size: int = 1001

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size)


def _dims(config):
    """(L, NH, C, block_size, V, Vp) from any config object with nanoGPT's names."""
    c = config
    return c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size, padded_vocab_size(c.vocab_size)


# ----------------------------------------------------------------------------------------------------------------
# parameters

def param_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in Hugging Face's state_dict order (lm_head.weight is wte: not listed)."""
    L, NH, C, block_size, V, Vp = _dims(config)
    shapes = {"transformer.wte.weight": (Vp, C), "transformer.wpe.weight": (block_size, C)}
    for i in range(L):
        h = f"transformer.h.{i}."
        shapes.update({
            h + "ln_1.weight": (C,), h + "ln_1.bias": (C,),
            h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
            h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
            h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
            h + "mlp.c_fc.weight": (C, 4 * C), h + "mlp.c_fc.bias": (4 * C,),
            h + "mlp.c_proj.weight": (4 * C, C), h + "mlp.c_proj.bias": (C,),
        })
    shapes.update({"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)})
    return shapes


def decays(name: str, shape: tuple[int, ...]) -> bool:
    """Weight decay applies to the 2-D weights only (wte, wpe and the four Conv1D weights), as nanoGPT."""
    return len(shape) == 2


def init_params(config, seed: int = 0) -> dict[str, np.ndarray]:
    """GPT-2 init (nanoGPT): weights N(0, 0.02), the residual projections N(0, 0.02/sqrt(2L)), biases 0,
    LayerNorm weight 1 bias 0, wte's padded rows 0. Tensors are drawn in param_shapes order from one Generator."""
    L, NH, C, block_size, V, Vp = _dims(config)
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith((".ln_1.weight", ".ln_2.weight", "ln_f.weight")):
            p = np.ones(shape)
        elif len(shape) == 1:
            p = np.zeros(shape)
        else:
            std = 0.02 / math.sqrt(2 * L) if name.endswith("c_proj.weight") else 0.02
            p = rng.normal(0.0, std, size=shape)
        params[name] = p.astype(f32)
    params["transformer.wte.weight"][V:] = 0.0
    return params


# ----------------------------------------------------------------------------------------------------------------
# the ops, forward and backward side by side

def encoder_forward(wte, wpe, idx):
    """out (B, T, C) = wte[idx] + wpe[:T]; wte (Vp, C), wpe (block_size, C), idx (B, T) ints."""
    T = idx.shape[1]
    return (wte.astype(f64)[idx] + wpe.astype(f64)[:T]).astype(f32)


def encoder_backward(dout, idx, vocab_rows, block_size):
    """dout (B, T, C) -> dwte (vocab_rows, C) (rows summed over every position holding that token),
    dwpe (block_size, C) (summed over the batch; rows >= T are 0)."""
    B, T, C = dout.shape
    d = dout.astype(f64)
    dwte = np.zeros((vocab_rows, C))
    np.add.at(dwte, idx.reshape(-1), d.reshape(-1, C))
    dwpe = np.zeros((block_size, C))
    dwpe[:T] = d.sum(axis=0)
    return dwte.astype(f32), dwpe.astype(f32)


def layernorm_forward(inp, weight, bias, eps=LN_EPS):
    """inp (..., C) -> out (..., C), mean (...), rstd (...); biased variance, rstd = 1/sqrt(var + eps)."""
    x = inp.astype(f64)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    out = (x - mean) * rstd * weight.astype(f64) + bias.astype(f64)
    return out.astype(f32), mean[..., 0].astype(f32), rstd[..., 0].astype(f32)


def layernorm_backward(dout, inp, weight, mean, rstd):
    """dout, inp (..., C), weight (C,), mean, rstd (...) -> dinp (..., C), dweight (C,), dbias (C,).
    dinp = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)) with dnorm = dout * weight."""
    C = inp.shape[-1]
    dy = dout.astype(f64).reshape(-1, C)
    x = inp.astype(f64).reshape(-1, C)
    mean = mean.astype(f64).reshape(-1, 1)
    rstd = rstd.astype(f64).reshape(-1, 1)
    norm = (x - mean) * rstd
    dnorm = dy * weight.astype(f64)
    dinp = rstd * (dnorm - dnorm.mean(axis=-1, keepdims=True) - norm * (dnorm * norm).mean(axis=-1, keepdims=True))
    dweight = (dy * norm).sum(axis=0)
    dbias = dy.sum(axis=0)
    return dinp.reshape(inp.shape).astype(f32), dweight.astype(f32), dbias.astype(f32)


def matmul_forward(inp, weight, bias=None):
    """out (..., OC) = inp (..., IC) @ weight (IC, OC) + bias (OC,). Hugging Face Conv1D layout.
    The tied lm_head is matmul_forward(x, wte.T): logits (B, T, Vp) = x (B, T, C) @ wte.T (C, Vp)."""
    out = inp.astype(f64) @ weight.astype(f64)
    if bias is not None:
        out += bias.astype(f64)
    return out.astype(f32)


def matmul_backward(dout, inp, weight, has_bias=True):
    """dout (..., OC), inp (..., IC), weight (IC, OC) -> dinp (..., IC), dweight (IC, OC), dbias (OC,) or None.
    For the tied lm_head (weight wte.T) the wte gradient is dweight.T (Vp, C)."""
    IC, OC = weight.shape
    dy = dout.astype(f64).reshape(-1, OC)
    x = inp.astype(f64).reshape(-1, IC)
    dinp = (dy @ weight.astype(f64).T).reshape(inp.shape)
    dweight = x.T @ dy
    dbias = dy.sum(axis=0).astype(f32) if has_bias else None
    return dinp.astype(f32), dweight.astype(f32), dbias


def attention_forward(qkv, n_head):
    """Causal multi-head self-attention. qkv (B, T, 3C): q, k, v are its three C-wide thirds, head h the
    hs-slice [h*hs, (h+1)*hs) of each (hs = C / n_head). Returns out (B, T, C) with the heads merged back in
    place, and att (B, NH, T, T), the softmax probabilities (0 above the diagonal), saved for the backward."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    x = qkv.astype(f64).reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)  # (3, B, NH, T, hs)
    q, k, v = x[0], x[1], x[2]                                                  # (B, NH, T, hs) each
    preatt = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs)                        # (B, NH, T, T)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    preatt[..., future] = -np.inf
    preatt -= preatt.max(axis=-1, keepdims=True)
    att = np.exp(preatt)
    att /= att.sum(axis=-1, keepdims=True)                                      # (B, NH, T, T)
    y = att @ v                                                                 # (B, NH, T, hs)
    out = y.transpose(0, 2, 1, 3).reshape(B, T, C)
    return out.astype(f32), att.astype(f32)


def attention_backward(dout, qkv, att, n_head):
    """dout (B, T, C), qkv (B, T, 3C), att (B, NH, T, T) -> dqkv (B, T, 3C).
    Through the softmax: dpreatt = att * (datt - sum_j(datt * att)); masked entries have att = 0, so no gradient."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    x = qkv.astype(f64).reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)
    q, k, v = x[0], x[1], x[2]                                        # (B, NH, T, hs)
    a = att.astype(f64)                                               # (B, NH, T, T)
    dy = dout.astype(f64).reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)  # (B, NH, T, hs)
    datt = dy @ v.transpose(0, 1, 3, 2)                               # (B, NH, T, T)
    dv = a.transpose(0, 1, 3, 2) @ dy                                 # (B, NH, T, hs)
    dpreatt = a * (datt - (datt * a).sum(axis=-1, keepdims=True)) / math.sqrt(hs)
    dq = dpreatt @ k                                                  # (B, NH, T, hs)
    dk = dpreatt.transpose(0, 1, 3, 2) @ q                            # (B, NH, T, hs)
    dqkv = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * C)
    return dqkv.astype(f32)


def gelu_forward(inp):
    """GELU, tanh form (GPT-2's gelu_new): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    x = inp.astype(f64)
    return (0.5 * x * (1.0 + np.tanh(GELU_SCALE * (x + 0.044715 * x ** 3)))).astype(f32)


def gelu_backward(dout, inp):
    """dinp = gelu'(inp) * dout, same shapes."""
    x = inp.astype(f64)
    t = np.tanh(GELU_SCALE * (x + 0.044715 * x ** 3))
    local = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_SCALE * (1.0 + 3 * 0.044715 * x * x)
    return (local * dout.astype(f64)).astype(f32)


def residual_forward(inp1, inp2):
    """out = inp1 + inp2 (its backward passes the gradient to both unchanged)."""
    return (inp1.astype(f64) + inp2.astype(f64)).astype(f32)


def softmax_forward(logits, vocab_size):
    """logits (..., Vp) -> probs (..., Vp): softmax over the first vocab_size columns, 0 in the padding."""
    z = logits.astype(f64)[..., :vocab_size]
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    probs = np.zeros(logits.shape)
    probs[..., :vocab_size] = z / z.sum(axis=-1, keepdims=True)
    return probs.astype(f32)


def crossentropy_forward(logits, targets, vocab_size):
    """logits (..., Vp), targets (...) ints in [0, V) -> losses (...) = logsumexp(logits[:V]) - logits[target].
    Taken from the logits (not log of the float32 probs) so that tiny probabilities lose no precision."""
    z = logits.astype(f64)[..., :vocab_size]
    zmax = z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z - zmax).sum(axis=-1)) + zmax[..., 0]
    picked = np.take_along_axis(z, targets[..., None].astype(np.int64), axis=-1)[..., 0]
    return (lse - picked).astype(f32)


def crossentropy_softmax_backward(probs, targets, dloss):
    """probs (..., Vp), targets (...) -> dlogits (..., Vp) = (probs - onehot(target)) * dloss.
    dloss is the gradient of the loss with respect to each position's loss: 1/(B*T) for a mean (a scalar, or
    an array shaped like targets). Padded columns have probs 0 and are never a target, so their gradient is 0."""
    d = probs.astype(f64).copy()
    t = targets[..., None].astype(np.int64)
    np.put_along_axis(d, t, np.take_along_axis(d, t, axis=-1) - 1.0, axis=-1)
    d *= np.asarray(dloss, dtype=f64)[..., None] if np.ndim(dloss) else dloss
    return d.astype(f32)


# ----------------------------------------------------------------------------------------------------------------
# the model

def forward(params, config, idx, targets=None):
    """idx, targets (B, T) ints -> (loss: float or None, logits (B, T, Vp) float32, cache for backward).

    x = wte[idx] + wpe[:T]; per block: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)); logits = ln_f(x) @ wte.T;
    loss = mean over the B*T positions of the cross-entropy over the real vocabulary (logits[..., :V]).
    The cache holds every activation under llm.c's names (per layer in cache["layers"])."""
    L, NH, C, block_size, V, Vp = _dims(config)
    p = params
    idx = np.asarray(idx)
    B, T = idx.shape
    assert T <= block_size, f"sequence length {T} is above block_size {block_size}"
    x = encoder_forward(p["transformer.wte.weight"], p["transformer.wpe.weight"], idx)   # (B, T, C)
    cache = {"idx": idx, "targets": targets, "encoded": x, "layers": []}
    for i in range(L):
        h = f"transformer.h.{i}."
        a = {"residual": x}                                                               # block input (B, T, C)
        a["ln1"], a["ln1_mean"], a["ln1_rstd"] = layernorm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])
        a["qkv"] = matmul_forward(a["ln1"], p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])  # (B, T, 3C)
        a["atty"], a["att"] = attention_forward(a["qkv"], NH)                   # (B, T, C), (B, NH, T, T)
        a["attproj"] = matmul_forward(a["atty"], p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
        a["residual2"] = residual_forward(x, a["attproj"])                                 # (B, T, C)
        a["ln2"], a["ln2_mean"], a["ln2_rstd"] = layernorm_forward(a["residual2"], p[h + "ln_2.weight"],
                                                                   p[h + "ln_2.bias"])
        a["fch"] = matmul_forward(a["ln2"], p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"])   # (B, T, 4C)
        a["fch_gelu"] = gelu_forward(a["fch"])                                                   # (B, T, 4C)
        a["fcproj"] = matmul_forward(a["fch_gelu"], p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])
        x = a["residual3"] = residual_forward(a["residual2"], a["fcproj"])                       # (B, T, C)
        cache["layers"].append(a)
    cache["residual"] = x
    cache["lnf"], cache["lnf_mean"], cache["lnf_rstd"] = layernorm_forward(
        x, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"])
    logits = matmul_forward(cache["lnf"], p["transformer.wte.weight"].T)                       # (B, T, Vp)
    cache["logits"] = logits
    loss = None
    if targets is not None:
        targets = np.asarray(targets)
        assert targets.shape == (B, T) and targets.min() >= 0 and targets.max() < V, "targets must be in [0, V)"
        cache["targets"] = targets
        cache["probs"] = softmax_forward(logits, V)                                            # (B, T, Vp)
        cache["losses"] = crossentropy_forward(logits, targets, V)                             # (B, T)
        loss = float(cache["losses"].astype(f64).mean())
    return loss, logits, cache


def backward(params, config, cache, dloss=None):
    """Gradients of the mean loss for every parameter: {name: float32 array}, the same names and shapes.
    dloss scales each position's loss gradient (default 1/(B*T), the mean); the tied wte gets the lm_head's
    and the encoder's contributions summed, and its padded rows stay 0."""
    L, NH, C, block_size, V, Vp = _dims(config)
    p = params
    idx, targets = cache["idx"], cache["targets"]
    assert targets is not None, "backward needs a forward with targets"
    B, T = idx.shape
    dloss = 1.0 / (B * T) if dloss is None else dloss
    g = {}
    dlogits = crossentropy_softmax_backward(cache["probs"], targets, dloss)                     # (B, T, Vp)
    dlnf, dwte_t, _ = matmul_backward(dlogits, cache["lnf"], p["transformer.wte.weight"].T, has_bias=False)
    dx, g["transformer.ln_f.weight"], g["transformer.ln_f.bias"] = layernorm_backward(
        dlnf, cache["residual"], p["transformer.ln_f.weight"], cache["lnf_mean"], cache["lnf_rstd"])
    for i in reversed(range(L)):
        h = f"transformer.h.{i}."
        a = cache["layers"][i]
        # dx is the gradient of residual3; the residual passes it on unchanged to residual2 and to the mlp
        dfch_gelu, g[h + "mlp.c_proj.weight"], g[h + "mlp.c_proj.bias"] = matmul_backward(
            dx, a["fch_gelu"], p[h + "mlp.c_proj.weight"])
        dfch = gelu_backward(dfch_gelu, a["fch"])
        dln2, g[h + "mlp.c_fc.weight"], g[h + "mlp.c_fc.bias"] = matmul_backward(
            dfch, a["ln2"], p[h + "mlp.c_fc.weight"])
        dres2, g[h + "ln_2.weight"], g[h + "ln_2.bias"] = layernorm_backward(
            dln2, a["residual2"], p[h + "ln_2.weight"], a["ln2_mean"], a["ln2_rstd"])
        dx = residual_forward(dx, dres2)                             # gradient of residual2
        datty, g[h + "attn.c_proj.weight"], g[h + "attn.c_proj.bias"] = matmul_backward(
            dx, a["atty"], p[h + "attn.c_proj.weight"])
        dqkv = attention_backward(datty, a["qkv"], a["att"], NH)
        dln1, g[h + "attn.c_attn.weight"], g[h + "attn.c_attn.bias"] = matmul_backward(
            dqkv, a["ln1"], p[h + "attn.c_attn.weight"])
        dres1, g[h + "ln_1.weight"], g[h + "ln_1.bias"] = layernorm_backward(
            dln1, a["residual"], p[h + "ln_1.weight"], a["ln1_mean"], a["ln1_rstd"])
        dx = residual_forward(dx, dres1)                             # gradient of the block's input
    dwte_enc, g["transformer.wpe.weight"] = encoder_backward(dx, idx, Vp, block_size)
    g["transformer.wte.weight"] = residual_forward(dwte_t.T, dwte_enc)                     # (Vp, C), tied
    return {name: g[name] for name in param_shapes(config)}


# ----------------------------------------------------------------------------------------------------------------
# the optimizer

def grad_norm(grads) -> float:
    """The global L2 norm over every gradient tensor (as torch.nn.utils.clip_grad_norm_ measures it)."""
    return math.sqrt(sum(float((g.astype(f64) ** 2).sum()) for g in grads.values()))


def clip_scale(norm: float, max_norm: float) -> float:
    """The factor clip_grad_norm_ multiplies every gradient by: min(1, max_norm / (norm + 1e-6))."""
    return min(1.0, max_norm / (norm + 1e-6))


def adamw_update(param, grad, m, v, lr, step, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_scale=1.0):
    """One AdamW update of one tensor, torch.optim.AdamW's order; returns the new (param, m, v), float32.
    step counts from 1. grad_scale (the clipping factor) multiplies the gradient first.
        p *= 1 - lr * wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p -= lr / (1 - b1^step) * m / (sqrt(v) / sqrt(1 - b2^step) + eps)"""
    g = grad.astype(f64) * grad_scale
    m = beta1 * m.astype(f64) + (1.0 - beta1) * g
    v = beta2 * v.astype(f64) + (1.0 - beta2) * g * g
    p = param.astype(f64) * (1.0 - lr * weight_decay)
    p -= lr / (1.0 - beta1 ** step) * m / (np.sqrt(v) / math.sqrt(1.0 - beta2 ** step) + eps)
    return p.astype(f32), m.astype(f32), v.astype(f32)


def adamw_step(params, grads, state, lr, step, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_scale=1.0):
    """AdamW over every parameter, in place: params and state ({"m": {name: array}, "v": {...}}, zeros when empty)
    are updated. Weight decay only on the 2-D weights; step counts from 1.

    Comparing params after several steps, leave out the key bias (c_attn.bias[C:2C]): its true gradient is exactly
    0 (it shifts a whole row of attention scores, which the softmax ignores), so Adam turns each implementation's
    rounding noise into lr-sized steps of its own. It has no effect on the model's output."""
    state.setdefault("m", {})
    state.setdefault("v", {})
    for name, p in params.items():
        m = state["m"].get(name, np.zeros_like(p))
        v = state["v"].get(name, np.zeros_like(p))
        wd = weight_decay if decays(name, p.shape) else 0.0
        params[name][...], state["m"][name], state["v"][name] = adamw_update(
            p, grads[name], m, v, lr, step, beta1, beta2, eps, wd, grad_scale)
    state["step"] = step


def train_step(params, config, idx, targets, state, lr, max_norm=1.0, **adamw):
    """One step: forward, backward, clip to max_norm (None: no clipping), AdamW. Returns (loss, grad norm)."""
    loss, _, cache = forward(params, config, idx, targets)
    grads = backward(params, config, cache)
    norm = grad_norm(grads)
    scale = 1.0 if max_norm is None else clip_scale(norm, max_norm)
    step = state.get("step", 0) + 1
    adamw_step(params, grads, state, lr(step) if callable(lr) else lr, step, grad_scale=scale, **adamw)
    return loss, norm


def train_steps(params, config, batches, n, lr, max_norm=1.0, state=None, **adamw):
    """n training steps, updating params in place; step i uses batches[i % len(batches)] (an (idx, targets)
    pair). lr is a number or a function of the step (from 1). Returns the n losses, each before its update."""
    state = {} if state is None else state
    losses = []
    for i in range(n):
        idx, targets = batches[i % len(batches)]
        loss, _ = train_step(params, config, idx, targets, state, lr, max_norm, **adamw)
        losses.append(loss)
    return losses
