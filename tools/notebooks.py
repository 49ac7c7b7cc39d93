"""Which files are the book's notebooks: jupytext MyST ``.md`` files with a kernelspec.

Shared by the test collector (``conftest.py``), the Colab copies (``tools.colab``)
and the student labs (``tools.labs``). The repository is found from the working
directory (or a folder passed in), not from where the package is installed, so the
tools work from a regular ``pip install`` as well as from an editable one.
"""

from __future__ import annotations

from pathlib import Path

FOLDERS = ("book", "labs")
MARKERS = ("_config.yml", "_toc.yml")


def find_root(start: Path | str | None = None) -> Path:
    """The book's repository: ``start`` (default: the working directory) or a parent
    of it that holds ``_config.yml`` and ``_toc.yml``."""
    here = Path.cwd() if start is None else Path(start)
    here = here.resolve()
    for folder in (here, *here.parents):
        if all((folder / name).is_file() for name in MARKERS):
            return folder
    raise FileNotFoundError(f"no book repository at or above {here} (a folder with "
                            f"{' and '.join(MARKERS)}); run this from the book's "
                            "repository or pass its folder (--root)")


def is_myst_notebook(path: Path | str) -> bool:
    """A jupytext MyST notebook: a ``.md`` file whose front matter has a kernelspec."""
    path = Path(path)
    if path.suffix != ".md" or not path.is_file():
        return False
    head = path.read_text(encoding="utf-8", errors="replace")[:2000]
    if not head.startswith("---"):
        return False
    front = head.split("\n---", 1)[0]
    return "kernelspec:" in front


def notebooks(folders=FOLDERS, root: Path | None = None) -> list[Path]:
    """Every notebook of the book and the labs, in file order."""
    root = find_root(root)
    return [p for folder in folders for p in sorted((root / folder).glob("*.md"))
            if is_myst_notebook(p)]
