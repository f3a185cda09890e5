"""Build the offline Wikipedia corpus that `hybridize.evaluate` measures perplexity on.

Why this source: held-out perplexity must be measured on real text, offline, and with a licence that lets the text
ship inside the package. The `gensim` wheel carries a slice of a real English Wikipedia dump in its test data
(`enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`: 206 pages, CC BY-SA 3.0/4.0), so a plain
`pip download` gives a reproducible, pinned copy. gensim itself is never imported: the `.bz2` file is read from an
installed gensim package, from a wheel file, or from a wheel that this script downloads with `pip download`.

What it does: parse the MediaWiki XML (streaming, `xml.etree.ElementTree.iterparse`), keep namespace-0 articles that
are not redirects or disambiguation pages, strip wiki markup to plain prose, drop articles shorter than
`--min-chars` characters after cleaning, and split by article: an article is held out when the SHA-256 of its title
falls in the first `--heldout-percent` percent of the hash range (stable if the filters change: no article moves
between splits because another one was dropped). It writes, sorted by title, one JSON object per line
(`{"title": ..., "text": ...}`) to `wiki_train.jsonl.gz` and `wiki_heldout.jsonl.gz` (gzip with mtime 0, so the
bytes depend only on the input), and prints the statistics that `hybridize/data/README.md` quotes.

Usage:
    python evals/build_wiki_corpus.py                               # installed gensim, else /tmp/gensim_dl, else pip
    python evals/build_wiki_corpus.py --source path/to/gensim-4.4.0-...whl
    python evals/build_wiki_corpus.py --source path/to/enwiki-...-shortened.bz2 --output-dir hybridize/data
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import html
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

GENSIM_VERSION = "4.4.0"
DUMP_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parents[1] / "hybridize" / "data"
WHEEL_SEARCH_DIRS = (Path("/tmp/gensim_dl"),)

# Sections that hold citations and link lists rather than prose: dropped with everything under them.
DROPPED_SECTIONS = frozenset(
    {
        "references",
        "notes",
        "footnotes",
        "citations",
        "sources",
        "bibliography",
        "further reading",
        "external links",
        "see also",
        "notes and references",
        "references and notes",
        "works cited",
    }
)
# Link prefixes whose whole link is dropped: media, categories and interlanguage links ("de:", "simple:").
DROPPED_LINK_PREFIXES = frozenset({"file", "image", "media", "category"})
INTERLANGUAGE_PREFIX = re.compile(r"^[a-z]{2,3}(-[a-z]+)?$|^simple$")
# Disambiguation pages are lists of links, not prose.
DISAMBIGUATION_TEMPLATE = re.compile(r"\{\{\s*(disambig|dab|hndis|geodis)", re.IGNORECASE)
# Tags whose content is not prose: dropped with their content.
DROPPED_TAGS = ("ref", "math", "gallery", "timeline", "imagemap", "score", "syntaxhighlight", "source", "chem", "ce")


# Locating the dump


@contextmanager
def open_dump(source: Path | None) -> Iterator[IO[bytes]]:
    """Open the compressed dump as a binary stream from `source` (.bz2 or .whl), an installed gensim package, a
    wheel already downloaded to /tmp/gensim_dl, or a wheel that `pip download` fetches."""
    if source is not None:
        if not source.exists():
            raise SystemExit(f"error: {source} does not exist; pass the gensim wheel or the enwiki .bz2 file")
        if source.suffix == ".whl":
            with _open_from_wheel(source) as stream:
                yield stream
        else:
            with source.open("rb") as stream:
                yield stream
        return
    installed = _installed_dump()
    if installed is not None:
        with installed.open("rb") as stream:
            yield stream
        return
    for directory in WHEEL_SEARCH_DIRS:
        wheels = sorted(directory.glob(f"gensim-{GENSIM_VERSION}-*.whl"))
        if wheels:
            with _open_from_wheel(wheels[0]) as stream:
                yield stream
            return
    with tempfile.TemporaryDirectory() as tmp:
        print(
            f"downloading gensim=={GENSIM_VERSION} (wheel only, no dependencies) to read its test data",
            file=sys.stderr,
        )
        command = [sys.executable, "-m", "pip", "download", "--no-deps", f"gensim=={GENSIM_VERSION}", "-d", tmp]
        subprocess.run(command, check=True)
        wheels = sorted(Path(tmp).glob("gensim-*.whl"))
        if not wheels:
            raise SystemExit(f"error: pip download left no gensim wheel in {tmp}; pass --source with a gensim wheel")
        with _open_from_wheel(wheels[0]) as stream:
            yield stream


def _installed_dump() -> Path | None:
    """The dump inside an installed gensim package, found without importing gensim (its import is heavy)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location).parent / DUMP_MEMBER
        if candidate.exists():
            return candidate
    return None


@contextmanager
def _open_from_wheel(wheel: Path) -> Iterator[IO[bytes]]:
    with zipfile.ZipFile(wheel) as archive:
        if DUMP_MEMBER not in archive.namelist():
            raise SystemExit(f"error: {wheel} has no {DUMP_MEMBER}; pass a gensim {GENSIM_VERSION} wheel")
        print(f"reading {DUMP_MEMBER} from {wheel}", file=sys.stderr)
        with archive.open(DUMP_MEMBER) as stream:
            yield stream


# Parsing the XML


def iter_pages(compressed: IO[bytes]) -> Iterator[tuple[str, int, bool, str]]:
    """Yield (title, namespace, is_redirect, wikitext) for each page of a bz2-compressed MediaWiki export."""
    with bz2.open(compressed, "rb") as xml_stream:
        for _, element in ET.iterparse(xml_stream, events=("end",)):
            if _local_name(element.tag) != "page":
                continue
            fields = {_local_name(child.tag): child for child in element}
            text = ""
            if "revision" in fields:
                for child in fields["revision"]:
                    if _local_name(child.tag) == "text":
                        text = child.text or ""
            yield fields["title"].text or "", int(fields["ns"].text or 0), "redirect" in fields, text
            element.clear()


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


# Cleaning wiki markup


def clean_wikitext(text: str) -> str:
    """Strip MediaWiki markup to plain prose: headings stay as their own lines, paragraphs are separated by one blank
    line. Templates, tables, references, media and category links, and citation sections are removed."""
    text = re.sub(r"<!--.*?(-->|\Z)", "", text, flags=re.DOTALL)
    for tag in DROPPED_TAGS:
        text = re.sub(rf"<{tag}\b[^>]*/>", "", text, flags=re.IGNORECASE)
        text = re.sub(rf"<{tag}\b[^>]*>.*?</{tag}\s*>", "", text, flags=re.IGNORECASE | re.DOTALL)
    text = re.sub(r"<nowiki>(.*?)</nowiki>", r"\1", text, flags=re.DOTALL)
    text = _remove_nested(text, "{{", "}}")
    text = _remove_tables(text)
    text = _replace_links(text)
    # External links: [http://x label] -> label, [http://x] -> nothing.
    text = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.IGNORECASE)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)
    text = html.unescape(text).replace("\xa0", " ").replace("\u200b", "")
    return _clean_lines(text)


def _remove_nested(text: str, open_: str, close: str) -> str:
    """Remove possibly nested `open_ ... close` spans (templates); an unclosed span runs to the end of the text."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth, i = depth + 1, i + len(open_)
        elif depth and text.startswith(close, i):
            depth, i = depth - 1, i + len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def _remove_tables(text: str) -> str:
    """Remove possibly nested tables: `{|` opens one at the start of a line, `|}` closes one at the start of a line."""
    out, depth = [], 0
    for line in text.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("{|"):
            depth += 1
        elif depth and stripped.startswith("|}"):
            depth -= 1
        elif not depth:
            out.append(line)
    return "\n".join(out)


def _replace_links(text: str) -> str:
    """Resolve [[...]] links from the innermost out, so that links inside a caption go before the media link."""
    # Innermost: no "[[" or "]]" inside, though single brackets may be ("Bicyclo[1.1.0]butane").
    pattern = re.compile(r"\[\[((?:[^\[\]]|\[(?!\[)|\](?!\]))*)\]\]")

    def replace(match: re.Match[str]) -> str:
        target, _, label = match.group(1).partition("|")
        prefix, colon, _ = target.strip().partition(":")
        prefix = prefix.strip().lower()
        if colon and (prefix in DROPPED_LINK_PREFIXES or (not label and INTERLANGUAGE_PREFIX.match(prefix))):
            return ""
        target = target.removeprefix(":")  # [[:Category:X]] links to the page instead of categorising
        # [[a|b]] -> b; the pipe trick [[a|]] -> a; [[a|b|c]] (old media syntax) -> c.
        return label.rsplit("|", 1)[-1] if label.strip() else target

    while True:
        replaced = pattern.sub(replace, text)
        if replaced == text:
            return replaced
        text = replaced


def _clean_lines(text: str) -> str:
    """Headings -> their text on their own line; list markers and leftover table rows removed; citation sections
    dropped; empty sections dropped; blank lines collapsed."""
    blocks: list[list[str]] = [[]]  # blocks[0] is the lead; each later block starts with its heading line
    skip_level = 0
    for raw in text.split("\n"):
        line = raw.strip()
        heading = re.fullmatch(r"(={2,6})\s*(.*?)\s*\1", line)
        if heading:
            level, title = len(heading.group(1)), heading.group(2).strip()
            if skip_level and level > skip_level:
                continue
            skip_level = level if title.lower() in DROPPED_SECTIONS else 0
            if not skip_level:
                blocks.append([title])
            continue
        if skip_level:
            continue
        if line.startswith(("|", "!")):  # a table row that survived unbalanced table markup
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)
        line = _tidy(line)
        if line and not re.fullmatch(r"[\W_]+", line):
            blocks[-1].append(line)
        elif blocks[-1] and blocks[-1][-1]:
            blocks[-1].append("")
    paragraphs: list[str] = []
    for index, block in enumerate(blocks):
        body = "\n".join(block[1:] if index else block).strip()
        body = re.sub(r"\n{2,}", "\n\n", body)
        if body:  # a heading whose whole section was templates or tables goes too
            paragraphs.append(f"{block[0]}\n{body}" if index else body)
    return "\n\n".join(paragraphs)


def _tidy(line: str) -> str:
    """Repair the punctuation that removed templates and references leave behind: "( ; born 1900)", "word ,"."""
    line = re.sub(r"[ \t]{2,}", " ", line)
    line = re.sub(r"\(\s*[,;:]+\s*", "(", line)
    line = re.sub(r"\s*[,;:]+\s*\)", ")", line)
    line = re.sub(r"\s*\(\s*\)", "", line)
    line = re.sub(r"\s+([,.;:!?)])", r"\1", line)
    line = re.sub(r"\(\s+", "(", line)
    line = re.sub(r"([,;])\1+", r"\1", line)
    return re.sub(r"[ \t]{2,}", " ", line).strip()


# Splitting and writing


def is_heldout(title: str, heldout_percent: int) -> bool:
    """Stable split: the title's SHA-256, as a number in [0, 100), below `heldout_percent`."""
    return int.from_bytes(hashlib.sha256(title.encode("utf-8")).digest()[:8], "big") % 100 < heldout_percent


def write_jsonl_gz(path: Path, articles: list[dict[str, str]]) -> None:
    """Write one JSON object per line, gzip-compressed with no timestamp so that the bytes are reproducible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        for article in articles:
            gz.write((json.dumps(article, ensure_ascii=False) + "\n").encode("utf-8"))
    tmp.replace(path)


def build(source: Path | None, output_dir: Path, *, min_chars: int, heldout_percent: int) -> dict[str, dict[str, int]]:
    """Build both splits into `output_dir` and return their statistics."""
    counts = {"pages": 0, "redirects": 0, "other_namespaces": 0, "disambiguation": 0, "too_short": 0}
    articles: list[dict[str, str]] = []
    with open_dump(source) as compressed:
        for title, namespace, redirect, wikitext in iter_pages(compressed):
            counts["pages"] += 1
            if redirect:
                counts["redirects"] += 1
            elif namespace != 0:
                counts["other_namespaces"] += 1
            elif "(disambiguation)" in title or DISAMBIGUATION_TEMPLATE.search(wikitext):
                counts["disambiguation"] += 1
            else:
                text = clean_wikitext(wikitext)
                if len(text) < min_chars:
                    counts["too_short"] += 1
                else:
                    articles.append({"title": title, "text": text})
    articles.sort(key=lambda article: article["title"])
    splits = {
        "train": [a for a in articles if not is_heldout(a["title"], heldout_percent)],
        "heldout": [a for a in articles if is_heldout(a["title"], heldout_percent)],
    }
    stats: dict[str, dict[str, int]] = {"filter": counts}
    for name, split in splits.items():
        path = output_dir / f"wiki_{name}.jsonl.gz"
        write_jsonl_gz(path, split)
        stats[name] = {
            "articles": len(split),
            "characters": sum(len(a["text"]) for a in split),
            "words": sum(len(a["text"].split()) for a in split),
            "bytes_gz": path.stat().st_size,
        }
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, help="a gensim wheel (.whl) or the enwiki .bz2 file itself")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--min-chars", type=int, default=500, help="drop articles shorter than this after cleaning")
    parser.add_argument("--heldout-percent", type=int, default=20, help="share of articles held out, by title hash")
    args = parser.parse_args(argv)
    stats = build(args.source, args.output_dir, min_chars=args.min_chars, heldout_percent=args.heldout_percent)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
