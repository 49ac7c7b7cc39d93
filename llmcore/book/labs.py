"""Student versions of the labs: solutions out, ``raise NotImplementedError`` in.

A lab is a notebook in ``labs/``. Each exercise cell holds its solution between two
marker lines inside a function body::

    def attention(q, k, v):
        ### BEGIN SOLUTION
        ...
        ### END SOLUTION

and is followed by a check cell tagged ``check`` that calls the function on fresh inputs
and asserts. The student build replaces each marked region, markers included, with
``raise NotImplementedError`` at the same indentation, so the function still exists but
its check fails until the learner writes it.

    python -m llmcore.book.labs student OUT_DIR [LAB.md ...]

writes ``OUT_DIR/NAME.md`` and ``OUT_DIR/NAME.ipynb`` for every lab (all of ``labs/``
when none is named).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from llmcore.book.notebooks import notebooks

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
STUB = "raise NotImplementedError(\"exercise: write this part\")"


def strip_solutions(source: str, where: str = "cell") -> str:
    """``source`` with each solution replaced by a stub; unbalanced markers raise."""
    out: list[str] = []
    inside_since = None
    for number, line in enumerate(source.splitlines(), start=1):
        marker = line.strip()
        if marker == BEGIN:
            if inside_since is not None:
                raise ValueError(f"{where}: line {number} opens a solution region "
                                 f"inside the one opened on line {inside_since}; "
                                 f"close it first with {END!r}")
            inside_since = number
            indent = line[: len(line) - len(line.lstrip())]
            out.append(indent + STUB)
        elif marker == END:
            if inside_since is None:
                raise ValueError(f"{where}: line {number} has {END!r} with no "
                                 f"{BEGIN!r} before it")
            inside_since = None
        elif inside_since is None:
            out.append(line)
    if inside_since is not None:
        raise ValueError(f"{where}: the solution region opened on line "
                         f"{inside_since} is never closed; add a line {END!r}")
    return "\n".join(out)


def has_solution(source: str) -> bool:
    return any(line.strip() == BEGIN for line in source.splitlines())


def is_check(cell) -> bool:
    return cell.cell_type == "code" and "check" in cell.metadata.get("tags", [])


def student_notebook(nb, where: str = "notebook"):
    """A copy of the notebook ``nb`` with every solution region stubbed out."""
    nb = copy.deepcopy(nb)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and has_solution(cell.source):
            cell.source = strip_solutions(cell.source, f"{where}, cell {index}")
            cell.outputs = []
    return nb


def validate_lab(nb, where: str = "notebook") -> None:
    """A lab has exercises, and each exercise cell is followed by a check cell."""
    exercises = [i for i, c in enumerate(nb.cells)
                 if c.cell_type == "code" and has_solution(c.source)]
    if not exercises:
        raise ValueError(f"{where}: no cell holds a {BEGIN!r} region; a lab needs "
                         "at least one exercise")
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    for i in exercises:
        following = [j for j in code if j > i]
        if not following or not is_check(nb.cells[following[0]]):
            raise ValueError(f"{where}: the exercise in cell {i} is not followed by a "
                             "code cell tagged 'check'; add `:tags: [check]` to the "
                             "cell that tests it")
        strip_solutions(nb.cells[i].source, f"{where}, cell {i}")


def build_student(labs: list[Path], out_dir: Path) -> list[Path]:
    """Write each lab's student version as ``.md`` and ``.ipynb``; return the paths."""
    import jupytext

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for lab in labs:
        lab = Path(lab)
        if not lab.is_file():
            raise FileNotFoundError(f"lab {lab} does not exist")
        nb = jupytext.read(lab)
        validate_lab(nb, str(lab))
        student = student_notebook(nb, str(lab))
        for suffix, fmt in ((".md", "md:myst"), (".ipynb", "ipynb")):
            target = out_dir / (lab.stem + suffix)
            jupytext.write(student, target, fmt=fmt)
            written.append(target)
    return written


def all_labs(root: Path | None = None) -> list[Path]:
    return notebooks(folders=("labs",), root=root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmcore.book.labs",
                                     description="Build the student versions of labs.")
    sub = parser.add_subparsers(dest="command", required=True)
    student = sub.add_parser("student", help="write student versions to OUT_DIR")
    student.add_argument("out_dir", type=Path)
    student.add_argument("labs", nargs="*", type=Path,
                         help="lab notebooks (default: every labs/*.md)")
    args = parser.parse_args(argv)
    for path in build_student(args.labs or all_labs(), args.out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
