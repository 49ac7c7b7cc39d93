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

from tools import labs

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
    ("### END SOLUTION\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION", "line 1"),
])
def test_unbalanced_markers_are_errors(source, message):
    with pytest.raises(ValueError, match=message):
        labs.strip_solutions(source)


@pytest.mark.parametrize("marker", [
    "###BEGIN SOLUTION", "### BEGIN SOLUTIONS", "# BEGIN SOLUTION",
    "#### BEGIN SOLUTION",
    "### begin solution", "### BEGIN  SOLUTION", "### BEGIN SOLUTION here",
    "## END SOLUTION", "###END SOLUTION", "    # END_SOLUTION",
])
def test_a_malformed_marker_is_an_error_naming_cell_and_line(marker):
    """Today's builder would keep the solution under a mistyped marker."""
    source = f"def f(x):\n    y = 1\n{marker}\n    return x + y\n"
    with pytest.raises(ValueError, match=r"cell 3, line 3: .* looks like a solution"):
        labs.strip_solutions(source, "cell 3")
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("def g():\n    ### BEGIN SOLUTION\n    return 1\n"
                                  "    ### END SOLUTION"),
        nbformat.v4.new_code_cell("assert g() == 1", metadata={"tags": ["check"]}),
        nbformat.v4.new_code_cell(source)])
    with pytest.raises(ValueError, match=r"lab.md, cell 2, line 3"):
        labs.validate_lab(nb, "lab.md")
    with pytest.raises(ValueError, match=r"lab.md, cell 2, line 3"):
        labs.student_notebook(nb, "lab.md")


def test_ordinary_comments_and_strings_are_not_markers():
    source = "# the solution begins here\nx = 'BEGIN'  # END of input\nprint(x)"
    assert labs.strip_solutions(source) == source


def test_hidden_checks_are_dropped_from_the_student_copy():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("def g():\n    ### BEGIN SOLUTION\n    return 1\n"
                                  "    ### END SOLUTION"),
        nbformat.v4.new_code_cell("assert g() == 1", metadata={"tags": ["check"]}),
        nbformat.v4.new_code_cell("assert g() + 1 == 2",
                                  metadata={"tags": ["hidden-check"]}),
        nbformat.v4.new_code_cell("print('after')")])
    labs.validate_lab(nb)
    assert labs.checks_of(nb) == [[1, 2]] and labs.first_checks(nb) == [[1, 2]]
    student = labs.student_notebook(nb)
    assert [c.source for c in student.cells][1:] == ["assert g() == 1",
                                                     "print('after')"]
    assert "NotImplementedError" in student.cells[0].source


def test_student_build_refuses_the_source_folder(tmp_path):
    """Today ``student labs`` overwrites every lab source with its stubs. The test works
    on a copy of a lab, so that a regression cannot destroy the real one."""
    source = tmp_path / "labs"
    source.mkdir()
    lab = source / LABS[0].name
    before = LABS[0].read_text()
    lab.write_text(before)
    with pytest.raises(ValueError, match="refusing to write student copies into"):
        labs.build_student([lab], source)
    assert labs.main(["student", str(source), str(lab)]) == 2
    assert lab.read_text() == before
    # Any folder that holds a lab source is refused too, whichever labs are built.
    with pytest.raises(ValueError, match=f"{lab.name} there holds solutions"):
        labs.build_student([LABS[0]], source)
    assert lab.read_text() == before
    # A folder of earlier student copies may be rewritten.
    labs.build_student([lab], tmp_path / "student")
    labs.build_student([lab], tmp_path / "student")


def test_find_lab_by_number():
    assert labs.find_lab("2").name.startswith("02-")
    assert labs.find_lab("02") == labs.find_lab("2")
    with pytest.raises(ValueError, match="no single lab"):
        labs.find_lab("97")
    with pytest.raises(ValueError, match="give a lab number"):
        labs.find_lab("two")


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
