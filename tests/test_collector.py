"""The collector: .md notebooks run under nbval, fail readably, are cached once."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "notebooks"

pytest.importorskip("nbval")


def project(tmp_path: Path, *notebooks: str) -> Path:
    """A throw-away project with the book's conftest, its tools and these notebooks in
    book/."""
    shutil.copy(ROOT / "conftest.py", tmp_path)
    shutil.copy(ROOT / "pytest.ini", tmp_path)
    shutil.copytree(ROOT / "tools", tmp_path / "tools",  # the conftest imports it
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "book").mkdir()
    for name in notebooks:
        shutil.copy(HERE / name, tmp_path / "book" / name)
    return tmp_path


def run_pytest(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "--nbval-lax",
         "--nbval-current-env", "--color=no", "book", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300)


def test_failing_assert_fails_the_run_with_a_readable_message(tmp_path):
    result = run_pytest(project(tmp_path, "failing.md"))
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "1 failed, 1 passed" in out
    assert "book/failing.md::Cell 1" in out
    assert "AssertionError: validation loss 2.5 did not fall below 1.9" in out
    assert "assert loss < 1.9" in out  # the failing cell's source is shown


def test_passing_notebook_is_cached_for_the_book_and_not_run_twice(tmp_path):
    proj = project(tmp_path, "passing.md", "failing.md")
    cache = proj / "_build" / ".jupyter_cache"
    first = run_pytest(proj, "--nb-cache", str(cache), "--nb-times", "times.json")
    assert first.returncode == 1, first.stdout  # failing.md fails, passing.md passes
    assert "seconds per notebook" in first.stdout
    assert (proj / "times.json").is_file()

    from jupyter_cache import get_cache

    sys.path.insert(0, str(proj))
    try:
        from conftest import book_notebook  # the copy in proj is identical
    finally:
        sys.path.remove(str(proj))
    records = get_cache(str(cache)).list_cache_records()
    assert len(records) == 1, "only the notebook whose cells all passed is cached"
    # The book build (myst-nb) finds it under the hash of its own reading of the file.
    record = get_cache(str(cache)).match_cache_notebook(
        book_notebook(proj / "book" / "passing.md"))
    cached = get_cache(str(cache)).get_cache_bundle(record.pk).nb
    outputs = [o for c in cached.cells if c.cell_type == "code" for o in c.outputs]
    assert any("total: 45" in o.get("text", "") for o in outputs)
    assert any(o.get("data", {}).get("text/plain") == "45" for o in outputs)

    second = run_pytest(proj, "--nb-cache", str(cache), "--nb-missing-only")
    assert "2 passed" not in second.stdout
    assert "2 deselected" in second.stdout  # passing.md is cached: not run again
    assert "1 failed" in second.stdout  # failing.md is not cached: run again


def test_changing_llmcore_empties_the_cache(tmp_path, monkeypatch):
    proj = project(tmp_path, "passing.md")
    cache = proj / "_build" / ".jupyter_cache"
    assert run_pytest(proj, "--nb-cache", str(cache)).returncode == 0
    (proj / "llmcore").mkdir()
    (proj / "llmcore" / "changed.py").write_text("x = 1\n")
    again = run_pytest(proj, "--nb-cache", str(cache), "--nb-missing-only")
    assert "2 passed" in again.stdout, again.stdout  # stale cache dropped: ran again
