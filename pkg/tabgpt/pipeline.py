"""The whole pipeline, step by step, shared by the CLI and the page: data -> tokenizer -> model -> train ->
sample -> evaluate. Each step is an async method; progress goes to `emit(event_dict)`, which the CLI prints
and the page posts to the browser's main thread. Nothing here knows which front end runs it.
"""

from __future__ import annotations

import array
import asyncio
import json
import time

from tabgpt.config import Config
from tabgpt.run import RunError, RunFolder, check_tokenizer_matches
from tabgpt.train import Control, TokenData, TrainingError, train


def _noop(event):
    pass


class Pipeline:
    def __init__(self, emit=None, run_dir=None):
        self.emit = emit or _noop
        self.run = RunFolder(run_dir) if run_dir else None
        self.corpus = None
        self.tokenizer = None
        self.data: TokenData | None = None
        self.cfg: Config | None = None
        self.model = None
        self.dev = None
        self.step = 0
        self.control = Control()
        self.history: list[dict] = []

    # -- 1. data
    async def load_data(self, source="default"):
        from tabgpt import corpus as corpus_mod
        t0 = time.perf_counter()

        def progress(ev):
            self.emit({"type": "fetch", **ev} if isinstance(ev, dict) else {"type": "fetch", "message": str(ev)})

        self.corpus = await corpus_mod.load_corpus(source, progress=progress)
        self.data = None
        c = self.corpus
        return {"sources": c.sources, "train_bytes": len(c.train_text.encode()), "val_bytes": len(c.val_text.encode()),
                "split": c.split, "notices": c.notices, "seconds": time.perf_counter() - t0}

    # -- 2. tokenizer
    async def train_tokenizer(self, vocab_size: int):
        from tabgpt import bpe
        if self.corpus is None:
            raise RunError("load the data first")
        t0 = time.perf_counter()
        last = [0.0]

        def progress(ev):
            now = time.perf_counter()
            if now - last[0] > 0.1 or ev.get("done") == ev.get("total"):
                last[0] = now
                self.emit({"type": "tokenizer_progress", **ev})

        self.tokenizer = await bpe.train_tokenizer_async(self.corpus.train_text, vocab_size, progress=progress,
                                                         should_stop=lambda: self.control.stop)
        seconds = time.perf_counter() - t0
        summary = self.tokenize()
        preview_text = self.corpus.val_text[:600]
        ids = self.tokenizer.encode(preview_text)
        preview = [[self.tokenizer.decode([i]), int(i)] for i in ids[:160]]
        return {"vocab_size": self.tokenizer.vocab_size, "seconds": seconds, "preview": preview, **summary}

    def use_tokenizer(self, tokenizer):
        self.tokenizer = tokenizer
        return self.tokenize()

    def tokenize(self):
        t0 = time.perf_counter()
        enc = self.tokenizer.encode
        train_ids = array.array("I", enc(self.corpus.train_text))
        val_ids = array.array("I", enc(self.corpus.val_text))
        tb, vb = len(self.corpus.train_text.encode()), len(self.corpus.val_text.encode())
        self.data = TokenData(train_ids, val_ids, tb, vb)
        return {"train_tokens": len(train_ids), "val_tokens": len(val_ids),
                "bytes_per_token": vb / max(1, len(val_ids)), "encode_seconds": time.perf_counter() - t0}

    # -- 3. model
    async def build_model(self, cfg: Config, resume_from: RunFolder | None = None):
        from tabgpt import gpu
        from tabgpt.gpt import GPT
        if self.tokenizer is None:
            raise RunError("train or load a tokenizer first")
        cfg = cfg.replace(vocab_size=self.tokenizer.vocab_size).validate()
        if self.data is not None:
            self.data.check(cfg.block_size)
        self.dev = self.dev or await gpu.open_device()
        check_fits(self.dev, cfg)
        t0 = time.perf_counter()
        self.model = await GPT.create(self.dev, cfg, B=cfg.batch_size, T=cfg.block_size)
        self.cfg = cfg
        self.step = 0
        if resume_from is not None:
            params, step = resume_from.read_model(cfg)
            state, meta = resume_from.read_state()
            if int(meta.get("step", -1)) != step:
                raise RunError(f"{resume_from.path}: model.safetensors (step {step}) and state.safetensors "
                               f"(step {meta.get('step')}) disagree: a save was interrupted")
            self.model.load_params(params)
            self.model.load_state(state)
            self.step = step
        else:
            await self.model.init_weights(cfg.seed)
        return {"config": cfg.to_dict(), "n_params": cfg.n_params(), "gpu_bytes": self.model.gpu_bytes,
                "kernels": self.model.kernel_count, "compile_seconds": time.perf_counter() - t0, "step": self.step}

    # -- 4. training
    async def train(self, sample_prompt: str = "\n"):
        if self.model is None:
            raise RunError("build the model first")
        self.control = Control()
        run = self.run

        async def sampler(step):
            return await self.sample(sample_prompt, max_new_tokens=self.cfg.sample_tokens, temperature=0.8,
                                     top_k=50, seed=step, stream=False)

        async def checkpoint(step, reason):
            self.step = step
            if run is None:
                return {"saved": False}
            info = await run.save_checkpoint(self.model, step)
            return {"saved": True, "reason": reason, **info}

        last = None
        try:
            async for ev in train(self.model, self.data, self.cfg, self.control, start_step=self.step,
                                  sampler=sampler, checkpoint=checkpoint):
                self.history.append(ev)
                if run is not None and ev["type"] != "paused":
                    run.append_metrics(ev)
                self.emit(ev)
                last = ev
        except TrainingError as e:
            ev = {"type": "error", "message": str(e)}
            if run is not None:
                run.append_metrics(ev)
                await checkpoint(self.step, "error")
            raise
        self.step = last["step"] if last else self.step
        return last

    # -- 5. sampling
    async def sample(self, prompt: str, max_new_tokens=200, temperature=0.8, top_k=None, top_p=None, seed=0,
                     stream=True):
        from tabgpt.sample import generate
        pieces = []
        async for piece in generate(self.model, self.tokenizer, prompt, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_k=top_k, top_p=top_p, seed=seed):
            pieces.append(piece)
            if stream:
                self.emit({"type": "token", "text": piece})
        return "".join(pieces)

    # -- 6. evaluation
    async def evaluate(self, text: str | None = None, samples: list[str] | None = None, max_tokens=None):
        from tabgpt.evaluate import evaluate
        text = self.corpus.val_text if text is None else text
        return await evaluate(self.model, self.tokenizer, text, train_text=self.corpus.train_text if self.corpus
                              else None, train_tokens=self.data.train if self.data else None, samples=samples,
                              max_tokens=max_tokens)


def check_fits(dev, cfg: Config):
    """Refuse configurations beyond the GPU's limits with a message that says what to change."""
    limit = dev.limits["max-storage-buffer-binding-size"]
    C, Vp, B, T = cfg.n_embd, cfg.padded_vocab_size, cfg.batch_size, cfg.block_size
    biggest = {
        "the logits (batch_size x block_size x padded vocab)": 4 * B * T * Vp,
        "the MLP activations (batch_size x block_size x 4 n_embd)": 4 * B * T * 4 * C,
        "the token embedding (vocab x n_embd)": 4 * Vp * C,
    }
    for what, nbytes in biggest.items():
        if nbytes > limit:
            raise RunError(f"{what} need {nbytes / 2**20:.0f} MiB in one binding, above this GPU's limit of "
                           f"{limit / 2**20:.0f} MiB: lower --batch-size, --block-size or --vocab-size")
