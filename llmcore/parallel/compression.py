"""Gradient compression as DDP communication hooks: send fewer bytes per step.

Each scheme is a function ``hook(state, bucket) -> Future[Tensor]``, the signature of
``DistributedDataParallel.register_comm_hook``, so it works with PyTorch's DDP and with
``llmcore.parallel.BucketedDataParallel`` alike. The future's value is the bucket's
gradient averaged over ranks (exactly, or approximately when compressed); the state
counts the bytes this rank handed to collectives.

* casting to fp16/bf16: half the bytes; the ring sums in 16 bits, so the rounding
  grows with the number of ranks, and fp16's range is narrow (underflow, overflow);
* int8 quantization with one scale per rank, all-gathered: a quarter of the bytes
  handed in, but every rank receives every other's, so each rank sends N/8 of what
  an fp32 all-reduce sends: less only below 8 ranks;
* int8 (or FP8) through a quantised reduce-scatter and all-gather
  (:func:`llmcore.parallel.quantized_comm.quantized_all_reduce`, as in ZeRO++): the
  chunks are summed in fp32 by the rank that owns them, so no sum is taken in 8 bits
  and a quarter of fp32's traffic holds at any N;
* top-k sparsification with error feedback (Stich et al. 2018, "Sparsified SGD with
  memory"): send the k largest entries and their indices, keep the rest for later;
* PowerSGD (Vogels et al. 2019): a rank-r approximation P Q^T of each gradient
  matrix from one step of power iteration, with error feedback and warm start. It
  follows the algorithm of ``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook``
  step for step, so with the same seed both give the same gradients.
"""

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps

from llmcore.parallel.comm import Comm, HookState, allreduce_hook
from llmcore.parallel.quantized_comm import quantized_all_reduce


def _done(t: torch.Tensor) -> torch.futures.Future:
    """A future that already holds ``t`` (for hooks that wait on their collectives)."""
    fut = torch.futures.Future()
    fut.set_result(t)
    return fut


def _all_gather(state: HookState, t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` stacked: (world, *t.shape)."""
    out = t.new_empty(state.world_size * t.numel())
    state.count(t)
    dist.all_gather_single(out, t, group=state.process_group)
    return out.view(state.world_size, *t.shape)


# ------------------------------------------------------------------ casting


class CastState(HookState):
    def __init__(self, process_group=None, dtype: torch.dtype = torch.float16):
        super().__init__(process_group)
        self.dtype = dtype


def cast_hook(state: CastState, bucket) -> torch.futures.Future[torch.Tensor]:
    """All-reduce the bucket in ``state.dtype`` (fp16 or bf16), then cast back."""
    buf = bucket.buffer()
    small = buf.div(state.world_size).to(state.dtype)
    state.count(small)
    work = dist.all_reduce(small, group=state.process_group, async_op=True)
    return work.get_future().then(lambda fut: buf.copy_(fut.value()[0]))


# ------------------------------------------------------------------ int8


def int8_hook(state: HookState, bucket) -> torch.futures.Future[torch.Tensor]:
    """Quantize to int8 with a per-rank scale; gather all ranks' bytes and average."""
    buf = bucket.buffer()
    scale = (buf.abs().max() / 127).clamp_min(1e-30).reshape(1)
    q = torch.round(buf / scale).clamp_(-127, 127).to(torch.int8)
    qs, scales = _all_gather(state, q), _all_gather(state, scale)  # (N, n), (N, 1)
    return _done(buf.copy_((qs.float() * scales).mean(0)))


class QuantizedState(HookState):
    def __init__(self, process_group=None, fmt: str = "int8", block: int = 128):
        super().__init__(process_group)
        self.fmt, self.block = fmt, block
        self.comm = Comm(process_group)  # counts the codes and the scales


def quantized_hook(state: QuantizedState, bucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket through 8-bit codes with a scale per ``state.block``
    values: a quantised reduce-scatter (summed in fp32) and all-gather."""
    before = sum(state.comm.stats.payload.values())
    buf = bucket.buffer()
    total = quantized_all_reduce(state.comm, buf, state.fmt, state.block)
    state.calls += 1
    state.bytes_sent += sum(state.comm.stats.payload.values()) - before
    return _done(buf.copy_(total / state.world_size))


# ------------------------------------------------------------------ top-k


class TopKState(HookState):
    def __init__(self, process_group=None, ratio: float = 0.01,
                 error_feedback: bool = True):
        super().__init__(process_group)
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
        self.ratio = ratio
        self.error_feedback = error_feedback
        # What was not sent, per parameter: DDP regroups its buckets after the first
        # step (in the order gradients arrived), so a bucket's index does not name
        # the same gradients from one step to the next; a parameter does.
        self.error: dict[int, torch.Tensor] = {}


def topk_hook(state: TopKState, bucket) -> torch.futures.Future[torch.Tensor]:
    """Send each gradient's k largest entries (values and int32 indices into the
    bucket); remember the rest. k is chosen per gradient, so the result does not
    depend on how the gradients are grouped into buckets."""
    buf = bucket.buffer()
    picked, offset = [], 0
    for p, g in zip(bucket.parameters(), bucket.gradients()):
        acc = g.reshape(-1) + state.error.get(id(p), 0)
        k = max(1, int(state.ratio * acc.numel()))
        idx = acc.abs().topk(k, sorted=False).indices
        picked.append((acc[idx], idx + offset))
        if state.error_feedback:
            acc[idx] = 0  # what was sent leaves the memory
            state.error[id(p)] = acc
        offset += acc.numel()
    vals = torch.cat([v for v, _ in picked])
    idx = torch.cat([i for _, i in picked]).int()
    all_vals = _all_gather(state, vals).flatten()
    all_idx = _all_gather(state, idx).flatten().long()
    dense = torch.zeros_like(buf).index_add_(0, all_idx, all_vals)
    return _done(buf.copy_(dense / state.world_size))


# ------------------------------------------------------------------ PowerSGD


class PowerSGDState(HookState):
    """Rank, error memories, warm-start factors; names as in torch's PowerSGDState."""

    def __init__(self, process_group=None, matrix_approximation_rank: int = 1,
                 start_powerSGD_iter: int = 2, min_compression_rate: float = 2.0,
                 use_error_feedback: bool = True, warm_start: bool = True,
                 random_seed: int = 0):
        super().__init__(process_group)
        if (use_error_feedback or warm_start) and start_powerSGD_iter < 2:
            raise ValueError("start_powerSGD_iter must be >= 2 with error feedback or "
                             "warm start (the first steps build the buckets)")
        self.rank = matrix_approximation_rank
        self.start_iter = start_powerSGD_iter
        self.min_compression_rate = min_compression_rate
        self.use_error_feedback = use_error_feedback
        self.warm_start = warm_start
        self.rng = np.random.RandomState(random_seed)  # same on every rank
        self.iter = 0
        self.error: dict[int, torch.Tensor] = {}
        self.qs: dict[int, list[torch.Tensor]] = {}

    def step(self, bucket) -> None:
        if bucket.is_last():
            self.iter += 1


def orthogonalize(m: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt on the columns of ``m`` (n, r), in place."""
    for i in range(m.shape[1]):
        col = m[:, i:i + 1]
        col /= col.norm()
        if i + 1 < m.shape[1]:
            rest = m[:, i + 1:]
            rest -= (col * rest).sum(0, keepdim=True) * col
    return m


def _random_qs(state: PowerSGDState, mats: list[torch.Tensor]) -> list[torch.Tensor]:
    # Same random numbers, in the same order (grouped by shape), as torch's hook.
    shapes = list(dict.fromkeys(m.shape for m in mats))
    order = sorted(range(len(mats)), key=lambda i: shapes.index(mats[i].shape))
    qs: list[torch.Tensor] = [torch.empty(0)] * len(mats)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(state.rng.randint(1_000_000_000))
        for i in order:
            n, m = mats[i].shape
            q = torch.randn(m, min(n, m, state.rank))  # on the CPU, like torch's
            qs[i] = orthogonalize(q.to(mats[i].device, mats[i].dtype))
    return qs


def _all_reduce_flat(state: HookState, tensors: list[torch.Tensor]) -> None:
    """Sum a list of tensors over ranks with one message, in place."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    state.count(flat)
    dist.all_reduce(flat, group=state.process_group)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def powersgd_hook(state: PowerSGDState, bucket) -> torch.futures.Future[torch.Tensor]:
    """Average each gradient matrix M through a rank-r factorization P Q^T."""
    buf = bucket.buffer()
    if state.iter < state.start_iter:  # plain all-reduce for the first steps
        state.step(bucket)
        return allreduce_hook(state, bucket)
    i, n_ranks = bucket.index(), state.world_size
    if state.use_error_feedback:
        buf.add_(state.error.get(i, 0))
        before = buf.clone()
    mats, plain = [], []
    for g in bucket.gradients():
        m = g.view(g.shape[0], -1)  # (n, m): a weight is a matrix, conv kernels too
        r = min(*m.shape, state.rank)
        compressed = (m.shape[0] + m.shape[1]) * r
        worth_it = compressed * state.min_compression_rate < m.numel()
        (mats if worth_it else plain).append(m if worth_it else g)
    _all_reduce_flat(state, plain)  # biases and small matrices travel uncompressed
    for t in plain:
        t.div_(n_ranks)
    if state.warm_start and i in state.qs:
        qs = [orthogonalize(q) for q in state.qs[i]]
    else:
        qs = _random_qs(state, mats)
    ps = [m @ q for m, q in zip(mats, qs)]  # (n, r) each
    _all_reduce_flat(state, ps)
    ps = [orthogonalize(p) for p in ps]
    qs = [m.T @ p for m, p in zip(mats, ps)]  # (m, r) each
    _all_reduce_flat(state, qs)
    for m, p, q in zip(mats, ps, qs):
        q.div_(n_ranks)
        m.copy_(p @ q.T)  # writes through the view into the bucket
    if state.use_error_feedback:
        state.error[i] = before - buf
    if state.warm_start:  # next step starts its power iteration from these Qs
        state.qs[i] = qs
    state.step(bucket)
    return _done(buf)


# ------------------------------------------------------------------ by name


def make_hook(name: str, process_group=None, **kwargs):
    """``(state, hook)`` for a scheme named allreduce, fp16, bf16, int8 (gathered),
    quantized (8-bit all-reduce; ``fmt``, ``block``), topk, powersgd, or
    torch_powersgd (PyTorch's own PowerSGD, for comparison)."""
    if name == "allreduce":
        return HookState(process_group), allreduce_hook
    if name in ("fp16", "bf16"):
        dtype = torch.float16 if name == "fp16" else torch.bfloat16
        return CastState(process_group, dtype), cast_hook
    if name == "int8":
        return HookState(process_group), int8_hook
    if name == "quantized":
        return QuantizedState(process_group, **kwargs), quantized_hook
    if name == "topk":
        return TopKState(process_group, **kwargs), topk_hook
    if name == "powersgd":
        return PowerSGDState(process_group, **kwargs), powersgd_hook
    if name == "torch_powersgd":
        return ps.PowerSGDState(process_group, **kwargs), ps.powerSGD_hook
    raise ValueError(f"unknown compression {name!r}; use allreduce, fp16, bf16, int8, "
                     "quantized, topk, powersgd or torch_powersgd")
