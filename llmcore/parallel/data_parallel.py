"""Data parallelism by hand: every rank holds the whole model and a slice of the batch.

After backward each rank holds the gradient of *its* slice; averaging the gradients
over ranks (an all-reduce divided by N) gives every rank the gradient of the whole
batch, so the optimizer steps agree and the replicas stay identical.

* :class:`NaiveDataParallel` waits for the whole backward pass, then all-reduces the
  gradients one tensor at a time: simple, slow (many small messages, no overlap).
* :class:`BucketedDataParallel` groups gradients into buckets of ``bucket_cap_mb``
  and launches an asynchronous all-reduce as soon as a bucket's gradients are all
  accumulated, while backward keeps computing the earlier layers (Li et al. 2020,
  "PyTorch Distributed: Experiences on Accelerating Data Parallel Training").
  The bucket's reduction is a communication hook ``hook(state, bucket) -> Future``
  exactly like ``DistributedDataParallel.register_comm_hook``, so the compression
  hooks of ``llmcore.parallel.compression`` plug into both.

Both mirror ``torch.nn.parallel.DistributedDataParallel``: parameters are broadcast
from rank 0 at construction, gradients are averaged during ``loss.backward()``, and
``no_sync()`` skips the reduction for gradient accumulation.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from llmcore.parallel.comm import Comm, HookState, allreduce_hook


class _DataParallel(nn.Module):
    """What both wrappers share: broadcast, forward, no_sync, end of backward."""

    def __init__(self, module: nn.Module, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.module = module
        self.group = group
        self.comm = Comm(group)
        self.world_size = self.comm.world_size
        with torch.no_grad():  # every replica starts from rank 0's weights
            for t in list(module.parameters()) + list(module.buffers()):
                self.comm.broadcast(t.data, src=0)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self._sync = True
        self._ready = 0  # parameters whose gradient is accumulated in this backward
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def forward(self, *args, **kwargs):
        if self._ready:
            raise RuntimeError(
                f"only {self._ready} of {len(self.params)} parameters received a "
                "gradient in the last backward; every parameter must take part in "
                "the loss (freeze unused ones with requires_grad_(False))")
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally; the first backward after the block syncs."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._sync:
            return
        self._grad_ready(p)
        self._ready += 1
        # The last parameter's gradient is in: backward has nothing left to compute.
        if self._ready == len(self.params):
            self._ready = 0
            self._backward_done()

    def _grad_ready(self, p: torch.Tensor) -> None:
        pass

    def _backward_done(self) -> None:
        raise NotImplementedError


class NaiveDataParallel(_DataParallel):
    """All-reduce every gradient, one tensor at a time, after backward has finished."""

    def _backward_done(self) -> None:
        for p in self.params:
            self.comm.all_reduce(p.grad)
            p.grad.div_(self.world_size)

    @property
    def bytes_sent(self) -> int:
        return self.comm.stats.payload["all_reduce"]


class GradBucket:
    """What a communication hook sees; mirrors ``torch.distributed.GradBucket``."""

    def __init__(self, index: int, params: list[torch.Tensor]):
        self._index = index
        self._params = params
        p0 = params[0]
        self._buffer = torch.zeros(sum(p.numel() for p in params), dtype=p0.dtype,
                                   device=p0.device)
        self._is_last = False
        self.pending = 0  # gradients of this bucket not yet accumulated

    def index(self) -> int:
        return self._index

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def set_buffer(self, buffer: torch.Tensor) -> None:
        self._buffer = buffer

    def is_last(self) -> bool:
        return self._is_last

    def parameters(self) -> list[torch.Tensor]:
        return list(self._params)

    def gradients(self) -> list[torch.Tensor]:
        """Views of the flat buffer shaped like each parameter."""
        views, offset = [], 0
        for p in self._params:
            views.append(self._buffer[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return views


def make_buckets(params: list[torch.Tensor], cap_bytes: int) -> list[GradBucket]:
    """Fill buckets in reverse order, the order in which backward produces gradients."""
    groups: list[list[torch.Tensor]] = [[]]
    size = 0
    for p in reversed(params):
        nb = p.numel() * p.element_size()
        if groups[-1] and (size + nb > cap_bytes or p.dtype != groups[-1][0].dtype):
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += nb
    buckets = [GradBucket(i, g) for i, g in enumerate(groups)]
    buckets[-1]._is_last = True
    return buckets


class BucketedDataParallel(_DataParallel):
    """Buckets of gradients all-reduced asynchronously while backward still runs."""

    def __init__(self, module: nn.Module, group: dist.ProcessGroup | None = None,
                 bucket_cap_mb: float = 25.0):
        super().__init__(module, group)
        self.buckets = make_buckets(self.params, int(bucket_cap_mb * 2**20))
        self._bucket_of = {id(p): b for b in self.buckets for p in b.parameters()}
        for b in self.buckets:
            b.pending = len(b.parameters())
        self._futures: list[tuple[GradBucket, torch.futures.Future]] = []
        self.register_comm_hook(HookState(group), allreduce_hook)

    def register_comm_hook(self, state, hook) -> None:
        """Use ``hook(state, bucket) -> Future[Tensor]`` to reduce each bucket."""
        self.hook_state, self.hook = state, hook

    def _grad_ready(self, p: torch.Tensor) -> None:
        bucket = self._bucket_of[id(p)]
        bucket.pending -= 1
        if bucket.pending == 0:  # the bucket is full: send it while backward goes on
            bucket.pending = len(bucket.parameters())
            for view, q in zip(bucket.gradients(), bucket.parameters()):
                view.copy_(q.grad)
            self._futures.append((bucket, self.hook(self.hook_state, bucket)))

    def _backward_done(self) -> None:
        for bucket, fut in self._futures:
            reduced = fut.wait()
            if isinstance(reduced, list):  # a raw Work future holds a list
                reduced = reduced[0]
            if reduced is not bucket.buffer():
                bucket.buffer().copy_(reduced)
            for view, q in zip(bucket.gradients(), bucket.parameters()):
                q.grad.copy_(view)
        self._futures.clear()

    @property
    def bytes_sent(self) -> int:
        return self.hook_state.bytes_sent
