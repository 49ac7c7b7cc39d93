"""The real engines: PyTorch's DDP, FSDP2 and DTensor tensor parallelism, composed.

What the book writes by hand in this package, PyTorch ships ready for clusters.
Under ``torchrun`` a training script calls

    info = init_distributed()                       # from torchrun's environment
    mesh = init_device_mesh(info.device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
    model = parallelize_gpt(model, mesh)            # TP in a row, FSDP2 across rows

:func:`parallelize_gpt` follows torchtitan's documented order: tensor parallelism on
the inner mesh dimension, then activation checkpointing, then (optionally) one
``torch.compile`` per block, then FSDP2's ``fully_shard`` per block and on the root
over the outer dimension, with a ``MixedPrecisionPolicy`` (bf16 parameters for
compute, fp32 gradient reduction). Tensor parallelism splits q, k, v and the MLP's
first layer by output rows (``ColwiseParallel``) and the two output projections by
input columns (``RowwiseParallel``), Megatron's layout; attention then computes only
this rank's heads. Data parallel ranks read different data; tensor parallel ranks of
one row read the same batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                               parallelize_module)

from llmcore.nn import MultiHeadAttention
from llmcore.parallel.recompute import apply_activation_checkpointing
from llmcore.parallel.ranks import default_backend, gpu_count, rank_device, torchrun_env
from llmcore.runtime import select_device

@dataclass(frozen=True)
class DistInfo:
    rank: int  # this process among all
    world_size: int  # number of processes
    local_rank: int  # this process on its node
    device: torch.device  # where this rank's model lives
    note: str = ""  # why the ranks run on the CPU although a GPU is visible

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def local_world_size(world_size: int) -> int:
    """Processes on this node: torchrun's LOCAL_WORLD_SIZE (all of them if unset)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def pick_device(local_rank: int, local_world: int) -> tuple[torch.device, str, str]:
    """(device, backend, note) for a rank of a node running ``local_world`` ranks:
    :func:`~llmcore.parallel.ranks.default_backend` and
    :func:`~llmcore.parallel.ranks.rank_device`, so its own GPU when every rank of
    the node has one, else the CPU with gloo for all of them."""
    if not 0 <= local_rank < local_world:
        raise ValueError(f"local_rank={local_rank} must lie in [0, {local_world})")
    backend = default_backend(local_world)
    note, gpus = "", gpu_count()
    if backend == "gloo" and gpus:
        note = (f"{local_world} processes per node but {gpus} GPU(s): every rank runs "
                "on the CPU with gloo; start at most one process per GPU to use them")
    return rank_device(local_rank, backend), backend, note


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group torchrun set up; a single process without torchrun."""
    env = torchrun_env()
    if env is None:  # one process: the device any page would pick
        return DistInfo(0, 1, 0, select_device())
    rank, world, local = env
    device, default, note = pick_device(local, local_world_size(world))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if note and rank == 0:
        print(note)
    if not dist.is_initialized():
        dist.init_process_group(backend or default,
                                timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local, device, note)


# ------------------------------------------------- the engines


def unfuse_qkv(attn: MultiHeadAttention) -> MultiHeadAttention:
    """The same attention with separate q, k, v projections (same weights): a fused
    (3C, C) matrix cut into contiguous row blocks would give rank 0 all of q and half
    of k, so tensor parallelism splits the three matrices one by one."""
    if not attn.fused_qkv:
        return attn
    bias = attn.out_proj.bias is not None
    out = MultiHeadAttention(attn.d_model, attn.n_heads, attn.dropout, bias,
                             attn.use_sdpa, attn.rope, fused_qkv=False)
    out.load_state_dict(attn.state_dict())  # the layout hook splits the rows
    return out.to(attn.out_proj.weight.device)


def apply_tp(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Megatron tensor parallelism over the 1-D ``mesh``, block by block, in place.

    Embeddings, norms and the output layer stay replicated (plain tensors).
    """
    plan = {"self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.out_proj": RowwiseParallel(),
            "ffn.linear1": ColwiseParallel(), "ffn.linear2": RowwiseParallel()}
    for block in model.blocks:
        if block.self_attn.n_heads % mesh.size():
            raise ValueError(f"n_heads={block.self_attn.n_heads} must be divisible by "
                             f"the tensor-parallel size {mesh.size()}")
        block.self_attn = unfuse_qkv(block.self_attn)
        if getattr(block.ffn, "gate", None) is not None:
            plan["ffn.gate"] = ColwiseParallel()
        parallelize_module(block, mesh, plan)
    return model


def apply_fsdp(model: nn.Module, mesh: DeviceMesh | None = None,
               param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """FSDP2 (ZeRO-3): ``fully_shard`` each block, then the root, over ``mesh``.

    ``param_dtype``: the dtype blocks compute in (bf16 for mixed precision; the fp32
    master shards stay with the optimizer); ``reduce_dtype``: gradients are reduced in
    fp32 so that summing many ranks' bf16 gradients loses no bits.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype,
                              reduce_dtype=reduce_dtype if param_dtype else None)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def parallelize_gpt(model: nn.Module, mesh: DeviceMesh, *, tp_dim: str = "tp",
                    dp_dim: str = "dp", checkpoint_every: int = 0,
                    compile_blocks: bool = False,
                    param_dtype: torch.dtype | None = torch.bfloat16) -> nn.Module:
    """llmcore's GPT on a (dp, tp) ``mesh``, in torchtitan's order: TP, activation
    checkpointing (every ``checkpoint_every``-th block; 0: none), per-block compile,
    FSDP2 with mixed precision (``param_dtype=None``: fp32 throughout).

    Every rank must have built the model from the same seed. A mesh dimension of size
    1 is skipped, so a (n, 1) mesh is plain FSDP and (1, n) plain TP. q, k and v are
    held apart on every mesh, so that a checkpoint has the same names on any mesh.
    """
    names = mesh.mesh_dim_names or ()
    if tp_dim not in names or dp_dim not in names:
        raise ValueError(f"mesh needs dimensions named {dp_dim!r} and {tp_dim!r}, got "
                         f"{names}; use init_device_mesh(..., mesh_dim_names=...)")
    for block in model.blocks:  # one layout on every mesh: checkpoints reshard
        block.self_attn = unfuse_qkv(block.self_attn)
    if mesh[tp_dim].size() > 1:
        apply_tp(model, mesh[tp_dim])
    if checkpoint_every:
        apply_activation_checkpointing(model, every=checkpoint_every)
    if compile_blocks:
        for block in model.blocks:
            block.compile()
    if mesh[dp_dim].size() > 1:
        apply_fsdp(model, mesh[dp_dim], param_dtype)
    return model


# ------------------------------------------------- training on the engines


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state(model: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or gradient) whole, under the one-device model's names
    (wrapper prefixes dropped, q/k/v fused back into ``qkv_proj``). Collective."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p.detach()
        name = name.replace("_orig_mod.", "").replace("module.", "")
        out[name] = None if t is None else _local(t)
    for name in [n for n in out if n.endswith("q_proj.weight")]:
        pre = name[:-len("q_proj.weight")]
        for kind in ("weight", "bias"):
            parts = [out.pop(f"{pre}{x}_proj.{kind}", None) for x in "qkv"]
            if parts[0] is not None:
                out[f"{pre}qkv_proj.{kind}"] = torch.cat(parts)
    return out
