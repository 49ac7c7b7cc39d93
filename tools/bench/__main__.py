"""``python -m tools.bench NAME [options]``: run the benchmark module ``NAME``."""

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import tools.bench


def available() -> list[str]:
    """The benchmarks: modules of ``tools.bench`` with a ``main`` (the others, such as
    ``presets`` or ``nanogpt``, are their parts and cannot run), found without
    importing them."""
    folder = Path(tools.bench.__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(folder)])
                  if not m.name.startswith("_") and any(
                      isinstance(node, ast.FunctionDef) and node.name == "main"
                      for node in ast.parse((folder / f"{m.name}.py").read_text(
                          encoding="utf-8")).body))


def main(argv: list[str]) -> int:
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m tools.bench NAME [options]; NAME is one of {names}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"unknown benchmark {name!r}; choose one of {names}", file=sys.stderr)
        return 2
    return importlib.import_module(f"tools.bench.{name}").main(rest) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
