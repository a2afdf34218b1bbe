"""The packaged text source ``enwiki-sample``: about a hundred English Wikipedia articles as plain prose, offline.

The gensim 4.4.0 wheel ships a shortened Wikipedia XML dump (early 2016, articles beginning with "A") as test data.
We fetch that one member with :func:`lmshrink.core.fetch.fetch` (gensim itself is never installed), strip the wiki
markup with mwparserfromhell, split the articles into a calibration part and a held-out evaluation part, and cache
the processed text as JSON beside the fetched file, so every later load is a JSON read.

Split rule: articles are ordered by the sha256 of their title; taken in that order, articles go to ``eval`` until
it holds at least 20% of all characters, the rest to ``calib``. Each split is returned in dump order.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import re
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import mwparserfromhell
from mwparserfromhell.nodes import (
    Argument,
    Comment,
    ExternalLink,
    Heading,
    HTMLEntity,
    Tag,
    Template,
    Text,
    Wikilink,
)
from mwparserfromhell.wikicode import Wikicode

from lmshrink.core.errors import DataSourceError
from lmshrink.core.fetch import PackagedFile, WheelPart, fetch

ENWIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

ENWIKI_SAMPLE = PackagedFile(
    name="enwiki-sample",
    filename="enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    parts=(WheelPart("gensim==4.4.0", ENWIKI_MEMBER),),
    sha256="a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
)

# Bump when the parser or the split rule changes: a cached JSON with another version is rebuilt.
PROCESSING_VERSION = 3
EVAL_FRACTION = 0.2
MIN_ARTICLE_CHARS = 500  # below this an article is a stub or a list, not prose
MIN_LINE_CHARS = 20  # shorter leftover lines are captions, list fragments or markup debris

SPLIT_ALIASES = {"calib": "calib", "train": "calib", "calibration": "calib",
                 "eval": "eval", "test": "eval", "validation": "eval", "valid": "eval"}

_DROP_TAGS = {"ref", "references", "table", "gallery", "math", "timeline", "imagemap", "score", "syntaxhighlight",
              "source", "pre", "code", "chem", "ce", "hiero", "graph", "templatedata", "mapframe", "maplink",
              "noinclude", "includeonly", "onlyinclude", "nowiki", "inputbox", "categorytree", "poem"}
_DROP_LINK_PREFIXES = {"file", "image", "category", "media"}
_DROP_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography",
                  "sources", "footnotes", "citations", "notes and references", "references and notes",
                  "works cited", "external link", "reference", "note"}
_INLINE_TEMPLATES = {"nowrap": 1, "nobr": 1, "small": 1, "smaller": 1, "big": 1, "lang": 2, "transl": -1,
                     "noitalic": 1, "nobold": 1, "sic": -1, "abbr": 1, "mvar": 1, "math": 1, "em": 1}
_RANGE_WORDS = {"to", "-", "–", "and", "or", "x", "by", "&", "+/-", "±"}
# Headings become marked text that survives strip_code; nested strip_code calls trim newlines, hence an end mark too.
_HEADING_MARK, _HEADING_END = "\x00H\x00", "\x00/H\x00"
_INTERWIKI = re.compile(r"^:?[a-z][a-z-]{1,15}:")  # lowercase prefix: interlanguage (de:, simple:) or interwiki
_LEFTOVER = ("{{", "}}", "[[", "]]", "{|", "|}", "<ref", "</ref", "__NOTOC__", "__TOC__")
_TABLE_LINE = re.compile(r"^(\{\||\|\}|\|-|\||!)")
_COMMENT = re.compile(r"<!--.*?(-->|$)", re.S)
_REF = re.compile(r"<ref\b[^>]*?/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_DISAMBIGUATION = re.compile(r"^(disambig.*|dab|hndis|geodis|.*disambiguation)$")


@dataclass(frozen=True)
class Article:
    title: str
    text: str
    split: str = ""


# ---------------------------------------------------------------- XML pages


def iter_pages(fileobj: IO[bytes]) -> Iterator[tuple[str, str, bool, str]]:
    """Yield ``(title, ns, is_redirect, wikitext)`` for every ``<page>`` of a MediaWiki XML export.

    Works whatever XML namespace (export schema version) the dump declares; a missing ``<ns>`` reads as "0".
    """
    root = None
    for event, elem in ET.iterparse(fileobj, events=("start", "end")):
        if event == "start":
            if root is None:
                root = elem
            continue
        if _local(elem.tag) != "page":
            continue
        title, ns, redirect, text = "", "0", False, ""
        for child in elem:
            name = _local(child.tag)
            if name == "title":
                title = (child.text or "").strip()
            elif name == "ns":
                ns = (child.text or "0").strip()
            elif name == "redirect":
                redirect = True
            elif name == "revision":
                for part in child:
                    if _local(part.tag) == "text":
                        text = part.text or ""
        redirect = redirect or text.lstrip()[:9].upper() == "#REDIRECT"
        yield title, ns, redirect, text
        elem.clear()
        if root is not None:
            root.clear()  # drop finished pages so memory stays flat on big dumps


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


# ---------------------------------------------------------------- wikitext -> plain text


def _is_disambiguation(code: Wikicode) -> bool:
    # a disambiguation page is a list of links, not prose
    return any(_DISAMBIGUATION.match(_template_name(t)) for t in code.filter_templates(recursive=False))


def wikitext_to_plain(wikitext: str) -> str:
    """Plain prose from one article's wikitext: paragraphs separated by blank lines, headings on their own lines.

    Templates, tables, references, file/image/category and interlanguage links, comments and the reference /
    external-link sections are dropped; the visible text of links and of bold/italic markup is kept.
    """
    return _code_to_plain(_parse(wikitext))


def _parse(wikitext: str) -> Wikicode:
    # references (mostly citation templates) are about half the markup and all dropped: cutting them out
    # before parsing halves the parse time; comments go first so a commented-out <ref> cannot confuse the cut
    wikitext = _COMMENT.sub("", wikitext)
    wikitext = _REF.sub("", wikitext)
    return mwparserfromhell.parse(wikitext)


def _code_to_plain(code: Wikicode) -> str:
    for section in code.get_sections(levels=[2]):
        heading = section.filter_headings(recursive=False)
        if heading and _plain_title(heading[0]).lower() in _DROP_SECTIONS:
            try:
                code.remove(section)
            except ValueError:  # already gone with an enclosing section
                pass
    _clean(code)
    return _tidy(code.strip_code(normalize=True, collapse=True))


def _template_name(template: Template) -> str:
    return " ".join(str(template.name).replace("_", " ").split()).lower()


def _plain_title(heading: Heading) -> str:
    return " ".join(heading.title.strip_code().split())


def _clean(code: Wikicode) -> None:
    """Rewrite ``code`` in place, top-down, so that ``strip_code`` leaves only the prose."""
    kept = []
    for node in code.nodes:
        new = _transform(node)
        if new is None:
            continue
        kept.append(Text(new) if isinstance(new, str) else new)
    code.nodes = kept


def _transform(node):  # -> Node | str | None
    if isinstance(node, (Text, HTMLEntity)):
        return node
    if isinstance(node, (Comment, Argument)):
        return None
    if isinstance(node, Template):
        return _template_text(node)
    if isinstance(node, Heading):
        _clean(node.title)
        return f"\n{_HEADING_MARK}{_plain_title(node)}{_HEADING_END}\n"
    if isinstance(node, Wikilink):
        title = str(node.title).strip()
        prefix = title.lstrip(":").split(":", 1)[0].strip().lower() if ":" in title else ""
        if prefix in _DROP_LINK_PREFIXES and not title.startswith(":"):
            return None
        if node.text is None and _INTERWIKI.match(title):
            return None
        if node.text is not None:
            _clean(node.text)
            return node
        _clean(node.title)
        return node
    if isinstance(node, ExternalLink):
        if not node.brackets or node.title is None:
            return None  # bare URLs are not prose
        _clean(node.title)
        return node
    if isinstance(node, Tag):
        tag = str(node.tag).strip().lower()
        if tag in _DROP_TAGS:
            return None
        if tag in ("br", "hr"):
            return "\n"
        if node.contents is not None:
            _clean(node.contents)
        return node
    return None  # unknown node kinds carry no prose


def _template_text(template: Template) -> str | None:
    """The visible text of the few inline templates that wrap prose or numbers; None for all others."""
    name = _template_name(template)
    positional = [p for p in template.params if not p.showkey]
    if name in ("convert", "cvt") and positional:
        words = []
        for param in positional:
            value = param.value.strip_code().strip()
            words.append(value)
            if not (_is_number(value) or value in _RANGE_WORDS):
                break  # the first non-number is the unit
        return " ".join(words)
    index = _INLINE_TEMPLATES.get(name)
    if name.startswith("lang-") and positional:
        index = 1
    if index is None or not positional or len(positional) < abs(index):
        return None
    value = positional[index - 1 if index > 0 else index].value
    _clean(value)
    return value.strip_code(normalize=True, collapse=True)


def _is_number(value: str) -> bool:
    return re.fullmatch(r"[-+−]?[\d,]*\.?\d+(e\d+)?", value) is not None


def _tidy(text: str) -> str:
    """Whitespace and debris cleanup: one line per list item, a blank line between paragraphs."""
    blocks: list[str] = []  # paragraphs, and headings prefixed with the mark
    lines: list[str] = []
    in_table = False

    def flush():
        if lines:
            blocks.append("\n".join(lines))
            lines.clear()

    text = text.replace(_HEADING_MARK, "\n" + _HEADING_MARK).replace(_HEADING_END, "\n")
    for raw in text.split("\n"):
        line = " ".join(raw.split())
        if line.startswith(_HEADING_MARK):
            flush()
            in_table = False  # an unclosed table ends at the next heading at the latest
            title = line[len(_HEADING_MARK):].strip()
            if title:
                blocks.append(_HEADING_MARK + title)
            continue
        # tables the parser could not read (not at the start of a line, or malformed) come through as text
        if line.startswith("{|"):
            in_table = True
        if in_table:
            in_table = not line.startswith("|}")
            continue
        if not line:
            flush()
            continue
        line = _fix_spacing(line)
        if _is_debris(line):
            continue
        lines.append(line)
    flush()
    # a heading with no prose after it (its section was all tables or links) is dropped
    kept = [b for i, b in enumerate(blocks)
            if not b.startswith(_HEADING_MARK) or (i + 1 < len(blocks) and not blocks[i + 1].startswith(_HEADING_MARK))]
    return "\n\n".join(b.removeprefix(_HEADING_MARK) for b in kept)


def _fix_spacing(line: str) -> str:
    line = re.sub(r"'{2,}", "", line)  # unbalanced bold/italic quotes the parser left as text
    line = re.sub(r"\(\s*[,;:]?\s*\)", "", line)  # parentheses emptied by a removed template
    line = re.sub(r"\(\s*[,;]\s*", "(", line)
    line = re.sub(r"\s+([,.;:!?)])", r"\1", line)  # space left where a reference was cut out
    line = re.sub(r"([,;])(?=[,;.])", "", line)
    return " ".join(line.split())


def _is_debris(line: str) -> bool:
    if len(line) < MIN_LINE_CHARS or not any(c.isalpha() for c in line):
        return True
    if _TABLE_LINE.match(line) or line.lower().startswith(("thumb|", "right|", "left|")):
        return True
    return any(marker in line for marker in _LEFTOVER)


# ---------------------------------------------------------------- articles and split


def parse_articles(fileobj: IO[bytes], min_chars: int = MIN_ARTICLE_CHARS) -> list[Article]:
    """Plain-text articles (title line, blank line, body) from a MediaWiki XML export, in dump order.

    Redirects, pages outside the article namespace, disambiguation pages and articles with under
    ``min_chars`` characters of prose are skipped.
    """
    articles = []
    for title, ns, redirect, wikitext in iter_pages(fileobj):
        if redirect or ns != "0" or not title:
            continue
        code = _parse(wikitext)
        if _is_disambiguation(code):
            continue
        body = _code_to_plain(code)
        if len(body) < min_chars:
            continue
        articles.append(Article(title=title, text=f"{title}\n\n{body}"))
    return articles


def split_articles(articles: list[Article], eval_fraction: float = EVAL_FRACTION) -> list[Article]:
    """The same articles, each labelled "calib" or "eval" by the module's split rule (hash order, char budget)."""
    total = sum(len(a.text) for a in articles)
    order = sorted(range(len(articles)), key=lambda i: hashlib.sha256(articles[i].title.encode()).hexdigest())
    eval_ids, eval_chars = set(), 0
    for i in order:
        if eval_chars >= eval_fraction * total:
            break
        eval_ids.add(i)
        eval_chars += len(articles[i].text)
    return [Article(a.title, a.text, "eval" if i in eval_ids else "calib") for i, a in enumerate(articles)]


# ---------------------------------------------------------------- cached public API


def processed_path() -> Path:
    """Where the processed JSON lives: beside the fetched dump in the lmshrink cache."""
    return ENWIKI_SAMPLE.path.with_name("enwiki-sample.json")


def _cache_key() -> dict:
    return {"version": PROCESSING_VERSION, "source_sha256": ENWIKI_SAMPLE.sha256,
            "mwparserfromhell": mwparserfromhell.__version__, "eval_fraction": EVAL_FRACTION}


_MEMO: dict[tuple[str, int], list[Article]] = {}


def _load_articles() -> list[Article]:
    source = fetch(ENWIKI_SAMPLE)  # verifies the dump (a stat when already verified); raises IntegrityError
    target = processed_path()
    try:
        memo_key = (str(target), target.stat().st_mtime_ns)
        if memo_key in _MEMO:
            return _MEMO[memo_key]
        payload = json.loads(target.read_text(encoding="utf-8"))
        if payload.get("key") == _cache_key():
            articles = [Article(**a) for a in payload["articles"]]
            _MEMO[memo_key] = articles
            return articles
    except (OSError, ValueError, TypeError, KeyError):
        pass  # missing, stale or unreadable: rebuild below
    articles = _build(source, target)
    _MEMO[(str(target), target.stat().st_mtime_ns)] = articles
    return articles


def _build(source: Path, target: Path) -> list[Article]:
    print(f"lmshrink: preparing the enwiki-sample text from {source.name} (first use only)", file=sys.stderr)
    start = time.perf_counter()
    try:
        with bz2.open(source, "rb") as handle:
            articles = split_articles(parse_articles(handle))
    except (OSError, EOFError, ET.ParseError) as exc:
        raise DataSourceError(f"could not read the Wikipedia dump {source}: {exc}",
                              fix=f"delete it (rm '{source}') and run again to fetch it anew") from exc
    payload = {"key": _cache_key(), "seconds": round(time.perf_counter() - start, 2),
               "articles": [a.__dict__ for a in articles]}
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".enwiki-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(payload, out, ensure_ascii=False)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is as readable as the fetched dump
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return articles


def load_enwiki_sample(split: str) -> list[str]:
    """The articles of one split ("calib" or "eval"; aliases "train", "test", "validation"), one string each.

    Each string is the article title, a blank line, then its paragraphs separated by blank lines, in dump
    order. The two splits never share an article. The first call fetches and processes the dump (seconds).
    """
    name = SPLIT_ALIASES.get(split.strip().lower()) if isinstance(split, str) else None
    if name is None:
        raise DataSourceError(f"enwiki-sample has no split {split!r}",
                              fix="use 'calib' (alias 'train') or 'eval' (aliases 'test', 'validation')")
    return [a.text for a in _load_articles() if a.split == name]


def enwiki_stats() -> dict:
    """Counts for reports: articles and characters per split, the eval share of characters, and the source."""
    articles = _load_articles()
    stats = {"name": ENWIKI_SAMPLE.name, "source": f"{ENWIKI_SAMPLE.parts[0].requirement}:{ENWIKI_MEMBER}",
             "split_rule": "sha256(title) order; eval takes articles until it holds >= 20% of characters",
             "processing_version": PROCESSING_VERSION, "articles": {}, "characters": {}}
    for name in ("calib", "eval"):
        part = [a for a in articles if a.split == name]
        stats["articles"][name] = len(part)
        stats["characters"][name] = sum(len(a.text) for a in part)
    total = sum(stats["characters"].values())
    stats["eval_char_fraction"] = stats["characters"]["eval"] / total if total else 0.0
    return stats
