"""The real engines: PyTorch's DDP, FSDP2 and DTensor tensor parallelism.

What the book writes by hand in this package, PyTorch ships ready for clusters.
``python -m llmcore.train --parallel ddp|fsdp|tp`` started by ``torchrun`` calls

    info = init_distributed()                       # from torchrun's environment
    model = apply_parallel(model, "fsdp", info.device)

* ``ddp``: ``DistributedDataParallel`` (bucketed all-reduce overlapped with backward);
* ``fsdp``: FSDP2 ``fully_shard`` on every block, then on the root (ZeRO-3);
* ``tp``: DTensor ``parallelize_module``: q/k/v and the FFN's first layer
  ``ColwiseParallel``, the two output projections ``RowwiseParallel`` (Megatron).

Data parallel modes (ddp, fsdp) need each rank to read different data; tp ranks read
the same batch. A TP model's attention runs its local heads through
:class:`LocalHeadsAttention`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llmcore.parallel.launch import torchrun_env

MODES = ("ddp", "fsdp", "tp")


@dataclass(frozen=True)
class DistInfo:
    rank: int  # this process among all
    world_size: int  # number of processes
    local_rank: int  # this process on its node (its GPU index)
    device: torch.device  # where this rank's model lives

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_parallel(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group torchrun set up; a single process without torchrun."""
    env = torchrun_env()
    if env is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistInfo(0, 1, 0, device)
    rank, world, local = env
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"),
                                timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local, device)


class LocalHeadsAttention(nn.Module):
    """Self-attention over this rank's heads, using the (DTensor-parallel) projections
    of an ``llmcore.nn.MultiHeadAttention``: q/k/v give (B, T, C / world) locally."""

    def __init__(self, mha: nn.Module, world_size: int):
        super().__init__()
        if mha.n_heads % world_size:
            raise ValueError(f"n_heads={mha.n_heads} must be divisible by the tensor-"
                             f"parallel size {world_size}")
        self.q_proj, self.k_proj, self.v_proj = mha.q_proj, mha.k_proj, mha.v_proj
        self.out_proj = mha.out_proj
        self.n_heads, self.head_size = mha.n_heads // world_size, mha.head_size
        self.dropout = mha.dropout

    def forward(self, query, attn_mask=None, is_causal=False, kv_cache=None,
                need_weights=False):
        if kv_cache is not None or need_weights:
            raise ValueError("tensor-parallel attention has no kv_cache/need_weights")
        b, t, _ = query.shape

        def heads(x):
            return x.view(b, t, self.n_heads, self.head_size).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(query)), \
            heads(self.v_proj(query))  # (B, nh_local, T, hs)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))  # (B, T, C)


def apply_parallel(model: nn.Module, mode: str, device: torch.device,
                   mixed_precision: torch.dtype | None = None) -> nn.Module:
    """Wrap llmcore's GPT for ``mode`` (ddp, fsdp or tp) on the default process group.

    Every rank must have built the model from the same seed (fsdp and tp keep each
    rank's own slice of its own weights; ddp broadcasts rank 0's).
    ``mixed_precision``: FSDP2's parameter dtype for compute (e.g. torch.bfloat16).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model = model.to(device)
    if mode == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=mixed_precision) if mixed_precision \
            else MixedPrecisionPolicy()
        for block in model.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    plan = {"self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.out_proj": RowwiseParallel(),
            "ffn.linear1": ColwiseParallel(), "ffn.linear2": RowwiseParallel()}
    for block in model.blocks:
        if block.ffn.gate is not None:
            plan["ffn.gate"] = ColwiseParallel()
        parallelize_module(block, mesh, plan)
        block.self_attn = LocalHeadsAttention(block.self_attn, world)
    return model


# ------------------------------------------------- the experiments the book runs


def native_worker(rank: int, world_size: int, cfg, x, y, seed: int = 0) -> dict:
    """One backward with each engine; largest gradient difference to one device."""
    import copy

    from llmcore.models.gpt import GPT

    torch.manual_seed(seed)
    ref = GPT(cfg)
    ref(x, y)[1].backward()
    gaps = {}
    for mode in MODES:
        model = copy.deepcopy(ref)
        model.zero_grad(set_to_none=True)
        model = apply_parallel(model, mode, torch.device("cpu"))
        mine = (x, y) if mode == "tp" else (x.chunk(world_size)[rank],
                                            y.chunk(world_size)[rank])
        model(*mine)[1].backward()
        inner = model.module if mode == "ddp" else model
        gaps[mode] = max(
            ((p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
             - q.grad).abs().max().item()
            for p, q in zip(inner.parameters(), ref.parameters()))
    return gaps


def main(argv=None) -> None:
    """``torchrun --nproc_per_node 2 -m llmcore.parallel.native --mode fsdp``: a few
    AdamW steps of a small GPT on Shakespeare with one of PyTorch's engines."""
    import argparse

    from llmcore.parallel.data_parallel import DEMO, shakespeare_batches

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--mode", choices=MODES, default="ddp")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    from llmcore.models.gpt import GPT

    info = init_distributed()
    cfg, (X, Y) = shakespeare_batches(DEMO.cpu)
    torch.manual_seed(0)
    model = apply_parallel(GPT(cfg), args.mode, info.device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(args.steps):
        x, y = X[step % len(X)], Y[step % len(Y)]
        if args.mode != "tp":  # data parallel: each rank its slice of the batch
            n, r = info.world_size, info.rank
            x, y = x.chunk(n)[r], y.chunk(n)[r]
        loss = model(x.to(info.device), y.to(info.device))[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    if info.is_main:
        print(f"mode={args.mode} world_size={info.world_size} "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
