"""Byte-level BPE as GPT-2 has it, trained and run in pure Python (standard library only, so it runs in Pyodide).

Text is cut into pieces by GPT-2's pre-tokenisation pattern; each piece becomes its UTF-8 bytes, and training
merges the most frequent pair of adjacent tokens, again and again, until the vocabulary is full. The vocabulary
is laid out as GPT-2's: 256 byte tokens (in GPT-2's order), the merged tokens in the order they were learned,
then <|endoftext|> last.

One representation makes it fast: a piece is a str whose characters are token ids (chr(id)). A pair of tokens
is then a 2-character str (a dict key), `str.replace` merges a pair left to right as BPE does, and comparing two
pairs compares their ids. Training is the incremental algorithm: unique pieces with their counts, pair counts,
an index from each pair to the pieces that hold it, and a heap with lazy updates, so a merge only touches the
pieces that contain its pair. Ties go to the smaller pair of ids, as in Hugging Face `tokenizers`, so both learn
the same merges from the same text (except that its trainer also learns from the characters of <|endoftext|>,
which ours leaves out, as encoding never splits it).

    tok = train_tokenizer(text, 8192)
    ids = tok.encode("Hello world")        # a list of ints; tok.decode(ids) == "Hello world"
    tok.save("tokenizer.json")             # a Hugging Face tokenizer.json (+ tokenizer.merges.txt to read)
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import json
import re
import sys
import time
import unicodedata
from array import array
from collections import Counter, defaultdict
from pathlib import Path

EOT = "<|endoftext|>"
MIN_VOCAB_SIZE = 257  # the 256 bytes and <|endoftext|>
MAX_VOCAB_SIZE = 1 << 18  # ids are stored as characters, and more is no use to a model trained in a tab
CHUNK = 1 << 18  # characters pre-tokenised at a time: ~20-80 ms, so progress and cancellation stay prompt
CHECK_EVERY = 0.05  # seconds between progress reports (and event-loop yields in train_tokenizer_async)
CACHE_LIMIT = 1 << 20  # pieces remembered by encode before the cache starts afresh


class Cancelled(Exception):
    """Training was stopped because should_stop() returned True."""


# ---------------------------------------------------------------------------------------------------------------
# bytes <-> printable characters, as GPT-2 (and tokenizer.json) write tokens


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character: printable bytes stand for themselves, the others
    (controls, space, ...) are moved to U+0100 and above. Sorted by character, the bytes give GPT-2's ids."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_CHAR = bytes_to_unicode()  # byte -> its printable character
CHAR_BYTE = {c: b for b, c in BYTE_CHAR.items()}
GPT2_BYTE_ORDER = sorted(range(256), key=lambda b: BYTE_CHAR[b])  # id -> byte for ids 0..255
BYTE_ID = bytes(GPT2_BYTE_ORDER.index(b) for b in range(256))  # byte -> id, a bytes.translate table


# ---------------------------------------------------------------------------------------------------------------
# pre-tokenisation: GPT-2's pattern, written so that Python's re and Oniguruma (in `tokenizers`) agree
#
# GPT-2:  's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# Python's re has no \p{..}, and its \s, \w and \d differ from Oniguruma's. So letters, numbers and white space
# are spelled out as explicit character ranges; the same string then means the same to both engines. The pattern
# is saved in tokenizer.json, so a tokenizer splits text the same way wherever it is loaded.

PATTERN = "'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+"
# Unicode's White_Space property: a fixed list (Python's str.isspace() adds the separators U+001C..U+001F)
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
             "\u2028\u2029\u202f\u205f\u3000"
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def _ranges(codepoints) -> list[tuple[int, int]]:
    """Sorted code points -> [(first, last), ...] runs."""
    out = []
    for cp in codepoints:
        if out and out[-1][1] == cp - 1:
            out[-1] = (out[-1][0], cp)
        else:
            out.append((cp, cp))
    return out


def _class(ranges, limit=0x10FFFF) -> str:
    """Ranges -> the inside of a [...] class. ASCII punctuation and controls are written \\xHH (both engines read
    that), everything else literally, so no character is special to either engine."""
    def ch(cp):
        c = chr(cp)
        return c if c.isalnum() or cp == 0x20 or cp > 0x7F else "\\x%02x" % cp
    out = []
    for a, b in ranges:
        if a > limit:
            break
        b = min(b, limit)
        out.append(ch(a) if a == b else ch(a) + ch(b) if b == a + 1 else ch(a) + "-" + ch(b))
    return "".join(out)


def _parse_class(s: str) -> list[tuple[int, int]]:
    """The inverse of _class."""
    cps, i = [], 0
    while i < len(s):
        if s[i] == "\\":
            cps.append(int(s[i + 2:i + 4], 16))
            i += 4
        else:
            cps.append(ord(s[i]))
            i += 1
        if i < len(s) and s[i] == "-":  # a literal '-' would have been written \x2d
            cps.append(-1)
            i += 1
    out, k = [], 0
    while k < len(cps):
        if k + 2 < len(cps) and cps[k + 1] == -1:
            out.append((cps[k], cps[k + 2]))
            k += 3
        else:
            out.append((cps[k], cps[k]))
            k += 1
    return out


@functools.lru_cache(maxsize=None)
def _gpt2_classes() -> tuple:
    """(letters, numbers, white space) as ranges, from this Python's unicodedata (planes 0-3 hold every letter and
    number assigned so far)."""
    letters, numbers = [], []
    category = unicodedata.category
    for cp in range(0x40000):
        c = category(chr(cp))[0]
        if c == "L":
            letters.append(cp)
        elif c == "N":
            numbers.append(cp)
    return _ranges(letters), _ranges(numbers), _ranges(sorted(map(ord, WHITESPACE)))


def gpt2_pattern() -> str:
    """GPT-2's pre-tokenisation pattern with \\p{L}, \\p{N} and \\s written out (about 4 KB)."""
    L, N, S = _gpt2_classes()
    return PATTERN.format(L=_class(L), N=_class(N), S=_class(S))


class Splitter:
    """Cuts text into pieces with a pattern. For our own pattern it also compiles the pattern cut down to ASCII and
    to the Basic Multilingual Plane, and uses them on text that holds no other characters: Python's re tests a
    character against every range above U+FFFF in turn, which makes the full pattern ~4x slower."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.full = re.compile(pattern)
        self.ascii = self.bmp = self.full
        classes = self._our_classes(pattern)
        if classes:
            L, N, S = classes
            self.ascii = re.compile(PATTERN.format(L=_class(L, 0x7F), N=_class(N, 0x7F), S=_class(S, 0x7F)))
            self.bmp = re.compile(PATTERN.format(L=_class(L, 0xFFFF), N=_class(N, 0xFFFF), S=_class(S, 0xFFFF)))

    @staticmethod
    def _our_classes(pattern):
        """The (L, N, S) ranges if pattern is PATTERN filled in by _class (under any Unicode version), else None."""
        head = "'s|'t|'re|'ve|'m|'ll|'d| ?["
        if not pattern.startswith(head) or "|[" not in pattern:
            return None
        S = pattern.rsplit("|[", 1)[1][:-2]
        L = pattern[len(head):].split("]+| ?[", 1)[0]
        N = pattern[len(head) + len(L) + len("]+| ?["):].split("]+| ?[^", 1)[0]
        if PATTERN.format(L=L, N=N, S=S) != pattern:
            return None
        try:
            classes = tuple(_parse_class(c) for c in (L, N, S))
        except ValueError:
            return None
        return classes if [_class(r) for r in classes] == [L, N, S] else None

    def findall(self, text: str) -> list[str]:
        """The pieces of text (a chunk: see chunks())."""
        if text.isascii():
            return self.ascii.findall(text)
        return (self.full if _ASTRAL.search(text) else self.bmp).findall(text)


def chunks(text: str, size: int | None = None):
    """Cut text into pieces of about `size` characters where the pattern would cut anyway: at a newline that
    follows a character that is not white space. No match can span that point, and the only look-ahead,
    (?![^ S]), belongs to runs of white space, so the pieces of the chunks are exactly the pieces of the text."""
    start, n, size = 0, len(text), size or CHUNK
    while n - start > size:
        p = text.find("\n", start + size)
        while p != -1 and text[p - 1] in WHITESPACE:
            p = text.find("\n", p + 1)
        if p == -1:
            break
        yield text[start:p]
        start = p
    yield text[start:]


# ---------------------------------------------------------------------------------------------------------------
# training


def _check_args(text, vocab_size):
    if not isinstance(text, str):
        hint = " (decode bytes first, e.g. data.decode('utf-8'))" if isinstance(text, (bytes, bytearray)) else ""
        raise TypeError(f"text must be a str, not {type(text).__name__}{hint}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, not {type(vocab_size).__name__}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {EOT}), got {vocab_size}")
    if vocab_size > MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at most {MAX_VOCAB_SIZE}, got {vocab_size}")
    if not text.replace(EOT, ""):
        raise ValueError("cannot train a tokenizer on empty text")


def _train_steps(text, vocab_size, progress, should_stop):
    """The whole training as a generator: it yields every ~CHECK_EVERY seconds (after reporting progress and
    asking should_stop) and returns the Tokenizer. train_tokenizer runs it straight through; the async version
    lets the event loop run at each yield."""
    _check_args(text, vocab_size)
    t0 = time.perf_counter()
    next_check = t0 + CHECK_EVERY

    def checkpoint(stage, done, total):
        if progress is not None:
            progress({"stage": stage, "done": done, "total": total, "seconds": time.perf_counter() - t0})
        if should_stop is not None and should_stop():
            raise Cancelled(f"tokenizer training cancelled ({stage} stage, {done} of {total})")

    # 1. count the pieces: unique words with their counts (<|endoftext|> is never part of a word)
    pattern = gpt2_pattern()
    splitter = Splitter(pattern)
    counts = Counter()
    done, total = 0, len(text)
    for part in text.split(EOT):
        for chunk in chunks(part):
            counts.update(splitter.findall(chunk))
            done += len(chunk)
            if time.perf_counter() >= next_check:
                checkpoint("count", done, total)
                yield
                next_check = time.perf_counter() + CHECK_EVERY
    checkpoint("count", total, total)

    # 2. each unique piece as a str of token ids: bytes -> GPT-2 ids (0..255) -> characters
    pieces = list(counts)
    freqs = list(counts.values())
    try:
        words = [p.encode("utf-8", "surrogateescape").translate(BYTE_ID).decode("latin-1") for p in pieces]
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode: lone surrogate {e.object[e.start]!r}") from None

    # 3. pair counts and the index pair -> words that hold it (a word may be listed again: see the merge loop)
    pair_counts = defaultdict(int)
    where = defaultdict(list)
    for wi, w in enumerate(words):
        c = freqs[wi]
        for i in range(len(w) - 1):
            pair = w[i:i + 2]
            pair_counts[pair] += c
            held = where[pair]
            if not held or held[-1] != wi:
                held.append(wi)
        if wi % 4096 == 0 and time.perf_counter() >= next_check:
            checkpoint("pairs", wi, len(words))
            yield
            next_check = time.perf_counter() + CHECK_EVERY
    heap = [(-c, pair) for pair, c in pair_counts.items()]  # most frequent first, then the smaller pair of ids
    heapq.heapify(heap)

    # 4. merge
    token_bytes = [bytes([b]) for b in GPT2_BYTE_ORDER]  # id -> bytes
    token_id = {b: i for i, b in enumerate(token_bytes)}  # bytes -> id: two merges can make the same bytes
    merges = []  # (left id, right id, new id), in the order learned
    n_tokens = vocab_size - 1  # <|endoftext|> takes the last id
    total = n_tokens - 256
    while len(token_bytes) < n_tokens and heap:
        neg, pair = heapq.heappop(heap)
        count = pair_counts[pair]
        if -neg != count:  # stale entry: put it back with its current count
            heapq.heappush(heap, (-count, pair))
            continue
        if count < 1:
            break
        a, b = ord(pair[0]), ord(pair[1])
        new = token_bytes[a] + token_bytes[b]
        t = token_id.get(new)
        if t is None:
            t = token_id[new] = len(token_bytes)
            token_bytes.append(new)
        merges.append((a, b, t))
        tch = chr(t)
        fresh = set()
        for wi in where.pop(pair, ()):
            w = words[wi]
            if pair not in w:  # listed twice, or the pair has gone from this word since it was listed
                continue
            w2 = words[wi] = w.replace(pair, tch)
            c = freqs[wi]
            for i in range(len(w) - 1):
                pair_counts[w[i:i + 2]] -= c
            for i in range(len(w2) - 1):
                q = w2[i:i + 2]
                pair_counts[q] += c
                if tch in q:
                    fresh.add(q)
                    held = where[q]
                    if not held or held[-1] != wi:
                        held.append(wi)
        for q in fresh:
            heapq.heappush(heap, (-pair_counts[q], q))
        if time.perf_counter() >= next_check:
            checkpoint("merge", len(token_bytes) - 256, total)
            yield
            next_check = time.perf_counter() + CHECK_EVERY
    checkpoint("merge", len(token_bytes) - 256, total)

    tok = Tokenizer(token_bytes + [EOT.encode()], merges, pattern, {EOT: len(token_bytes)})
    if len(token_id) == len(merges) + 256:  # no bytes made twice: training's words are what encode would make
        tok._cache.update(zip(pieces, words))
    return tok


def _run(steps):
    try:
        while True:
            next(steps)
    except StopIteration as stop:
        return stop.value


def train_tokenizer(text: str, vocab_size: int, progress=None, should_stop=None) -> "Tokenizer":
    """Train a byte-level BPE with vocab_size tokens (<|endoftext|> included) on text.

    progress(dict) is called every ~50 ms with {"stage", "done", "total", "seconds"}; the stages are "count"
    (characters of text cut into words), "pairs" (unique words whose pairs are counted) and "merge" (tokens made).
    should_stop() returning True raises Cancelled. If the text runs out of pairs the vocabulary comes out smaller.
    """
    return _run(_train_steps(text, vocab_size, progress, should_stop))


async def train_tokenizer_async(text: str, vocab_size: int, progress=None, should_stop=None) -> "Tokenizer":
    """train_tokenizer that lets the event loop run every ~50 ms, so a browser worker stays responsive (and can
    set the flag that should_stop reads)."""
    steps = _train_steps(text, vocab_size, progress, should_stop)
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value
        await asyncio.sleep(0)


# ---------------------------------------------------------------------------------------------------------------
# the tokenizer


class _Cache(dict):
    """piece of text -> its tokens as a str of chr(id); computes (and keeps) what it does not have."""

    def __init__(self, bpe):
        super().__init__()
        self.bpe = bpe

    def __missing__(self, piece):
        if len(self) >= CACHE_LIMIT:
            self.clear()
        word = self[piece] = self.bpe(piece)
        return word


_UTF32 = "utf-32-le" if sys.byteorder == "little" else "utf-32-be"
_UTF16 = "utf-16-le" if sys.byteorder == "little" else "utf-16-be"


class Tokenizer:
    """A byte-level BPE: token_bytes[id] is what each token stands for, merges[rank] = (left, right, new id)."""

    def __init__(self, token_bytes: list[bytes], merges: list[tuple[int, int, int]], pattern: str,
                 special: dict[str, int]):
        self.token_bytes = token_bytes
        self.merges = merges
        self.pattern = pattern
        self.special = special  # text -> id, matched in the input before pre-tokenisation
        self.eot_id = special.get(EOT)
        byte_ids = {}
        for i, tb in enumerate(token_bytes):
            if len(tb) == 1 and i not in special.values():
                byte_ids.setdefault(tb[0], i)
        if len(byte_ids) != 256:
            raise ValueError(f"a byte-level BPE needs a token for each of the 256 bytes; "
                             f"{256 - len(byte_ids)} are missing")
        self._byte_chars = {b: chr(i) for b, i in byte_ids.items()}  # str.translate table: latin-1 char -> id
        self._merge = {chr(a) + chr(b): (rank, chr(a) + chr(b), chr(t)) for rank, (a, b, t) in enumerate(merges)}
        self._splitter = Splitter(pattern)
        self._special_re = re.compile("(" + "|".join(map(re.escape, sorted(special, key=len, reverse=True))) + ")") \
            if special else None
        self._cache = _Cache(self._bpe)

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, eot_id={self.eot_id})"

    # encoding ----------------------------------------------------------------------------------------------

    def _bpe(self, piece: str) -> str:
        """One piece of text -> its tokens (a str of chr(id)): apply the lowest-ranked merge present, everywhere
        in the word left to right, until none applies."""
        word = piece.encode("utf-8", "surrogateescape").decode("latin-1").translate(self._byte_chars)
        merge = self._merge
        while len(word) > 1:
            best = None  # (rank, pair, new token) of the lowest-ranked pair present
            for i in range(len(word) - 1):
                m = merge.get(word[i:i + 2])
                if m is not None and (best is None or m < best):
                    best = m
            if best is None:
                break
            word = word.replace(best[1], best[2])
        return word

    def _encode_steps(self, text: str, out: list):
        """Append the tokens of text to out (strs of chr(id)), a chunk at a time, yielding the characters done."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__} (for bytes use encode_bytes)")
        parts = [text]
        if self._special_re is not None and any(s in text for s in self.special):
            parts = self._special_re.split(text)  # text, special, text, special, ..., text
        get = self._cache.__getitem__
        done = 0
        try:
            for k, part in enumerate(parts):
                if k % 2:
                    out.append(chr(self.special[part]))
                    done += len(part)
                    continue
                for chunk in chunks(part):
                    out.extend(map(get, self._splitter.findall(chunk)))
                    done += len(chunk)
                    yield done
        except UnicodeEncodeError as e:
            raise ValueError(f"text is not valid Unicode: lone surrogate {e.object[e.start]!r}") from None

    def _to_array(self, chars: str, wide: bool = False) -> array:
        """A str of chr(id) -> array of ids: 'H' (2 bytes an id) when every id fits, else 'I'."""
        if self.vocab_size <= 1 << 16 and not wide:
            return array("H", chars.encode(_UTF16, "surrogatepass"))
        return array("I", chars.encode(_UTF32, "surrogatepass"))

    def encode(self, text: str) -> list[int]:
        """text -> token ids. <|endoftext|> in the text becomes eot_id (as in `tokenizers`)."""
        out = []
        for _ in self._encode_steps(text, out):
            pass
        return self._to_array("".join(out), wide=True).tolist()

    def encode_array(self, text: str) -> array:
        """encode() as a compact array: typecode 'H' (2 bytes an id) when every id fits, else 'I'."""
        out = []
        for _ in self._encode_steps(text, out):
            pass
        return self._to_array("".join(out))

    async def encode_array_async(self, text: str, progress=None, should_stop=None) -> array:
        """encode_array that lets the event loop run every ~50 ms (a browser worker encoding megabytes stays
        responsive). progress({"stage": "encode", "done", "total", "seconds"}); should_stop() -> Cancelled."""
        out, t0 = [], time.perf_counter()
        next_check = t0 + CHECK_EVERY
        for done in self._encode_steps(text, out):
            if time.perf_counter() >= next_check:
                if progress is not None:
                    progress({"stage": "encode", "done": done, "total": len(text), "seconds": time.perf_counter() - t0})
                if should_stop is not None and should_stop():
                    raise Cancelled(f"encoding cancelled after {done} of {len(text)} characters")
                await asyncio.sleep(0)
                next_check = time.perf_counter() + CHECK_EVERY
        return self._to_array("".join(out))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Any bytes -> token ids, even invalid UTF-8 (each stray byte is a character of its own when splitting);
        decode_bytes gives the same bytes back."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, not {type(data).__name__}")
        return self.encode(bytes(data).decode("utf-8", "surrogateescape"))

    # decoding ----------------------------------------------------------------------------------------------

    def decode_bytes(self, ids) -> bytes:
        """token ids -> the bytes they stand for."""
        if not isinstance(ids, (list, tuple, array)):
            ids = list(ids)
        try:
            if ids and min(ids) < 0:
                raise IndexError
            return b"".join(map(self.token_bytes.__getitem__, ids))
        except IndexError:
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})") from None
        except TypeError:
            bad = next(i for i in ids if not isinstance(i, int))
            raise TypeError(f"token ids must be ints, got {bad!r}") from None

    def decode(self, ids, errors: str = "replace") -> str:
        """token ids -> text. Ids that end inside a UTF-8 character (a model can sample those) decode to U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors)

    # tokenizer.json ----------------------------------------------------------------------------------------

    def _token_str(self, i: int) -> str:
        if i in self._special_ids:
            return self._special_ids[i]
        return "".join(BYTE_CHAR[b] for b in self.token_bytes[i])

    @functools.cached_property
    def _special_ids(self):
        return {i: s for s, i in self.special.items()}

    def to_json(self) -> str:
        """This tokenizer as a Hugging Face tokenizer.json (a str): `tokenizers.Tokenizer.from_str` loads it and
        encodes exactly as encode() does."""
        tok = self._token_str
        doc = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for s, i in self.special.items()],
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {tok(i): i for i in range(self.vocab_size)},
                      "merges": [f"{tok(a)} {tok(b)}" for a, b, _ in self.merges]},
        }
        return json.dumps(doc, ensure_ascii=False, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Tokenizer":
        """Load a tokenizer.json: ours, or any byte-level BPE written as ours is (GPT-2's own, with a ByteLevel
        pre-tokenizer using its regex, loads too, with the pattern above)."""
        try:
            doc = json.loads(text)
            model = doc["model"]
            vocab, merges_in = model["vocab"], model["merges"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"not a tokenizer.json: {'no ' + str(e) + ' entry' if isinstance(e, KeyError) else e}"
                             ) from None
        if model.get("type", "BPE") != "BPE":
            raise ValueError(f"not a BPE tokenizer.json (model type {model.get('type')!r})")
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback", "ignore_merges"):
            if model.get(key):
                raise ValueError(f"unsupported tokenizer.json: model.{key} = {model[key]!r}")
        if doc.get("normalizer"):
            raise ValueError(f"unsupported tokenizer.json: a normalizer ({doc['normalizer'].get('type')})")
        pattern = cls._pattern_of(doc.get("pre_tokenizer"))
        special = {t["content"]: t["id"] for t in doc.get("added_tokens", [])}
        n = max(max(vocab.values(), default=-1), max(special.values(), default=-1)) + 1
        token_bytes = [b""] * n
        special_ids = set(special.values())
        for s, i in vocab.items():
            if i not in special_ids:
                try:
                    token_bytes[i] = bytes(CHAR_BYTE[c] for c in s)
                except KeyError:
                    raise ValueError(f"token {s!r} is not written in GPT-2's byte characters") from None
        for s, i in special.items():
            token_bytes[i] = s.encode()
        merges = []
        for m in merges_in:
            a, b = m.split(" ") if isinstance(m, str) else m
            try:
                merges.append((vocab[a], vocab[b], vocab[a + b]))
            except KeyError as e:
                raise ValueError(f"merge {a!r} + {b!r}: {e.args[0]!r} is not in the vocabulary") from None
        return cls(token_bytes, merges, pattern, special)

    @staticmethod
    def _pattern_of(pre) -> str:
        steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
        kinds = [s and s.get("type") for s in steps]
        if kinds == ["Split", "ByteLevel"]:
            split, bl = steps
            if split.get("behavior") != "Isolated" or split.get("invert") or "Regex" not in split.get("pattern", {}):
                raise ValueError(f"unsupported Split pre-tokenizer: {split}")
            if bl.get("add_prefix_space") or bl.get("use_regex"):
                raise ValueError(f"unsupported ByteLevel pre-tokenizer after Split: {bl}")
            return split["pattern"]["Regex"]
        if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
            return gpt2_pattern()
        raise ValueError(f"unsupported pre-tokenizer {kinds}: expected Split(Regex) + ByteLevel, or ByteLevel")

    def save(self, path, listing: bool = True) -> None:
        """Write tokenizer.json to path and, beside it, the merges to read (NAME.merges.txt)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json(), encoding="utf-8")
        if listing:
            path.with_name(path.name.removesuffix(".json") + ".merges.txt").write_text(self.merges_listing(),
                                                                                       encoding="utf-8")

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """from_json of a file; ValueError naming the file and what it should be (OSError where it is unreadable)."""
        try:
            return cls.from_json(Path(path).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:   # (UnicodeDecodeError is a ValueError: binary data)
            what = ("binary data, not JSON" if isinstance(e, UnicodeDecodeError)
                    else str(e).removeprefix("not a tokenizer.json: "))
            raise ValueError(f"{path} is not a tokenizer ({what}): give the tokenizer.json that `tabgpt tokenizer` "
                             f"or a training run wrote") from None

    def merges_listing(self) -> str:
        """The merges, one a line: `rank id: [left][right] -> [token]`, tokens as text with escapes for the rest."""
        def show(i):
            s = self.token_bytes[i].decode("utf-8", "backslashreplace")
            return "".join(c if unicodedata.category(c)[0] != "C" else repr(c)[1:-1] for c in s)
        lines = [f"# byte-level BPE: {self.vocab_size} tokens, {len(self.merges)} merges, {EOT} = {self.eot_id}",
                 "# rank id: [left][right] -> [token]"]
        lines += [f"{r} {t}: [{show(a)}][{show(b)}] -> [{show(t)}]" for r, (a, b, t) in enumerate(self.merges)]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# `tabgpt tokenizer --input corpus.txt --vocab-size N --out tokenizer.json`


def _check_replaceable(out: Path):
    """The tokenizer command replaces an earlier tokenizer (and its merges listing), never another kind of file, and
    writes nothing into a tabgpt run folder (a run's model was trained with the run's own tokenizer.json)."""
    from tabgpt.corpus import CorpusError
    from tabgpt.run import is_run_folder
    if is_run_folder(out.parent):
        raise CorpusError(f"--out {out} is in the tabgpt run folder {out.parent} (beside its config.json): the run's "
                          f"model was trained with the tokenizer.json there, and another tokenizer would give it "
                          f"other tokens (wrong losses and samples); choose an --out outside the run folder")
    listing = out.with_name(out.name.removesuffix(".json") + ".merges.txt")
    for path, looks_right in ((out, lambda t: Tokenizer.from_json(t) is not None),
                              (listing, lambda t: t.startswith("# byte-level BPE"))):
        if not path.is_file():
            continue
        try:
            ok = looks_right(path.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            ok = False
        if not ok:
            kind = "merges listing" if path == listing else "JSON"
            raise CorpusError(f"{path} exists and is not a tokenizer's {kind}: choose another --out, so that it is "
                              f"not overwritten (the tokenizer is written as NAME.json, its merges as NAME.merges.txt "
                              f"beside it)")


def cli_main(args) -> int:
    """Train on args.input, write args.out (+ the merges listing); progress to stderr, a summary to stdout. Exit
    status 1 with a message on bad input, as every command (argparse's own usage errors are 2)."""
    from tabgpt.corpus import CorpusError, decode_bytes, prepare_out
    try:
        prepare_out(args.out, [args.input], example="tokenizer.json")
        _check_replaceable(Path(args.out))
        raw = Path(args.input).read_bytes()
        text, _, notice = decode_bytes(raw, args.input)   # as `tabgpt fetch --file` reads it
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot read {args.input}: {e.strerror}", file=sys.stderr)
        return 1
    if notice:
        print(f"note: {notice}", file=sys.stderr)
    verbose = getattr(args, "verbose", False)

    def progress(p):
        pct = 100 * p["done"] / max(p["total"], 1)
        end = "\n" if verbose else ""
        print(f"\r{p['stage']:>5}  {p['done']:>9}/{p['total']:<9} {pct:5.1f}%  {p['seconds']:6.1f} s", end=end,
              file=sys.stderr, flush=True)

    try:
        t0 = time.perf_counter()
        tok = train_tokenizer(text, args.vocab_size, progress=progress)
        seconds = time.perf_counter() - t0
    except (TypeError, ValueError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    print(file=sys.stderr)
    try:
        tok.save(args.out)
    except OSError as e:
        print(f"error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    n_tokens = len(tok.encode_array(text))
    enc_seconds = time.perf_counter() - t0
    n_bytes = len(text.encode("utf-8"))
    short = "" if tok.vocab_size == args.vocab_size else f" (asked for {args.vocab_size}: the text ran out of pairs)"
    print(f"trained {tok.vocab_size} tokens{short} on {n_bytes / 1e6:.2f} MB in {seconds:.1f} s; "
          f"encoded it in {enc_seconds:.1f} s: {n_bytes / max(n_tokens, 1):.3f} bytes/token; wrote {args.out}")
    return 0
