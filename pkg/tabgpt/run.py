"""The run folder and the steps that fill it, shared by the CLI and the page.

RUN_DIR/
    config.json         the model's sizes (n_layer, n_head, n_embd, block_size, vocab_size, ...) and the
                        training settings; Hugging Face GPT-2 keys too (n_positions, n_ctx, model_type), so that
                        transformers.GPT2LMHeadModel.from_pretrained(RUN_DIR) loads model.safetensors
    tokenizer.json      the BPE tokenizer (Hugging Face format)
    model.safetensors   the weights, Hugging Face GPT-2 names and shapes (wte has vocab_size rows; on the GPU it is
                        padded to a multiple of 64 rows, which are zero and never used)
    state.safetensors   AdamW moments, and in its metadata the step, the seed and the data position
    metrics.jsonl       one JSON event per line: steps, evaluations, samples, checkpoints

Every file is written atomically (temp file + rename), so an interrupted save never loses the previous one.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tabgpt.config import Config
from tabgpt.safetensors import CheckpointError, atomic_write
from tabgpt import safetensors as st

FORMAT = "tabgpt-run-1"
# the files a run folder may hold (and atomic_write's temporary files, .NAME.*.tmp)
RUN_FILES = ("config.json", "tokenizer.json", "model.safetensors", "state.safetensors", "best.safetensors",
             "metrics.jsonl", "source.json")


class RunError(Exception):
    """A run folder is missing, incomplete, corrupt or does not match; the message says what to do."""


def is_run_folder(folder) -> bool:
    """Whether folder holds the config.json of a tabgpt run (what `tabgpt train` writes when a run starts)."""
    try:
        d = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("format") == FORMAT


def json_safe(value):
    """value with every float that is not finite (a NaN loss) as None: JSON has no NaN, and JSON.parse refuses it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def hf_config(cfg: Config) -> dict:
    """config.json: our names plus the keys transformers' GPT2Config reads."""
    return {
        "format": FORMAT,
        **cfg.to_dict(),
        "padded_vocab_size": cfg.padded_vocab_size,
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "tie_word_embeddings": True,
        "bos_token_id": cfg.vocab_size - 1, "eos_token_id": cfg.vocab_size - 1,
    }


class RunFolder:
    def __init__(self, path):
        self.path = Path(path)

    # -- writing
    def check_new(self):
        """Refuse a path that a new run must not write into: a file, a run that holds a model (--resume continues
        it), or a folder of other files. A folder left by a run that failed before its first save is reused."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"--out {self.path} is a file, not a run folder: choose a folder (it is created)")
        if (self.path / "model.safetensors").exists():
            if not (self.path / "state.safetensors").exists():
                raise RunError(f"{self.path} holds model.safetensors without state.safetensors (a save was cut "
                               f"short, or the disk was full): `tabgpt sample` and `tabgpt eval` still use it, but "
                               f"training cannot resume it; for a new run choose another --out")
            raise RunError(f"{self.path} already holds a trained model: pass --resume to continue it, or choose "
                           f"another --out")
        if not self.path.is_dir():
            return
        if (self.path / "best.safetensors").exists():
            raise RunError(f"{self.path} holds best.safetensors of a run that stopped before its first checkpoint: "
                           f"`tabgpt sample` and `tabgpt eval` use it; for a new run choose another --out (or delete "
                           f"{self.path}; `--init-from {self.path}` starts the new run from those weights)")
        names = sorted(p.name for p in self.path.iterdir())
        if not names:
            return
        foreign = [n for n in names if n not in RUN_FILES and not (n.startswith(".") and n.endswith(".tmp"))]
        if foreign or not is_run_folder(self.path):
            shown = ", ".join((foreign or names)[:5]) + (" ..." if len(foreign or names) > 5 else "")
            raise RunError(f"--out {self.path} already holds files that are not a tabgpt run ({shown}): choose a "
                           f"new or empty folder, so that nothing in it is overwritten")

    def create(self, cfg: Config, tokenizer_json: str, overwrite: bool = False):
        """config.json and tokenizer.json of a new run, and an empty metrics.jsonl (overwrite: no checks)."""
        if not overwrite:
            self.check_new()
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_config(cfg)
        atomic_write(self.path / "tokenizer.json", tokenizer_json.encode())
        atomic_write(self.path / "metrics.jsonl", b"")

    def write_config(self, cfg: Config):
        atomic_write(self.path / "config.json", json.dumps(hf_config(cfg), indent=1).encode())

    def best_val_loss(self) -> float:
        """The validation loss of best.safetensors, so that a resumed run only replaces it with better weights."""
        path = self.path / "best.safetensors"
        if not path.is_file():
            return float("inf")
        try:
            _, meta = st.load_header(path)
            return float((meta or {}).get("val_loss", "inf"))
        except (CheckpointError, ValueError):
            return float("inf")

    @staticmethod
    async def _weights(model, meta: dict) -> bytes:
        """The model's weights as a safetensors file (get_params gives wte with vocab_size rows, as Hugging Face
        expects)."""
        params = await model.get_params()
        tensors = {name: ("F32", tuple(shape), data) for name, (shape, data) in params.items()}
        return bytes(st.save(None, tensors, {"format": FORMAT, **meta}))

    async def save_best(self, model, step: int, val_loss: float) -> dict:
        """best.safetensors: the weights with the lowest validation loss so far (early stopping without
        stopping: training goes on, sampling and evaluation use these weights)."""
        data = await self._weights(model, {"step": str(step), "val_loss": repr(val_loss)})
        atomic_write(self.path / "best.safetensors", data)
        return {"step": step, "val_loss": val_loss}

    async def save_checkpoint(self, model, step: int, extra: dict | None = None) -> dict:
        t0 = time.perf_counter()
        model_bytes = await self._weights(model, {"step": str(step)})
        state = await model.get_state()
        state_tensors = {name: ("F32", (len(data) // 4,), data) for name, data in state.items()}
        smeta = {"format": FORMAT, "step": str(step), "seed": str(model.cfg.seed),
                 "data_position": "batches are a pure function of (seed, step)", **(extra or {})}
        state_bytes = st.save(None, state_tensors, smeta)
        # model first, state second: a crash between the two leaves a state older than the model, which
        # read_resume() detects by comparing their steps.
        atomic_write(self.path / "model.safetensors", model_bytes)
        atomic_write(self.path / "state.safetensors", bytes(state_bytes))
        return {"path": str(self.path), "bytes": len(model_bytes) + len(state_bytes),
                "seconds": time.perf_counter() - t0}

    def append_metrics(self, event: dict):
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(json_safe(event)) + "\n")

    # -- reading
    def checkpoint_step(self) -> int | None:
        """The step of model.safetensors from its header alone, or None where there is none (or it is unreadable)."""
        try:
            _, meta = st.load_header(self.path / "model.safetensors")
            return int((meta or {}).get("step", 0))
        except (CheckpointError, OSError, ValueError):
            return None

    def checkpoint_note(self, settings: str | None = None, elsewhere: str | None = None) -> str:
        """Where training can go on from: the last checkpoint's step, or that there is none yet and the run starts
        again (with settings: what to change, such as a lower learning rate; elsewhere: where a new run goes while
        this folder keeps its best.safetensors, such as "into another --out")."""
        step = self.checkpoint_step()
        if step is not None:
            return (f"The last checkpoint, step {step}, is untouched in {self.path} (a run saves at its end and every "
                    f"checkpoint interval)")
        note = (f"No checkpoint had been saved in {self.path} yet (a run saves at its end and every checkpoint "
                f"interval), so there is nothing to resume: start the run again"
                + (f" with {settings}" if settings else ""))
        if elsewhere and (self.path / "best.safetensors").is_file():
            note += (f" {elsewhere} ({self.path} keeps this run's best weights, best.safetensors, for sampling and "
                     f"evaluation; or delete {self.path} first)")
        return note

    def check(self, need_state: bool = False):
        """Refuse a folder that sampling and evaluation (need_state: resuming training) cannot use, saying what to
        do. Sampling and evaluation take best.safetensors where model.safetensors is missing (a run that stopped
        before its first checkpoint)."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"{self.path} is a file, not a run folder: give the folder that `tabgpt train --out` made")
        if not self.path.is_dir():
            raise RunError(f"run folder {self.path} does not exist: train one with `tabgpt train --out {self.path}`")

        def has(name):
            return (self.path / name).is_file()
        weights = [n for n in ("model.safetensors", "best.safetensors") if has(n)]
        need = ["config.json", "tokenizer.json", weights[0] if weights and not need_state else "model.safetensors"]
        missing = [n for n in need + (["state.safetensors"] if need_state else []) if not has(n)]
        if not missing:
            return
        try:
            self.check_new()
            fresh = True                  # a new run may start here: a run that never saved, or an empty folder
        except RunError:
            fresh = False
        if weights and ("config.json" in missing or "tokenizer.json" in missing):
            advice = ("put back the run's own config.json and tokenizer.json (a run writes them when it starts), or "
                      "train a new run into another --out")
        elif fresh:
            advice = (f"no weights were saved in it yet (a run saves at its end and every --checkpoint-interval "
                      f"steps): train with `tabgpt train --out {self.path}`")
        elif weights:                     # (resuming) weights to sample, but no checkpoint to train on from
            why = ("a save was cut short, or the disk was full" if weights[0] == "model.safetensors" else
                   "the run stopped before its first checkpoint (a run saves at its end and every "
                   "--checkpoint-interval steps)")
            advice = (f"{why}. `tabgpt sample` and `tabgpt eval` use its {weights[0]}, but training cannot resume "
                      f"without model.safetensors and state.safetensors: start a new run from those weights with "
                      f"`--init-from {self.path}` and another --out, or from scratch into another --out")
        else:
            advice = "give the folder that `tabgpt train --out` made"
        raise RunError(f"run folder {self.path} is incomplete: {', '.join(missing)} missing; {advice}")

    def read_config(self) -> Config:
        try:
            d = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise RunError(f"{self.path / 'config.json'} is unreadable ({e}); restore it or retrain") from e
        if not isinstance(d, dict):
            raise RunError(f"{self.path / 'config.json'} holds a JSON {type(d).__name__}, not a run's settings (an "
                           f"object); restore it or retrain")
        try:
            return Config.from_dict(d).validate()
        except ValueError as e:
            raise RunError(f"{self.path / 'config.json'}: {e}; restore it or retrain") from e

    def read_tokenizer(self):
        from tabgpt.bpe import Tokenizer
        try:
            return Tokenizer.from_json((self.path / "tokenizer.json").read_text())
        except Exception as e:
            raise RunError(f"{self.path / 'tokenizer.json'} is not a valid tokenizer ({e})") from e

    def read_model(self, cfg: Config, best: bool = False) -> tuple[dict, int]:
        """The weights of model.safetensors (the last step, matching state.safetensors), or with best=True those
        of best.safetensors when it exists (lowest validation loss)."""
        path = self.path / "model.safetensors"
        if best and (self.path / "best.safetensors").is_file():
            path = self.path / "best.safetensors"
        try:
            tensors, meta = st.load(path)
        except CheckpointError as e:
            if path.name == "best.safetensors" and (self.path / "model.safetensors").is_file():
                raise RunError(f"{e}. The last step's weights in model.safetensors are separate: delete "
                               f"{path} to sample and evaluate with those") from e
            raise RunError(str(e)) from e
        from tabgpt.gpt import parameter_specs
        specs, _ = parameter_specs(cfg)
        # config.json edited, or one of the two copied from another run: the weights are checked against the
        # model config.json describes before anything else (the optimizer state, the GPU) is
        unlike = (f"config.json and {path.name} in {self.path} are not of the same model (config.json edited, or "
                  f"one of them copied from another run): put back the run's own config.json, whose sizes "
                  f"{path.name} was trained with")
        extra = sorted(set(tensors) - {spec.name for spec in specs})
        if extra:
            raise RunError(f"{path} holds tensors that the model of config.json ({cfg.model_dict()}) does not have "
                           f"({', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}): {unlike}")
        out = {}
        for spec in specs:
            if spec.name not in tensors:
                raise RunError(f"{path} has no tensor {spec.name}, which the model of config.json "
                               f"({cfg.model_dict()}) has: {unlike}")
            dtype, shape, data = tensors[spec.name]
            want = stored_shape(spec, cfg)
            if dtype != "F32":
                raise RunError(f"{path}: {spec.name} is {dtype}; a run's weights are F32: put back the run's own "
                               f"{path.name}")
            if tuple(shape) != want:
                raise RunError(f"{path}: {spec.name} is {list(shape)}, config.json needs {list(want)}: {unlike}")
            out[spec.name] = (want, data)  # GPT.load_params zeroes wte's padding rows
        return out, int((meta or {}).get("step", 0))

    def read_state(self) -> tuple[dict, dict]:
        path = self.path / "state.safetensors"
        try:
            tensors, meta = st.load(path)
        except CheckpointError as e:
            raise RunError(str(e)) from e
        return {k: v[2] for k, v in tensors.items()}, meta or {}

    def read_resume(self, cfg: Config) -> tuple[dict, dict, int]:
        """(weights, optimizer state, step) of the last checkpoint, checked to be of the same step."""
        params, step = self.read_model(cfg)
        state, meta = self.read_state()
        if int(meta.get("step", -1)) != step:
            raise RunError(f"{self.path}: model.safetensors (step {step}) and state.safetensors "
                           f"(step {meta.get('step')}) are of different steps: a save was cut short, or one was copied "
                           f"from another run. The model alone still samples and evaluates; training resumes only "
                           f"from a matching pair")
        return params, state, step

    def read_metrics(self) -> list[dict]:
        p = self.path / "metrics.jsonl"
        if not p.exists():
            return []
        out = []
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line cut by a crash: the events before it still count
        return out


# ---------------------------------------------------------------------------------------------
# `tabgpt train --init-from FOLDER`: a trained model to start from (fine-tuning), ours or Hugging Face GPT-2's

MODEL_SIZES = ("n_layer", "n_head", "n_embd", "vocab_size")
INIT_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def stored_shape(spec, cfg: Config, positions: int | None = None) -> tuple:
    """The shape a checkpoint holds spec's tensor in: wte without the GPU's padding rows (vocab_size rows), wpe with
    `positions` rows (None: block_size)."""
    if spec.name == "transformer.wte.weight":
        return (cfg.vocab_size, cfg.n_embd)
    if spec.name == "transformer.wpe.weight" and positions is not None:
        return (positions, cfg.n_embd)
    return tuple(spec.shape)


def read_init(path, block_size: int | None = None) -> tuple[dict, object, dict, str]:
    """A trained GPT-2 to start a new run from: a tabgpt run folder (its best weights) or a Hugging Face GPT-2
    folder as `save_pretrained` writes it (config.json, model.safetensors with or without the "transformer."
    prefix, tokenizer.json). Returns (sizes: n_layer, n_head, n_embd, vocab_size and block_size, the tokenizer,
    the weights for GPT.load_params, what it is). block_size (None: the model's context) may be shorter than the
    context it was trained with: the position embeddings are cut to it."""
    from tabgpt.bpe import Tokenizer
    from tabgpt.gpt import parameter_specs
    folder = Path(path)
    hint = ("give a tabgpt run folder or a Hugging Face GPT-2 folder (config.json, model.safetensors and "
            "tokenizer.json, as save_pretrained writes them)")
    if not folder.is_dir():
        raise RunError(f"--init-from {folder}: {'not a folder' if folder.exists() else 'no such folder'}; {hint}")
    missing = [n for n in INIT_FILES if not (folder / n).is_file()]
    if missing == ["model.safetensors"] and (folder / "best.safetensors").is_file():
        missing = []                       # a run stopped before its first checkpoint: its best weights
    if missing:
        extra = ""
        if "model.safetensors" in missing and (folder / "model.safetensors.index.json").is_file():
            extra = (" (weights in shards are not read: save them as one file, "
                     "save_pretrained(..., max_shard_size=\"10GB\"))")
        elif "model.safetensors" in missing and (folder / "pytorch_model.bin").is_file():
            extra = (" (only safetensors weights are read: save the model with transformers' save_pretrained, "
                     "which writes model.safetensors)")
        raise RunError(f"--init-from {folder}: {', '.join(missing)} missing{extra}; {hint}")
    try:
        d = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"--init-from {folder}: config.json is unreadable ({e})") from e
    if not isinstance(d, dict):
        raise RunError(f"--init-from {folder}: config.json holds no object; {hint}")
    weights = folder / "model.safetensors"
    if d.get("format") == FORMAT:          # one of our runs: its best weights, as sampling uses
        run = RunFolder(folder)
        cfg = run.read_config()
        context = cfg.block_size
        sizes = {k: getattr(cfg, k) for k in MODEL_SIZES}
        if (folder / "best.safetensors").is_file() or not weights.is_file():
            weights = folder / "best.safetensors"
        what = f"the tabgpt run {folder} ({weights.name})"
    else:
        if d.get("model_type") != "gpt2":
            raise RunError(f"--init-from {folder}: config.json describes a {d.get('model_type')!r} model; only GPT-2 "
                           f"(model_type gpt2) has the architecture trained here")
        unlike = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "layer_norm_epsilon": (1e-5,),
                  "n_inner": (None,), "tie_word_embeddings": (True,), "scale_attn_weights": (True,),
                  "scale_attn_by_inverse_layer_idx": (False,), "add_cross_attention": (False,)}
        for key, allowed in unlike.items():
            if key in d and d[key] not in allowed and not (key == "n_inner" and d[key] == 4 * d.get("n_embd", 0)):
                raise RunError(f"--init-from {folder}: config.json has {key} {d[key]!r}; the GPT-2 trained here has "
                               f"{allowed[0]!r}")
        try:
            sizes = {k: int(d[k]) for k in MODEL_SIZES}
            context = int(d.get("n_positions", d.get("n_ctx")))
        except (KeyError, TypeError, ValueError) as e:
            raise RunError(f"--init-from {folder}: config.json lacks GPT-2's sizes (n_layer, n_head, n_embd, "
                           f"vocab_size, n_positions): {e}") from e
        what = f"the Hugging Face GPT-2 model in {folder}"
    block = context if block_size is None else block_size
    if not 1 <= block <= context:
        raise RunError(f"--block-size {block}: the model in {folder} has position embeddings for {context} "
                       f"positions; give at most {context} (or leave --block-size out)")
    sizes["block_size"] = block
    try:
        cfg = Config(**sizes).validate()
    except (TypeError, ValueError) as e:
        raise RunError(f"--init-from {folder}: its sizes {sizes} are not a model trained here ({e})") from e
    try:
        tok = Tokenizer.from_json((folder / "tokenizer.json").read_text())
    except Exception as e:
        raise RunError(f"--init-from {folder}: tokenizer.json is not a byte-level BPE tokenizer ({e})") from e
    if tok.vocab_size != cfg.vocab_size:
        raise RunError(f"--init-from {folder}: tokenizer.json has {tok.vocab_size} tokens, config.json says "
                       f"vocab_size {cfg.vocab_size}: they must be of the same model")
    try:
        tensors, _ = st.load(weights)
    except CheckpointError as e:
        raise RunError(f"--init-from: {e}") from e
    except OSError as e:
        raise RunError(f"--init-from: cannot read {weights}: {e.strerror or e}") from e
    named = {}
    for name, t in tensors.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue                       # older transformers' causal-mask buffers, not weights
        named[name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name] = t
    specs, _ = parameter_specs(cfg)
    out = {}
    for spec in specs:
        if spec.name not in named:
            short = spec.name.removeprefix("transformer.")
            raise RunError(f"--init-from {weights}: no tensor {spec.name} (or {short})")
        dtype, shape, data = named.pop(spec.name)
        want = stored_shape(spec, cfg, positions=context)
        if dtype != "F32":
            raise RunError(f"--init-from {weights}: {spec.name} is {dtype}; only F32 weights are read (save the "
                           f"model in float32: model.float().save_pretrained(...))")
        if tuple(shape) != want:
            raise RunError(f"--init-from {weights}: {spec.name} is {list(shape)}, config.json's sizes need "
                           f"{list(want)}")
        if spec.name == "transformer.wpe.weight":
            data, want = data[:4 * block * cfg.n_embd], (block, cfg.n_embd)   # the first block positions
        out[spec.name] = (want, data)
    head = named.pop("lm_head.weight", None)
    if head is not None and bytes(head[2]) != bytes(out["transformer.wte.weight"][1]):
        raise RunError(f"--init-from {weights}: lm_head.weight differs from transformer.wte.weight; the GPT-2 "
                       f"trained here ties them")
    if named:
        raise RunError(f"--init-from {weights}: tensors that no GPT-2 of these sizes has: "
                       f"{', '.join(sorted(named)[:3])}")
    return sizes, tok, out, what


def check_tokenizer_matches(tokenizer, cfg: Config, where: str):
    if tokenizer.vocab_size != cfg.vocab_size:
        raise RunError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model expects "
                       f"{cfg.vocab_size}; use the tokenizer.json of the same run")


async def load_model(dev, run: RunFolder, B: int = 1, T: int | None = None):
    """(cfg, tokenizer, model, step) from a run folder for sampling and evaluation: the best weights (lowest
    validation loss) on the GPU. Resuming training goes through RunFolder.read_resume instead."""
    from tabgpt.gpt import GPT
    run.check()
    cfg = run.read_config()
    tok = run.read_tokenizer()
    check_tokenizer_matches(tok, cfg, str(run.path / "tokenizer.json"))
    params, step = run.read_model(cfg, best=True)
    model = await GPT.create(dev, cfg, B=B, T=T or cfg.block_size)
    model.load_params(params)
    return cfg, tok, model, step
