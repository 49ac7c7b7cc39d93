"""Which files are the book's notebooks: jupytext MyST ``.md`` files with a kernelspec.

Shared by the test collector (``conftest.py``), the Colab copies (``llmcore.colab``)
and the student labs (``llmcore.labs``).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("book", "labs")


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


def notebooks(folders=FOLDERS, root: Path = ROOT) -> list[Path]:
    """Every notebook of the book and the labs, in file order."""
    return [p for folder in folders for p in sorted((root / folder).glob("*.md"))
            if is_myst_notebook(p)]
