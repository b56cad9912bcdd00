"""The GPT training step and cached generation inside Pyodide in headless Chromium (WebGPU on SwiftShader),
against the same code run natively (lavapipe): a tiny model, the same GPU init, a few AdamW steps.

Both sides run RUN_STEPS (below) unchanged. The GPU init is integer arithmetic, so the weights must be
bit-identical; after that the adapters differ in the rounding of exp/tanh and in tile shapes picked from the
device's limits, so losses, norms and logits must agree to the tolerances below.
"""

import json
import math

import pytest

from browser_support import run_py
from tabgpt.gpu import wait

pytestmark = pytest.mark.browser

TOL = 1e-5          # losses, norms, eval loss: relative (measured 1e-7)
TOL_LOGITS = 1e-4   # logits after three steps at lr 1e-2, relative to the largest (measured 8e-6: Adam magnifies)


RUN_STEPS = '''
async def run_steps(dev):
    """Three training steps (train_step and the separate sequences), an eval loss and eval metrics, then a prefill
    and two cached decode steps."""
    import array, hashlib, random
    from tabgpt.config import Config
    from tabgpt.gpt import GPT
    cfg = Config(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=300, batch_size=2, grad_clip=1.0)
    model = await GPT.create(dev, cfg, 2, 16)
    await model.init_weights(5)
    init_sha = hashlib.sha256(await dev.read(model.params)).hexdigest()
    rng = random.Random(0)
    batches = [(array.array("I", [rng.randrange(300) for _ in range(32)]),
                array.array("I", [rng.randrange(300) for _ in range(32)])) for _ in range(2)]
    for step in range(3):   # steps 0 and 2 as one submission each (train_step), step 1 from the separate sequences
        if step != 1:
            model.train_step(step, 1e-2, [batches[step % 2]])
            continue
        model.set_step(step, 1e-2)
        model.run_zero_grad()
        model.set_batch(*batches[step % 2])
        model.run_forward_backward()
        model.run_update(slot=step)
    stats = await model.read_step_stats(range(3))
    model.set_batch(*batches[0])
    model.run_eval()
    eval_loss = await model.read_eval_loss()
    loss_sum, n, correct = await model.eval_metrics(*batches[1])
    logits = [list(await model.prefill(batches[0][0][:5]))]
    for t in batches[0][0][5:7]:
        logits.append(list(await model.decode(t)))
    return {"init_sha": init_sha, "stats": stats, "eval_loss": eval_loss, "metrics": [loss_sum, n, correct],
            "logits": logits, "kernels": model.kernel_count}
'''


def native_result(dev):
    ns = {}
    exec(RUN_STEPS, ns)
    return json.loads(json.dumps(wait(ns["run_steps"](dev))))


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def test_training_step_in_browser_matches_native(check_page, dev):  # noqa: F811
    code = RUN_STEPS + "\nimport json\nfrom tabgpt import gpu\njson.dumps(await run_steps(await gpu.open_device()))\n"
    got = run_py(check_page, code, timeout_ms=300_000)
    assert isinstance(got, dict), got
    want = native_result(dev)
    assert got["init_sha"] == want["init_sha"], "the same seed must give bit-identical weights on every device"
    print("\nstep  loss browser  loss native   norm browser  norm native")
    for i, ((lb, nb, sb), (ln, nn, sn)) in enumerate(zip(got["stats"], want["stats"])):
        print(f"{i:4d}  {lb:.7f}    {ln:.7f}    {nb:.7f}     {nn:.7f}")
        assert not sb and not sn
        assert rel(lb, ln) < TOL and rel(nb, nn) < TOL, f"step {i}: browser {lb}, {nb}; native {ln}, {nn}"
    assert got["stats"][-1][0] < got["stats"][0][0], "three steps on two batches should lower the loss"
    assert rel(got["eval_loss"], want["eval_loss"]) < TOL
    assert got["metrics"][1:] == want["metrics"][1:] and rel(got["metrics"][0], want["metrics"][0]) < TOL
    scale = max(abs(v) for row in want["logits"] for v in row)
    err = max(abs(a - b) for ra, rb in zip(got["logits"], want["logits"]) for a, b in zip(ra, rb)) / scale
    print(f"eval loss {got['eval_loss']:.7f} / {want['eval_loss']:.7f}; cached logits max rel err {err:.2e}; "
          f"{got['kernels']} kernels")
    assert err < TOL_LOGITS and all(math.isfinite(v) for row in got["logits"] for v in row)
