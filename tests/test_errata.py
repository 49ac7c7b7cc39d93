"""The errata page and the chapters' Erratum boxes agree.

The preface promises a box titled *Erratum* wherever the book corrects the article.
Every row of the errata page's article table names the chapters that show its
correction ("Shown in"); each of those chapters must hold an ``{admonition} Erratum:``
box that names the row (``{doc}`30-errata`, rows 3 and 4``), and every such box must
name rows that list its chapter.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parent.parent / "book"
ERRATA = BOOK / "30-errata.md"
DOC = re.compile(r"\{doc\}`([^`]+)`")
# :::{admonition} Erratum: title ... ::: (or the same fenced with backticks)
BOX = re.compile(r"^([`:]{3,})\{admonition\}\s+Erratum:(.*?)\n(.*?)^\1\s*$",
                 re.MULTILINE | re.DOTALL)
NAMED = re.compile(r"\{doc\}`30-errata`,\s+rows?\s+([\d,\s]+(?:and\s+\d+)?)")


def article_rows(text: str) -> dict[int, set[str]]:
    """Row number -> the chapters in its "Shown in" column, from the article table."""
    table = text.split("## The article", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 4 and cells[0].isdigit():
            rows[int(cells[0])] = set(DOC.findall(cells[3]))
    return rows


def boxes(text: str) -> list[tuple[str, set[int]]]:
    """(title, rows it names) for every Erratum box of a page."""
    found = []
    for match in BOX.finditer(text):
        named = set()
        for group in NAMED.findall(match.group(3)):
            named |= {int(n) for n in re.findall(r"\d+", group)}
        found.append((match.group(2).strip(), named))
    return found


ROWS = article_rows(ERRATA.read_text(encoding="utf-8"))
PAGES = {p.stem: p.read_text(encoding="utf-8") for p in sorted(BOOK.glob("*.md"))}


def test_the_table_is_numbered_and_long():
    assert sorted(ROWS) == list(range(1, len(ROWS) + 1)), sorted(ROWS)
    assert len(ROWS) > 35
    assert all(ROWS.values()), [n for n, docs in ROWS.items() if not docs]


@pytest.mark.parametrize("row", sorted(ROWS))
def test_every_row_has_a_box_in_each_chapter_it_names(row):
    for doc in ROWS[row]:
        assert doc in PAGES, f"row {row}: {doc} is not a page of the book"
        named = set().union(*(rows for _, rows in boxes(PAGES[doc])))
        assert row in named, f"row {row}: {doc}.md has no Erratum box naming it"


def test_every_box_names_rows_that_list_its_chapter():
    for name, text in PAGES.items():
        for title, rows in boxes(text):
            assert rows, f"{name}: the box '{title}' names no errata row"
            for row in rows:
                assert row in ROWS and name in ROWS[row], (
                    f"{name}: the box '{title}' names row {row}, which does not "
                    f"list {name}")


def test_the_parsers_read_what_they_should():
    page = ("# x\n\n:::{admonition} Erratum: one\n:class: warning\nText "
            "({doc}`30-errata`, rows 3, 4 and 12.)\n:::\n\n"
            "```{admonition} Erratum: two\nText ({doc}`30-errata`, row 5).\n```\n"
            ":::{admonition} Note\n({doc}`30-errata`, row 6)\n:::\n")
    assert boxes(page) == [("one", {3, 4, 12}), ("two", {5})]
    table = ("## The article\n\n| # | a | b | Shown in |\n| --- | --- | --- | --- |\n"
             "| 1 | x | y | {doc}`04-attention` |\n"
             "| 2 | x | y | {doc}`05-a`, {doc}`06-b` |\n\n## Next\n| 3 | x | y | z |\n")
    assert article_rows(table) == {1: {"04-attention"}, 2: {"05-a", "06-b"}}
