"""The whole pipeline, step by step, shared by the CLI and the page: data -> tokenizer -> model -> train ->
sample -> evaluate. Each step is an async method; progress goes to `emit(event_dict)`, which the CLI prints
and the page posts to the browser's main thread. Nothing here knows which front end runs it.
"""

from __future__ import annotations

import array
import hashlib
import time
from pathlib import Path

import tabgpt
from tabgpt.config import Config
from tabgpt.run import RunError, RunFolder, check_tokenizer_matches, read_init
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
        # where a new run goes when a run folder that keeps best weights has no checkpoint to resume from (the CLI:
        # "into another --out"; the page replaces its run's files)
        self.elsewhere: str | None = None

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
        self.control = Control()  # the page's Stop button cancels the tokenizer too
        t0 = time.perf_counter()
        last = [0.0]

        def progress(ev):
            now = time.perf_counter()
            if now - last[0] > 0.1 or ev.get("done") == ev.get("total"):
                last[0] = now
                self.emit({"type": "tokenizer_progress", **ev})

        self.tokenizer = await bpe.train_tokenizer_async(self.corpus.train_text, vocab_size, progress=progress,
                                                         should_stop=lambda: self.control.stop)
        if self.model is not None:   # a model speaks the old tokenizer's ids: it goes with it, memory and all
            self.model.free()
            self.model = None
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
        enc = self.tokenizer.encode_array
        train_ids = array.array("I", enc(self.corpus.train_text))
        val_ids = array.array("I", enc(self.corpus.val_text))
        tb, vb = len(self.corpus.train_text.encode()), len(self.corpus.val_text.encode())
        self.data = TokenData(train_ids, val_ids, tb, vb)
        return {"train_tokens": len(train_ids), "val_tokens": len(val_ids),
                "bytes_per_token": vb / max(1, len(val_ids)), "encode_seconds": time.perf_counter() - t0}

    # -- 3. model
    async def build_model(self, cfg: Config, resume_from: RunFolder | None = None, init_params: dict | None = None):
        from tabgpt import gpu
        from tabgpt.gpt import GPT
        if self.tokenizer is None:
            raise RunError("train or load a tokenizer first")
        cfg = cfg.replace(vocab_size=self.tokenizer.vocab_size).validate()
        if self.data is not None:
            self.data.check(cfg.block_size)
        self.dev = self.dev or await gpu.open_device()
        # the sizes of a resumed model, or of a trained one to start from (but its context), are not advised
        fixed = [flag(k) for k in RESUME_FIXED] if resume_from is not None else \
            [flag(k) for k in RESUME_FIXED if k != "block_size"] if init_params is not None else []
        check_fits(self.dev, cfg, fixed)
        # the checkpoint is read whole before anything is replaced: a bad one leaves the current model as it was
        resume = resume_from.read_resume(cfg) if resume_from is not None else None
        t0 = time.perf_counter()
        tuned_before = len(self.dev.tune_log)
        model = await GPT.create(self.dev, cfg, B=cfg.batch_size, T=cfg.block_size)
        try:
            await self._load_into(model, cfg, resume, resume_from, init_params)
        except BaseException:
            model.free()        # the current model stays; the one that failed gives its memory back now
            raise
        replaced, self.model = self.model, model
        self.cfg, self.step = cfg, resume[2] if resume is not None else 0
        if replaced is not None:
            replaced.free()     # a page that builds again holds one model's memory, not every one it built
        return {"config": cfg.to_dict(), "n_params": cfg.n_params(), "gpu_bytes": self.model.gpu_bytes,
                "kernels": self.model.kernel_count, "compile_seconds": time.perf_counter() - t0, "step": self.step,
                "autotuned": self.dev.tune_log[tuned_before:]}

    async def _load_into(self, model, cfg: Config, resume, resume_from, init_params):
        """The new model's weights (and optimizer state) from the checkpoint, the trained model, or the init."""
        if resume is not None:
            params, state, step = resume
            model.load_params(params)
            try:
                model.load_state(state)
            except ValueError as e:
                raise RunError(f"{resume_from.path / 'state.safetensors'} does not belong to this run's model ({e}): "
                               f"it was copied from another run. Put back the run's own, or start a new run") from e
        elif init_params is not None:     # a trained model to start from (run.read_init): weights only, step 0
            model.load_params(init_params)
        else:
            await model.init_weights(cfg.seed)
        await self.dev.sync()   # where the GPU could not allocate the model, it says so here, not steps later

    # -- 4. training
    async def train(self, sample_prompt: str = "\n"):
        if self.model is None:
            raise RunError("build the model first")
        if self.data is None:
            raise RunError("the text changed since the tokenizer was trained: train the tokenizer again, then the "
                           "model")
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
        best = [run.best_val_loss() if run is not None else float("inf")]
        try:
            async for ev in train(self.model, self.data, self.cfg, self.control, start_step=self.step,
                                  sampler=sampler, checkpoint=checkpoint):
                if ev["type"] != "paused":
                    self.history.append(ev)
                    if run is not None:
                        run.append_metrics(ev)
                if run is not None and ev["type"] == "eval" and ev["val_loss"] < best[0]:
                    best[0] = ev["val_loss"]
                    ev = {**ev, "best": True}
                    await run.save_best(self.model, ev["step"], ev["val_loss"])
                self.emit(ev)
                last = ev
        except TrainingError as e:
            # No checkpoint here: the weights that diverged would replace the last good ones.
            if run is None:
                raise
            if e.settings is not None and run.checkpoint_step() is None:   # diverged: start again, not resume
                err = TrainingError(f"{e.cause}. {run.checkpoint_note(e.settings, self.elsewhere)}")
            else:
                err = TrainingError(f"{e}. {run.checkpoint_note(elsewhere=self.elsewhere)}")
            run.append_metrics({"type": "error", "message": str(err)})
            raise err from e
        self.step = last["step"] if last else self.step
        self.best_val = best[0]
        return last

    async def use_best_weights(self):
        """Load best.safetensors (lowest validation loss) into the model, if it beats the last weights."""
        if self.run is None or not (self.run.path / "best.safetensors").is_file():
            return None
        params, step = self.run.read_model(self.cfg, best=True)
        self.model.load_params(params)
        return step

    # -- 5. sampling
    async def sample(self, prompt: str, max_new_tokens=200, temperature=0.8, top_k=None, top_p=None, seed=0,
                     stream=True, should_stop=None):
        from tabgpt.sample import generate
        if self.model is None:
            raise RunError("there is no model to sample from: train one (or load a run) first")
        pieces = []
        async for piece in generate(self.model, self.tokenizer, prompt, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                    should_stop=should_stop):
            pieces.append(piece)
            if stream:
                self.emit({"type": "token", "text": piece})
        return "".join(pieces)

    # -- 6. evaluation
    async def evaluate(self, text: str | None = None, samples: list[str] | None = None, max_tokens=None):
        from tabgpt.evaluate import evaluate
        if self.model is None:
            raise RunError("there is no model to evaluate: train one (or load a run) first")
        text = self.corpus.val_text if text is None else text
        return await evaluate(self.model, self.tokenizer, text, train_text=self.corpus.train_text if self.corpus
                              else None, train_tokens=self.data.train if self.data else None, samples=samples,
                              max_tokens=max_tokens)


def check_fits(dev, cfg: Config, fixed=()):
    """Refuse configurations beyond the GPU's limits with a message that says what to change; the flags of fixed
    (a model from --init-from: its width and vocabulary) are not offered."""
    limit = dev.limits["max-storage-buffer-binding-size"]
    C, Vp, B, T = cfg.n_embd, cfg.padded_vocab_size, cfg.batch_size, cfg.block_size
    biggest = {   # what one binding of a kernel holds at once, and the settings that size it
        "the logits (batch_size x block_size x padded vocab)": (4 * B * T * Vp,
                                                                  ["--batch-size", "--block-size", "--vocab-size"]),
        "the MLP activations (batch_size x block_size x 4 n_embd)": (4 * B * T * 4 * C,
                                                                       ["--batch-size", "--block-size", "--n-embd"]),
        "the token embedding (vocab x n_embd)": (4 * Vp * C, ["--vocab-size", "--n-embd"]),
        "each MLP weight (n_embd x 4 n_embd)": (4 * C * 4 * C, ["--n-embd"]),
    }
    for what, (nbytes, flags) in biggest.items():
        if nbytes > limit:
            flags = [f for f in flags if f not in fixed]
            advice = ("lower " + (", ".join(flags[:-1]) + " or " if len(flags) > 1 else "") + flags[-1] if flags
                      else "this model is too large for this GPU")
            raise RunError(f"{what} need {nbytes / 2**20:.0f} MiB in one binding, above this GPU's limit of "
                           f"{limit / 2**20:.0f} MiB: {advice}")


# ---------------------------------------------------------------------------------------------
# `tabgpt train`: the native front end of the pipeline (progress bar on stderr, JSONL metrics in the run folder).

FLAG_NAMES = ["n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "vocab_size",
              "learning_rate", "min_lr", "warmup_steps", "max_steps", "weight_decay", "grad_clip", "eval_interval",
              "eval_steps", "sample_interval", "checkpoint_interval", "seed", "time_limit"]


# what a resumed run cannot change: the shapes of the checkpoint's weights
RESUME_FIXED = ["n_layer", "n_head", "n_embd", "block_size", "vocab_size"]


def flag(name: str) -> str:
    """The train command's flag of a Config field: n_embd -> --n-embd."""
    return "--" + name.replace("_", "-")
# the settings a run started from a trained model (--init-from) takes unless they are given: nanoGPT fine-tunes
# GPT-2 at 3e-5; a preset's rate for training from scratch (1e-3 and above) would undo much of what it learned
FINETUNE = {"learning_rate": 6e-5, "min_lr": 6e-6}


def finetune_rates(learning_rate: float | None, min_lr: float | None) -> dict:
    """The rates of FINETUNE that were not given, kept consistent with the one that was (min_lr <= learning_rate):
    a given learning rate below 6e-5 decays to a tenth of it, a given min_lr above 6e-5 is also the rate."""
    if learning_rate is None and min_lr is None:
        return dict(FINETUNE)
    if learning_rate is None:
        return {"learning_rate": max(FINETUNE["learning_rate"], min_lr)}
    if min_lr is None:
        return {"min_lr": min(FINETUNE["min_lr"], learning_rate / 10)}
    return {}


def scaled_min_lr(learning_rate: float | None, min_lr: float | None, base: Config) -> dict:
    """min_lr for a learning rate given without min_lr that falls below base's min_lr (a preset's, or a resumed
    run's): base's ratio min_lr / learning_rate kept, so that the cosine still decays from the rate given."""
    if learning_rate is None or min_lr is not None or not 0 < learning_rate < base.min_lr:
        return {}
    return {"min_lr": float(f"{learning_rate * base.min_lr / base.learning_rate:.12g}")}


def _same_path(a, b) -> bool:
    try:
        return a is not None and Path(a).resolve() == Path(b).resolve()
    except (OSError, ValueError):
        return False


class ProgressPrinter:
    """One updating line on stderr for steps; evaluations, samples and checkpoints on lines of their own."""

    def __init__(self, quiet=False, stream=None):
        import sys
        self.quiet = quiet
        self.out = stream or sys.stderr
        self.max_steps = 0
        self.tty = self.out.isatty()
        self.last_print = 0.0

    def __call__(self, ev):
        t = ev.get("type")
        if self.quiet and t not in ("error", "done", "stopped"):
            return
        if t == "start":
            self.max_steps = ev["max_steps"]
            self._line(f"training {ev['n_params'] / 1e6:.2f} M parameters from step {ev['step']}, "
                       f"{ev['tokens_per_step']:,} tokens per step, {ev['train_tokens']:,} training tokens\n")
        elif t == "step":
            now = time.perf_counter()
            if not self.tty and now - self.last_print < 5 and ev["step"] != self.max_steps:
                return
            self.last_print = now
            frac = ev["step"] / max(1, self.max_steps)
            bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
            eta = ev.get("eta", 0)
            self._line(f"\r[{bar}] {ev['step']}/{self.max_steps} loss {ev['loss']:.4f} "
                       f"{ev['tokens_per_s']:,.0f} tok/s {ev['gflops']:.1f} GFLOP/s "
                       f"ETA {int(eta // 60)}:{int(eta % 60):02d}" + ("" if self.tty else "\n"))
        elif t == "eval":
            train = "" if ev.get("train_loss") is None else f" (train {ev['train_loss']:.4f})"
            self._line(f"\nstep {ev['step']}: validation loss {ev['val_loss']:.4f}{train}\n")
        elif t == "sample":
            self._line(f"\n--- sample at step {ev['step']} ---\n{ev['text']}\n---\n")
        elif t == "checkpoint" and ev.get("saved"):
            self._line(f"\ncheckpoint at step {ev['step']} -> {ev['path']} ({ev['seconds']:.1f} s)\n")
        elif t == "nan":
            self._line(f"\nwarning: {ev['message']}\n")
        elif t in ("done", "stopped"):
            self._line(f"\n{t} at step {ev['step']} after {ev['seconds']:.0f} s"
                       + (f" ({ev['reason']})" if ev.get("reason") else "") + "\n")
        elif t == "tokenizer_progress":
            if self.tty:
                self._line(f"\rtokenizer: {ev.get('stage', '')} {ev.get('done', 0)}/{ev.get('total', 0)}")
        elif t == "fetch" and ev.get("message"):
            self._line(f"{ev['message']}\n")

    def _line(self, s):
        self.out.write(s)
        self.out.flush()


def _same_tokenizer(path, run: RunFolder) -> bool:
    """Whether the tokenizer.json at path is the run's own (the same vocabulary and merges)."""
    from tabgpt import bpe
    try:
        given = bpe.Tokenizer.load(path)
    except OSError as e:
        raise RunError(f"cannot read --tokenizer {path}: {e.strerror or e}") from e
    except ValueError as e:   # (its message names the file and what it should be)
        raise RunError(str(e)) from e
    return given.to_json() == run.read_tokenizer().to_json()


def cli_train(args) -> int:
    import signal
    import sys
    from tabgpt import bpe, corpus as corpus_mod
    from tabgpt.config import preset
    from tabgpt.gpu import GPUError

    overrides = {name: getattr(args, name, None) for name in FLAG_NAMES}
    if not str(args.out or "").strip():
        print("error: --out needs the name of the run folder (it is created)", file=sys.stderr)
        return 1
    printer = ProgressPrinter(quiet=args.quiet)
    pipe = Pipeline(printer, run_dir=args.out)
    pipe.elsewhere = "into another --out"

    async def main():
        resume = init = tokenizer_event = None
        history = []          # a resumed run's metrics
        if args.resume:
            pipe.run.check(need_state=True)
            base = pipe.run.read_config()
            history = pipe.run.read_metrics()
            started = next((e for e in reversed(history) if e.get("type") == "init"), None)
            trained = next((e for e in reversed(history) if e.get("type") == "tokenizer"), {})
            if args.init_from is not None and not (started and _same_path(started.get("source"), args.init_from)):
                raise RunError(f"--init-from starts a new run from a trained model, --resume continues a run"
                               f"{' that started from ' + str(started.get('source')) if started else ''}: give one "
                               f"of them")
            # the run's own command again with --resume: sizes, preset and tokenizer that match the run are fine
            # (and the vocabulary size it asked for, where its tokenizer came out smaller)
            asked = {"vocab_size": {base.vocab_size, trained.get("vocab_requested", base.vocab_size)}}
            fixed = [flag(k) for k in RESUME_FIXED
                     if overrides.get(k) is not None and overrides[k] not in asked.get(k, {getattr(base, k)})]
            if args.preset is not None and started is None:   # (from --init-from, the preset set no sizes)
                sized = preset(args.preset, **{k: overrides[k] for k in RESUME_FIXED if overrides.get(k) is not None})
                if any(getattr(sized, k) != getattr(base, k) for k in RESUME_FIXED if k != "vocab_size"):
                    fixed.append("--preset")   # (its vocab_size is a request: the tokenizer trained may be smaller)
            if args.tokenizer is not None and not _same_tokenizer(args.tokenizer, pipe.run):
                fixed.append("--tokenizer")
            if fixed:
                raise RunError(f"{', '.join(fixed)} cannot change when resuming: the checkpoint in {pipe.run.path} "
                               f"was trained with {base.model_dict()}. Drop {'it' if len(fixed) == 1 else 'them'}, "
                               f"or train a new run into another --out")
            # the time limit is this session's, not the run's: it is not inherited from the last one
            tune = scaled_min_lr(overrides.get("learning_rate"), overrides.get("min_lr"), base)
            cfg = base.replace(time_limit=0.0).replace(**{k: v for k, v in {**overrides, **tune}.items()
                                                          if k not in RESUME_FIXED}).validate()
            step = pipe.run.checkpoint_step()   # (the header: the weights are read once, by build_model)
            if step is not None and cfg.max_steps <= step:
                raise RunError(f"{pipe.run.path} is already at step {step}: give --max-steps above {step} to train "
                               f"on (`tabgpt sample` and `tabgpt eval` use it as it is)")
            for k in FLAG_NAMES:
                if getattr(cfg, k) != getattr(base, k):
                    print(f"note: resuming with {k} {getattr(cfg, k)} (was {getattr(base, k)})", file=sys.stderr)
            resume = pipe.run
        elif args.init_from is not None:
            if args.tokenizer is not None:
                raise RunError(f"--tokenizer: a model trained from --init-from keeps its own tokenizer (the one in "
                               f"{args.init_from}); drop --tokenizer")
            pipe.run.check_new()   # before the weights are read
            sizes, init_tok, init_params, what = read_init(args.init_from, overrides.get("block_size"))
            clash = [flag(k) for k in RESUME_FIXED if k != "block_size" and
                     overrides.get(k) is not None and overrides[k] != sizes[k]]
            if clash:
                raise RunError(f"{', '.join(clash)}: the model in {args.init_from} has {sizes}; drop "
                               f"{'it' if len(clash) == 1 else 'them'} (its sizes are the model's)")
            init = (init_tok, init_params)
            tune = finetune_rates(overrides.get("learning_rate"), overrides.get("min_lr"))
            settings = {k: v for k, v in overrides.items() if k not in RESUME_FIXED}
            cfg = preset(args.preset or "tiny", **{**settings, **tune}).replace(**sizes).validate()
            print(f"init: {what}: {sizes['n_layer']} layers, {sizes['n_head']} heads, {sizes['n_embd']} wide, "
                  f"context {sizes['block_size']}, vocabulary {sizes['vocab_size']}" +
                  "".join(f"; {k} {v:g}" for k, v in tune.items()), file=sys.stderr)
        else:
            name = args.preset or "tiny"
            given = preset(name)
            tune = scaled_min_lr(overrides.get("learning_rate"), overrides.get("min_lr"), given)
            cfg = preset(name, **{**overrides, **tune})
            if tune:
                print(f"note: min_lr {cfg.min_lr:g}, {cfg.min_lr / cfg.learning_rate:g} x --learning-rate as in "
                      f"preset {name} (its min_lr {given.min_lr:g} is above the rate given); "
                      f"--min-lr sets another", file=sys.stderr)
            pipe.run.check_new()   # before any work: a path that a new run must not write into is refused now
        source = "default" if args.data == "default" else args.data
        info = await pipe.load_data(source)
        print(f"data: {pipe.corpus.summary()}", file=sys.stderr)
        for n in info["notices"]:
            print(f"note: {n}", file=sys.stderr)
        # the run's data, recorded in its metrics: a resume on other text says so (its validation loss is of that)
        data_event = {"type": "data", "source": source if source == "default" else str(source),
                      "sha256": hashlib.sha256(pipe.corpus.text.encode()).hexdigest(),
                      "summary": pipe.corpus.summary()}
        if resume is not None:
            earlier = [e for e in history if e.get("type") == "data"]
            if earlier and earlier[-1].get("sha256") != data_event["sha256"]:
                print(f"note: this run was trained on {earlier[-1].get('source')} ({earlier[-1].get('summary')}); it "
                      f"goes on with other text, so its losses from here are of that", file=sys.stderr)
            tok = pipe.run.read_tokenizer()
            check_tokenizer_matches(tok, cfg, str(pipe.run.path / "tokenizer.json"))
            pipe.use_tokenizer(tok)
        elif init is not None:
            pipe.use_tokenizer(init[0])
        elif args.tokenizer:
            try:
                tok = bpe.Tokenizer.load(args.tokenizer)
            except OSError as e:
                raise RunError(f"cannot read --tokenizer {args.tokenizer}: {e.strerror or e}; make one with "
                               f"`tabgpt tokenizer`, or leave --tokenizer out to train one") from e
            if args.vocab_size is None:
                cfg = cfg.replace(vocab_size=tok.vocab_size)
            elif args.vocab_size != tok.vocab_size:
                raise RunError(f"--tokenizer {args.tokenizer} has {tok.vocab_size} tokens but --vocab-size says "
                               f"{args.vocab_size}: drop --vocab-size (the tokenizer sets it)")
            check_tokenizer_matches(tok, cfg, args.tokenizer)
            pipe.use_tokenizer(tok)
        else:
            r = await pipe.train_tokenizer(cfg.vocab_size)
            # what was asked for: `--resume` takes it again where the text gave fewer tokens
            tokenizer_event = {"type": "tokenizer", "vocab_requested": cfg.vocab_size, "vocab_size": r["vocab_size"]}
            print(f"\ntokenizer: {r['vocab_size']} tokens in {r['seconds']:.1f} s, "
                  f"{r['bytes_per_token']:.2f} bytes/token", file=sys.stderr)
        # (checks the data's size and the GPU's limits)
        m = await pipe.build_model(cfg, resume_from=resume, init_params=init[1] if init else None)
        if resume is None:   # the folder is written only once the run can start
            pipe.run.create(pipe.cfg, pipe.tokenizer.to_json())
        pipe.run.append_metrics(data_event)
        if tokenizer_event:
            pipe.run.append_metrics(tokenizer_event)
        if init is not None:
            pipe.run.append_metrics({"type": "init", "source": str(Path(args.init_from).resolve()), "what": what})
        print(f"model: {m['n_params'] / 1e6:.2f} M parameters, {m['gpu_bytes'] / 2**20:.0f} MiB on "
              f"{pipe.dev.info.get('device') or pipe.dev.info.get('vendor')}, {m['kernels']} kernels compiled in "
              f"{m['compile_seconds']:.1f} s" + (f", resuming at step {m['step']}" if resume else ""),
              file=sys.stderr)
        if m["autotuned"]:
            from tabgpt.ops.matmul import tune_file
            print(f"autotuned {len(m['autotuned'])} matrix product shapes for this adapter (remembered in "
                  f"{tune_file()}):", file=sys.stderr)
            for line in m["autotuned"]:
                print(f"  {line}", file=sys.stderr)
        pipe.run.write_config(pipe.cfg)

        signalled = []   # the signal that stopped training: the exit status says so (130 or 143, as a shell's)

        def on_signal(signum, _frame):
            what = "Ctrl+C" if signum == signal.SIGINT else signal.Signals(signum).name
            signalled.append(signum)
            pipe.control.request_stop(f"interrupted ({what}); a checkpoint is being written")

        # while training, Ctrl+C (and a plain kill, SIGTERM) stop at the next step with a checkpoint
        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            last = await pipe.train()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
        interrupted = signalled[0] if signalled and last and last["type"] == "stopped" else None
        if interrupted is not None:
            import shlex
            print(f"\ninterrupted at step {pipe.step}; its checkpoint is in {pipe.run.path}: go on with `tabgpt train "
                  f"--data {shlex.quote(str(args.data))} --resume --out {shlex.quote(str(args.out))}`", file=sys.stderr)
        best_step = await pipe.use_best_weights()
        if best_step is not None:
            print(f"\nsampling and evaluating the best weights (step {best_step}, validation loss "
                  f"{pipe.best_val:.4f})", file=sys.stderr)
        if interrupted is not None:    # the handlers are back: a second signal ends the process here
            print("(samples and a held-out evaluation follow; a second Ctrl+C or kill skips them: the checkpoint "
                  "is saved)", file=sys.stderr)
        samples = []
        for seed in range(3):
            samples.append(await pipe.sample("\n", max_new_tokens=120, temperature=0.8, top_k=50, seed=seed,
                                             stream=False))
        for i, s in enumerate(samples):
            print(f"\n--- sample {i + 1} ---\n{s}")
        ev = await pipe.evaluate(samples=samples, max_tokens=200_000)
        pipe.run.append_metrics({"type": "final_eval", "step": pipe.step, **ev})
        b = ev["baselines"]
        print(f"\nheld-out: loss {ev['val_loss']:.4f}, perplexity {ev['perplexity']:.1f}, "
              f"{ev['bits_per_byte']:.3f} bits/byte (gzip {b['gzip']:.3f}, bz2 {b['bz2']:.3f}, "
              f"lzma {b['lzma']:.3f}), top-1 {100 * ev['top1']:.1f}%, real words "
              f"{100 * ev.get('real_word_share', 0):.1f}%")
        print(f"run folder: {pipe.run.path}")
        if interrupted is not None:
            return 128 + interrupted
        return 0 if last and last["type"] in ("done", "stopped") else 1

    try:
        return tabgpt.run_main(main())
    except (RunError, TrainingError, GPUError, ValueError, corpus_mod.CorpusError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    except OSError as e:   # the run folder cannot be written: read-only, or the disk is full
        print(f"\nerror: cannot write to {e.filename or args.out}: {e.strerror or e}. Free some space or choose "
              f"a writable --out; the checkpoints saved before are as they were", file=sys.stderr)
        return 1
