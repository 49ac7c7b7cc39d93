"""Reading a printed solution's code from a chapter (book.workers.exercises)."""

from __future__ import annotations

import pytest

from book.workers.exercises import solution_code

PAGE = '''
```{exercise} Warm-up
:label: ex-a
```

````{solution} ex-a
:class: dropdown

Text.

```python
x = 1
```

```python
y = x + 1
```
````

```{solution} ex-b
:class: dropdown
Words only.
```

```python
z = 3  # after the solutions: belongs to no solution
```
'''


def test_reads_every_block_of_the_solution_and_nothing_after(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    code = solution_code(page, "ex-a")
    assert code == "x = 1\n\ny = x + 1\n"
    namespace = {}
    exec(code, namespace)
    assert namespace["y"] == 2


def test_refuses_a_missing_label_or_a_solution_without_code(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    with pytest.raises(ValueError, match="no solution block for exercise 'ex-c'"):
        solution_code(page, "ex-c")
    with pytest.raises(ValueError, match="shows no python code"):
        solution_code(page, "ex-b")
