"""Collectives that count their bytes, and the plain all-reduce communication hook.

Every parallel scheme in the book is a pattern of a few collectives: all-reduce,
reduce-scatter, all-gather, all-to-all, broadcast, point-to-point send/recv.
:class:`Comm` wraps them for one process group and records, per operation, how many
calls were made and how many bytes this rank handed in (the *payload*); with
``trace=True`` also the order of the calls. The cost model
(``book.workers.costmodel``) predicts the same numbers, so tests compare the two.

On a ring of N ranks an all-reduce of P bytes moves 2(N-1)/N * P bytes out of every
rank (a reduce-scatter and an all-gather, each (N-1)/N * P); :func:`wire_bytes`
converts a payload into those bytes on the wire.
"""

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def wire_bytes(op: str, payload: float, world_size: int) -> float:
    """Bytes one rank sends for ``op`` on a ring of ``world_size`` ranks.

    ``payload`` is the full tensor for all_reduce, the full (unscattered) input for
    reduce_scatter, the full (gathered) output for all_gather, the message for
    broadcast/send, the whole input for all_to_all (the rank keeps 1/n of it).
    """
    n = world_size
    factors = {"all_reduce": 2 * (n - 1) / n, "reduce_scatter": (n - 1) / n,
               "all_gather": (n - 1) / n, "broadcast": 1.0, "send": 1.0,
               "all_to_all": (n - 1) / n}
    if op not in factors:
        raise ValueError(f"op must be one of {sorted(factors)}, got {op!r}")
    return factors[op] * payload


@dataclass
class CommStats:
    """Calls and payload bytes per collective, as seen by one rank; ``trace`` (a
    list, or None to keep none) gets ``(op, bytes)`` of every call in order."""

    calls: dict = field(default_factory=lambda: defaultdict(int))
    payload: dict = field(default_factory=lambda: defaultdict(int))
    trace: list | None = None

    def record(self, op: str, nbytes_: int) -> None:
        self.calls[op] += 1
        self.payload[op] += nbytes_
        if self.trace is not None:
            self.trace.append((op, nbytes_))

    def wire(self, world_size: int) -> float:
        """Bytes this rank sent in total, assuming ring algorithms."""
        return sum(wire_bytes(op, b, world_size) for op, b in self.payload.items())

    def reset(self) -> None:
        self.calls.clear()
        self.payload.clear()
        if self.trace is not None:
            self.trace.clear()


class Comm:
    """The collectives of one process group, counting the bytes each one carries
    (``trace=True``: also their order, in ``stats.trace``)."""

    def __init__(self, group: dist.ProcessGroup | None = None, trace: bool = False):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.stats = CommStats(trace=[] if trace else None)

    def global_rank(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def all_reduce(self, t, op=dist.ReduceOp.SUM, async_op=False):
        self.stats.record("all_reduce", nbytes(t))
        return dist.all_reduce(t, op=op, group=self.group, async_op=async_op)

    def reduce_scatter(self, out, inp, op=dist.ReduceOp.SUM, async_op=False):
        """``out`` (numel/N) receives this rank's chunk of the sum of every ``inp``."""
        self.stats.record("reduce_scatter", nbytes(inp))
        return dist.reduce_scatter_single(out, inp, op=op, group=self.group,
                                          async_op=async_op)

    def all_gather(self, out, inp, async_op=False):
        """``out`` (N * numel) receives every rank's ``inp``, in rank order."""
        self.stats.record("all_gather", nbytes(out))
        return dist.all_gather_single(out, inp, group=self.group, async_op=async_op)

    def all_to_all(self, out, inp):
        """Chunk j of ``inp`` goes to rank j; chunk j of ``out`` comes from rank j."""
        self.stats.record("all_to_all", nbytes(inp))
        return dist.all_to_all_single(out, inp, group=self.group)

    def broadcast(self, t, src: int = 0, async_op=False):
        self.stats.record("broadcast", nbytes(t))
        return dist.broadcast(t, src=self.global_rank(src), group=self.group,
                              async_op=async_op)

    def send(self, t, dst: int):
        self.stats.record("send", nbytes(t))
        dist.send(t.contiguous(), dst=self.global_rank(dst), group=self.group)

    def recv(self, t, src: int):
        dist.recv(t, src=self.global_rank(src), group=self.group)
        return t

    def send_recv(self, t, dst: int, buf, src: int) -> None:
        """Send ``t`` to ``dst`` while receiving ``buf`` from ``src``: posted together,
        so that a ring of ranks each sending to the next cannot deadlock."""
        self.stats.record("send", nbytes(t))
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.global_rank(dst),
                          self.group),
               dist.P2POp(dist.irecv, buf, self.global_rank(src), self.group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()


class HookState:
    """State of a communication hook: the group and the bytes the hook has sent.

    Hooks follow the ``DistributedDataParallel.register_comm_hook`` convention
    ``hook(state, bucket) -> Future[Tensor]``; the future's value is the averaged
    gradient bucket.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None):
        self.process_group = process_group
        self.bytes_sent = 0  # payload handed to collectives by this rank
        self.calls = 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    def count(self, *tensors: torch.Tensor) -> None:
        self.calls += 1
        self.bytes_sent += sum(nbytes(t) for t in tensors)


def allreduce_hook(state: HookState, bucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket with one asynchronous all-reduce (DDP's default)."""
    buf = bucket.buffer().div_(state.world_size)
    state.count(buf)
    work = dist.all_reduce(buf, group=state.process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])
