"""Parallel step time, predicted and measured: ``python -m tools.bench parallel``.

Calibrates the step-time model (:mod:`book.workers.steptime`) on this machine,
times data parallel, ZeRO-1, ZeRO-3, tensor parallel, a 1F1B pipeline (2 processes)
and data parallel and data x tensor parallel (4 processes) with gloo on the CPU, and
writes both times per plan to ``results/parallel-<device>.json`` with the hardware,
the date and the torch version. ``--check`` fails when a two-process prediction is
more than 30% off.

The model predicts the step of ranks that have their cores. On a machine where other
programs run, the ranks also wait for a core, and how long depends on the plan (code
that sleeps on messages is treated differently from code that computes without a
break), so the measured times rank the plans by the load, not by their work. The
benchmark reports how much of the timed time the ranks waited (``waited``) and warns;
``--realtime`` (root or CAP_SYS_NICE) runs the ranks under round-robin real-time
scheduling, ahead of every ordinary process, which gives them the cores of an idle
machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

from llmcore.io import atomic_write
from llmcore.runtime import cpu_name
from tools.bench.costmodel_runs import BenchConfig, run

TOLERANCE = 0.30  # the largest relative error allowed for a two-process plan
LOADED = 0.10  # two ranks waiting for a core longer than this share: a loaded machine


def realtime() -> str:
    """Schedule this process round-robin real-time at the lowest priority; the ranks
    inherit it through the fork server that the first launch starts (so call this
    before it). Returns the policy obtained, by name."""
    try:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
    except (AttributeError, OSError) as e:  # not Linux, or not permitted
        print(f"--realtime: {e}; the ranks run at normal priority", file=sys.stderr)
        return "normal"
    return "SCHED_RR"


def hardware() -> str:
    """The CPU's model name and core count (what the processes share)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count()
    return f"{cpu_name()}, {cores} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench parallel",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results", help="folder of the JSON file")
    parser.add_argument("--reps", type=int, default=BenchConfig.reps,
                        help="timed steps per plan (median)")
    parser.add_argument("--no-four", action="store_true",
                        help="skip the four-process plans")
    parser.add_argument("--realtime", action="store_true",
                        help="run the ranks ahead of every other process (needs root "
                        "or CAP_SYS_NICE; for a machine other programs load)")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 if a 2-process plan is off by > "
                        f"{TOLERANCE * 100:.0f}%%")
    args = parser.parse_args(argv)
    policy = realtime() if args.realtime else "normal"
    result = run(BenchConfig(reps=args.reps), four=not args.no_four)
    result.update({
        "device": hardware(), "backend": "gloo", "torch": torch.__version__,
        "scheduling": policy,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")})
    for row in result["plans"]:
        print(f"{row['plan']:8s} {row['processes']} processes: predicted "
              f"{row['predicted_s'] * 1e3:7.1f} ms, measured "
              f"{row['measured_s'] * 1e3:7.1f} ms ({row['error']:+.0%}), "
              f"waited for a core {row['waited_s'] * 1e3:5.1f} ms")
    for world, share in result["waited"].items():
        print(f"{world} processes waited for a core {share:.0%} of the timed time")
    if result["waited"][2] > LOADED:
        print("warning: with two processes on this machine's cores the ranks waited "
              "for a core: other programs load it, and the measured times depend on "
              "that load; run on an idle machine or with --realtime", file=sys.stderr)
    out = Path(args.out) / "parallel-cpu.json"
    with atomic_write(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    worst = max(abs(r["error"]) for r in result["plans"] if r["processes"] == 2)
    return 1 if args.check and worst > TOLERANCE else 0
