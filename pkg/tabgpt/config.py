"""One flat configuration with nanoGPT's names; the CLI flags and the page's controls fill the same object."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass
class Config:
    # model
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    block_size: int = 64
    vocab_size: int = 512            # tokenizer vocabulary (BPE merges + 256 bytes + <|endoftext|>)
    # data and optimisation
    batch_size: int = 4
    grad_accum: int = 1              # micro-batches per optimizer step
    learning_rate: float = 3e-3
    min_lr: float = 3e-4             # cosine decay ends here
    warmup_steps: int = 10
    max_steps: int = 60
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # bookkeeping
    eval_interval: int = 20          # validation loss every N steps (and at the end)
    eval_steps: int = 4              # validation batches per evaluation
    sample_interval: int = 0         # a sample every N steps (0: only at the end)
    sample_tokens: int = 64
    checkpoint_interval: int = 0     # 0: only at the end (and on stop)
    log_interval: int = 1            # read the loss back every N steps (asynchronously)
    seed: int = 1337
    time_limit: float = 0.0          # seconds; 0 = none
    val_fraction: float = 0.05       # held-out share when the corpus is one text

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """The vocabulary rounded up to a multiple of 64 (aligned rows, as llm.c); the loss ignores the padding."""
        return (self.vocab_size + 63) // 64 * 64

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size * self.grad_accum

    def validate(self) -> "Config":
        """Refuse settings that cannot train, each problem named with what to do (ValueError)."""
        problems = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            want = int if f.type in ("int", int) else float
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (want is int and not isinstance(v, int)):
                problems.append(f"{f.name} must be {'an integer' if want is int else 'a number'}, got {v!r}")
            elif want is float and not math.isfinite(v):
                problems.append(f"{f.name} must be a finite number, got {v!r}")
        if problems:   # the checks below compare numbers
            raise ValueError("bad configuration: " + "; ".join(problems))
        for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "max_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if problems:   # head_size divides by n_head
            raise ValueError("bad configuration: " + "; ".join(problems))
        if self.n_embd % self.n_head:
            problems.append(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.n_embd % 4:
            problems.append(f"n_embd ({self.n_embd}) must be a multiple of 4")
        if self.head_size % 4:
            problems.append(f"head size n_embd/n_head = {self.head_size} must be a multiple of 4")
        if self.head_size > 128:
            problems.append(f"head size n_embd/n_head = {self.head_size} is above 128; use more heads")
        if self.vocab_size < 257:
            problems.append(f"vocab_size ({self.vocab_size}) must be at least 257 (256 bytes + end of text)")
        if not 0 < self.learning_rate < 1:
            problems.append(f"learning_rate ({self.learning_rate}) must be in (0, 1)")
        if not 0 <= self.min_lr <= self.learning_rate:
            problems.append(f"min_lr ({self.min_lr}) must be in [0, learning_rate = {self.learning_rate}]: the "
                            f"cosine decay ends there; give a --min-lr from 0 to the --learning-rate")
        if self.weight_decay < 0:
            problems.append(f"weight_decay ({self.weight_decay}) must not be negative: give a --weight-decay of 0 "
                            f"(none) or more (0.1 is usual)")
        elif self.learning_rate * self.weight_decay >= 1:
            problems.append(f"weight_decay ({self.weight_decay}) times learning_rate ({self.learning_rate}) must be "
                            f"below 1: AdamW multiplies the decayed weights (the matrices) by 1 - learning_rate x "
                            f"weight_decay each step, which would zero or flip them; give a --weight-decay below "
                            f"{_floor4(1 / self.learning_rate):g} (0.1 is usual)")
        if self.eval_steps < 1:
            problems.append(f"eval_steps ({self.eval_steps}) must be at least 1 (batches per validation loss); "
                            f"eval_interval 0 turns evaluations off")
        for name in ("warmup_steps", "eval_interval", "sample_interval", "checkpoint_interval", "sample_tokens",
                     "grad_clip", "time_limit", "eps"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if self.log_interval < 1:
            problems.append(f"log_interval must be at least 1, got {self.log_interval}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"{name} ({getattr(self, name)}) must be in [0, 1)")
        if not 0 < self.val_fraction < 1:
            problems.append(f"val_fraction ({self.val_fraction}) must be in (0, 1)")
        if problems:
            raise ValueError("bad configuration: " + "; ".join(problems))
        return self

    def model_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def n_params(self, include_embeddings: bool = True) -> int:
        C, L, V = self.n_embd, self.n_layer, self.padded_vocab_size
        per_layer = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C)
        n = L * per_layer + 2 * C
        if include_embeddings:
            n += V * C + self.block_size * C
        return n

    @property
    def n_layernorms(self) -> int:
        """Two a block and the final one (the backward defers all their parameter gradients, ops/layernorm)."""
        return 2 * self.n_layer + 1

    def gpu_bytes_estimate(self, max_buffer: int = 256 << 20) -> int:
        """GPU memory for training, roughly: parameters, gradients and two AdamW moments, plus the activations
        kept for the backward (about 17 n_embd floats per token per layer, the embeddings and the logits).
        max_buffer: the device's max-buffer-size (default WebGPU's 256 MiB), which decides whether the layernorms'
        deferred sums are made (LayerNorm.create's rule)."""
        P = self.n_params()
        tokens = self.batch_size * self.block_size
        acts = tokens * (17 * self.n_layer * self.n_embd + 4 * self.n_embd + self.padded_vocab_size)
        # the attention backward's (B, n_head, T, T) scratches (the stored dS, or the products' S and dP), as "auto"
        # allocates them within WebGPU's default 128 MiB binding; the layernorms' deferred sums where they fit one
        # buffer
        from tabgpt.ops.attention import backward_scratch_bytes
        from tabgpt.ops.layernorm import deferred_bytes
        return (4 * (4 * P + acts) + backward_scratch_bytes(self.batch_size, self.n_head, self.block_size, 128 << 20)
                + deferred_bytes(tokens, self.n_embd, self.n_layernorms, max_buffer=max_buffer))

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N for the weights plus attention (PaLM appendix B, as nanoGPT)."""
        N = self.n_params(include_embeddings=False) + self.padded_vocab_size * self.n_embd  # lm_head is a matmul
        return 6 * N + 12 * self.n_layer * self.n_embd * self.block_size


def _floor4(x: float) -> float:
    """x > 0 rounded down to four significant digits (a bound that its printed form does not exceed)."""
    scale = 10.0 ** (3 - math.floor(math.log10(x)))
    return math.floor(x * scale) / scale


# Presets: tiny runs in seconds on a CPU Vulkan driver (CI); small in minutes there; browser suits a laptop GPU;
# gpt2 is GPT-2 small (124M).
PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512, batch_size=4,
                 learning_rate=3e-3, min_lr=3e-4, warmup_steps=5, max_steps=40, eval_interval=20, eval_steps=2),
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=2048, batch_size=16,
                  learning_rate=2e-3, min_lr=2e-4, warmup_steps=50, max_steps=1000, eval_interval=100,
                  eval_steps=8, sample_interval=250),
    # browser: on the bundled Shakespeare the validation loss is lowest after ~1500 steps (BENCHMARKS.md)
    "browser": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=4096, batch_size=32,
                    learning_rate=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=2000, eval_interval=200,
                    eval_steps=16, sample_interval=500),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, batch_size=8,
                 learning_rate=6e-4, min_lr=6e-5, warmup_steps=200, max_steps=5000, eval_interval=500,
                 eval_steps=8, sample_interval=1000),
}


def preset(name: str, **overrides) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Config(**PRESETS[name]).replace(**overrides).validate()
