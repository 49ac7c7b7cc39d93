"""Student versions of the labs: solutions out, ``raise NotImplementedError`` in.

A lab is a notebook in ``labs/``. Each exercise cell holds its solution between two
marker lines inside a function body::

    def attention(q, k, v):
        ### BEGIN SOLUTION
        ...
        ### END SOLUTION

and is followed by a check cell tagged ``check`` that calls the function on fresh inputs
and asserts. Cells tagged ``hidden-check`` may follow that check: they run in the
solution notebook and when grading (``tools.grade``), but the student copy drops
them, so a learner cannot tune an answer to them. The student build replaces each marked
region, markers included, with ``raise NotImplementedError`` at the same indentation,
so the function still exists but its check fails until the learner writes it.

A marker typed slightly wrong (``###BEGIN SOLUTION``, ``# END SOLUTIONS``) would leave
the solution in the student copy, so any comment line that mentions BEGIN/END SOLUTION
and is not exactly a marker is an error naming its cell and line.

    python -m tools.labs student OUT_DIR [LAB.md ...]
    python -m tools.labs grade SUBMISSIONS --lab N

``student`` writes ``OUT_DIR/NAME.md`` and ``OUT_DIR/NAME.ipynb`` for every lab (all of
``labs/`` when none is named); it refuses an ``OUT_DIR`` that holds a lab source.
``grade`` is described in ``tools.grade``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from tools import grade
from tools.labcells import (BEGIN, END, HIDDEN, LOOKS_LIKE_MARKER, STUB, all_labs,
                            checks_of, exercises, find_lab, first_checks, has_solution,
                            is_check, is_hidden_check, solution_regions,
                            strip_solutions, validate_lab)

# The lab tools under one name: what this module builds, and the reading of a lab's
# cells from tools.labcells, which the tests and the grader use as labs.X.
__all__ = ["student_notebook", "build_student", "main", "BEGIN", "END", "HIDDEN",
           "LOOKS_LIKE_MARKER", "STUB", "all_labs", "checks_of", "exercises",
           "find_lab", "first_checks", "has_solution", "is_check", "is_hidden_check",
           "solution_regions", "strip_solutions", "validate_lab"]


def student_notebook(nb, where: str = "notebook"):
    """A copy of ``nb`` with every solution stubbed out and hidden checks removed."""
    nb = copy.deepcopy(nb)
    kept = []
    for index, cell in enumerate(nb.cells):
        if is_hidden_check(cell):
            continue
        if cell.cell_type == "code":
            # Every code cell is read: a malformed marker outside any exercise raises.
            stripped = strip_solutions(cell.source, f"{where}, cell {index}")
            if stripped != cell.source:
                cell.source = stripped
                cell.outputs = []
        elif LOOKS_LIKE_MARKER.search(cell.source):
            raise ValueError(f"{where}, cell {index}: a {cell.cell_type} cell mentions "
                             "a solution marker; markers belong in code cells")
        kept.append(cell)
    nb.cells = kept
    return nb


def _refuse_source_folder(labs: list[Path], out_dir: Path) -> None:
    """Writing student copies over lab sources would destroy the solutions."""
    out = out_dir.resolve()
    for lab in labs:
        if lab.resolve().parent == out:
            raise ValueError(f"refusing to write student copies into {out_dir}: it "
                             f"holds the lab source {lab.name}, whose solutions "
                             "would be overwritten; choose another OUT_DIR, such as "
                             "_build/student-labs")
    if out.is_dir():
        for path in out.glob("*.md"):
            if has_solution(path.read_text(encoding="utf-8", errors="replace")):
                raise ValueError(f"refusing to write student copies into {out_dir}: "
                                 f"{path.name} there holds solutions (a lab source); "
                                 "choose an empty folder or one of student copies")


def build_student(labs: list[Path], out_dir: Path) -> list[Path]:
    """Write each lab's student version as ``.md`` and ``.ipynb``; return the paths."""
    import jupytext

    labs = [Path(lab) for lab in labs]
    for lab in labs:
        if not lab.is_file():
            raise FileNotFoundError(f"lab {lab} does not exist")
    out_dir = Path(out_dir)
    _refuse_source_folder(labs, out_dir)
    students = []
    for lab in labs:   # every lab is checked before anything is written
        nb = jupytext.read(lab)
        validate_lab(nb, str(lab))
        students.append((lab, student_notebook(nb, str(lab))))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for lab, student in students:
        for suffix, fmt in ((".md", "md:myst"), (".ipynb", "ipynb")):
            target = out_dir / (lab.stem + suffix)
            jupytext.write(student, target, fmt=fmt)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.labs",
                                     description="Student versions and grading.")
    sub = parser.add_subparsers(dest="command", required=True)
    student = sub.add_parser("student", help="write student versions to OUT_DIR")
    student.add_argument("out_dir", type=Path)
    student.add_argument("labs", nargs="*", type=Path,
                         help="lab notebooks (default: every labs/*.md)")
    grade.add_arguments(sub.add_parser("grade", help=grade.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    if args.command == "grade":
        return grade.run(args)
    try:
        written = build_student(args.labs or all_labs(), args.out_dir)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
