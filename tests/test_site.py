"""`make check-site`: the browser check finds each kind of fault it promises to.

Hand-made pages use the real offline assets (MathJax from sphinx-mathjax-offline,
mermaid from _static/mermaid, unpacked by `make book`); each faulty page must be
reported, the good one not. Needs Chromium and playwright; skipped without them.
"""

import importlib.util
import shutil
from pathlib import Path

import pytest

from tools import sitecheck

ROOT = Path(__file__).resolve().parent.parent
MERMAID = ROOT / "_static" / "mermaid"
needs_browser = pytest.mark.skipif(
    importlib.util.find_spec("playwright") is None
    or not any(shutil.which(n) for n in sitecheck.CHROMIUM)
    or not (MERMAID / "mermaid.esm.min.mjs").is_file(),
    reason="needs playwright, Chromium and _static/mermaid (make check-site)")

HEAD = """<html><head><meta charset="utf-8">
<script>window.MathJax = {tex: {inlineMath: [['\\\\(', '\\\\)']]}};</script>
<script defer src="_static/mathjax/tex-chtml.js"></script>
<script type="module">
import mermaid from "./_static/mermaid/mermaid.esm.min.mjs";
mermaid.initialize({startOnLoad: false});
await mermaid.run({querySelector: '.mermaid'});
</script></head><body><main>"""
GOOD = (HEAD + '<p>Energy <span class="math">\\(E = mc^2\\)</span>.</p>'
        '<pre class="mermaid">flowchart LR\n  a --> b</pre>'
        '<pre>re.compile(r"\\(a\\)")  # $$ in code is not math</pre>'
        '<img src="fig.png"><a href="other.html#there">other</a>'
        '<a href="https://example.org/">outside</a></main></body></html>')
FAULTS = {
    "raw-math.html": GOOD.replace('<script defer src="_static/mathjax/tex-chtml.js">'
                                  '</script>', ""),
    "bad-diagram.html": GOOD.replace("a --> b", "a -->> ((b"),
    "no-image.html": GOOD.replace("fig.png", "missing.png"),
    "bad-link.html": GOOD.replace("other.html#there", "nowhere.html"),
    "bad-anchor.html": GOOD.replace("#there", "#nowhere"),
    "js-error.html": GOOD.replace("</main>", "<script>undefinedFunction()</script>"
                                  "</main>"),
    "cdn.html": GOOD.replace("</main>", '<script src="https://cdn.example.org/x.js">'
                             "</script></main>"),
}


def make_site(folder: Path) -> None:
    mathjax = Path(importlib.util.find_spec("sphinx-mathjax-offline").origin).parent
    (folder / "_static").mkdir(parents=True)
    (folder / "_static" / "mathjax").symlink_to(mathjax / "static" / "mathjax")
    (folder / "_static" / "mermaid").symlink_to(MERMAID)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.figure(figsize=(1, 1))
    plt.savefig(folder / "fig.png")
    plt.close("all")
    (folder / "other.html").write_text('<html><body><main><p id="there">here</p>'
                                       "</main></body></html>")
    (folder / "good.html").write_text(GOOD)
    for name, html in FAULTS.items():
        (folder / name).write_text(html)


@needs_browser
def test_check_site_reports_every_kind_of_fault(tmp_path):
    make_site(tmp_path)
    problems = sitecheck.check_site(tmp_path)
    assert "good.html" not in problems and "other.html" not in problems
    assert set(problems) == set(FAULTS), problems
    expect = {"raw-math.html": "math", "bad-diagram.html": "diagram",
              "no-image.html": "image not loaded", "bad-link.html": "missing file",
              "bad-anchor.html": "missing anchor", "js-error.html": "JavaScript error",
              "cdn.html": "request failed"}
    for page, words in expect.items():
        assert any(words in line for line in problems[page]), (page, problems[page])


def test_link_checker_follows_only_internal_links(tmp_path):
    (tmp_path / "a.html").write_text('<h1 id="top">a</h1>')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "index.html").write_text("x")
    page, ids = tmp_path / "a.html", {}
    assert sitecheck.link_problem(tmp_path, page, "a.html#top", ids) is None
    assert sitecheck.link_problem(tmp_path, page, "#top", ids) is None
    assert sitecheck.link_problem(tmp_path, page, "sub/", ids) is None
    assert sitecheck.link_problem(tmp_path, page, "https://x.org/y", ids) is None
    assert "missing anchor" in sitecheck.link_problem(tmp_path, page, "#nope", ids)
    assert "missing file" in sitecheck.link_problem(tmp_path, page, "b.html", ids)


def test_raw_math_pattern():
    assert sitecheck.RAW_MATH.search("the sum $$x$$") and sitecheck.RAW_MATH.search(
        "inline \\(a\\)")
    assert not sitecheck.RAW_MATH.search("costs $5 and $6")
