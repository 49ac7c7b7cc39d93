"""The benchmark dispatcher: python -m tools.bench NAME."""

import subprocess
import sys


def test_unknown_benchmark_is_a_clear_error():
    result = subprocess.run([sys.executable, "-m", "tools.bench", "no-such-bench"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown benchmark 'no-such-bench'; choose one of" in result.stderr


def test_help_lists_the_benchmarks():
    from tools.bench.__main__ import available, main

    assert main(["--help"]) == 0
    assert main([]) == 2
    assert all(not name.startswith("_") for name in available())
