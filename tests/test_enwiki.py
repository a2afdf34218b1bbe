"""The packaged Wikipedia sample: parser on hand-written XML, then the real fetched dump (cached after the first run)."""

from __future__ import annotations

import io
import json
import random

import pytest

from lmshrink.core.errors import DataSourceError, IntegrityError
from lmshrink.data import enwiki
from lmshrink.data.enwiki import (
    ENWIKI_SAMPLE,
    Article,
    enwiki_stats,
    load_enwiki_sample,
    parse_articles,
    split_articles,
    wikitext_to_plain,
)

ARTICLE_ONE = """{{Infobox thing|name=Widget|size={{convert|3|m}}}}
'''Widget''' is a [[tool|small tool]] used in ''workshops'' all over [[Europe]].<ref>{{cite web|url=http://x.org|title=Cite}}</ref> It weighs {{convert|2|kg}} on average.<ref name="a"/>
<!-- a hidden editor note -->
[[File:Widget.jpg|thumb|right|A widget on a [[bench]].]]

{| class="wikitable"
! Year !! Count
|-
| 1900 || 12
|}

== History ==
Widgets were first made in [[Paris]] in the [[19th century|nineteenth century]], see [http://example.org the archive].

== References ==
{{reflist}}

[[Category:Tools]]
[[de:Widget]]
"""

ARTICLE_TWO = """'''Gadget''' is another device that people use at home.

== Uses ==
* A gadget can open tins and jars.
* A gadget can also hold small screws.
"""

EXPECTED_ONE = """Widget is a small tool used in workshops all over Europe. It weighs 2 kg on average.

History

Widgets were first made in Paris in the nineteenth century, see the archive."""

EXPECTED_TWO = """Gadget is another device that people use at home.

Uses

A gadget can open tins and jars.
A gadget can also hold small screws."""


def _dump(pages: list[tuple[str, int, str, bool]], xmlns: bool = True) -> bytes:
    from xml.sax.saxutils import escape

    head = '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" xml:lang="en">' if xmlns else "<mediawiki>"
    body = []
    for title, ns, text, redirect in pages:
        body.append(f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>1</id>"
                    + ('<redirect title="Widget" />' if redirect else "")
                    + f'<revision><id>2</id><text xml:space="preserve">{escape(text)}</text></revision></page>')
    return (head + "".join(body) + "</mediawiki>").encode()


PAGES = [
    ("Widget", 0, ARTICLE_ONE, False),
    ("Widgets", 0, "#REDIRECT [[Widget]]", True),
    ("Talk:Widget", 1, "This talk page discusses the widget article at some length.", False),
    ("Gadget", 0, ARTICLE_TWO, False),
]


@pytest.mark.parametrize("xmlns", [True, False])
def test_parser_on_handwritten_dump(xmlns):
    articles = parse_articles(io.BytesIO(_dump(PAGES, xmlns=xmlns)), min_chars=0)
    assert [a.title for a in articles] == ["Widget", "Gadget"]  # redirect and talk page skipped
    assert articles[0].text == "Widget\n\n" + EXPECTED_ONE
    assert articles[1].text == "Gadget\n\n" + EXPECTED_TWO


def test_parser_drops_short_articles_and_disambiguation_pages():
    pages = PAGES + [("Thing (disambiguation)", 0, "'''Thing''' may refer to:\n* [[Thing one]]\n{{disambiguation}}",
                      False)]
    titles = [a.title for a in parse_articles(io.BytesIO(_dump(pages)), min_chars=0)]
    assert titles == ["Widget", "Gadget"]
    assert len(EXPECTED_ONE) < enwiki.MIN_ARTICLE_CHARS
    assert parse_articles(io.BytesIO(_dump(PAGES))) == []


def test_plain_text_keeps_paragraphs_and_drops_debris():
    text = wikitext_to_plain("First paragraph of real prose, long enough.\n\n\n\nSecond paragraph also long enough.\n"
                             "|-\n}}\nx\n{{stray\nThird line ends '''bold''' text (see {{lang|fr|la chose}}) .")
    assert text == ("First paragraph of real prose, long enough.\n\nSecond paragraph also long enough.\n"
                    "Third line ends bold text (see la chose).")


def test_split_is_deterministic_disjoint_and_near_the_char_budget():
    rng = random.Random(0)
    articles = [Article(f"Title {i}", "x" * rng.randint(100, 5000)) for i in range(200)]
    labelled = split_articles(articles, eval_fraction=0.2)
    shuffled = articles[:]
    rng.shuffle(shuffled)
    again = {a.title: a.split for a in split_articles(shuffled, eval_fraction=0.2)}
    assert {a.title: a.split for a in labelled} == again  # depends on titles only, not on input order
    eval_chars = sum(len(a.text) for a in labelled if a.split == "eval")
    total = sum(len(a.text) for a in articles)
    assert 0.2 <= eval_chars / total <= 0.2 + 5000 / total  # overshoot at most one article


# ------------------------------------------------------------ the real packaged dump (fetched once, then cached)


@pytest.fixture(scope="module")
def real_splits():
    return {"calib": load_enwiki_sample("calib"), "eval": load_enwiki_sample("eval")}


def test_real_splits_are_disjoint_and_deterministic(real_splits):
    calib_titles = {doc.split("\n", 1)[0] for doc in real_splits["calib"]}
    eval_titles = {doc.split("\n", 1)[0] for doc in real_splits["eval"]}
    assert len(calib_titles) == len(real_splits["calib"]) and len(eval_titles) == len(real_splits["eval"])
    assert not calib_titles & eval_titles
    assert load_enwiki_sample("train") == real_splits["calib"]
    assert load_enwiki_sample("test") == load_enwiki_sample("validation") == real_splits["eval"]
    # the split rule recomputed from the texts gives the same assignment
    docs = [Article(d.split("\n", 1)[0], d) for d in real_splits["calib"] + real_splits["eval"]]
    recomputed = {a.title: a.split for a in split_articles(docs)}
    assert {t for t, s in recomputed.items() if s == "eval"} == eval_titles


def test_real_text_has_no_markup_left(real_splits):
    for doc in real_splits["calib"] + real_splits["eval"]:
        for marker in ("{{", "}}", "[[", "]]", "<ref", "</ref", "'''", "{|", "|}", "&nbsp;", "<!--", "\x00"):
            assert marker not in doc, (doc.split("\n", 1)[0], marker)
        assert "\n\n\n" not in doc and "  " not in doc


def test_real_sizes_in_expected_range(real_splits):
    stats = enwiki_stats()
    n_calib, n_eval = stats["articles"]["calib"], stats["articles"]["eval"]
    assert (n_calib, n_eval) == (len(real_splits["calib"]), len(real_splits["eval"]))
    assert 85 <= n_calib + n_eval <= 110
    total = stats["characters"]["calib"] + stats["characters"]["eval"]
    assert 2_200_000 <= total <= 3_200_000
    assert 0.2 <= stats["eval_char_fraction"] <= 0.3
    assert stats["characters"]["eval"] == sum(len(d) for d in real_splits["eval"])
    assert all(len(d) >= enwiki.MIN_ARTICLE_CHARS for d in real_splits["calib"] + real_splits["eval"])


def test_processed_cache_has_version_key_and_stale_cache_is_rebuilt(real_splits, monkeypatch):
    payload = json.loads(enwiki.processed_path().read_text(encoding="utf-8"))
    assert payload["key"]["version"] == enwiki.PROCESSING_VERSION
    assert payload["key"]["source_sha256"] == ENWIKI_SAMPLE.sha256

    built = []

    def fake_build(source, target):
        built.append(target)
        return [Article("Rebuilt", "Rebuilt\n\nfresh text", "calib")]

    monkeypatch.setattr(enwiki, "_build", fake_build)
    monkeypatch.setattr(enwiki, "PROCESSING_VERSION", enwiki.PROCESSING_VERSION + 1)
    enwiki._MEMO.clear()
    try:
        assert load_enwiki_sample("calib") == ["Rebuilt\n\nfresh text"]
        assert built == [enwiki.processed_path()]
    finally:
        enwiki._MEMO.clear()


def test_bad_split_name_is_a_user_error():
    with pytest.raises(DataSourceError, match="no split 'dev'"):
        load_enwiki_sample("dev")


def test_corrupted_cached_dump_raises_integrity_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSHRINK_CACHE", str(tmp_path))
    path = ENWIKI_SAMPLE.path
    assert path.is_relative_to(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"BZh9 this is not the dump")
    with pytest.raises(IntegrityError) as err:
        load_enwiki_sample("eval")
    assert str(path) in str(err.value)
