"""Sequence parallelism: the parts of a block outside tensor parallelism, split by
token (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models").

Tensor parallelism splits the matmuls, but every rank still holds the whole (B, T, C)
stream around them: the norms' inputs and outputs, the residuals, the dropouts. These
are token-wise, so each of the n ranks can keep only T/n of the tokens. Where the
tensor-parallel region begins, an all-gather along T rebuilds the full sequence (the
column-parallel matmul needs every token); where it ends, a reduce-scatter along T
replaces the all-reduce of plain tensor parallelism: it sums the partial outputs and
leaves each rank its own tokens. An all-reduce *is* a reduce-scatter plus an
all-gather, so the forward moves the same bytes as tensor parallelism, and every
activation of the block is divided by n.

The all-gather and its matmul form one autograd function that saves only this rank's
shard and gathers it again in backward, so the full (B, T, C) input is never kept:
backward pays one more all-gather per gathered matmul for that (Megatron-LM does
the same, overlapping it with the input gradient's matmul). Norm weights see only
their rank's tokens: their gradients are summed over the group
(:meth:`SequenceParallelBlock.sync_grads`). Every collective goes through a
:class:`~llmcore.parallel.comm.Comm`, which counts its bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmcore.parallel.comm import Comm


def _gather_seq(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """(B, T/n, C) on every rank -> (B, T, C), the shards in rank order."""
    xt = x.transpose(0, 1).contiguous()  # (T/n, B, C): shards are contiguous
    out = xt.new_empty((comm.world_size * xt.shape[0], *xt.shape[1:]))
    comm.all_gather(out, xt)
    return out.transpose(0, 1)


def _reduce_scatter_seq(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """(B, T, C) partial sums on every rank -> this rank's (B, T/n, C) of the sum."""
    xt = x.transpose(0, 1).contiguous()  # (T, B, C)
    out = xt.new_empty((xt.shape[0] // comm.world_size, *xt.shape[1:]))
    comm.reduce_scatter(out, xt)
    return out.transpose(0, 1)


class _GatherLinear(torch.autograd.Function):
    """all-gather(x) @ W^T; backward re-gathers x and reduce-scatters dL/dx."""

    @staticmethod
    def forward(ctx, x, weight, comm):
        ctx.save_for_backward(x, weight)
        ctx.comm = comm
        return F.linear(_gather_seq(x, comm), weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        full = _gather_seq(x, ctx.comm)  # recomputed, never stored
        grad_w = grad.flatten(0, 1).t() @ full.flatten(0, 1)
        grad_x = _reduce_scatter_seq(grad @ weight, ctx.comm)
        return grad_x, grad_w, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return _reduce_scatter_seq(x, comm)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.comm), None


def _rows(w: torch.Tensor, n: int, r: int) -> nn.Parameter:
    return nn.Parameter(w.detach().chunk(n, 0)[r].clone())


class SequenceParallelBlock(nn.Module):
    """A pre-norm GPT block (``llmcore.nn.GPTBlock``, without biases) split over the
    ``group``: heads and MLP columns by tensor parallelism, everything else by token.

    ``forward`` takes and returns this rank's (B, T/n, C) tokens of a causal
    sequence. Every rank must pass the same block (same seed). ``self.comm`` counts
    the bytes (pass ``comm`` to share one).
    """

    def __init__(self, block: nn.Module, group=None, comm: Comm | None = None):
        super().__init__()
        attn = block.self_attn
        if attn.out_proj.bias is not None:
            raise ValueError("SequenceParallelBlock handles blocks without biases "
                             "(GPTConfig(bias=False), the default)")
        self.comm = comm or Comm(group)
        n, r = self.comm.world_size, self.comm.rank
        if attn.n_heads % n:
            raise ValueError(f"n_heads={attn.n_heads} must be divisible by the "
                             f"group size {n}")
        self.n = n
        self.norm1, self.norm2 = block.norm1, block.norm2
        self.dropout1, self.dropout2 = block.dropout1, block.dropout2
        self.head_size, self.attn_dropout = attn.head_size, attn.dropout
        q, k, v = (attn.qkv_proj.weight.chunk(3, 0) if attn.fused_qkv else
                   (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight))
        # this rank's heads: its rows of q, k and v, stacked [q_r | k_r | v_r]
        self.qkv = nn.Parameter(torch.cat([t.detach().chunk(n, 0)[r] for t in
                                           (q, k, v)]).clone())
        self.out = _rows(attn.out_proj.weight.t(), n, r)  # (C/n, C): its columns
        self.fc1 = _rows(block.ffn.linear1.weight, n, r)  # (4C/n, C)
        self.fc2 = _rows(block.ffn.linear2.weight.t(), n, r)  # (4C/n, C)
        self.act = block.ffn.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T/n, C) -> (B, T/n, C) for this rank's tokens."""
        b = x.shape[0]
        qkv = _GatherLinear.apply(self.norm1(x), self.qkv, self.comm)  # (B, T, 3C/n)
        t = qkv.shape[1]
        q, k, v = (z.view(b, t, -1, self.head_size).transpose(1, 2)
                   for z in qkv.chunk(3, -1))  # (B, nh/n, T, hs)
        drop = self.attn_dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        a = a.transpose(1, 2).reshape(b, t, -1) @ self.out  # (B, T, C) partial sum
        x = x + self.dropout1(_ReduceScatter.apply(a, self.comm))  # (B, T/n, C)
        h = self.act(_GatherLinear.apply(self.norm2(x), self.fc1, self.comm))
        return x + self.dropout2(_ReduceScatter.apply(h @ self.fc2, self.comm))

    def sync_grads(self) -> None:
        """Sum the norms' gradients over the group: each rank saw only its tokens."""
        for norm in (self.norm1, self.norm2):
            for p in norm.parameters():
                if p.grad is not None:
                    self.comm.all_reduce(p.grad)
