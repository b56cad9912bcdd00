// The page side of the tabgpt worker: start it, run Python in it, receive its events.
// Usage: const tg = new TabGPTWorker(); await tg.ready; const json = await tg.run("await tabgpt.web.check()");
export const WEBGPU_HELP =
  "This page trains a neural network on your GPU through WebGPU, which this browser does not offer. " +
  "WebGPU ships in Chrome and Edge 113+ (Windows, macOS, ChromeOS; Android 121+), Safari 26+ (macOS, iOS), " +
  "and Firefox 141+ on Windows. On Linux, Chrome needs chrome://flags/#enable-unsafe-webgpu. " +
  "The page must be opened over https or from localhost.";

export function hasWebGPU() { return typeof navigator !== "undefined" && !!navigator.gpu; }

export class TabGPTWorker {
  constructor(onEvent = () => {}) {
    this.worker = new Worker(new URL("./tabgpt-worker.js", import.meta.url), { type: "module" });
    this.pending = new Map();
    this.nextId = 1;
    this.onEvent = onEvent;
    this.ready = new Promise((resolve, reject) => { this._ready = { resolve, reject }; });
    this.worker.onmessage = (e) => this._message(e.data);
    this.worker.onerror = (e) => this._ready.reject(new Error(e.message || "the worker failed to start"));
  }
  _message(msg) {
    if (typeof msg === "string") { this.onEvent(JSON.parse(msg)); return; }
    if (msg.type === "ready") { this._ready.resolve(msg); return; }
    if (msg.type === "fatal") { this._ready.reject(new Error(msg.error)); return; }
    if (msg.type === "status") { this.onEvent({ type: "status", stage: "loading", message: msg.message }); return; }
    const p = this.pending.get(msg.id);
    if (!p) return;
    this.pending.delete(msg.id);
    if (msg.ok) { p.resolve(msg.result); return; }
    const err = new Error(msg.error);
    err.traceback = msg.traceback;   // Python's, where the error came from Python
    p.reject(err);
  }
  run(code) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ id, code });
    });
  }
  terminate() { this.worker.terminate(); }
}
