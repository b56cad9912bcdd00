// The demo page: it only displays. A module Web Worker runs Python (Pyodide + the tabgpt wheel); every stage is
// one call into tabgpt.web, which posts events back. window.tabgpt mirrors the state for tests and the curious:
// {stage, step, losses, val_losses, sample, eval, error}; stage is one of
// idle, loading, data, tokenizer, training, sampling, evaluating, done, error.
// URL hooks: ?corpus=default&preset=tiny&steps=N&autostart=1 runs the whole pipeline unattended.
import { TabGPTWorker, hasWebGPU, WEBGPU_HELP } from "./tabgpt-client.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const state = window.tabgpt = { stage: "idle", step: 0, losses: [], val_losses: [], sample: "", eval: null,
                                error: null, events: 0 };
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
const fmt = (x, d = 3) => (x === null || x === undefined || Number.isNaN(x)) ? "–" : Number(x).toFixed(d);
const human = (n) => n >= 1e9 ? (n / 1e9).toFixed(2) + " G" : n >= 1e6 ? (n / 1e6).toFixed(2) + " M"
                   : n >= 1e3 ? (n / 1e3).toFixed(1) + " k" : String(Math.round(n));
const secs = (s) => s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.round(s % 3600 / 60)} min`
                  : s >= 60 ? `${Math.floor(s / 60)} min ${Math.round(s % 60)} s` : `${Math.round(s)} s`;
let tg = null;
function toBase64(bytes) {  // chunked: String.fromCharCode(...big) overflows the stack
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}
let chart = null;
let presets = {};

function setStage(stage) {
  state.stage = stage; document.body.dataset.stage = stage;
  if (stage !== "error") state.error = null;   // an error belongs to the step that failed, not to the next ones
}
function setStatus(text, cls = "") { $("status").textContent = text; $("status").className = "tg-status " + cls; }
function fail(err) {
  const msg = String(err && err.message || err);
  if (err && err.traceback) console.error(err.traceback);
  state.error = msg; setStage("error"); setStatus(msg, "bad");
  $("btn-pause").disabled = $("btn-stop").disabled = $("btn-sample-stop").disabled = true;
  $("btn-pause").textContent = "Pause";
  enable(true);
}
function enable(ok) {   // ok: the buttons that fit the state; else none (work is running)
  for (const id of ["btn-data", "btn-tok", "btn-train", "btn-sample", "btn-eval", "btn-download", "btn-resume",
                    "run-upload"]) $(id).disabled = !ok;
  if (ok) { $("btn-tok").disabled = !state.dataReady; $("btn-train").disabled = !state.tokReady;
            $("btn-sample").disabled = $("btn-eval").disabled = $("btn-download").disabled = !state.modelReady; }
}
async function py(code) { return JSON.parse(await tg.run(code)); }
const pyArg = (obj) => `__import__('json').loads(${JSON.stringify(JSON.stringify(obj))})`;

// ---- chart (uPlot): train loss and validation loss against the step
function initChart() {
  const el = $("chart");
  const opts = {
    width: Math.min(el.clientWidth || 760, 900), height: 260,
    scales: { x: { time: false } },
    axes: [{ label: "step" }, { label: "loss (nats/token)" }],
    series: [{ label: "step" },
             { label: "train", stroke: "#4f46e5", width: 1.5, spanGaps: true },
             { label: "validation", stroke: "#f59e0b", width: 2, points: { show: true, size: 6 }, spanGaps: true }],
  };
  chart = new uPlot(opts, [[], [], []], el);
}
function redraw() {
  if (!chart) return;
  const steps = new Map();
  for (const [s, l] of state.losses) steps.set(s, [l, null]);
  for (const [s, l] of state.val_losses) steps.set(s, [(steps.get(s) || [null])[0], l]);
  const xs = [...steps.keys()].sort((a, b) => a - b);
  chart.setData([xs, xs.map((s) => steps.get(s)[0]), xs.map((s) => steps.get(s)[1])]);
}

// ---- events from Python
function onEvent(ev) {
  state.events++;
  switch (ev.type) {
    case "status": setStatus(ev.message); break;
    case "fetch": setStatus(ev.message); break;
    case "tokenizer_progress":
      $("tok-progress").hidden = false; $("tok-progress").max = ev.total || 1; $("tok-progress").value = ev.done || 0;
      break;
    case "start": $("train-stats").innerHTML = `${human(ev.n_params)} parameters, ${human(ev.tokens_per_step)} tokens per step`; break;
    case "step":
      state.step = ev.step; state.losses.push([ev.step, ev.loss]);
      $("train-stats").innerHTML = `<b>step ${ev.step}</b> / ${state.maxSteps} · loss ${fmt(ev.loss)} · ` +
        `${human(ev.tokens_per_s)} tokens/s · ${fmt(ev.gflops, 1)} GFLOP/s · ${secs(ev.eta)} left`;
      redraw(); break;
    case "eval": state.val_losses.push([ev.step, ev.val_loss]); redraw(); break;
    case "sample": $("train-sample").hidden = false; $("train-sample").textContent = `step ${ev.step}:\n${ev.text}`;
      state.sample = ev.text; break;
    case "nan": setStatus(ev.message, "bad"); break;
    case "checkpoint": setStatus(`checkpoint saved at step ${ev.step}`); break;
    case "token": $("sample-out").textContent += ev.text; break;
    case "paused": setStatus(`Paused at step ${ev.step}: press Continue to go on.`); break;
  }
}

// ---- stages
function sourceFromUI() {
  const kind = document.querySelector("input[name=source]:checked").value;
  if (kind === "books") {
    const ids = [...document.querySelectorAll("#book-results input:checked")].map((i) => Number(i.value));
    if (!ids.length) throw new Error("pick at least one book from the search results");
    return { books: ids };
  }
  if (kind === "text") return { text: $("paste").value };
  if (kind === "file") {
    if (state.fileB64 === undefined) throw new Error("choose a file first");
    return { upload: { name: state.fileName, b64: state.fileB64 } };
  }
  return "default";
}

function showData(r) {
  const rows = r.sources.map((s) => `<tr><td>${esc(s.title || s.name || "")}</td><td>${human(s.bytes)}B</td>` +
    `<td>${human(s.words)} words</td></tr>`).join("");
  $("data-out").innerHTML = `<table>${rows}</table><p>${human(r.train_bytes)}B for training, ` +
    `${human(r.val_bytes)}B held out for validation.</p>` +
    (r.notices || []).map((n) => `<p class="tg-hint">${esc(n)}</p>`).join("");
}

function setVocab(n) {   // the dropdown shows n, added to its choices where it is not among them
  const v = String(n);
  if (![...$("vocab").options].some((o) => o.value === v)) $("vocab").add(new Option(v, v));
  $("vocab").value = v;
}

async function loadData(source) {
  setStage("data"); setStatus("Loading the text…"); enable(false);
  const r = await py(`await tabgpt.web.load_data(${pyArg(source)})`);
  showData(r);
  // new text: the tokenizer and the model are of the old one (its ids, its vocabulary) until trained again
  state.dataReady = true; state.tokReady = state.modelReady = false; enable(true); setStage("idle");
  setStatus("Text loaded. Next: train the tokenizer.", "ok");
  return r;
}

async function trainTokenizer() {
  setStage("tokenizer"); setStatus("Training the byte-level BPE tokenizer…"); enable(false);
  const vocab = Number($("vocab").value);
  $("btn-stop").disabled = false;  // cancels the tokenizer
  let r;
  try { r = await py(`await tabgpt.web.train_tokenizer(${vocab})`); }
  catch (err) {
    if (!/training cancelled/.test(String(err && err.message))) throw err;
    enable(true); setStage("idle");   // the visitor's Stop: no error
    setStatus("Tokenizer training stopped. Train it again when you are ready.", "ok");
    return null;
  }
  finally { $("btn-stop").disabled = true; $("tok-progress").hidden = true; }
  state.modelReady = false;   // a model speaks the old tokenizer's ids
  const colors = ["#dbeafe", "#fde68a", "#bbf7d0", "#fbcfe8", "#ddd6fe", "#fed7aa"];
  const pieces = r.preview.map(([text, id], i) =>
    `<span class="tg-tok" style="background:${colors[i % colors.length]}" title="${id}">${esc(text)}</span>`).join("");
  const short = r.vocab_size < vocab ? ` (of the ${vocab} asked for: the text ran out of pairs to merge)` : "";
  $("tok-out").innerHTML = `<p>${r.vocab_size} tokens learned${short} in ${fmt(r.seconds, 1)} s; ` +
    `<b>${fmt(r.bytes_per_token, 2)} bytes per token</b> on held-out text; ${human(r.train_tokens)} training tokens.</p>` +
    `<div class="tg-tokens">${pieces}</div>`;
  state.tokReady = true; enable(true); setStage("idle");
  setStatus("Tokenizer ready. Next: train the model.", "ok");
  return r;
}

async function trainModel(steps) {
  setStage("training"); enable(false);
  // a new run: nothing of the last one stays on show, and the saved run it replaces is no longer offered
  state.losses = []; state.val_losses = []; state.step = 0; state.sample = ""; state.eval = null; redraw();
  $("train-sample").hidden = true; $("train-sample").textContent = ""; $("eval-out").innerHTML = "";
  $("sample-out").textContent = ""; $("train-stats").innerHTML = ""; $("btn-resume").hidden = true;
  $("btn-pause").textContent = "Pause";
  const preset = $("preset").value;
  state.maxSteps = steps;
  setStatus("Compiling the kernels and allocating the model on the GPU…");
  const m = await py(`await tabgpt.web.build_model(${pyArg({ preset, max_steps: steps })})`);
  $("model-out").innerHTML = modelSummary(m);
  setStatus("Training…");
  $("btn-pause").disabled = $("btn-stop").disabled = false;   // (ignored while compiling: enabled only now)
  const r = await py(`await tabgpt.web.train()`);
  $("btn-pause").disabled = $("btn-stop").disabled = true; $("btn-pause").textContent = "Pause";
  state.modelReady = true; enable(true); setStage("idle");
  if (r.sample) { state.sample = r.sample; $("train-sample").hidden = false; $("train-sample").textContent = r.sample; }
  setStatus(`${r.type === "done" ? "Training finished" : "Training stopped"} at step ${r.step}: loss ${fmt(r.loss)}. Next: sample or evaluate.`, "ok");
  return r;
}

function modelSummary(m) {
  return `<p>${human(m.n_params)} parameters (${m.config.n_layer} layers, ${m.config.n_head} heads, ` +
    `${m.config.n_embd} wide, context ${m.config.block_size}), ${human(m.gpu_bytes)}B on the GPU, ` +
    `${fmt(m.compile_seconds, 1)} s to compile ${m.kernels} kernels.</p>`;
}

async function sample() {
  const field = (id) => $(id).value.trim() === "" ? null : Number($(id).value);   // empty: none (no cut)
  const tokens = field("max-tokens");
  if (tokens === null || !Number.isInteger(tokens) || tokens < 1 || tokens > 2000)
    throw new Error(`Tokens: give a whole number from 1 to 2000, not "${$("max-tokens").value}"`);
  const opts = { prompt: $("prompt").value, temperature: field("temperature") ?? 0.8, top_k: field("top-k"),
                 top_p: field("top-p"), max_new_tokens: tokens, seed: Math.floor(Math.random() * 1e9) };
  setStage("sampling"); enable(false);
  $("sample-out").textContent = $("prompt").value;
  $("btn-sample-stop").disabled = false;
  let r;
  try { r = await py(`await tabgpt.web.sample(${pyArg(opts)})`); }
  finally { $("btn-sample-stop").disabled = true; }
  $("sample-out").textContent = r.text;
  state.sample = r.text; enable(true); setStage("idle");
  setStatus(`Generated ${r.tokens} tokens at ${fmt(r.tokens_per_s, 1)} tokens/s.`, "ok");
  return r;
}

async function evaluate() {
  setStage("evaluating"); enable(false); setStatus("Evaluating on the held-out text…");
  const r = await py(`await tabgpt.web.evaluate()`);
  state.eval = r;
  const b = r.baselines || {};
  const bar = (name, v, best) => v == null ? "" : `<tr><td>${name}</td><td>${fmt(v)}</td><td><div class="tg-bar" style="width:${Math.min(100, 100 * v / best)}%"></div></td></tr>`;
  const worst = Math.max(r.bits_per_byte, ...Object.values(b).filter((x) => x != null), r.unigram_bits_per_byte || 0);
  $("eval-out").innerHTML = `<p>Validation loss ${fmt(r.val_loss)} nats/token, perplexity ${fmt(r.perplexity, 1)}, ` +
    `next-token accuracy ${fmt(100 * r.top1, 1)}% over ${human(r.tokens)} tokens.</p>` +
    `<table class="tg-bpb"><tr><th>bits per byte (lower is better)</th><th></th><th></th></tr>` +
    bar("<b>this GPT</b>", r.bits_per_byte, worst) + bar("gzip -9", b.gzip, worst) + bar("bzip2 -9", b.bz2, worst) +
    bar("xz / lzma -9e", b.lzma, worst) + bar("unigram model", r.unigram_bits_per_byte, worst) + `</table>` +
    (r.real_word_share != null ? `<p>Samples: ${fmt(100 * r.real_word_share, 1)}% of generated words occur in the training text; ` +
     `${fmt(100 * r.repetition_rate, 1)}% of 4-grams repeat.</p>` : "");
  enable(true); setStage("idle");
  setStatus("Evaluation done.", "ok");
  return r;
}

async function downloadRun() {
  const b64 = await tg.run(`await tabgpt.web.run_folder_zip()`);
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([bytes], { type: "application/zip" }));
  a.download = "tabgpt-run.zip"; a.click();
}

function showRestored(r) {   // a run restored from the browser's storage or a loaded folder: what it was made of
  state.dataReady = state.tokReady = state.modelReady = true;
  if (r.data) showData(r.data);
  if (r.tokenizer) {
    setVocab(r.tokenizer.vocab_size);
    $("tok-out").innerHTML = `<p>The run's tokenizer: ${r.tokenizer.vocab_size} tokens, ` +
      `<b>${fmt(r.tokenizer.bytes_per_token, 2)} bytes per token</b> on held-out text.</p>`;
  }
  $("model-out").innerHTML = modelSummary(r.model);
  state.losses = r.losses || []; state.val_losses = r.val_losses || []; redraw();
  state.step = r.step; state.maxSteps = r.max_steps;
  state.eval = null; $("eval-out").innerHTML = ""; $("sample-out").textContent = "";
}

async function resumeSaved() {
  setStage("training"); enable(false); $("btn-resume").hidden = true;
  setStatus("Restoring the saved run…");
  const r = await py(`await tabgpt.web.resume_saved()`);
  showRestored(r);
  $("steps").value = r.max_steps;
  if (r.step < r.max_steps) {
    $("btn-pause").disabled = $("btn-stop").disabled = false;
    setStatus(`Resumed from step ${r.step}; training on…`);
    const t = await py(`await tabgpt.web.train()`);
    $("btn-pause").disabled = $("btn-stop").disabled = true; $("btn-pause").textContent = "Pause";
    setStatus(`Training ${t.type === "done" ? "finished" : "stopped"} at step ${t.step}.`, "ok");
  } else {
    setStatus(`Restored the finished run (step ${r.step}).`, "ok");
  }
  enable(true); setStage("idle");
  return r;
}

// The URL's settings, checked before any work: {source, preset, steps, vocab}, or an Error that says what to give.
const WHOLE = /^\d+$/;
function urlSettings() {
  const items = (params.get("corpus") || "default").split(",").map((x) => x.trim()).filter((x) => x);
  const source = [];
  for (const x of items) {
    if (x === "default") source.push("default");
    else if (WHOLE.test(x) || /^[A-Za-z0-9._-]+_\d+$/.test(x)) source.push({ book: x });
    else throw new Error(`corpus=${params.get("corpus")}: "${x}" is neither "default", a Project Gutenberg id ` +
                         "(such as 1342) nor a GITenberg repository name (such as Pride-and-Prejudice_1342); " +
                         "separate several with commas");
  }
  const preset = params.get("preset") || $("preset").value;
  if (!presets[preset])
    throw new Error(`preset=${preset}: no such preset; choose one of ${Object.keys(presets).join(", ")}`);
  if (!presets[preset].fits)
    throw new Error(`preset=${preset} is too big for this GPU's limits; choose a smaller one`);
  const steps = params.get("steps") || $("steps").value;
  if (!WHOLE.test(steps) || Number(steps) < 1)
    throw new Error(`steps=${steps}: give a whole number of training steps, at least 1`);
  const vocab = params.get("vocab") || String(presets[preset].vocab_size);
  if (!WHOLE.test(vocab) || Number(vocab) < 257 || Number(vocab) > MAX_VOCAB)
    throw new Error(`vocab=${vocab}: give a whole number of tokens from 257 (the 256 bytes and end-of-text) ` +
                    `to ${MAX_VOCAB}`);
  return { source: source.length === 1 ? source[0] : source, preset, steps: Number(steps), vocab };
}
const MAX_VOCAB = 65536;

async function unattended() {
  const { source, preset, steps, vocab } = urlSettings();
  $("preset").value = preset;
  $("steps").value = steps;
  setVocab(vocab);
  await loadData(source);
  await trainTokenizer();
  await trainModel(steps);
  await sample();
  await evaluate();
  setStage("done");
  setStatus("Done: data, tokenizer, training, sampling and evaluation all ran in this tab.", "ok");
}

async function main() {
  if (params.get("embed") === "1") document.body.classList.add("tg-embed");
  for (const r of document.querySelectorAll("input[name=source]")) r.addEventListener("change", () => {
    for (const d of document.querySelectorAll(".tg-source")) d.hidden = d.dataset.source !== r.value || !r.checked;
  });
  if (!hasWebGPU()) { state.error = "no-webgpu"; setStage("error"); setStatus(WEBGPU_HELP, "bad"); return; }
  setStage("loading"); initChart();
  tg = new TabGPTWorker(onEvent);
  window.tabgptWorker = tg;
  const boot = await tg.ready;
  const dev = await py(`await tabgpt.web.open_session()`);
  presets = dev.presets;
  for (const [name, p] of Object.entries(presets)) {
    const opt = new Option(`${name}: ${p.n_layer} layers × ${p.n_embd}, context ${p.block_size}, ${human(p.n_params)} parameters, ` +
      `~${human(p.gpu_bytes)}B of GPU memory` + (p.fits ? "" : " (too big for this GPU)"), name);
    opt.disabled = !p.fits; $("preset").add(opt);
  }
  $("preset").value = dev.default_preset;
  $("steps").value = presets[dev.default_preset].max_steps;
  setStatus(`Python ready in ${fmt(boot.seconds, 1)} s · GPU: ${dev.adapter}` + (dev.fallback ? " (a software fallback: expect it to be slow)" : ""), "ok");
  setStage("idle");
  $("btn-data").disabled = false;
  $("btn-data").onclick = () => { try { loadData(sourceFromUI()).catch(fail); } catch (e) { fail(e); } };
  $("btn-tok").onclick = () => trainTokenizer().catch(fail);
  $("btn-train").onclick = () => trainModel(Number($("steps").value)).catch(fail);
  $("btn-pause").onclick = async () => {
    const paused = await py(`tabgpt.web.toggle_pause()`);
    $("btn-pause").textContent = paused ? "Continue" : "Pause";
  };
  $("btn-stop").onclick = () => tg.run(`tabgpt.web.request_stop()`);
  $("btn-sample-stop").onclick = () => tg.run(`tabgpt.web.request_stop()`);
  $("btn-sample").onclick = () => sample().catch(fail);
  $("btn-eval").onclick = () => evaluate().catch(fail);
  $("btn-download").onclick = () => downloadRun().catch(fail);
  $("btn-resume").onclick = () => resumeSaved().catch(fail);
  $("file-input").onchange = async (e) => {
    const f = e.target.files[0]; state.fileName = f.name; state.fileB64 = toBase64(new Uint8Array(await f.arrayBuffer()));
  };
  $("run-upload").onchange = async (e) => {
    const files = {};
    for (const f of e.target.files) files[f.name] = toBase64(new Uint8Array(await f.arrayBuffer()));
    setStage("loading"); enable(false); setStatus("Checking and loading the run folder…");
    try { const r = await py(`await tabgpt.web.load_run_files(${pyArg(files)})`); showRestored(r);
          setStatus(`Loaded the run at step ${r.step}.`, "ok"); enable(true); setStage("idle");
    } catch (err) { fail(err); }
  };
  let timer = null;
  $("book-search").oninput = (e) => {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const hits = await py(`tabgpt.web.search_books(${pyArg(e.target.value)})`);
      $("book-results").innerHTML = hits.map((b) => `<li><label><input type="checkbox" value="${b.id}"> ` +
        `${esc(b.title)} <span class="tg-hint">${esc(b.author || "")}</span></label></li>`).join("");
    }, 150);
  };
  if (dev.saved) {
    $("btn-resume").hidden = false;
    $("btn-resume").textContent = `Resume saved run (step ${dev.saved.step} of ${dev.saved.max_steps})`;
  }
  if (params.get("autostart") === "1") {
    if (params.get("resume") === "1" && dev.saved) await resumeSaved(); else await unattended();
  }
}

main().catch(fail);
