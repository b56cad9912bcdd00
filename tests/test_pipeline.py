"""The pipeline end to end on lavapipe with a tiny model: resume, NaN handling, the run folder (Hugging Face
compatible), sampling, evaluation, the CLI, and bad inputs (clear errors, nothing overwritten)."""

import asyncio
import gc
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tabgpt import gpu
from tabgpt.config import preset
from tabgpt.pipeline import Pipeline
from tabgpt.run import RunError, RunFolder, load_model
from tabgpt.train import TrainingError, get_lr

TEXT_CHARS = 300_000


def tiny_cfg(**kw):
    base = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=300, batch_size=4, max_steps=12,
                warmup_steps=2, eval_interval=6, eval_steps=1, learning_rate=5e-3, min_lr=5e-4)
    base.update(kw)
    return preset("tiny", **base)


@pytest.fixture(scope="module")
def text():
    from tabgpt.corpus import load_default
    return load_default()[:TEXT_CHARS]


async def _pipeline(text, run_dir, emit=None, cfg=None):
    """Data and a 300-token tokenizer; with cfg also the run folder (when run_dir is given) and the model."""
    pipe = Pipeline(emit, run_dir=run_dir)
    await pipe.load_data({"text": text})
    await pipe.train_tokenizer(300)
    if cfg is not None:
        if pipe.run is not None:
            pipe.run.create(cfg.replace(vocab_size=300), pipe.tokenizer.to_json())
        await pipe.build_model(cfg)
    return pipe


def _losses(run_dir):
    return [(e["step"], e["loss"]) for e in RunFolder(run_dir).read_metrics() if e["type"] == "step"]


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = tiny_cfg(max_steps=100, warmup_steps=10)
    assert get_lr(0, cfg) == pytest.approx(cfg.learning_rate / 10)
    assert get_lr(9, cfg) == pytest.approx(cfg.learning_rate)
    assert get_lr(55, cfg) == pytest.approx((cfg.learning_rate + cfg.min_lr) / 2)
    assert get_lr(100, cfg) == pytest.approx(cfg.min_lr)


@pytest.mark.parametrize("autotune", [False, True], ids=["fixed-tiles", "autotuned"])
def test_training_lowers_the_loss_and_resume_is_bit_identical(tmp_path, text, autotune, monkeypatch):
    # autotuned: every product's tiles and split-K are timed and chosen, and the choice is kept on disk, so the
    # resumed run (which here forgets the in-memory choices first) uses the same kernels: the same losses
    from tabgpt.ops import matmul
    if autotune:
        monkeypatch.setenv("TABGPT_AUTOTUNE", "force")
        monkeypatch.setenv("TABGPT_CACHE", str(tmp_path / "cache"))
    cfg = tiny_cfg()

    async def full():
        pipe = await _pipeline(text, tmp_path / "a", cfg=cfg)
        return await pipe.train()

    async def interrupted():
        pipe = await _pipeline(text, tmp_path / "b", cfg=cfg)

        def stop_at_5(ev):
            if ev.get("type") == "step" and ev["step"] == 5:
                pipe.control.request_stop("test")
        pipe.emit = stop_at_5
        return await pipe.train()

    async def resumed():
        pipe = await _pipeline(text, tmp_path / "b")
        run = RunFolder(tmp_path / "b")
        pipe.use_tokenizer(run.read_tokenizer())
        if autotune:
            matmul._tuned.clear()
        info = await pipe.build_model(run.read_config(), resume_from=run)
        assert info["step"] >= 5
        assert bool(info["autotuned"]) is False    # autotuned: every choice came from the file on disk
        return await pipe.train()

    last = asyncio.run(full())
    assert last["type"] == "done" and last["step"] == cfg.max_steps
    if autotune:
        assert json.loads((tmp_path / "cache" / "matmul-tune.json").read_text())
    a = _losses(tmp_path / "a")
    assert [s for s, _ in a] == list(range(1, cfg.max_steps + 1))
    assert np.mean([l for _, l in a[-3:]]) < a[0][1] - 0.3, f"loss did not fall: {a}"

    stopped = asyncio.run(interrupted())
    assert stopped["type"] == "stopped" and stopped["step"] < cfg.max_steps
    asyncio.run(resumed())
    b = dict(_losses(tmp_path / "b"))
    for step, loss in a:
        assert b[step] == loss, f"step {step}: uninterrupted {loss!r}, resumed {b[step]!r}"
    # best.safetensors holds the lowest validation loss of the whole run, across the resume
    evals = [e["val_loss"] for e in RunFolder(tmp_path / "b").read_metrics() if e["type"] == "eval"]
    assert RunFolder(tmp_path / "b").best_val_loss() == min(evals)


def test_stop_while_paused_trains_no_further_step(text):
    cfg = tiny_cfg(max_steps=6, eval_interval=0)
    events = []

    async def go():
        pipe = await _pipeline(text, None, cfg=cfg)

        def emit(ev):
            events.append(ev)
            if ev["type"] == "start":
                pipe.control.pause = True
            elif ev["type"] == "paused":
                pipe.control.request_stop("test")
        pipe.emit = emit
        return await pipe.train()

    last = asyncio.run(go())
    assert last["type"] == "stopped" and last["step"] == 0, last
    assert not [e for e in events if e["type"] == "step"], "a step ran after the stop"


def test_same_seed_gives_bit_identical_losses(tmp_path, text):
    cfg = tiny_cfg(max_steps=4, eval_interval=0)

    async def once(name):
        pipe = await _pipeline(text, tmp_path / name, cfg=cfg)
        await pipe.train()
        return _losses(tmp_path / name)

    assert asyncio.run(once("x")) == asyncio.run(once("y"))


def test_nan_updates_are_skipped_then_training_stops_with_advice(tmp_path, text):
    cfg = tiny_cfg(max_steps=20, eval_interval=0)
    events = []

    async def go():
        pipe = await _pipeline(text, None, cfg=cfg)
        spec = pipe.model.specs[3]  # a LayerNorm bias: NaN there makes every loss NaN
        pipe.model.dev.write(pipe.model.params, np.full(spec.numel, np.nan, np.float32).tobytes(), 4 * spec.offset)
        before = await pipe.model.get_params()
        pipe.emit = events.append
        with pytest.raises(TrainingError) as e:
            await pipe.train()
        after = await pipe.model.get_params()
        return e.value, before, after

    err, before, after = asyncio.run(go())
    assert "Lower the learning rate" in str(err) and "resume" in str(err)
    nans = [e for e in events if e["type"] == "nan"]
    assert len(nans) == 5 and all("skipped" in e["message"] for e in nans)
    for name, (shape, data) in before.items():  # skipped updates leave every parameter untouched
        assert bytes(after[name][1]) == bytes(data), name


def test_divergence_keeps_the_last_checkpoint_and_a_non_finite_one_is_named(tmp_path, text):
    """A run that diverges leaves its last checkpoint as it was (it used to be replaced by the weights that
    diverged, labelled with an older step); a checkpoint whose weights are not finite is named as the cause where
    training resumes from it, and sampling and evaluation say so instead of printing NaN."""
    cfg = tiny_cfg(max_steps=3, eval_interval=0)
    run_dir = tmp_path / "r"

    def poison(model):
        spec = model.specs[3]  # a LayerNorm bias: NaN there makes every loss NaN
        model.dev.write(model.params, np.full(spec.numel, np.nan, np.float32).tobytes(), 4 * spec.offset)

    async def diverge():
        pipe = await _pipeline(text, run_dir, cfg=cfg)
        await pipe.train()                                   # checkpoint at step 3
        saved = (run_dir / "model.safetensors").read_bytes(), (run_dir / "state.safetensors").read_bytes()
        pipe.cfg = pipe.cfg.replace(max_steps=30)

        def emit(ev):
            if ev["type"] == "step" and ev["step"] == 5:
                poison(pipe.model)
        pipe.emit = emit
        with pytest.raises(TrainingError) as e:
            await pipe.train()
        await pipe.run.save_checkpoint(pipe.model, 3)       # now a checkpoint of NaN weights, as corruption might
        return saved, str(e.value)

    saved, err = asyncio.run(diverge())
    assert "Lower the learning rate" in err and "The last checkpoint, step 3, is untouched" in err, err
    errors = [e for e in RunFolder(run_dir).read_metrics() if e["type"] == "error"]
    assert errors and errors[-1]["message"] == err

    async def resume_and_use():
        pipe = await _pipeline(text, run_dir)
        run = RunFolder(run_dir)
        pipe.use_tokenizer(run.read_tokenizer())
        await pipe.build_model(run.read_config().replace(max_steps=30), resume_from=run)
        with pytest.raises(TrainingError) as e:
            await pipe.train()
        from tabgpt.evaluate import evaluate
        from tabgpt.sample import generate
        with pytest.raises(ValueError) as ev:
            await evaluate(pipe.model, pipe.tokenizer, pipe.corpus.val_text[:2000])
        with pytest.raises(ValueError) as sv:
            [p async for p in generate(pipe.model, pipe.tokenizer, "the ", max_new_tokens=5)]
        return str(e.value), str(ev.value), str(sv.value)

    resumed, evaluated, sampled = asyncio.run(resume_and_use())
    assert "after resuming at step 3" in resumed and "not finite" in resumed, resumed
    assert "not finite" in evaluated and "not finite" in sampled
    assert saved[0] != (run_dir / "model.safetensors").read_bytes()   # (the poisoned save above did land)


def test_a_divergence_before_the_first_checkpoint_says_to_start_again_and_its_best_weights_serve(tmp_path, text):
    """No checkpoint to resume from: the advice is to start again with other settings (it used to say to resume
    from the last checkpoint, then that there was none), elsewhere where the folder keeps best weights; sampling
    and evaluation use those best weights (they used to ask for model.safetensors)."""
    cfg = tiny_cfg(max_steps=30, eval_interval=2, checkpoint_interval=0)
    run_dir = tmp_path / "dv"

    async def diverge(elsewhere):
        pipe = await _pipeline(text, run_dir, cfg=cfg)
        pipe.elsewhere = elsewhere

        def emit(ev):
            if ev["type"] == "step" and ev["step"] == 3:   # after the evaluation at step 2 saved best.safetensors
                spec = pipe.model.specs[3]
                pipe.model.dev.write(pipe.model.params, np.full(spec.numel, np.nan, np.float32).tobytes(),
                                     4 * spec.offset)
        pipe.emit = emit
        with pytest.raises(TrainingError) as e:
            await pipe.train()
        return str(e.value)

    err = asyncio.run(diverge("into another --out"))
    assert err.startswith("training diverged: 5 steps in a row"), err
    assert (f"No checkpoint had been saved in {run_dir} yet (a run saves at its end and every checkpoint interval), "
            f"so there is nothing to resume: start the run again with a lower learning rate (now 0.005) or a longer "
            f"warmup (now 2 steps) into another --out ({run_dir} keeps this run's best weights") in err, err
    assert "resume from" not in err and "Lower the learning rate" not in err, err
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.safetensors", "config.json", "metrics.jsonl",
                                                          "tokenizer.json"]
    r = _cli("sample", "--run", run_dir, "--max-new-tokens", 5)
    assert "step 2]" in r.stderr, r.stderr
    r = _cli("eval", "--run", run_dir, "--data", "default", "--max-tokens", 500)
    assert json.loads(r.stdout)["step"] == 2
    shutil.rmtree(run_dir)
    err = asyncio.run(diverge(None))      # the page: it replaces its run's files when it starts again
    assert err.endswith("start the run again with a lower learning rate (now 0.005) or a longer warmup (now 2 "
                        "steps)"), err


def test_a_one_token_context_samples(text):
    """block_size 1: the context refills from the last token (it was emptied: window[-0:] kept everything)."""
    cfg = tiny_cfg(block_size=1, max_steps=2, eval_interval=0)

    async def go():
        pipe = await _pipeline(text, None, cfg=cfg)
        await pipe.train()
        return await pipe.sample("the", max_new_tokens=6, temperature=0, stream=False)

    assert isinstance(asyncio.run(go()), str)


def test_bad_settings_are_refused_with_what_to_do():
    cases = {"n_head": (0, "n_head must be at least 1"), "min_lr": (-1.0, "min_lr (-1.0) must be in [0"),
             "eval_steps": (0, "eval_steps (0) must be at least 1"),
             "eval_interval": (-5, "eval_interval must not be negative"),
             "warmup_steps": (-1, "warmup_steps must not be negative"), "n_layer": ("2", "must be an integer"),
             "learning_rate": (float("nan"), "finite"), "batch_size": (2.5, "must be an integer")}
    for name, (value, message) in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            preset("tiny", **{name: value})
    with pytest.raises(ValueError, match="min_lr"):
        preset("tiny", min_lr=0.5)   # above the learning rate
    preset("tiny", min_lr=0.0, warmup_steps=0, eval_interval=0)   # zero is a choice
    # AdamW's decoupled decay multiplies the weights by 1 - learning_rate x weight_decay each step
    with pytest.raises(ValueError, match=r"weight_decay \(-0.1\) must not be negative: give a --weight-decay"):
        preset("tiny", weight_decay=-0.1)
    with pytest.raises(ValueError, match=r"weight_decay \(1000000.0\) times learning_rate \(0.003\) must be below 1"
                                         r".* give a --weight-decay below 333.3"):
        preset("tiny", weight_decay=1e6)
    with pytest.raises(ValueError, match="--weight-decay below 1.25"):
        preset("tiny", weight_decay=1.25, learning_rate=0.8, min_lr=0)   # exactly 1: every weight zeroed
    preset("tiny", weight_decay=0.0)
    preset("tiny", weight_decay=300.0)

    from tabgpt.metrics import check_sampling
    for kw, message in ((dict(top_k=-5), "top_k"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
                        (dict(temperature=float("nan")), "temperature"), (dict(temperature=-1), "temperature"),
                        (dict(max_new_tokens=-5), "max_new_tokens")):
        with pytest.raises(ValueError, match=message):
            check_sampling(**{"max_new_tokens": 10, **kw})
    check_sampling(0, 0, 0, 1.0)
    check_sampling(10, float("inf"), None, None)


def test_too_little_text_says_how_much_more():
    import array
    from tabgpt.train import TokenData
    # 2,000 bytes at 4 bytes a token, 5% held out: 25 validation tokens, 40 short of a 64-token block
    data = TokenData(array.array("I", range(475)), array.array("I", range(25)), 1900, 100)
    with pytest.raises(TrainingError, match=r"validation text has 25 tokens.*about 3,200 more bytes"):
        data.check(64)
    data.check(24)


def test_run_folder_loads_in_transformers_with_the_same_logits(tmp_path, text):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    cfg = tiny_cfg(max_steps=3, eval_interval=0)

    async def go():
        pipe = await _pipeline(text, tmp_path / "r", cfg=cfg)
        await pipe.train()
        x = pipe.data.val[:cfg.batch_size * cfg.block_size]
        pipe.model.set_batch(x, x)
        pipe.model.run_eval()
        logits = np.frombuffer(await pipe.model.read_logits(), np.float32)
        return np.array(x).reshape(cfg.batch_size, cfg.block_size), logits.reshape(cfg.batch_size, cfg.block_size, -1)

    idx, ours = asyncio.run(go())
    model = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "r")).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(idx, dtype=torch.long)).logits.numpy()
    V = theirs.shape[-1]
    assert V == 300
    err = np.abs(ours[..., :V] - theirs).max() / np.abs(theirs).max()
    assert err < 1e-4, f"max relative logit difference {err:.2e}"


def test_sample_and_evaluate_from_the_run_folder(tmp_path, text):
    cfg = tiny_cfg(max_steps=6, eval_interval=3)

    async def go():
        pipe = await _pipeline(text, tmp_path / "s", cfg=cfg)
        await pipe.train()
        dev = await gpu.open_device()
        c2, tok, model, step = await load_model(dev, RunFolder(tmp_path / "s"), B=2)
        from tabgpt.evaluate import evaluate
        from tabgpt.sample import generate
        pieces = [p async for p in generate(model, tok, "the ", max_new_tokens=30, seed=1)]
        pieces2 = [p async for p in generate(model, tok, "the ", max_new_tokens=30, seed=1)]
        ev = await evaluate(model, tok, pipe.corpus.val_text[:4000], train_text=pipe.corpus.train_text,
                            train_tokens=pipe.data.train, samples=["".join(pieces)])
        # the same numbers by hand from the model's own per-token sums
        ids = tok.encode(pipe.corpus.val_text[:4000])
        return pieces, pieces2, ev, ids, tok

    pieces, pieces2, ev, ids, tok = asyncio.run(go())
    assert pieces == pieces2, "the same seed gave a different sample"
    assert 0 < len("".join(pieces))
    assert ev["tokens"] == len(ids) - 1
    assert ev["bytes"] == len(tok.decode_bytes(ids[1:]))
    assert ev["bits_per_byte"] == pytest.approx(ev["val_loss"] * ev["tokens"] / math.log(2) / ev["bytes"])
    assert ev["perplexity"] == pytest.approx(math.exp(ev["val_loss"]))
    assert 0 <= ev["top1"] <= 1
    assert set(ev["baselines"]) == {"gzip", "bz2", "lzma"}
    assert 0 <= ev["real_word_share"] <= 1


def _cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "tabgpt", *map(str, args)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, text):
    d = tmp_path_factory.mktemp("cli")
    (d / "corpus.txt").write_text(text)
    _cli("train", "--data", d / "corpus.txt", "--preset", "tiny", "--vocab-size", 300, "--n-embd", 32,
         "--block-size", 32, "--max-steps", 4, "--eval-interval", 2, "--out", d / "run", "--quiet")
    return d


def test_cli_train_sample_eval(cli_run):
    run = cli_run / "run"
    for name in ("config.json", "tokenizer.json", "model.safetensors", "state.safetensors", "metrics.jsonl"):
        assert (run / name).is_file(), name
    cfg = json.loads((run / "config.json").read_text())
    assert {"n_layer", "n_head", "n_embd", "block_size", "vocab_size"} <= set(cfg)
    r = _cli("sample", "--run", run, "--prompt", "KING", "--max-new-tokens", 20)
    assert r.stdout.startswith("KING")
    r = _cli("eval", "--run", run, "--data", cli_run / "corpus.txt", "--max-tokens", 2000)
    ev = json.loads(r.stdout)
    for key in ("val_loss", "bits_per_byte", "perplexity", "top1", "baselines"):
        assert key in ev, key
    assert set(ev["baselines"]) == {"gzip", "bz2", "lzma"}


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_bad_inputs_give_clear_errors_and_overwrite_nothing(cli_run, tmp_path):
    r = _cli("sample", "--run", tmp_path / "missing", check=False)
    assert r.returncode == 1 and "does not exist" in r.stderr and "tabgpt train" in r.stderr

    run = tmp_path / "run"
    shutil.copytree(cli_run / "run", run)
    before = _snapshot(run)

    # a tokenizer of another size
    other = tmp_path / "other"
    other.mkdir()
    _cli("tokenizer", "--input", cli_run / "corpus.txt", "--vocab-size", 280, "--out", other / "tokenizer.json")
    shutil.copy(other / "tokenizer.json", run / "tokenizer.json")
    r = _cli("eval", "--run", run, "--data", cli_run / "corpus.txt", check=False)
    assert r.returncode == 1 and "tokenizer has 280 tokens" in r.stderr, r.stderr
    shutil.copy(cli_run / "run" / "tokenizer.json", run / "tokenizer.json")

    # a truncated checkpoint: sampling and resuming refuse it, and nothing is rewritten
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 2])
    (run / "best.safetensors").write_bytes(data[: len(data) // 2])
    broken = _snapshot(run)
    r = _cli("sample", "--run", run, check=False)
    assert r.returncode == 1 and "model.safetensors" in r.stderr or "best.safetensors" in r.stderr, r.stderr
    r = _cli("train", "--data", cli_run / "corpus.txt", "--resume", "--out", run, "--max-steps", 8, check=False)
    assert r.returncode == 1 and "safetensors" in r.stderr, r.stderr
    assert _snapshot(run) == broken, "a failed command changed the run folder"

    # training into a folder that holds a model without --resume refuses to overwrite it
    r = _cli("train", "--data", cli_run / "corpus.txt", "--preset", "tiny", "--out", cli_run / "run", check=False)
    assert r.returncode == 1 and "--resume" in r.stderr
    assert before["model.safetensors"] == (cli_run / "run" / "model.safetensors").read_bytes()


def test_weights_that_config_json_does_not_describe_are_refused_naming_both(cli_run, tmp_path):
    """A config.json edited to fewer layers: sampling and evaluation used to drop the extra layers' weights
    silently, and resuming blamed state.safetensors; the weights are checked against config.json first."""
    run = tmp_path / "run"
    shutil.copytree(cli_run / "run", run)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["n_layer"] == 2
    (run / "config.json").write_text(json.dumps({**cfg, "n_layer": 1}))
    before = _snapshot(run)
    for args in (("eval", "--run", run, "--data", cli_run / "corpus.txt", "--max-tokens", 500),
                 ("sample", "--run", run, "--max-new-tokens", 5),
                 ("train", "--data", cli_run / "corpus.txt", "--resume", "--out", run, "--max-steps", 8)):
        r = _cli(*args, check=False)
        assert r.returncode == 1 and "holds tensors that the model of config.json" in r.stderr, (args, r.stderr)
        assert "transformer.h.1." in r.stderr and "are not of the same model" in r.stderr, r.stderr
        assert "state.safetensors" not in r.stderr, r.stderr
    assert _snapshot(run) == before
    (run / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))   # more layers than the weights have
    r = _cli("sample", "--run", run, "--max-new-tokens", 5, check=False)
    assert r.returncode == 1 and "has no tensor transformer.h.2." in r.stderr, r.stderr


def test_a_run_without_a_checkpoint_samples_from_its_best_weights_and_says_how_to_go_on(cli_run, tmp_path):
    """A run killed before its first checkpoint holds best.safetensors alone: sample and eval use it, and what
    cannot go on (resuming, a new run in the same folder) points to what can, not back to itself."""
    corpus, run = cli_run / "corpus.txt", tmp_path / "run"
    shutil.copytree(cli_run / "run", run)
    (run / "model.safetensors").unlink()
    (run / "state.safetensors").unlink()
    best_step = RunFolder(run).read_model(RunFolder(run).read_config(), best=True)[1]
    r = _cli("sample", "--run", run, "--prompt", "KING", "--max-new-tokens", 5)
    assert r.stdout.startswith("KING") and f"step {best_step}]" in r.stderr, r.stderr
    r = _cli("eval", "--run", run, "--data", corpus, "--max-tokens", 500)
    assert json.loads(r.stdout)["step"] == best_step
    r = _cli("train", "--data", corpus, "--resume", "--out", run, "--max-steps", 8, check=False)
    assert r.returncode == 1 and "the run stopped before its first checkpoint" in r.stderr, r.stderr
    assert f"`--init-from {run}` and another --out" in r.stderr and "tabgpt train --out" not in r.stderr, r.stderr
    r = _cli("train", "--data", corpus, "--out", run, "--max-steps", 8, check=False)
    assert r.returncode == 1 and "choose another --out" in r.stderr and f"--init-from {run}" in r.stderr, r.stderr
    r = _cli("train", "--data", corpus, "--init-from", run, "--out", tmp_path / "new", "--max-steps", 2,
             "--eval-interval", 0, "--quiet")
    assert (tmp_path / "new" / "model.safetensors").is_file()
    # a folder whose run never saved is reused by a new run, as the message says
    (run / "best.safetensors").unlink()
    for args in (("sample", "--run", run), ("train", "--data", corpus, "--resume", "--out", run)):
        r = _cli(*args, check=False)
        assert r.returncode == 1 and "no weights were saved in it yet" in r.stderr, r.stderr
        assert f"train with `tabgpt train --out {run}`" in r.stderr, r.stderr
    RunFolder(run).check_new()
    # the run's own files missing beside its weights: put them back, or a new run elsewhere
    (run / "config.json").unlink()
    (run / "model.safetensors").write_bytes((cli_run / "run" / "model.safetensors").read_bytes())
    r = _cli("sample", "--run", run, check=False)
    assert r.returncode == 1 and "config.json missing; put back the run's own config.json" in r.stderr, r.stderr


def test_config_beyond_the_gpu_limits_is_refused_with_advice():
    from tabgpt.pipeline import check_fits

    class Dev:
        limits = {"max-storage-buffer-binding-size": 128 << 20}

    with pytest.raises(RunError, match="lower --batch-size"):
        check_fits(Dev(), preset("gpt2"))
    # a weight that outgrows a binding on its own: only n_embd sizes it
    with pytest.raises(RunError, match=r"MLP weight .* lower --n-embd$"):
        check_fits(Dev(), preset("tiny", n_layer=1, n_embd=2944, n_head=23, batch_size=1, block_size=8))
    # a model whose sizes are given (--init-from, --resume): only the flags that can change are advised
    with pytest.raises(RunError, match=r"logits .*: lower --batch-size or --block-size$"):
        check_fits(Dev(), preset("gpt2"), ("--n-layer", "--n-head", "--n-embd", "--vocab-size"))
    with pytest.raises(RunError, match=r"logits .*: lower --batch-size$"):
        check_fits(Dev(), preset("gpt2"), ("--n-layer", "--n-head", "--n-embd", "--block-size", "--vocab-size"))
    with pytest.raises(RunError, match=r"MLP weight .*: this model is too large for this GPU$"):
        check_fits(Dev(), preset("tiny", n_layer=1, n_embd=2944, n_head=23, batch_size=1, block_size=8), ("--n-embd",))


def test_cli_refuses_bad_paths_and_settings_before_any_work(cli_run, tmp_path):
    corpus = cli_run / "corpus.txt"
    # --out: a folder of other files, or a file: refused before the tokenizer trains, every file as it was
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    (mine / "notes.txt").write_text("notes")
    before = _snapshot(mine)
    for out in (mine, mine / "notes.txt"):
        r = _cli("train", "--data", corpus, "--max-steps", 2, "--out", out, check=False)
        assert r.returncode == 1 and ("not a tabgpt run" in r.stderr or "is a file" in r.stderr), r.stderr
        assert "tokenizer:" not in r.stderr, "the work started before the path was refused"
    assert _snapshot(mine) == before
    # a run that fails before its first save writes nothing (logits of 5 GiB: beyond the 2 GiB any device binds here)
    r = _cli("train", "--data", corpus, "--batch-size", 65536, "--max-steps", 2, "--out", tmp_path / "big",
             check=False)
    assert r.returncode == 1 and "--batch-size" in r.stderr and not (tmp_path / "big").exists(), r.stderr
    # resuming: the model's sizes cannot change, the training settings can (and say so)
    run = tmp_path / "run"
    shutil.copytree(cli_run / "run", run)
    r = _cli("train", "--data", corpus, "--resume", "--out", run, "--n-layer", 4, "--preset", "small", check=False)
    assert r.returncode == 1 and "--n-layer, --preset cannot change when resuming" in r.stderr, r.stderr
    r = _cli("train", "--data", corpus, "--resume", "--out", run, "--preset", "tiny",
             "--tokenizer", tmp_path / "t.json", check=False)
    assert r.returncode == 1 and "cannot read --tokenizer" in r.stderr, r.stderr
    other_tok = tmp_path / "other-tokenizer.json"
    assert _cli("tokenizer", "--input", corpus, "--vocab-size", 280, "--out", other_tok).returncode == 0
    r = _cli("train", "--data", corpus, "--resume", "--out", run, "--tokenizer", other_tok, "--block-size", 64,
             check=False)
    assert r.returncode == 1 and "--block-size, --tokenizer cannot change when resuming" in r.stderr, r.stderr
    before = _snapshot(run)
    # the run's own command again with --resume appended: its sizes, preset and tokenizer are no change
    r = _cli("train", "--data", corpus, "--preset", "tiny", "--vocab-size", 300, "--n-embd", 32, "--block-size", 32,
             "--max-steps", 4, "--tokenizer", run / "tokenizer.json", "--resume", "--out", run, check=False)
    assert r.returncode == 1 and "already at step 4" in r.stderr and "cannot change" not in r.stderr, r.stderr
    assert _snapshot(run) == before
    r = _cli("train", "--data", corpus, "--resume", "--out", run, "--max-steps", 5, "--learning-rate", 1e-3,
             "--quiet")
    assert "resuming with learning_rate 0.001" in r.stderr
    assert json.loads((run / "config.json").read_text())["learning_rate"] == 1e-3
    assert "other text" not in r.stderr
    r = _cli("train", "--data", corpus, "--resume", "--out", run, "--max-steps", 5, check=False)   # at step 5
    assert r.returncode == 1 and "already at step 5: give --max-steps above 5" in r.stderr, r.stderr
    other = tmp_path / "other.txt"                     # resuming on other text is allowed, and said
    other.write_text(corpus.read_text()[::-1])
    r = _cli("train", "--data", other, "--resume", "--out", run, "--max-steps", 6, "--quiet")
    assert "this run was trained on " + str(corpus) in r.stderr and "goes on with other text" in r.stderr, r.stderr
    r = _cli("train", "--data", corpus, "--tokenizer", run / "tokenizer.json", "--vocab-size", 512, "--out",
             tmp_path / "t", check=False)
    assert r.returncode == 1 and "drop --vocab-size" in r.stderr, r.stderr
    r = _cli("sample", "--run", run / "config.json", check=False)
    assert r.returncode == 1 and "is a file, not a run folder" in r.stderr, r.stderr
    # sampling and evaluation settings, and a binary evaluation text
    for args, message in ((("sample", "--top-k", -5), "top_k"), (("sample", "--top-p", 1.5), "top_p"),
                          (("sample", "--num-samples", 0), "--num-samples"),
                          (("eval", "--data", corpus, "--max-tokens", -5), "--max-tokens"),
                          (("eval", "--data", sys.executable), "not text")):
        r = _cli(*args, "--run", run, check=False)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def _start(args, log):
    """The CLI in the background, its stderr in the file log."""
    return subprocess.Popen([sys.executable, "-m", "tabgpt", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"), env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_for(log, text, proc, seconds=240):
    import time
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        assert proc.poll() is None, f"exited before {text!r}: {log.read_text()[-2000:]}"
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no {text!r} within {seconds} s: {log.read_text()[-2000:]}")


def test_ctrl_c_before_training_stops_at_once_and_a_kill_while_training_saves(cli_run, tmp_path):
    import signal
    import time
    # Ctrl+C while the tokenizer trains or the kernels compile: out at once, nothing written (it used to wait
    # until the whole run, samples and evaluation had finished)
    log, out = tmp_path / "int.log", tmp_path / "int"
    p = _start(["train", "--data", "default", "--vocab-size", 8192, "--max-steps", 2000, "--out", out], log)
    _wait_for(log, "data:", p)
    p.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    assert p.wait(timeout=60) == 130 and time.monotonic() - t0 < 30, log.read_text()[-2000:]
    assert "interrupted" in log.read_text() and "training " not in log.read_text() and not out.exists()
    # a plain kill (SIGTERM) while training stops at the next step with a checkpoint, as Ctrl+C does
    log, out = tmp_path / "term.log", tmp_path / "term"
    p = _start(["train", "--data", cli_run / "corpus.txt", "--vocab-size", 300, "--max-steps", 100_000, "--out",
                out], log)
    _wait_for(log, "training ", p)
    time.sleep(1)
    p.send_signal(signal.SIGTERM)
    # the exit status says it was stopped (`train ... && next` does not go on), as a shell's: 128 + the signal
    assert p.wait(timeout=240) == 143, log.read_text()[-2000:]
    assert "interrupted (SIGTERM)" in log.read_text()
    checkpoints = [e for e in RunFolder(out).read_metrics() if e["type"] == "checkpoint"]
    assert checkpoints and checkpoints[-1]["reason"] == "stop" and (out / "state.safetensors").is_file()
    go_on = re.search(r"interrupted at step (\d+); its checkpoint is in .*: go on with `tabgpt (train [^`]*)`",
                      log.read_text())
    assert go_on and int(go_on[1]) == checkpoints[-1]["step"], log.read_text()[-2000:]
    # the command it printed goes on from there; Ctrl+C while training stops it again, exit status 130
    assert go_on[2] == f"train --data {cli_run / 'corpus.txt'} --resume --out {out}"
    log = tmp_path / "int2.log"
    p = _start(go_on[2].split(), log)
    _wait_for(log, "training ", p)
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=240) == 130, log.read_text()[-2000:]
    assert "interrupted (Ctrl+C)" in log.read_text() and f"resuming at step {go_on[1]}" in log.read_text()
    assert "a second Ctrl+C or kill skips them: the checkpoint is saved" in log.read_text()    # how to skip
    assert RunFolder(out).checkpoint_step() > int(go_on[1])


def test_what_a_run_folder_holds_decides_what_may_start_in_it(tmp_path):
    from tabgpt.run import json_safe
    folder = RunFolder(tmp_path / "r")
    folder.create(preset("tiny"), "{}")
    folder.check_new()                                   # a run that never saved: reused
    (folder.path / "best.safetensors").write_bytes(b"x")   # a run killed before its first checkpoint
    with pytest.raises(RunError, match="best.safetensors of a run that stopped"):
        folder.check_new()
    (folder.path / "best.safetensors").unlink()
    (folder.path / "model.safetensors").write_bytes(b"x")  # a save cut short (the disk full)
    with pytest.raises(RunError, match="without state.safetensors"):
        folder.check_new()
    # metrics: JSON that JSON.parse reads (a NaN loss becomes null)
    folder.append_metrics({"type": "nan", "loss": float("nan"), "grad_norm": float("inf"), "x": [float("nan")]})
    line = (folder.path / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in JSON")) == {
        "type": "nan", "loss": None, "grad_norm": None, "x": [None]}
    assert json_safe({"a": 1.5, "b": "s"}) == {"a": 1.5, "b": "s"}


def test_the_pages_run_folder_holds_one_run_with_its_best_weights(tmp_path, monkeypatch, text):
    """The page's functions natively: its run folder (and the zip it downloads) carries best.safetensors, and a
    second run in the same tab starts without the first one's weights (its best was judged against the old)."""
    import base64
    import io
    import zipfile
    from tabgpt import web
    monkeypatch.setattr(web, "RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(web, "_pipe", None)
    run = tmp_path / "run"

    async def go():
        await web.load_data({"text": text})
        await web.train_tokenizer(300)
        options = {"preset": "tiny", "n_embd": 32, "block_size": 32, "max_steps": 4}
        await web.build_model(options)
        await web.train()
        zipped = zipfile.ZipFile(io.BytesIO(base64.b64decode(await web.run_folder_zip()))).namelist()
        had = {n: (run / n).exists() for n in ("best.safetensors", "model.safetensors", "source.json")}
        await web.build_model(options)
        return zipped, had

    zipped, had = asyncio.run(go())
    assert all(had.values()), had
    assert {"tabgpt-run/best.safetensors", "tabgpt-run/model.safetensors", "tabgpt-run/source.json"} <= set(zipped)
    for name in ("best.safetensors", "model.safetensors", "state.safetensors"):
        assert not (run / name).exists(), f"the second run kept the first one's {name}"
    assert (run / "metrics.jsonl").read_text() == ""


def test_a_stop_after_an_evaluation_does_not_repeat_it_and_checkpoints_follow_every_step(tmp_path, text):
    cfg = tiny_cfg(max_steps=12, eval_interval=2, checkpoint_interval=3)

    async def go():
        pipe = await _pipeline(text, tmp_path / "r", cfg=cfg)

        def emit(ev):
            if ev["type"] == "eval" and ev["step"] == 4:
                pipe.control.request_stop("test")
        pipe.emit = emit
        return await pipe.train()

    last = asyncio.run(go())
    assert last["type"] == "stopped" and last["step"] == 4
    events = RunFolder(tmp_path / "r").read_metrics()
    evals = [e["step"] for e in events if e["type"] == "eval"]
    assert evals == [2, 4], evals                      # the stop at 4 came right after its evaluation
    for i, e in enumerate(events):                     # a checkpoint's metrics hold every step up to it
        if e["type"] == "checkpoint":
            logged = {x["step"] for x in events[:i] if x["type"] == "step"}
            assert set(range(1, e["step"] + 1)) <= logged, (e, sorted(logged))


def test_a_new_tokenizer_drops_the_model_and_new_text_needs_a_new_tokenizer(text):
    cfg = tiny_cfg(max_steps=2, eval_interval=0)

    async def go():
        pipe = await _pipeline(text, None, cfg=cfg)
        await pipe.train_tokenizer(290)                  # the model spoke the old tokenizer's ids
        assert pipe.model is None
        with pytest.raises(RunError, match="no model to sample"):
            await pipe.sample("the ", max_new_tokens=3)
        with pytest.raises(RunError, match="no model to evaluate"):
            await pipe.evaluate()
        await pipe.build_model(cfg)
        await pipe.load_data({"text": text[:50_000]})    # new text, the tokenizer not trained on it
        with pytest.raises(RunError, match="train the tokenizer again"):
            await pipe.train()

    asyncio.run(go())


def _hf_folder(src, dest, prefix=True, dtype=None, untie=False):
    """A Hugging Face GPT-2 folder (transformers' own config.json, no tabgpt keys) with the weights that
    --init-from takes from the run src (its best), and src's tokenizer; prefix False writes the hub's names
    (without "transformer."), dtype another float type, untie an lm_head.weight of its own."""
    import safetensors.torch
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = json.loads((src / "config.json").read_text())
    model = GPT2LMHeadModel(GPT2Config(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                                       n_positions=cfg["block_size"], vocab_size=cfg["vocab_size"],
                                       bos_token_id=cfg["vocab_size"] - 1, eos_token_id=cfg["vocab_size"] - 1))
    weights = src / ("best.safetensors" if (src / "best.safetensors").exists() else "model.safetensors")
    state = safetensors.torch.load_file(weights)
    state["transformer.wte.weight"] = state["transformer.wte.weight"][:cfg["vocab_size"]]
    model.load_state_dict(state, strict=False)
    model.save_pretrained(dest)
    shutil.copy(src / "tokenizer.json", dest / "tokenizer.json")
    if not prefix or dtype or untie:
        tensors = safetensors.torch.load_file(dest / "model.safetensors")
        if untie:
            tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1
        if not prefix:
            tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
        if dtype:
            tensors = {k: v.to(dtype) for k, v in tensors.items()}
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, dest / "model.safetensors")
    assert "format" not in json.loads((dest / "config.json").read_text())
    return dest


def test_init_from_a_run_or_a_hugging_face_folder_starts_from_its_weights(cli_run, tmp_path):
    """`train --init-from`: a run folder, a folder transformers wrote and one with the hub's tensor names all
    start a new run from the same weights (a step at a learning rate of 1e-12 leaves them as they were), with
    the model's tokenizer and sizes; --block-size cuts the position embeddings."""
    from tabgpt import safetensors as st
    src, corpus = cli_run / "run", cli_run / "corpus.txt"
    want, _ = st.load(src / "best.safetensors")
    firsts = []
    for init in (src, _hf_folder(src, tmp_path / "hf"), _hf_folder(src, tmp_path / "hub", prefix=False)):
        out = tmp_path / f"from-{init.name}"
        r = _cli("train", "--data", corpus, "--init-from", init, "--max-steps", 1, "--learning-rate", 1e-12,
                 "--min-lr", 0, "--weight-decay", 0, "--out", out)
        assert "init: " in r.stderr and "learning_rate" not in r.stderr.split("init: ")[1].split("\n")[0], r.stderr
        got, _ = st.load(out / "model.safetensors")
        assert set(got) == set(want)
        for name in want:
            a = np.frombuffer(bytes(got[name][2]), np.float32)
            b = np.frombuffer(bytes(want[name][2]), np.float32)
            assert np.abs(a - b).max() <= 1e-9, name
        assert (out / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert any(e["type"] == "init" and e["source"] == str(init) for e in metrics)
        firsts.append(next(e["loss"] for e in metrics if e["type"] == "step"))
    assert firsts[0] == firsts[1] == firsts[2], firsts      # the same weights and batch: the same loss, to the bit
    # the first command again with --resume added (its --init-from too), and with the preset named: it goes on
    first = ["train", "--data", corpus, "--init-from", tmp_path / "hf", "--learning-rate", 1e-12, "--min-lr", 0,
             "--weight-decay", 0, "--out", tmp_path / "from-hf", "--quiet"]
    r = _cli(*first, "--resume", "--max-steps", 2, "--preset", "tiny", check=False)
    assert r.returncode == 0 and "cannot change" not in r.stderr, r.stderr
    r = _cli(*first[:4], tmp_path / "hub", *first[5:], "--resume", "--max-steps", 3, check=False)
    assert r.returncode == 1 and "that started from " + str(tmp_path / "hf") in r.stderr, r.stderr
    # a shorter context: the first positions' embeddings; the fine-tuning rate unless one is given
    out = tmp_path / "short"
    r = _cli("train", "--data", corpus, "--init-from", tmp_path / "hf", "--block-size", 16, "--max-steps", 1,
             "--out", out, "--quiet")
    assert "context 16" in r.stderr and "learning_rate 6e-05; min_lr 6e-06" in r.stderr, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["block_size"], cfg["learning_rate"], cfg["n_embd"]) == (16, 6e-5, 32)
    _, shape, wpe = st.load(out / "model.safetensors")[0]["transformer.wpe.weight"]
    assert tuple(shape) == (16, 32)
    first = np.frombuffer(bytes(want["transformer.wpe.weight"][2]), np.float32)[:16 * 32]
    assert np.abs(np.frombuffer(bytes(wpe), np.float32) - first).max() < 1e-3     # one step at 6e-5 from them


def test_init_from_refuses_what_it_cannot_start_from(cli_run, tmp_path):
    from tabgpt.run import read_init
    src, corpus = cli_run / "run", cli_run / "corpus.txt"
    hf = _hf_folder(src, tmp_path / "hf")
    sizes, tok, params, what = read_init(hf, 8)
    assert sizes == {"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 300, "block_size": 8}
    assert params["transformer.wpe.weight"][0] == (8, 32) and "Hugging Face" in what
    bad = {}
    for name, change in (("llama", lambda d: d.update(model_type="llama")),
                         ("relu", lambda d: d.update(activation_function="relu")),
                         ("sizes", lambda d: d.pop("n_embd")),
                         ("vocab", lambda d: d.update(vocab_size=301))):
        shutil.copytree(hf, tmp_path / name)
        d = json.loads((tmp_path / name / "config.json").read_text())
        change(d)
        (tmp_path / name / "config.json").write_text(json.dumps(d))
        bad[name] = tmp_path / name
    bad["bin"] = tmp_path / "bin"
    shutil.copytree(hf, bad["bin"])
    (bad["bin"] / "model.safetensors").rename(bad["bin"] / "pytorch_model.bin")
    import torch
    bad["f16"] = _hf_folder(src, tmp_path / "f16", dtype=torch.float16)
    bad["untied"] = _hf_folder(src, tmp_path / "untied", untie=True)
    for name, message in (("llama", "only GPT-2"), ("relu", "activation_function 'relu'"),
                          ("sizes", "lacks GPT-2's sizes"), ("vocab", "tokenizer.json has 300 tokens"),
                          ("bin", "only safetensors weights are read"), ("f16", "only F32 weights"),
                          ("untied", "ties them")):
        with pytest.raises(RunError, match=re.escape(message)):
            read_init(bad[name])
    with pytest.raises(RunError, match="no such folder"):
        read_init(tmp_path / "missing")
    sharded = tmp_path / "sharded"
    shutil.copytree(hf, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00001.safetensors")
    (sharded / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(RunError, match="weights in shards are not read"):
        read_init(sharded)
    best_only = tmp_path / "best-only"          # a run stopped before its first checkpoint: its best weights
    shutil.copytree(src, best_only)
    (best_only / "model.safetensors").unlink()
    assert "best.safetensors" in read_init(best_only)[3]
    with pytest.raises(RunError, match="give at most 32"):
        read_init(hf, 33)
    # the command's own refusals, before any work and without writing --out
    shutil.copytree(src, tmp_path / "run")
    before = _snapshot(tmp_path / "run")
    r = _cli("train", "--data", corpus, "--init-from", hf, "--resume", "--out", tmp_path / "run", check=False)
    assert r.returncode == 1 and "give one of them" in r.stderr, r.stderr     # a run that did not start from it
    assert _snapshot(tmp_path / "run") == before
    for args, message in ((("--n-layer", 3), "--n-layer: the model in"),
                          (("--tokenizer", src / "tokenizer.json"), "drop --tokenizer"),
                          (("--block-size", 64), "give at most 32")):
        r = _cli("train", "--data", corpus, "--init-from", hf, *args, "--out", tmp_path / "x", check=False)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert not (tmp_path / "x").exists()


def test_fine_tuning_rates_fill_in_what_is_not_given_and_stay_ordered():
    from tabgpt.pipeline import FINETUNE, finetune_rates
    assert finetune_rates(None, None) == FINETUNE == {"learning_rate": 6e-5, "min_lr": 6e-6}
    assert finetune_rates(3e-6, None) == {"min_lr": 3e-7}        # below the default floor: a tenth of it
    assert finetune_rates(1e-4, None) == {"min_lr": 6e-6}
    assert finetune_rates(None, 1e-4) == {"learning_rate": 1e-4}  # a floor above the default rate
    assert finetune_rates(None, 1e-6) == {"learning_rate": 6e-5}
    assert finetune_rates(1e-4, 1e-5) == {}
    for lr, floor in ((3e-6, None), (None, 1e-4)):
        rates = {"learning_rate": lr, "min_lr": floor}
        rates.update(finetune_rates(lr, floor))
        preset("tiny", **rates)                                 # valid: min_lr <= learning_rate


def test_a_learning_rate_below_min_lr_takes_min_lr_down_with_it(cli_run, tmp_path):
    """--learning-rate below the preset's (or the resumed run's) min_lr without --min-lr: min_lr keeps its ratio to
    the rate (it used to be refused, naming no flag); a min_lr given above the rate is refused naming --min-lr."""
    from tabgpt.pipeline import scaled_min_lr
    tiny = preset("tiny")
    assert scaled_min_lr(1e-4, None, tiny) == {"min_lr": 1e-5}
    assert scaled_min_lr(1e-3, None, tiny) == {} and scaled_min_lr(1e-4, 5e-5, tiny) == {}
    assert scaled_min_lr(None, None, tiny) == {} and scaled_min_lr(-1.0, None, tiny) == {}
    missing = tmp_path / "missing.txt"   # the settings are taken, then the data is looked for: nothing trains
    r = _cli("train", "--data", missing, "--learning-rate", 1e-4, "--out", tmp_path / "a", check=False)
    assert r.returncode == 1 and "note: min_lr 1e-05, 0.1 x --learning-rate as in preset tiny" in r.stderr, r.stderr
    assert "missing.txt does not exist" in r.stderr and "must be in" not in r.stderr, r.stderr
    r = _cli("train", "--data", missing, "--learning-rate", 1e-4, "--min-lr", 1e-3, "--out", tmp_path / "a",
             check=False)
    assert r.returncode == 1 and "give a --min-lr from 0 to the --learning-rate" in r.stderr, r.stderr
    run = tmp_path / "run"
    shutil.copytree(cli_run / "run", run)
    r = _cli("train", "--data", missing, "--resume", "--out", run, "--max-steps", 8, "--learning-rate", 1e-4,
             check=False)
    assert "resuming with min_lr 1e-05 (was 0.0003)" in r.stderr and "must be in" not in r.stderr, r.stderr


def test_resume_takes_the_vocabulary_size_the_run_asked_for(cli_run, tmp_path):
    """A run whose tokenizer came out smaller than --vocab-size asked (the text ran out of pairs) resumes with
    its first command; a --tokenizer that is no tokenizer is named as such."""
    corpus = cli_run / "corpus.txt"
    first = ["train", "--data", corpus, "--preset", "tiny", "--vocab-size", 60000, "--n-embd", 32, "--block-size", 16,
             "--eval-interval", 0, "--out", tmp_path / "run", "--quiet"]
    _cli(*first, "--max-steps", 1)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["vocab_size"] < 60000
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"type": "tokenizer", "vocab_requested": 60000, "vocab_size": cfg["vocab_size"]} in events
    r = _cli(*first, "--max-steps", 2, "--resume", check=False)
    assert r.returncode == 0 and "note: resuming with vocab_size" not in r.stderr, r.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["vocab_size"] == cfg["vocab_size"]
    r = _cli(*first, "--max-steps", 3, "--resume", "--vocab-size", 512, check=False)
    assert r.returncode == 1 and "--vocab-size cannot change" in r.stderr, r.stderr
    (tmp_path / "not.json").write_text('{"a": 1}')
    r = _cli(*first, "--max-steps", 3, "--resume", "--tokenizer", tmp_path / "not.json", check=False)
    assert r.returncode == 1 and str(tmp_path / "not.json") + " is not a tokenizer" in r.stderr, r.stderr


def test_building_again_gives_the_replaced_models_memory_back(text):
    cfg = tiny_cfg(max_steps=2)

    async def go():
        pipe = await _pipeline(text, None, cfg=cfg)
        first, dev = pipe.model, pipe.dev
        after_first = dev.bytes_allocated
        await pipe.build_model(cfg)
        grown = dev.bytes_allocated - after_first
        with pytest.raises(RunError):       # a build that fails keeps the model it would have replaced
            await pipe.build_model(cfg.replace(batch_size=200_000))   # beyond this GPU
        gc.collect()                        # (earlier tests' garbage is counted out when collected)
        kept, before = pipe.model, dev.bytes_allocated
        with pytest.raises(ValueError):     # and one that fails once made gives its own memory back
            await pipe.build_model(cfg, init_params={"transformer.wte.weight": ((3, 3), bytes(36))})
        gc.collect()
        assert pipe.model is kept and dev.bytes_allocated == before
        await pipe.train()
        return first, kept, pipe.model, grown, pipe.step

    first, kept, model, grown, step = asyncio.run(go())
    assert model is kept and model is not first and step == 2
    assert grown < model.gpu_bytes / 4, (grown, model.gpu_bytes)
