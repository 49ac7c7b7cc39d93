"""ZeRO stages by hand and PyTorch's FSDP2, trained side by side through the book's
loop (chapter 15)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from book.workers.common import plain_config, replay, units_of
from book.workers.data import global_losses
from llmcore.parallel.comm import nbytes
from llmcore.parallel.ranks import rank_device
from llmcore.parallel.rng import rank_seed
from llmcore.parallel.zero import ZeroDataParallel
from llmcore.train import train


def zero_worker(rank: int, world_size: int, model_fn, stage: int, data,
                param_dtype: torch.dtype = torch.float32, units: str = "",
                lr: float = 1e-2, seed: int = 0, **comm_formats) -> dict:
    """Train with ZeRO ``stage`` through the book's loop on this rank's device;
    return weights (on the CPU), the state bytes each rank held, the payload per
    step and collective, the messages per step and the loss of the whole batch per
    step. ``comm_formats``: ``gather_format`` and ``reduce_format`` (8-bit
    communication)."""
    torch.manual_seed(rank_seed(seed, rank))  # differs on purpose: broadcast fixes it
    device = rank_device()
    model = model_fn().to(device)
    z = ZeroDataParallel(model, stage, units=units_of(model, units),
                         param_dtype=param_dtype, **comm_formats)
    opt = z.make_optimizer(torch.optim.Adam, lr=lr)
    memory = {}
    # after backward, before the update: the largest the state gets
    opt.register_step_pre_hook(lambda *args: memory.update(z.state_bytes()))
    z.comm.stats.reset()  # count the training steps only, not the initial broadcast
    steps = len(data[0])
    history = train(z, replay(data, rank, world_size), plain_config(steps),
                    optimizer=opt, dp_group=dist.group.WORLD)
    payload = {k: v / steps for k, v in z.comm.stats.payload.items()}
    calls = {k: v / steps for k, v in z.comm.stats.calls.items()}
    n = sum(p.numel() for p in z.params)
    return {"params": z.full_parameters(), "memory": memory, "numel": n,
            "payload_per_step": payload, "calls_per_step": calls,
            "losses": global_losses(history.loss, device)}


def fsdp_worker(rank: int, world_size: int, model_fn, data, units: str = "",
                lr: float = 1e-2, seed: int = 0,
                reshard_after_forward: bool = True) -> dict:
    """The same training with PyTorch's FSDP2 ``fully_shard`` (fp32), through the
    book's loop. ``reshard_after_forward=False`` keeps each unit's gathered weights
    from its forward to its backward (ZeRO-2's communication); ``gathered`` says,
    per step, whether the first unit's weights were whole after the forward."""
    # FSDP2 warns about modules that return views; our models never modify them.
    warnings.filterwarnings("ignore", message=".*returned a view tensor")
    torch.manual_seed(seed)  # fully_shard keeps each rank's own values: start equal
    device = rank_device()
    model = model_fn().to(device)
    # An explicit mesh on the rank's device: FSDP2's default mesh is on the GPU
    # whenever one exists, also for CPU ranks under gloo.
    mesh = init_device_mesh(device.type, (world_size,))
    blocks = units_of(model, units)
    for u in blocks:
        fully_shard(u, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    memory, gathered = {}, []

    def measure(*args):  # after backward, before the update
        local = [p.to_local() for p in model.parameters()]
        memory.update(
            params=sum(nbytes(t) for t in local),
            grads=sum(nbytes(p.grad.to_local()) for p in model.parameters()),
            optimizer=sum(nbytes(t.to_local()) for s in opt.state.values()
                          for t in s.values() if t.dim() > 0))
    opt.register_step_post_hook(measure)  # Adam's moments exist after its step

    def whole_after_forward(module, args, output):  # a DTensor: still sharded
        gathered.append(not isinstance(next(module.parameters()), DTensor))
    if blocks:
        blocks[0].register_forward_hook(whole_after_forward)
    history = train(model, replay(data, rank, world_size), plain_config(len(data[0])),
                    optimizer=opt, dp_group=dist.group.WORLD)
    full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    return {"params": full, "memory": memory, "gathered": gathered,
            "losses": global_losses(history.loss, device)}


def zero_sweep(rank: int, world_size: int, model_fn, data, units: str = "",
               lr: float = 1e-2, parity_steps: int = 4) -> dict:
    """Every stage in fp32 for ``parity_steps`` (exact comparison), every stage in
    bf16 for memory and bytes, FSDP2 in both resharding modes; with two ranks also
    ZeRO-3 in bf16 with FP8 weights and 8-bit gradients for every step of ``data``,
    beside the same run with bf16 communication."""
    short = (data[0][:parity_steps], data[1][:parity_steps])
    out = {s: zero_worker(rank, world_size, model_fn, s, short, units=units, lr=lr)
           for s in (0, 1, 2, 3)}
    out["bf16"] = {s: zero_worker(rank, world_size, model_fn, s, short,
                                  torch.bfloat16, units, lr) for s in (0, 1, 2, 3)}
    out["fsdp"] = {reshard: fsdp_worker(rank, world_size, model_fn, short, units, lr,
                                        reshard_after_forward=reshard)
                   for reshard in (True, False)}
    if world_size == 2:
        formats = {"bf16": {}, "fp8 weights": {"gather_format": "e4m3"},
                   "fp8 gradients": {"reduce_format": "e4m3"},
                   "fp8 both": {"gather_format": "e4m3", "reduce_format": "e4m3"}}
        out["fp8"] = {label: zero_worker(rank, world_size, model_fn, 3, data,
                                         torch.bfloat16, units, lr, **kw)
                      for label, kw in formats.items()}
    return out
