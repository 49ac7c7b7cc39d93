"""Tensor- and sequence-parallel experiments: a GPT split over ranks against one
device and DTensor, trained through the book's loop, the order of its collectives,
what a rank keeps for backward, and data x tensor parallel on a mesh (chapters 16
and 19)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                               parallelize_module)

from book.workers.activations import saved_bytes
from book.workers.common import plain_config, replay, to_cpu
from llmcore.config import override
from llmcore.models.gpt import GPT
from llmcore.parallel.comm import Comm
from llmcore.parallel.data_parallel import NaiveDataParallel
from llmcore.parallel.ranks import rank_device
from llmcore.parallel.sequence_parallel import SequenceParallelBlock
from llmcore.parallel.tensor_parallel import apply_tensor_parallel, full_tensors
from llmcore.train import train


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
    stats = model.tp_comm.stats
    stats.trace = []  # the order of the collectives, forward then backward
    _, tp_loss = model(x, y)
    n_forward = len(stats.trace)
    tp_loss.backward()
    trace, payload = list(stats.trace), dict(stats.payload)  # before the checks
    return {"loss": loss.item(), "tp_loss": tp_loss.item(), "payload": payload,
            "grad_gap": grad_gap(ref, model),
            "local_params": sum(p.numel() for p in model.parameters()),
            "forward": trace[:n_forward], "backward": trace[n_forward:]}


def tp_train_worker(rank: int, world_size: int, cfg, data, lr: float,
                    seed: int = 0) -> dict:
    """Train the tensor-parallel GPT through the book's loop with SGD: every rank
    reads the whole batch and keeps its slice of every matrix. Returns the losses
    and the weights, unsplit (on the CPU)."""
    torch.manual_seed(seed)  # same weights on every rank; each keeps its slice
    model = apply_tensor_parallel(GPT(cfg), None).to(rank_device())
    history = train(model, replay(data), plain_config(len(data[0])),
                    optimizer=torch.optim.SGD(model.parameters(), lr=lr))
    return {"losses": history.loss, "state": to_cpu(full_tensors(model))}


def tp_demo(rank: int, world_size: int, cfg, data, lr: float) -> dict:
    """What chapter 16 runs on its tensor-parallel ranks: one step against one
    device, our slices against DTensor's, and a whole training run."""
    x, y = data[0][0], data[1][0]
    return {"step": tp_worker(rank, world_size, cfg, x, y),
            "dtensor": dtensor_worker(rank, world_size, cfg, x, y),
            "train": tp_train_worker(rank, world_size, cfg, data, lr)}


def block_layouts(cfg, batch: int, group=None, seed: int = 0) -> dict:
    """One GPT block on this rank: what it keeps for backward (bytes) and sends in
    forward (payload per collective) on one device, tensor parallel over ``group``,
    and tensor + sequence parallel; and the sequence-parallel output against the
    whole block's."""
    one = override(cfg, n_layer=1)
    torch.manual_seed(seed)
    whole = GPT(one)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, one.block_size, one.n_embd, generator=g)
    comm = Comm(group)
    out: dict = {}
    ref_saved, ref = saved_bytes(whole.blocks[0], x.clone().requires_grad_(),
                                 exclude=list(whole.parameters()))
    out["one device"] = {"saved": ref_saved, "sent": {}}
    tp = apply_tensor_parallel(copy.deepcopy(whole), group, vocab_parallel=False)
    saved, _ = saved_bytes(tp.blocks[0], x.clone().requires_grad_(),
                           exclude=list(tp.parameters()))
    out["tensor parallel"] = {"saved": saved, "sent": dict(tp.tp_comm.stats.payload)}
    sp = SequenceParallelBlock(copy.deepcopy(whole.blocks[0]), comm=comm)
    mine = x.chunk(comm.world_size, 1)[comm.rank].clone().requires_grad_()
    saved, y = saved_bytes(sp, mine, exclude=list(sp.parameters()))
    out["tensor + sequence parallel"] = {"saved": saved,
                                         "sent": dict(comm.stats.payload)}
    out["gap"] = (y - ref.chunk(comm.world_size, 1)[comm.rank]).abs().max().item()
    return out


def pairs(rank: int, world_size: int):
    """Every rank's group of two (ranks 0-1, 2-3, ...): groups of 2 and of
    ``world_size`` in one launch. Collective: every rank makes every group."""
    groups = [dist.new_group([i, i + 1]) for i in range(0, world_size, 2)]
    return groups[rank // 2]


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
