"""``python -m tools.bench NAME [options]``: run the benchmark module ``NAME``."""

import importlib
import pkgutil
import sys

import tools.bench


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(tools.bench.__path__)
                  if not m.name.startswith("_"))


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
