"""Grade a folder of lab submissions: a fresh kernel per notebook, a time limit, scores.

    python -m tools.labs grade SUBMISSIONS --lab N [--out DIR] [--time-limit S]

``SUBMISSIONS`` holds one notebook per student, either as ``NAME.ipynb`` (or ``.md``) or
as a folder ``NAME/`` holding the lab's notebook. Every notebook is read before the
first is run, so that no submission can change another. For each student the grader:

1. reads the notebook and puts the lab's own check cells in place of the student's
   (matched in order), so an edited check grades nothing, and inserts after each the
   lab's ``hidden-check`` cells, which the student copy never showed;
2. executes it cell by cell in a fresh kernel, stopping at the time limit (the cells
   left count as failed), in a fresh empty folder: nothing of the lab (its source,
   solutions, hidden checks) is there, and on Linux the kernel is boxed
   (:mod:`tools.sandbox`): it sees neither the lab sources, nor the other
   submissions, nor the grades, may write only its own folder, and every process it
   started is killed with it;
3. counts a check as passed only when the check itself proved it, with a secret that
   the kernel gets with the check and prints when the check has run through
   (:mod:`tools.gradekernel`): a submission that hides errors, rewrites cells or
   replaces the functions the checks call scores nothing by it;
4. scores each exercise as the fraction of its check cells (visible and hidden) that
   passed.

It writes ``scores.csv`` and ``scores.json`` (per student and exercise; ``isolation``
says whether the kernels were boxed) and ``report.md`` to ``--out`` (default
``SUBMISSIONS/_grades``), and each executed notebook under ``executed/`` for
feedback. Without the box (not Linux, or no namespaces) student code runs with the
grader's rights: grade in a container or a throwaway account.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import llmcore
from llmcore.data.corpora import DATA_DIR
from tools import gradekernel, sandbox
from tools.labcells import checks_of, exercises, find_lab, is_check, is_hidden_check

ROOT = Path(__file__).resolve().parents[1]  # the repository

SKIP = ("_", ".")   # folders and files of the grader itself, hidden files


@dataclass
class Result:
    """One student's grade: a score in [0, 1] per exercise."""
    name: str
    file: str
    scores: list[float]
    status: str = "ok"
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def total(self) -> float:
        return round(sum(self.scores), 3)


def read_notebook(path: Path):
    import jupytext
    import nbformat

    if path.suffix == ".ipynb":
        return nbformat.read(str(path), as_version=4)
    return jupytext.read(path)


def submissions(folder: Path, lab: Path) -> list[tuple[str, Path | None]]:
    """(student, notebook) pairs; the notebook is None where none was found."""
    if not folder.is_dir():
        raise FileNotFoundError(f"SUBMISSIONS {folder} is not a folder")
    found: dict[str, Path | None] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(SKIP):
            continue
        if entry.is_file() and entry.suffix in (".ipynb", ".md"):
            if entry.stem not in found or entry.suffix == ".ipynb":
                found[entry.stem] = entry
        elif entry.is_dir():
            inside = sorted(p for p in entry.iterdir() if p.suffix in (".ipynb", ".md")
                            and not p.name.startswith(SKIP))
            named = [p for p in inside if p.stem == lab.stem]
            pick = named or (inside if len(inside) == 1 else [])
            found[entry.name] = sorted(pick, key=lambda p: p.suffix != ".ipynb")[0] \
                if pick else None
    return sorted(found.items())


def exercise_titles(lab_nb) -> list[str]:
    """The heading above each exercise ("Exercise 2: the causal mask")."""
    titles = []
    for number, index in enumerate(exercises(lab_nb), start=1):
        title = f"exercise {number}"
        for cell in reversed(lab_nb.cells[:index]):
            heads = [line.lstrip("#").strip() for line in cell.source.splitlines()
                     if cell.cell_type == "markdown" and line.startswith("#")]
            if heads:
                title = heads[-1]
                break
        titles.append(title)
    return titles


def graded_notebook(lab_nb, student_nb):
    """The student's notebook with the lab's checks (hidden ones too) in place; and,
    for each exercise, the indices of its check cells in that notebook."""
    nb = copy.deepcopy(student_nb)
    lab_checks = [i for i, c in enumerate(lab_nb.cells) if is_check(c)]
    theirs = [i for i, c in enumerate(nb.cells) if is_check(c)]
    if len(theirs) != len(lab_checks):
        raise ValueError(f"the notebook has {len(theirs)} cells tagged 'check', the "
                         f"lab {len(lab_checks)}; hand in the notebook you were given")
    # The lab's cells after each check, up to the next non-hidden one.
    hidden = {i: [] for i in lab_checks}
    for i in lab_checks:
        j = i + 1
        while j < len(lab_nb.cells) and (is_hidden_check(lab_nb.cells[j])
                                         or lab_nb.cells[j].cell_type != "code"):
            if is_hidden_check(lab_nb.cells[j]):
                hidden[i].append(j)
            j += 1
    where, cells = {}, []
    for index, cell in enumerate(nb.cells):
        if not is_check(cell):
            cells.append(cell)
            continue
        source_index = lab_checks[theirs.index(index)]
        for k in [source_index] + hidden[source_index]:
            where[k] = len(cells)
            cells.append(copy.deepcopy(lab_nb.cells[k]))
    for cell in cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.cells = cells
    plan = [[where[k] for k in group if k in where] for group in checks_of(lab_nb)]
    return nb, plan


def grade_one(name: str, notebook, lab: Path, lab_nb, time_limit: float,
              executed: Path | None = None, hide: tuple[Path, ...] = ()) -> Result:
    """Grade one submission (``notebook``: what was read from its file, a notebook
    or an exception, or None if none was found) in a box of its own."""
    import nbformat

    path, read = notebook if notebook is not None else ("", None)
    zero = [0.0] * len(exercises(lab_nb))
    if read is None:
        return Result(name, "", zero, "no notebook found")
    start = time.monotonic()
    try:
        if isinstance(read, Exception):
            raise read
        nb, plan = graded_notebook(lab_nb, read)
    except Exception as error:   # an unreadable file is that student's zero, not ours
        return Result(name, str(path), zero, f"unreadable: {error}")
    checks = {i: gradekernel.new_secret() for group in plan for i in group}
    root = Path(tempfile.mkdtemp(prefix="llmcore-grade-"))
    try:
        # the package, its data, and the book's process runner (book/workers/launch.py)
        keep = [Path(sys.prefix), Path(llmcore.__file__).parent, DATA_DIR,
                ROOT / "book" / "workers"]
        box = sandbox.Box(root, ROOT, keep, [lab.parent, *hide])
        box.env["PYTHONPATH"] = str(ROOT)  # `import book.workers` from the work folder
        errors, status = gradekernel.execute(nb, box, time_limit, checks)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    scores, failures = [], {}
    for number, group in enumerate(plan, start=1):
        failed = [errors[i] for i in group if i in errors]
        scores.append(round(1 - len(failed) / len(group), 3) if group else 0.0)
        if failed:
            failures[str(number)] = failed[0]
    if executed is not None:
        executed.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, str(executed / f"{name}.ipynb"))
    return Result(name, str(path), scores, status, failures,
                  round(time.monotonic() - start, 1))


def report(lab: Path, titles: list[str], results: list[Result]) -> str:
    lines = [f"# Grades for {lab.stem}", "",
             f"{len(results)} submissions; each exercise scores the fraction of its "
             "checks (visible and hidden) that passed.", "",
             "| exercise | mean | full marks |", "|---|---|---|"]
    for k, title in enumerate(titles):
        marks = [r.scores[k] for r in results]
        mean = sum(marks) / len(marks) if marks else 0.0
        lines.append(f"| {title} | {mean:.2f} | {sum(m == 1 for m in marks)} |")
    lines += ["", "| student | total | status | first failure |", "|---|---|---|---|"]
    for r in results:
        first = next(iter(r.failures.items()), ("", ""))
        note = f"exercise {first[0]}: {first[1]}" if first[0] else ""
        lines.append(f"| {r.name} | {r.total:g} / {len(titles)} | {r.status} "
                     f"| {note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def read_all(folder: Path, lab: Path) -> list[tuple[str, tuple | None]]:
    """Every submission read into memory before any runs: (student, (path, notebook
    or the error reading it)), or None where no notebook was found."""
    out = []
    for name, path in submissions(folder, lab):
        if path is None:
            out.append((name, None))
            continue
        try:
            out.append((name, (path, read_notebook(path))))
        except Exception as error:
            out.append((name, (path, error)))
    return out


def grade(folder: Path, lab: Path, out: Path | None = None,
          time_limit: float = 600.0) -> list[Result]:
    """Grade every submission in ``folder`` against ``lab``; write the tables."""
    out = Path(out) if out else folder / "_grades"
    lab_nb = read_notebook(lab)
    titles = exercise_titles(lab_nb)
    handed_in = read_all(folder, lab)
    results = [grade_one(name, notebook, lab, lab_nb, time_limit, out / "executed",
                         hide=(folder, out))
               for name, notebook in handed_in]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["student", *[f"ex{k}" for k in range(1, len(titles) + 1)],
                         "total", "max", "status"])
        for r in results:
            writer.writerow([r.name, *r.scores, r.total, len(titles), r.status])
    payload = {"lab": lab.stem, "exercises": titles, "time_limit_s": time_limit,
               "isolation": "box" if sandbox.available() else "none",
               "students": [{**asdict(r), "total": r.total} for r in results]}
    (out / "scores.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / "report.md").write_text(report(lab, titles, results))
    return results


def add_arguments(parser) -> None:
    parser.add_argument("submissions", type=Path,
                        help="folder of NAME.ipynb / NAME.md files or NAME/ folders")
    parser.add_argument("--lab", required=True,
                        help="the lab's number (2) or its source path")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the tables go (default: SUBMISSIONS/_grades)")
    parser.add_argument("--time-limit", type=float, default=600.0,
                        help="seconds each notebook may run (default 600)")


def run(args) -> int:
    if not (args.time_limit > 0 and math.isfinite(args.time_limit)):
        raise SystemExit(f"error: --time-limit {args.time_limit:g}: give a positive, "
                         "finite number of seconds (default 600)")
    try:
        lab = find_lab(args.lab)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    if not args.submissions.is_dir():
        raise SystemExit(f"error: SUBMISSIONS {args.submissions} is not a folder")
    if not sandbox.available():
        print("note: no Linux namespaces here, so the kernels are not boxed: student "
              "code runs with your rights (grade in a container or a throwaway "
              "account)")
    results = grade(args.submissions, lab, args.out, args.time_limit)
    out = args.out or args.submissions / "_grades"
    for r in results:
        print(f"{r.name}: {r.total:g} / {len(r.scores)} ({r.status})")
    print(f"wrote {out / 'scores.csv'}, scores.json and report.md")
    return 0
