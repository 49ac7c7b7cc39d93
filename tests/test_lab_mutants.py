"""Every lab's checks reject plausible wrong solutions, not only the stub.

For each lab, one kernel runs the solution up to the last exercise's checks; then each
mutant of ``tests/lab_mutants.py`` replaces its exercise's cell, that exercise's checks
(visible and hidden) run and at least one must fail, and the solution cell is run again
to restore the right definitions. Only the needed cells run: the whole file takes a
few minutes on one core.
"""

import nbformat
import pytest

from tests.lab_mutants import MUTANTS
from tools import labs

LABS = {p.stem: p for p in labs.all_labs()}


def mutate(source: str, old: str, new: str) -> str:
    """``source`` with ``old`` (once, inside a solution region) replaced by ``new``."""
    assert source.count(old) == 1, f"{old!r} occurs {source.count(old)} times"
    lines = source.splitlines(keepends=True)
    starts = [sum(map(len, lines[:i])) for i in range(len(lines) + 1)]
    at = source.index(old)
    assert any(starts[a] <= at and at + len(old) <= starts[b + 1]
               for a, b in labs.solution_regions(source)), \
        f"{old!r} is not inside a solution region"
    return source.replace(old, new)


def test_every_lab_and_exercise_has_mutants():
    import jupytext

    for stem, path in LABS.items():
        n = len(labs.exercises(jupytext.read(path)))
        assert stem in MUTANTS, f"labs/{stem}.md has no mutants in tests/lab_mutants.py"
        assert sorted(MUTANTS[stem]) == list(range(1, n + 1)), (stem, n)
        assert all(len(m) >= 2 for m in MUTANTS[stem].values()), stem


def test_mutate_refuses_edits_outside_a_solution():
    source = "def f():\n    x = 1\n    ### BEGIN SOLUTION\n    return x\n" \
             "    ### END SOLUTION"
    assert "return x + 1" in mutate(source, "return x", "return x + 1")
    with pytest.raises(AssertionError, match="not inside"):
        mutate(source, "x = 1", "x = 2")


class Kernel:
    """A kernel in the lab's folder that runs one cell source at a time."""

    def __init__(self, client):
        self.client = client

    def run(self, source: str) -> str | None:
        """The error of the cell (``"Name: message"``), or None when it passed."""
        cell = nbformat.v4.new_code_cell(source)
        self.client.nb.cells.append(cell)      # nbclient stores the cell back there
        self.client.execute_cell(cell, len(self.client.nb.cells) - 1)
        errors = [o for o in cell.outputs if o.output_type == "error"]
        return f"{errors[0].ename}: {errors[0].evalue}" if errors else None


@pytest.mark.slow
@pytest.mark.parametrize("stem", sorted(MUTANTS))
def test_checks_reject_every_mutant(stem):
    import jupytext
    from nbclient import NotebookClient

    path = LABS[stem]
    nb = jupytext.read(path)
    exercises, groups = labs.exercises(nb), labs.first_checks(nb)
    last = max(groups[-1])
    client = NotebookClient(nbformat.v4.new_notebook(), timeout=600,
                            kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(path.parent)}})
    survivors = []
    with client.setup_kernel():
        kernel = Kernel(client)
        for index, cell in enumerate(nb.cells[:last + 1]):
            if cell.cell_type == "code":
                error = kernel.run(cell.source)
                assert error is None, f"{stem}, cell {index} fails as written: {error}"
        for number, mutants in MUTANTS[stem].items():
            source = nb.cells[exercises[number - 1]].source
            for old, new in mutants:
                assert kernel.run(mutate(source, old, new)) is None
                if all(kernel.run(nb.cells[j].source) is None
                       for j in groups[number - 1]):
                    survivors.append((number, old, new))
                assert kernel.run(source) is None      # the solution again
    assert not survivors, f"{stem}: checks pass on wrong solutions {survivors}"
