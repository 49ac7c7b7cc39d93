"""The structure of a lab notebook: solution markers, exercises and their checks.

An exercise cell holds its solution between the exact lines ``### BEGIN SOLUTION`` and
``### END SOLUTION``; the code cell after it is tagged ``check``; cells tagged
``hidden-check`` may follow (kept out of the student copy, run when grading). A comment
that looks like a marker but is not exactly one is an error naming its cell and line,
since it would leave a solution in the student copy. Shared by the student build
(``tools.labs``) and the grader (``tools.grade``).
"""

from __future__ import annotations

import re
from pathlib import Path

from tools.notebooks import notebooks

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
STUB = "raise NotImplementedError(\"exercise: write this part\")"
CHECK, HIDDEN = "check", "hidden-check"
# Anything that looks like a marker: a comment naming BEGIN or END and SOLUTION.
LOOKS_LIKE_MARKER = re.compile(r"#.*\b(BEGIN|END)[\W_]*SOLUTION", re.IGNORECASE)


def _marker(line: str, number: int, where: str) -> str | None:
    """BEGIN or END for an exact marker line, None for code; malformed ones raise."""
    text = line.strip()
    if text in (BEGIN, END):
        return text
    if LOOKS_LIKE_MARKER.search(text):
        raise ValueError(f"{where}, line {number}: {text!r} looks like a solution "
                         f"marker but is not one; write exactly {BEGIN!r} or {END!r} "
                         "on a line of its own")
    return None


def strip_solutions(source: str, where: str = "cell") -> str:
    """``source`` with each solution replaced by a stub; bad markers raise."""
    out: list[str] = []
    inside_since = None
    for number, line in enumerate(source.splitlines(), start=1):
        marker = _marker(line, number, where)
        if marker == BEGIN:
            if inside_since is not None:
                raise ValueError(f"{where}, line {number}: opens a solution region "
                                 f"inside the one opened on line {inside_since}; "
                                 f"close it first with {END!r}")
            inside_since = number
            indent = line[: len(line) - len(line.lstrip())]
            out.append(indent + STUB)
        elif marker == END:
            if inside_since is None:
                raise ValueError(f"{where}, line {number}: {END!r} with no "
                                 f"{BEGIN!r} before it")
            inside_since = None
        elif inside_since is None:
            out.append(line)
    if inside_since is not None:
        raise ValueError(f"{where}, line {inside_since}: the solution region opened "
                         f"there is never closed; add a line {END!r}")
    return "\n".join(out)


def solution_regions(source: str, where: str = "cell") -> list[tuple[int, int]]:
    """(first, last) 0-based line numbers of each region's body, markers excluded."""
    strip_solutions(source, where)   # validates the markers
    lines = [line.strip() for line in source.splitlines()]
    begins = [i for i, line in enumerate(lines) if line == BEGIN]
    ends = [i for i, line in enumerate(lines) if line == END]
    return [(b + 1, e - 1) for b, e in zip(begins, ends)]


def has_solution(source: str) -> bool:
    return any(line.strip() == BEGIN for line in source.splitlines())


def _tags(cell) -> list[str]:
    return cell.metadata.get("tags", []) if cell.cell_type == "code" else []


def is_check(cell) -> bool:
    return CHECK in _tags(cell)


def is_hidden_check(cell) -> bool:
    return HIDDEN in _tags(cell)


def exercises(nb) -> list[int]:
    """Indices of the exercise cells (those holding a solution region)."""
    return [i for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and has_solution(c.source)]


def checks_of(nb) -> list[list[int]]:
    """For each exercise, the indices of its check cells (visible, then hidden):
    those after it and before the next exercise."""
    starts = exercises(nb)
    bounds = starts[1:] + [len(nb.cells)]
    return [[j for j in range(i + 1, end) if is_check(nb.cells[j])
             or is_hidden_check(nb.cells[j])] for i, end in zip(starts, bounds)]


def validate_lab(nb, where: str = "notebook") -> None:
    """A lab has exercises, each followed by a check cell; markers are well formed."""
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            strip_solutions(cell.source, f"{where}, cell {index}")
    found = exercises(nb)
    if not found:
        raise ValueError(f"{where}: no cell holds a {BEGIN!r} region; a lab needs "
                         "at least one exercise")
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    for i in found:
        following = [j for j in code if j > i]
        if not following or not is_check(nb.cells[following[0]]):
            raise ValueError(f"{where}: the exercise in cell {i} is not followed by a "
                             "code cell tagged 'check'; add `:tags: [check]` to the "
                             "cell that tests it")
    for index, cell in enumerate(nb.cells):
        if is_hidden_check(cell) and has_solution(cell.source):
            raise ValueError(f"{where}, cell {index}: a hidden check holds a solution")


def all_labs(root: Path | None = None) -> list[Path]:
    return notebooks(folders=("labs",), root=root)


def find_lab(number: str, root: Path | None = None) -> Path:
    """The lab numbered ``number`` ("2", "02") or a path to a lab notebook."""
    if Path(number).suffix in (".md", ".ipynb"):
        if not Path(number).is_file():
            raise FileNotFoundError(f"--lab {number}: no such file; give a lab "
                                    "number such as 2, or the path of a lab notebook")
        return Path(number)
    if not number.isdigit():
        raise ValueError(f"--lab {number!r}: give a lab number such as 2, or a path")
    found = [p for p in all_labs(root) if p.name.startswith(f"{int(number):02d}-")]
    if len(found) != 1:
        names = ", ".join(p.stem for p in all_labs(root))
        raise ValueError(f"--lab {number}: no single lab with that number; "
                         f"the labs are {names}")
    return found[0]


def first_checks(nb) -> list[list[int]]:
    """For each exercise, its own check cell and the hidden checks right after it
    (the lab's later checks, such as an end-to-end run, are left out)."""
    groups = []
    for group in checks_of(nb):
        first = group[:1]
        for j in group[1:]:
            between = [c for c in nb.cells[first[-1] + 1:j] if c.cell_type == "code"]
            if is_check(nb.cells[j]) or between:
                break
            first.append(j)
        groups.append(first)
    return groups
