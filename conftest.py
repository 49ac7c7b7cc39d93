"""pytest plugin for the book: every jupytext MyST notebook is a test, executed once.

1. Collection. nbval collects only ``.ipynb``. Here a ``.md`` file whose front matter
   names a ``kernelspec`` is read with jupytext and handed to nbval's collector, so
   each code cell becomes a test item (``--nbval`` or ``--nbval-lax`` turns this on).
2. Execute once. With ``--nb-cache DIR`` a notebook whose cells all passed is stored,
   outputs and all, in the jupyter-cache at DIR, the cache the book build reads
   (``execute_notebooks: cache`` in ``_config.yml``). The book then executes nothing
   that the tests already ran. The cache is emptied whenever ``llmcore`` or the pinned
   requirements change (see ``fingerprint``), since the notebooks' outputs depend on
   them. ``--nb-missing-only`` runs only notebooks not yet in the cache.
3. Time report. The seconds each notebook took are printed at the end, slowest first,
   and written to ``--nb-times FILE`` as JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from collections import defaultdict
from pathlib import Path
from unittest import mock

import pytest

from tools.notebooks import is_myst_notebook

# The tests and the notebooks they run never download: Hugging Face's hub reads this
# once, when first imported (here, before any test or kernel does), and without it
# every call offline retries the network for ~20 s before it fails. HF_HUB_OFFLINE=0
# in the environment lets a connected machine fetch GPT-2 for the gpu-tier pages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent
# The deliberately failing notebook of the collector's own test is not in the suite.
collect_ignore = ["tests/notebooks"]
# The .ipynb files beside the .md sources are their Colab copies, not more notebooks.
collect_ignore_glob = ["book/*.ipynb", "labs/*.ipynb"]
# The corpora in data/ need no place here: load_corpus refuses any altered file.
FINGERPRINTED = ("llmcore/**/*.py", "tools/**/*.py", "book/workers/*.py",
                 "requirements.txt", "constraints.txt")


def pytest_addoption(parser):
    group = parser.getgroup("llmcore notebooks")
    group.addoption("--nb-cache", metavar="DIR", default=None,
                    help="store executed notebooks in the jupyter-cache at DIR")
    group.addoption("--nb-missing-only", action="store_true",
                    help="with --nb-cache: run only notebooks missing from the cache")
    group.addoption("--nb-times", metavar="FILE", default=None,
                    help="write the seconds each notebook took to FILE (JSON)")


def pytest_collect_file(file_path, parent):
    opt = parent.config.option
    if (opt.nbval or opt.nbval_lax) and is_myst_notebook(Path(file_path)):
        return MystNotebookFile.from_parent(parent, path=file_path)
    return None


try:
    from nbval.plugin import IPyNbCell, IPyNbFile
except ImportError:  # nbval not installed: notebooks are simply not collected
    IPyNbFile = IPyNbCell = None  # type: ignore[assignment,misc]
    collect_ignore += ["book", "labs"]


if IPyNbFile is not None:

    class MystNotebookFile(IPyNbFile):
        """nbval's notebook collector, fed a notebook read by jupytext."""

        def collect(self):
            import jupytext
            import nbformat

            nb = jupytext.read(self.path)
            with mock.patch.object(nbformat, "read", lambda *args, **kwargs: nb):
                return list(super().collect())


# ---------------------------------------------------------------- the notebook cache

def fingerprint(root: Path = ROOT) -> str:
    """SHA-256 over everything a notebook's outputs depend on besides its own cells."""
    digest = hashlib.sha256()
    for pattern in FINGERPRINTED:
        for path in sorted(root.glob(pattern)):
            if path.is_file():
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def book_notebook(path: Path):
    """The notebook as the book build reads it (myst-nb's reader), for hashing."""
    from myst_nb.core.read import read_myst_markdown_notebook

    return read_myst_markdown_notebook(path.read_text(encoding="utf-8"), path=path)


def open_cache(config):
    from jupyter_cache import get_cache

    return get_cache(str(Path(config.option.nb_cache).resolve()))


def stage_dir(config) -> Path:
    return Path(config.option.nb_cache).resolve().parent / ".nb-staged"


def is_master(config) -> bool:
    return not hasattr(config, "workerinput")


def pytest_sessionstart(session):
    config = session.config
    if not config.option.nb_cache or not is_master(config):
        return
    cache_dir = Path(config.option.nb_cache).resolve()
    stamp = cache_dir / "FINGERPRINT"
    current = fingerprint()
    if cache_dir.exists() and (not stamp.exists() or stamp.read_text() != current):
        shutil.rmtree(cache_dir)  # llmcore, data or pins changed: every output is stale
    cache_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(current)
    shutil.rmtree(stage_dir(config), ignore_errors=True)


def skip_gpu_tests(items) -> None:
    """Tests marked ``gpu`` skip where torch sees no CUDA device."""
    marked = [item for item in items if item.get_closest_marker("gpu")]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run: make test-gpu)")
    for item in marked:
        item.add_marker(skip)


def pytest_collection_modifyitems(session, config, items):
    skip_gpu_tests(items)
    if not (config.option.nb_cache and config.option.nb_missing_only):
        return
    cache = open_cache(config)
    cached: dict[Path, bool] = {}
    keep, drop = [], []
    for item in items:
        path = Path(item.path)
        if IPyNbFile is not None and isinstance(item.parent, MystNotebookFile):
            if path not in cached:
                try:
                    cache.match_cache_notebook(book_notebook(path))
                    cached[path] = True
                except KeyError:
                    cached[path] = False
            if cached[path]:
                drop.append(item)
                continue
        keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Mark failed notebooks; make a failed cell's report plain text, error first."""
    outcome = yield
    report = outcome.get_result()
    if IPyNbCell is None or not isinstance(item, IPyNbCell) or not report.failed:
        return
    item.parent.llmcore_failed = True
    text = ANSI.sub("", str(report.longrepr))
    lines = [line for line in text.splitlines() if line.strip()]
    error_line = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")
    error = next((line for line in reversed(lines) if error_line.match(line)), None)
    report.longrepr = f"{error}\n\n{text}" if error else text


def pytest_runtest_teardown(item, nextitem):
    """After a notebook's last cell: stage the executed notebook if all cells passed."""
    if IPyNbCell is None or not isinstance(item, IPyNbCell):
        return
    notebook = item.parent
    if nextitem is not None and nextitem.parent is notebook:
        return
    config = item.config
    if not config.option.nb_cache or getattr(notebook, "llmcore_failed", False):
        return
    cells = [i for i in item.session.items if i.parent is notebook]
    book_nb = book_notebook(Path(notebook.path))
    code = [c for c in book_nb.cells if c.cell_type == "code"]
    if len(code) != len(cells) or any(
            a.source.strip() != b.cell.source.strip() for a, b in zip(code, cells)):
        warnings.warn(f"{notebook.path}: jupytext and myst-nb read different code "
                      "cells; the book build will execute this notebook itself")
        return
    for n, (cell, item_) in enumerate(zip(code, cells), start=1):
        cell.outputs = list(item_.test_outputs or [])
        cell.execution_count = n
    import nbformat

    rel = Path(notebook.path).resolve().relative_to(ROOT)
    target = stage_dir(config) / (str(rel).replace("/", "__") + ".ipynb")
    target.parent.mkdir(parents=True, exist_ok=True)
    book_nb.metadata["llmcore_source"] = str(Path(notebook.path).resolve())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nbformat.write(book_nb, str(target))


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if not config.option.nb_cache or not is_master(config):
        return
    staged = sorted(stage_dir(config).glob("*.ipynb"))
    if not staged:
        return
    import nbformat
    from jupyter_cache.base import CacheBundleIn

    cache = open_cache(config)
    for path in staged:
        nb = nbformat.read(str(path), as_version=4)
        uri = nb.metadata.pop("llmcore_source")
        cache.cache_notebook_bundle(CacheBundleIn(nb, uri), check_validity=False,
                                    overwrite=True)
    shutil.rmtree(stage_dir(config), ignore_errors=True)


# ---------------------------------------------------------------- the time report

class NotebookTimes:
    """Adds up, on the master process, the seconds spent in each notebook's cells."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.failed: set[str] = set()
        self.start = time.perf_counter()

    def pytest_runtest_logreport(self, report):
        path, sep, cell = report.nodeid.partition("::")
        if not sep or not cell.startswith("Cell ") or not path.endswith(".md"):
            return
        self.seconds[path] += report.duration
        if report.failed:
            self.failed.add(path)

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        if not self.seconds:
            return
        tr = terminalreporter
        tr.section("seconds per notebook (kernel time, slowest first)")
        for path, secs in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            flag = "  FAILED" if path in self.failed else ""
            tr.write_line(f"{secs:8.1f}  {path}{flag}")
        wall = time.perf_counter() - self.start
        tr.write_line(f"{sum(self.seconds.values()):8.1f}  all notebooks "
                      f"({len(self.seconds)}), {wall:.1f} s wall for the session")
        if config.option.nb_times:
            out = Path(config.option.nb_times)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(
                {"seconds": dict(sorted(self.seconds.items())),
                 "failed": sorted(self.failed), "wall_seconds": wall}, indent=1))


class GpuPlanReport:
    """Prints the gpu tier's plan (T4 and H100) that tests/test_gpu_plan.py wrote."""

    path = ROOT / "_build" / "reports" / "gpu-plan.txt"

    def __init__(self):
        self.start = time.time()

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        if self.path.is_file() and self.path.stat().st_mtime >= self.start:
            terminalreporter.section("gpu tier: the plan per device class")
            terminalreporter.write(self.path.read_text())


def pytest_configure(config):
    if is_master(config):
        config.pluginmanager.register(NotebookTimes(), "llmcore-notebook-times")
        config.pluginmanager.register(GpuPlanReport(), "llmcore-gpu-plan")
