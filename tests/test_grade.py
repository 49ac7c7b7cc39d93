"""The grader: fresh kernels, the lab's own and hidden checks, a time limit, tables.

A small lab written here shows each rule on its own; the real lab 2 is then graded as
its solution (full marks), its student copy (zero) and one mutant per exercise
(partial marks).
"""

import copy
import csv
import json

import jupytext
import nbformat
import pytest

from tests.lab_mutants import MUTANTS
from tests.test_lab_mutants import mutate
from tools import grade, labs

new_code = nbformat.v4.new_code_cell
LAB = nbformat.v4.new_notebook(cells=[
    nbformat.v4.new_markdown_cell("# Lab 99\n\n## Exercise 1: doubling"),
    new_code("def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n"
             "    ### END SOLUTION"),
    new_code("assert double(3) == 6", metadata={"tags": ["check"]}),
    new_code("assert double(-4) == -8", metadata={"tags": ["hidden-check"]}),
    nbformat.v4.new_markdown_cell("## Exercise 2: squaring"),
    new_code("def square(x):\n    ### BEGIN SOLUTION\n    return x * x\n"
             "    ### END SOLUTION"),
    new_code("assert square(3) == 9", metadata={"tags": ["check"]}),
])
LAB.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                              "language": "python"}


def submission(**bodies):
    """The student copy of LAB with the given exercise bodies written in."""
    nb = labs.student_notebook(LAB)
    for index, body in bodies.items():
        cell = nb.cells[int(index[1:])]
        cell.source = cell.source.replace(
            labs.STUB, body if body.startswith("while") else f"return {body}")
    return nb


@pytest.fixture
def graded(tmp_path):
    lab = tmp_path / "lab" / "99-tiny.md"
    lab.parent.mkdir()
    jupytext.write(LAB, lab, fmt="md:myst")
    folder = tmp_path / "submitted"
    folder.mkdir()
    jupytext.write(submission(c1="2 * x", c4="x * x"), folder / "ada.ipynb")
    jupytext.write(submission(), folder / "stub.md")
    # Passes the visible check of exercise 1 only: the hidden one catches it.
    jupytext.write(submission(c1="6 if x == 3 else 0", c4="x * x"),
                   folder / "tuned.ipynb")
    edited = submission(c1="x", c4="x ** 2")
    edited.cells[2].source = "pass  # the check, emptied"
    (folder / "bob").mkdir()
    jupytext.write(edited, folder / "bob" / "99-tiny.ipynb")
    jupytext.write(submission(c1="while True:\n        pass", c4="x * x"),
                   folder / "loop.ipynb")
    (folder / "empty").mkdir()
    out = tmp_path / "grades"
    assert labs.main(["grade", str(folder), "--lab", str(lab), "--out", str(out),
                      "--time-limit", "20"]) == 0
    return out


def test_scores_per_student_and_exercise(graded):
    table = json.loads((graded / "scores.json").read_text())
    assert table["exercises"] == ["Exercise 1: doubling", "Exercise 2: squaring"]
    scores = {s["name"]: (s["scores"], s["status"]) for s in table["students"]}
    assert scores["ada"] == ([1.0, 1.0], "ok")
    assert scores["stub"] == ([0.0, 0.0], "ok")
    assert scores["tuned"] == ([0.5, 1.0], "ok"), "the hidden check counts"
    assert scores["bob"] == ([0.0, 1.0], "ok"), "the lab's check replaces an edited one"
    assert scores["loop"][0] == [0.0, 0.0] and "time limit" in scores["loop"][1]
    assert scores["empty"] == ([0.0, 0.0], "no notebook found")
    rows = list(csv.DictReader(open(graded / "scores.csv")))
    assert {r["student"]: float(r["total"]) for r in rows} == {
        "ada": 2, "stub": 0, "tuned": 1.5, "bob": 1, "loop": 0, "empty": 0}
    report = (graded / "report.md").read_text()
    assert "| Exercise 1: doubling | 0.25 | 1 |" in report   # (1 + .5) / 6
    assert (graded / "executed" / "tuned.ipynb").is_file()


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="no single lab"):
        labs.main(["grade", str(tmp_path), "--lab", "97"])
    with pytest.raises(SystemExit, match="--time-limit"):
        labs.main(["grade", str(tmp_path), "--lab", "2", "--time-limit", "0"])
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        grade.grade(tmp_path / "nothing", labs.find_lab("2"))


@pytest.mark.slow
def test_lab_2_solution_stub_and_mutants(tmp_path):
    lab = labs.find_lab("2")
    solution = jupytext.read(lab)
    n = len(labs.exercises(solution))
    folder = tmp_path / "class"
    folder.mkdir()
    handed_in = copy.deepcopy(solution)   # as a student would: no hidden checks
    handed_in.cells = [c for c in solution.cells if not labs.is_hidden_check(c)]
    jupytext.write(handed_in, folder / "solution.ipynb")
    jupytext.write(labs.student_notebook(solution), folder / "stub.ipynb")
    # Two wrong exercises per copy, so that four exercises take two kernels, not
    # four. Exercises 2 and 4 call exercise 1's attention and 4 calls 3's heads, so
    # each pair leaves one exercise that does not depend on it: that one keeps its
    # marks, each wrong one loses some.
    keeps = {(1, 4): 3, (2, 3): 1}
    assert n == 4 and sorted(sum(keeps, ())) == list(MUTANTS[lab.stem])
    for pair in keeps:
        wrong = copy.deepcopy(handed_in)
        for number in pair:
            index = labs.exercises(wrong)[number - 1]
            wrong.cells[index].source = mutate(wrong.cells[index].source,
                                               *MUTANTS[lab.stem][number][0])
        jupytext.write(wrong, folder / f"mutant{pair[0]}{pair[1]}.ipynb")
    results = {r.name: r for r in grade.grade(folder, lab, tmp_path / "out", 300)}
    assert results["solution"].scores == [1.0] * n
    assert results["stub"].scores == [0.0] * n
    for pair, kept in keeps.items():
        r = results[f"mutant{pair[0]}{pair[1]}"]
        assert all(r.scores[k - 1] < 1 for k in pair), (pair, r.scores, r.failures)
        assert r.scores[kept - 1] == 1, (pair, r.scores, r.failures)
