"""Pipeline experiments (chapters 17 and 19): every schedule by hand against
torch.distributed.pipelining, timed runs, data x pipeline parallelism on a mesh, and
the timeline plots."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                          ScheduleInterleaved1F1B,
                                          ScheduleInterleavedZeroBubble)

from llmcore.nn.loss import lm_loss
from llmcore.parallel.comm import Comm
from llmcore.parallel.ranks import rank_device
from llmcore.parallel.pipeline import (GPTStage, device_clock, run_pipeline,
                                       sync_tied_grads)
from llmcore.parallel.split_backward import defer_weight_grads

SPLIT = ("zbh1",)  # the schedules whose backward runs as B and W


def build_stages(model: nn.Module, rank: int, world_size: int, schedule: str,
                 chunks: int = 1):
    """This rank's chunks of ``model`` (virtual stages c * p + rank) and, for a
    schedule that splits the backward, the store its W's run from."""
    stages = nn.ModuleList(GPTStage(model, c * world_size + rank, world_size * chunks)
                           for c in range(chunks))
    store = defer_weight_grads(stages) if schedule in SPLIT else None
    return stages, store


def pipeline_worker(rank: int, world_size: int, model_fn, schedule: str, x, y,
                    n_micro: int, seed: int = 0, repeats: int = 1, chunks: int = 1,
                    timed: bool = False) -> dict:
    """``repeats`` steps of ``schedule`` on this rank's stages; the loss, the
    gradients of the last step (named as in the model), the payload sent, the most
    micro-batches held at once, and with ``timed`` the events of every step."""
    torch.manual_seed(seed)  # every rank builds the same model, keeps its stages
    device = rank_device()
    model = model_fn().to(device)
    x, y = x.to(device), y.to(device)
    stages, store = build_stages(model, rank, world_size, schedule, chunks)
    comm = Comm()
    act_shape = (x.shape[0] // n_micro, x.shape[1], model.config.n_embd)
    clock = device_clock(device) if timed else None
    dist.barrier()  # NCCL: every rank in the group's first collective
    runs = []
    for _ in range(repeats):
        stages.zero_grad()
        comm.stats.reset()
        out = run_pipeline(list(stages), schedule, comm, x, y, n_micro, act_shape,
                           weight_grads=store, clock=clock)
        runs.append(out["events"])
    out["loss"] = out["loss"].item()
    out["runs"] = runs  # the events of every repeat (a busy machine adds noise)
    out["stage_grads"] = {f"{c}.{n}": p.grad.clone() for c, s in enumerate(stages)
                          for n, p in s.named_parameters()}
    sync_tied_grads(model, comm)
    mine = {id(p) for p in stages.parameters()}
    out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()
                    if id(p) in mine}
    out["payload"] = dict(comm.stats.payload)
    return out


TORCH_SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B,
                   "interleaved": ScheduleInterleaved1F1B,
                   "zbh1": ScheduleInterleavedZeroBubble}


def torch_pipelining_worker(rank: int, world_size: int, model_fn, schedule: str, x, y,
                            n_micro: int, seed: int = 0, chunks: int = 1) -> dict:
    """The same step with ``torch.distributed.pipelining``: ScheduleGPipe, 1F1B,
    Interleaved1F1B, or InterleavedZeroBubble with one stage per rank (its ZB-H1)."""
    torch.manual_seed(seed)
    device = rank_device()
    model = model_fn().to(device)
    x, y = x.to(device), y.to(device)
    mods = [GPTStage(model, c * world_size + rank, world_size * chunks)
            for c in range(chunks)]
    stages = [PipelineStage(m, c * world_size + rank, world_size * chunks, device)
              for c, m in enumerate(mods)]
    cls = TORCH_SCHEDULES[schedule]
    multi = cls in (ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble)
    sched = cls(stages if multi else stages[0], n_microbatches=n_micro,
                loss_fn=lm_loss)
    losses: list = []
    last = rank == world_size - 1
    sched.step(*(x,) if rank == 0 else (), **({"target": y, "losses": losses}
                                              if last else {}))
    grads = {f"{c}.{n}": p.grad.clone() for c, m in enumerate(mods)
             for n, p in m.named_parameters()}
    loss = sum(l.item() for l in losses) / n_micro if losses else 0.0
    return {"loss": loss, "grads": grads,
            "order": _order(sched, rank, world_size)}


def _order(sched, rank: int, world_size: int) -> list[tuple] | None:
    """The actions torch's schedule planned for ``rank`` as (kind, mb, chunk), or
    None for a schedule that plans none ahead."""
    order = getattr(sched, "pipeline_order", None)
    if order is None:
        return None
    kinds = {"F": "F", "B": "B", "I": "B", "W": "W"}
    world = world_size
    return [(kinds[a.computation_type.value], a.microbatch_index,
             a.stage_index // world) for a in order[rank]
            if a is not None and a.computation_type.value in kinds]


def schedule_sweep(rank: int, world_size: int, model_fn, x, y, n_micro: int,
                   chunks: int = 2) -> dict:
    """One step of every schedule by hand and by torch.distributed.pipelining."""
    out = {}
    for s in ("gpipe", "1f1b", "interleaved", "zbh1"):
        v = chunks if s == "interleaved" else 1
        out[s] = pipeline_worker(rank, world_size, model_fn, s, x, y, n_micro,
                                 chunks=v)
        out[s]["torch"] = torch_pipelining_worker(rank, world_size, model_fn, s, x, y,
                                                  n_micro, chunks=v)
    return out


def timed_sweep(rank: int, world_size: int, model_fn, x, y, n_micro: int,
                schedules: dict, rounds: int = 3) -> dict:
    """Timed steps of each schedule ({name: chunks}), in turns so that every one
    meets the same load; the first step of each round warms up and is dropped."""
    runs: dict = {s: [] for s in schedules}
    for _ in range(rounds):
        for s, v in schedules.items():
            out = pipeline_worker(rank, world_size, model_fn, s, x, y, n_micro,
                                  repeats=2, chunks=v, timed=True)
            runs[s] += out["runs"][1:]
    return runs


def dp_pp_worker(rank: int, world_size: int, model_fn, x, y, n_micro: int,
                 seed: int = 0) -> dict:
    """Data x pipeline parallel on a (dp, 2) mesh: each row is a two-stage 1F1B
    pipeline on its share of the batch; rows average their gradients."""
    dp = world_size // 2
    device = rank_device()
    mesh = init_device_mesh(device.type, (dp, 2), mesh_dim_names=("dp", "pp"))
    row, stage_idx = mesh.get_local_rank("dp"), mesh.get_local_rank("pp")
    torch.manual_seed(seed)
    model = model_fn().to(device)
    stage = GPTStage(model, stage_idx, 2)
    pp, dp_comm = Comm(mesh.get_group("pp")), Comm(mesh.get_group("dp"))
    x, y = x.chunk(dp)[row].to(device), y.chunk(dp)[row].to(device)
    act_shape = (x.shape[0] // n_micro, x.shape[1], model.config.n_embd)
    dist.barrier()  # NCCL: every rank in the groups' first collective
    run_pipeline(stage, "1f1b", pp, x, y, n_micro, act_shape)
    sync_tied_grads(model, pp)
    for p in stage.parameters():  # the data-parallel average, within this stage
        dp_comm.all_reduce(p.grad)
        p.grad /= dp
    mine = {id(p) for p in stage.parameters()}
    return {"coords": (row, stage_idx), "sent": {"pp": dict(pp.stats.payload),
                                                  "dp": dict(dp_comm.stats.payload)},
            "grads": {n: p.grad for n, p in model.named_parameters() if id(p) in mine}}


# ------------------------------------------------- plots

COLORS = {"F": "tab:blue", "B": "tab:green", "W": "tab:orange"}


def plot_schedule(events: list[dict], ax, title: str = "") -> None:
    """A Gantt chart: one row per stage, forwards blue, backwards green, weight
    gradients orange, labelled by micro-batch; a second chunk is drawn lighter."""
    t0 = min(e["start"] for e in events)
    for e in events:
        start, width = e["start"] - t0, e["end"] - e["start"]
        ax.broken_barh([(start, width)], (e["stage"] - 0.4, 0.8),
                       facecolors=COLORS[e["kind"]], edgecolor="white",
                       alpha=1.0 if e.get("chunk", 0) == 0 else 0.55)
        ax.text(start + width / 2, e["stage"], str(e["mb"]), ha="center",
                va="center", color="white", fontsize=7)
    ax.set_yticks(sorted({e["stage"] for e in events}))
    ax.set_ylabel("rank")
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
