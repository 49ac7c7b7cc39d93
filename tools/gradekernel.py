"""Running a graded notebook: a fresh kernel in a box, and checks that prove they ran.

The grader cannot take a kernel's word that a check passed: a submission can hide
every error (``get_ipython().set_custom_exc``), rewrite the cells it is sent (an
input transformer), or replace the functions the checks call
(``torch.testing.assert_close = lambda *a, **k: None``). So:

* :func:`install` runs first in the fresh kernel, before any cell of the
  submission. It keeps IPython's own input rules, ``exec``, ``compile`` and the
  output stream, and a fingerprint of the functions checks rely on (builtins,
  ``math``, ``torch``, ``torch.testing``, ``torch.nn``, ``torch.nn.functional``,
  NumPy, the methods of ``torch.Tensor`` and ``nn.Module``).
* Each check cell reaches the kernel as one call, ``run(source, nonce)``, with the
  check's source encoded (no transformer that looks for ``assert`` finds it) and a
  secret drawn for this run and this check. ``run`` compiles the source with IPython's
  default rules (not the notebook's), executes it in the notebook's namespace, and
  only if it raised nothing and the fingerprint is unchanged prints the secret.
* The grader counts a check as passed when its secret is in the cell's output, and
  for nothing else: not the absence of an error (a custom handler can hide one), not
  what the cell shows.

:func:`execute` runs a whole notebook so, in a kernel started inside a
:class:`tools.sandbox.Box`, under a time limit, and kills the kernel's whole process
group after it.

Code of a submission still runs inside the checks (they call its functions), so a
submission written against this mechanism itself (reading the secret out of the
check's frame) is beyond what a kernel can prevent; the executed notebooks are kept
for an instructor to read.
"""

from __future__ import annotations

import base64
import inspect
import os
import secrets
import time

from tools import sandbox


def install(name: str) -> None:
    """Set up ``sys.modules[name].run`` in this kernel (see the module docstring)."""
    import base64
    import builtins
    import linecache
    import math
    import sys
    import types

    import numpy
    import torch
    import torch.nn.functional
    import torch.testing
    from IPython import get_ipython
    from IPython.core.inputtransformer2 import TransformerManager

    modules = {"builtins": builtins, "math": math, "torch": torch,
               "torch.testing": torch.testing, "torch.nn": torch.nn,
               "torch.nn.functional": torch.nn.functional, "numpy": numpy,
               "numpy.testing": numpy.testing}
    classes = [*torch.Tensor.__mro__[:-1], torch.nn.Module]
    # What the kernel and torch replace by themselves: ipykernel's input() per cell;
    # dynamo wraps manual_seed when first imported and Module's constructor when it
    # first compiles.
    own = {("builtins", "input"), ("torch", "manual_seed"), ("Module", "__init__"),
           ("Module", "__setstate__"), ("Module", "___needs_generation_tag_patch")}

    def fingerprint() -> dict:
        seen = {}
        for where, module in modules.items():
            for attr, value in list(vars(module).items()):
                if callable(value) and not attr.startswith("_"):
                    seen[where, attr] = (id(value), id(getattr(value, "__code__", 0)))
        for cls in classes:  # methods and descriptors (pickling caches data there)
            for attr, value in list(vars(cls).items()):
                if callable(value) or hasattr(value, "__get__"):
                    code = getattr(value, "__code__", getattr(
                        getattr(value, "__func__", None), "__code__", 0))
                    seen[cls.__qualname__, attr] = (id(value), id(code))
        return {key: v for key, v in seen.items() if key not in own}

    before = fingerprint()
    own_names = {cls.__qualname__ for cls in classes}

    def replaced() -> list[str]:
        now = fingerprint()
        return sorted(f"{w}.{a}" for (w, a), v in now.items()
                      if before.get((w, a), None if w in own_names else v) != v)

    shell, out = get_ipython(), sys.stdout
    rules, run_code, make_code = TransformerManager(), builtins.exec, builtins.compile
    decode = base64.b64decode

    def run(encoded: str, nonce: str, title: str = "<check>") -> None:
        source = decode(encoded).decode("utf-8")
        linecache.cache[title] = (len(source), None, source.splitlines(True), title)
        code = make_code(rules.transform_cell(source), title, "exec",
                         dont_inherit=True, optimize=0)
        run_code(code, shell.user_ns)
        changed = replaced()
        if changed:
            raise RuntimeError(f"the submission replaced {', '.join(changed[:4])}: "
                               "a check on replaced functions proves nothing")
        out.write(nonce + "\n")
        out.flush()

    sys.modules[name] = types.SimpleNamespace(run=run)


def bootstrap_source(name: str) -> str:
    """The first cell of a graded kernel: :func:`install` and its call."""
    return f"{inspect.getsource(install)}\ninstall({name!r})\ndel install\n"


def check_source(name: str, source: str, nonce: str, title: str) -> str:
    """A check cell as the kernel receives it."""
    encoded = base64.b64encode(source.encode("utf-8")).decode("ascii")
    return (f"__import__('sys').modules[{name!r}].run(\n    {encoded!r},\n"
            f"    {nonce!r}, {title!r})")


def new_secret() -> str:
    return f"check-passed-{secrets.token_hex(16)}"


def kernel_manager(prefix: list[str]):
    """A KernelManager class whose kernels start behind ``prefix`` (the box)."""
    from jupyter_client.manager import AsyncKernelManager  # nbclient's own kind

    class Boxed(AsyncKernelManager):
        def format_kernel_cmd(self, extra_arguments=None):
            return prefix + super().format_kernel_cmd(extra_arguments)
    return Boxed


def execute(nb, box: sandbox.Box, time_limit: float,
            checks: dict[int, str]) -> tuple[dict[int, str], str]:
    """Run ``nb`` in a fresh kernel in ``box``; the error of each failed cell, and a
    status. ``checks`` maps the index of each check cell to its secret: such a cell
    passed only if the secret is in its output (which is then taken out)."""
    from nbclient import NotebookClient

    module = new_secret().replace("-", "_")  # where run() lives
    client = NotebookClient(nb, timeout=time_limit, kernel_name="python3",
                            allow_errors=True, interrupt_on_timeout=False,
                            kernel_manager_class=kernel_manager(box.prefix),
                            resources={"metadata": {"path": str(box.work)}})
    with client.setup_kernel(env={**os.environ, **box.env}):
        try:
            install_checker(client, nb, module)
            return run_cells(client, nb, time_limit, checks, module)
        finally:  # the kernel's whole process group, before it is reaped
            process = getattr(client.km.provisioner, "process", None)
            if process is not None:
                sandbox.kill_group(process.pid)


def install_checker(client, nb, module: str) -> None:
    """Run :func:`tools.gradekernel.install` first in the kernel (not timed)."""
    from nbformat.v4 import new_code_cell

    client.timeout = 120  # a cold torch import on a busy machine
    first = new_code_cell(bootstrap_source(module))
    nb.cells.insert(0, first)  # nbclient stores a cell at its index: a real one
    try:
        client.execute_cell(first, 0)
    finally:
        del nb.cells[0]
    if any(o.output_type == "error" for o in first.outputs):
        raise RuntimeError(f"the grader's own first cell failed in the kernel: "
                           f"{first.outputs}")


def run_cells(client, nb, time_limit: float, checks: dict[int, str],
              module: str) -> tuple[dict[int, str], str]:
    """Execute the code cells in order until the time limit (the kernel's start not
    counted); the error of each failed cell, and a status."""
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    errors: dict[int, str] = {}
    status, limit = "ok", f"time limit {time_limit:g} s"
    deadline = time.monotonic() + time_limit
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        left = deadline - time.monotonic()
        if status != "ok" or left <= 0:
            status = errors[index] = status if status != "ok" else limit
            continue
        client.timeout = max(1, int(left))
        try:
            error = run_cell(client, cell, index, module, checks.get(index))
        except CellTimeoutError:
            status = errors[index] = limit
            continue
        except DeadKernelError:
            status = errors[index] = "the kernel died"
            continue
        if error:
            errors[index] = error
    return errors, status


def run_cell(client, cell, index: int, module: str, secret: str | None) -> str | None:
    """Execute one cell (a check through the secret); its error, or None."""
    source = cell.source
    if secret is not None:
        cell.source = check_source(module, source, secret,
                                               f"<check cell {index}>")
    try:
        client.execute_cell(cell, index)
    finally:
        cell.source = source
    error = None
    failed = [o for o in cell.outputs if o.output_type == "error"]
    if failed:
        text = f"{failed[0].ename}: {failed[0].evalue}".strip()
        error = text.splitlines()[0][:200] if text else "error"
    if secret is not None and not take_secret(cell, secret):
        error = error or ("the check did not report that it ran through (its "
                          "errors or output were hidden)")
    return error


def take_secret(cell, secret: str) -> bool:
    """Whether ``secret`` is a line of the cell's standard output; removes it."""
    found = False
    for output in cell.outputs:
        if output.output_type == "stream" and output.name == "stdout":
            lines = output.text.split("\n")
            if secret in lines:
                found = True
                output.text = "\n".join(line for line in lines if line != secret)
    cell.outputs = [o for o in cell.outputs
                    if not (o.output_type == "stream" and not o.text)]
    return found
