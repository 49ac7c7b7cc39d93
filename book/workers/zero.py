"""ZeRO stages by hand and PyTorch's FSDP2, trained side by side (chapter 15)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from book.workers.common import local_batches, plain_config, replay, units_of
from llmcore.parallel.comm import nbytes
from llmcore.parallel.launch import rank_device
from llmcore.parallel.rng import rank_seed
from llmcore.parallel.zero import ZeroDataParallel
from llmcore.train import train


def zero_worker(rank: int, world_size: int, model_fn, stage: int, data,
                param_dtype: torch.dtype = torch.float32, units: str = "",
                lr: float = 1e-2, seed: int = 0) -> dict:
    """Train with ZeRO ``stage`` through the book's loop on this rank's device;
    return weights (on the CPU), state bytes and payload per step."""
    torch.manual_seed(rank_seed(seed, rank))  # differs on purpose: broadcast fixes it
    device = rank_device()
    model = model_fn().to(device)
    z = ZeroDataParallel(model, stage, units=units_of(model, units),
                         param_dtype=param_dtype)
    opt = z.make_optimizer(torch.optim.Adam, lr=lr)
    memory = {}
    # after backward, before the update: the largest the state gets
    opt.register_step_pre_hook(lambda *args: memory.update(z.state_bytes()))
    z.comm.stats.reset()  # count the training steps only, not the initial broadcast
    steps = len(data[0])
    train(z, replay(data, rank, world_size), plain_config(steps), optimizer=opt,
          dp_group=dist.group.WORLD)
    payload = {k: v / steps for k, v in z.comm.stats.payload.items()}
    n = sum(p.numel() for p in z.params)
    return {"params": z.full_parameters(), "memory": memory, "numel": n,
            "payload_per_step": payload}


def fsdp_worker(rank: int, world_size: int, model_fn, data, units: str = "",
                lr: float = 1e-2, seed: int = 0) -> dict:
    """The same training with PyTorch's FSDP2 ``fully_shard`` (fp32)."""
    # FSDP2 warns about modules that return views; our models never modify them.
    warnings.filterwarnings("ignore", message=".*returned a view tensor")
    torch.manual_seed(seed)  # fully_shard keeps each rank's own values: start equal
    device = rank_device()
    model = model_fn().to(device)
    # An explicit mesh on the rank's device: FSDP2's default mesh is on the GPU
    # whenever one exists, also for CPU ranks under gloo.
    mesh = init_device_mesh(device.type, (world_size,))
    for u in units_of(model, units):
        fully_shard(u, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for x, y in local_batches(data, rank, world_size, device):
        _, loss = model(x, y)
        loss.backward()
        local = [p.to_local() for p in model.parameters()]
        memory = {"params": sum(nbytes(t) for t in local),
                  "grads": sum(nbytes(p.grad.to_local()) for p in model.parameters()),
                  "optimizer": sum(nbytes(t.to_local()) for s in opt.state.values()
                                   for t in s.values() if t.dim() > 0)}
        opt.step()
        opt.zero_grad()
    full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    return {"params": full, "memory": memory}


def zero_sweep(rank: int, world_size: int, model_fn, data, units: str = "",
               lr: float = 1e-2) -> dict:
    """Every stage in fp32 (for parity), every stage in bf16 (for memory), and FSDP2."""
    out = {s: zero_worker(rank, world_size, model_fn, s, data, units=units, lr=lr)
           for s in (0, 1, 2, 3)}
    out["bf16"] = {s: zero_worker(rank, world_size, model_fn, s, data, torch.bfloat16,
                                  units, lr)["memory"] for s in (0, 1, 2, 3)}
    out["fsdp"] = fsdp_worker(rank, world_size, model_fn, data, units, lr)
    return out
