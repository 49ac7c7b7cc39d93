"""The measured numbers a chapter shows: ``results/*.json``, with where they came from.

Benchmarks (``python -m tools.bench NAME``) and ``make test-gpu`` write JSON files
into ``results/`` at the repository's root; the GPU results are committed, so a book
built on a CPU still shows them. A chapter never types a measured number: it loads
the file and prints the number beside the GPU, date and torch version it came from,

    from tools.bench import results
    for res in results.load_all("fp8-*"):
        print(results.provenance(res))   # NVIDIA H200 (sm90), 2026-12-01, torch 2.11.0
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tools.notebooks import find_root


def results_dir(root: Path | str | None = None) -> Path:
    """``results/`` of the book's repository (found from the working directory)."""
    return find_root(root) / "results"


def slug(gpu_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3': the GPU's part of a file name."""
    words = [w for w in re.split(r"[^a-z0-9]+", gpu_name.lower())
             if w and w not in ("nvidia", "geforce", "tesla")]
    return "-".join(words) or "gpu"


def device_part(device_type: str, name: str) -> str:
    """The device's part of a result's file name: the GPU's slug, or ``cpu``. A run
    on one device never writes another device's file."""
    return slug(name) if device_type == "cuda" else "cpu"


def load(name: str, root: Path | str | None = None) -> dict:
    """The result ``results/NAME.json`` (``name`` with or without ``.json``)."""
    path = results_dir(root) / (name if name.endswith(".json") else f"{name}.json")
    if not path.is_file():
        have = sorted(p.stem for p in path.parent.glob("*.json"))
        raise FileNotFoundError(f"no result {path.name} in {path.parent}; it has "
                                f"{have or 'none'}. Run the benchmark that writes it "
                                "(python -m tools.bench NAME, or make test-gpu)")
    res = json.loads(path.read_text(encoding="utf-8"))
    res.setdefault("file", path.name)
    return res


def load_all(pattern: str = "*", root: Path | str | None = None,
             include_dry_runs: bool = False) -> list[dict]:
    """Every result whose file name matches ``pattern`` (a glob without ``.json``),
    in name order; CPU dry runs are left out unless asked for."""
    folder = results_dir(root)
    found = [load(p.name, root) for p in sorted(folder.glob(f"{pattern}.json"))]
    return [r for r in found if include_dry_runs or not r.get("dry_run")]


def provenance(res: dict) -> str:
    """Where a result came from: device (and capability), date, torch and CUDA."""
    device = res.get("gpu") or res.get("device") or "unknown device"
    cap = res.get("capability")
    if cap:
        device += f" (sm{cap[0]}{cap[1]})"
    date = str(res.get("date", "undated"))[:10]
    parts = [device, date, f"torch {res.get('torch', '?')}"]
    if res.get("cuda"):
        parts.append(f"CUDA {res['cuda']}")
    return ", ".join(parts)


def main(argv: list[str]) -> int:
    """``python -m tools.bench results [PATTERN]``: the results and their origin."""
    pattern = argv[0] if argv else "*"
    found = load_all(pattern, include_dry_runs=True)
    for res in found:
        print(f"{res['file']:40s} {provenance(res)}")
    if not found:
        print(f"no results matching {pattern!r} in {results_dir()}")
    return 0
