"""Context parallelism (ring attention): on rings of 2 and 4 gloo processes the
output and the gradients of q, k and v equal one device's causal SDPA, a GPT block on
sharded tokens equals the whole block, and the bytes sent, the activations kept and
the scores computed per rank equal their formulas."""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from book.workers.context import block_check, ring_check, ring_saved_bytes, ring_traffic
from llmcore.models.gpt import GPTConfig
from llmcore.nn.attention import MultiHeadAttention
from llmcore.nn.positional import RotaryEmbedding
from book.workers.launch import launch
from llmcore.parallel.comm import Comm
from llmcore.parallel.context_parallel import (LAYOUTS, ContextParallel,
                                               ContextParallelAttention, chunk_ids,
                                               shard_sequence)

SHAPE = (2, 3, 16, 8)  # (B, nh, T, hs)
CFG = GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=4, n_embd=32)
TOL = 2e-6  # fp32: the ring sums the softmax in another order than SDPA


def rope_check(group):
    """Attention with rotary embeddings: each chunk must rotate at its global
    positions, so a wrong offset shows in the output."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4, bias=False, rope=RotaryEmbedding(8, 16),
                              fused_qkv=True)
    x = torch.randn(2, 16, 32)
    ref = attn(x, is_causal=True)
    cp = ContextParallel(Comm(group), "zigzag")
    return (ContextParallelAttention(attn, cp)(cp.shard(x)) - cp.shard(ref)).abs().max(
        ).item()


def four_ranks(rank, world_size):
    """One launch for every check: rings of 4 ranks, and of 2 (two subgroups, whose
    ranks are not the global ones, run side by side)."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pair = pairs[rank // 2]
    return {4: {lay: ring_check(SHAPE, lay) for lay in LAYOUTS},
            2: {lay: ring_check(SHAPE, lay, group=pair) for lay in LAYOUTS},
            "block": [block_check(CFG, 2, "zigzag"),
                      block_check(CFG, 2, "contiguous", group=pair)],
            "rope": rope_check(pair)}


def check_ring(r, n):
    assert max(r["gaps"].values()) < TOL, r["gaps"]
    traffic = ring_traffic(*SHAPE[:3], SHAPE[3], n)
    assert r["forward_bytes"] == traffic["forward"]
    assert r["backward_bytes"] == traffic["backward"]
    assert r["sends"] == 3 * (n - 1) + 1  # kv: n-1 + n-1 hops, gradients: n hops
    # what each rank keeps for backward is exactly 1/n of one device's SDPA
    assert r["saved"] == ring_saved_bytes(*SHAPE[:3], SHAPE[3], n)
    assert r["saved"] * n == r["ref_saved"]


@pytest.mark.distributed
def test_ring_attention_and_a_gpt_block_on_two_and_four_ranks_equal_one_device():
    ranks = launch(four_ranks, 4, backend="gloo")
    t = SHAPE[2]
    for rank, res in enumerate(ranks):
        for n in (2, 4):
            for layout in LAYOUTS:
                check_ring(res[n][layout], n)
            # contiguous: rank r computes r + 1 blocks of (T/n)^2 scores; zigzag:
            # 2n + 1 chunk pairs of (T/2n)^2 on every rank
            work = {lay: res[n][lay]["score_elements"] for lay in LAYOUTS}
            assert work["contiguous"] == (rank % n + 1) * (t // n) ** 2
            assert work["zigzag"] == (2 * n + 1) * (t // (2 * n)) ** 2
            # the schedule: at step s the block of rank r - s, its pairs counted
            for lay in LAYOUTS:
                sched = res[n][lay]["schedule"]
                assert [(s, src) for s, src, _ in sched] == [
                    (s, (rank % n - s) % n) for s in range(n)]
            pairs = {lay: [k for *_, k in res[n][lay]["schedule"]] for lay in LAYOUTS}
            assert sum(pairs["contiguous"]) == rank % n + 1
            assert pairs["zigzag"] == [3] + [2] * (n - 1)
        for gaps in res["block"]:
            assert max(gaps.values()) < TOL, gaps
        assert res["rope"] < TOL
    for n in (2, 4):
        held = [p for res in ranks[:n] for p in res[n]["zigzag"]["positions"]]
        assert sorted(held) == list(range(t))  # every token on exactly one rank
    assert ranks[0][4]["zigzag"]["positions"] == [0, 1, 14, 15]


def one_rank(layout="zigzag"):
    return ContextParallel(SimpleNamespace(rank=0, world_size=1), layout)


def test_one_rank_merges_its_chunks_exactly():
    """On one rank the zigzag layout still splits the sequence into two chunks: the
    online-softmax merge and the hand-written backward alone against SDPA."""
    g = torch.Generator().manual_seed(0)
    q, k, v, w = (torch.randn(*SHAPE, generator=g, dtype=torch.float64)
                  for _ in range(4))
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    (F.scaled_dot_product_attention(*ref, is_causal=True) * w).sum().backward()
    mine = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.autograd.gradcheck(one_rank().attention, [t[:1, :1, :4, :2].clone()
                                                    .requires_grad_() for t in mine])
    (one_rank().attention(*mine) * w).sum().backward()
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a.grad, b.grad)


def test_layouts_and_shards():
    assert chunk_ids(1, 4, "zigzag") == [1, 6]
    assert chunk_ids(1, 4, "contiguous") == [1]
    x = torch.arange(16)
    assert shard_sequence(x, 0, 2, "zigzag", dim=0).tolist() == [0, 1, 2, 3, 12, 13,
                                                                 14, 15]
    assert shard_sequence(x, 1, 2, "contiguous", dim=0).tolist() == list(range(8, 16))
    assert ring_traffic(*SHAPE, 1) == {"forward": 0, "backward": 0}


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="divisible by 8"):
        shard_sequence(torch.zeros(2, 12, 4), 0, 4, "zigzag")
    with pytest.raises(ValueError, match="layout must be one of"):
        chunk_ids(0, 2, "striped")
    with pytest.raises(ValueError, match="rank=2"):
        chunk_ids(2, 2)
    with pytest.raises(ValueError, match="share one"):
        one_rank().attention(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8),
                             torch.zeros(1, 2, 6, 8))
    with pytest.raises(ValueError, match="cannot hold 2 equal chunks"):
        z = torch.zeros(1, 2, 5, 8)
        one_rank().attention(z, z, z)
    with pytest.raises(ValueError, match="dropout"):
        ContextParallelAttention(MultiHeadAttention(8, 2, dropout=0.1), one_rank())
    attn = ContextParallelAttention(MultiHeadAttention(8, 2), one_rank())
    with pytest.raises(ValueError, match="causal self-attention only"):
        attn(torch.zeros(1, 4, 8), is_causal=False)
