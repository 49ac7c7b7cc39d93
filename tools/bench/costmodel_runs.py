"""Predicted against measured step time: the runs behind ``python -m tools.bench
parallel`` and chapter 19.

One launch of two processes calibrates the model (collectives, compute, optimizer)
and times every two-process plan; a second launch of four processes times the plans
that need four, predicted from the same calibration. Each plan is the book's
hand-written implementation training a small GPT with Adam: one timed step is
zero_grad, forward, backward (with its communication) and the optimizer step, the
median of several after warm-up, on the slowest rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from book.workers.costmodel import Plan
from book.workers.steptime import OPS, Cluster, Device, step_time
from llmcore.accounting import flops_per_token
from llmcore.config import check_fields
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.parallel.comm import Comm
from llmcore.parallel.data_parallel import BucketedDataParallel
from book.workers.launch import launch
from llmcore.parallel.pipeline import GPTStage, run_pipeline, sync_tied_grads
from llmcore.parallel.tensor_parallel import apply_tensor_parallel
from llmcore.parallel.zero import ZeroDataParallel
from tools.bench.calibrate import (fit_compute, fit_link, median_times, slowest,
                                   sweep_points, sweep_steps)

# name -> (processes, layout); the pipeline runs 1F1B over MICRO micro-batches
PLANS = {"dp": (2, Plan(dp=2)), "zero1": (2, Plan(dp=2, zero=1)),
         "zero3": (2, Plan(dp=2, zero=3)), "tp": (2, Plan(tp=2)),
         "pp_1f1b": (2, Plan(pp=2, micro_batches=4)),
         "dp4": (4, Plan(dp=4)), "dp2_tp2": (4, Plan(dp=2, tp=2))}


@dataclass(frozen=True)
class BenchConfig:
    """The GPT and batch every plan trains; small enough for a 2-core CPU."""

    model: GPTConfig = field(default_factory=lambda: GPTConfig(
        vocab_size=64, block_size=64, n_layer=4, n_head=4, n_embd=128))
    batch: int = 16  # global batch (sequences of block_size tokens)
    reps: int = 7  # timed steps per plan (the median counts)
    warmup: int = 2  # untimed steps first

    def __post_init__(self):
        check_fields(self, "batch", "reps", "warmup", integer=True, above=0)


def _batch(bc: BenchConfig, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (bc.batch, bc.model.block_size)
    return (torch.randint(bc.model.vocab_size, shape, generator=g),
            torch.randint(bc.model.vocab_size, shape, generator=g))


def _plan_step(name: str, plan: Plan, bc: BenchConfig, x, y):
    """A closure running one training step of ``plan`` on this rank."""
    torch.manual_seed(0)  # same weights on every rank
    model = GPT(bc.model)
    if name == "pp_1f1b":
        stage = GPTStage(model, dist.get_rank(), 2)
        comm, m = Comm(None), plan.micro_batches
        opt = torch.optim.AdamW(stage.parameters(), lr=1e-4)
        act = (bc.batch // m, bc.model.block_size, bc.model.n_embd)

        def step():
            opt.zero_grad(set_to_none=True)
            run_pipeline(stage, "1f1b", comm, x, y, m, act)
            sync_tied_grads(model, comm)
            opt.step()
        return step
    if plan.tp > 1:
        mesh = init_device_mesh("cpu", (plan.dp, plan.tp), mesh_dim_names=("dp", "tp"))
        model = apply_tensor_parallel(model, mesh.get_group("tp"))
        dp_group, row = mesh.get_group("dp"), mesh.get_local_rank("dp")
    else:
        dp_group, row = None, dist.get_rank()
    xs, ys = x.chunk(plan.dp)[row], y.chunk(plan.dp)[row]
    if plan.zero:
        units = list(model.blocks) if plan.zero == 3 else ()
        zdp = ZeroDataParallel(model, plan.zero, units=units, lr=1e-4)

        def step():
            zdp.zero_grad()
            zdp(xs, ys)[1].backward()
            zdp.step()
        return step
    if plan.dp > 1:
        model = BucketedDataParallel(model, dp_group)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        model(xs, ys)[1].backward()
        opt.step()
    return step


def _timed(steps: dict, bc: BenchConfig, names: list) -> tuple[dict, dict]:
    """Every step's median seconds on the slowest rank, the plans' own with the
    seconds that rank waited for a core, and the share of all timed time it waited."""
    waits: dict = {}
    t = slowest(median_times(steps, bc.reps, bc.warmup, waits))
    waits = slowest(waits)
    return t, {"measured": {n: t[n] for n in names},
               "waited_s": {n: waits[n] for n in names},
               "waited": sum(waits.values()) / sum(t.values())}


def plans_worker(rank: int, world_size: int, bc: BenchConfig, names: list) -> dict:
    """The step time of each plan in ``names``, timed in turns (see :func:`_timed`)."""
    x, y = _batch(bc)
    steps = {name: _plan_step(name, PLANS[name][1], bc, x, y) for name in names}
    return _timed(steps, bc, names)[1]


def calibrate_worker(rank: int, world_size: int, bc: BenchConfig,
                     names: list) -> dict:
    """Calibration (collectives, compute at three batch sizes with every rank busy
    at once as in a run, Adam) and the step time of the plans in ``names``, all
    timed in the same rounds, so that a drifting load touches all alike. Every time
    is the slowest rank's, and beside it the seconds that rank waited for a core."""
    x, y = _batch(bc)

    def compute(b):  # a model of its own per size, like each plan
        torch.manual_seed(0)
        model = GPT(bc.model)

        def step():
            model.zero_grad(set_to_none=True)
            model(x[:b], y[:b])[1].backward()
        return step

    torch.manual_seed(0)
    params = list(GPT(bc.model).parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4)

    sizes = (bc.batch // 4, bc.batch // 2, bc.batch)
    steps = {("compute", b): compute(b) for b in sizes}
    steps.update(sweep_steps(rank, world_size))
    steps.update({name: _plan_step(name, PLANS[name][1], bc, x, y) for name in names})
    steps["adam"] = opt.step
    t, timed = _timed(steps, bc, names)
    seq = bc.model.block_size
    points = [(b * seq * flops_per_token(bc.model, seq), t["compute", b])
              for b in sizes]
    sweep = sweep_points({k: v for k, v in t.items()
                          if isinstance(k, tuple) and k[0] != "compute"})
    return {"sweep": sweep, "compute": fit_compute(points) | {"points": points},
            "adam_s_per_param": t["adam"] / sum(p.numel() for p in params),
            "n_tensors": len(params)} | timed


def cluster_from(cal: dict, cores: int, world_size: int = 2) -> Cluster:
    """The calibrated model of this machine: one link table, ``cores`` shared."""
    links = {op: fit_link(op, cal["sweep"][op], world_size) for op in OPS}
    c = cal["compute"]
    device = Device("this machine", c["flops"], c["fixed_s"], cal["adam_s_per_param"],
                    cores)
    return Cluster(device, intra=links, per_node=64)


def predict(bc: BenchConfig, cluster: Cluster, name: str, n_tensors: int) -> dict:
    """The model's step time of plan ``name``, with the implementation's message
    counts: one gradient bucket for DP, one message per tensor for ZeRO."""
    plan = PLANS[name][1]
    return step_time(bc.model, plan, bc.batch, bc.model.block_size, cluster,
                     dp_messages=n_tensors if plan.zero else None, prefetch=False)


def run(bc: BenchConfig = BenchConfig(), four: bool = True,
        names: tuple = tuple(PLANS)) -> dict:
    """Calibrate, measure and predict the plans ``names``; the results file's contents.

    One launch of two processes calibrates the model and times the two-process
    plans; a second launch times the four-process ones, which the model predicts
    from the same calibration with each rank's rate divided by processes / cores
    (:meth:`Device.slowdown`): four processes on two cores take turns.
    """
    unknown = set(names) - set(PLANS)
    if unknown:
        raise ValueError(f"unknown plans {sorted(unknown)}; choose from {list(PLANS)}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count()
    by_world = {w: [n for n in names if PLANS[n][0] == w] for w in (2, 4)}
    cal = launch(calibrate_worker, 2, bc, by_world[2], backend="gloo", threads=1,
                 wall_timeout=600)[0]
    timed = {2: cal}
    if four and by_world[4]:
        timed[4] = launch(plans_worker, 4, bc, by_world[4], backend="gloo",
                          threads=1, wall_timeout=600)[0]
    # the calibration ran two busy processes: on fewer than two cores its rate
    # already holds their slowdown, so count at least two
    cluster = cluster_from(cal, max(cores, 2))
    rows = []
    for world, res in timed.items():
        for name in by_world[world]:
            t = res["measured"][name]
            parts = predict(bc, cluster, name, cal["n_tensors"])
            rows.append({"plan": name, "processes": world,
                         "predicted_s": parts["total"], "measured_s": t,
                         "error": parts["total"] / t - 1, "parts": parts,
                         "waited_s": res["waited_s"][name]})
    keep = ("sweep", "compute", "adam_s_per_param", "n_tensors")
    return {"calibration": {k: cal[k] for k in keep}, "cores": cores, "plans": rows,
            "waited": {w: res["waited"] for w, res in timed.items()},
            "links": {op: vars(lk) for op, lk in cluster.intra.items()},
            "calibrated": vars(cluster.device)}
