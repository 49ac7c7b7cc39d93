"""The grader: fresh kernels, the lab's own and hidden checks, a time limit, tables.

A small lab written here shows each rule on its own; the real lab 2 is then graded as
its solution (full marks), its student copy (zero) and one mutant per exercise
(partial marks).
"""

import copy
import csv
import json
import os
import signal
import subprocess
import time
import uuid

import jupytext
import nbformat
import pytest

from tests.lab_mutants import MUTANTS
from tests.test_lab_mutants import mutate
from tools import grade, labs, sandbox

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
                      "--time-limit", "12"]) == 0
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
    for limit in ("0", "inf", "nan", "-5"):
        with pytest.raises(SystemExit, match=f"--time-limit {limit}: give a positive, "
                                             "finite number"):
            labs.main(["grade", str(tmp_path), "--lab", "2", "--time-limit", limit])
    with pytest.raises(SystemExit, match="--lab missing.md: no such file"):
        labs.main(["grade", str(tmp_path), "--lab", "missing.md"])
    with pytest.raises(SystemExit, match="SUBMISSIONS .*nothing is not a folder"):
        labs.main(["grade", str(tmp_path / "nothing"), "--lab", "2"])
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


# ------------------------------------------------- submissions that try to cheat
# A lab whose checks call torch, as the real ones do. Each cheat below worked on the
# grader that ran every submission in the lab's own folder and believed its kernel.
CHEAT_LAB = nbformat.v4.new_notebook(cells=[
    nbformat.v4.new_markdown_cell("# Lab 98\n\n## Exercise 1: doubling"),
    new_code("import torch"),
    new_code("def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n"
             "    ### END SOLUTION"),
    new_code("torch.testing.assert_close(double(torch.arange(3.0)), "
             "2 * torch.arange(3.0))", metadata={"tags": ["check"]}),
    new_code("assert double(torch.tensor(-4.0)).item() == -8",
             metadata={"tags": ["hidden-check"]}),
    nbformat.v4.new_markdown_cell("## Exercise 2: squaring"),
    new_code("def square(x):\n    ### BEGIN SOLUTION\n    return x * x\n"
             "    ### END SOLUTION"),
    new_code("assert torch.equal(square(torch.arange(4)), torch.arange(4) ** 2)",
             metadata={"tags": ["check"]}),
], metadata=LAB.metadata)

CUSTOM_EXC = "get_ipython().set_custom_exc((BaseException,), lambda *a, **k: None)"
TRANSFORMER = """\
def every_cell_passes(lines):
    return ["pass\\n"]
get_ipython().input_transformers_cleanup.append(every_cell_passes)"""
READS_SOURCE = """\
import pathlib, re
stolen = {{}}
for place in [{lab!r}, "98-cheat.md", "../lab/98-cheat.md"]:
    try:
        text = pathlib.Path(place).read_text()
    except OSError:
        continue
    for block in re.findall(r"```\\{{code-cell\\}}[^\\n]*\\n(.*?)```", text, re.S):
        if "BEGIN SOLUTION" in block:
            exec(block, stolen)
print("repository labs visible:", pathlib.Path({root!r}, "labs").exists())"""
PLANTS_TORCH = """\
import os, pathlib, uuid
for folder in [".", "../lab", {lab_dir!r}]:
    try:
        pathlib.Path(folder, "torch.py").write_text("raise ImportError('planted')")
    except OSError:
        pass
probe = pathlib.Path({root!r}, f".grade-probe-{{uuid.uuid4().hex}}")
try:
    probe.write_text("x")
    probe.unlink()
    print("repository writable")
except OSError:
    print("repository read-only")"""
FORGER = """\
import subprocess, sys, time
forge = '''
import pathlib, sys, time  # {marker}
end = time.time() + 600
while time.time() < end:
    for p in pathlib.Path(sys.argv[1]).glob("scores.*"):
        try:
            p.write_text("forged")
        except OSError:
            pass
    time.sleep(0.1)
'''
forger = subprocess.Popen([sys.executable, "-c", forge, {out!r}],
                          start_new_session=True)
time.sleep(1)
print("forger alive:", forger.poll() is None)"""
# Invented here: replace what the checks compare with, then hand in wrong answers.
REPLACES_TORCH = """\
import torch
torch.testing.assert_close = lambda *args, **kwargs: None
torch.equal = lambda *args, **kwargs: True"""


def cheat(first_cell: str = "", double: str | None = None, square: str | None = None):
    """The student copy of CHEAT_LAB with ``first_cell`` after its imports and the
    given exercise bodies."""
    nb = labs.student_notebook(CHEAT_LAB)
    for index, body in ((2, double), (5, square)):
        if body is not None:
            nb.cells[index].source = nb.cells[index].source.replace(
                labs.STUB, f"return {body}")
    if first_cell:
        nb.cells.insert(2, new_code(first_cell))
    return nb


def running(marker: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True,
                           check=False)
    return [int(pid) for pid in found.stdout.split()]


@pytest.mark.slow
@pytest.mark.skipif(not sandbox.available(), reason="needs Linux namespaces (unshare)")
def test_cheats_score_nothing_and_touch_no_other_result(tmp_path):
    lab = tmp_path / "lab" / "98-cheat.md"
    lab.parent.mkdir()
    jupytext.write(CHEAT_LAB, lab, fmt="md:myst")
    folder, out = tmp_path / "submitted", tmp_path / "grades"
    folder.mkdir()
    marker = f"forger-{uuid.uuid4().hex}"
    handed_in = {
        # what torch changes by itself is no cheat: dynamo (imported with the
        # training loop) wraps torch.manual_seed, pickling caches Tensor.__slotnames__
        "honest": cheat("import pickle\nimport llmcore.train\n"
                        "pickle.dumps(torch.ones(2))", double="2 * x", square="x * x"),
        "custom_exc": cheat(CUSTOM_EXC),
        "transformer": cheat(TRANSFORMER),
        "reads_source": cheat(READS_SOURCE.format(lab=str(lab), root=str(grade.ROOT)),
                              double='stolen["double"](x)',
                              square='stolen["square"](x)'),
        "y_plants_torch": cheat(PLANTS_TORCH.format(lab_dir=str(lab.parent),
                                                    root=str(grade.ROOT))),
        "z_after_planting": cheat(double="2 * x", square="x * x"),
        "forger": cheat(FORGER.format(marker=marker, out=str(out))),
        "replaces_torch": cheat(REPLACES_TORCH, double="x", square="x"),
    }
    for name, nb in handed_in.items():
        jupytext.write(nb, folder / f"{name}.ipynb")
    try:
        results = {r.name: r for r in grade.grade(folder, lab, out, time_limit=60)}
        time.sleep(1.5)  # a forger that outlived grading would have struck by now
        assert not running(marker), "a process of a submission outlived grading"
    finally:
        for pid in running(marker):
            os.kill(pid, signal.SIGKILL)
    scores = {name: r.scores for name, r in results.items()}
    assert scores == {"honest": [1.0, 1.0], "custom_exc": [0.0, 0.0],
                      "transformer": [0.0, 0.0], "reads_source": [0.0, 0.0],
                      "y_plants_torch": [0.0, 0.0], "z_after_planting": [1.0, 1.0],
                      "forger": [0.0, 0.0], "replaces_torch": [0.0, 0.0]}, results
    assert "replaced torch.equal, torch.testing.assert_close" in \
        results["replaces_torch"].failures["1"]
    table = json.loads((out / "scores.json").read_text())
    assert table["isolation"] == "box"
    assert {s["name"]: s["scores"] for s in table["students"]} == scores
    assert "forged" not in (out / "scores.csv").read_text()

    def printed(name):
        nb = nbformat.read(str(out / "executed" / f"{name}.ipynb"), as_version=4)
        return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                       for o in c.outputs)
    assert "forger alive: True" in printed("forger")  # it ran, and died with its box
    assert "repository read-only" in printed("y_plants_torch")
    assert "repository labs visible: False" in printed("reads_source")
    assert sorted(p.name for p in lab.parent.iterdir()) == ["98-cheat.md"]
    assert "check-passed" not in printed("honest")  # the secrets are taken out


def test_hidden_errors_rewritten_cells_and_replaced_torch_score_nothing_unboxed(
        tmp_path, monkeypatch):
    # the checks' own proof does not depend on the box
    monkeypatch.setattr(sandbox, "available", lambda: False)
    lab = tmp_path / "lab" / "98-cheat.md"
    lab.parent.mkdir()
    jupytext.write(CHEAT_LAB, lab, fmt="md:myst")
    folder = tmp_path / "submitted"
    folder.mkdir()
    for name, nb in {"custom_exc": cheat(CUSTOM_EXC, double="x", square="x"),
                     "replaces_torch": cheat(REPLACES_TORCH, double="x", square="x"),
                     "transformer": cheat(TRANSFORMER)}.items():
        jupytext.write(nb, folder / f"{name}.ipynb")
    results = grade.grade(folder, lab, tmp_path / "grades", time_limit=60)
    assert {r.name: r.scores for r in results} == {
        "custom_exc": [0.0, 0.0], "replaces_torch": [0.0, 0.0],
        "transformer": [0.0, 0.0]}
    table = json.loads((tmp_path / "grades" / "scores.json").read_text())
    assert table["isolation"] == "none"
