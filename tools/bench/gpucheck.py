"""``make test-gpu``: the whole gpu tier on one CUDA GPU, in one command, in minutes.

Three stages, each in its own processes, all within one time budget (8 minutes by
default, the length of a short GPU slot):

1. the unit tests marked ``gpu`` (``pytest -m gpu``);
2. every notebook of the book and the labs at ``LLMCORE_TIER=gpu`` under nbval, several
   kernels at once sharing the GPU (``--jobs``: as many as its memory holds at the
   largest page's planned peak, ``tools.bench.plan``, at most 8);
3. the benchmarks (``python -m tools.bench NAME``), each writing its own JSON.

It writes ``results/gpu-check-<gpu>.json``: per-notebook pass/fail and seconds, the
GPU's name, capability and memory, torch and CUDA versions, date and commit. Without a
CUDA GPU it stops at once. Run it as ``make test-gpu`` (or ``make test-gpu PY=python3``
with an interpreter that already has torch and the notebook tool chain).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from llmcore.runtime import device_caps
from tools.bench import plan
from tools.bench.gpus import GPU_BUDGET_GB, device_class
from tools.bench.results import results_dir, slug
from tools.notebooks import find_root, notebooks

# The GPU benchmarks, each writing results/<name>-<gpu>...json; `parallel` measures
# CPU processes and is run on CPUs only, so a GPU host never rewrites its CPU file.
BENCHMARKS = ("speed", "fp8", "mfu")
NO_GPU = ("make test-gpu needs a CUDA GPU, and torch {torch} sees none "
          "(CUDA build: {cuda}). Run it on a machine with an NVIDIA GPU; on this one, "
          "`make test` runs the cpu tier.")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench gpucheck",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=480.0,
                   help="seconds for the whole run (default 480: 8 minutes)")
    p.add_argument("--jobs", type=int, default=None,
                   help="notebook kernels at once on the GPU (default: one per "
                        f"{GPU_BUDGET_GB} GiB of its memory, at most 8)")
    p.add_argument("--cell-timeout", type=int, default=300)
    p.add_argument("--commit", default="unknown", help="the commit under test")
    p.add_argument("--benchmarks", nargs="*", default=list(BENCHMARKS))
    p.add_argument("--root", default=None, help="the book's repository (default: cwd)")
    args = p.parse_args(argv)
    if args.budget <= 0 or (args.jobs is not None and args.jobs < 1):
        p.error("--budget must be > 0 and --jobs >= 1")
    return args


def default_signals() -> None:
    """In the child: SIGINT and SIGTERM back to their defaults (a parent that ignores
    them, as a test runner's worker may, would otherwise pass that on)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_stage(cmd: list[str], timeout: float, env: dict | None = None,
              cwd: Path | None = None, grace: float = 15.0) -> tuple[int, float]:
    """Run ``cmd``; past ``timeout`` interrupt its process group (SIGINT, so pytest
    still reports), after ``grace`` seconds terminate it, then kill it.
    Returns (exit status, seconds); status 124 means it ran out of time."""
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True,
                            preexec_fn=default_signals)
    try:
        return proc.wait(timeout=max(timeout, 1)), time.perf_counter() - start
    except subprocess.TimeoutExpired:
        pass
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
            break
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()
    return 124, time.perf_counter() - start


def notebook_report(times_file: Path, root: Path) -> dict[str, dict]:
    """Per notebook: passed / failed / not run, and its kernel seconds."""
    data = {"seconds": {}, "failed": []}
    if times_file.is_file():
        data = json.loads(times_file.read_text())
    report = {}
    for path in notebooks(root=root):
        rel = str(path.relative_to(root))
        secs = data["seconds"].get(rel)
        status = ("not run" if secs is None else
                  "failed" if rel in data["failed"] else "passed")
        report[rel] = {"status": status, "seconds": round(secs or 0.0, 1)}
    return report


def environment(commit: str) -> dict:
    caps = device_caps("cuda")
    return {
        "gpu": caps.name, "capability": list(caps.capability or ()),
        "memory_gib": round(caps.memory_gb, 1), "multiprocessors": caps.multiprocessors,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "commit": commit, "caps": asdict(caps),
    }


def main(argv: list[str]) -> int:
    args = parse(argv)
    if not torch.cuda.is_available():
        print(NO_GPU.format(torch=torch.__version__, cuda=torch.version.cuda),
              file=sys.stderr)
        return 3
    root = find_root(args.root)
    out_dir = results_dir(root)
    out_dir.mkdir(exist_ok=True)
    deadline = time.perf_counter() + args.budget
    # Every gpu-tier page plans at most GPU_BUDGET_GB (tests/test_gpu_plan.py): as
    # many kernels share the GPU as its memory holds at the largest page's planned
    # peak (plan.kernels); a GPU of no planned class, one per GPU_BUDGET_GB.
    caps = device_caps("cuda")
    dc = device_class(caps)
    if args.jobs is None:
        args.jobs = (plan.kernels(dc, plan.notebook_plans(dc, root)[0]) if dc else
                     max(1, min(8, int(caps.memory_gb // GPU_BUDGET_GB))))
    env = dict(os.environ, LLMCORE_TIER="gpu", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // args.jobs)))
    record = environment(args.commit)
    record["budget_seconds"] = args.budget
    record["jobs"] = args.jobs
    py = [sys.executable, "-m"]

    # 1. Unit tests marked gpu (pytest exit 5: none collected, not a failure).
    rc, secs = run_stage(py + ["pytest", "-q", "-m", "gpu", "tests"],
                         min(90, deadline - time.perf_counter()), env, root)
    record["unit_tests"] = {"exit_status": rc, "passed": rc in (0, 5),
                            "seconds": round(secs, 1)}

    # 2. Every notebook at the gpu tier, in parallel; leave time for the benchmarks.
    with tempfile.TemporaryDirectory() as tmp:
        times = Path(tmp) / "times.json"
        nb_budget = 0.7 * (deadline - time.perf_counter())
        rc, secs = run_stage(
            py + ["pytest", "-q", "-n", str(args.jobs), "--dist", "loadfile",
                  "--nbval-lax", "--nbval-current-env",
                  f"--nbval-cell-timeout={args.cell_timeout}", "--nb-times", str(times),
                  "book", "labs"], nb_budget, env, root)
        record["notebooks"] = notebook_report(times, root)
    record["notebooks_seconds"] = round(secs, 1)
    record["notebooks_exit_status"] = rc

    # 3. The benchmarks that exist, sharing what time is left.
    from_pkg = Path(__file__).resolve().parent
    record["benchmarks"] = {}
    todo = list(args.benchmarks)
    for i, name in enumerate(todo):
        if not (from_pkg / f"{name}.py").is_file():
            print(f"benchmark {name!r}: tools/bench/{name}.py does not exist; "
                  "skipped", flush=True)
            record["benchmarks"][name] = {"status": "missing"}
            continue
        share = (deadline - time.perf_counter()) / (len(todo) - i)
        rc, secs = run_stage(py + ["tools.bench", name], share, env, root)
        status = {0: "passed", 124: "timed out"}.get(rc, f"failed (exit {rc})")
        record["benchmarks"][name] = {"status": status, "seconds": round(secs, 1)}

    nb = record["notebooks"]
    ok = (record["unit_tests"]["passed"] and nb
          and all(v["status"] == "passed" for v in nb.values())
          and all(v["status"] in ("passed", "missing")
                  for v in record["benchmarks"].values()))
    record["total_seconds"] = round(args.budget - (deadline - time.perf_counter()), 1)
    record["passed"] = bool(ok)
    out = out_dir / f"gpu-check-{slug(record['gpu'])}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    failed = [k for k, v in nb.items() if v["status"] != "passed"]
    print(f"{sum(v['status'] == 'passed' for v in nb.values())}/{len(nb)} notebooks "
          f"passed in {record['notebooks_seconds']} s; not passed: {failed or 'none'}; "
          f"total {record['total_seconds']} s -> {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
