"""Tensor-parallel experiments: a GPT split over ranks against one device, against
DTensor, and combined with data parallelism on a mesh (chapters 16 and 19)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                               parallelize_module)

from llmcore.models.gpt import GPT
from llmcore.parallel.data_parallel import NaiveDataParallel
from llmcore.parallel.launch import rank_device
from llmcore.parallel.tensor_parallel import apply_tensor_parallel, full_tensors


def grad_gap(ref: nn.Module, model: nn.Module) -> float:
    """Largest difference between the reference's gradients and the unsplit ones."""
    grads = full_tensors(model, grad=True)
    return max((grads[n] - p.grad).abs().max().item()
               for n, p in ref.named_parameters())


def tp_worker(rank: int, world_size: int, cfg, x, y, seed: int = 0) -> dict:
    """One forward/backward of a GPT whole and tensor-parallel, both on this rank's
    device; losses, gradient gap, payload of the step and the size of this rank's
    slice."""
    torch.manual_seed(seed)  # same weights on every rank; each keeps its slice
    device = rank_device()
    ref = GPT(cfg)
    # split on the CPU (the parallel layers are built there), then move both
    model = apply_tensor_parallel(copy.deepcopy(ref), None).to(device)
    ref, x, y = ref.to(device), x.to(device), y.to(device)
    _, loss = ref(x, y)
    loss.backward()
    _, tp_loss = model(x, y)
    tp_loss.backward()
    payload = dict(model.tp_comm.stats.payload)
    return {"loss": loss.item(), "tp_loss": tp_loss.item(), "payload": payload,
            "grad_gap": grad_gap(ref, model),
            "local_params": sum(p.numel() for p in model.parameters())}


def hybrid_worker(rank: int, world_size: int, cfg, x, y, tp: int = 2,
                  seed: int = 0) -> dict:
    """Data x tensor parallel on a (dp, tp) device mesh: ranks of a row split every
    matrix, rows split the batch; gradients compared with one process."""
    dp = world_size // tp
    device = rank_device()
    mesh = init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(seed)
    ref = GPT(cfg)
    model = apply_tensor_parallel(copy.deepcopy(ref), mesh.get_group("tp")).to(device)
    ref, x, y = ref.to(device), x.to(device), y.to(device)
    ddp = NaiveDataParallel(model, mesh.get_group("dp"))
    row = mesh.get_local_rank("dp")
    _, loss = ddp(x.chunk(dp)[row], y.chunk(dp)[row])
    loss.backward()
    _, ref_loss = ref(x, y)
    ref_loss.backward()
    return {"coords": (row, mesh.get_local_rank("tp")),
            "grad_gap": grad_gap(ref, model)}


TP_PLAN = {"self_attn.qkv_proj": ColwiseParallel(),
           "self_attn.out_proj": RowwiseParallel(),
           "ffn.linear1": ColwiseParallel(), "ffn.linear2": RowwiseParallel()}


def dtensor_worker(rank: int, world_size: int, cfg, x, y, seed: int = 0) -> float:
    """Our FFN slices against DTensor's ColwiseParallel/RowwiseParallel on the same
    GPT: the largest difference of a local weight gradient.

    Only the FFN is compared: ColwiseParallel cuts the fused q/k/v rows into
    contiguous blocks (rank 0 would hold all of q), not into the heads of q, k and v
    that the attention needs; llmcore slices each of the three."""
    torch.manual_seed(seed)
    device = rank_device()
    ref = GPT(cfg)
    mine = apply_tensor_parallel(copy.deepcopy(ref), None).to(device)
    theirs = copy.deepcopy(ref).to(device)
    x, y = x.to(device), y.to(device)
    mesh = init_device_mesh(device.type, (world_size,))
    plan = {k: v for k, v in TP_PLAN.items() if k.startswith("ffn")}
    for block in theirs.blocks:
        parallelize_module(block, mesh, plan)
    for model in (mine, theirs):
        model(x, y)[1].backward()
    gaps = []
    for a, b in zip(mine.blocks, theirs.blocks):
        for name in ("linear1", "linear2"):
            for kind in ("weight", "bias"):
                pa = getattr(getattr(a.ffn, name), kind)
                pb = getattr(getattr(b.ffn, name), kind)
                if pa is None:
                    continue
                gb = pb.grad.to_local() if hasattr(pb.grad, "to_local") else pb.grad
                gaps.append((pa.grad - gb).abs().max().item())
    return max(gaps)
