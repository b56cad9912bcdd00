"""The byte-level BPE (tabgpt.bpe): a hand-checked example, a slow reference trainer, round trips on awkward text
and bytes, save/load, and equality with Hugging Face `tokenizers` (training, pre-tokenisation and encoding)."""

import argparse
import asyncio
import json
import random
import re
import unicodedata
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer as HFTokenizer, pre_tokenizers, trainers, models

from tabgpt import bpe
from tabgpt.bpe import EOT, Cancelled, Tokenizer, train_tokenizer, train_tokenizer_async

AWKWARD = [
    "",
    " ",
    "a",
    "Hello world! It's 3.14 o'clock, don't panic; we'll see. THEY'RE HERE'S 'S",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇩🇪 ❤️ #️⃣ 🤗🤗x🤗",
    "CJK 你好，世界。日本語のテキスト、カタカナ。 한국어 텍스트 𠀀𠀁𪜀",
    "RTL مرحبا بالعالم שלום עולם and mixed ltr",
    "combining e\u0301 a\u0308\u0304 Zalgo Z\u0336\u0335a\u0337l\u0338g\u0334o ﬁ ǅ İstanbul ß",
    "digits 0123 ٣٤٥ १२३ １２３ ½ Ⅻ ² x²³ 𝟘𝟙 1,000,000.50",
    "controls \x00\x01\x02\x07\x08\x1b[31m\x1c\x1d\x1e\x1f\x7f\x80\x85\x9f end",
    "spaces\ttabs\r\nCRLF\r\rCR\n\n\n   three   \u00a0nbsp\u2009thin\u3000ideographic\u2028ls\u2029ps\x0b\x0c  ",
    "   leading and trailing   ",
    "\n",
    "\n\n \n \n\t",
    "<|endoftext|>",
    "before<|endoftext|>after<|endoftext|><|endoftext|> spaced <|endoftext|>",
    "<|endoftext| <|endoftext <endoftext|> almost",
    "a" * 3000,
    "ab" * 500 + " " + "abc" * 300,
    "\ufeffBOM \ufffd replacement \U0010ffff last \ue000 private",
    "x" + " " * 100 + "y" + "\n" * 50 + "z",
]


def stdlib_text() -> str:
    """~200 KB of English prose and code that every Python has: a corpus for training tests, offline."""
    import argparse as a, difflib, textwrap as t, json.decoder as j
    return "\n".join(Path(m.__file__).read_text(encoding="utf-8") for m in (a, difflib, t, j))


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(stdlib_text() + "\n".join(AWKWARD), 1000)


def random_text(rng: random.Random, n: int, pool: str) -> str:
    return "".join(rng.choice(pool) if rng.random() < 0.5 else rng.choice(" \n\t'sabc1.,\r") for _ in range(n))


def stable_chars(limit=0x30000) -> str:
    """Characters assigned with the same category since Unicode 3.2: every regex engine agrees on them."""
    old = unicodedata.ucd_3_2_0
    return "".join(chr(c) for c in range(limit) if not 0xD800 <= c < 0xE000 and old.category(chr(c)) != "Cn"
                   and old.category(chr(c)) == unicodedata.category(chr(c)))


def hf_train(text: str, vocab_size: int) -> HFTokenizer:
    """`tokenizers`' own BPE trainer, configured as ours: the same pattern, all 256 bytes, <|endoftext|>."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(bpe.gpt2_pattern()), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return hf


def merges_as_strings(tokenizer_json: str) -> list[tuple[str, str]]:
    merges = json.loads(tokenizer_json)["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def first_difference(a, b) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at {i}: {a[i:i + 3]} vs {b[i:i + 3]} (lengths {len(a)}, {len(b)})"


# --- a slow, obviously correct reference (minbpe's way: recount every pair for every merge) -------------------

def reference_train(text: str, vocab_size: int) -> list[tuple[int, int, int]]:
    words = [list(p.encode().translate(bpe.BYTE_ID)) for p in bpe.Splitter(bpe.gpt2_pattern()).full.findall(text)]
    token_bytes = [bytes([b]) for b in bpe.GPT2_BYTE_ORDER]
    merges = []
    while len(token_bytes) < vocab_size - 1:
        stats = {}
        for w in words:
            for pair in zip(w, w[1:]):
                stats[pair] = stats.get(pair, 0) + 1
        if not stats:
            break
        pair = min(stats, key=lambda p: (-stats[p], p))  # most frequent, then the smaller pair of ids
        new = len(token_bytes)
        token_bytes.append(token_bytes[pair[0]] + token_bytes[pair[1]])
        merges.append((pair[0], pair[1], new))
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == pair:
                    w[i:i + 2] = [new]
                i += 1
    return merges


def reference_encode(text: str, merges) -> list[int]:
    rank = {(a, b): (r, t) for r, (a, b, t) in enumerate(merges)}
    out = []
    for piece in bpe.Splitter(bpe.gpt2_pattern()).full.findall(text):
        w = list(piece.encode().translate(bpe.BYTE_ID))
        while len(w) > 1:
            r, pair = min((rank.get(p, (len(rank), None))[0], p) for p in zip(w, w[1:]))
            if r == len(rank):
                break
            t = rank[pair][1]
            i, merged = 0, []
            while i < len(w):
                if i < len(w) - 1 and (w[i], w[i + 1]) == pair:
                    merged.append(t)
                    i += 2
                else:
                    merged.append(w[i])
                    i += 1
            w = merged
        out += w
    return out


# --- training ----------------------------------------------------------------------------------------------

def test_hand_checked_example_aaabdaaabac():
    # Wikipedia's example: aa -> Z, then ab -> Y (ties with Za, the smaller pair of ids wins), then ZY -> X,
    # leaving XdXac. GPT-2's ids: '!' is 0, so a=64, b=65, c=66, d=67; the merged tokens are 256, 257, 258.
    t = train_tokenizer("aaabdaaabac", 260)
    assert t.merges == [(64, 64, 256), (64, 65, 257), (256, 257, 258)], t.merges
    assert [t.token_bytes[i] for i in (256, 257, 258)] == [b"aa", b"ab", b"aaab"]
    assert t.encode("aaabdaaabac") == [258, 67, 258, 64, 66]
    assert t.eot_id == 259 and t.vocab_size == 260
    assert t.decode([258, 67, 258, 64, 66]) == "aaabdaaabac"
    hf = hf_train("aaabdaaabac", 260)
    assert merges_as_strings(hf.to_str()) == [("a", "a"), ("a", "b"), ("aa", "ab")]


def test_byte_ids_are_gpt2s():
    t = train_tokenizer("x", 257)
    assert (t.encode("!"), t.encode(" "), t.encode("\x00"), t.encode_bytes(b"\xff")) == ([0], [220], [188], [187])
    assert [t.token_bytes[i] for i in (0, 93, 220, 255)] == [b"!", b"~", b" ", b"\xad"]


def test_incremental_training_matches_slow_reference():
    text = stdlib_text()[:30_000]
    fast = train_tokenizer(text, 400)
    slow = reference_train(text, 400)
    assert fast.merges == slow, first_difference(fast.merges, slow)
    sample = text[:5000] + "\n".join(AWKWARD).replace(EOT, "")  # the reference knows no special tokens
    assert fast.encode(sample) == reference_encode(sample, slow)


def test_training_learns_the_same_merges_as_tokenizers():
    # without <|endoftext|>: tokenizers' trainer learns from its characters ("<|", "endoftext"), ours leaves it out
    text = stdlib_text() + "\n".join(AWKWARD).replace(EOT, "")
    ours = train_tokenizer(text, 1500)
    hf = hf_train(text, 1500)
    a, b = merges_as_strings(ours.to_json()), merges_as_strings(hf.to_str())
    assert a == b, first_difference(a, b)
    assert ours.vocab_size == hf.get_vocab_size() == 1500


@pytest.mark.parametrize("seed", range(30))
def test_training_matches_tokenizers_on_small_random_texts(seed):
    rng = random.Random(seed)
    alphabet = rng.choice(["ab", "abc", "ab \n", "abc d\n", "aab'", "é😀a ", "aA1 .,"])
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 600)))
    if not text.strip(" \n"):
        text += "a"
    vocab_size = rng.randint(257, 340)
    ours, hf = train_tokenizer(text, vocab_size), hf_train(text, vocab_size)
    a, b = merges_as_strings(ours.to_json()), merges_as_strings(hf.to_str())
    assert a == b, f"{text[:40]!r}, vocab {vocab_size}: {first_difference(a, b)}"
    assert ours.vocab_size == hf.get_vocab_size()


def test_vocab_comes_out_smaller_when_the_text_runs_out_of_pairs():
    t = train_tokenizer("ab ab ab", 1000)
    assert t.vocab_size == 257 + 2 and t.eot_id == t.vocab_size - 1  # ab, then " ab"
    assert t.decode(t.encode("ab ab")) == "ab ab"


def test_special_token_is_not_learned_from():
    t = train_tokenizer(f"hello{EOT}hello{EOT}", 300)
    assert all(EOT.encode() not in t.token_bytes[i] for i in range(t.vocab_size - 1))
    assert t.encode(f"hello{EOT}hello") == t.encode("hello") + [t.eot_id] + t.encode("hello")


@pytest.mark.parametrize("text, vocab_size, error, message", [
    ("abc", 256, ValueError, "at least 257"),
    ("abc", 10**9, ValueError, "at most"),
    ("", 300, ValueError, "empty"),
    (EOT * 3, 300, ValueError, "empty"),
    (b"abc", 300, TypeError, "decode bytes first"),
    (None, 300, TypeError, "must be a str"),
    (["a", "b"], 300, TypeError, "must be a str"),
    ("abc", 300.0, TypeError, "vocab_size must be an int"),
    ("abc", True, TypeError, "vocab_size must be an int"),
    ("a\ud800b", 300, ValueError, "lone surrogate"),
])
def test_clear_errors(text, vocab_size, error, message):
    with pytest.raises(error, match=message):
        train_tokenizer(text, vocab_size)


def test_progress_reports_every_stage_and_cancel_stops(monkeypatch):
    monkeypatch.setattr(bpe, "CHECK_EVERY", 0.0)  # report at every chance
    seen = []
    train_tokenizer(stdlib_text()[:100_000], 600, progress=seen.append)
    stages = [p["stage"] for p in seen]
    assert stages[0] == "count" and stages[-1] == "merge" and "pairs" in stages
    for stage in ("count", "merge"):
        done = [p["done"] for p in seen if p["stage"] == stage]
        assert done == sorted(done) and done[-1] == seen[[p["stage"] for p in seen].index(stage)]["total"]
    calls = []
    with pytest.raises(Cancelled, match="cancelled"):
        train_tokenizer(stdlib_text()[:100_000], 600, should_stop=lambda: calls.append(1) or len(calls) > 20)
    assert len(calls) == 21


def test_async_training_lets_the_event_loop_run_and_can_be_cancelled(monkeypatch):
    monkeypatch.setattr(bpe, "CHECK_EVERY", 0.001)
    text = stdlib_text()

    async def main():
        ticks, stop = [], []

        async def ticker():
            while True:
                ticks.append(1)
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        tok = await train_tokenizer_async(text, 800)
        during = len(ticks)
        with pytest.raises(Cancelled):
            await train_tokenizer_async(text, 800, progress=lambda p: stop.append(p["stage"] == "merge"),
                                        should_stop=lambda: any(stop))
        task.cancel()
        return tok, during

    tok, ticks = asyncio.run(main())
    assert ticks > 10, f"the event loop ran only {ticks} times during training"
    assert tok.merges == train_tokenizer(text, 800).merges


# --- encoding and decoding -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", AWKWARD, ids=range(len(AWKWARD)))
def test_round_trip_awkward_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_round_trip_random_unicode(tok):
    rng = random.Random(0)
    pool = "".join(chr(c) for c in range(0x30000) if not 0xD800 <= c < 0xE000)
    for _ in range(50):
        text = random_text(rng, 300, pool)
        assert tok.decode(tok.encode(text)) == text


def test_round_trip_any_bytes_including_invalid_utf8(tok):
    rng = random.Random(1)
    cases = [b"\xff\xfe\x00", b"\xc3", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
             b"ok \x80 ok", bytes(range(256)), b"caf\xc3\xa9 \xe9 caf\xe9"]
    cases += [bytes(rng.randrange(256) for _ in range(rng.randint(1, 400))) for _ in range(100)]
    for data in cases:
        assert tok.decode_bytes(tok.encode_bytes(data)) == data, data


def test_partial_utf8_decodes_to_replacement_character(tok):
    ids = tok.encode("é")  # two bytes; alone, the first is not a character
    first = tok.encode_bytes(b"\xc3")
    assert tok.decode(first) == "\ufffd"
    assert tok.decode(first + tok.encode("x")) == "\ufffdx"
    assert tok.decode_bytes(ids) == "é".encode()


def test_encode_array_matches_encode(tok):
    text = "\n".join(AWKWARD) * 3
    arr = tok.encode_array(text)
    assert arr.typecode == "H" and arr.tolist() == tok.encode(text)


def test_async_encode_matches_and_reports_progress(tok, monkeypatch):
    monkeypatch.setattr(bpe, "CHECK_EVERY", 0.0)
    monkeypatch.setattr(bpe, "CHUNK", 1000)
    text = stdlib_text()[:50_000] + EOT + "tail"
    seen = []
    arr = asyncio.run(tok.encode_array_async(text, progress=seen.append))
    assert arr.tolist() == tok.encode(text)
    done = [p["done"] for p in seen]
    assert len(done) > 10 and done == sorted(done) and all(p["total"] == len(text) for p in seen)
    with pytest.raises(Cancelled):
        asyncio.run(tok.encode_array_async(text, should_stop=lambda: True))


def test_ids_beyond_16_bits_use_a_wider_array():
    base = [bytes([b]) for b in bpe.GPT2_BYTE_ORDER]
    filler = [b"filler %d" % i for i in range(256, 70_000)]  # tokens that no merge makes
    a, b = base.index(b"a"), base.index(b"b")
    t = Tokenizer(base + filler + [b"ab", EOT.encode()], [(a, b, 70_000)], bpe.gpt2_pattern(), {EOT: 70_001})
    arr = t.encode_array("ab ab" + EOT)
    assert arr.typecode == "I" and arr.tolist() == t.encode("ab ab" + EOT) == [70_000, 220, 70_000, 70_001]
    assert HFTokenizer.from_str(t.to_json()).encode("ab ab" + EOT).ids == arr.tolist()


def test_cache_gives_the_same_tokens_as_a_fresh_tokenizer(tok):
    text = stdlib_text()[:50_000]
    fresh = Tokenizer.from_json(tok.to_json())  # empty cache; tok's was filled from training's words
    assert fresh.encode(text) == tok.encode(text) == tok.encode(text)


def test_decode_rejects_bad_ids(tok):
    for bad in ([tok.vocab_size], [-1], [0, 10**9]):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.decode(bad)
    with pytest.raises(TypeError, match="must be ints"):
        tok.decode([1, 2.0])
    with pytest.raises(TypeError, match="encode_bytes"):
        tok.encode(b"bytes")


# --- the pre-tokenisation pattern ------------------------------------------------------------------------------

def test_pattern_splits_as_gpt2s_regex_in_tokenizers():
    # tokenizers' ByteLevel(use_regex=True) is GPT-2's pattern with \p{L}, \p{N}, \s in Oniguruma; ours spells the
    # classes out. On characters that every Unicode version since 3.2 classifies alike, the pieces must be equal.
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    ours = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(bpe.gpt2_pattern()), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    rng = random.Random(2)
    pool = stable_chars()
    texts = [t for t in AWKWARD if all(c in pool or c in " \n\t'sabc1.,\r" for c in t)]
    texts += [random_text(rng, 300, pool + "\x0b\x0c\x1c\x85\u2028") for _ in range(100)]
    for text in texts:
        a = [p for p, _ in gpt2.pre_tokenize_str(text)]
        b = [p for p, _ in ours.pre_tokenize_str(text)]
        assert a == b, f"{text[:40]!r}: {first_difference(a, b)}"


def test_pattern_means_the_same_to_python_re_and_oniguruma():
    split = pre_tokenizers.Split(Regex(bpe.gpt2_pattern()), behavior="isolated")
    full = bpe.Splitter(bpe.gpt2_pattern()).full
    rng = random.Random(3)
    pool = "".join(chr(c) for c in range(0x30000) if not 0xD800 <= c < 0xE000)  # any character, assigned or not
    for text in AWKWARD + [random_text(rng, 300, pool) for _ in range(100)]:
        a = full.findall(text)
        b = [p for p, _ in split.pre_tokenize_str(text)]
        assert a == b, f"{text[:40]!r}: {first_difference(a, b)}"


def test_ascii_and_bmp_patterns_agree_with_the_full_one():
    s = bpe.Splitter(bpe.gpt2_pattern())
    assert s.ascii is not s.full and s.bmp is not s.full and len(s.ascii.pattern) < len(s.bmp.pattern)
    rng = random.Random(4)
    for pool, fast in (("".join(map(chr, range(128))), s.ascii),
                       ("".join(chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000), s.bmp)):
        for _ in range(100):
            text = random_text(rng, 300, pool)
            assert fast.findall(text) == s.full.findall(text), repr(text[:40])


def test_a_pattern_from_another_unicode_version_is_still_recognised():
    L, N, S = bpe._gpt2_classes()
    other = bpe.PATTERN.format(L=bpe._class(L[:-3]), N=bpe._class(N), S=bpe._class(S))  # fewer letters
    s = bpe.Splitter(other)
    assert s.bmp is not s.full and s.full.pattern == other


def test_chunks_cut_where_the_pattern_cuts():
    s = bpe.Splitter(bpe.gpt2_pattern())
    rng = random.Random(5)
    for _ in range(30):
        text = "".join(rng.choice(["word", " ", "\n", "  \n", "\n\n", "'s", "1", ".", "\t", "é"])
                       for _ in range(3000))
        pieces = [p for chunk in bpe.chunks(text, size=rng.randint(1, 200)) for p in s.full.findall(chunk)]
        assert pieces == s.full.findall(text)


# --- tokenizer.json --------------------------------------------------------------------------------------------

def test_save_load_identity(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    back = Tokenizer.load(path)
    assert (back.token_bytes, back.merges, back.pattern, back.special, back.eot_id) == \
        (tok.token_bytes, tok.merges, tok.pattern, tok.special, tok.eot_id)
    assert back.to_json() == tok.to_json() == Tokenizer.from_json(tok.to_json().encode()).to_json()
    text = "\n".join(AWKWARD)
    assert back.encode(text) == tok.encode(text)
    listing = (tmp_path / "tokenizer.merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(listing) == 2 + len(tok.merges)
    assert listing[2].startswith("0 256: [")


def test_tokenizers_loads_our_json_and_encodes_identically(tok):
    hf = HFTokenizer.from_str(tok.to_json())
    rng = random.Random(6)
    pool = "".join(chr(c) for c in range(0x30000) if not 0xD800 <= c < 0xE000)
    texts = AWKWARD + [stdlib_text()[:20_000]] + [random_text(rng, 300, pool) for _ in range(100)]
    for text in texts:
        ours, theirs = tok.encode(text), hf.encode(text).ids
        assert ours == theirs, f"{text[:40]!r}: {first_difference(ours, theirs)}"
        assert hf.decode(ours, skip_special_tokens=False) == tok.decode(ours) == text
    assert hf.get_vocab_size() == tok.vocab_size and hf.token_to_id(EOT) == tok.eot_id
    back = Tokenizer.from_json(hf.to_str())  # as tokenizers writes it back (merges as pairs)
    assert (back.token_bytes, back.merges, back.pattern) == (tok.token_bytes, tok.merges, tok.pattern)


def test_gpt2_style_json_with_bytelevel_regex_loads():
    base = train_tokenizer(stdlib_text()[:50_000], 500)
    doc = json.loads(base.to_json())
    doc["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    doc["model"]["merges"] = [m.split(" ") for m in doc["model"]["merges"]]  # the newer list-of-pairs form
    ours, hf = Tokenizer.from_json(json.dumps(doc)), HFTokenizer.from_str(json.dumps(doc))
    rng = random.Random(7)
    pool = stable_chars()
    for text in [stdlib_text()[:5000]] + [random_text(rng, 200, pool) for _ in range(30)]:
        assert ours.encode(text) == hf.encode(text).ids


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(normalizer={"type": "NFC"}), "normalizer"),
    (lambda d: d["model"].update(type="WordPiece"), "not a BPE"),
    (lambda d: d["model"].update(byte_fallback=True), "byte_fallback"),
    (lambda d: d.update(pre_tokenizer={"type": "Whitespace"}), "unsupported pre-tokenizer"),
    (lambda d: d["model"]["merges"].append("zz qq"), "not in the vocabulary"),
    (lambda d: d["model"]["vocab"].pop("!"), "256 bytes"),
])
def test_loading_rejects_what_it_cannot_do(change, message):
    doc = json.loads(train_tokenizer("hello world", 270).to_json())
    change(doc)
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_json(json.dumps(doc))
    with pytest.raises(ValueError, match="not a tokenizer.json"):
        Tokenizer.from_json("{}")


# --- the command line ------------------------------------------------------------------------------------------

def test_cli_trains_writes_and_summarises(tmp_path, capsys):
    src = tmp_path / "corpus.txt"
    src.write_text(stdlib_text()[:100_000], encoding="utf-8")
    out = tmp_path / "tok.json"
    assert bpe.cli_main(argparse.Namespace(input=str(src), vocab_size=512, out=str(out), verbose=False)) == 0
    captured = capsys.readouterr()
    assert "bytes/token" in captured.out and "512 tokens" in captured.out and "merge" in captured.err
    assert HFTokenizer.from_file(str(out)).get_vocab_size() == 512
    assert (tmp_path / "tok.merges.txt").exists()
    assert bpe.cli_main(argparse.Namespace(input=str(src), vocab_size=100, out=str(out))) == 1
    assert "at least 257" in capsys.readouterr().err

    # read as `tabgpt fetch --file` reads: Latin-1 and UTF-16 without a byte-order mark converted, with a note
    (tmp_path / "latin1.txt").write_bytes("café au lait, déjà vu. ".encode("latin-1") * 50)
    (tmp_path / "utf16.txt").write_bytes("plain words, twice over. ".encode("utf-16-le") * 50)
    for name, note in (("latin1.txt", "Latin-1"), ("utf16.txt", "UTF-16")):
        assert bpe.cli_main(argparse.Namespace(input=str(tmp_path / name), vocab_size=300, out=str(out))) == 0
        assert note in capsys.readouterr().err
        assert Tokenizer.load(out).decode(Tokenizer.load(out).encode("déjà")) == "déjà"

    # refused before any work, the input untouched: binary data, --out the input itself or a folder
    (tmp_path / "prog").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)
    assert bpe.cli_main(argparse.Namespace(input=str(tmp_path / "prog"), vocab_size=300, out=str(out))) == 1
    assert "not text" in capsys.readouterr().err
    before = src.read_bytes()
    assert bpe.cli_main(argparse.Namespace(input=str(src), vocab_size=300, out=str(src))) == 1
    assert "is the input file" in capsys.readouterr().err and src.read_bytes() == before
    assert bpe.cli_main(argparse.Namespace(input=str(src), vocab_size=300, out=str(tmp_path))) == 1
    assert "is a folder" in capsys.readouterr().err
    other = tmp_path / "notes.txt"   # a file that is not a tokenizer (or its listing) is not overwritten
    other.write_text("my notes")
    assert bpe.cli_main(argparse.Namespace(input=str(src), vocab_size=300, out=str(other))) == 1
    assert "is not a tokenizer's JSON" in capsys.readouterr().err and other.read_text() == "my notes"
    listing = tmp_path / "tok2.merges.txt"
    listing.write_text("my list")
    assert bpe.cli_main(argparse.Namespace(input=str(src), vocab_size=300, out=str(tmp_path / "tok2.json"))) == 1
    assert "merges listing" in capsys.readouterr().err and listing.read_text() == "my list"
    # nothing is written into a tabgpt run folder: its model was trained with the tokenizer.json there
    run = tmp_path / "run"
    run.mkdir()
    from tabgpt.run import FORMAT
    (run / "config.json").write_text(json.dumps({"format": FORMAT}))
    (run / "tokenizer.json").write_bytes(out.read_bytes())          # a tokenizer, which it would otherwise replace
    kept = (run / "tokenizer.json").read_bytes()
    for target in (run / "tokenizer.json", run / "new.json"):
        assert bpe.cli_main(argparse.Namespace(input=str(src), vocab_size=300, out=str(target))) == 1
        err = capsys.readouterr().err
        assert "is in the tabgpt run folder" in err and "outside the run folder" in err, err
    assert (run / "tokenizer.json").read_bytes() == kept and not (run / "new.json").exists()
    # what is not a tokenizer says so, with the file's name
    for bad, what in ((b'{"n_layer": 2}', "no 'model' entry"), (b"\x86\x00\xff", "binary data")):
        (tmp_path / "bad.json").write_bytes(bad)
        with pytest.raises(ValueError, match=re.escape(f"bad.json is not a tokenizer ({what}")):
            Tokenizer.load(tmp_path / "bad.json")
    nested = tmp_path / "new" / "dir" / "tok.json"   # a missing folder is made
    assert bpe.cli_main(argparse.Namespace(input=str(src), vocab_size=300, out=str(nested), verbose=False)) == 0
    assert nested.is_file()
