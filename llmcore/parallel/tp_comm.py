"""The communication of tensor parallelism, as autograd functions (Megatron-LM, sec. 3).

Shoeybi et al. 2019 need only two operators around a tensor-parallel region:

* ``f`` = :func:`copy_to_parallel`: identity forward, all-reduce backward. The region's
  input is used by every rank, so its gradient is the sum of the ranks' gradients;
* ``g`` = :func:`reduce_from_parallel`: all-reduce forward, identity backward. Partial
  sums (of a row-parallel layer) become the full output; each rank passes the
  gradient on unchanged.

Two more move a tensor's last dimension between "split" and "whole":
:func:`gather_from_parallel` (all-gather forward, keep my slice backward) and
:func:`scatter_to_parallel` (keep my slice forward, all-gather backward). Every one
goes through a :class:`~llmcore.parallel.comm.Comm`, which counts the bytes.
"""

from __future__ import annotations

import torch

from llmcore.parallel.comm import Comm


def gather_last(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Every rank's ``x`` concatenated along the last dimension, in rank order."""
    out = x.new_empty(comm.world_size * x.numel())
    comm.all_gather(out, x.contiguous().reshape(-1))
    return torch.cat(out.view(comm.world_size, *x.shape).unbind(0), dim=-1)


def my_chunk(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """This rank's slice of the last dimension."""
    return x.chunk(comm.world_size, dim=-1)[comm.rank].contiguous()


class _CopyToParallel(torch.autograd.Function):
    """f: the input is used by every rank, so its gradients are summed."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        ctx.comm.all_reduce(grad)
        return grad, None


class _ReduceFromParallel(torch.autograd.Function):
    """g: partial sums become the full output; each rank passes the gradient on."""

    @staticmethod
    def forward(ctx, x, comm):
        x = x.contiguous().clone()
        comm.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromParallel(torch.autograd.Function):
    """Concatenate the ranks' slices of the last dimension; backward keeps our slice."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return gather_last(x, comm)

    @staticmethod
    def backward(ctx, grad):
        return my_chunk(grad, ctx.comm), None


class _ScatterToParallel(torch.autograd.Function):
    """Keep our slice of the last dimension; backward gathers the slices."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return my_chunk(x, comm)

    @staticmethod
    def backward(ctx, grad):
        return gather_last(grad, ctx.comm), None


def copy_to_parallel(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    return _CopyToParallel.apply(x, comm)


def reduce_from_parallel(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    return _ReduceFromParallel.apply(x, comm)


def gather_from_parallel(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    return _GatherFromParallel.apply(x, comm)


def scatter_to_parallel(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    return _ScatterToParallel.apply(x, comm)
