"""PyTorch's engines in the book: one backward with each, against one device.

A run of several steps on a mesh is the book's command line,
``torchrun --nproc_per_node 4 -m llmcore.train --preset shakespeare-char --dp 2
--tp 2``, which trains through :func:`llmcore.parallel.native.parallelize_gpt` and the
book's loop.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from llmcore.models.gpt import GPT
from llmcore.parallel.ranks import rank_device
from llmcore.parallel.native import full_state, parallelize_gpt

ENGINES = ("ddp", "fsdp", "tp")


def engine(model: nn.Module, name: str, world_size: int) -> nn.Module:
    """``model`` under one of PyTorch's engines on all ranks: DDP, or the GPT on a
    (world, 1) mesh (FSDP2 alone) or a (1, world) mesh (tensor parallel alone)."""
    device = next(model.parameters()).device
    if name == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    shape = (world_size, 1) if name == "fsdp" else (1, world_size)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=("dp", "tp"))
    return parallelize_gpt(model, mesh, param_dtype=None)


def native_worker(rank: int, world_size: int, cfg, x, y, seed: int = 0) -> dict:
    """One backward with each engine on this rank's device; largest gradient
    difference to one device (the same kind of device)."""
    torch.manual_seed(seed)
    device = rank_device()
    ref = GPT(cfg).to(device)
    x, y = x.to(device), y.to(device)
    ref(x, y)[1].backward()
    gaps = {}
    for name in ENGINES:
        model = copy.deepcopy(ref)
        model.zero_grad(set_to_none=True)
        model = engine(model, name, world_size)
        mine = (x, y) if name == "tp" else (x.chunk(world_size)[rank],
                                            y.chunk(world_size)[rank])
        model(*mine)[1].backward()
        grads = full_state(model, grads=True)
        gaps[name] = max((grads[n] - p.grad).abs().max().item()
                         for n, p in ref.named_parameters())
    return gaps
