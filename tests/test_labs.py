"""The labs mechanism: student versions stub every solution, and every check then fails.

That the checks pass on the solution versions is proven by the notebook run of
``make test`` (nbval executes every lab as written). Here each lab's student version is
executed and every check cell must fail, with an AssertionError or the stub's
NotImplementedError: a check that passes without the learner's code tests nothing.
"""

import textwrap

import jupytext
import nbformat
import pytest

from llmcore.book import labs

LABS = labs.all_labs()


def test_strip_solutions_keeps_indentation_and_the_rest():
    source = textwrap.dedent("""\
        def f(x):
            y = 1
            ### BEGIN SOLUTION
            return x + y
            ### END SOLUTION

        print(f)""")
    stripped = labs.strip_solutions(source)
    assert "return x + y" not in stripped and "BEGIN" not in stripped
    assert "    raise NotImplementedError" in stripped
    assert stripped.startswith("def f(x):\n    y = 1\n")
    assert stripped.endswith("print(f)")
    ns = {}
    exec(stripped, ns)
    with pytest.raises(NotImplementedError):
        ns["f"](1)


@pytest.mark.parametrize("source, message", [
    ("### BEGIN SOLUTION\nx = 1", "never closed"),
    ("x = 1\n### END SOLUTION", "no '### BEGIN SOLUTION' before it"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside the one"),
])
def test_unbalanced_markers_are_errors(source, message):
    with pytest.raises(ValueError, match=message):
        labs.strip_solutions(source)


def test_an_exercise_without_a_check_cell_is_rejected():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("def f():\n    ### BEGIN SOLUTION\n    return 1\n"
                                  "    ### END SOLUTION"),
        nbformat.v4.new_code_cell("assert f() == 1"),
    ])
    with pytest.raises(ValueError, match="not followed by a code cell tagged 'check'"):
        labs.validate_lab(nb)
    nb.cells[1].metadata["tags"] = ["check"]
    labs.validate_lab(nb)


def test_there_are_labs():
    assert LABS, "labs/ holds no lab notebook"


@pytest.mark.slow
@pytest.mark.parametrize("lab", LABS, ids=[p.stem for p in LABS])
def test_student_version_fails_every_check(lab, tmp_path):
    from nbclient import NotebookClient

    written = labs.build_student([lab], tmp_path)
    assert {p.suffix for p in written} == {".md", ".ipynb"}
    student = nbformat.read(str(tmp_path / f"{lab.stem}.ipynb"), as_version=4)
    solution = jupytext.read(lab)
    checks = [c for c in solution.cells if labs.is_check(c)]
    assert checks, f"{lab.name} has no check cell"
    # The checks themselves are untouched: the nbval run of the solution runs the same.
    assert [c.source for c in student.cells if labs.is_check(c)] == \
        [c.source for c in checks]
    assert not any(labs.has_solution(c.source) for c in student.cells)

    NotebookClient(student, timeout=600, allow_errors=True, kernel_name="python3",
                   resources={"metadata": {"path": str(lab.parent)}}).execute()
    for index, cell in enumerate(student.cells):
        if not labs.is_check(cell):
            continue
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert errors, f"{lab.name}, cell {index}: check passed on the student version"
        assert errors[0].ename in ("AssertionError", "NotImplementedError"), (
            f"{lab.name}, cell {index}: check failed with {errors[0].ename}, not "
            "with the stub's NotImplementedError or an AssertionError")


def test_command_line_writes_md_and_ipynb(tmp_path, capsys):
    assert labs.main(["student", str(tmp_path), str(LABS[0])]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(tmp_path / (LABS[0].stem + s))
                                     for s in (".md", ".ipynb"))
    text = (tmp_path / (LABS[0].stem + ".md")).read_text()
    assert "NotImplementedError" in text and labs.BEGIN not in text
