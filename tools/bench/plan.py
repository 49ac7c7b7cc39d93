"""An honest plan of the gpu tier for every device class, made on the CPU.

``python -m tools.bench plan --gpu {t4,l4,a100-40gb,a100-80gb,h100,h200} [--json F]``
lists, for every notebook and benchmark, the precision it will use on that class,
its peak memory and its estimated minutes, and for ``make test-gpu`` the planned wall
time with its notebook kernels in parallel.

Memory of a training workload (:mod:`tools.bench.presets` finds them), by part:

* the training state: the loop keeps fp32 weights, fp32 gradients and AdamW's two
  fp32 moments, 16 bytes per parameter, plus under autocast the 16-bit copies of the
  weights it caches for the forward (2 bytes per parameter);
* the activations the blocks keep for the backward, in the precision's bytes, for
  the attention kernel the preset uses (``book.workers.activations``: with the
  hand-written kernel the T x T scores too);
* the logits and their gradient: 8 bytes per element in fp32, 16 under autocast
  (16-bit logits, their fp32 copy for the loss, the fp32 softmax and gradient);
* the CUDA context, cuBLAS workspaces and allocator slack: 1 GiB.

Time: the matmul FLOPs (``llmcore.accounting.flops_per_token``) at the class's
datasheet peak in the precision, times a utilisation calibrated on measured runs:
nanoGPT's GPT-2 124M at 12 x 1024 tokens on one H200 (torch 2.11) trained at 480k
tokens/s in bf16 compiled, 385k in bf16 eager, 162k in TF32 and 53k in fp32, which is
41%, 33%, 28% and 68% of the H200's dense datasheet peaks (the H100 SXM's: 989, 495
and 67 TFLOP/s). fp16 is taken as bf16. No step takes less than its kernel launches
(about 50 per layer and 30 more, 10 microseconds each, a third of that compiled),
which is what limits small models. Evaluation costs a third of a training step per
batch; compilation 45 seconds per compiled model; a notebook 15 seconds for its
kernel, imports, data and plots. A precision the class has no tensor cores for (bf16
on a T4) runs at half its fp32 rate and is flagged. The estimate is a plan, not a
measurement: ``make test-gpu`` measures, and the plan is held to its limits by
``tests/test_gpu_plan.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from book.workers.activations import block_activation_bytes
from book.workers.memory import gpt_param_count
from llmcore.accounting import flops_per_token
from llmcore.models.gpt import GPTConfig
from llmcore.runtime import GiB, fit_memory
from tools.bench.gpus import DEVICE_CLASSES, GPU_BUDGET_GB, DeviceClass
from tools.bench.presets import Workload, library_presets, notebook_workloads
from tools.notebooks import find_root, notebooks

CUDA_CONTEXT = 1 * GiB
GPT2 = GPTConfig(50304, 1024, 12, 12, 768)  # the anchor runs' model
ANCHOR_PEAKS = {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 67.0e12}  # H200 = H100
ANCHOR_TOKENS_PER_S = {"bf16+compile": 480e3, "bf16": 385e3, "tf32": 162e3,
                       "fp32": 53e3}  # nanoGPT 124M, 12 x 1024, one H200
LAUNCH_S = 10e-6  # one kernel launch
COMPILE_S = 45.0  # compiling one model
NOTEBOOK_S = 15.0  # a kernel's start, imports, data, plots
LIMITS = {"t4": {"gib": 15.0, "minutes": 5.0}}  # what every page must fit on a T4
CHECK_MINUTES = 8.0  # make test-gpu on one H100


def utilisation(precision: str, compiled: bool) -> float:
    """The share of the datasheet peak the anchor runs reached in ``precision``."""
    key = "bf16" if precision == "fp16" else precision
    if key == "bf16" and compiled:
        key = "bf16+compile"
    base = "bf16" if key.startswith("bf16") else key
    achieved = ANCHOR_TOKENS_PER_S[key] * flops_per_token(GPT2)
    return achieved / ANCHOR_PEAKS[base]


def precision_of(w: Workload, dc: DeviceClass) -> str:
    """The precision ``w`` trains in on ``dc``: its own, or the class's ("auto")."""
    return dc.precision if w.precision in (None, "auto", "half") else w.precision


def memory(w: Workload, dc: DeviceClass) -> dict[str, float]:
    """Training bytes of ``w`` on ``dc``, by part (see the module docstring)."""
    precision = precision_of(w, dc)
    half = precision in ("bf16", "fp16")
    cfg = GPTConfig(w.vocab_size, w.context, w.n_layer,
                    w.n_head if w.n_embd % w.n_head == 0 else 1, w.n_embd)
    params = gpt_param_count(w.n_layer, w.n_embd, w.vocab_size, w.context,
                             bias=cfg.bias)
    tokens = w.context * w.batch
    per_token = block_activation_bytes(w.n_embd, cfg.n_head, w.context,
                                       dtype_bytes=2 if half else 4,
                                       fused_attention=w.fused_attention,
                                       stats_bytes=4)
    return {"params": params, "state": params * (18 if half else 16),
            "activations": w.n_layer * tokens * per_token if w.steps else 0,
            "logits": tokens * w.vocab_size * (16 if half else 8) if w.steps else 0,
            "cuda": CUDA_CONTEXT}


def peak_gib(w: Workload, dc: DeviceClass) -> float:
    parts = memory(w, dc)
    return sum(v for k, v in parts.items() if k != "params") / GiB


def seconds(w: Workload, dc: DeviceClass) -> float:
    """Estimated seconds of ``w`` on ``dc``: training, evaluation, compilation."""
    precision = precision_of(w, dc)
    cfg = GPTConfig(w.vocab_size, w.context, w.n_layer, 1, w.n_embd)
    if precision in dc.peak_tflops:
        rate = dc.peak_tflops[precision] * 1e12 * utilisation(precision, w.compile)
    else:  # no tensor cores for it: emulated, slower than fp32
        rate = 0.5 * dc.peak_tflops["fp32"] * 1e12 * utilisation("fp32", False)
    step_flops = flops_per_token(cfg) * w.batch * w.context
    launches = (50 * w.n_layer + 30) * LAUNCH_S / (3 if w.compile else 1)
    step = max(step_flops / rate, launches)
    evals = (w.steps // w.eval_interval if w.eval_interval else 1) if w.steps else 0
    evaluation = evals * w.eval_steps * max(step / 3, launches / 3)
    return w.steps * step + evaluation + (COMPILE_S if w.compile else 0.0)


def chosen(rows: list[Workload], dc: DeviceClass) -> list[Workload]:
    """The workloads a page runs on ``dc``: of each ``rt.fit`` group, the option the
    runtime picks for the class's memory (``fit_memory``); every other preset."""
    caps = dc.caps
    groups: dict[str, dict[float, list[Workload]]] = {}
    plain = []
    for w in rows:
        if w.budget_gb is None:
            plain.append(w)
        else:
            base = w.source.rsplit("[", 1)[0]
            groups.setdefault(base, {}).setdefault(w.budget_gb, []).append(w)
    for options in groups.values():
        plain += fit_memory(options, caps)  # the rule rt.fit applies on the device
    return plain


def entry(name: str, rows: list[Workload], dc: DeviceClass) -> dict:
    """The plan of one notebook or benchmark on ``dc``."""
    runs = chosen(rows, dc)  # one per model trained (collect counts an object once)
    precisions = sorted({precision_of(w, dc) for w in runs if w.steps}) or [
        dc.precision]
    over = [f"{w.source}: {peak_gib(w, dc):.1f} GiB > {w.budget_gb or dc.usable_gib}"
            f" GiB" for w in runs if peak_gib(w, dc) > (w.budget_gb or dc.usable_gib)]
    return {"path": name, "precision": "+".join(precisions),
            "peak_gib": round(max([peak_gib(w, dc) for w in runs] or [0.0]), 2),
            "minutes": round((NOTEBOOK_S + sum(seconds(w, dc) for w in runs)) / 60, 2),
            "workloads": [w.source for w in runs], "over_budget": over}


def notebook_plans(dc: DeviceClass, root: Path) -> tuple[list[dict], dict]:
    """One entry per notebook; and, per notebook, preset cells that failed to import
    (a moved import hides a page's presets: that is an error, not a pass)."""
    out, broken = [], {}
    for path in notebooks(root=root):
        found, failed = notebook_workloads(path, root)
        rel = str(path.relative_to(root))
        bad = [f"line {line}: {err}" for line, err in failed
               if err.startswith(("ImportError", "ModuleNotFoundError"))]
        if bad:
            broken[rel] = bad
        if "speed.ladder(" in path.read_text(encoding="utf-8"):
            # a page that measures the speed ladder live runs its uncompiled rungs,
            # at speed.page_preset's size
            from tools.bench import speed
            found += [w for w in ladder_workloads(speed.page_preset(), dc)
                      if not w.compile]
        out.append(entry(rel, found, dc))
    return out, broken


def gpt(source, cfg, batch, steps, precision, fused=True, compiled=False) -> Workload:
    """A GPT of ``cfg`` trained ``steps`` steps of ``batch`` sequences."""
    return Workload(source, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size,
                    cfg.block_size, batch, steps, None, precision, fused, compiled)


def ladder_workloads(p, dc: DeviceClass) -> list[Workload]:
    """The speed ladder's rungs at preset ``p`` that ``dc`` can run."""
    from tools.bench import speed

    return [gpt(f"speed:{r.name}", p.model, p.batch_size, p.warmup + p.steps,
                r.precision, r.sdpa, r.compile) for r in speed.LADDER
            if r.precision != "tf32" or dc.capability >= (8, 0)]


def benchmark_workloads(dc: DeviceClass) -> dict[str, list[Workload]]:
    """What each benchmark of ``make test-gpu`` trains on ``dc``, from its presets
    (the option its memory picks): the speed ladder (each rung its precision, kernel
    and compilation), the MFU run, and the FP8 benchmark's bf16 and FP8 runs."""
    from tools.bench import fp8, mfu, speed

    m = chosen_option(mfu.PRESETS.gpu, dc)
    runs = {"tools.bench.speed": ladder_workloads(chosen_option(speed.PRESETS.gpu, dc),
                                                  dc),
            "tools.bench.mfu": [gpt("mfu", m.model, m.batch_size, m.steps + 3,
                                    "bf16")]}
    e2e = []
    for spec in chosen_option(fp8.GPU_MODELS, dc):
        cfg = GPTConfig(spec.vocab_size, spec.block_size, spec.n_layer, spec.n_head,
                        spec.n_embd)
        e2e += [gpt(f"fp8:{spec.name} {kind}", cfg, spec.batch_size, fp8.E2E_STEPS,
                    "bf16", compiled=True) for kind in ("bf16", "fp8")]
    runs["tools.bench.fp8"] = e2e if dc.capability >= (8, 9) else []
    return runs


def chosen_option(options: dict, dc: DeviceClass):
    """The option of ``{GiB: preset}`` that ``rt.fit`` picks on ``dc``."""
    return fit_memory(options, dc.caps)


def benchmark_plans(dc: DeviceClass) -> list[dict]:
    """The benchmarks ``make test-gpu`` runs, and the command line's own presets
    (planned, not run by the check)."""
    out = [entry(name, rows, dc) for name, rows in benchmark_workloads(dc).items()]
    out.append(entry("llmcore.train (CLI presets)", library_presets(), dc))
    return out


def kernels(dc: DeviceClass, notebook_rows: list[dict]) -> int:
    """Notebook kernels ``make test-gpu`` runs at once on ``dc``: as many as fit its
    memory at the largest page's planned peak (no page may plan more than
    ``GPU_BUDGET_GB``), at most 8."""
    peak = max([r["peak_gib"] for r in notebook_rows] + [1.0])
    return max(1, min(8, int(dc.usable_gib // min(peak, GPU_BUDGET_GB))))


def check_wall(notebook_rows: list[dict], bench_rows: list[dict],
               dc: DeviceClass) -> dict:
    """``make test-gpu``'s planned wall time: the unit tests, the notebooks on
    ``kernels`` kernels (longest first, each to the kernel free soonest), then the
    benchmarks one after another."""
    jobs = kernels(dc, notebook_rows)
    busy = [0.0] * jobs  # minutes of notebooks on each kernel
    for m in sorted((r["minutes"] for r in notebook_rows), reverse=True):
        busy[busy.index(min(busy))] += m
    unit = 1.5
    benches = sum(r["minutes"] for r in bench_rows
                  if r["path"] != "llmcore.train (CLI presets)")
    return {"jobs": jobs, "unit_minutes": unit, "notebook_minutes": max(busy),
            "benchmark_minutes": round(benches, 2),
            "check_minutes": round(unit + max(busy) + benches, 2)}


def plan(gpu: str, root: Path | None = None) -> dict:
    """The whole plan for device class ``gpu``, as ``--json`` writes it."""
    if gpu not in DEVICE_CLASSES:
        raise ValueError(f"--gpu must be one of {sorted(DEVICE_CLASSES)}, got {gpu!r}")
    dc = DEVICE_CLASSES[gpu]
    root = find_root(root)
    nb, broken = notebook_plans(dc, root)
    benches = benchmark_plans(dc)
    wall = check_wall(nb, benches, dc)
    return {"gpu": gpu, "memory_gib": dc.usable_gib, "precision": dc.precision,
            "peaks_tflops": dc.peak_tflops, "notebooks": nb, "benchmarks": benches,
            **wall, "broken_preset_cells": broken,
            "model": "tools/bench/plan.py (see its docstring)"}


def violations(p: dict) -> list[str]:
    """What breaks the limits: any workload over the memory it may use; on a T4 a
    notebook over 15 GiB or 5 minutes or in bf16; on an H100 a check over 8 minutes;
    a notebook whose preset cells no longer import."""
    bad = [line for row in p["notebooks"] + p["benchmarks"]
           for line in row["over_budget"]]
    limits = LIMITS.get(p["gpu"], {})
    for row in p["notebooks"]:
        if row["peak_gib"] > limits.get("gib", float("inf")):
            bad.append(f"{row['path']}: {row['peak_gib']} GiB > {limits['gib']} GiB")
        if row["minutes"] > limits.get("minutes", float("inf")):
            bad.append(f"{row['path']}: {row['minutes']} min > {limits['minutes']}")
        if p["gpu"] == "t4" and "bf16" in row["precision"]:
            bad.append(f"{row['path']}: bf16 on a T4 (no bf16 tensor cores)")
    if p["gpu"] == "h100" and p["check_minutes"] > CHECK_MINUTES:
        bad.append(f"make test-gpu: {p['check_minutes']} min > {CHECK_MINUTES}")
    bad += [f"{k}: {v}" for k, v in p["broken_preset_cells"].items()]
    return bad


def table(p: dict) -> str:
    lines = [f"plan for {p['gpu']} ({p['memory_gib']} GiB, {p['precision']}):",
             f"{'notebook / benchmark':44s} {'precision':>10s} {'GiB':>6s} "
             f"{'min':>6s}"]
    for row in p["notebooks"] + p["benchmarks"]:
        lines.append(f"{row['path'][-44:]:44s} {row['precision']:>10s} "
                     f"{row['peak_gib']:6.1f} {row['minutes']:6.2f}")
    lines.append(f"make test-gpu: {p['check_minutes']} min ({p['jobs']} notebook "
                 f"kernels; notebooks {p['notebook_minutes']:.2f}, benchmarks "
                 f"{p['benchmark_minutes']:.2f}, unit tests {p['unit_minutes']})")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench plan",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", choices=sorted(DEVICE_CLASSES), default="h100")
    ap.add_argument("--json", metavar="PATH", default=None)
    args = ap.parse_args(argv)
    p = plan(args.gpu)
    print(table(p))
    bad = violations(p)
    for line in bad:
        print("over the limit:", line, file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(p, indent=1) + "\n")
    return 1 if bad else 0

