"""The demo page in headless Chromium (Pyodide in a module worker, WebGPU on SwiftShader), served from 127.0.0.1
with every outside request aborted and counted: the unattended pipeline, a reload that resumes from the
checkpoint saved in OPFS, the no-WebGPU message, and screenshots of the post and of the demo mid-training
(saved under test-artifacts/ to be looked at)."""

import pytest

from browser_support import ROOT, guarded_context, run_py, status_without_webgpu

pytestmark = pytest.mark.browser
ARTIFACTS = ROOT / "test-artifacts"
STEPS = 12


@pytest.fixture(scope="module")
def context(chromium, site_url):
    """One browser profile for the module, so OPFS survives a reload as it does for a visitor."""
    ctx, guard = guarded_context(chromium, site_url, viewport={"width": 1100, "height": 1500})
    ctx.guard = guard
    yield ctx
    assert guard.outside == [], f"requests left 127.0.0.1: {guard.outside}"
    ctx.close()


def _state(page):
    return page.evaluate("window.tabgpt && {stage: window.tabgpt.stage, step: window.tabgpt.step, "
                         "losses: window.tabgpt.losses, val_losses: window.tabgpt.val_losses, "
                         "sample: window.tabgpt.sample, eval: window.tabgpt.eval, error: window.tabgpt.error}")


def test_unattended_run_reaches_done_with_falling_loss(context, site_url):
    ARTIFACTS.mkdir(exist_ok=True)
    page = context.new_page()
    logs = []
    page.on("console", lambda m: logs.append(m.text))
    # vocab=600: not among the page's choices, so the page adds it
    page.goto(f"{site_url}/demo/index.html?corpus=default&preset=tiny&steps={STEPS}&autostart=1&vocab=600")
    page.wait_for_function("window.tabgpt && (window.tabgpt.stage === 'training' && window.tabgpt.losses.length >= 4"
                           " || ['done', 'error'].includes(window.tabgpt.stage))", timeout=300_000)
    page.screenshot(path=str(ARTIFACTS / "demo-training.png"), full_page=True)
    page.wait_for_function("['done', 'error'].includes(window.tabgpt.stage)", timeout=600_000)
    s = _state(page)
    page.screenshot(path=str(ARTIFACTS / "demo-done.png"), full_page=True)
    assert s["stage"] == "done", (s["error"], logs[-20:])
    losses = [l for _, l in s["losses"]]
    assert len(losses) == STEPS and [st for st, _ in s["losses"]] == list(range(1, STEPS + 1))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2, f"the loss did not fall: {losses}"
    assert s["val_losses"], "no validation loss"
    assert len(s["sample"]) > 0
    ev = s["eval"]
    for key in ("val_loss", "bits_per_byte", "perplexity", "top1", "baselines"):
        assert key in ev, key
    assert ev["baselines"]["gzip"] > 0
    assert "bits per byte" in page.inner_text("#eval-out")
    assert "600 tokens learned" in page.inner_text("#tok-out")
    page.close()


def test_reload_resumes_from_the_saved_checkpoint(context, site_url):
    page = context.new_page()
    page.goto(f"{site_url}/demo/index.html")
    page.wait_for_function("window.tabgpt && window.tabgpt.stage === 'idle'", timeout=180_000)
    button = page.locator("#btn-resume")
    assert button.is_visible(), "no saved run offered after a reload"
    assert f"step {STEPS} of {STEPS}" in button.inner_text()
    button.click()
    page.wait_for_function("['done', 'error'].includes(window.tabgpt.stage) || "
                           "(window.tabgpt.stage !== 'training' && window.tabgpt.losses.length > 0)", timeout=300_000)
    s = _state(page)
    assert s["error"] is None, s["error"]
    assert s["step"] == STEPS and len(s["losses"]) == STEPS, "the restored run lost its history"
    # the run folder downloads as a zip and loads back (the page's download and load buttons use these)
    r = run_py(page, "import json\nb64 = await tabgpt.web.run_folder_zip()\n"
                     "json.loads(await tabgpt.web.load_run_files({'tabgpt-run.zip': b64}))")
    assert r["step"] == STEPS and len(r["losses"]) == STEPS, r
    # a bad upload says what to choose, in a sentence (no traceback), and leaves the run and its model as they were
    zipped = run_py(page, "await tabgpt.web.run_folder_zip()")
    for files, message in (({"tabgpt-run.zip": zipped[:len(zipped) // 2 // 4 * 4]}, "not a readable zip file"),
                           ({"junk.bin": "AAAA"}, "the chosen files lack config.json")):
        with pytest.raises(Exception) as e:
            run_py(page, f"await tabgpt.web.load_run_files({files!r})")
        assert message in str(e.value) and "Traceback" not in str(e.value), str(e.value)[:2000]
    assert run_py(page, "await tabgpt.web.run_folder_zip()") == zipped, "a bad upload changed the run folder"
    # the same zip through the page's own "Load run folder" input: the run shows its data, tokenizer and model
    import base64
    page.set_input_files("#run-upload", files=[{"name": "tabgpt-run.zip", "mimeType": "application/zip",
                                                "buffer": base64.b64decode(zipped)}])
    page.wait_for_function("window.tabgpt.stage === 'idle' && document.getElementById('status').textContent"
                           ".startsWith('Loaded the run')", timeout=300_000)
    assert page.input_value("#vocab") == "600" and "600 tokens" in page.inner_text("#tok-out")
    assert "for training" in page.inner_text("#data-out") and "parameters" in page.inner_text("#model-out")
    assert _state(page)["step"] == STEPS and _state(page)["error"] is None
    page.click("#btn-sample")
    page.wait_for_function("window.tabgpt.stage === 'sampling'", timeout=10_000)
    page.wait_for_function("window.tabgpt.stage !== 'sampling'", timeout=300_000)
    assert len(page.inner_text("#sample-out")) > len("ROMEO:"), "the restored model does not generate"
    page.close()


def test_blog_post_embeds_the_demo(context, site_url):
    page = context.new_page()
    page.goto(f"{site_url}/blog/train-a-gpt-in-your-tab/")
    assert "Train a GPT in your browser tab" in page.inner_text("h1")
    frame = page.locator("iframe[title='tabgpt demo']")
    assert frame.count() == 1
    page.wait_for_timeout(1500)
    page.screenshot(path=str(ARTIFACTS / "blog-post.png"), full_page=False)
    page.close()


def test_no_webgpu_shows_which_browsers_have_it(chromium, site_url):
    text = status_without_webgpu(chromium, site_url, "/demo/index.html?autostart=1",
                                 "window.tabgpt && window.tabgpt.stage === 'error'")
    assert "WebGPU" in text and "Chrome" in text and "Firefox" in text, text


def test_book_search_lists_catalogue_matches(context, site_url):
    page = context.new_page()
    page.goto(f"{site_url}/demo/index.html")
    page.wait_for_function("window.tabgpt && ['idle', 'error'].includes(window.tabgpt.stage)", timeout=180_000)
    page.check("input[name=source][value=books]")
    page.fill("#book-search", "austen")
    page.wait_for_function("document.querySelectorAll('#book-results li').length > 0", timeout=30_000)
    text = page.inner_text("#book-results")
    assert "Pride and Prejudice" in text and "Jane Austen" in text, text
    # loading without a pick says what to do instead of failing silently
    page.click("#btn-data")
    page.wait_for_function("window.tabgpt.stage === 'error'", timeout=10_000)
    assert "pick at least one book" in page.inner_text("#status")
    page.close()


def test_stopping_the_tokenizer_is_no_error_and_new_text_needs_a_new_tokenizer(context, site_url):
    page = context.new_page()
    page.goto(f"{site_url}/demo/index.html")
    page.wait_for_function("window.tabgpt && window.tabgpt.stage === 'idle'", timeout=180_000)
    idle = "window.tabgpt.stage === 'idle' && !document.querySelector('#btn-tok').disabled"
    page.click("#btn-data")                                   # the bundled Shakespeare
    page.wait_for_function(idle, timeout=120_000)
    page.evaluate("() => { const v = document.getElementById('vocab'); v.add(new Option('65536', '65536')); "
                  "v.value = '65536'; }")                     # long enough to be stopped on the way
    page.click("#btn-tok")
    page.wait_for_function("!document.querySelector('#btn-stop').disabled", timeout=30_000)
    page.click("#btn-stop")
    page.wait_for_function("window.tabgpt.stage !== 'tokenizer'", timeout=120_000)
    s = _state(page)
    assert s["stage"] == "idle" and s["error"] is None, s
    assert "Tokenizer training stopped" in page.inner_text("#status")
    page.select_option("#vocab", "512")
    page.click("#btn-tok")
    page.wait_for_function(idle + " && !document.querySelector('#btn-train').disabled", timeout=180_000)
    page.click("#btn-data")                                   # new text: the tokenizer must be trained again
    page.wait_for_function(idle, timeout=120_000)
    assert page.is_disabled("#btn-train") and page.is_enabled("#btn-tok")
    page.close()


@pytest.mark.parametrize("query, message", [
    ("corpus=nosuch", 'corpus=nosuch: "nosuch" is neither "default"'),
    ("preset=nosuch", "preset=nosuch: no such preset; choose one of tiny"),
    ("steps=abc", "steps=abc: give a whole number"),
    ("vocab=1", "vocab=1: give a whole number of tokens from 257"),
    ("corpus=999999999&preset=tiny&steps=2", "book 999999999 is not in the bundled catalogue"),   # from Python
])
def test_bad_url_settings_stop_with_what_to_give(context, site_url, query, message):
    page = context.new_page()
    page.goto(f"{site_url}/demo/index.html?{query}&autostart=1")
    page.wait_for_function("window.tabgpt && ['error', 'done', 'tokenizer', 'training'].includes(window.tabgpt.stage)",
                           timeout=180_000)
    s = _state(page)
    assert s["stage"] == "error" and message in s["error"] and "Traceback" not in s["error"], s
    assert page.inner_text("#status") == s["error"]
    page.close()
