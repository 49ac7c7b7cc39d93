"""Parallel step time, predicted and measured: ``python -m llmcore.bench parallel``.

Calibrates the step-time model (:mod:`llmcore.parallel.steptime`) on this machine,
times data parallel, ZeRO-1, ZeRO-3, tensor parallel, a 1F1B pipeline (2 processes)
and data parallel and data x tensor parallel (4 processes) with gloo on the CPU, and
writes both times per plan to ``results/parallel-<device>.json`` with the hardware,
the date and the torch version. ``--check`` fails when a two-process prediction is
more than 30% off.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import torch

from llmcore.io import atomic_write
from llmcore.parallel.experiments.costmodel_runs import BenchConfig, run

TOLERANCE = 0.30  # the largest relative error allowed for a two-process plan


def hardware() -> str:
    """The CPU's model name and core count (what the processes share)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count()
    return f"{name}, {cores} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmcore.bench parallel",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results", help="folder of the JSON file")
    parser.add_argument("--reps", type=int, default=BenchConfig.reps,
                        help="timed steps per plan (median)")
    parser.add_argument("--no-four", action="store_true",
                        help="skip the four-process plans")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 if a 2-process plan is off by > "
                        f"{TOLERANCE * 100:.0f}%%")
    args = parser.parse_args(argv)
    result = run(BenchConfig(reps=args.reps), four=not args.no_four)
    result.update({
        "device": hardware(), "backend": "gloo", "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")})
    for row in result["plans"]:
        naive = (f"; {row['predicted_from_two_s'] * 1e3:.1f} ms from two processes "
                 f"and cores ({row['error_from_two']:+.0%})"
                 if "predicted_from_two_s" in row else "")
        print(f"{row['plan']:8s} {row['processes']} processes: predicted "
              f"{row['predicted_s'] * 1e3:7.1f} ms, measured "
              f"{row['measured_s'] * 1e3:7.1f} ms ({row['error']:+.0%}){naive}")
    out = Path(args.out) / "parallel-cpu.json"
    with atomic_write(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    worst = max(abs(r["error"]) for r in result["plans"] if r["processes"] == 2)
    return 1 if args.check and worst > TOLERANCE else 0
