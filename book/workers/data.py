"""Data-parallel and gradient-compression experiments (chapters 14 and 18)."""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
from torch import nn

from book.workers.common import to_cpu
from llmcore.parallel.compression import make_hook
from llmcore.parallel.data_parallel import BucketedDataParallel, NaiveDataParallel
from llmcore.parallel.launch import rank_device
from llmcore.parallel.rng import rank_seed


def wrap(kind: str, model: nn.Module, group=None, bucket_cap_mb: float = 25.0):
    """The data-parallel wrapper named ``kind``: naive, bucketed or ddp (PyTorch's),
    around ``model`` on the device it is on."""
    if kind == "naive":
        return NaiveDataParallel(model, group)
    if kind == "bucketed":
        return BucketedDataParallel(model, group, bucket_cap_mb=bucket_cap_mb)
    if kind == "ddp":
        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            model, device_ids=ids, process_group=group, bucket_cap_mb=bucket_cap_mb)
    raise ValueError(f"kind must be 'naive', 'bucketed' or 'ddp', got {kind!r}")


def train_worker(rank: int, world_size: int, model_fn, kind: str, data,
                 lr: float = 0.1, accumulate: int = 1, hook: str | None = None,
                 bucket_cap_mb: float = 25.0, seed: int = 0, **hook_kwargs) -> dict:
    """Train on this rank's slice of every batch, in ``accumulate`` micro-batches.

    ``hook`` names a compression hook of ``llmcore.parallel.compression``. Returns the
    final weights, the global loss per step, the payload bytes sent and seconds/step.
    Model and batches live on :func:`~llmcore.parallel.launch.rank_device` (its GPU
    under NCCL). Each rank seeds its own generator
    (:func:`~llmcore.parallel.rng.rank_seed`): its dropout masks are its own, and its
    initial weights differ until the wrapper broadcasts rank 0's.
    """
    torch.manual_seed(rank_seed(seed, rank))
    device = rank_device()
    model = model_fn().to(device)
    dp = wrap(kind, model, bucket_cap_mb=bucket_cap_mb)
    state = None
    if hook is not None:
        state, fn = make_hook(hook, **hook_kwargs)
        dp.register_comm_hook(state, fn)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses, start = [], time.perf_counter()
    for x, y in zip(*data):
        micro = list(zip(x.chunk(world_size)[rank].to(device).chunk(accumulate),
                         y.chunk(world_size)[rank].to(device).chunk(accumulate)))
        total = torch.zeros((), device=device)  # NCCL reduces only GPU tensors
        for i, (xm, ym) in enumerate(micro):
            last = i == len(micro) - 1
            with contextlib.nullcontext() if last else dp.no_sync():
                _, loss = dp(xm, ym)
                (loss / accumulate).backward()
            total += loss.detach() / accumulate
        opt.step()
        opt.zero_grad()
        dist.all_reduce(total)
        losses.append(total.item() / world_size)
    seconds = (time.perf_counter() - start) / len(losses)
    sent = getattr(state if state is not None else dp, "bytes_sent", None)
    return {"state": to_cpu(model.state_dict()), "losses": losses, "bytes_sent": sent,
            "seconds_per_step": seconds}


def dp_sweep(rank: int, world_size: int, model_fn, data, lr: float,
             bucket_cap_mb: float = 25.0) -> dict:
    """Naive, bucketed and DDP training, and bucketed with 2 micro-batches per rank."""
    runs = {kind: train_worker(rank, world_size, model_fn, kind, data, lr,
                               bucket_cap_mb=bucket_cap_mb)
            for kind in ("naive", "bucketed", "ddp")}
    runs["accumulate"] = train_worker(rank, world_size, model_fn, "bucketed", data, lr,
                                      accumulate=2, bucket_cap_mb=bucket_cap_mb)
    return runs


def compression_sweep(rank: int, world_size: int, model_fn, data, lr: float,
                      schemes: dict) -> dict:
    """Train with each scheme {label: (hook name, kwargs)}, bucketed wrapper."""
    out = {}
    for label, (name, kwargs) in schemes.items():
        kind = "ddp" if name == "torch_powersgd" else "bucketed"
        out[label] = train_worker(rank, world_size, model_fn, kind, data, lr,
                                  hook=name, **kwargs)
    return out


def dropout_masks(rank: int, world_size: int, seed: int = 0) -> torch.Tensor:
    """The dropout mask this data-parallel rank draws after seeding with
    :func:`~llmcore.parallel.rng.rank_seed`."""
    torch.manual_seed(rank_seed(seed, rank))
    return nn.functional.dropout(torch.ones(64), 0.5) > 0
