"""The corpus: where the training text comes from, cleaned and split into train and validation.

Sources (one async API, natively and inside Pyodide)::

    corpus = await load_corpus("default")              # bundled Shakespeare, works offline
    corpus = await load_corpus({"book": 1342})          # a Gutenberg book from the Gitenberg mirror
    corpus = await load_corpus({"books": [11, 84]})     # several books: validation = whole books
    corpus = await load_corpus({"url": "https://..."})  # any URL (in a browser it must allow CORS)
    corpus = await load_corpus({"file": "notes.txt"})   # a local file (in the browser: Pyodide's file system)
    corpus = await load_corpus({"text": "pasted..."})   # pasted text
    corpus.train_text, corpus.val_text, corpus.sources, corpus.notices

Every source goes through the same steps: bytes -> encoding detected (UTF-8, else Latin-1 with a
notice) -> Gutenberg licence header and footer removed -> line endings and whitespace normalised ->
stats. Downloads are cached (natively in $TABGPT_CACHE or ~/.cache/tabgpt, in the browser in OPFS),
so a reload does not download again. Anything that goes wrong raises CorpusError, whose message says
what happened and what to do; ``.kind`` names the case for front ends (not_found, network, cors,
http, binary, empty, too_small, too_large, unknown_book, bad_source).

Standard library only: Pyodide has no numpy offline.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from tabgpt import opfs

IN_BROWSER = sys.platform == "emscripten"
DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_TEXT = DATA_DIR / "shakespeare.txt.gz"      # the bundled default corpus, one edition per work
DEFAULT_INDEX = DATA_DIR / "shakespeare.json"       # its works (title, length in characters), in order
CATALOGUE = DATA_DIR / "gitenberg_catalogue.json"   # a few hundred popular books on the Gitenberg mirror
OPFS_FOLDER = "tabgpt-corpus"                       # the browser's cache of downloads

# Books come from the raw files of the GITenberg repositories (the catalogue's "url" template; that host
# answers with "Access-Control-Allow-Origin: *", so a page can read them). TABGPT_MIRROR, a template of
# the same shape with {repo} and {file}, replaces it (another mirror, or a local server in tests).
SMALL_BYTES = 20_000         # below this a corpus gets a notice: too little to learn from
MAX_BYTES = 64_000_000      # cap per download and for a whole corpus: a browser tab must hold it several times
VAL_FRACTION = 0.05         # validation share (config.val_fraction has the same default)
TIMEOUT = 60.0              # seconds per download, natively


class CorpusError(Exception):
    """Something is wrong with the data; the message says what happened and what to do about it."""

    def __init__(self, message: str, kind: str = "error", url: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.url = url


@dataclass
class Corpus:
    """A loaded corpus. ``documents`` are cleaned texts (a book, a file, a work of the default corpus);
    ``text`` joins them with two blank lines; ``sources`` has one stats dict per document."""
    documents: list[str]
    sources: list[dict]
    train_text: str
    val_text: str
    split: str                                      # how train/val were split, in words
    held_out: list[int] = field(default_factory=list)   # documents in validation (empty: tails held out)
    notices: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return join_documents(self.documents)

    def summary(self) -> str:
        n = sum(s["bytes"] for s in self.sources)
        return (f"{len(self.sources)} source(s), {n / 1e6:.2f} MB; train {len(self.train_text):,} chars, "
                f"validation {len(self.val_text):,} chars ({self.split})")


# ---------------------------------------------------------------------------------------------
# Cleaning: bytes -> text, Gutenberg boilerplate, whitespace.

_MAGIC = [(b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"%PDF", "a PDF document"), (b"PK\x03\x04", "a ZIP archive (EPUB and DOCX files are ZIP archives)"),
          (b"\xfd7zXZ", "an xz archive"), (b"BZh", "a bzip2 archive"), (b"\x7fELF", "a program"),
          (b"MZ", "a Windows program"), (b"\x00asm", "a WebAssembly module")]


def decode_bytes(data: bytes, name: str = "the input") -> tuple[str, str, str | None]:
    """Bytes -> (text, encoding, notice or None). UTF-8 first (a BOM is dropped); text that is not
    valid UTF-8 is read as Latin-1 (Windows-1252, its superset that browsers use), with a notice.
    Binary data raises CorpusError; gzip is opened transparently."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise CorpusError(f"{name} looks like gzip data but cannot be decompressed ({e}).", "binary")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return data.decode("utf-16", errors="replace"), "utf-16", f"{name} is UTF-16; it was converted to UTF-8."
    utf16 = _utf16_without_bom(data)
    if utf16:
        return (data.decode(utf16, errors="replace"), utf16,
                f"{name} is UTF-16 ({'little' if utf16.endswith('le') else 'big'}-endian, without a byte-order "
                f"mark); it was converted to UTF-8.")
    for magic, what in _MAGIC:
        if data.startswith(magic) and not _mostly_text(data):
            raise CorpusError(f"{name} is {what}, not text. Give a plain-text (.txt) file; "
                              "for a Gutenberg book choose its 'Plain Text UTF-8' edition.", "binary")
    if not _mostly_text(data):
        raise CorpusError(f"{name} looks like binary data, not text (it holds NUL or control bytes). "
                          "Give a plain-text (.txt) file.", "binary")
    if data[:3] == b"\xef\xbb\xbf":
        data = data[3:]
    try:
        return data.decode("utf-8"), "utf-8", None
    except UnicodeDecodeError as e:
        where = e.start
    try:
        text, enc = data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:
        text, enc = data.decode("latin-1"), "latin-1"
    return text, enc, (f"{name} is not valid UTF-8 (byte {where}); it was read as Latin-1 "
                       f"({'Windows-1252' if enc == 'cp1252' else 'ISO-8859-1'}). "
                       "If accents look wrong, save the file as UTF-8 and load it again.")


def _utf16_without_bom(data: bytes) -> str | None:
    """'utf-16-le' or 'utf-16-be' where mostly Latin text in those encodings lacks its byte-order mark: the NUL
    high bytes of its characters on one side of at least 70% of the pairs, none on the other (and the pairs
    decode to text), else None."""
    head = data[:65536]
    head = head[:len(head) - len(head) % 2]   # whole pairs
    if len(head) < 4:
        return None
    even, odd = head[0::2].count(0), head[1::2].count(0)
    half = len(head) // 2
    for enc, zeros, other in (("utf-16-le", odd, even), ("utf-16-be", even, odd)):
        if zeros >= 0.7 * half and other <= 0.01 * half:   # mostly Latin text, as text without its mark is
            try:
                text = head.decode(enc)
            except UnicodeDecodeError:
                continue
            if _mostly_text(text.encode("utf-8", errors="replace")):
                return enc
    return None


def prepare_out(out, inputs=(), example: str = "out.txt") -> Path:
    """A path that a command may write its result to, checked before the work: not a folder, not one of its
    inputs (which it would overwrite); its folder is created. CorpusError says what to do otherwise."""
    path = Path(out)
    if path.is_dir():
        raise CorpusError(f"--out {out} is a folder: give a file name, for example {path / example}")
    for i in inputs:
        try:
            same = i is not None and path.exists() and Path(i).exists() and path.samefile(i)
        except OSError:
            same = False
        if same:
            raise CorpusError(f"--out {out} is the input file {i}: writing it would replace the input; choose "
                              f"another --out")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CorpusError(f"cannot create the folder of --out {out}: {e.strerror or e}") from e
    if not os.access(path.parent, os.W_OK):
        raise CorpusError(f"cannot write --out {out}: its folder {path.parent} is not writable")
    return path


def check_replaceable_text(out) -> None:
    """`tabgpt fetch --out` replaces a corpus written before (UTF-8 text), never a file of another kind, and writes
    nothing into a tabgpt run folder (beside a run's config.json). CorpusError says what to do otherwise."""
    from tabgpt.run import is_run_folder
    path = Path(out)
    if is_run_folder(path.parent):
        raise CorpusError(f"--out {out} is in the tabgpt run folder {path.parent} (beside its config.json): the corpus "
                          f"would go among (or replace one of) the run's files; choose another --out, outside the "
                          f"run folder")
    if not path.is_file():
        return
    try:
        with open(path, "rb") as f:
            text = _utf8_text(f)
    except OSError as e:
        raise CorpusError(f"cannot read --out {out} to check what it holds: {e.strerror or e}; choose another "
                          f"--out") from e
    if not text:
        raise CorpusError(f"--out {out} exists and is not UTF-8 text (a corpus that `tabgpt fetch` wrote): choose "
                          f"another --out, or delete the file if it is no longer needed, so that it is not "
                          f"overwritten")


def _utf8_text(f) -> bool:
    """Whether the binary file f holds UTF-8 text throughout (mostly text at its start, as _mostly_text)."""
    import codecs
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    chunk = f.read(65536)
    if not _mostly_text(chunk):
        return False
    try:
        while chunk:
            decoder.decode(chunk)
            chunk = f.read(1 << 20)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _mostly_text(data: bytes) -> bool:
    """No NUL bytes and under 1% other control bytes in the first 64 KiB."""
    head = data[:65536]
    if b"\x00" in head:
        return False
    controls = sum(head.count(bytes([c])) for c in range(32) if c not in (9, 10, 12, 13, 27))
    return controls <= len(head) // 100


# The Gutenberg boilerplate comes in a few shapes over the decades:
#   "*** START OF THIS PROJECT GUTENBERG EBOOK ALICE'S ... ***"  (also THE, and without spaces)
#   "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*"  (1990s: the licence comes first)
# and at the end "End of (the) Project Gutenberg('s) EBook/Etext of ...", "*** END OF THIS PROJECT
# GUTENBERG EBOOK ... ***", "*** START: FULL LICENSE ***". Text between a start and an end marker is kept.
_START = re.compile(r"^[ \t]*(\*{3}[ \t]*START OF (THE|THIS) PROJECT GUTENBERG.*"
                    r"|\*+[ \t]*END\*?[ \t]*THE SMALL PRINT.*)$", re.M | re.I)
_END = re.compile(r"^[ \t]*(\*{3}[ \t]*END OF (THE|THIS) PROJECT GUTENBERG.*"
                  r"|End of (the |this )?Project Gutenberg.*"
                  r"|\*{3}[ \t]*START: FULL LICENSE.*)$", re.M | re.I)
_PRODUCED_BY = re.compile(r"^\s*(Produced by|E-?text prepared by|This e-?text was prepared by|"
                          r"Transcribed from|Prepared by)[^\n]*(\n[^\n]+)*\n", re.I)


def clean_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg header and licence footer (where there are any) and normalise:
    Unix line endings, NFC, no trailing spaces, at most two blank lines in a row, one final newline.
    Text without Gutenberg markers is only normalised, so every source goes through here."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = _START.search(text)
    if start:
        text = text[start.end():]
        text = _PRODUCED_BY.sub("", text.lstrip("\n"), count=1)
    end = _END.search(text)
    if end and (start or end.start() > len(text) // 2):     # no start marker: trust only a late end marker
        text = text[:end.start()]
    return normalise_text(text)


def normalise_text(text: str) -> str:
    """Line endings, Unicode NFC, no BOM / NBSP / control characters, no trailing spaces,
    at most two blank lines in a row, no blank lines at either end, a final newline (if any text)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\ufeff", "").replace("\u00a0", " ")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)          # keeps \t and \n
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    text = text.strip("\n")
    return text.rstrip() + "\n" if text.strip() else ""


class _HTMLText(HTMLParser):
    """Text of an HTML page: blocks become paragraphs, scripts and styles vanish, <pre> keeps its lines."""
    BLOCK = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "tr", "blockquote", "section",
             "table", "pre", "hr", "title", "dd", "dt"}
    SKIP = {"script", "style", "head"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skip, self.pre = [], 0, 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag == "br":
            self.parts.append("\n")
        elif tag in self.BLOCK:
            self.parts.append("\n\n")
        self.pre += tag == "pre"

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n\n")
        if tag == "pre":
            self.pre = max(0, self.pre - 1)

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """Plain text of an HTML page (a Gutenberg HTML edition, say): one blank line between blocks."""
    p = _HTMLText()
    p.feed(html)
    p.close()
    text = re.sub(r"\n[ \t]+", "\n", "".join(p.parts))
    return re.sub(r"\n{3,}", "\n\n", text)


def _looks_like_html(text: str) -> bool:
    head = text[:2048].lstrip().lower()
    return head.startswith(("<!doctype html", "<html", "<?xml")) and "<body" in text[:200000].lower()


def text_stats(text: str) -> dict:
    """Size of a cleaned text: characters, UTF-8 bytes, words (whitespace-separated), lines."""
    return {"chars": len(text), "bytes": len(text.encode("utf-8")),
            "words": len(re.findall(r"\S+", text)), "lines": text.count("\n")}


def join_documents(texts: list[str]) -> str:
    """Documents end with a newline; one more blank line sets them two blank lines apart."""
    return "\n\n".join(texts)


# ---------------------------------------------------------------------------------------------
# Train / validation split and size checks.

def split_train_val(documents: list[str], val_fraction: float = VAL_FRACTION) -> tuple[str, str, list[int]]:
    """Split into (train_text, val_text, held_out) so that validation measures unseen text.

    Several documents: whole documents are held out, taken from the end, until about ``val_fraction``
    of the characters; a document that would push validation past max(2 * val_fraction, 25%) is
    skipped (holding out one of two books would waste half the data). ``held_out`` lists their indices.
    One document, or no whole-document choice near the fraction: the tail of every document is held
    out, cut at a line start (``held_out`` is then empty).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), not {val_fraction}")
    sizes = [len(d) for d in documents]
    total = sum(sizes)
    target, cap = val_fraction * total, max(2 * val_fraction, 0.25) * total
    held, got = [], 0
    for i in range(len(documents) - 1, 0, -1):              # never document 0: train keeps one
        if got >= target:
            break
        if got + sizes[i] <= cap:
            held.append(i)
            got += sizes[i]
    if held and got >= target / 2:
        held.sort()
        train = [d for i, d in enumerate(documents) if i not in held]
        return join_documents(train), join_documents([documents[i] for i in held]), held
    cuts = [_tail_cut(d, val_fraction) for d in documents]
    train = join_documents([d[:c] for d, c in zip(documents, cuts) if c > 0])
    val = join_documents([d[c:] for d, c in zip(documents, cuts) if c < len(d)])
    return train, val, []


def _tail_cut(doc: str, val_fraction: float) -> int:
    """Where the held-out tail starts: the first line start at or after (1 - val_fraction) * len."""
    at = int(len(doc) * (1 - val_fraction))
    if at == 0 or doc[at - 1] == "\n":
        return at
    nl = doc.find("\n", at)
    return at if nl < 0 or nl + 1 >= len(doc) else nl + 1


def check_size(n: int, needed: int, unit: str = "tokens", what: str = "the training split") -> None:
    """Raise CorpusError when ``what`` holds fewer than ``needed`` units; the trainer calls it with
    the number of tokens and block_size + 1 (one block of inputs and its shifted targets)."""
    if n < needed:
        raise CorpusError(
            f"{what} has {n:,} {unit}, but one training block needs {needed:,} {unit}. "
            f"Add more text (about {needed - n:,} more {unit}, a few times that to learn anything) "
            "or lower block_size.", "too_small")


def check_cap(nbytes: int, max_bytes: int, name: str, so_far: bool = False) -> None:
    """Refuse what a browser tab could not hold; ``so_far``: a download still going on (size unknown)."""
    if nbytes > max_bytes:
        raise CorpusError(
            f"{name} is {'at least ' if so_far else ''}{nbytes / 1e6:.1f} MB, above the cap of "
            f"{max_bytes / 1e6:g} MB{' that a browser tab holds comfortably' if max_bytes == MAX_BYTES else ''}. "
            "Choose fewer or smaller books or cut the file"
            + ("." if IN_BROWSER else "; natively, TABGPT_MAX_MB=N raises the cap to N MB."), "too_large")


def cap_bytes() -> int:
    """The cap on a download and on a whole corpus: MAX_BYTES, natively TABGPT_MAX_MB (megabytes) if set."""
    mb = os.environ.get("TABGPT_MAX_MB", "") if not IN_BROWSER else ""
    if not mb:
        return MAX_BYTES
    try:
        if 0 < float(mb) < 1e6:   # (a terabyte of text: more is a typo)
            return max(1, int(float(mb) * 1_000_000))
    except ValueError:
        pass
    raise CorpusError(f"TABGPT_MAX_MB={mb!r} is not a positive number of megabytes", "bad_source")


# ---------------------------------------------------------------------------------------------
# The bundled default corpus and the Gitenberg catalogue.

def load_default_works() -> list[tuple[str, str]]:
    """(title, cleaned text) for each work of the bundled default corpus, in its order."""
    index = json.loads(DEFAULT_INDEX.read_text(encoding="utf-8"))
    text = gzip.decompress(DEFAULT_TEXT.read_bytes()).decode("utf-8")
    works, at = [], 0
    for w in index["works"]:
        works.append((w["title"], text[at:at + w["chars"]]))
        at += w["chars"] + 1                                # the blank line between works
    if at - 1 != len(text):
        raise CorpusError(f"the bundled default corpus is damaged ({DEFAULT_TEXT.name} does not match "
                          f"{DEFAULT_INDEX.name}); reinstall tabgpt.", "damaged")
    return works


def load_default() -> str:
    """The cleaned default corpus as one text (works two blank lines apart)."""
    return join_documents([t for _, t in load_default_works()])


_catalogue_cache: dict | None = None


def catalogue() -> dict:
    """The bundled catalogue: {"url": template, "files": [...], "books": [[id, title, author, repo], ...]}."""
    global _catalogue_cache
    if _catalogue_cache is None:
        _catalogue_cache = json.loads(CATALOGUE.read_text(encoding="utf-8"))
    return _catalogue_cache


def _book_dict(row: list) -> dict:
    book_id, title, author, repo = row[:4]
    urls = book_urls(repo, book_id)
    return {"id": book_id, "title": title, "author": author, "repo": repo, "url": urls[0], "urls": urls}


def _fold(s: str) -> str:
    s = unicodedata.normalize("NFKD", s.lower())
    return "".join(c for c in s if not unicodedata.combining(c)).replace("\u2019", "'")


def search_catalogue(query: str = "", limit: int = 20) -> list[dict]:
    """Books whose title or author holds every word of ``query`` (case and accents ignored), or whose
    id is ``query``; in catalogue order (most popular first). An empty query lists the first ``limit``."""
    words = _fold(query).split()
    out = []
    for row in catalogue()["books"]:
        hay = _fold(f"{row[1]} {row[2]}")
        if (query.strip() == str(row[0])) or all(w in hay for w in words):
            out.append(_book_dict(row))
            if len(out) >= limit:
                break
    return out


def find_book(book) -> dict:
    """A catalogue entry by Gutenberg id, or a GITenberg repository name ("Title-Words_1342") for
    books outside the catalogue."""
    if isinstance(book, str) and not book.isdigit():
        m = re.fullmatch(r"(?:GITenberg/)?([A-Za-z0-9._-]+_(\d+))", book.strip())
        if not m:
            raise CorpusError(f"'{book}' is neither a Gutenberg id nor a GITenberg repository name "
                              "such as 'Pride-and-Prejudice_1342'.", "unknown_book")
        return {"id": int(m.group(2)), "title": m.group(1), "author": "", "repo": m.group(1),
                "url": book_urls(m.group(1), int(m.group(2)))[0], "urls": book_urls(m.group(1), int(m.group(2)))}
    book_id = int(book)
    for row in catalogue()["books"]:
        if row[0] == book_id:
            return _book_dict(row)
    raise CorpusError(
        f"book {book_id} is not in the bundled catalogue of {len(catalogue()['books'])} popular books. "
        "Give its GITenberg repository name instead (such as Pride-and-Prejudice_1342, see github.com/GITenberg), "
        "or the URL of its plain text.", "unknown_book")


def book_urls(repo: str, book_id: int, mirror: str | None = None) -> list[str]:
    """Candidate raw-file URLs of a GITenberg repository, best first: UTF-8 text, ASCII text,
    Latin-1 text, then the HTML edition (its tags are stripped). Names vary across repositories."""
    mirror = mirror or os.environ.get("TABGPT_MIRROR") or catalogue()["url"]
    try:
        return [mirror.format(repo=repo, file=f.format(id=book_id)) for f in catalogue()["files"]]
    except (KeyError, IndexError, ValueError) as e:
        raise CorpusError(f"the mirror {mirror!r} is not a URL template with {{repo}} and {{file}} in it ({e}); "
                          "fix TABGPT_MIRROR or unset it", "bad_source") from None


# ---------------------------------------------------------------------------------------------
# Downloads: urllib natively, pyodide.http.pyfetch in the browser, both behind fetch_bytes().

@dataclass
class Download:
    data: bytes
    url: str
    cached: bool = False
    cors: bool | None = None        # natively: did the server allow cross-origin reads? (None: unknown)


async def fetch_bytes(url: str, progress=None, max_bytes: int | None = None,
                      timeout: float = TIMEOUT) -> Download:
    """GET ``url``. Raises CorpusError: not_found (404), http (other status), network (unreachable,
    timed out), cors (the browser refused a cross-origin read), too_large (over ``max_bytes``).
    ``progress(event)`` gets {"stage": "download", "url", "done", "total"} as bytes arrive; bad_url: not an
    http(s) address. max_bytes: cap_bytes() where None."""
    max_bytes = max_bytes or cap_bytes()
    check_url(url)
    if IN_BROWSER:
        return await _fetch_browser(url, progress, max_bytes)
    return _fetch_native(url, progress, max_bytes, timeout)


def check_url(url: str) -> None:
    """Refuse what is not a web address (http or https with a host; natively file: too, for a local mirror) with a
    CorpusError that says what to give."""
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(url)
        ok = (parts.scheme in ("http", "https") and bool(parts.hostname)) or (parts.scheme == "file"
                                                                               and not IN_BROWSER)
    except ValueError:
        ok = False
    if not ok:
        raise CorpusError(f"{url!r} is not a web address: give a full http(s) URL such as "
                          "https://example.org/book.txt (a file on this machine goes by its path instead).",
                          "bad_url", url)


def _fetch_native(url, progress, max_bytes, timeout) -> Download:
    import socket
    import urllib.error
    import urllib.request
    from tabgpt import __version__
    req = urllib.request.Request(url, headers={"User-Agent": f"tabgpt/{__version__}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            if total:
                check_cap(total, max_bytes, url)
            chunks, done, told = [], 0, 0
            while chunk := resp.read(1 << 16):
                done += len(chunk)
                check_cap(done, max_bytes, url, so_far=True)
                chunks.append(chunk)
                if progress and done - told >= 1 << 18:
                    progress({"stage": "download", "url": url, "done": done, "total": total})
                    told = done
            if progress:
                progress({"stage": "download", "url": url, "done": done, "total": total or done})
            cors = resp.headers.get("Access-Control-Allow-Origin") in ("*",) if url.startswith("http") else None
            return Download(b"".join(chunks), url, cors=cors)
    except urllib.error.HTTPError as e:
        raise _http_error(url, e.code, e.reason)
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise _timeout_error(url, timeout)
        if isinstance(reason, FileNotFoundError):
            raise CorpusError(f"{url} does not exist.", "not_found", url)
        raise CorpusError(f"could not reach {_host(url)} ({reason}). Check the network connection and the "
                          "address; the bundled default corpus works offline.", "network", url)
    except (TimeoutError, socket.timeout):
        raise _timeout_error(url, timeout)
    except (ConnectionError, OSError) as e:
        raise CorpusError(f"the download of {url} broke off ({e}); try again.", "network", url)


async def _fetch_browser(url, progress, max_bytes) -> Download:
    import js
    from pyodide.http import pyfetch
    try:
        resp = await pyfetch(url)
    except OSError as e:                    # fetch() rejects: offline, DNS, or a CORS refusal
        if not js.navigator.onLine:
            raise CorpusError(f"the browser is offline, so {_host(url)} cannot be reached. Use the bundled "
                              "default corpus, a local file or pasted text.", "network", url)
        raise CorpusError(cors_message(url) + f" (browser: {e})", "cors", url)
    if not resp.ok:
        raise _http_error(url, resp.status, resp.status_text)
    total = int(resp.headers.get("content-length") or 0) or None
    if total:
        check_cap(total, max_bytes, url)
    body = resp.js_response.body
    if body is None or progress is None:
        data = await resp.bytes()
    else:                                   # read the stream to report progress
        reader, chunks, done = body.getReader(), [], 0
        while True:
            part = await reader.read()
            if part.done:
                break
            chunk = part.value.to_bytes()
            done += len(chunk)
            check_cap(done, max_bytes, url, so_far=True)
            chunks.append(chunk)
            progress({"stage": "download", "url": url, "done": done, "total": total})
        data = b"".join(chunks)
    check_cap(len(data), max_bytes, url)
    return Download(data, url, cors=True)


def cors_message(url: str) -> str:
    """What a CORS refusal means and what to do; the browser cannot tell it from an unreachable host."""
    return (f"the browser could not read {url}: either {_host(url)} cannot be reached, or it refused a "
            "cross-origin request (CORS). A page may only read files from servers that answer with an "
            "'Access-Control-Allow-Origin' header, and many sites do not. Download the file and load it "
            "with 'Choose a file', paste the text, or pick a book from the catalogue (its mirror allows CORS).")


def _http_error(url, status, reason) -> CorpusError:
    if status == 404:
        return CorpusError(f"{url} was not found (HTTP 404). Check the address.", "not_found", url)
    return CorpusError(f"{url} answered HTTP {status} {reason}. Try again later or use another source.",
                       "http", url)


def _timeout_error(url, timeout) -> CorpusError:
    return CorpusError(f"{_host(url)} did not answer within {timeout:g} s. Try again later, or use the "
                       "bundled default corpus, which works offline.", "network", url)


def _host(url: str) -> str:
    m = re.match(r"[a-z]+://([^/]+)", url)
    return m.group(1) if m else url


# ---------------------------------------------------------------------------------------------
# Cache of raw downloads: files natively, the Origin Private File System (OPFS) in the browser.

class Cache:
    """Raw bytes of downloads by URL, so a reload does not download again. Keys are hashed URLs."""

    def __init__(self, directory: str | os.PathLike | None = None):
        if directory is None:
            base = os.environ.get("TABGPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tabgpt")
            directory = os.path.join(base, "corpus")
        self.dir = Path(directory)

    @staticmethod
    def key(url: str) -> str:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[-60:]
        return hashlib.sha256(url.encode("utf-8")).hexdigest()[:20] + "-" + name

    async def get(self, url: str) -> bytes | None:
        if IN_BROWSER:
            return await opfs.read(OPFS_FOLDER, self.key(url))
        p = self.dir / self.key(url)
        return p.read_bytes() if p.exists() else None

    async def put(self, url: str, data: bytes) -> None:
        if IN_BROWSER:
            return await opfs.write(OPFS_FOLDER, self.key(url), data)
        self.dir.mkdir(parents=True, exist_ok=True)
        p = self.dir / self.key(url)
        tmp = p.with_suffix(p.suffix + f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, p)                  # atomic: a broken-off write never looks cached


# ---------------------------------------------------------------------------------------------
# Sources -> documents -> Corpus.

async def load_corpus(source="default", *, val_fraction: float = VAL_FRACTION, progress=None,
                      cache: bool | Cache = True, max_bytes: int | None = None, timeout: float = TIMEOUT,
                      mirror: str | None = None) -> Corpus:
    """Load, clean and split a corpus. ``source``: "default" (or None), {"book": id}, {"books": [ids]},
    {"url": url}, {"file": path}, {"text": str}, a list of these, or a plain string (a URL or a path).
    ``cache``: True (default location), False, or a Cache. ``mirror``: a raw-file URL template with
    {repo} and {file} in place of the Gitenberg mirror."""
    max_bytes = max_bytes or cap_bytes()
    if cache is True:
        cache = Cache()
    state = _Load(cache or None, progress, max_bytes, timeout, mirror)
    for s in _source_list(source):
        await state.add(s)
    total = sum(s["bytes"] for s in state.sources)
    check_cap(total, max_bytes, "the corpus")
    if total < SMALL_BYTES:
        state.notices.append(f"The text is only {total:,} bytes: a model learns little from so little (a book is "
                             "a few hundred thousand).")
    train, val, held = split_train_val(state.documents, val_fraction)
    if held:
        names = ", ".join(state.sources[i]["name"] for i in held)
        split = f"validation = {len(held)} whole document(s) of {len(state.documents)}: {names}"
    else:
        split = f"validation = the last {val_fraction:.0%} of each document"
    return Corpus(state.documents, state.sources, train, val, split, held, state.notices)


def load_corpus_sync(source="default", **kw) -> Corpus:
    """load_corpus natively, where nothing truly suspends (CLI, tests)."""
    import tabgpt
    return tabgpt.run_main(load_corpus(source, **kw))


def _source_list(source) -> list:
    if source is None or source == "default":
        return [{"default": True}]
    if isinstance(source, (list, tuple)):
        return [s for x in source for s in _source_list(x)]
    if isinstance(source, str):
        return [{"url": source}] if re.match(r"https?://", source) else [{"file": source}]
    if isinstance(source, dict):
        if "books" in source:
            return [{"book": b} for b in source["books"]]
        if len(source) == 1 and next(iter(source)) in ("default", "book", "url", "file", "text"):
            return [source]
    raise CorpusError(f"unknown corpus source {source!r}: use 'default', {{'book': id}}, {{'books': [ids]}}, "
                      "{'url': url}, {'file': path} or {'text': str}.", "bad_source")


class _Load:
    """Collects documents, their stats and notices while sources are added one by one."""

    def __init__(self, cache, progress, max_bytes, timeout, mirror):
        self.cache, self.progress, self.mirror = cache, progress, mirror
        self.max_bytes, self.timeout = max_bytes, timeout
        self.documents, self.sources, self.notices = [], [], []

    def _add(self, text: str, info: dict, raw: str = "") -> None:
        """A cleaned document and its stats; raw, the text before cleaning, names why an empty one is empty."""
        if not text.strip():
            gutenberg = _START.search(raw) or _END.search(raw)
            raise CorpusError(f"{info['name']} holds no text"
                              f"{' after cleaning (only Project Gutenberg boilerplate)' if gutenberg else ''}"
                              f"{' (only white space)' if not gutenberg and info.get('raw_bytes') else ''}. "
                              "Choose another source.", "empty")
        self.documents.append(text)
        self.sources.append({**info, **text_stats(text)})

    async def add(self, s: dict) -> None:
        if "default" in s:
            for title, text in load_default_works():
                self._add(text, {"name": title, "kind": "default", "author": "William Shakespeare"})
        elif "text" in s:
            self._add(clean_gutenberg(str(s["text"])), {"name": "pasted text", "kind": "text"}, raw=str(s["text"]))
        elif "file" in s:
            path = Path(s["file"])
            if not path.is_file():
                raise CorpusError(f"{path} does not exist or is not a file.", "not_found")
            check_cap(path.stat().st_size, self.max_bytes, str(path))
            self._add_bytes(path.read_bytes(), {"name": path.name, "kind": "file", "path": str(path)})
        elif "url" in s:
            d = await self._download(s["url"])
            info = {"name": s["url"].rstrip("/").rsplit("/", 1)[-1] or s["url"], "kind": "url", "url": s["url"]}
            self._add_bytes(d.data, {**info, "cached": d.cached})
            if d.cors is False:
                self.notices.append(f"{_host(s['url'])} sends no 'Access-Control-Allow-Origin' header: this "
                                    "works here, but a browser page could not read it (CORS).")
        elif "book" in s:
            await self._add_book(find_book(s["book"]))

    async def _add_book(self, book: dict) -> None:
        urls = book_urls(book["repo"], book["id"], self.mirror) if self.mirror else book["urls"]
        d = await self._cached(urls) or await self._fetch_first(book, urls)
        self._add_bytes(d.data, {"name": book["title"], "kind": "book", "id": book["id"],
                                 "author": book["author"], "url": d.url, "cached": d.cached})

    async def _cached(self, urls: list[str]) -> Download | None:
        """A book cached earlier makes no request at all, not even for the file names missing before it."""
        for url in urls if self.cache else []:
            data = await self.cache.get(url)
            if data is not None:
                return Download(data, url, cached=True)
        return None

    async def _fetch_first(self, book: dict, urls: list[str]) -> Download:
        for url in urls:
            try:
                return await self._download(url, look_in_cache=False)
            except CorpusError as e:
                if e.kind != "not_found":   # names vary across repositories: a 404 means try the next shape
                    raise CorpusError(f"book {book['id']} ({book['title']}): {e}", e.kind, e.url)
        names = [f.format(id=book["id"]) for f in catalogue()["files"]]
        raise CorpusError(
            f"book {book['id']} ({book['title']}): none of its usual files is on the mirror "
            f"({', '.join(names)} under {urls[0][:-len(names[0])]}). "
            "Look the repository up on github.com/GITenberg and load its text file by its URL.",
            "not_found", urls[0])

    async def _download(self, url: str, look_in_cache: bool = True) -> Download:
        if self.cache and look_in_cache:
            data = await self.cache.get(url)
            if data is not None:
                return Download(data, url, cached=True)
        d = await fetch_bytes(url, self.progress, self.max_bytes, self.timeout)
        if self.cache:
            try:
                await self.cache.put(url, d.data)
            except Exception as e:          # a full disk or no OPFS must not lose the download
                self.notices.append(f"could not cache {url} ({e}); it will be downloaded again next time.")
        return d

    def _add_bytes(self, data: bytes, info: dict) -> None:
        name = info["name"]
        if not data:
            raise CorpusError(f"{name} is empty (0 bytes). Choose another source.", "empty", info.get("url"))
        check_cap(len(data), self.max_bytes, name)
        text, encoding, notice = decode_bytes(data, name)
        if notice:
            self.notices.append(notice)
        if _looks_like_html(text) or str(info.get("url", "")).endswith((".htm", ".html")):
            text = html_to_text(text)
            if info["kind"] != "book":
                self.notices.append(f"{name} is an HTML page; its text was extracted (tags removed).")
        self._add(clean_gutenberg(text), {**info, "encoding": encoding, "raw_bytes": len(data)}, raw=text)


# ---------------------------------------------------------------------------------------------
# `tabgpt fetch`

def cli_main(args) -> int:
    """tabgpt fetch {--default | --book ID... | --url URL | --file PATH | --search QUERY} [--out FILE]"""
    if getattr(args, "search", None) is not None:
        books = search_catalogue(args.search, limit=len(catalogue()["books"]))
        for b in books[:50]:
            print(f"{b['id']:>6}  {b['title'][:60]:60s}  {b['author']}")
        if not books:
            print(f"no book of the catalogue matches {args.search!r}; try a shorter word of the title or author")
            return 1
        shown = f"the first 50 of {len(books)} books" if len(books) > 50 else f"{len(books)} book(s)"
        print(f"{shown}; fetch one with: tabgpt fetch --book ID --out corpus.txt")
        return 0
    if getattr(args, "book", None):
        source = {"books": args.book}
    elif getattr(args, "url", None):
        source = {"url": args.url}
    elif getattr(args, "file", None):
        source = {"file": args.file}
    else:
        source = "default"

    def show(ev):
        total = f"/{ev['total'] / 1e6:.2f}" if ev.get("total") else ""
        print(f"\r  {ev['url'].rsplit('/', 1)[-1]}: {ev['done'] / 1e6:.2f}{total} MB", end="", file=sys.stderr)

    try:
        if getattr(args, "out", None):
            prepare_out(args.out, [getattr(args, "file", None)])
            check_replaceable_text(args.out)
        corpus = load_corpus_sync(source, progress=show)
    except CorpusError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    print("", file=sys.stderr)
    print(f"{'source':40s} {'bytes':>11s} {'words':>9s} {'lines':>8s}  encoding")
    for s in corpus.sources:
        print(f"{s['name'][:40]:40s} {s['bytes']:>11,} {s['words']:>9,} {s['lines']:>8,}  "
              f"{s.get('encoding', 'utf-8')}{' (cached)' if s.get('cached') else ''}")
    st = text_stats(corpus.text)
    print(f"{'total':40s} {st['bytes']:>11,} {st['words']:>9,} {st['lines']:>8,}")
    print(f"split: {corpus.split}")
    for n in corpus.notices:
        print(f"notice: {n}")
    if getattr(args, "out", None):
        try:
            Path(args.out).write_text(corpus.text, encoding="utf-8")
        except OSError as e:
            print(f"error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
            return 1
        print(f"wrote {args.out}")
    return 0
