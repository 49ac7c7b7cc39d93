"""Tensor parallelism: the split GPT computes the loss and every gradient of the whole
one; the layers match DTensor's ColwiseParallel / RowwiseParallel."""

import copy

import pytest
import torch
from torch import nn

from book.workers.costmodel import tp_payload
from book.workers.tensor import dtensor_worker, hybrid_worker
from llmcore.models.gpt import GPT, GPTConfig
from book.workers.launch import launch
from llmcore.parallel.comm import Comm
from llmcore.parallel.rng import RNGTracker, rank_seed, tp_region_seed
from llmcore.parallel.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                              VocabParallelEmbedding,
                                              apply_tensor_parallel, column_from,
                                              full_tensors, row_from)

pytestmark = pytest.mark.distributed
CFG = GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=4, n_embd=16)


def gpt_parity(rank, world_size):
    torch.manual_seed(0)
    model = GPT(CFG)
    idx = torch.randint(32, (3, 8), generator=torch.Generator().manual_seed(1))
    tgt = torch.randint(32, (3, 8), generator=torch.Generator().manual_seed(2))
    tp = apply_tensor_parallel(copy.deepcopy(model), None)
    assert tp.blocks[0].ffn.linear1.weight.shape == (4 * 16 // world_size, 16)
    assert tp.blocks[0].ffn.linear2.weight.shape == (16, 4 * 16 // world_size)
    _, loss = model(idx, tgt)
    loss.backward()
    tp.tp_comm.stats.reset()
    _, tp_loss = tp(idx, tgt)
    tp_loss.backward()
    payload = dict(tp.tp_comm.stats.payload)  # one training step
    grads = full_tensors(tp, grad=True)
    weights = full_tensors(tp, grad=False)
    ref = dict(model.named_parameters())
    return {"loss": (loss.item(), tp_loss.item()),
            "grad": max((grads[n] - p.grad).abs().max().item() for n, p in ref.items()),
            "weight": max((weights[n] - p).abs().max().item() for n, p in ref.items()),
            "names": sorted(grads) == sorted(ref),
            "payload": payload}


def layers_vs_dtensor(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 6))
    x = torch.randn(5, 8)
    comm = Comm()
    mine = nn.Sequential(column_from(mlp[0], comm), nn.GELU(), row_from(mlp[2], comm))
    mesh = init_device_mesh("cpu", (world_size,))
    theirs = parallelize_module(copy.deepcopy(mlp), mesh,
                                {"0": ColwiseParallel(), "2": RowwiseParallel()})
    y_mine, y_theirs, y_ref = mine(x), theirs(x), mlp(x)
    (y_mine ** 2).sum().backward()
    (y_theirs ** 2).sum().backward()
    diff = [(y_mine - y_theirs).abs().max(), (y_mine - y_ref).abs().max()]
    for a, b in [(mine[0], theirs[0]), (mine[2], theirs[2])]:
        for name in ("weight", "bias"):
            pa, pb = getattr(a, name), getattr(b, name)
            diff.append((pa.grad - pb.grad.to_local()).abs().max())
            diff.append((pa - pb.to_local()).abs().max())
    # the other layouts: gathered column output, row layer fed the whole input
    col = column_from(mlp[0], comm, gather_output=True)
    row = RowParallelLinear(12, 6, input_is_parallel=False, comm=comm)
    row.weight.data.copy_(mlp[2].weight.chunk(world_size, 1)[rank])
    row.bias.data.copy_(mlp[2].bias)
    diff.append((row(col(x)) - mlp[2](mlp[0](x))).abs().max())
    emb = nn.Embedding(10, 4)
    vemb = VocabParallelEmbedding(10, 4, comm=comm)
    vemb.weight.data.copy_(emb.weight.chunk(world_size)[rank])
    ids = torch.randint(10, (3, 5))
    diff.append((vemb(ids) - emb(ids)).abs().max())
    return max(d.item() for d in diff)


def odd_column():
    try:
        ColumnParallelLinear(4, 3)
    except ValueError as err:
        return str(err)
    return ""


def every_check(rank, world_size):
    x = torch.randint(32, (4, 8), generator=torch.Generator().manual_seed(3))
    return {"gpt": gpt_parity(rank, world_size),
            "gpt_dtensor": dtensor_worker(rank, world_size, CFG, x, x),
            "dtensor": layers_vs_dtensor(rank, world_size),
            "odd": odd_column()}


@pytest.fixture(scope="module")
def two_ranks():
    return launch(every_check, 2)


def test_sizes_must_divide(two_ranks):
    assert "out_features=3 must be divisible" in two_ranks[0]["odd"]


def test_gpt_tensor_parallel_matches_single_device(two_ranks):
    r0, r1 = (r["gpt"] for r in two_ranks)
    for r in (r0, r1):
        assert abs(r["loss"][0] - r["loss"][1]) < 1e-5
        assert r["names"] and r["grad"] < 1e-5 and r["weight"] == 0.0
    pred = tp_payload(3, 8, CFG.n_embd, CFG.n_layer, CFG.vocab_size, act_bytes=4)
    assert r0["payload"] == pytest.approx(pred)


def test_layers_match_dtensor(two_ranks):
    assert max(r["dtensor"] for r in two_ranks) < 1e-5
    assert max(r["gpt_dtensor"] for r in two_ranks) < 1e-5  # the GPT's FFNs too


def test_hybrid_data_times_tensor_parallel_on_four_ranks():
    x = torch.randint(32, (4, 8), generator=torch.Generator().manual_seed(3))
    y = torch.randint(32, (4, 8), generator=torch.Generator().manual_seed(4))
    out = launch(hybrid_worker, 4, CFG, x, y)
    assert [o["coords"] for o in out] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert max(o["grad_gap"] for o in out) < 1e-5


# ------------------------------------------------- dropout: which ranks draw alike

def test_rng_tracker_forks_without_moving_the_default_stream():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    tracker = RNGTracker()
    tracker.add("tp", 11)
    with tracker.fork("tp"):
        first = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)  # the default stream did not move
    with tracker.fork("tp"):
        second = torch.rand(3)  # the region's stream continues where it stopped
    torch.manual_seed(11)
    assert torch.equal(first, torch.rand(3)) and torch.equal(second, torch.rand(3))
    assert rank_seed(0, dp_rank=1) != rank_seed(0, dp_rank=0)
    assert tp_region_seed(0, 1) != tp_region_seed(0, 0)


def dropout_masks(rank, world_size, seed):
    """The masks of the attention dropout (4-D) and of the residual dropout (3-D)."""
    cfg = GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=4, n_embd=16,
                    dropout=0.5, use_sdpa=False)
    torch.manual_seed(0)
    model = apply_tensor_parallel(GPT(cfg), None, seed=seed)
    masks = {"attention": [], "residual": []}
    dropout = nn.functional.dropout

    def recording(x, *args, **kwargs):
        out = dropout(x, *args, **kwargs)
        masks["attention" if x.dim() == 4 else "residual"].append(out != 0)
        return out

    nn.functional.dropout = recording
    try:
        torch.manual_seed(1)  # the default stream: alike on the ranks of the group
        model(torch.randint(32, (2, 8), generator=torch.Generator().manual_seed(3)))
    finally:
        nn.functional.dropout = dropout
    return masks


def seeded_and_unseeded(rank, world_size):
    return {"tracker": dropout_masks(rank, world_size, seed=0),
            "none": dropout_masks(rank, world_size, seed=None)}


def test_tensor_parallel_ranks_draw_their_own_masks_inside_the_region():
    r0, r1 = launch(seeded_and_unseeded, 2)
    same = [torch.equal(a, b) for a, b in zip(r0["tracker"]["attention"],
                                               r1["tracker"]["attention"])]
    assert same and not any(same)  # other heads, other masks
    # outside the region every rank drops the same positions of the replicated
    # activations, or the replicas would drift apart
    assert all(torch.equal(a, b) for a, b in zip(r0["tracker"]["residual"],
                                                  r1["tracker"]["residual"]))
    assert len(r0["tracker"]["residual"]) >= 3  # embeddings and both residual branches
    # without the tracker both ranks drew the very same mask for different heads
    assert all(torch.equal(a, b) for a, b in zip(r0["none"]["attention"],
                                                  r1["none"]["attention"]))
