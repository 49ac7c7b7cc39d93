"""Data-parallel and gradient-compression experiments (chapters 14 and 18).

Every run trains through the book's loop, :func:`llmcore.train.train`: the wrapper
(naive, bucketed or PyTorch's DDP) averages the gradients inside backward, and the
loop uses its ``no_sync()`` for the micro-batches before the last.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from book.workers.common import plain_config, replay, to_cpu
from llmcore.parallel.comm import Comm
from llmcore.parallel.compression import make_hook
from llmcore.parallel.data_parallel import BucketedDataParallel, NaiveDataParallel
from llmcore.parallel.ranks import rank_device
from llmcore.parallel.rng import rank_seed
from llmcore.train import train


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


def global_losses(losses: list[float], device) -> list[float]:
    """The loss of the whole batch per step: the mean of the ranks' losses (every
    rank holds as many tokens)."""
    t = torch.tensor(losses, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def train_worker(rank: int, world_size: int, model_fn, kind: str, data,
                 lr: float = 0.1, accumulate: int = 1, hook: str | None = None,
                 bucket_cap_mb: float = 25.0, seed: int = 0,
                 measure_error: bool = False, **hook_kwargs) -> dict:
    """Train with the wrapper ``kind`` on this rank's slice of every batch, in
    ``accumulate`` micro-batches, through the book's loop with plain SGD.

    ``hook`` names a compression hook of ``llmcore.parallel.compression``;
    ``measure_error`` also all-reduces every bucket exactly (not counted) to measure
    how far the hook's average lies from it. Returns the final weights, the loss of
    the whole batch per step, the payload bytes and messages the wrapper or hook
    sent, and seconds per step. Model and batches live on
    :func:`~llmcore.parallel.ranks.rank_device` (its GPU under NCCL). Each rank seeds
    its own generator (:func:`~llmcore.parallel.rng.rank_seed`): its dropout masks
    are its own, and its initial weights differ until the wrapper broadcasts rank 0's.
    """
    torch.manual_seed(rank_seed(seed, rank))
    device = rank_device()
    model = model_fn().to(device)
    dp = wrap(kind, model, bucket_cap_mb=bucket_cap_mb)
    state, errors = None, []
    if hook is not None:
        state, fn = make_hook(hook, **hook_kwargs)
        dp.register_comm_hook(state, with_error(fn, errors) if measure_error else fn)
    counter = state if state is not None else getattr(dp, "hook_state", None)
    if kind == "naive":
        dp.comm.stats.reset()  # the steps only, not the initial broadcast
    steps = len(data[0])
    history = train(dp, replay(data, rank, world_size, accumulate),
                    plain_config(steps, accumulate),
                    optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                    dp_group=dist.group.WORLD)
    if kind == "naive":
        sent, calls = dp.bytes_sent, dp.comm.stats.calls["all_reduce"]
    elif counter is not None and hasattr(counter, "bytes_sent"):
        sent, calls = counter.bytes_sent, counter.calls  # torch's states count none
    else:
        sent = calls = None
    return {"state": to_cpu(model.state_dict()),
            "losses": global_losses(history.loss, device), "bytes_sent": sent,
            "messages": calls, "seconds_per_step": history.seconds / steps,
            "errors": errors}


def with_error(hook, errors: list):
    """``hook``, measured: for every bucket, the squared norms of (its average minus
    the exact average) and of the exact average, appended to ``errors``."""
    def measured(state, bucket):
        exact = bucket.buffer().detach().clone()
        dist.all_reduce(exact, group=state.process_group)  # the truth, not counted
        exact /= dist.get_world_size(state.process_group)

        def record(fut):
            value = fut.value()
            value = value[0] if isinstance(value, list) else value
            errors.append(((value - exact).pow(2).sum().item(),
                           exact.pow(2).sum().item()))
            return value
        return hook(state, bucket).then(record)
    return measured


def dp_sweep(rank: int, world_size: int, model_fn, data, lr: float,
             bucket_cap_mb: float = 25.0) -> dict:
    """Naive, bucketed and DDP training with buckets of ``bucket_cap_mb``, and
    bucketed with DDP's default 25 MB buckets and 2 micro-batches per rank."""
    runs = {kind: train_worker(rank, world_size, model_fn, kind, data, lr,
                               bucket_cap_mb=bucket_cap_mb)
            for kind in ("naive", "bucketed", "ddp")}
    runs["accumulate"] = train_worker(rank, world_size, model_fn, "bucketed", data, lr,
                                      accumulate=2)
    return runs


def compression_sweep(rank: int, world_size: int, model_fn, data, lr: float,
                      schemes: dict) -> dict:
    """Train with each scheme {label: (hook name, kwargs)}, bucketed wrapper (DDP
    for PyTorch's own PowerSGD), measuring each hook's error against the exact
    average."""
    out = {}
    for label, (name, kwargs) in schemes.items():
        kind = "ddp" if name == "torch_powersgd" else "bucketed"
        out[label] = train_worker(rank, world_size, model_fn, kind, data, lr,
                                  hook=name, measure_error=True, **kwargs)
    return out


def dropout_masks(rank: int, world_size: int, seed: int = 0) -> torch.Tensor:
    """The dropout mask this data-parallel rank draws after seeding with
    :func:`~llmcore.parallel.rng.rank_seed`."""
    torch.manual_seed(rank_seed(seed, rank))
    return nn.functional.dropout(torch.ones(64), 0.5) > 0


# ------------------------------------------------- an all-reduce from messages


def ring_all_reduce(t: torch.Tensor, comm: Comm, log: list | None = None):
    """Sum ``t`` over the ranks in place, with messages to the next rank of a ring
    only: N - 1 steps of reduce-scatter, then N - 1 of all-gather (Patarasuk and
    Yuan 2009). Each rank sends 2(N - 1)/N of ``t``, whatever N is. ``log`` gets,
    per step, what this rank sent and received and the first value of each chunk."""
    n, r = comm.world_size, comm.rank
    right, left = (r + 1) % n, (r - 1) % n
    chunks = t.view(-1).tensor_split(n)  # views of t
    for step in range(2 * (n - 1)):
        gather = step >= n - 1  # the second phase
        s = step - (n - 1) if gather else step
        send, recv = ((r - s + 1) % n, (r - s) % n) if gather else (
            (r - s) % n, (r - s - 1) % n)
        buf = torch.empty_like(chunks[recv])
        comm.send_recv(chunks[send], right, buf, left)
        if gather:
            chunks[recv].copy_(buf)  # a complete sum: replace ours
        else:
            chunks[recv].add_(buf)  # a partial sum: add ours to it
        if log is not None:
            log.append({"phase": "all-gather" if gather else "reduce-scatter",
                        "step": s, "sent": send, "to": right, "received": recv,
                        "from": left, "chunks": [c[0].item() for c in chunks]})
    return t


def ring_worker(rank: int, world_size: int, numel: int = 12, seed: int = 0) -> dict:
    """The ring all-reduce against ``dist.all_reduce`` on random numbers, its bytes,
    and its log on an input of 2**rank everywhere: the sum of distinct powers of two
    says exactly whose contributions a chunk holds."""
    comm = Comm()
    g = torch.Generator().manual_seed(seed + rank)
    x = torch.randn(numel, generator=g, dtype=torch.float64)
    exact = x.clone()
    dist.all_reduce(exact)
    ring_all_reduce(x, comm)
    sent = comm.stats.payload["send"]
    log: list = []
    ring_all_reduce(torch.full((numel,), 2.0 ** rank, dtype=torch.float64), comm, log)
    return {"gap": (x - exact).abs().max().item(), "sent": sent, "log": log}


def plot_ring(log_per_rank: list[list[dict]], axes) -> None:
    """One panel per step of :func:`ring_all_reduce`'s logs (input 2**rank): rows
    are ranks, columns chunks, each cell the number of ranks whose values it holds
    (a sum of distinct powers of two: count the ones); the chunk each rank just
    received is outlined, with the rank it came from."""
    n = len(log_per_rank)
    for i, ax in enumerate(axes):
        grid = [[int(v).bit_count() for v in log[i]["chunks"]]
                for log in log_per_rank]
        ax.imshow(grid, cmap="Blues", vmin=0, vmax=n + 1)
        for r, log in enumerate(log_per_rank):
            e = log[i]
            for c, k in enumerate(grid[r]):
                ax.text(c, r, str(k), ha="center", va="center", fontsize=8)
            c = e["received"]  # outline its cell
            ax.plot([c - .45, c + .45, c + .45, c - .45, c - .45],
                     [r - .45, r - .45, r + .45, r + .45, r - .45], "r-", lw=1.5)
        e = log_per_rank[0][i]
        ax.set_title(f"{e['phase']} {e['step'] + 1}", fontsize=8)
        ax.set_xticks(range(n), [f"c{c}" for c in range(n)], fontsize=7)
        ax.set_yticks(range(n), [f"rank {r}" for r in range(n)], fontsize=7)


def ring_mean_in(grads: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What a ring all-reduce in ``dtype`` makes of the mean of ``grads`` (N, n):
    each rank casts its gradient divided by N (as the cast hooks do), and the
    partial sum is rounded to ``dtype`` at every one of the N - 1 hops. In float64."""
    parts = (grads.double() / grads.shape[0]).to(dtype)
    total = parts[0]
    for part in parts[1:]:  # a hop: add in fp32, send the sum in dtype
        total = (total.float() + part.float()).to(dtype)
    return total.double()
