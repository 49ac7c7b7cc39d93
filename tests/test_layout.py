"""The package's layout and plainness, checked by reading its source.

Every module of ``llmcore`` is parsed with ``ast``; nothing is imported. The rules:
the package's base (every module but the new concepts of ``NEW_CONCEPTS``) holds at
most 9,000 lines of Python and each new concept at most 250; no file over 400; no
import cycle between modules (module-level imports); no function-local import of an
llmcore module; the library never imports the book's workers (``book.workers``) or
the tools (``tools``); at most six modules at the top level besides the subpackages.
And nothing private of PyTorch on any path: no ``torch.ops.<lib>._*`` op, no private
``torch`` attribute (``torch._scaled_mm``, PyTorch's only FP8 GEMM, excepted), no
optimizer ``found_inf`` protocol, no allocator tuning through ``ctypes``/``mallopt``;
and at most four modules call ``.backward(``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "llmcore"
MAX_LINES = 400
MAX_PACKAGE_LINES = 9_000  # the base: every module except NEW_CONCEPTS
MAX_NEW_CONCEPT_LINES = 250  # each new concept, as small as its concept allows
MAX_TOP_MODULES = 6
MAX_BACKWARD_MODULES = 4
OUTSIDE = ("book.workers", "tools")  # what serves the book, beside the package
PRIVATE_ALLOWED = {"_scaled_mm"}

# The capabilities added on top of the base budget (text files, Hugging Face weights,
# mixture of experts and expert parallelism, quantised collectives, pipeline
# schedules and split backward, FP8 accumulation, 8-bit Adam, MX formats, sampling,
# GPT-2's tokenizer, Muon): each counts apart from the base, against its own cap.
NEW_CONCEPTS = (
    "llmcore/data/textfiles.py",
    "llmcore/models/hf.py",
    "llmcore/nn/moe.py",
    "llmcore/parallel/expert_parallel.py",
    "llmcore/parallel/quantized_comm.py",
    "llmcore/parallel/schedules.py",
    "llmcore/parallel/split_backward.py",
    "llmcore/precision/accumulate.py",
    "llmcore/precision/adam8bit.py",
    "llmcore/precision/mx.py",
    "llmcore/sample.py",
    "llmcore/tokenizer/gpt2.py",
    "llmcore/train/muon.py",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))
           if "__pycache__" not in p.parts}


def resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def targets(node: ast.AST, current: str, is_package: bool) -> list[str]:
    """The llmcore modules an import statement loads (``from m import x`` loads m,
    and m.x where m.x is a module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        mod = resolve(node, current, is_package)
        names = [mod] + [f"{mod}.{a.name}" for a in node.names
                         if f"{mod}.{a.name}" in MODULES]
    else:
        return []
    return [n for n in names if n == "llmcore" or n.startswith("llmcore.")]


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Module-level import edges, and every import found inside a function."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    local: list[str] = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        funcs = [n for n in ast.walk(tree)
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        in_func = {id(sub) for f in funcs for sub in ast.walk(f)}
        for node in ast.walk(tree):
            found = targets(node, name, is_package)
            if not found:
                continue
            if id(node) in in_func:
                local += [f"{name} (line {node.lineno}) imports {t}" for t in found]
            else:
                graph[name].update(t for t in found if t in MODULES and t != name)
    return graph, local


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_file_has_at_most_400_lines():
    long = {name: n for name, p in MODULES.items()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_no_import_cycle():
    graph, _ = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_function_local_import_of_llmcore():
    _, local = import_graph()
    assert not local, "imports inside functions:\n" + "\n".join(local)


def line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def relative(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


def base_lines() -> tuple[int, list]:
    """Lines of the base (every module but NEW_CONCEPTS), and its five largest."""
    base = {relative(p): line_count(p) for p in MODULES.values()
            if relative(p) not in NEW_CONCEPTS}
    return sum(base.values()), sorted(base.items(), key=lambda kv: -kv[1])[:5]


def test_the_base_package_is_small():
    total, largest = base_lines()
    assert total <= MAX_PACKAGE_LINES, (
        f"llmcore's base has {total:,} lines, over {MAX_PACKAGE_LINES:,} by "
        f"{total - MAX_PACKAGE_LINES:,}; largest modules: {largest}")


def test_each_new_concept_is_small_and_exists():
    # A new concept renamed or removed must leave this list, or its exemption from
    # the base budget would outlive it.
    missing = [m for m in NEW_CONCEPTS if not (PACKAGE.parent / m).is_file()]
    assert not missing, f"NEW_CONCEPTS names modules that do not exist: {missing}"
    big = {m: n for m in NEW_CONCEPTS
           if (n := line_count(PACKAGE.parent / m)) > MAX_NEW_CONCEPT_LINES}
    assert not big, f"new concepts over {MAX_NEW_CONCEPT_LINES} lines: {big}"


def imported_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module or "")
    return names


def test_the_library_never_imports_the_book_or_the_tools():
    bad = sorted(f"{name} imports {n}" for name, path in MODULES.items()
                 for n in imported_names(path)
                 if any(n == o or n.startswith(o + ".") for o in OUTSIDE))
    assert not bad, bad


def private_uses(source: str) -> list[str]:
    """What of PyTorch's private machinery ``source`` uses."""
    tree = ast.parse(source)
    found = []
    inner_nodes = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner_nodes:
            chain, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name):
                chain.append(inner.id)
            chain.reverse()  # torch, ops, mkldnn, _linear_pointwise
            if chain[0] == "torch" and any(
                    part.startswith("_") and not part.startswith("__")
                    and part not in PRIVATE_ALLOWED for part in chain[1:]):
                found.append(".".join(chain))
            if node.attr == "found_inf" and isinstance(node.ctx, ast.Store):
                found.append("assigns .found_inf")
    found += re.findall(r"\b(mallopt|ctypes)\b", source)
    return found


def test_no_private_pytorch_machinery():
    bad = {name: uses for name, path in MODULES.items()
           if (uses := private_uses(path.read_text(encoding="utf-8")))}
    assert not bad, bad


def calls_backward(source: str) -> bool:
    """Whether ``source`` calls ``<tensor>.backward(...)`` (not a docstring's mention,
    not an autograd Function's ``def backward``)."""
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
               and n.func.attr == "backward" for n in ast.walk(ast.parse(source)))


def test_at_most_four_modules_call_backward():
    calls = sorted(name for name, path in MODULES.items()
                   if calls_backward(path.read_text(encoding="utf-8")))
    assert len(calls) <= MAX_BACKWARD_MODULES, calls
    assert calls_backward("loss.backward()") and calls_backward("y.backward(g)")
    assert not calls_backward('"""call loss.backward() then"""\n'
                              "def backward(ctx, g):\n    return g")


def test_at_most_six_top_level_modules():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert len(top) <= MAX_TOP_MODULES, f"top-level modules: {top}"


# ---------------------------------------------------------------- the checker itself

@pytest.mark.parametrize("source, expected", [
    ("torch.ops.mkldnn._linear_pointwise(x, w)",
     ["torch.ops.mkldnn._linear_pointwise"]),
    ("torch.autograd.Variable._execution_engine.queue_callback(f)",
     ["torch.autograd.Variable._execution_engine.queue_callback"]),
    ("opt.found_inf = flag", ["assigns .found_inf"]),
    ("libc = ctypes.CDLL(None); libc.mallopt(-3, 1)", ["ctypes", "mallopt"]),
    ("torch._scaled_mm(a, b); torch.__version__; x.found_inf", []),
])
def test_the_private_machinery_check_finds_what_it_must(source, expected):
    assert private_uses(source) == expected


def test_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("source, current, is_package, expected", [
    ("from llmcore.nn import swap", "llmcore.apps.lora", False,
     ["llmcore.nn", "llmcore.nn.swap"]),
    ("from . import swap", "llmcore.nn", True, ["llmcore.nn", "llmcore.nn.swap"]),
    ("from ..config import Tiered", "llmcore.nn.swap", False, ["llmcore.config"]),
    ("import llmcore.runtime as rt", "tools.colab", False, ["llmcore.runtime"]),
    ("import torch", "llmcore.runtime", False, []),
])
def test_import_edges_resolve_relative_and_from_imports(source, current, is_package,
                                                        expected):
    node = ast.parse(source).body[0]
    assert targets(node, current, is_package) == expected
