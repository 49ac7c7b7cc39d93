"""Context parallelism: causal ring attention over the ranks of a group (Liu et al.
2023, "Ring Attention with Blockwise Transformers"; Brandon et al. 2023, "Striped
Attention", for the load balance).

Sequence parallelism (``sequence_parallel.py``) splits the tokens outside attention
but gathers the whole sequence for it. Context parallelism splits attention too:
each of the n ranks keeps the queries, keys and values of T/n tokens. Its queries
still need every earlier key, so the key/value blocks travel around a ring: at step
s, rank r computes with the block of rank r - s while it already sends that block on
to rank r + 1 (the transfer overlaps the compute). Each block gives a partial softmax;
partial results merge exactly with their log-sum-exp (the online softmax of Milakov
and Gimelshein 2018, as in flash attention):

    lse = logaddexp(lse_a, lse_b);  out = out_a e^(lse_a - lse) + out_b e^(lse_b - lse)

so no rank ever holds a (T, T) matrix or the whole sequence's keys at once.

Causality decides the balance. With contiguous chunks rank n - 1 attends to all n
blocks and rank 0 to one: the last rank does ~2n/(n + 1) times the average work.
The *zigzag* layout cuts the sequence into 2n chunks and gives rank r chunks r and
2n - 1 - r (one early, one late): every rank computes the same 2n + 1 chunk pairs.
Pairs entirely above the diagonal are skipped, diagonal pairs are masked.

Backward is hand-written and rings too: each rank keeps only its q, k, v, output and
log-sum-exp (1/n of one device's), recomputes the probabilities block by block, and
the key/value blocks travel around the ring again, each with the gradient of its keys
and values accumulated on the way until it arrives home.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from llmcore.parallel.comm import Comm, nbytes

LAYOUTS = ("contiguous", "zigzag")


def chunk_ids(rank: int, world_size: int, layout: str = "zigzag") -> list[int]:
    """The global chunk indices rank ``rank`` holds, in order: n chunks
    (contiguous) or 2n (zigzag) of the sequence."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    return [rank] if layout == "contiguous" else [rank, 2 * world_size - 1 - rank]


def shard_sequence(x: Tensor, rank: int, world_size: int, layout: str = "zigzag",
                   dim: int = -2) -> Tensor:
    """This rank's tokens of ``x`` along ``dim`` (its chunks concatenated)."""
    ids = chunk_ids(rank, world_size, layout)
    parts = world_size * len(ids)
    if x.shape[dim] % parts:
        raise ValueError(f"sequence length {x.shape[dim]} (dim {dim}) must be "
                         f"divisible by {parts} for layout={layout!r} on {world_size} "
                         f"ranks; pad the sequence or change the context length")
    chunks = x.chunk(parts, dim)
    return torch.cat([chunks[i] for i in ids], dim)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Softmax sums in fp32 at least (bf16 inputs), fp64 stays fp64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _block(q, k, v, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Attention of one query chunk on one key chunk, in fp32 or wider: (out, lse)."""
    acc = _acc(q.dtype)
    s = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale  # (B, nh, c, c)
    if causal:
        s = s.masked_fill(_upper(s), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, nh, c)
    return torch.exp(s - lse.unsqueeze(-1)) @ v.to(acc), lse


def _merge(out, lse, o, l) -> tuple[Tensor, Tensor]:
    """The online softmax: two partial results for the same queries become one."""
    new = torch.logaddexp(lse, l)  # (B, nh, c): log of both blocks' sums
    return (out * torch.exp(lse - new).unsqueeze(-1)
            + o * torch.exp(l - new).unsqueeze(-1)), new


def _upper(s: Tensor) -> Tensor:
    c = s.shape[-1]
    return torch.ones(c, c, dtype=torch.bool, device=s.device).triu(1)


class ContextParallel:
    """The sequence split of one process group and its ring attention.

    ``layout``: ``"zigzag"`` (balanced under the causal mask) or ``"contiguous"``.
    Counts what a step costs: bytes sent (``comm.stats``, op ``"send"``) and the
    attention-score elements this rank computed per (batch, head), ``score_elements``;
    ``schedule`` lists, per forward ring step, (step, rank whose keys and values were
    used, chunk pairs computed).
    """

    def __init__(self, comm: Comm, layout: str = "zigzag"):
        self.comm = comm
        self.rank, self.n = comm.rank, comm.world_size
        self.layout = layout
        self.ids = chunk_ids(self.rank, self.n, layout)
        self.score_elements = 0
        self.schedule: list[tuple[int, int, int]] = []

    def shard(self, x: Tensor, dim: int = -2) -> Tensor:
        return shard_sequence(x, self.rank, self.n, self.layout, dim)

    def positions(self, seq: int) -> Tensor:
        """Global positions (in the whole sequence of ``seq``) of this rank's tokens."""
        return self.shard(torch.arange(seq), dim=0)

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal attention of this rank's (B, nh, T/n, hs) tokens on the whole
        sequence; the same result as one device's SDPA(is_causal=True), sharded."""
        if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
            raise ValueError(f"q, k, v must share one (B, nh, T/n, hs) shape, got "
                             f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        if q.shape[-2] % len(self.ids):
            raise ValueError(f"{q.shape[-2]} local tokens cannot hold "
                             f"{len(self.ids)} equal chunks (layout={self.layout!r}); "
                             f"shard the sequence with ContextParallel.shard")
        return _RingAttention.apply(q, k, v, self)

    def _pairs(self, src: int, c: int):
        """(query slice, key slice, diagonal?) for every chunk pair that a query of
        ours may see in the block of rank ``src``; fully masked pairs are skipped."""
        for i, a in enumerate(self.ids):
            for j, b in enumerate(chunk_ids(src, self.n, self.layout)):
                if b <= a:
                    yield slice(i * c, (i + 1) * c), slice(j * c, (j + 1) * c), a == b

    def _shift(self, tensors: list[Tensor]):
        """Send ``tensors`` to the next rank and receive the previous rank's, without
        waiting: returns (works, buffers). P2P ops are batched so every rank posts
        its send and its receive together, which cannot deadlock."""
        comm, ops, bufs = self.comm, [], []
        nxt = comm.global_rank((self.rank + 1) % self.n)
        prv = comm.global_rank((self.rank - 1) % self.n)
        for t in tensors:
            buf = torch.empty_like(t)
            comm.stats.record("send", nbytes(t))
            ops += [dist.P2POp(dist.isend, t, nxt, comm.group),
                    dist.P2POp(dist.irecv, buf, prv, comm.group)]
            bufs.append(buf)
        return dist.batch_isend_irecv(ops), bufs


def _wait(pending) -> list[Tensor]:
    works, bufs = pending
    for w in works:
        w.wait()
    return bufs


class _RingAttention(torch.autograd.Function):
    """Ring attention forward and backward; saves q, k, v, out and lse only."""

    @staticmethod
    def forward(ctx, q, k, v, cp: ContextParallel):
        scale = 1.0 / math.sqrt(q.shape[-1])
        c = q.shape[-2] // len(cp.ids)
        acc = _acc(q.dtype)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc,
                         device=q.device)  # (B, nh, T/n)
        kv = torch.stack([k, v]).contiguous()  # (2, B, nh, T/n, hs): one message
        for step in range(cp.n):
            # start passing this block on before computing with it: overlap
            pending = cp._shift([kv]) if step < cp.n - 1 else None
            src = (cp.rank - step) % cp.n
            pairs = list(cp._pairs(src, c))
            cp.schedule.append((step, src, len(pairs)))
            for qs, ks, diag in pairs:
                o, l = _block(q[..., qs, :], kv[0][..., ks, :], kv[1][..., ks, :],
                              diag, scale)
                cp.score_elements += c * c
                out[..., qs, :], lse[..., qs] = _merge(out[..., qs, :], lse[..., qs],
                                                       o, l)
            if pending is not None:
                kv = _wait(pending)[0]
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cp, ctx.scale, ctx.c = cp, scale, c
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        cp, scale, c = ctx.cp, ctx.scale, ctx.c
        acc = lse.dtype
        do = grad.to(acc)
        delta = (do * out.to(acc)).sum(-1)  # (B, nh, T/n): rowsum(dO * O)
        qf = q.to(acc)
        dq = torch.zeros_like(qf)
        kv = torch.stack([k, v]).contiguous()
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)
        for step in range(cp.n):
            pending = cp._shift([kv]) if step < cp.n - 1 else None
            kf, vf = kv[0].to(acc), kv[1].to(acc)
            for qs, ks, diag in cp._pairs((cp.rank - step) % cp.n, c):
                s = (qf[..., qs, :] @ kf[..., ks, :].transpose(-2, -1)) * scale
                if diag:
                    s = s.masked_fill(_upper(s), float("-inf"))
                p = torch.exp(s - lse[..., qs].unsqueeze(-1))  # recomputed probs
                dkv[1][..., ks, :] += p.transpose(-2, -1) @ do[..., qs, :]
                ds = p * (do[..., qs, :] @ vf[..., ks, :].transpose(-2, -1)
                          - delta[..., qs].unsqueeze(-1)) * scale
                dq[..., qs, :] += ds @ kf[..., ks, :]
                dkv[0][..., ks, :] += ds.transpose(-2, -1) @ qf[..., qs, :]
            # the block's gradient follows its keys and values around the ring; the
            # last hop brings every rank its own (it cannot overlap: it was just summed)
            if cp.n > 1:
                dkv = _wait(cp._shift([dkv]))[0]
            if pending is not None:
                kv = _wait(pending)[0]
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None


class ContextParallelAttention(nn.Module):
    """A ``llmcore.nn.MultiHeadAttention`` run on this rank's tokens with ring
    attention; the module's weights are used as they are (every rank holds them all).

    Swap it for a block's ``self_attn``: the block then takes this rank's (B, T/n, C)
    tokens. Only causal self-attention without dropout, mask or KV cache is split.
    """

    def __init__(self, attn: nn.Module, cp: ContextParallel):
        super().__init__()
        if attn.dropout > 0:
            raise ValueError(f"attention dropout={attn.dropout} is not supported by "
                             f"ring attention; build the model with dropout=0.0")
        self.attn, self.cp = attn, cp

    def forward(self, query: Tensor, key: Tensor | None = None,
                value: Tensor | None = None, attn_mask: Tensor | None = None,
                is_causal: bool = True, kv_cache=None) -> Tensor:
        if key is not None or value is not None or attn_mask is not None or (
                kv_cache is not None or not is_causal):
            raise ValueError("ContextParallelAttention computes causal self-attention "
                             "only: pass is_causal=True and no key, value, attn_mask "
                             "or kv_cache")
        a = self.attn
        a._check("query", query)
        q, k, v = (a.split_heads(x) for x in a.project_qkv(query, query, query))
        if a.rope is not None:  # rotate each chunk at its global positions
            q, k = self._rope(q), self._rope(k)
        return a.out_proj(a.merge_heads(self.cp.attention(q, k, v)))  # (B, T/n, C)

    def _rope(self, x: Tensor) -> Tensor:
        c = x.shape[-2] // len(self.cp.ids)
        return torch.cat([self.attn.rope(part, offset=i * c) for i, part in
                          zip(self.cp.ids, x.split(c, dim=-2))], dim=-2)


def sync_grads(module: nn.Module, comm: Comm) -> None:
    """Sum the parameters' gradients over the group: each rank saw only its tokens,
    and a weight's gradient is the sum over all tokens."""
    for p in module.parameters():
        if p.grad is not None:
            comm.all_reduce(p.grad)
