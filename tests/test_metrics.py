"""tabgpt.metrics: every metric against a hand computation on tiny inputs, the compression baselines against
direct gzip/bz2/lzma calls, and sample_token's distribution against the exact filtered softmax."""

import array
import bz2
import gzip
import json
import lzma
import math
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tabgpt import metrics


# ---------------------------------------------------------------------------------------------------------
# loss, bits per byte, baselines

def test_bits_per_byte_and_perplexity_by_hand():
    # 10 tokens at 2.0 nats each = 20 nats = 20 / ln 2 = 28.8539 bits, over 40 bytes = 0.721348 bits per byte
    assert metrics.bits_per_byte(2.0, 10, 40) == pytest.approx(20 / math.log(2) / 40, rel=1e-12)
    assert metrics.bits_per_byte(2.0, 10, 40) == pytest.approx(0.7213475204, abs=1e-9)
    # one token per byte at ln 2 nats = exactly one bit per byte
    assert metrics.bits_per_byte(math.log(2), 1000, 1000) == pytest.approx(1.0, rel=1e-12)
    # perplexity: a loss of ln 4 is a uniform choice among 4 tokens
    assert metrics.perplexity(math.log(4)) == pytest.approx(4.0, rel=1e-12)
    assert metrics.perplexity(0.0) == 1.0
    assert metrics.perplexity(1e6) == math.inf  # no OverflowError from a diverged run
    with pytest.raises(ValueError):
        metrics.bits_per_byte(1.0, 1, 0)


def test_compression_baselines_match_direct_compressor_calls():
    text = "To be, or not to be, that is the question: ünïcode counts as UTF-8 bytes. " * 40
    data = text.encode("utf-8")
    want = {
        "gzip": 8 * len(gzip.compress(data, compresslevel=9, mtime=0)) / len(data),
        "bz2": 8 * len(bz2.compress(data, 9)) / len(data),
        "lzma": 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / len(data),
    }
    for source in (text, data):
        got = metrics.compression_baselines(source)
        print("got", got, "want", want)
        assert got == want
    # all three compress repetitive text far below 8 bits per byte
    assert all(v < 1.0 for v in want.values()), want


def test_a_missing_compressor_is_reported_as_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "lzma", None)  # `import lzma` now raises ImportError, as in some browsers
    got = metrics.compression_baselines("hello hello hello")
    assert got["lzma"] is None and got["gzip"] > 0 and got["bz2"] > 0, got


def test_unigram_bits_per_byte_by_hand():
    # train [0, 0, 1], vocab 4: counts 2, 1, 0, 0; add-one over 3 + 4 = 7: p = 3/7, 2/7, 1/7, 1/7
    # eval [0, 2, 3, 0] over 8 bytes: bits = -(2 log2(3/7) + 2 log2(1/7)) = 2.44479 + 5.61471 = 8.05950,
    # / 8 bytes = 1.0074368 bits per byte
    want = -(2 * math.log2(3 / 7) + 2 * math.log2(1 / 7)) / 8
    assert want == pytest.approx(1.0074368, abs=1e-7)
    assert metrics.unigram_bits_per_byte([0, 0, 1], [0, 2, 3, 0], 4, 8) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        metrics.unigram_bits_per_byte([0, 5], [0], 4, 1)


def test_unigram_bits_per_byte_matches_numpy_on_random_tokens():
    rng = np.random.default_rng(1)
    V = 50
    train = rng.zipf(1.5, 5000) % V
    held = rng.zipf(1.5, 800) % V
    p = (np.bincount(train, minlength=V) + 1) / (len(train) + V)
    want = -np.log2(p[held]).sum() / 3000
    got = metrics.unigram_bits_per_byte(train.tolist(), array.array("l", held.tolist()), V, 3000)
    assert got == pytest.approx(want, rel=1e-10), (got, want)


# ---------------------------------------------------------------------------------------------------------
# sample metrics

def test_words_are_lowercased_letter_runs():
    assert metrics.words("Don't stop, Romeo! 3 times_over") == ["don", "t", "stop", "romeo", "times", "over"]
    assert metrics.word_set("The cat; the CAT.") == {"the", "cat"}


def test_real_word_share_by_hand():
    train = "The cat sat on the mat."
    # sample words: the, dog, sat, the, cat -> known: the, sat, the, cat = 4 of 5
    assert metrics.real_word_share("the dog sat, the CAT!", train) == pytest.approx(4 / 5)
    assert metrics.real_word_share("the dog sat, the CAT!", metrics.word_set(train)) == pytest.approx(4 / 5)
    assert metrics.real_word_share("xq zzv", train) == 0.0
    assert metrics.real_word_share("1234 !!", train) == 0.0  # no words at all


def test_repetition_rate_by_hand():
    # 9 words -> 6 four-grams: abcd bcda cdab dabc abcd* bcda*: 2 repeat an earlier one -> 2/6
    assert metrics.repetition_rate("a b c d a b c d a") == pytest.approx(2 / 6)
    assert metrics.repetition_rate("a b c d e f g") == 0.0
    assert metrics.repetition_rate("a a a a a a") == pytest.approx(2 / 3)  # aaaa x3, the last two repeat
    assert metrics.repetition_rate("too short") == 0.0
    # n=2 on "a b a b a": ab ba ab* ba* -> 2/4
    assert metrics.repetition_rate("a b a b a", n=2) == pytest.approx(0.5)


def test_distinct_n_by_hand():
    # bigrams of "a b a b a": ab ba ab ba -> 2 distinct of 4
    assert metrics.distinct_n("a b a b a", 2) == pytest.approx(0.5)
    # unigrams: a, b distinct of 5 words
    assert metrics.distinct_n("a b a b a", 1) == pytest.approx(2 / 5)
    assert metrics.distinct_n("one two three", 3) == 1.0
    assert metrics.distinct_n("one", 2) == 0.0


# ---------------------------------------------------------------------------------------------------------
# sample_token

def reference_probs(logits, vocab_size, temperature, top_k, top_p):
    """The filtered softmax, written out as Hugging Face's warpers compute it (numpy, float64)."""
    x = np.asarray(logits[:vocab_size], dtype=np.float64) / temperature
    if top_k:
        kth = np.sort(x)[::-1][min(top_k, vocab_size) - 1]
        x = np.where(x < kth, -np.inf, x)  # TopKLogitsWarper: remove scores below the k-th, ties kept
    if top_p is not None and top_p < 1.0:
        order = np.argsort(x, kind="stable")  # ascending
        p_sorted = np.exp(x[order] - x.max())
        p_sorted /= p_sorted.sum()
        remove = np.cumsum(p_sorted) <= 1 - top_p  # TopPLogitsWarper
        remove[-1] = False  # keep at least one token
        x[order[remove]] = -np.inf
    p = np.exp(x - x.max())
    return p / p.sum()


LOGITS = [2.0, 1.0, 0.3, -0.4, 1.6, -2.0, 0.9, 50.0, 60.0]  # ids 7 and 8 are padding: never to be drawn
V = 7
CASES = [
    (1.0, None, None),
    (0.7, 3, None),
    (1.3, None, 0.8),
    (1.0, 5, 0.7),
    (2.0, None, 0.95),
]


@pytest.mark.parametrize("temperature,top_k,top_p", CASES)
def test_sample_token_distribution_matches_the_filtered_softmax(temperature, top_k, top_p):
    p = reference_probs(LOGITS, V, temperature, top_k, top_p)
    rng = random.Random(1234)
    n = 30000
    rows = (LOGITS, array.array("f", LOGITS))
    counts = np.zeros(V)
    for i in range(n):
        counts[metrics.sample_token(rows[i % 2], V, temperature, top_k, top_p, rng)] += 1
    freq = counts / n
    sigma = np.sqrt(p * (1 - p) / n)
    print("probabilities", np.round(p, 4), "\nfrequencies  ", np.round(freq, 4))
    # filtered-out tokens are never drawn; the rest lie within 5 standard errors (seeded: deterministic)
    assert np.all(counts[p == 0] == 0), (p, counts)
    assert np.all(np.abs(freq - p) <= 5 * sigma + 1e-12), np.abs(freq - p) / np.maximum(sigma, 1e-12)
    chi2 = float((((counts - n * p) ** 2)[p > 0] / (n * p[p > 0])).sum())
    df = int((p > 0).sum()) - 1
    print("chi-square %.2f with %d degrees of freedom" % (chi2, df))
    assert chi2 < 28.0, chi2  # the 99.99th percentile of chi-square with 6 degrees of freedom is 27.9


class Grid:
    """A stand-in for random.Random whose random() walks a fine grid of [0, 1): the share of the grid that
    maps to each token is then its probability up to 1/M, with no sampling noise."""

    def __init__(self, m):
        self.m, self.i = m, 0

    def random(self):
        self.i += 1
        return (self.i - 0.5) / self.m


@pytest.mark.parametrize("temperature,top_k,top_p", CASES)
def test_sample_token_inverse_cdf_is_exact_on_a_grid(temperature, top_k, top_p):
    p = reference_probs(LOGITS, V, temperature, top_k, top_p)
    m = 20000
    grid = Grid(m)
    counts = np.bincount([metrics.sample_token(LOGITS, V, temperature, top_k, top_p, grid) for _ in range(m)],
                         minlength=V)
    assert np.abs(counts / m - p).max() <= 2 / m, (counts / m, p)


def test_top_p_cut_exactly_at_the_boundary():
    # weights 1, 1/2, 1/4, 1/4 (exact in floats): probabilities 1/2, 1/4, 1/8, 1/8. With top_p = 3/4 the first
    # two tokens hold exactly 3/4: HF removes tokens whose ascending cumulative probability is <= 1/4, i.e. the
    # two eighths, and keeps {0, 1}
    ln2 = math.log(2)
    logits = [0.0, -ln2, -2 * ln2, -2 * ln2]
    assert list(reference_probs(logits, 4, 1.0, None, 0.75)) == [2 / 3, 1 / 3, 0.0, 0.0]
    grid = Grid(3000)
    counts = np.bincount([metrics.sample_token(logits, 4, 1.0, None, 0.75, grid) for _ in range(3000)], minlength=4)
    assert list(counts) == [2000, 1000, 0, 0], counts


def test_top_p_with_a_long_flat_tail():
    # token 0 holds 1/2.1 of the mass, 1000 slightly different small tokens the rest: top_p = 0.5 needs token 0
    # plus a few dozen of the largest small ones, which are easy to lose when pruning the tail before the sort
    logits = [0.0] + [math.log(0.0011 * (1 + 1e-3 * i / 1000)) for i in range(1000)]
    p = reference_probs(logits, 1001, 1.0, None, 0.5)
    assert 10 < (p > 0).sum() < 100, (p > 0).sum()
    m = 3000
    grid = Grid(m)
    counts = np.bincount([metrics.sample_token(logits, 1001, 1.0, None, 0.5, grid) for _ in range(m)],
                         minlength=1001)
    assert np.all(counts[p == 0] == 0), np.nonzero(counts[p == 0])
    assert abs(counts[0] / m - p[0]) <= 2 / m, (counts[0] / m, p[0])
    assert np.abs(counts / m - p).max() <= 2 / m, np.abs(counts / m - p).max()


def test_reference_filter_agrees_with_hugging_face_warpers():
    """Checks the test's own reference against transformers (installed natively for such checks)."""
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    for temperature, top_k, top_p in CASES:
        scores = torch.tensor([LOGITS[:V]], dtype=torch.float64)
        scores = lp.TemperatureLogitsWarper(temperature)(None, scores)
        if top_k:
            scores = lp.TopKLogitsWarper(top_k)(None, scores)
        if top_p is not None:
            scores = lp.TopPLogitsWarper(top_p)(None, scores)
        want = torch.softmax(scores, dim=-1)[0].numpy()
        got = reference_probs(LOGITS, V, temperature, top_k, top_p)
        assert np.allclose(got, want, atol=1e-12), (temperature, top_k, top_p, got, want)


def test_greedy_cases_equal_argmax_and_padding_is_never_chosen():
    rng = random.Random(0)
    for trial in range(50):
        vocab = rng.randrange(2, 300)
        row = [rng.gauss(0, 2) for _ in range(vocab)] + [100.0] * rng.randrange(0, 64)  # padded ids win argmax
        best = int(np.argmax(row[:vocab]))
        assert metrics.sample_token(row, vocab, 0.0, None, None, rng) == best
        assert metrics.sample_token(row, vocab, 1.0, 1, None, rng) == best  # top-k 1
        assert metrics.sample_token(row, vocab, 1.0, None, 1e-9, rng) == best  # tiny top-p
        assert metrics.sample_token(array.array("f", row), vocab, 0.8, 1, 0.5, rng) == best
    row = [0.0] * 5 + [30.0] * 3  # 5 real ids, 3 padded ones that would hold nearly all the mass
    drawn = {metrics.sample_token(row, 5, 1.0, None, None, rng) for _ in range(2000)}
    assert drawn == {0, 1, 2, 3, 4}, drawn


def test_top_k_keeps_ties_with_the_kth_like_hugging_face():
    # logits 1, 1, 1, 0 with top_k=2: the three tied ones stay (HF removes only scores < the k-th)
    drawn = {metrics.sample_token([1.0, 1.0, 1.0, 0.0], 4, 1.0, 2, None, random.Random(s)) for s in range(300)}
    assert drawn == {0, 1, 2}, drawn


def test_bad_rows_raise():
    with pytest.raises(ValueError, match="vocab_size"):
        metrics.sample_token([0.0, 1.0], 3, 1.0, None, None, random.Random(0))
    with pytest.raises(ValueError, match="NaN"):
        metrics.sample_token([0.0, math.inf], 2, 1.0, None, None, random.Random(0))
    with pytest.raises(ValueError, match="NaN"):
        metrics.sample_token([0.0, math.nan, 1.0], 3, 1.0, None, None, random.Random(0))


def test_sample_token_is_fast_enough_for_gpt2_vocab():
    rng = random.Random(0)
    row = array.array("f", [rng.gauss(0, 3) for _ in range(50304)])  # GPT-2's 50257 padded to 50304
    worst = {}
    for args in [(1.0, None, None), (0.8, 50, None), (1.0, None, 0.9), (0.9, 200, 0.95), (0.0, None, None)]:
        metrics.sample_token(row, 50257, *args, rng=rng)
        t0 = time.perf_counter()
        for _ in range(5):
            assert metrics.sample_token(row, 50257, *args, rng=rng) < 50257
        worst[args] = (time.perf_counter() - t0) / 5 * 1e3
    print("ms per draw:", {k: round(v, 2) for k, v in worst.items()})
    assert max(worst.values()) < 100, worst  # a few ms on a laptop; generous for a busy 2-core CI machine


# ---------------------------------------------------------------------------------------------------------
# the same code inside Pyodide (CPython in WebAssembly, run by Node: no browser needed)

PYODIDE = Path(__file__).resolve().parent.parent / "build" / "node_modules" / "pyodide"

IN_PYODIDE = r'''
import array, json, random, sys
sys.path.insert(0, "/pkg")
from tabgpt import metrics, safetensors as st
out = {"python": sys.version.split()[0], "platform": sys.platform}
out["baselines"] = metrics.compression_baselines("to be or not to be, " * 200)
row = [0.5, -1.0, 2.0, 0.1, 1.5, 9.0]
rng = random.Random(7)
out["draws"] = [metrics.sample_token(row, 5, 0.9, 4, 0.9, rng) for _ in range(200)]
st.save("/tmp/a.safetensors", {"w": ("F32", (2, 2), array.array("f", [1, 2, 3, 4]))}, {"step": "1"})
data = st.save("/tmp/a.safetensors", {"w": ("F32", (3,), array.array("f", [5, 6, 7])),
                                      "n": ("I64", (), array.array("q", [-3]))}, {"step": "2"})
tensors, meta = st.load("/tmp/a.safetensors")
out["file"] = bytes(data).hex()
out["loaded"] = [meta, tensors["w"][2].cast("f").tolist(), tensors["n"][2].cast("q").tolist()]
try:
    st.load(bytes(data[:-1]), name="cut.safetensors")
except st.CheckpointError as e:
    out["error"] = str(e)
json.dumps(out)
'''

NODE_MAIN = r'''
import { readFileSync } from "node:fs";
const [pyodideDir, pkgDir, codeFile] = process.argv.slice(2);
const { loadPyodide } = await import(pyodideDir + "/pyodide.mjs");
const py = await loadPyodide({ indexURL: pyodideDir + "/" });
py.FS.mkdirTree("/pkg/tabgpt");
for (const name of ["__init__.py", "metrics.py", "safetensors.py"])
  py.FS.writeFile("/pkg/tabgpt/" + name, readFileSync(pkgDir + "/" + name));
console.log(py.runPython(readFileSync(codeFile, "utf8")));
'''


def test_metrics_and_checkpoints_give_the_same_results_in_pyodide(tmp_path):
    node = shutil.which("node")
    if node is None or not (PYODIDE / "pyodide.mjs").exists():
        pytest.skip("needs node and build/node_modules/pyodide (make setup installs both)")
    (tmp_path / "main.mjs").write_text(NODE_MAIN)
    (tmp_path / "check.py").write_text(IN_PYODIDE)
    pkg = Path(metrics.__file__).resolve().parent
    proc = subprocess.run([node, str(tmp_path / "main.mjs"), str(PYODIDE), str(pkg), str(tmp_path / "check.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    print({k: v for k, v in got.items() if k != "file"})
    assert got["platform"] == "emscripten", got["platform"]

    # the same computations natively
    native = {}
    exec(IN_PYODIDE.replace('"/tmp/a.safetensors"', repr(str(tmp_path / "a.safetensors"))), native)
    want = json.loads(json.dumps(native["out"]))  # tuples -> lists, as they came from Pyodide
    assert got["file"] == want["file"], "the checkpoint bytes differ between Pyodide and native Python"
    assert got["loaded"] == want["loaded"] == [{"step": "2"}, [5.0, 6.0, 7.0], [-3]], got["loaded"]
    assert got["draws"] == want["draws"], (got["draws"], want["draws"])
    assert got["error"] == want["error"] and "cut.safetensors" in got["error"], got["error"]
    for name, bpb in want["baselines"].items():  # zlib/bzip2/xz builds may differ by a few bytes
        assert got["baselines"][name] is None or abs(got["baselines"][name] - bpb) < 0.05 * bpb, (name, got, want)
