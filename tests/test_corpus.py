"""tabgpt.corpus against a local HTTP server shaped like the Gitenberg mirror (no internet).

tests/fixtures/corpus/GITenberg/<repo>/master/<file> holds trimmed real Gutenberg files in the shapes
the mirror has: 11-0.txt (UTF-8 + BOM, CRLF, "*** START OF THIS PROJECT GUTENBERG EBOOK"), only
2600-8.txt (Latin-1), only 84.txt (the 1990s "small print" licence first), only the HTML edition
972-h/972-h.htm. The server answers /GITenberg/<repo>/master/<file> like the raw-file host, with
"Access-Control-Allow-Origin: *", and has routes for each error case.
"""

import argparse
import gzip
import hashlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tabgpt import corpus as C
from tabgpt.corpus import CorpusError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "corpus"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
SMALL_TEXT = "The first line.\nThe second line, which is longer than the first.\n" * 20


class Handler(BaseHTTPRequestHandler):
    log = []                                            # request paths, in order

    def do_GET(self):
        self.log.append(self.path)
        path = self.path.split("?")[0]
        if path == "/slow.txt":
            time.sleep(2)
            return self.reply(200, b"late")
        if path == "/boom":
            return self.reply(500, b"oops")
        if path == "/nocors/plain.txt":
            return self.reply(200, SMALL_TEXT.encode(), cors=False)
        if path == "/binary.png":
            return self.reply(200, PNG)
        if path == "/nul.bin":
            return self.reply(200, b"abc\x00\x01\x02" * 100)
        if path == "/empty.txt":
            return self.reply(200, b"")
        if path == "/big.txt":
            return self.reply(200, b"word " * 400_000)  # 2 MB with a Content-Length
        if path == "/big-stream.txt":                   # 2 MB without Content-Length: the cap must stop it
            self.send_response(200)
            self.send_header("Access-Control-Allow-Origin", "*")
            self.end_headers()
            for _ in range(200):
                try:
                    self.wfile.write(b"word " * 2000)
                except OSError:
                    break
            return
        f = FIXTURES / path.lstrip("/")
        if f.is_file() and FIXTURES in f.resolve().parents:
            return self.reply(200, f.read_bytes())
        self.reply(404, b"404: Not Found")

    def reply(self, status, body, cors=True):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if cors:
            self.send_header("Access-Control-Allow-Origin", "*")
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def mirror(server):
    Handler.log.clear()
    return server + "/GITenberg/{repo}/master/{file}"


def notices(corpus) -> list:
    """The corpus's notices but the one every fixture gets: they are a few kB, "too little to learn from"."""
    return [n for n in corpus.notices if not n.startswith("The text is only")]


def load(source, **kw):
    kw.setdefault("cache", False)
    return C.load_corpus_sync(source, **kw)


def error_of(source, **kw) -> CorpusError:
    with pytest.raises(CorpusError) as e:
        load(source, **kw)
    print(f"{e.value.kind}: {e.value}")
    return e.value


def assert_clean(text):
    assert text.endswith("\n") and not text.endswith("\n\n"), repr(text[-40:])
    for bad in ("\r", "\ufeff", "\n\n\n\n", " \n", "Gutenberg", "GUTENBERG"):
        assert bad not in text, f"{bad!r} left in: ...{text[max(0, text.find(bad) - 80):text.find(bad) + 80]!r}..."


# ---------------------------------------------------------------------------------------------
# The bundled default corpus.

def test_default_corpus_is_bundled_clean_and_intact():
    index = json.loads(C.DEFAULT_INDEX.read_text())
    packed = C.DEFAULT_TEXT.stat().st_size
    works = C.load_default_works()
    text = gzip.decompress(C.DEFAULT_TEXT.read_bytes())
    print(f"{len(works)} works, {len(text):,} bytes, {packed:,} gzipped")
    assert packed < 3_000_000, "the bundled default corpus should stay a few MB"
    assert hashlib.sha256(text).hexdigest() == index["text_sha256"]
    assert len(works) == len(index["works"]) == 42
    titles = [t for t, _ in works]
    assert len(set(titles)) == len(titles), "one edition per work"
    assert "Hamlet" in titles and "Sonnets" in titles
    assert not any(w["file"].endswith("_gut_f.txt") for w in index["works"])
    default = C.load_default()
    assert len(default) > 4_500_000
    assert_clean(default)
    assert default == C.join_documents([t for _, t in works])
    hamlet = dict(works)["Hamlet"]
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare\n")
    assert "To be, or not to be" in hamlet


def test_default_corpus_holds_out_whole_works():
    c = load("default")
    assert c.held_out, c.split
    val_works = [c.documents[i] for i in c.held_out]
    train_works = [d for i, d in enumerate(c.documents) if i not in c.held_out]
    assert c.val_text == C.join_documents(val_works)
    assert c.train_text == C.join_documents(train_works)
    share = len(c.val_text) / len(c.text)
    print(c.split, f"{share:.1%}")
    assert 0.03 < share < 0.10
    assert all(w[:2000] not in c.train_text for w in val_works)
    assert len(c.sources) == 42 and all(s["kind"] == "default" for s in c.sources)
    assert sum(s["words"] for s in c.sources) > 800_000


# ---------------------------------------------------------------------------------------------
# Gutenberg books through the mirror's URL shapes.

def test_book_utf8_with_bom_and_crlf(mirror):
    c = load({"book": 11}, mirror=mirror)
    assert Handler.log == ["/GITenberg/Alice-s-Adventures-in-Wonderland_11/master/11-0.txt"]
    text = c.text
    assert text.startswith("ALICE’S ADVENTURES IN WONDERLAND\n\nLewis Carroll\n"), text[:120]
    assert "CHAPTER I. Down the Rabbit-Hole\n\nAlice was beginning to get very tired" in text
    assert "End of" not in text and "This eBook is for the use" not in text and "Produced by" not in text
    assert_clean(text)
    s = c.sources[0]
    assert (s["id"], s["name"], s["author"], s["encoding"]) == (11, "Alice's Adventures in Wonderland",
                                                                "Lewis Carroll", "utf-8")
    assert {k: s[k] for k in ("chars", "bytes", "words", "lines")} == C.text_stats(text)
    assert s["raw_bytes"] == (FIXTURES / "GITenberg/Alice-s-Adventures-in-Wonderland_11/master/11-0.txt").stat().st_size
    assert notices(c) == []


def test_book_falls_back_to_latin1_file_with_a_notice(mirror):
    c = load({"book": 2600}, mirror=mirror)
    assert [p.rsplit("/", 1)[-1] for p in Handler.log] == ["2600-0.txt", "2600.txt", "2600-8.txt"]
    text = c.text
    assert text.startswith("WAR AND PEACE\n\nBy Leo Tolstoy/Tolstoi\n\n\nCHAPTER I\n"), text[:80]
    assert "Anna Pávlovna\nSchérer, maid of honor and favorite of the Empress Márya Fëdorovna." in text
    assert_clean(text)
    n = notices(c)
    assert len(n) == 1 and "not valid UTF-8" in n[0] and "Latin-1" in n[0], n


def test_book_with_1990s_small_print_header(mirror):
    c = load({"book": 84}, mirror=mirror)
    assert [p.rsplit("/", 1)[-1] for p in Handler.log] == ["84-0.txt", "84.txt"]
    text = c.text
    assert text.startswith("Frankenstein, or the Modern Prometheus\nby Mary Wollstonecraft (Godwin) Shelley\n")
    assert text.endswith("These reflections have dispelled the agitation with which I began my letter,\n")
    assert "SMALL PRINT" not in text and "Etext" not in text
    assert_clean(text)


def test_book_with_only_an_html_edition(mirror):
    c = load({"book": 972}, mirror=mirror)
    assert [p.split("/master/")[1] for p in Handler.log] == ["972-0.txt", "972.txt", "972-8.txt", "972-h/972-h.htm"]
    text = c.text
    assert text.startswith("THE DEVIL'S DICTIONARY\n\nby Ambrose Bierce\n"), text[:100]
    assert "AUTHOR'S PREFACE\n\nThe Devil's Dictionary was begun in a weekly paper in 1881" in text
    assert "books—The Cynic's This" in text                 # &mdash; decoded
    assert "ZOOLOGY, n. The science and history of the animal kingdom" in text
    assert "<" not in text and "font-size" not in text
    assert_clean(text)


def test_book_by_repository_name_and_unknown_ids(mirror):
    c = load({"book": "Alice-s-Adventures-in-Wonderland_11"}, mirror=mirror)
    assert c.sources[0]["id"] == 11 and "Alice was beginning" in c.text
    e = error_of({"book": 99999999})
    assert e.kind == "unknown_book" and "not in the bundled catalogue" in str(e) and "URL of its plain" in str(e)
    assert error_of({"book": "no such thing"}).kind == "unknown_book"


def test_book_missing_on_mirror_tries_every_shape_then_says_what_to_do(mirror):
    e = error_of({"book": 1342}, mirror=mirror)        # in the catalogue, not among the fixtures
    assert e.kind == "not_found"
    assert [p.split("/master/")[1] for p in Handler.log] == ["1342-0.txt", "1342.txt", "1342-8.txt",
                                                             "1342-h/1342-h.htm"]
    assert "Pride and Prejudice" in str(e) and "by its URL" in str(e)


def test_several_books_split_by_whole_book(mirror):
    c = load({"books": [11, 84, 2600, 972]}, mirror=mirror, val_fraction=0.2)
    print(c.split, [len(d) for d in c.documents])
    assert [s["id"] for s in c.sources] == [11, 84, 2600, 972]
    assert c.held_out and 0 not in c.held_out
    assert c.val_text == C.join_documents([c.documents[i] for i in c.held_out])
    assert c.train_text == C.join_documents([d for i, d in enumerate(c.documents) if i not in c.held_out])
    assert "whole document" in c.split


def test_downloads_are_cached(mirror, tmp_path):
    cache = C.Cache(tmp_path)
    first = C.load_corpus_sync({"book": 2600}, mirror=mirror, cache=cache)
    n = len(Handler.log)
    second = C.load_corpus_sync({"book": 2600}, mirror=mirror, cache=cache)
    assert len(Handler.log) == n, f"downloaded again: {Handler.log[n:]}"
    assert second.text == first.text and second.notices == first.notices
    assert (first.sources[0]["cached"], second.sources[0]["cached"]) == (False, True)
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [C.Cache.key(first.sources[0]["url"])]
    assert files[0].read_bytes() == (FIXTURES / "GITenberg/War-and-Peace_2600/master/2600-8.txt").read_bytes()


def test_progress_reports_bytes(mirror):
    events = []
    c = load({"book": 11}, mirror=mirror, progress=events.append)
    assert events and events[-1]["done"] == events[-1]["total"] == c.sources[0]["raw_bytes"]
    assert events[-1]["url"].endswith("/11-0.txt")


# ---------------------------------------------------------------------------------------------
# Any URL, and every error case.

def test_url_without_cors_header_works_natively_with_a_notice(server):
    c = load({"url": server + "/nocors/plain.txt"})
    assert c.text == SMALL_TEXT
    n = notices(c)
    assert len(n) == 1 and "CORS" in n[0] and "Access-Control-Allow-Origin" in n[0]
    assert notices(load(server + "/GITenberg/Frankenstein_84/master/84.txt")) == []   # a plain string URL


def test_cors_refusal_message_says_what_it_means_and_what_to_do():
    m = C.cors_message("https://example.org/book.txt")
    for part in ("example.org", "cross-origin", "CORS", "Access-Control-Allow-Origin", "Choose a file", "catalogue"):
        assert part in m, part


def test_http_errors(server):
    e = error_of({"url": server + "/missing.txt"})
    assert e.kind == "not_found" and "HTTP 404" in str(e) and e.url.endswith("/missing.txt")
    e = error_of({"url": server + "/boom"})
    assert e.kind == "http" and "HTTP 500" in str(e) and "Try again later" in str(e)


def test_network_down():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                           # nothing listens there now
    e = error_of({"url": f"http://127.0.0.1:{port}/book.txt"})
    assert e.kind == "network" and f"could not reach 127.0.0.1:{port}" in str(e) and "offline" in str(e)


def test_timeout(server):
    e = error_of({"url": server + "/slow.txt"}, timeout=0.3)
    assert e.kind == "network" and "did not answer within 0.3 s" in str(e)


def test_binary_input_is_refused(server, tmp_path):
    e = error_of({"url": server + "/binary.png"})
    assert e.kind == "binary" and "PNG image" in str(e) and "plain-text" in str(e)
    e = error_of({"url": server + "/nul.bin"})
    assert e.kind == "binary" and "binary data" in str(e)
    (tmp_path / "book.epub").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)
    e = error_of({"file": str(tmp_path / "book.epub")})
    assert e.kind == "binary" and "ZIP archive" in str(e)


def test_empty_input_is_refused(server):
    e = error_of({"url": server + "/empty.txt"})
    assert e.kind == "empty" and "0 bytes" in str(e)
    boilerplate = ("The Project Gutenberg EBook of Nothing\n\n*** START OF THIS PROJECT GUTENBERG EBOOK NOTHING ***\n"
                   "\n\n\n*** END OF THIS PROJECT GUTENBERG EBOOK NOTHING ***\nlicence text\n")
    e = error_of({"text": boilerplate})
    assert e.kind == "empty" and "no text after cleaning" in str(e)
    e = error_of({"text": " \n\t\n"})
    assert e.kind == "empty" and "no text" in str(e) and "boilerplate" not in str(e)
    c = load({"text": "hello you!"})   # loads, with a word on how little it is
    assert any(n.startswith("The text is only 11 bytes") for n in c.notices), c.notices   # (+ a final newline)


def test_utf16_without_byte_order_mark_is_converted(tmp_path):
    text = "To be, or not to be: that is the question.\n" * 20
    for enc in ("utf-16-le", "utf-16-be"):
        (tmp_path / enc).write_bytes(text.encode(enc))
        c = load({"file": str(tmp_path / enc)})
        assert c.text.strip() == text.strip() and any("UTF-16" in n for n in c.notices), enc


def test_what_is_not_a_web_address_is_refused():
    for url in ("notaurl", "http://[::1", "https://", "ftp://example.org/a.txt"):
        e = error_of({"url": url})
        assert e.kind == "bad_url" and "not a web address" in str(e), url


def test_cap_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("TABGPT_MAX_MB", "1")
    e = error_of({"url": server + "/big.txt"})
    assert e.kind == "too_large" and "above the cap of 1 MB" in str(e) and "TABGPT_MAX_MB" in str(e)
    for bad in ("lots", "inf", "0", "-1"):
        monkeypatch.setenv("TABGPT_MAX_MB", bad)
        assert "not a positive number" in str(error_of("default")), bad
    monkeypatch.setenv("TABGPT_MAX_MB", "0.0001")
    assert "above the cap of 0.0001 MB" in str(error_of({"url": server + "/big.txt"}))


def test_a_mirror_that_is_no_template_is_named():
    e = error_of({"book": 11}, mirror="https://example.org/{repo")
    assert e.kind == "bad_source" and "TABGPT_MIRROR" in str(e)


def test_too_large_for_memory_is_capped(server, tmp_path):
    for path in ("/big.txt", "/big-stream.txt"):
        e = error_of({"url": server + path}, max_bytes=1_000_000)
        assert e.kind == "too_large" and "above the cap of 1 MB" in str(e), path
    (tmp_path / "big.txt").write_text("word " * 300_000)
    e = error_of({"file": str(tmp_path / "big.txt")}, max_bytes=1_000_000)
    assert e.kind == "too_large" and "1.5 MB" in str(e)
    e = error_of([{"text": "a " * 300_000}, {"text": "b " * 300_000}], max_bytes=1_000_000)
    assert e.kind == "too_large" and "the corpus is 1.2 MB" in str(e)


def test_too_small_for_one_training_block_says_how_much_is_needed():
    C.check_size(257, 257)
    with pytest.raises(CorpusError) as e:
        C.check_size(100, 257, what="the validation split")
    print(e.value)
    assert e.value.kind == "too_small"
    assert "the validation split has 100 tokens" in str(e.value) and "needs 257 tokens" in str(e.value)
    assert "about 157 more" in str(e.value) and "block_size" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Files, pasted text, sources.

def test_file_text_and_mixed_sources(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_bytes("caf\xe9 cr\xe8me\r\nsecond line  \r\n".encode("latin-1"))
    c = load({"file": str(p)})
    assert c.text == "café crème\nsecond line\n" and "Latin-1" in c.notices[0]
    s = c.sources[0]
    assert (s["kind"], s["name"], s["lines"], s["words"], s["encoding"]) == ("file", "notes.txt", 2, 4, "cp1252")
    assert load(str(p)).text == c.text                  # a plain string is a path
    c = load([{"text": "pasted words\n"}, {"file": str(p)}])
    assert c.text == "pasted words\n\n\ncafé crème\nsecond line\n"
    assert [s["kind"] for s in c.sources] == ["text", "file"]
    assert error_of({"file": str(tmp_path / "nope.txt")}).kind == "not_found"
    assert error_of({"song": 1}).kind == "bad_source"
    assert error_of(42).kind == "bad_source"


# ---------------------------------------------------------------------------------------------
# Cleaning, decoding, splitting.

def test_clean_gutenberg_normalises_whitespace_and_drops_the_boilerplate():
    raw = ("\ufeffThe Project Gutenberg EBook of Tiny, by Nobody\r\n\r\nThis eBook is for the use of anyone\r\n"
           "*** START OF THIS PROJECT GUTENBERG EBOOK TINY ***\r\n\r\n\r\nProduced by Some Volunteers\r\nand Others\r\n"
           "\r\n\r\n\r\nTINY\u00a0BOOK   \r\n\r\n\r\n\r\n\r\n\r\nFirst\tparagraph.\x0c\r\n  Indented line.\r\n"
           "\r\nEnd of the Project Gutenberg EBook of Tiny\r\n*** END OF THIS PROJECT GUTENBERG EBOOK TINY ***\r\n"
           "Section 1. licence\r\n")
    assert C.clean_gutenberg(raw) == "TINY BOOK\n\n\nFirst\tparagraph.\n  Indented line.\n"
    # newer and older shapes of the markers
    assert C.clean_gutenberg("h\n***START OF THE PROJECT GUTENBERG EBOOK X***\nbody\n*** END OF THE PROJECT "
                             "GUTENBERG EBOOK X ***\nf\n") == "body\n"
    assert C.clean_gutenberg("licence\n*END THE SMALL PRINT! FOR PUBLIC DOMAIN EBOOKS*Ver.02/11/02*END*\n"
                             "body\n*** START: FULL LICENSE ***\n") == "body\n"
    # no markers: only normalised, and a mention of Project Gutenberg early on is kept
    plain = "A note on Project Gutenberg.\n" + "line\n" * 10
    assert C.clean_gutenberg(plain) == plain
    assert C.clean_gutenberg("caf\u0065\u0301\n") == "caf\u00e9\n"          # NFC


def test_decode_bytes_detects_encodings():
    assert C.decode_bytes("ok ✓".encode("utf-8")) == ("ok ✓", "utf-8", None)
    assert C.decode_bytes(b"\xef\xbb\xbfbom") == ("bom", "utf-8", None)
    text, enc, notice = C.decode_bytes("utf-16 ✓".encode("utf-16"))
    assert (text, enc) == ("utf-16 ✓", "utf-16") and "UTF-16" in notice
    text, enc, notice = C.decode_bytes(b"\x93quoted\x94 na\xefve", "x.txt")
    assert (text, enc) == ("\u201cquoted\u201d na\u00efve", "cp1252") and "x.txt is not valid UTF-8 (byte 0)" in notice
    text, enc, notice = C.decode_bytes(b"\x81 odd")                     # undefined in Windows-1252
    assert (text, enc) == ("\x81 odd", "latin-1") and "ISO-8859-1" in notice
    assert C.decode_bytes(gzip.compress(b"zipped text"))[0] == "zipped text"


def test_split_train_val_rules():
    one = "".join(f"line {i:04d} of the only document\n" for i in range(1000))
    train, val, held = C.split_train_val([one], 0.1)
    assert held == [] and train + val == one and val.startswith("line 0900") and train.endswith("\n")
    docs = [f"document {i}\n" * 100 for i in range(20)]                  # 20 equal documents
    train, val, held = C.split_train_val(docs, 0.1)
    assert held == [18, 19] and val == C.join_documents(docs[18:]) and train == C.join_documents(docs[:18])
    two = ["a line\n" * 100, "b line\n" * 100]                            # one of two would be half the data
    train, val, held = C.split_train_val(two, 0.1)
    assert held == [] and train == C.join_documents(["a line\n" * 90, "b line\n" * 90])
    assert val == C.join_documents(["a line\n" * 10, "b line\n" * 10])
    big_last = ["small\n" * 100] * 9 + ["large\n" * 5000]                # the big last one is skipped
    train, val, held = C.split_train_val(big_last, 0.05)
    assert 9 not in held and held and val == C.join_documents([big_last[i] for i in held])
    with pytest.raises(ValueError):
        C.split_train_val(docs, 0)


# ---------------------------------------------------------------------------------------------
# The catalogue and `tabgpt fetch`.

def test_catalogue_is_searchable_and_well_formed():
    cat = C.catalogue()
    books = cat["books"]
    ids = [b[0] for b in books]
    assert len(books) >= 300 and len(set(ids)) == len(ids)
    assert all(repo.endswith(f"_{i}") and title for i, title, _, repo in books)
    assert cat["url"] == "https://raw.githubusercontent.com/GITenberg/{repo}/master/{file}"
    assert C.search_catalogue("austen")[0]["title"] == "Pride and Prejudice"
    assert [b["id"] for b in C.search_catalogue("1342")] == [1342]
    assert C.search_catalogue("misérables")[0]["id"] == 135                 # accents ignored
    assert C.search_catalogue("DOYLE hound")[0]["title"] == "The Hound of the Baskervilles"
    assert len(C.search_catalogue("", limit=7)) == 7
    b = C.find_book(1342)
    assert b["url"] == "https://raw.githubusercontent.com/GITenberg/Pride-and-Prejudice_1342/master/1342-0.txt"
    assert b["urls"][-1].endswith("/1342-h/1342-h.htm")


def fetch_args(**kw):
    d = {"default": False, "book": None, "url": None, "file": None, "search": None, "out": None}
    d.update(kw)
    return argparse.Namespace(**d)


def test_cli_fetch(mirror, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TABGPT_MIRROR", mirror)
    monkeypatch.setenv("TABGPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "corpus.txt"
    assert C.cli_main(fetch_args(book=[11, 84], out=str(out))) == 0
    printed = capsys.readouterr().out
    print(printed)
    expected = load({"books": [11, 84]}, mirror=mirror)
    assert out.read_text(encoding="utf-8") == expected.text
    assert "Alice's Adventures in Wonderland" in printed and f"{expected.sources[0]['words']:,}" in printed
    assert "total" in printed and "split:" in printed
    assert list((tmp_path / "cache" / "corpus").iterdir())                 # downloads were cached
    assert C.cli_main(fetch_args(default=True, out=str(out))) == 0
    assert out.read_text(encoding="utf-8") == C.load_default()
    assert C.cli_main(fetch_args(search="carroll")) == 0
    assert "Through the Looking-Glass" in capsys.readouterr().out
    assert C.cli_main(fetch_args(search="")) == 0                          # every book: says it shows 50
    assert "the first 50 of 392 books" in capsys.readouterr().out
    assert C.cli_main(fetch_args(search="zzzqqq")) == 1
    assert "no book of the catalogue matches 'zzzqqq'" in capsys.readouterr().out
    assert C.cli_main(fetch_args(book=[1342])) == 1                         # not on the local mirror
    assert "none of its usual files" in capsys.readouterr().err
    # --out: refused before any work when it is the input or a folder; a missing folder is made
    before = out.read_bytes()
    assert C.cli_main(fetch_args(file=str(out), out=str(out))) == 1
    assert "is the input file" in capsys.readouterr().err and out.read_bytes() == before
    assert C.cli_main(fetch_args(file=str(out), out=str(tmp_path))) == 1
    assert "is a folder" in capsys.readouterr().err
    assert C.cli_main(fetch_args(file=str(out), out=str(tmp_path / "a" / "b.txt"))) == 0
    assert (tmp_path / "a" / "b.txt").read_text(encoding="utf-8").strip() == before.decode().strip()
    # an existing --out is replaced only where it is text as fetch writes it, outside a tabgpt run folder
    assert C.cli_main(fetch_args(default=True, out=str(tmp_path / "a" / "b.txt"))) == 0      # a corpus: replaced
    assert (tmp_path / "a" / "b.txt").read_text(encoding="utf-8") == C.load_default()
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)) * 8)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 100)
    run = tmp_path / "run"
    run.mkdir()
    from tabgpt.run import FORMAT
    (run / "config.json").write_text(json.dumps({"format": FORMAT, "n_layer": 2}))
    (run / "metrics.jsonl").write_text('{"type": "step"}\n')            # text, but one of the run's files
    for target, message in ((weights, "exists and is not UTF-8 text"), (latin1, "exists and is not UTF-8 text"),
                            (run / "metrics.jsonl", "is in the tabgpt run folder")):
        kept = target.read_bytes()
        assert C.cli_main(fetch_args(file=str(out), out=str(target))) == 1
        err = capsys.readouterr().err
        assert message in err and "choose another --out" in err, err
        assert target.read_bytes() == kept
    # nor is a new file written into a run folder
    assert C.cli_main(fetch_args(file=str(out), out=str(run / "corpus.txt"))) == 1
    assert "is in the tabgpt run folder" in capsys.readouterr().err and not (run / "corpus.txt").exists()


# ---------------------------------------------------------------------------------------------
# The same API inside Pyodide in headless Chromium: pyfetch, a real CORS refusal, OPFS caching.

BROWSER_CODE = '''
import json
import tabgpt.corpus as C
M = "{base}/GITenberg/{{repo}}/master/{{file}}"
out = {{}}
c = await C.load_corpus("default")
out["default"] = [len(c.text), c.split, c.held_out]
events = []
c = await C.load_corpus({{"book": 2600}}, mirror=M, progress=events.append)
out["book"] = [c.text, c.notices, c.sources[0]["cached"], events[-1]["done"]]
c = await C.load_corpus({{"book": 2600}}, mirror=M)
out["book_again"] = [c.text == out["book"][0], c.sources[0]["cached"]]
out["html"] = (await C.load_corpus({{"book": 972}}, mirror=M)).text
open("/tmp/upload.txt", "wb").write(b"caf\\xe9 au lait\\r\\n")
out["file"] = (await C.load_corpus({{"file": "/tmp/upload.txt"}})).text
for name, url in [("nocors", "/nocors/plain.txt"), ("missing", "/missing.txt"), ("big", "/big-stream.txt"),
                  ("png", "/binary.png")]:
    try:
        await C.load_corpus({{"url": "{base}" + url}}, max_bytes=1_000_000)
        out[name] = ["no error", ""]
    except C.CorpusError as e:
        out[name] = [e.kind, str(e)]
json.dumps(out)
'''


@pytest.mark.browser
def test_corpus_in_pyodide_fetches_caches_and_explains_cors(server):
    from playwright.sync_api import sync_playwright

    import serve  # build/serve.py
    from browser_support import CHROMIUM, CHROMIUM_ARGS, ensure_site
    httpd, site = serve.start(ensure_site())
    outside = []

    def only_local(route):                              # the fixture server is another origin on 127.0.0.1
        if route.request.url.startswith("http://127.0.0.1:"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            ctx = browser.new_context()
            ctx.route("**/*", only_local)
            page = ctx.new_page()
            page.set_default_timeout(120_000)
            page.goto(site + "/index.html")                 # any page of the site: start our own worker
            page.evaluate("async () => { const m = await import('/js/tabgpt-client.js'); "
                          "window.tg = new m.TabGPTWorker(); await window.tg.ready; }")
            Handler.log.clear()
            out = json.loads(page.evaluate("code => window.tg.run(code)", BROWSER_CODE.format(base=server)))
            browser.close()
    finally:
        httpd.shutdown()
    native = load("default")
    assert out["default"] == [len(native.text), native.split, native.held_out]
    book = load({"book": 2600}, mirror=server + "/GITenberg/{repo}/master/{file}")
    assert out["book"][0] == book.text and out["book"][1] == book.notices
    assert out["book"][2:] == [False, book.sources[0]["raw_bytes"]]
    assert out["book_again"] == [True, True], "the second load should come from OPFS"
    assert Handler.log.count("/GITenberg/War-and-Peace_2600/master/2600-8.txt") == 2   # ours + the native one
    assert out["html"] == load({"book": 972}, mirror=server + "/GITenberg/{repo}/master/{file}").text
    assert out["file"] == "café au lait\n"
    print({k: v for k, v in out.items() if k in ("nocors", "missing", "big", "png")})
    assert out["nocors"][0] == "cors" and "Access-Control-Allow-Origin" in out["nocors"][1]
    assert "/nocors/plain.txt" in Handler.log, "the browser made the request and refused the answer"
    assert out["missing"][0] == "not_found" and out["big"][0] == "too_large" and out["png"][0] == "binary"
