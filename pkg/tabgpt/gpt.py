"""GPT-2 on WebGPU: parameters, gradients and AdamW moments in GPU buffers allocated once; forward and
backward written out explicitly (as llm.c), built once into dispatch sequences and replayed every step.

    model = await GPT.create(dev, cfg, B, T)          # buffers allocated, kernels compiled, sequences built
    await model.init_weights(seed)
    model.train_step(step, lr, micro_batches)         # [(x, y)]: array('I') of B*T token ids and targets
    (loss, grad_norm, skipped), = await model.read_step_stats([step])   # later: the GPU runs ahead meanwhile
    logits = await model.prefill(prompt); logits = await model.decode(token)   # generation, Vp floats each

Parameters live in ONE buffer (likewise gradients, m and v), each tensor a 256-byte aligned range bound as a
view, named and shaped as Hugging Face GPT-2 (`transformer.h.0.attn.c_attn.weight`, Conv1D weights (in, out)),
so that a checkpoint loads into transformers' GPT2LMHeadModel. lm_head is tied to wte.

Activations for one micro-batch of B sequences of T tokens (N = B*T), one buffer per tensor and layer (a
dispatch may not read and write the same buffer, so activations cannot share one as parameters do):
    idx, targets (N,) u32; encoded (N, C) = wte[idx] + wpe
    per layer l: ln1 (N, C), ln1_mean/ln1_rstd (N,), qkv (N, 3C), atty (N, C), lse (B, NH, T),
                 res2 (N, C) = residual after attention, ln2 (N, C), ln2_mean/ln2_rstd (N,),
                 fch (N, 4C): GELU' of the pre-activation in training (what the backward needs of it), the
                 pre-activation itself in a forward-only model; fch_gelu (N, 4C) the activation;
                 res3 (N, C) = residual after the MLP (layer l+1's input)
    lnf (N, C), lnf_mean/lnf_rstd (N,), logits (N, Vp) (overwritten by dlogits in the backward), losses (N,)
    scratch for the backward: dres (N, C) (the residual stream's gradient), dC (N, C), d3C (N, 3C), d4C (N, 4C)
The products fuse their elementwise neighbours (ops.matmul epilogues): c_fc writes fch and fch_gelu at once (from
one tanh), the c_proj products add the residual and write res2 / res3 directly, and mlp c_proj's dinp multiplies by
fch (GELU' made in the forward, where the tanh it needs was made anyway: none in the backward).

Sequences replayed by the training loop (see tabgpt.train):
    zero_grad     grads = 0, loss = 0                            once per optimizer step
    fwd_bwd       forward, cross-entropy, backward; grads +=     once per micro-batch
    update        grad norm, clip, AdamW (skipped when the norm is not finite), record (loss, norm, skipped)
    eval          forward, mean loss of the batch

Generation keeps a KV cache per layer: (block_size, 3C), the qkv rows of the tokens so far. prefill() runs the
ordinary forward over the prompt (B=1) with qkv bound to the cache; decode() then adds one token at a time,
attending over the cached rows (shaders/decode.wgsl). Both return the logits row (Vp floats) of the last
position; the token is sampled on the CPU (tabgpt.metrics.sample_token).
"""

from __future__ import annotations

import array
import asyncio
import math
import struct
from dataclasses import dataclass

from tabgpt.config import Config
from tabgpt.gpu import Buffer, Device, GPUError, Sequence, View
from tabgpt.ops.attention import Attention
from tabgpt.ops.crossentropy import CrossEntropy
from tabgpt.ops.elementwise import Elementwise, fold_grid
from tabgpt.ops.embedding import Embedding
from tabgpt.ops.layernorm import LayerNorm
from tabgpt.ops.matmul import Conv1D, LMHead, Matmul, MatmulPair, pairs_enabled, weight_and_bias
from tabgpt.ops.optim import AdamW

ALIGN = 64     # floats: 256 bytes, the storage-buffer offset alignment WebGPU guarantees
RING = 256     # steps whose (loss, grad norm, skipped) stay readable on the GPU


@dataclass
class ParamSpec:
    name: str
    shape: tuple
    offset: int          # in floats, into the parameter buffer
    decay: bool          # weight decay applies (2-D weights only)
    init: tuple          # ("normal", std) or ("const", value)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def parameter_specs(cfg: Config) -> tuple[list[ParamSpec], int]:
    """Every parameter tensor in Hugging Face GPT-2 order, with its offset; and the total (padded) float count."""
    C, L, Vp = cfg.n_embd, cfg.n_layer, cfg.padded_vocab_size
    std, res_std = 0.02, 0.02 / math.sqrt(2 * L)
    specs: list[ParamSpec] = []
    offset = 0

    def add(name, shape, decay, init):
        nonlocal offset
        specs.append(ParamSpec(name, tuple(shape), offset, decay, init))
        offset += (math.prod(shape) + ALIGN - 1) // ALIGN * ALIGN

    add("transformer.wte.weight", (Vp, C), True, ("normal", std))
    add("transformer.wpe.weight", (cfg.block_size, C), True, ("normal", std))
    for i in range(L):
        h = f"transformer.h.{i}."
        add(h + "ln_1.weight", (C,), False, ("const", 1.0))
        add(h + "ln_1.bias", (C,), False, ("const", 0.0))
        add(h + "attn.c_attn.weight", (C, 3 * C), True, ("normal", std))
        add(h + "attn.c_attn.bias", (3 * C,), False, ("const", 0.0))
        add(h + "attn.c_proj.weight", (C, C), True, ("normal", res_std))
        add(h + "attn.c_proj.bias", (C,), False, ("const", 0.0))
        add(h + "ln_2.weight", (C,), False, ("const", 1.0))
        add(h + "ln_2.bias", (C,), False, ("const", 0.0))
        add(h + "mlp.c_fc.weight", (C, 4 * C), True, ("normal", std))
        add(h + "mlp.c_fc.bias", (4 * C,), False, ("const", 0.0))
        add(h + "mlp.c_proj.weight", (4 * C, C), True, ("normal", res_std))
        add(h + "mlp.c_proj.bias", (C,), False, ("const", 0.0))
    add("transformer.ln_f.weight", (C,), False, ("const", 1.0))
    add("transformer.ln_f.bias", (C,), False, ("const", 0.0))
    return specs, offset


def tensor_views(buf: Buffer, specs: list[ParamSpec]) -> dict[str, View]:
    """One view per parameter tensor of a flat (P,) buffer: parameters, gradients, m or v."""
    return {s.name: buf.view(4 * s.offset, 4 * s.numel) for s in specs}


# ------------------------------------------------------------------------------------------------------------
# activations and the ops of one shape

class Activations:
    """The buffers of one forward (and backward) over N = B*T rows; shapes in the module docstring.

    per_layer=False: every layer reuses one set of buffers (a forward only, no backward), except qkv, which is
    given per layer (the KV cache of generation); the residual stream then lives in `encoded` throughout."""

    def __init__(self, dev: Device, cfg: Config, B: int, T: int, backward: bool = True, per_layer: bool = True,
                 qkv: list[Buffer] | None = None):
        C, L, NH, Vp = cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.padded_vocab_size
        N = B * T
        self.N = N

        def buf(n, label):
            return dev.buffer(4 * n, label)

        def layers(n, label):
            if per_layer:
                return [buf(n, f"{label}.{l}") for l in range(L)]
            return [buf(n, label)] * L

        self.idx = buf(N, "idx")                          # (N,) u32
        self.encoded = buf(N * C, "encoded")              # (N, C)
        self.ln1 = layers(N * C, "ln1")                   # (N, C) per layer
        self.ln1_mean = layers(N, "ln1_mean")             # (N,)
        self.ln1_rstd = layers(N, "ln1_rstd")             # (N,)
        self.qkv = qkv or layers(N * 3 * C, "qkv")        # (N, 3C)
        self.atty = layers(N * C, "atty")                 # (N, C)
        self.lse = layers(B * NH * T, "lse")              # (B, NH, T)
        self.res2 = layers(N * C, "res2")                 # (N, C)
        if per_layer:
            self.ln2 = layers(N * C, "ln2")               # (N, C)
            self.ln2_mean = layers(N, "ln2_mean")         # (N,)
            self.ln2_rstd = layers(N, "ln2_rstd")         # (N,)
        else:
            self.ln2, self.ln2_mean, self.ln2_rstd = self.ln1, self.ln1_mean, self.ln1_rstd
        self.fch = layers(N * 4 * C, "fch")               # (N, 4C)
        self.fch_gelu = layers(N * 4 * C, "fch_gelu")     # (N, 4C)
        # the residual stream after each block; forward only, it stays in `encoded` (res2 + mlp writes it back)
        self.res3 = layers(N * C, "res3") if per_layer else [self.encoded] * L
        if not backward:
            return
        self.targets = buf(N, "targets")                  # (N,) u32
        self.lnf = buf(N * C, "lnf")                      # (N, C)
        self.lnf_mean = buf(N, "lnf_mean")
        self.lnf_rstd = buf(N, "lnf_rstd")
        self.logits = buf(N * Vp, "logits")               # (N, Vp), dlogits after the backward
        self.losses = buf(N, "losses")                    # (N,)
        self.correct = buf(N, "correct")                  # (N,) u32: top-1 hits (eval_metrics)
        self.dres = buf(N * C, "dres")                    # (N, C) gradient of the residual stream
        self.dC = buf(N * C, "dC")                        # (N, C) scratch gradients
        self.d3C = buf(N * 3 * C, "d3C")                  # (N, 3C)
        self.d4C = buf(N * 4 * C, "d4C")                  # (N, 4C)


async def conv1d(dev: Device, M: int, K: int, N: int, backward: bool, **epilogues) -> Conv1D:
    """A Conv1D of M rows (K in, N out), with Conv1D.create's fused epilogues; forward-only ones compile no
    backward products."""
    return await Conv1D.create(dev, M, K, N, backward=backward, **epilogues)


class Ops:
    """The kernels of the model for one shape (B sequences of T tokens), compiled once (kernels are cached by the
    device, so a second shape costs only small uniforms)."""

    @classmethod
    async def create(cls, dev: Device, cfg: Config, B: int, T: int, backward: bool = True, head: bool = True,
                     sequence: bool = True):
        """backward=False: forward products only; head=False: no lm_head; sequence=False: no embedding and no
        attention (the single-row products of a decode step)."""
        self = cls()
        C, NH, V, Vp = cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.padded_vocab_size
        N = B * T
        self.ew = await Elementwise.create(dev)
        self.ln = await LayerNorm.create(dev, N, C, deferred=cfg.n_layernorms if backward else 0)
        if sequence:
            self.emb = await Embedding.create(dev, B, T, C, Vp)
            # a forward only (prompts, evaluation): no backward kernels, no stored dS or products' scratches
            self.attn = await Attention.create(dev, B, T, C, NH, backward="auto" if backward else "none")
        # fused: residual adds after both c_proj, GELU after c_fc, and the GELU's backward into mlp c_proj's dinp;
        # each bias gradient comes out of its weight gradient's product, where the bias lies right after the
        # weight in the gradients (every weight is C x kC floats: no alignment gap when C % 8 == 0)
        fb = C % 8 == 0
        self.c_attn = await conv1d(dev, N, C, 3 * C, backward, fuse_bias_grad=fb)
        self.attn_proj = await conv1d(dev, N, C, C, backward, forward_epilogue="residual", fuse_bias_grad=fb)
        self.c_fc = await conv1d(dev, N, C, 4 * C, backward, forward_epilogue="gelu_keep" if backward else "gelu",
                                 fuse_bias_grad=fb)
        self.mlp_proj = await conv1d(dev, N, 4 * C, C, backward, forward_epilogue="residual",
                                     dinp_gelu_grad="kept" if backward else False, fuse_bias_grad=fb)
        # the weight gradients of the MLP's two products in one dispatch, and of attention's two in another (the
        # products of a layer's backward that have their operands at the same time): MatmulPair
        self.mlp_pair = self.attn_pair = None
        if backward and fb and pairs_enabled():
            try:
                self.mlp_pair = await MatmulPair.create(dev, (4 * C, C), (C, 4 * C), N, bias_row=True)
                self.attn_pair = await MatmulPair.create(dev, (C, 3 * C), (C, C), N, bias_row=True)
            except GPUError:                      # a reduction beyond one binding: the products apart
                self.mlp_pair = self.attn_pair = None
        if head:
            if backward:
                self.lm_head = await LMHead.create(dev, N, C, Vp)
            else:
                self.lm_head = LMHead(await Matmul.create(dev, N, Vp, C, "nt"), None, None)
        if backward:
            # the training loss: dlogits and the accumulated loss are of the mean over the grad_accum micro-batches
            scale = 1.0 / (N * cfg.grad_accum)
            self.ce = await CrossEntropy.create(dev, N, V, Vp, grad_scale=scale, loss_scale=scale)
            self.ce_eval = await CrossEntropy.create(dev, N, V, Vp)
        return self


# ------------------------------------------------------------------------------------------------------------
# forward and backward, written out

def forward_blocks(seq: Sequence, o: Ops, a: Activations, p: dict, cfg: Config):
    """encoded = wte[idx] + wpe, then the transformer blocks; the last block's output is a.res3[-1]."""
    o.emb.forward(seq, out=a.encoded, idx=a.idx, wte=p["transformer.wte.weight"], wpe=p["transformer.wpe.weight"])
    for l in range(cfg.n_layer):
        h = f"transformer.h.{l}."
        x = a.encoded if l == 0 else a.res3[l - 1]                                       # (N, C)
        o.ln.forward(seq, out=a.ln1[l], mean=a.ln1_mean[l], rstd=a.ln1_rstd[l], inp=x,
                     weight=p[h + "ln_1.weight"], bias=p[h + "ln_1.bias"])
        o.c_attn.forward(seq, out=a.qkv[l], inp=a.ln1[l], weight=p[h + "attn.c_attn.weight"],
                         bias=p[h + "attn.c_attn.bias"])                                 # (N, 3C)
        o.attn.forward(seq, out=a.atty[l], lse=a.lse[l], qkv=a.qkv[l])                   # (N, C)
        o.attn_proj.forward(seq, out=a.res2[l], inp=a.atty[l], weight=p[h + "attn.c_proj.weight"],
                            bias=p[h + "attn.c_proj.bias"], residual=x)                  # (N, C) = x + ...
        o.ln.forward(seq, out=a.ln2[l], mean=a.ln2_mean[l], rstd=a.ln2_rstd[l], inp=a.res2[l],
                     weight=p[h + "ln_2.weight"], bias=p[h + "ln_2.bias"])
        o.c_fc.forward(seq, out=a.fch[l], inp=a.ln2[l], weight=p[h + "mlp.c_fc.weight"],
                       bias=p[h + "mlp.c_fc.bias"], gelu_out=a.fch_gelu[l])              # (N, 4C) both
        o.mlp_proj.forward(seq, out=a.res3[l], inp=a.fch_gelu[l], weight=p[h + "mlp.c_proj.weight"],
                           bias=p[h + "mlp.c_proj.bias"], residual=a.res2[l])            # (N, C) = res2 + ...


def forward(seq: Sequence, o: Ops, a: Activations, p: dict, cfg: Config):
    """The whole forward: blocks, ln_f, and the tied lm_head: a.logits (N, Vp)."""
    forward_blocks(seq, o, a, p, cfg)
    o.ln.forward(seq, out=a.lnf, mean=a.lnf_mean, rstd=a.lnf_rstd, inp=a.res3[-1],
                 weight=p["transformer.ln_f.weight"], bias=p["transformer.ln_f.bias"])
    o.lm_head.forward(seq, logits=a.logits, x=a.lnf, wte=p["transformer.wte.weight"])


def backward(seq: Sequence, o: Ops, a: Activations, p: dict, g: dict, cfg: Config):
    """From a.logits holding dlogits: every gradient ACCUMULATED into g (so that micro-batches add up).

    The layernorms' parameter gradients are deferred (LayerNorm.backward's defer, where the op defers) and made
    together at the end (LayerNorm.finish).
    The residual stream's gradient a.dres collects, in each layer, what flows past the block unchanged plus what
    comes back through ln_2 and ln_1 (their backward adds into it)."""
    C, N = cfg.n_embd, a.N
    o.ew.zero(seq, a.dres, n=N * C)
    o.lm_head.backward(seq, dx=a.dC, dwte=g["transformer.wte.weight"], dlogits=a.logits, x=a.lnf,
                       wte=p["transformer.wte.weight"])
    o.ln.backward(seq, dinp=a.dres, dweight=g["transformer.ln_f.weight"], dbias=g["transformer.ln_f.bias"],
                  dout=a.dC, inp=a.res3[-1], weight=p["transformer.ln_f.weight"], mean=a.lnf_mean, rstd=a.lnf_rstd,
                  defer=True)
    for l in reversed(range(cfg.n_layer)):
        h = f"transformer.h.{l}."
        x = a.encoded if l == 0 else a.res3[l - 1]
        # a.dres is the gradient of res3: back through the MLP (d4C: the gradient of the pre-activation, through
        # the GELU: times its derivative, which the forward kept in fch)
        mp, fc, ap, ca = (h + n for n in ("mlp.c_proj.", "mlp.c_fc.", "attn.c_proj.", "attn.c_attn."))
        paired = o.mlp_pair is not None
        o.mlp_proj.backward(seq, dinp=a.d4C, dweight=g[mp + "weight"], dbias=g[mp + "bias"], dout=a.dres,
                            inp=a.fch_gelu[l], weight=p[mp + "weight"], gelu_grad=a.fch[l], weight_grad=not paired)
        o.c_fc.backward(seq, dinp=a.dC, dweight=g[fc + "weight"], dbias=g[fc + "bias"], dout=a.d4C, inp=a.ln2[l],
                        weight=p[fc + "weight"], weight_grad=not paired)
        if paired:        # both weight gradients, before ln_2's backward adds into a.dres
            o.mlp_pair.dispatch(seq, out1=weight_and_bias(g[mp + "weight"], g[mp + "bias"]), a1=a.fch_gelu[l],
                                b1=a.dres, out2=weight_and_bias(g[fc + "weight"], g[fc + "bias"]), a2=a.ln2[l],
                                b2=a.d4C)
        o.ln.backward(seq, dinp=a.dres, dweight=g[h + "ln_2.weight"], dbias=g[h + "ln_2.bias"], dout=a.dC,
                      inp=a.res2[l], weight=p[h + "ln_2.weight"], mean=a.ln2_mean[l], rstd=a.ln2_rstd[l],
                      defer=True)
        # a.dres is now the gradient of res2: back through attention
        o.attn_proj.backward(seq, dinp=a.dC, dweight=g[ap + "weight"], dbias=g[ap + "bias"], dout=a.dres,
                             inp=a.atty[l], weight=p[ap + "weight"], weight_grad=not paired)
        o.attn.backward(seq, dqkv=a.d3C, dout=a.dC, qkv=a.qkv[l], out=a.atty[l], lse=a.lse[l])
        o.c_attn.backward(seq, dinp=a.dC, dweight=g[ca + "weight"], dbias=g[ca + "bias"], dout=a.d3C,
                          inp=a.ln1[l], weight=p[ca + "weight"], weight_grad=not paired)
        if paired:        # both weight gradients, before ln_1's backward adds into a.dres
            o.attn_pair.dispatch(seq, out1=weight_and_bias(g[ca + "weight"], g[ca + "bias"]), a1=a.ln1[l],
                                 b1=a.d3C, out2=weight_and_bias(g[ap + "weight"], g[ap + "bias"]), a2=a.atty[l],
                                 b2=a.dres)
        o.ln.backward(seq, dinp=a.dres, dweight=g[h + "ln_1.weight"], dbias=g[h + "ln_1.bias"], dout=a.dC,
                      inp=x, weight=p[h + "ln_1.weight"], mean=a.ln1_mean[l], rstd=a.ln1_rstd[l], defer=True)
    o.emb.backward(seq, dwte=g["transformer.wte.weight"], dwpe=g["transformer.wpe.weight"], dout=a.dres, idx=a.idx)
    o.ln.finish(seq)   # the deferred layernorm parameter gradients, in one dispatch


# ------------------------------------------------------------------------------------------------------------
# the model

class GPT:
    """GPT-2 with its training step on the GPU. Create with `await GPT.create(dev, cfg, B, T)`."""

    @classmethod
    async def create(cls, dev: Device, cfg: Config, B: int | None = None, T: int | None = None) -> "GPT":
        self = cls()
        with dev.recording() as self.own:      # every storage buffer made for this model (free)
            try:
                return await self._create(dev, cfg, B, T)
            except BaseException:
                dev.free(*self.own)            # a model that could not be built gives back what it had
                raise

    async def _create(self, dev: Device, cfg: Config, B: int | None, T: int | None) -> "GPT":
        cfg.validate()
        B = cfg.batch_size if B is None else B
        T = cfg.block_size if T is None else T
        if not 1 <= T <= cfg.block_size:
            raise GPUError(f"T = {T} must be in 1..block_size ({cfg.block_size})")
        self.dev, self.cfg, self.B, self.T = dev, cfg, B, T
        self.specs, self.P = parameter_specs(cfg)
        self.n_params = sum(s.numel for s in self.specs)
        self.params = dev.buffer(4 * self.P, "params")     # (P,) every tensor at its spec's offset
        self.grads = dev.buffer(4 * self.P, "grads")       # (P,) same layout
        self.m = dev.buffer(4 * self.P, "adam_m")
        self.v = dev.buffer(4 * self.P, "adam_v")
        self.p = tensor_views(self.params, self.specs)
        self.g = tensor_views(self.grads, self.specs)
        self.loss = dev.buffer(4, "loss")                  # (1,) the step's mean loss, accumulated
        self.eval_loss = dev.buffer(4, "eval_loss")        # (1,)
        self.ring = dev.buffer(16 * RING, "step_stats")    # (RING, 4): loss, grad norm, skipped, 0

        self.acts = Activations(dev, cfg, B, T)
        self.ops = await Ops.create(dev, cfg, B, T)
        self.opt = await AdamW.create(dev, self.P, decay_ranges=[(s.offset, s.numel) for s in self.specs if s.decay])
        self.k_record = await dev.kernel("metrics.wgsl", "record_step")
        self.k_top1 = await dev.kernel("metrics.wgsl", "top1")
        self.k_normal = await dev.kernel("init.wgsl", "fill_normal")
        self.k_const = await dev.kernel("init.wgsl", "fill_const")
        self.record_params = dev.uniform(struct.pack("<4I", 0, RING, 0, 0), "record-params")
        N, V, Vp = B * T, cfg.vocab_size, cfg.padded_vocab_size
        top1_params = dev.uniform(struct.pack("<4I", N, V, Vp, 0), "top1-params")
        o, a, ew = self.ops, self.acts, self.ops.ew

        self.zero_seq = dev.sequence("zero_grad")
        ew.zero(self.zero_seq, self.grads)
        ew.zero(self.zero_seq, self.loss)

        self.fwd_bwd_seq = s = dev.sequence("forward_backward")
        forward(s, o, a, self.p, cfg)
        o.ce.forward_backward(s, losses=a.losses, logits=a.logits, targets=a.targets)
        o.ce.mean(s, loss=self.loss, losses=a.losses, accumulate=True)
        backward(s, o, a, self.p, self.g, cfg)

        self.update_seq = s = dev.sequence("update")
        self.opt.step(s, params=self.params, grads=self.grads, m=self.m, v=self.v)
        s.dispatch(self.k_record, (1,), rp=self.record_params, loss_acc=self.loss,
                   grad_stats=self.opt.stats.view(0, 16), ring=self.ring)

        self.eval_seq = s = dev.sequence("eval")
        forward(s, o, a, self.p, cfg)
        o.ce_eval.forward(s, losses=a.losses, logits=a.logits, targets=a.targets)
        o.ce_eval.mean(s, loss=self.eval_loss, losses=a.losses)

        self.metrics_seq = s = dev.sequence("eval_metrics")
        forward(s, o, a, self.p, cfg)
        o.ce_eval.forward(s, losses=a.losses, logits=a.logits, targets=a.targets)
        s.dispatch(self.k_top1, fold_grid(N), tp=top1_params, logits=a.logits, targets=a.targets, correct=a.correct)

        # a whole step of one micro-batch as one submission: zero_grad, forward-backward and update in one command
        # buffer (train_step), where three submissions each begin and end their own
        self.step_seq = dev.sequence("step").extend(self.zero_seq).extend(self.fwd_bwd_seq).extend(self.update_seq)

        self.sequences = [self.zero_seq, self.fwd_bwd_seq, self.update_seq, self.eval_seq, self.metrics_seq,
                          self.step_seq]
        for s in self.sequences:
            await s.build()
        self.gen = None                                    # generation state, made by the first prefill
        # (what was made for it, not a difference of dev.bytes_allocated, which the collector may lower meanwhile)
        self.gpu_bytes = sum(b.size for b in self.own)
        return self

    def free(self):
        """Give every storage buffer made for the model back to the GPU now, not when the garbage collector gets to
        it: parameters, gradients, AdamW moments, activations, the kernels' scratch and the generation's caches
        (the products' shared split-K scratch is left to the collector). For a model made and dropped while a page
        stays open (one built again, the speed measure's). The model cannot be used afterwards: it becomes a
        FreedModel, whose every use raises GPUError (where its sequences would reach buffers that are gone)."""
        self.dev.free(*self.own)
        kept = {k: self.__dict__[k] for k in FreedModel.KEEP if k in self.__dict__}
        self.__dict__.clear()
        self.__dict__.update(kept)
        self.__class__ = FreedModel

    @property
    def kernel_count(self) -> int:
        """Distinct compiled kernels in this model's sequences."""
        return len({id(op.kernel) for s in self.sequences for op in s.ops if op.kind == "dispatch"})

    # -- initialisation ---------------------------------------------------------------------------------------
    async def init_weights(self, seed: int):
        """GPT-2 init on the GPU (shaders/init.wgsl): N(0, 0.02), the residual projections N(0, 0.02/sqrt(2L)),
        LayerNorm weights 1, biases 0, wte's padded rows 0. Gradients, Adam moments and step stats start at 0."""
        seed = int(seed) & 0xFFFFFFFF
        s = self.dev.sequence("init")
        ew = self.ops.ew
        for buf in (self.params, self.grads, self.m, self.v, self.loss, self.ring, self.opt.stats):
            ew.zero(s, buf)
        V, C = self.cfg.vocab_size, self.cfg.n_embd
        for i, spec in enumerate(self.specs):
            kind, value = spec.init
            if kind == "const" and value == 0.0:
                continue
            n = V * C if spec.name == "transformer.wte.weight" else spec.numel     # padded rows stay 0
            if kind == "normal":
                tensor_seed = (seed * 0x9E3779B1 + (i + 1) * 0x85EBCA77) & 0xFFFFFFFF   # a stream per tensor
                k, ip = self.k_normal, struct.pack("<2I2f", n, tensor_seed, value, 0.0)
            else:
                k, ip = self.k_const, struct.pack("<2I2f", n, 0, 0.0, value)
            s.dispatch(k, fold_grid(-(-n // 256)), ip=self.dev.uniform(ip, "init-params"), dst=self.p[spec.name])
        await s.build()
        s.run()

    # -- the training step --------------------------------------------------------------------------------------
    def set_step(self, step: int, lr: float):
        """The optimizer's uniform for this step: learning rate, bias corrections of t = step + 1, ..."""
        c = self.cfg
        self.opt.write_step(t=step + 1, lr=lr, beta1=c.beta1, beta2=c.beta2, eps=c.eps, weight_decay=c.weight_decay,
                            max_norm=c.grad_clip)

    def run_zero_grad(self):
        self.zero_seq.run()

    def set_batch(self, x, y=None):
        """x, y: array('I') of B*T token ids and their targets (row b*T + t is token t of sequence b)."""
        N = self.B * self.T
        if len(x) != N or (y is not None and len(y) != N):
            raise ValueError(f"set_batch needs B*T = {N} inputs and targets, got {len(x)} and "
                             f"{len(y) if y is not None else None}")
        self.dev.write(self.acts.idx, _u32(x))
        if y is not None:
            self.dev.write(self.acts.targets, _u32(y))

    def run_forward_backward(self):
        self.fwd_bwd_seq.run()

    def run_update(self, slot: int):
        """Clip + AdamW, and store (loss, grad norm, skipped) of this step at ring slot % RING."""
        self._record_at(slot)
        self.update_seq.run()

    def _record_at(self, slot: int):
        """The ring slot (slot % RING) where the next update stores its step's stats."""
        self.dev.write(self.record_params, struct.pack("<4I", slot % RING, RING, 0, 0))

    def train_step(self, step: int, lr: float, batches):
        """One whole training step without waiting for the GPU: zero_grad, a forward-backward of each micro-batch
        (x, y) of `batches` (gradients added up), clip + AdamW at rate lr, its stats at ring slot step % RING.
        One micro-batch is one submission (step_seq); more take one each, since each needs its own set_batch.
        There must be cfg.grad_accum of them: the loss and gradients are scaled by 1 / (B T grad_accum)."""
        if len(batches) != self.cfg.grad_accum:
            raise ValueError(f"train_step takes grad_accum = {self.cfg.grad_accum} micro-batches, got {len(batches)}")
        self.set_step(step, lr)
        if len(batches) == 1:
            self.set_batch(*batches[0])
            self._record_at(step)
            self.step_seq.run()
            return
        self.run_zero_grad()
        for x, y in batches:
            self.set_batch(x, y)
            self.run_forward_backward()
        self.run_update(slot=step)

    async def read_step_stats(self, steps) -> list[tuple[float, float, bool]]:
        """(loss, grad norm, skipped) of each step in `steps`, which must be among the last RING recorded."""
        steps = list(steps)
        if not steps:
            return []
        if max(steps) - min(steps) >= RING:
            raise ValueError(f"only the last {RING} steps are kept on the GPU; read them more often")
        data = await self.dev.read(self.ring)
        out = []
        for s in steps:
            loss, norm, skipped, _ = struct.unpack_from("<4f", data, 16 * (s % RING))
            out.append((loss, norm, skipped != 0.0))
        return out

    def run_eval(self):
        self.eval_seq.run()

    async def read_eval_loss(self) -> float:
        return struct.unpack("<f", await self.dev.read(self.eval_loss))[0]

    async def read_logits(self) -> bytes:
        """(B*T, Vp) f32 of the last forward (after run_eval; a training step leaves dlogits there)."""
        return await self.dev.read(self.acts.logits)

    async def sleep(self, seconds: float):
        await asyncio.sleep(seconds)

    async def eval_metrics(self, x, y) -> tuple[float, int, int]:
        """(sum of per-token losses, n tokens, n top-1 correct) over up to B*T tokens x with targets y, laid out
        as rows of T (a short last row is fine: positions only see earlier ones)."""
        n, N = len(x), self.B * self.T
        if n != len(y) or not 0 < n <= N:
            raise ValueError(f"eval_metrics takes 1..{N} tokens and as many targets, got {n} and {len(y)}")
        pad = array.array("I", bytes(4 * (N - n)))
        self.dev.write(self.acts.idx, _u32(x) + pad)
        self.dev.write(self.acts.targets, _u32(y) + pad)
        self.metrics_seq.run()
        losses = array.array("f", await self.dev.read(self.acts.losses, 0, 4 * n))
        correct = array.array("I", await self.dev.read(self.acts.correct, 0, 4 * n))
        return math.fsum(losses), n, sum(correct)

    # -- parameters and optimizer state --------------------------------------------------------------------------
    async def get_params(self, padded: bool = False) -> dict:
        """{name: (shape, bytes f32)} in Hugging Face GPT-2 names. wte has vocab_size rows (what GPT2LMHeadModel
        expects), or padded_vocab_size rows with padded=True (the layout on the GPU)."""
        return self._split(await self.dev.read(self.params), padded)

    async def get_grads(self) -> dict:
        """{name: (shape, bytes f32)} of the accumulated gradients, wte with its padded rows."""
        return self._split(await self.dev.read(self.grads), padded=True)

    def _split(self, data: bytes, padded: bool) -> dict:
        out = {}
        for s in self.specs:
            shape, n = s.shape, s.numel
            if s.name == "transformer.wte.weight" and not padded:
                shape = (self.cfg.vocab_size, shape[1])
                n = math.prod(shape)
            out[s.name] = (shape, data[4 * s.offset:4 * (s.offset + n)])
        return out

    def load_params(self, tensors: dict):
        """Write parameters: {name: (shape, bytes) or (dtype, shape, bytes)} as from get_params or
        tabgpt.safetensors.load. wte may have vocab_size or padded_vocab_size rows; lm_head.weight (tied) is
        ignored. Every parameter must be present."""
        by_name = {s.name: s for s in self.specs}
        missing = set(by_name) - set(tensors)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        for name, t in tensors.items():
            if name == "lm_head.weight":
                continue
            if name not in by_name:
                raise ValueError(f"unknown parameter {name!r} (not a GPT-2 tensor of this configuration)")
            spec = by_name[name]
            shape, data = _tensor(name, t)
            rows_ok = name == "transformer.wte.weight" and shape == (self.cfg.vocab_size, self.cfg.n_embd)
            if shape != spec.shape and not rows_ok:
                raise ValueError(f"{name}: shape {shape} in the checkpoint, {spec.shape} in this model")
            if data.nbytes != 4 * math.prod(shape):
                raise ValueError(f"{name}: {data.nbytes} bytes for shape {shape}; expected float32")
            if rows_ok and shape != spec.shape:   # zero the padded rows
                data = bytes(data) + bytes(4 * (spec.numel - math.prod(shape)))
            self.dev.write(self.params, data, 4 * spec.offset)

    async def get_state(self) -> dict:
        """The AdamW moments as flat (P,) f32 bytes in the parameter buffer's layout (model.specs offsets)."""
        return {"m": await self.dev.read(self.m), "v": await self.dev.read(self.v)}

    def load_state(self, state: dict):
        """Write back what get_state returned (bytes, or (dtype, shape, bytes) triples)."""
        for key, buf in (("m", self.m), ("v", self.v)):
            data = state[key]
            if isinstance(data, tuple):
                data = data[-1]
            if memoryview(data).nbytes != buf.size:
                raise ValueError(f"optimizer state {key!r} holds {memoryview(data).nbytes} bytes, the model "
                                 f"{buf.size}: it was saved by a different configuration")
            self.dev.write(buf, data)

    # -- generation with a KV cache --------------------------------------------------------------------------------
    async def prefill(self, tokens) -> array.array:
        """Start a sequence: run the prompt (1..block_size tokens) through the model, keeping every layer's qkv
        rows in the cache. Returns the logits (Vp floats) that predict the token after the prompt."""
        n = len(tokens)
        if not 0 < n <= self.cfg.block_size:
            raise ValueError(f"a prompt needs 1..block_size ({self.cfg.block_size}) tokens, got {n}")
        gen = await self._generation()
        Tp = min(self.cfg.block_size, max(16, 1 << (n - 1).bit_length()))   # a few shapes, not one per length
        if Tp not in gen.prefill:
            gen.prefill[Tp] = await gen.prefill_sequence(Tp)
        self.dev.write(gen.idx, _u32(tokens) + array.array("I", bytes(4 * (Tp - n))))
        self.dev.write(gen.params, struct.pack("<8I", n - 1, 0, *gen.dims))
        gen.prefill[Tp].run()
        gen.pos = n
        return array.array("f", await self.dev.read(gen.logits))

    async def decode(self, token: int) -> array.array:
        """Append one token at the next position (after prefill) and return the logits (Vp floats) after it."""
        gen = self.gen
        if gen is None or gen.pos is None:
            raise ValueError("call prefill(prompt) before decode()")
        if gen.pos >= self.cfg.block_size:
            raise ValueError(f"the cache holds block_size = {self.cfg.block_size} positions: prefill the last "
                             "tokens again to go on")
        self.dev.write(gen.params, struct.pack("<8I", gen.pos, int(token), *gen.dims))
        gen.decode.run()
        gen.pos += 1
        return array.array("f", await self.dev.read(gen.logits))

    async def generate(self, prompt, max_new_tokens: int, temperature: float = 1.0, top_k=None, top_p=None,
                       rng=None, stop_token=None) -> list[int]:
        """Sample up to max_new_tokens after prompt (token ids). Beyond block_size the context is the last
        block_size tokens, as nanoGPT crops it (then each token re-runs a prefill of that window)."""
        from tabgpt.metrics import sample_token
        ctx = list(prompt)[-self.cfg.block_size:]
        if not ctx:
            raise ValueError("generate needs a prompt of at least one token (for example <|endoftext|>)")
        logits = await self.prefill(ctx)
        out = []
        for i in range(max_new_tokens):
            tok = sample_token(logits, self.cfg.vocab_size, temperature, top_k, top_p, rng)
            out.append(tok)
            ctx.append(tok)
            if tok == stop_token or i == max_new_tokens - 1:
                break
            if self.gen.pos < self.cfg.block_size:
                logits = await self.decode(tok)
            else:
                logits = await self.prefill(ctx[-self.cfg.block_size:])
        return out

    async def _generation(self) -> "Generation":
        if self.gen is None:
            with self.dev.recording() as made:
                self.gen = await Generation.create(self)
            self.own += made
        return self.gen


class FreedModel:
    """A GPT after free(): its sizes remain; anything else says the model is gone instead of reaching freed buffers."""
    KEEP = ("cfg", "B", "T", "P", "n_params", "gpu_bytes", "dev")

    def __getattribute__(self, name):
        if name in FreedModel.KEEP or name == "free" or name.startswith("__"):
            return object.__getattribute__(self, name)
        raise GPUError(f"this model's GPU memory was given back (GPT.free), so it has no {name!r}: build a new model")

    def free(self):
        """Already done."""


class Generation:
    """Buffers and sequences of cached generation (one sequence at a time): the per-layer KV caches, the
    single-row activations of a decode step, and one prefill sequence per padded prompt length."""

    @classmethod
    async def create(cls, model: GPT) -> "Generation":
        self = cls()
        dev, cfg, p = model.dev, model.cfg, model.p
        C, L, NH, Tmax, Vp = cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.block_size, cfg.padded_vocab_size
        self.model, self.pos, self.prefill = model, None, {}
        self.dims = (C, NH, Tmax, 0, 0, 0)
        self.params = dev.uniform(struct.pack("<8I", 0, 0, *self.dims), "decode-params")
        self.cache = [dev.buffer(4 * Tmax * 3 * C, f"kv_cache.{l}") for l in range(L)]   # (Tmax, 3C) per layer
        self.acts = Activations(dev, cfg, 1, Tmax, backward=False, per_layer=False, qkv=self.cache)
        self.idx = self.acts.idx                                                           # (Tmax,) u32 prompt
        # one row: x (C,) the residual stream, then the layer's intermediates
        row = lambda n, label: dev.buffer(4 * n, label)   # noqa: E731
        self.x, self.ln, self.res = row(C, "dec_x"), row(C, "dec_ln"), row(C, "dec_res")
        self.mean, self.rstd = row(1, "dec_mean"), row(1, "dec_rstd")
        self.qkv, self.atty = row(3 * C, "dec_qkv"), row(C, "dec_atty")
        self.fch, self.fch_gelu = row(4 * C, "dec_fch"), row(4 * C, "dec_fch_gelu")
        self.scores = row(NH * Tmax, "dec_scores")                                         # (NH, Tmax)
        self.logits = row(Vp, "dec_logits")                                                # (Vp,)
        self.one = await Ops.create(dev, cfg, 1, 1, backward=False, sequence=False)         # M = 1 products
        self.k = {e: await dev.kernel("decode.wgsl", e)
                  for e in ("decode_embed", "decode_store", "decode_attention", "pick_row")}

        self.decode = s = dev.sequence("decode")
        groups = lambda n: (-(-n // 64),)   # noqa: E731
        s.dispatch(self.k["decode_embed"], groups(C), dp=self.params, wte=p["transformer.wte.weight"],
                   wpe=p["transformer.wpe.weight"], xrow=self.x)
        o = self.one
        for l in range(L):
            h = f"transformer.h.{l}."
            o.ln.forward(s, out=self.ln, mean=self.mean, rstd=self.rstd, inp=self.x,
                         weight=p[h + "ln_1.weight"], bias=p[h + "ln_1.bias"])
            o.c_attn.forward(s, out=self.qkv, inp=self.ln, weight=p[h + "attn.c_attn.weight"],
                             bias=p[h + "attn.c_attn.bias"])
            s.dispatch(self.k["decode_store"], groups(3 * C), dp=self.params, qkv=self.qkv, cache=self.cache[l])
            s.dispatch(self.k["decode_attention"], (NH,), dp=self.params, qkv=self.qkv, cache_in=self.cache[l],
                       scores=self.scores, yrow=self.atty)
            o.attn_proj.forward(s, out=self.res, inp=self.atty, weight=p[h + "attn.c_proj.weight"],
                                bias=p[h + "attn.c_proj.bias"], residual=self.x)
            o.ln.forward(s, out=self.ln, mean=self.mean, rstd=self.rstd, inp=self.res,
                         weight=p[h + "ln_2.weight"], bias=p[h + "ln_2.bias"])
            o.c_fc.forward(s, out=self.fch, inp=self.ln, weight=p[h + "mlp.c_fc.weight"], bias=p[h + "mlp.c_fc.bias"],
                           gelu_out=self.fch_gelu)
            o.mlp_proj.forward(s, out=self.x, inp=self.fch_gelu, weight=p[h + "mlp.c_proj.weight"],
                               bias=p[h + "mlp.c_proj.bias"], residual=self.res)
        self.head(s)
        await s.build()
        return self

    def head(self, s: Sequence):
        """ln_f and lm_head of the one row self.x: self.logits (Vp,)."""
        p, o = self.model.p, self.one
        o.ln.forward(s, out=self.ln, mean=self.mean, rstd=self.rstd, inp=self.x,
                     weight=p["transformer.ln_f.weight"], bias=p["transformer.ln_f.bias"])
        o.lm_head.forward(s, logits=self.logits, x=self.ln, wte=p["transformer.wte.weight"])

    async def prefill_sequence(self, Tp: int) -> Sequence:
        """The forward over a prompt padded to Tp tokens (qkv into the cache), then the head on its last row."""
        model = self.model
        dev, cfg = model.dev, model.cfg
        with dev.recording() as made:
            o = await Ops.create(dev, cfg, 1, Tp, backward=False, head=False)
        model.own += made
        s = dev.sequence(f"prefill-{Tp}")
        forward_blocks(s, o, self.acts, model.p, cfg)
        s.dispatch(self.k["pick_row"], (-(-cfg.n_embd // 64),), dp=self.params, rows=self.acts.encoded, xrow=self.x)
        self.head(s)
        await s.build()
        return s


def _u32(tokens) -> array.array:
    if isinstance(tokens, array.array) and tokens.typecode == "I":
        return tokens
    return array.array("I", tokens)


def _tensor(name: str, t) -> tuple[tuple, memoryview]:
    """(shape, bytes) from (shape, bytes) or a safetensors (dtype, shape, bytes) triple."""
    if len(t) == 3:
        dtype, shape, data = t
        if dtype != "F32":
            raise ValueError(f"{name}: dtype {dtype}, expected F32")
    else:
        shape, data = t
    return tuple(shape), memoryview(data).cast("B")
