"""The benchmark dispatcher: python -m tools.bench NAME."""

import subprocess
import sys


def test_unknown_benchmark_is_a_clear_error():
    result = subprocess.run([sys.executable, "-m", "tools.bench", "no-such-bench"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown benchmark 'no-such-bench'; choose one of" in result.stderr


def test_help_lists_the_benchmark_modules(capsys):
    from pathlib import Path

    from tools.bench.__main__ import main

    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    modules = {p.stem: "\ndef main(" in p.read_text() for p in
               Path("tools/bench").glob("*.py") if not p.stem.startswith("_")}
    # the benchmarks, and not the modules they are made of (which have no main)
    assert any(modules.values()) and not all(modules.values())
    assert all((f"'{m}'" in listed) == runs for m, runs in modules.items())
    assert "__main__" not in listed and "__init__" not in listed
    assert main([]) == 2  # no name: a usage error
