"""The code of an exercise's printed solution, read from the chapter's own page.

A chapter's exercises print their solutions in ``solution`` blocks (hidden in the
student book). Reading the code from the page and running it against the exercise's
check proves that the check accepts the answer the reader is shown, not only that it
rejects wrong ones.
"""

from __future__ import annotations

import re
from pathlib import Path

CODE = re.compile(r"```python\n(.*?)```", re.S)


def solution_code(page: str | Path, label: str) -> str:
    """The python code blocks of the solution to exercise ``label`` on ``page``, joined
    in order. A label with no solution, or a solution with no code, is an error."""
    text = Path(page).read_text(encoding="utf-8")
    head = re.search(r"^[`:]{3,}\{solution\}\s+" + re.escape(label) + r"\s*$", text,
                     re.M)
    if head is None:
        raise ValueError(f"{page}: no solution block for exercise {label!r}")
    fence = text[head.start():head.end()].split("{", 1)[0]
    end = re.compile(rf"^{re.escape(fence)}\s*$", re.M).search(text, head.end())
    blocks = CODE.findall(text[head.end():end.start() if end else len(text)])
    if not blocks:
        raise ValueError(f"{page}: the solution of {label!r} shows no python code")
    return "\n".join(blocks)
