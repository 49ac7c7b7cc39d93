"""Context-parallel experiments: ring attention against one device's causal SDPA,
a GPT block on sharded tokens, what a rank holds and sends, and the ring's schedule
(chapter 16)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from book.workers.activations import saved_bytes
from book.workers.tensor import block_layouts, pairs
from llmcore.models.gpt import GPT
from llmcore.parallel.comm import Comm
from llmcore.parallel.context_parallel import (ContextParallel,
                                               ContextParallelAttention, sync_grads)


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def ring_traffic(batch: int, n_head: int, seq: int, head_size: int, world_size: int,
                 dtype_bytes: int = 4) -> dict:
    """Bytes one rank sends in a ring attention step (fp32 gradients): forward passes
    its k and v blocks on n - 1 times; backward passes them n - 1 times again plus
    their fp32 gradients n times (the last hop brings each home); one rank sends
    nothing."""
    kv = 2 * batch * n_head * (seq // world_size) * head_size
    n = world_size
    grad_hops = n if n > 1 else 0
    return {"forward": (n - 1) * kv * dtype_bytes,
            "backward": (n - 1) * kv * dtype_bytes + grad_hops * kv * 4}


def ring_saved_bytes(batch: int, n_head: int, seq: int, head_size: int,
                     world_size: int, dtype_bytes: int = 4) -> int:
    """What ring attention keeps for backward on one rank: q, k, v and the output of
    its T/n tokens, and their fp32 log-sum-exp."""
    tokens = batch * n_head * (seq // world_size)
    return 4 * tokens * head_size * dtype_bytes + 4 * tokens


def ring_worker(rank: int, world_size: int, shape: tuple, layout: str = "zigzag",
                seed: int = 0) -> dict:
    """:func:`ring_check` over all the ranks."""
    return ring_check(shape, layout, seed)


def ring_check(shape: tuple, layout: str = "zigzag", seed: int = 0,
               group=None) -> dict:
    """Causal attention of a (B, nh, T, hs) problem, whole on every rank and ring-
    parallel over ``group``: the largest differences of the output and of dq, dk, dv
    (this rank's tokens), the bytes sent, the activations saved, the scores
    computed."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, w = (torch.randn(*shape, generator=g) for _ in range(4))
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_saved, out = saved_bytes(
        lambda *a: F.scaled_dot_product_attention(*a, is_causal=True), *ref)
    (out * w).sum().backward()  # a loss that weighs every output differently
    cp = ContextParallel(Comm(group), layout)
    mine = [cp.shard(t).clone().requires_grad_() for t in (q, k, v)]
    saved, local = saved_bytes(cp.attention, *mine)
    forward_bytes = cp.comm.stats.payload["send"]
    (local * cp.shard(w)).sum().backward()
    gaps = {"out": _gap(local, cp.shard(out))}
    gaps.update({name: _gap(m.grad, cp.shard(r.grad))
                 for name, m, r in zip("qkv", mine, ref)})
    return {"gaps": gaps, "forward_bytes": forward_bytes,
            "backward_bytes": cp.comm.stats.payload["send"] - forward_bytes,
            "sends": cp.comm.stats.calls["send"], "saved": saved,
            "ref_saved": ref_saved, "score_elements": cp.score_elements,
            "positions": cp.positions(shape[2]).tolist(), "schedule": cp.schedule}


def block_check(cfg, batch: int = 2, layout: str = "zigzag", seed: int = 0,
                group=None) -> dict:
    """A GPT block (norms, MLP and residuals token-wise, attention by ring over
    ``group``) on this rank's tokens against the whole block on one device: largest
    differences of the output, the input gradient and every weight gradient (summed
    over the ranks)."""
    torch.manual_seed(seed)  # the same block on every rank
    block = GPT(cfg).blocks[0]
    g = torch.Generator().manual_seed(seed + 1)
    x, w = (torch.randn(batch, cfg.block_size, cfg.n_embd, generator=g)
            for _ in range(2))
    ref_x = x.clone().requires_grad_()
    ref = block(ref_x)
    (ref * w).sum().backward()
    comm = Comm(group)
    cp = ContextParallel(comm, layout)
    mine = copy.deepcopy(block)
    mine.zero_grad()
    mine.self_attn = ContextParallelAttention(mine.self_attn, cp)
    local_x = cp.shard(x).clone().requires_grad_()
    out = mine(local_x)
    (out * cp.shard(w)).sum().backward()
    sync_grads(mine, comm)
    gaps = {"out": _gap(out, cp.shard(ref)), "x": _gap(local_x.grad,
                                                        cp.shard(ref_x.grad))}
    theirs = dict(block.named_parameters())
    gaps["weights"] = max(_gap(p.grad, theirs[n.replace("self_attn.attn.",
                                                        "self_attn.")].grad)
                          for n, p in mine.named_parameters())
    return gaps


def context_demo(rank: int, world_size: int, cfg, batch: int = 2) -> dict:
    """What chapter 16 runs on its ranks (groups of two and all of them): a GPT
    block tensor and sequence parallel on both; ring attention on the demo GPT's
    attention shape in both layouts, and one of its blocks on sharded tokens
    (zigzag), on all of them."""
    shape = (batch, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
    pair = pairs(rank, world_size)
    return {"shape": shape,
            "layouts": {2: block_layouts(cfg, batch, pair),
                        world_size: block_layouts(cfg, batch)},
            "ring": {lay: ring_check(shape, lay) for lay in ("contiguous", "zigzag")},
            "block": block_check(cfg, batch, "zigzag")}
