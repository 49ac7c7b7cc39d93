"""Tensor parallelism: every matrix of a block split across ranks (Megatron-LM).

Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter Language Models
Using Model Parallelism". A linear layer y = x W^T splits two ways:

* column-parallel: rank r holds rows r of W (a slice of the outputs); y comes out
  split along its last dimension;
* row-parallel: rank r holds columns r of W (a slice of the inputs); it takes the split
  input and produces a partial sum, all-reduced into y.

An MLP is column then row; attention is column (q, k, v: a slice of the heads) then row
(the output projection). Each block then needs only two communication operators:
``f`` (identity forward, all-reduce backward) where the region begins and ``g``
(all-reduce forward, identity backward) where it ends.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from llmcore.parallel.comm import Comm


# ------------------------------------------------- the communication operators


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


def _gather_last(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    out = x.new_empty(comm.world_size * x.numel())
    comm.all_gather(out, x.reshape(-1))
    return torch.cat(out.view(comm.world_size, *x.shape).unbind(0), dim=-1)


def _my_chunk(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    return x.chunk(comm.world_size, dim=-1)[comm.rank].contiguous()


class _GatherFromParallel(torch.autograd.Function):
    """Concatenate the ranks' slices of the last dimension; backward keeps our slice."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return _gather_last(x, comm)

    @staticmethod
    def backward(ctx, grad):
        return _my_chunk(grad, ctx.comm), None


class _ScatterToParallel(torch.autograd.Function):
    """Keep our slice of the last dimension; backward gathers the slices."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return _my_chunk(x, comm)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.comm), None


def copy_to_parallel(x, comm):
    return _CopyToParallel.apply(x, comm)


def reduce_from_parallel(x, comm):
    return _ReduceFromParallel.apply(x, comm)


def gather_from_parallel(x, comm):
    return _GatherFromParallel.apply(x, comm)


def scatter_to_parallel(x, comm):
    return _ScatterToParallel.apply(x, comm)


# ------------------------------------------------- the layers


def _split(n: int, comm: Comm, what: str) -> int:
    if n % comm.world_size:
        raise ValueError(f"{what}={n} must be divisible by the tensor-parallel size "
                         f"{comm.world_size}")
    return n // comm.world_size


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by rows: ``weight`` is (out_features / world, in)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 gather_output: bool = False, group=None, comm: Comm | None = None):
        super().__init__()
        self.comm = comm or Comm(group)
        self.gather_output = gather_output
        local = _split(out_features, self.comm, "out_features")
        self.weight = nn.Parameter(torch.empty(local, in_features))
        self.bias = nn.Parameter(torch.zeros(local)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear does

    def forward(self, x):
        y = F.linear(copy_to_parallel(x, self.comm), self.weight, self.bias)
        return gather_from_parallel(y, self.comm) if self.gather_output else y

    def full(self, t: torch.Tensor) -> torch.Tensor:
        """The unsplit tensor from every rank's ``t`` (weight, bias or a gradient)."""
        return _gather_last(t.T.contiguous(), self.comm).T if t.dim() == 2 else \
            _gather_last(t, self.comm)


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
        return _gather_last(t, self.comm) if t.dim() == 2 else t


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
        return _gather_last(t.T.contiguous(), self.comm).T


def _load(layer: nn.Module, weight: torch.Tensor, bias, dim: int) -> nn.Module:
    """Copy this rank's slice (along ``dim`` of the weight) of a whole layer."""
    comm = layer.comm
    with torch.no_grad():
        layer.weight.copy_(weight.chunk(comm.world_size, dim)[comm.rank])
        if bias is not None:
            part = bias.chunk(comm.world_size)[comm.rank] if dim == 0 else bias
            layer.bias.copy_(part)
    return layer


def column_from(linear: nn.Linear, comm: Comm, gather_output=False):
    layer = ColumnParallelLinear(linear.in_features, linear.out_features,
                                 linear.bias is not None, gather_output, comm=comm)
    return _load(layer, linear.weight, linear.bias, 0)


def row_from(linear: nn.Linear, comm: Comm):
    layer = RowParallelLinear(linear.in_features, linear.out_features,
                              linear.bias is not None, comm=comm)
    return _load(layer, linear.weight, linear.bias, 1)


class ParallelAttention(nn.Module):
    """Causal self-attention with n_heads / world heads per rank (Megatron, sec. 3).

    q, k, v are one fused column-parallel projection (one ``f``); the output
    projection is row-parallel (one ``g``). Built from an ``llmcore.nn``
    MultiHeadAttention; self-attention only, no KV cache.
    """

    def __init__(self, mha, comm: Comm):
        super().__init__()
        self.comm = comm
        self.n_heads = _split(mha.n_heads, comm, "n_heads")
        self.head_size, self.dropout = mha.head_size, mha.dropout
        c = mha.d_model
        has_bias = mha.q_proj.bias is not None
        self.qkv = ColumnParallelLinear(c, 3 * c, has_bias, comm=comm)
        with torch.no_grad():  # rank r: the q, k and v rows of its heads
            self.qkv.weight.copy_(torch.cat([_load_rows(p.weight, comm) for p in
                                             (mha.q_proj, mha.k_proj, mha.v_proj)]))
            if has_bias:
                self.qkv.bias.copy_(torch.cat([_load_rows(p.bias, comm) for p in
                                               (mha.q_proj, mha.k_proj, mha.v_proj)]))
        self.out_proj = row_from(mha.out_proj, comm)

    def forward(self, query, key=None, value=None, attn_mask=None, is_causal=False,
                kv_cache=None, need_weights=False):
        if key is not None or value is not None or kv_cache is not None or need_weights:
            raise ValueError("ParallelAttention does self-attention only: pass query "
                             "alone (no key, value, kv_cache or need_weights)")
        b, t, _ = query.shape
        qkv = self.qkv(query).view(b, t, 3, self.n_heads, self.head_size)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh_local, T, hs)
        drop = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=drop, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_size)
        return self.out_proj(out)  # (B, T, C)

    def full_tensors(self, grad: bool) -> dict[str, torch.Tensor]:
        """The whole q/k/v/out projections, named as in MultiHeadAttention."""
        pick = (lambda p: p.grad) if grad else (lambda p: p.detach())
        out = {}
        for kind in ("weight", "bias"):
            p = getattr(self.qkv, kind)
            if p is None:
                continue
            full = self.qkv.full(pick(p))  # rank blocks of [q_r; k_r; v_r]
            blocks = full.chunk(self.comm.world_size, 0)
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{name}.{kind}"] = torch.cat([bl.chunk(3, 0)[j] for bl in blocks])
            q = getattr(self.out_proj, kind)
            out[f"out_proj.{kind}"] = self.out_proj.full(pick(q))
        return out


def _load_rows(t: torch.Tensor, comm: Comm) -> torch.Tensor:
    return t.detach().chunk(comm.world_size, 0)[comm.rank]


# ------------------------------------------------- a whole GPT


def apply_tensor_parallel(model: nn.Module, group=None, vocab_parallel: bool = True):
    """Split llmcore's GPT across the ranks of ``group``, in place; return it.

    Attention becomes :class:`ParallelAttention`, each FFN's linear1 (and SwiGLU gate)
    column-parallel and linear2 row-parallel; with ``vocab_parallel`` the tied token
    embedding and output layer are split by vocabulary rows and the logits gathered.
    Norms and position embeddings stay replicated. ``model.tp_comm`` counts the bytes.
    Ranks must start from the same weights (same seed), since each keeps its slice.
    """
    comm = Comm(group)
    for block in model.blocks:
        block.self_attn = ParallelAttention(block.self_attn, comm)
        ffn = block.ffn
        ffn.linear1 = column_from(ffn.linear1, comm)
        if ffn.gate is not None:
            ffn.gate = column_from(ffn.gate, comm)
        ffn.linear2 = row_from(ffn.linear2, comm)
    if vocab_parallel:
        emb = model.tok_emb
        tok = VocabParallelEmbedding(emb.num_embeddings, emb.embedding_dim, comm=comm)
        _load(tok, emb.weight, None, 0)
        head = column_from(model.lm_head, comm, gather_output=True)
        head.weight = tok.weight  # still tied: the same (V / world, C) slice
        model.tok_emb, model.lm_head = tok, head
    model.tp_comm = comm
    return model


def full_tensors(model: nn.Module, grad: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or gradient) of a tensor-parallel model, unsplit, under the
    names of the original model; collective: call on every rank."""
    out: dict[str, torch.Tensor] = {}
    done: set[int] = set()
    for prefix, m in model.named_modules():
        pre = prefix + "." if prefix else ""
        if isinstance(m, ParallelAttention):
            out.update({pre + k: v for k, v in m.full_tensors(grad).items()})
            done.update(id(p) for p in m.parameters())
        elif isinstance(m, (ColumnParallelLinear, RowParallelLinear,
                            VocabParallelEmbedding)) and id(m.weight) not in done:
            for kind in ("weight", "bias"):
                p = getattr(m, kind, None)
                if p is not None:
                    out[pre + kind] = m.full(p.grad if grad else p.detach())
                    done.add(id(p))
    for name, p in model.named_parameters():
        if id(p) not in done:  # replicated
            out[name] = p.grad if grad else p.detach()
    return out


# ------------------------------------------------- the experiments the book runs


def _grad_gap(ref: nn.Module, model: nn.Module) -> float:
    """Largest difference between the reference's gradients and the unsplit ones."""
    grads = full_tensors(model, grad=True)
    return max((grads[n] - p.grad).abs().max().item()
               for n, p in ref.named_parameters())


def tp_worker(rank: int, world_size: int, cfg, x, y, seed: int = 0) -> dict:
    """One forward/backward of a GPT whole and tensor-parallel; losses, gradient gap,
    payload of the step and the size of this rank's slice."""
    from llmcore.models.gpt import GPT

    torch.manual_seed(seed)  # same weights on every rank; each keeps its slice
    ref = GPT(cfg)
    model = apply_tensor_parallel(copy.deepcopy(ref), None)
    _, loss = ref(x, y)
    loss.backward()
    _, tp_loss = model(x, y)
    tp_loss.backward()
    payload = dict(model.tp_comm.stats.payload)
    return {"loss": loss.item(), "tp_loss": tp_loss.item(), "payload": payload,
            "grad_gap": _grad_gap(ref, model),
            "local_params": sum(p.numel() for p in model.parameters())}


def hybrid_worker(rank: int, world_size: int, cfg, x, y, tp: int = 2,
                  seed: int = 0) -> dict:
    """Data x tensor parallel on a (dp, tp) device mesh: ranks of a row split every
    matrix, rows split the batch; gradients compared with one process."""
    from torch.distributed.device_mesh import init_device_mesh

    from llmcore.models.gpt import GPT
    from llmcore.parallel.data_parallel import NaiveDataParallel

    dp = world_size // tp
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(seed)
    ref = GPT(cfg)
    model = apply_tensor_parallel(copy.deepcopy(ref), mesh.get_group("tp"))
    ddp = NaiveDataParallel(model, mesh.get_group("dp"))
    row = mesh.get_local_rank("dp")
    _, loss = ddp(x.chunk(dp)[row], y.chunk(dp)[row])
    loss.backward()
    _, ref_loss = ref(x, y)
    ref_loss.backward()
    return {"coords": (row, mesh.get_local_rank("tp")),
            "grad_gap": _grad_gap(ref, model)}


def dtensor_worker(rank: int, world_size: int, cfg, x, y, seed: int = 0) -> float:
    """Our MLP slices against DTensor's ColwiseParallel/RowwiseParallel on the same
    GPT: the largest difference of a local weight gradient."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    from llmcore.models.gpt import GPT

    torch.manual_seed(seed)
    ref = GPT(cfg)
    mine = apply_tensor_parallel(copy.deepcopy(ref), None)
    theirs = copy.deepcopy(ref)
    mesh = init_device_mesh("cpu", (world_size,))
    plan = {"ffn.linear1": ColwiseParallel(), "ffn.linear2": RowwiseParallel()}
    for block in theirs.blocks:
        parallelize_module(block, mesh, plan)
    for model in (mine, theirs):
        model(x, y)[1].backward()
    gaps = []
    for a, b in zip(mine.blocks, theirs.blocks):
        for name in ("linear1", "linear2"):
            for kind in ("weight", "bias"):
                pa, pb = getattr(getattr(a.ffn, name), kind), \
                    getattr(getattr(b.ffn, name), kind)
                gb = pb.grad.to_local() if hasattr(pb.grad, "to_local") else pb.grad
                gaps.append((pa.grad - gb).abs().max().item())
    return max(gaps)
