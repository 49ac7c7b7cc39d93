"""Pipeline experiments: GPipe and 1F1B by hand against torch.distributed.pipelining,
and data x pipeline parallelism on a mesh (chapters 17 and 19)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from llmcore.nn.loss import lm_loss
from llmcore.parallel.comm import Comm
from llmcore.parallel.launch import rank_device
from llmcore.parallel.pipeline import GPTStage, run_pipeline, sync_tied_grads


def pipeline_worker(rank: int, world_size: int, model_fn, schedule: str, x, y,
                    n_micro: int, seed: int = 0, repeats: int = 1) -> dict:
    """``repeats`` steps of ``schedule`` on this rank's stage, on its device;
    gradients (of the last step) named as in the model, the timed events of every
    step."""
    torch.manual_seed(seed)  # every rank builds the same model, keeps its stage
    device = rank_device()
    model = model_fn().to(device)
    x, y = x.to(device), y.to(device)
    stage = GPTStage(model, rank, world_size)
    comm = Comm()
    act_shape = (x.shape[0] // n_micro, x.shape[1], model.config.n_embd)
    runs = []
    for _ in range(repeats):
        stage.zero_grad()
        comm.stats.reset()
        out = run_pipeline(stage, schedule, comm, x, y, n_micro, act_shape)
        runs.append(out["events"])
    out["runs"] = runs  # the events of every repeat (a busy machine adds noise)
    out["stage_grads"] = {n: p.grad.clone() for n, p in stage.named_parameters()}
    sync_tied_grads(model, comm)
    mine = {id(p) for p in stage.parameters()}
    out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()
                    if id(p) in mine}
    out["payload"] = dict(comm.stats.payload)
    return out


def torch_pipelining_worker(rank: int, world_size: int, model_fn, schedule: str, x, y,
                            n_micro: int, seed: int = 0) -> dict:
    """The same step with ``torch.distributed.pipelining`` (ScheduleGPipe/1F1B)."""
    torch.manual_seed(seed)
    device = rank_device()
    model = model_fn().to(device)
    x, y = x.to(device), y.to(device)
    stage_mod = GPTStage(model, rank, world_size)
    stage = PipelineStage(stage_mod, rank, world_size, device)
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    sched = cls(stage, n_microbatches=n_micro, loss_fn=lm_loss)
    losses: list = []
    if rank == 0:
        sched.step(x)
    elif rank == world_size - 1:
        sched.step(target=y, losses=losses)
    else:
        sched.step()
    grads = {n: p.grad.clone() for n, p in stage_mod.named_parameters()}
    loss = sum(l.item() for l in losses) / n_micro if losses else 0.0
    return {"loss": loss, "grads": grads}


def pipeline_sweep(rank: int, world_size: int, model_fn, x, y, n_micro: int) -> dict:
    """GPipe and 1F1B by hand, and 1F1B by torch.distributed.pipelining."""
    out = {s: pipeline_worker(rank, world_size, model_fn, s, x, y, n_micro)
           for s in ("gpipe", "1f1b")}
    out["torch"] = torch_pipelining_worker(rank, world_size, model_fn, "1f1b", x, y,
                                           n_micro)
    return out


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
    comm = Comm(mesh.get_group("pp"))
    x, y = x.chunk(dp)[row].to(device), y.chunk(dp)[row].to(device)
    act_shape = (x.shape[0] // n_micro, x.shape[1], model.config.n_embd)
    run_pipeline(stage, "1f1b", comm, x, y, n_micro, act_shape)
    sync_tied_grads(model, comm)
    for p in stage.parameters():  # the data-parallel average, within this stage
        dist.all_reduce(p.grad, group=mesh.get_group("dp"))
        p.grad /= dp
    mine = {id(p) for p in stage.parameters()}
    return {"coords": (row, stage_idx),
            "grads": {n: p.grad for n, p in model.named_parameters() if id(p) in mine}}
