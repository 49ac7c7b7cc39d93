"""Tensor parallelism: every matrix of a block split across ranks (Megatron-LM).

Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter Language Models
Using Model Parallelism". A linear layer y = x W^T splits two ways:

* column-parallel: rank r holds rows r of W (a slice of the outputs); y comes out
  split along its last dimension;
* row-parallel: rank r holds columns r of W (a slice of the inputs); it takes the split
  input and produces a partial sum, all-reduced into y.

An MLP is column then row; attention is column (the fused q/k/v projection: a slice
of the heads) then row (the output projection). Each block then needs only the two
operators of :mod:`llmcore.parallel.tp_comm`: ``f`` where the region begins and ``g``
where it ends. :func:`apply_tensor_parallel` swaps the GPT's linear layers for these,
in place; the attention module itself is unchanged, since it runs on however many
heads its projection produces (projection width // head size).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmcore.nn.swap import set_submodule
from llmcore.parallel.comm import Comm
from llmcore.parallel.rng import RNGTracker, fork_around, tp_region_seed
from llmcore.parallel.tp_comm import (copy_to_parallel, gather_from_parallel,
                                      gather_last, reduce_from_parallel,
                                      scatter_to_parallel)


def _split(n: int, comm: Comm, what: str) -> int:
    if n % comm.world_size:
        raise ValueError(f"{what}={n} must be divisible by the tensor-parallel size "
                         f"{comm.world_size}")
    return n // comm.world_size


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by rows: ``weight`` is (out_features / world, in).

    ``parts``: the rows hold that many stacked matrices (3 for a fused q/k/v
    projection); each rank keeps its slice of every part, so its output is
    [q_r | k_r | v_r].
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 gather_output: bool = False, group=None, comm: Comm | None = None,
                 parts: int = 1):
        super().__init__()
        self.comm = comm or Comm(group)
        self.gather_output, self.parts = gather_output, parts
        local = _split(out_features // parts, self.comm, "out_features") * parts
        self.weight = nn.Parameter(torch.empty(local, in_features))
        self.bias = nn.Parameter(torch.zeros(local)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear does

    def forward(self, x):
        y = F.linear(copy_to_parallel(x, self.comm), self.weight, self.bias)
        return gather_from_parallel(y, self.comm) if self.gather_output else y

    def full(self, t: torch.Tensor) -> torch.Tensor:
        """The unsplit tensor from every rank's ``t`` (weight, bias or a gradient)."""
        whole = gather_last(t.T.contiguous(), self.comm).T if t.dim() == 2 else \
            gather_last(t, self.comm)
        if self.parts == 1:
            return whole
        # rank blocks [q_0; k_0; v_0; q_1; ...] -> [q_0; q_1; ...; k_0; ...]
        blocks = [b.chunk(self.parts) for b in whole.chunk(self.comm.world_size)]
        return torch.cat([b[j] for j in range(self.parts) for b in blocks])


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by columns: ``weight`` is (out, in_features / world).

    The bias is whole and added once, after the all-reduce of the partial sums.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 input_is_parallel: bool = True, group=None, comm: Comm | None = None):
        super().__init__()
        self.comm = comm or Comm(group)
        self.input_is_parallel = input_is_parallel
        local = _split(in_features, self.comm, "in_features")
        self.weight = nn.Parameter(torch.empty(out_features, local))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x):
        if not self.input_is_parallel:
            x = scatter_to_parallel(x, self.comm)
        y = reduce_from_parallel(F.linear(x, self.weight), self.comm)
        return y + self.bias if self.bias is not None else y

    def full(self, t: torch.Tensor) -> torch.Tensor:
        return gather_last(t, self.comm) if t.dim() == 2 else t


class VocabParallelEmbedding(nn.Module):
    """An embedding table split by rows: rank r looks up ids in its vocabulary range
    and contributes zeros elsewhere; an all-reduce assembles the vectors."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group=None,
                 comm: Comm | None = None):
        super().__init__()
        self.comm = comm or Comm(group)
        local = _split(num_embeddings, self.comm, "num_embeddings")
        self.start, self.end = self.comm.rank * local, (self.comm.rank + 1) * local
        self.weight = nn.Parameter(torch.randn(local, embedding_dim))

    def forward(self, idx):
        outside = (idx < self.start) | (idx >= self.end)
        local = (idx - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_parallel(out, self.comm)  # (B, T, C)

    def full(self, t: torch.Tensor) -> torch.Tensor:
        return gather_last(t.T.contiguous(), self.comm).T


def _slice(t: torch.Tensor, comm: Comm, dim: int, parts: int = 1) -> torch.Tensor:
    """This rank's slice along ``dim`` of each of ``parts`` stacked matrices."""
    return torch.cat([p.chunk(comm.world_size, dim)[comm.rank]
                      for p in t.detach().chunk(parts, dim)], dim)


def _load(layer: nn.Module, weight: torch.Tensor, bias, dim: int,
          parts: int = 1) -> nn.Module:
    """Copy this rank's slice (along ``dim`` of the weight) of a whole layer."""
    with torch.no_grad():
        layer.weight.copy_(_slice(weight, layer.comm, dim, parts))
        if bias is not None:
            layer.bias.copy_(_slice(bias, layer.comm, 0, parts) if dim == 0 else bias)
    return layer


def column_from(linear: nn.Linear, comm: Comm, gather_output=False, parts: int = 1):
    """The column-parallel twin of ``linear``, holding this rank's rows."""
    layer = ColumnParallelLinear(linear.in_features, linear.out_features,
                                 linear.bias is not None, gather_output, comm=comm,
                                 parts=parts)
    return _load(layer, linear.weight, linear.bias, 0, parts)


def row_from(linear: nn.Linear, comm: Comm):
    """The row-parallel twin of ``linear``, holding this rank's columns."""
    layer = RowParallelLinear(linear.in_features, linear.out_features,
                              linear.bias is not None, comm=comm)
    return _load(layer, linear.weight, linear.bias, 1)


# ------------------------------------------------- a whole GPT


def apply_tensor_parallel(model: nn.Module, group=None, vocab_parallel: bool = True,
                          seed: int | None = None) -> nn.Module:
    """Split llmcore's GPT across the ranks of ``group``, in place; return it.

    In every block the fused q/k/v projection becomes column-parallel (each rank keeps
    the rows of its heads in q, in k and in v) and the output projection row-parallel;
    the FFN's linear1 (and SwiGLU gate) column-parallel, linear2 row-parallel. With
    ``vocab_parallel`` the tied token embedding and output layer are split by
    vocabulary rows and the logits gathered. Norms and position embeddings stay
    replicated. ``model.tp_comm`` counts the bytes.

    ``seed``: gives the tensor-parallel region (attention and FFN, which work on this
    rank's heads and hidden units) its own random stream, different on every rank,
    in ``model.tp_rng``; dropout outside the region uses the default generator, which
    must be seeded alike on the ranks of ``group``. Ranks must start from the same
    weights (same seed), since each keeps its slice.
    """
    comm = Comm(group)
    tracker = None
    if seed is not None:
        tracker = RNGTracker()
        tracker.add("tp", tp_region_seed(seed, comm.rank))
    for block in model.blocks:
        attn, ffn = block.self_attn, block.ffn
        _split(attn.n_heads, comm, "n_heads")
        if attn.fused_qkv:
            attn.qkv_proj = column_from(attn.qkv_proj, comm, parts=3)
        else:
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attn, name, column_from(getattr(attn, name), comm))
        attn.out_proj = row_from(attn.out_proj, comm)
        ffn.linear1 = column_from(ffn.linear1, comm)
        if ffn.gate is not None:
            ffn.gate = column_from(ffn.gate, comm)
        ffn.linear2 = row_from(ffn.linear2, comm)
        if tracker is not None:
            fork_around(attn, tracker, "tp")
            fork_around(ffn, tracker, "tp")
    if vocab_parallel:
        emb = model.tok_emb
        tok = VocabParallelEmbedding(emb.num_embeddings, emb.embedding_dim, comm=comm)
        _load(tok, emb.weight, None, 0)
        head = column_from(model.lm_head, comm, gather_output=True)
        head.weight = tok.weight  # still tied: the same (V / world, C) slice
        set_submodule(model, "tok_emb", tok)
        set_submodule(model, "lm_head", head)
    model.tp_comm, model.tp_rng = comm, tracker
    return model


def full_tensors(model: nn.Module, grad: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or gradient) of a tensor-parallel model, unsplit, under the
    names of the original model; collective: call on every rank."""
    out: dict[str, torch.Tensor] = {}
    done: set[int] = set()
    for prefix, m in model.named_modules():
        if not isinstance(m, (ColumnParallelLinear, RowParallelLinear,
                              VocabParallelEmbedding)) or id(m.weight) in done:
            continue
        pre = prefix + "." if prefix else ""
        for kind in ("weight", "bias"):
            p = getattr(m, kind, None)
            if p is not None:
                out[pre + kind] = m.full(p.grad if grad else p.detach())
                done.add(id(p))
    for name, p in model.named_parameters():
        if id(p) not in done:  # replicated
            out[name] = p.grad if grad else p.detach()
    return out
