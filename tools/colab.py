"""The ``.ipynb`` copies of the chapters and labs that Colab opens.

Colab opens notebooks from GitHub only as ``.ipynb``; the book's sources are MyST
``.md`` files. ``python -m tools.colab write`` (``make notebooks``) writes an
``.ipynb`` beside each source, with one extra first cell that, on Colab only, clones the
repository (whose address is read from ``_config.yml``, the one place that names it),
installs llmcore, and moves into the notebook's folder. ``check`` fails when a copy is
missing or stale; the test suite runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tools.notebooks import find_root, notebooks

MARKER = "llmcore-colab-bootstrap"

BOOTSTRAP = '''# On Colab: fetch the book's code and data once, then work there.
# (Elsewhere this cell does nothing.)
import os, subprocess, sys
if "google.colab" in sys.modules:
    if not os.path.isdir("/content/llmcore"):
        subprocess.run(["git", "clone", "--depth", "1", "{url}",
                        "/content/llmcore"], check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e",
                        "/content/llmcore"], check=True)
    sys.path.insert(0, "/content/llmcore")
    os.chdir("/content/llmcore/{folder}")'''


def repository_url(config: Path | None = None) -> str:
    import yaml

    config = config or find_root() / "_config.yml"

    url = (yaml.safe_load(config.read_text()) or {}).get("repository", {}).get("url")
    if not url:
        raise ValueError(f"{config} has no repository.url; add it under `repository:`")
    return url


def colab_notebook(source: Path, url: str):
    """The notebook ``source`` with the Colab bootstrap cell in front."""
    import jupytext
    import nbformat

    nb = jupytext.read(source)
    cell = nbformat.v4.new_code_cell(
        BOOTSTRAP.format(url=url, folder=source.parent.name),
        metadata={"tags": [MARKER]})
    cell.pop("id", None)
    nb.cells.insert(0, cell)
    for c in nb.cells:
        c.pop("id", None)  # stable files: no random cell ids
    nb.metadata.pop("jupytext", None)
    nb.metadata["colab"] = {"provenance": []}
    nb.nbformat_minor = 4
    return nb


def render(source: Path, url: str) -> str:
    import nbformat

    return nbformat.writes(colab_notebook(source, url), version=4) + "\n"


def twin(source: Path) -> Path:
    return source.with_suffix(".ipynb")


def write(paths: list[Path]) -> list[Path]:
    url = repository_url(find_root(paths[0].parent) / "_config.yml") if paths else ""
    for source in paths:
        twin(source).write_text(render(source, url))
    return [twin(p) for p in paths]


def stale(paths: list[Path]) -> list[Path]:
    """Sources whose ``.ipynb`` copy is missing or differs from what ``write`` makes."""
    url = repository_url(find_root(paths[0].parent) / "_config.yml") if paths else ""
    return [p for p in paths
            if not twin(p).exists() or twin(p).read_text() != render(p, url)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.colab")
    parser.add_argument("command", choices=["write", "check"])
    parser.add_argument("--root", type=Path, default=None,
                        help="the book's repository (default: found from the cwd)")
    args = parser.parse_args(argv)
    root = find_root(args.root)
    paths = notebooks(root=root)
    if args.command == "write":
        for path in write(paths):
            print(path.relative_to(root))
        return 0
    bad = stale(paths)
    for path in bad:
        print(f"{path.relative_to(root)}: Colab copy missing or stale", file=sys.stderr)
    if bad:
        print("run `make notebooks` to refresh them", file=sys.stderr)
    print(json.dumps({"checked": len(paths), "stale": len(bad)}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
