"""Browser glue: what the page's Web Worker calls inside Pyodide.

The worker (site/js/tabgpt-worker.js) loads Pyodide, installs this wheel with micropip and then runs small
Python snippets such as ``await tabgpt.web.check()``. Long jobs report progress with ``post(event)``, which
becomes a ``message`` event on the page; the page only displays events. Every function returns JSON text.

The run folder lives in Pyodide's in-memory file system at /run and is mirrored into the browser's origin
private file system (OPFS, folder "tabgpt-run") at every checkpoint, so a reload can resume the run.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
import zipfile

from tabgpt import IN_BROWSER, __version__, opfs
from tabgpt.run import RUN_FILES   # the files of a run folder: saved in OPFS, downloaded and loaded whole

RUN_DIR = "/run" if IN_BROWSER else os.path.join(os.environ.get("TMPDIR", "/tmp"), "tabgpt-web-run")
OPFS_FOLDER = "tabgpt-run"

_pipe = None
_source = None


def _dumps(value) -> str:
    """JSON for the page: floats that are not finite become null (JSON.parse refuses NaN and Infinity)."""
    from tabgpt.run import json_safe
    return json.dumps(json_safe(value))


def post(event: dict) -> None:
    """Send one event (a JSON-able dict) to the page; natively it is printed, which helps when testing."""
    if IN_BROWSER:
        import js
        js.postMessage(_dumps({"type": "event", **event} if "type" not in event else event))
    else:  # pragma: no cover - only used when running page code natively
        print(json.dumps(event))


def _pipeline():
    global _pipe
    if _pipe is None:
        from tabgpt.pipeline import Pipeline
        _pipe = Pipeline(post, run_dir=RUN_DIR)
    return _pipe


async def check() -> str:
    """The WebGPU check page: adapter, features, limits, kernel self-test and dispatch cost, as JSON."""
    from tabgpt import gpu, selftest
    out = {"version": __version__, "backend": None}
    t0 = time.perf_counter()
    try:
        dev = await gpu.open_device()
    except gpu.GPUError as e:
        out["error"] = str(e)
        return _dumps(out)
    out["backend"] = dev.backend
    out["info"] = dev.info
    out["features"] = sorted(dev.features)
    out["subgroup_ops"] = dev.has_subgroup_ops()
    out["subgroup_reductions"] = dev.subgroup_reductions()
    out["limits"] = dev.limits
    post({"type": "status", "message": "running the kernel self-test"})
    out["selftest"] = await selftest.run_selftest(dev)
    post({"type": "status", "message": "measuring the cost of a replayed dispatch"})
    out["dispatch"] = await selftest.dispatch_cost(dev, n=1000, reps=3)
    out["seconds"] = time.perf_counter() - t0
    return _dumps(out)


async def speed(preset_name: str = "browser", seconds: float = 10.0) -> str:
    """The check page's "Measure speed": the trainer's matrix product at growing square sizes and `seconds` of
    training at a preset (tabgpt.speed), as JSON."""
    from tabgpt import gpu
    from tabgpt import speed as sp
    from tabgpt.config import PRESETS
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}: give one of {', '.join(PRESETS)}")
    dev = await gpu.open_device()

    def status(message):
        post({"type": "status", "message": message})
    t0 = time.perf_counter()
    matmul = await sp.matmul_speed(dev, post=status)
    train = await sp.train_speed(dev, preset_name, float(seconds), post=status)
    return _dumps({"matmul": matmul, "train": train, "seconds": time.perf_counter() - t0})


# ---------------------------------------------------------------------------------------------
# The demo's stages.

async def open_session() -> str:
    from tabgpt import gpu
    from tabgpt.config import PRESETS, preset
    from tabgpt.pipeline import check_fits
    pipe = _pipeline()
    pipe.dev = await gpu.open_device()
    presets = {}
    for name in PRESETS:
        cfg = preset(name)
        try:
            check_fits(pipe.dev, cfg)
            fits = True
        except Exception:
            fits = False
        presets[name] = {**cfg.model_dict(), "max_steps": cfg.max_steps, "n_params": cfg.n_params(), "fits": fits,
                         "gpu_bytes": cfg.gpu_bytes_estimate(pipe.dev.limits["max-buffer-size"]),
                         "batch_size": cfg.batch_size}
    info = pipe.dev.info
    fallback = gpu.is_cpu_adapter(pipe.dev)    # a CPU driver: the tiny preset proposed
    saved = await _saved_run_info()
    name = (info.get("description") or info.get("device")
            or " ".join(x for x in (info.get("vendor"), info.get("architecture")) if x) or "unknown")
    return _dumps({"adapter": name,
                       "info": info, "fallback": fallback, "presets": presets,
                       "default_preset": "tiny" if fallback else "browser", "saved": saved})


async def load_data(source) -> str:
    global _source
    if isinstance(source, dict) and "upload" in source:
        # A file the visitor picked: its bytes go through the file path, so encoding detection applies.
        up = source["upload"]
        os.makedirs("/tmp/uploads", exist_ok=True)
        name = os.path.basename(up.get("name") or "upload.txt") or "upload.txt"
        path = os.path.join("/tmp/uploads", name)
        with open(path, "wb") as f:
            f.write(base64.b64decode(up["b64"]))
        source = {"file": path}
    r = await _pipeline().load_data(source)
    _source = source
    return _dumps(r)


async def train_tokenizer(vocab_size: int) -> str:
    return _dumps(await _pipeline().train_tokenizer(int(vocab_size)))


async def build_model(options: dict) -> str:
    from tabgpt.config import preset
    pipe = _pipeline()
    options = dict(options)
    cfg = preset(options.pop("preset", "tiny"), **options)
    r = await pipe.build_model(cfg)
    pipe.last_samples = []   # the evaluation's word statistics are of this model's samples
    os.makedirs(RUN_DIR, exist_ok=True)
    # The last run's weights go (its copy in OPFS stays until this run's first checkpoint): a new run's best must
    # not be judged against the old one's, nor a download mix the two.
    for name in ("model.safetensors", "state.safetensors", "best.safetensors"):
        path = os.path.join(RUN_DIR, name)
        if os.path.exists(path):
            os.remove(path)
    pipe.run.create(pipe.cfg, pipe.tokenizer.to_json(), overwrite=True)   # (and an empty metrics.jsonl)
    _write_source()
    return _dumps(r)


async def train() -> str:
    pipe = _pipeline()
    original = pipe.run.save_checkpoint

    async def save_and_mirror(model, step, extra=None):
        info = await original(model, step, extra)
        await _mirror_to_opfs()
        return info

    pipe.run.save_checkpoint = save_and_mirror
    cfg = pipe.cfg
    # The page shows progress: a few validation points, samples and checkpoints along any run length.
    cfg.eval_interval = max(1, min(cfg.eval_interval or cfg.max_steps, cfg.max_steps // 4 or 1))
    if not cfg.sample_interval:
        cfg.sample_interval = max(1, cfg.max_steps // 3)
    if not cfg.checkpoint_interval:
        cfg.checkpoint_interval = cfg.eval_interval
    try:
        last = await pipe.train(sample_prompt="\n")
    finally:
        pipe.run.save_checkpoint = original
    sample = next((e["text"] for e in reversed(pipe.history) if e["type"] == "sample"), None)
    return _dumps({**last, "sample": sample})


def toggle_pause() -> str:
    c = _pipeline().control
    c.pause = not c.pause
    return _dumps(c.pause)


def request_stop() -> str:
    _pipeline().control.request_stop("stopped by the user")
    return _dumps(True)


async def sample(options: dict) -> str:
    pipe = _pipeline()
    t0 = time.perf_counter()
    n = [0]
    emit = pipe.emit

    def counting(ev):
        n[0] += ev.get("type") == "token"
        emit(ev)

    pipe.emit = counting
    from tabgpt.train import Control
    pipe.control = Control()   # the page's Stop ends the generation
    try:
        text = await pipe.sample(options.get("prompt", ""), max_new_tokens=int(options.get("max_new_tokens", 200)),
                                 temperature=float(options.get("temperature", 0.8)), top_k=options.get("top_k"),
                                 top_p=options.get("top_p"), seed=int(options.get("seed", 0)),
                                 should_stop=lambda: pipe.control.stop)
    finally:
        pipe.emit = emit
    pipe.last_samples = getattr(pipe, "last_samples", [])[-4:] + [text]
    dt = time.perf_counter() - t0
    return _dumps({"text": options.get("prompt", "") + text, "tokens": n[0], "tokens_per_s": n[0] / max(dt, 1e-9)})


async def evaluate() -> str:
    pipe = _pipeline()
    samples = getattr(pipe, "last_samples", None)
    if not samples:
        samples = [await pipe.sample("\n", max_new_tokens=100, temperature=0.8, top_k=50, seed=s, stream=False)
                   for s in range(2)]
    r = await pipe.evaluate(samples=samples, max_tokens=50_000)
    pipe.run.append_metrics({"type": "final_eval", "step": pipe.step, **r})
    await _mirror_to_opfs()
    return _dumps(r)


def search_books(query: str) -> str:
    from tabgpt.corpus import search_catalogue
    return _dumps(search_catalogue(query, limit=30))


# ---------------------------------------------------------------------------------------------
# Saving, downloading and resuming runs.

def _write_source():
    """Remember where the data came from, so a resumed run reloads it: books and the default are fetched
    again (from the cache); an upload or pasted text is kept whole (it exists nowhere else)."""
    src = _source
    if isinstance(src, dict) and ("text" in src or "file" in src):
        src = {"text": _pipeline().corpus.text}
    with open(os.path.join(RUN_DIR, "source.json"), "w") as f:
        json.dump({"source": src}, f)


async def _mirror_to_opfs():
    if not IN_BROWSER:
        return
    for name in RUN_FILES:
        path = os.path.join(RUN_DIR, name)
        if not os.path.exists(path):
            await opfs.remove(OPFS_FOLDER, name)   # a loaded run without it: the saved copy matches the folder
            continue
        with open(path, "rb") as f:
            # atomic: a reload in the middle of a checkpoint keeps the previous one
            await opfs.write(OPFS_FOLDER, name, f.read(), atomic=True)


async def _saved_run_info():
    if not IN_BROWSER:
        return None
    cfg = await opfs.read(OPFS_FOLDER, "config.json")
    model = await opfs.read(OPFS_FOLDER, "model.safetensors")
    if not cfg or not model:
        return None
    from tabgpt.safetensors import load_header
    try:
        _, meta = load_header(model)
        c = json.loads(cfg)
        return {"step": int((meta or {}).get("step", 0)), "max_steps": int(c.get("max_steps", 0))}
    except Exception:
        return None


async def resume_saved() -> str:
    """Restore the run mirrored in OPFS: data (from its source, cached), tokenizer, weights and optimizer state."""
    from tabgpt.run import RunFolder
    os.makedirs(RUN_DIR, exist_ok=True)
    for name in RUN_FILES:
        data = await opfs.read(OPFS_FOLDER, name)
        if data is not None:
            with open(os.path.join(RUN_DIR, name), "wb") as f:
                f.write(data)
    return _dumps(await _restore(RunFolder(RUN_DIR)))


async def _restore(run) -> dict:
    global _source
    pipe = _pipeline()
    run.check(need_state=True)
    cfg = run.read_config()
    try:
        with open(run.path / "source.json") as f:
            _source = json.load(f)["source"]
    except (OSError, ValueError, KeyError):
        _source = "default"
    data = await pipe.load_data(_source)
    tokens = pipe.use_tokenizer(run.read_tokenizer())
    model = await pipe.build_model(cfg, resume_from=run)
    pipe.last_samples = []
    metrics = run.read_metrics()
    losses = [[e["step"], e["loss"]] for e in metrics if e.get("type") == "step"]
    val = [[e["step"], e["val_loss"]] for e in metrics if e.get("type") == "eval"]
    # data and tokenizer too, so that the page shows what the restored run was trained on
    return {"step": pipe.step, "max_steps": cfg.max_steps, "model": model, "losses": losses, "val_losses": val,
            "data": data, "tokenizer": {"vocab_size": pipe.tokenizer.vocab_size, **tokens}}


async def run_folder_zip() -> str:
    """The run folder as a base64 zip, for the page's download button."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name in RUN_FILES:
            path = os.path.join(RUN_DIR, name)
            if os.path.exists(path):
                z.write(path, f"tabgpt-run/{name}")
    return base64.b64encode(buf.getvalue()).decode()


async def load_run_files(files: dict) -> str:
    """Load a run folder the visitor picked: its files (or one zip of them), base64-encoded by name. Checked
    whole in a folder of its own first, so that a bad upload leaves the current run, its model and its files as
    they were."""
    import shutil
    import tempfile
    from tabgpt.run import RunError, RunFolder, check_tokenizer_matches
    staging = tempfile.mkdtemp(prefix="tabgpt-upload-")
    try:
        found = []
        for name, b64 in files.items():
            data = base64.b64decode(b64)
            if name.endswith(".zip"):
                try:
                    with zipfile.ZipFile(io.BytesIO(data)) as z:
                        for member in z.namelist():
                            base = member.rsplit("/", 1)[-1]
                            if base in RUN_FILES:
                                found.append(base)
                                with open(os.path.join(staging, base), "wb") as f:
                                    f.write(z.read(member))
                except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
                    raise RunError(f"{name} is not a readable zip file ({e}): choose the .zip that 'Download run "
                                   f"folder' saved, or the run's own files") from e
            elif name in RUN_FILES:
                found.append(name)
                with open(os.path.join(staging, name), "wb") as f:
                    f.write(data)
        need = ["config.json", "tokenizer.json", "model.safetensors", "state.safetensors"]
        missing = [n for n in need if n not in found]
        if missing:
            raise RunError(f"the chosen files lack {', '.join(missing)}: choose a whole run folder ({', '.join(need)}"
                           f"), or the .zip that 'Download run folder' saved")
        run = RunFolder(staging)
        cfg = run.read_config()
        check_tokenizer_matches(run.read_tokenizer(), cfg, "tokenizer.json")
        run.read_resume(cfg)   # every tensor, shape and step checked
        if "best.safetensors" in found:
            run.read_model(cfg, best=True)
        # good: it replaces the run folder's files (those it lacks go, so no file of the old run stays behind)
        os.makedirs(RUN_DIR, exist_ok=True)
        for name in RUN_FILES:
            target = os.path.join(RUN_DIR, name)
            if name in found:
                shutil.copyfile(os.path.join(staging, name), target)
            elif os.path.exists(target):
                os.remove(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    r = await _restore(RunFolder(RUN_DIR))
    await _mirror_to_opfs()
    return _dumps(r)
