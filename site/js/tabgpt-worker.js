// The tabgpt Web Worker (a module worker): loads Pyodide, micropip and the tabgpt wheel from this site
// itself (never from a third party), then runs Python snippets sent by the page and posts their results.
// Messages in:  {id, code}            -> Python source run with runPythonAsync; its value must be JSON-able
// Messages out: {type: "ready", manifest, seconds} | {type: "fatal", error}
//               {id, ok: true, result} | {id, ok: false, error, traceback}: error the exception's own message
//               JSON strings {"type": "event", ...} posted from Python by tabgpt.web.post()
const runtime = new URL("../runtime/", import.meta.url);
let py = null;

function status(message) { postMessage({ type: "status", message }); }

async function boot() {
  const t0 = performance.now();
  status("Fetching the runtime manifest");
  const res = await fetch(new URL("manifest.json", runtime));
  if (!res.ok) throw new Error(`runtime/manifest.json: HTTP ${res.status}; build the site with "make site"`);
  const manifest = await res.json();
  status(`Loading Python (Pyodide ${manifest.pyodide})`);
  const { loadPyodide } = await import(new URL("pyodide/pyodide.mjs", runtime).href);
  py = await loadPyodide({ indexURL: new URL("pyodide/", runtime).href });
  status("Installing micropip and tabgpt");
  await py.loadPackage(new URL(manifest.micropip, runtime).href);
  const micropip = py.pyimport("micropip");
  await micropip.install(new URL(manifest.wheel, runtime).href);
  py.runPython("import tabgpt, tabgpt.web");
  return { manifest, seconds: (performance.now() - t0) / 1000 };
}

const ready = boot().then(
  (r) => { postMessage({ type: "ready", ...r }); return true; },
  (err) => { postMessage({ type: "fatal", error: String(err && err.message || err) }); return false; },
);

self.onmessage = async (e) => {
  const { id, code } = e.data;
  if (!(await ready)) { postMessage({ id, ok: false, error: "the Python runtime failed to load" }); return; }
  try {
    let result = await py.runPythonAsync(code);
    if (result && typeof result.toJs === "function") {
      const js = result.toJs({ dict_converter: Object.fromEntries });
      result.destroy();
      result = js;
    }
    postMessage({ id, ok: true, result });
  } catch (err) {
    postMessage({ id, ok: false, ...pythonError(err) });
  }
};

// The errors tabgpt raises for bad input carry a message written for the visitor: show that alone, not the
// traceback around it (which goes to the console). Anything else is a bug: its type stays in the message.
const EXPECTED = ["RunError", "CorpusError", "TrainingError", "GPUError", "CheckpointError", "ValueError", "Cancelled"];
function pythonError(err) {
  const full = String(err && err.message || err);
  const type = err && err.type;
  if (!type || !full.includes("Traceback (most recent call last)")) return { error: full };
  const lines = full.split("\n");
  const head = new RegExp(`^(?:[\\w.]+\\.)?${type}: ?`);
  const at = lines.findLastIndex((l) => head.test(l));
  const text = at < 0 ? full : [lines[at].replace(head, ""), ...lines.slice(at + 1)].join("\n").trim();
  const error = EXPECTED.includes(type) ? text : `${type}: ${text} (details in the browser console)`;
  return { error, traceback: full };
}
