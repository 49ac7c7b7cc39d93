"""Expert parallelism on 2 and 4 gloo processes equals the MoE on one device: the
layer (outputs, every gradient, the bytes of its all-to-alls against the cost
model) and training through the book's loop (losses, weights, balancing biases)."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from book.workers.common import max_abs_diff
from book.workers.moe import ep_worker, one_device
from llmcore.models.gpt import GPTConfig
from llmcore.nn.moe import MoE, MoEConfig, capacity
from book.workers.launch import launch
from llmcore.parallel.comm import Comm, wire_bytes
from llmcore.parallel.expert_parallel import ExpertParallelMoE, ep_payload

pytestmark = pytest.mark.distributed
LAYER = MoEConfig(n_experts=8, top_k=2, n_shared=1, capacity_factor=1.0,
                  aux_loss_coef=0.1)
C, TOKENS = 12, 20  # width, tokens per rank


def layer_parity(rank, world_size):
    """Rank r's expert-parallel layer against the whole layer run on every rank's
    tokens, one after the other, on this process."""
    torch.manual_seed(0)
    whole = MoE(C, LAYER)  # the same on every rank
    xs = torch.randn(world_size, TOKENS, C, generator=torch.Generator().manual_seed(1))
    ws = torch.randn(world_size, TOKENS, C, generator=torch.Generator().manual_seed(2))
    comm = Comm()
    ep = ExpertParallelMoE.from_moe(whole, comm)
    x = xs[rank].clone().requires_grad_()
    y = ep(x)
    ((y * ws[rank]).sum() + ep.aux_loss).backward()
    payload = dict(comm.stats.payload)
    dropped = (~ep.routing.keep).sum().item()
    ref_x = xs.clone().requires_grad_()
    ref_y, loss = [], 0
    for r in range(world_size):  # each rank's tokens, with their own aux loss
        ref_y.append(whole(ref_x[r]))
        loss = loss + (ref_y[r] * ws[r]).sum() + whole.aux_loss
    loss.backward()
    replicated = {n: p.grad.clone() for n, p in ep.named_parameters()
                  if not n.startswith("experts.")}
    for g in replicated.values():  # each rank holds its tokens' share
        comm.all_reduce(g)
    experts = [(whole.experts[e], ep.experts[i]) for i, e in enumerate(ep.expert_ids)]
    return {
        "held": list(ep.expert_ids),
        "y": (y - ref_y[rank]).abs().max().item(),
        "x_grad": (x.grad - ref_x.grad[rank]).abs().max().item(),
        "expert_grads": max((a.grad - b.grad).abs().max().item()
                            for wa, wb in experts
                            for a, b in zip(wa.parameters(), wb.parameters())),
        "replicated_grads": max((g - dict(whole.named_parameters())[n].grad)
                                .abs().max().item() for n, g in replicated.items()),
        "payload": payload, "dropped": dropped,
    }


def test_ep_payload_on_the_wire():
    bytes_ = ep_payload(4096, 7168, MoEConfig(n_experts=256, top_k=8), 1, 2)
    # DeepSeek-V3-sized layer: 256 experts x ceil(1.25 * 8 * 4096 / 256) slots
    assert bytes_["all_to_all"] == 4 * 256 * 160 * 7168 * 2
    assert wire_bytes("all_to_all", bytes_["all_to_all"], 64) == \
        bytes_["all_to_all"] * 63 / 64


CFG = GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16,
                moe=MoEConfig(n_experts=4, top_k=2, capacity_factor=1.0,
                              aux_loss_coef=0.05, bias_rate=0.01))


def both(rank, world_size, data):
    """The layer's parity, then a short expert-parallel training: one launch."""
    return layer_parity(rank, world_size), ep_worker(rank, world_size, CFG, data, 0.5)


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_equals_one_device(world):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(32, (3, 8, 9), generator=g)  # 3 steps of 8 sequences
    data = (tokens[..., :-1].contiguous(), tokens[..., 1:].contiguous())
    layers, ranks = zip(*launch(both, world, data, backend="gloo", threads=1))
    check_layer(layers, world)
    check_training(ranks, world, data)


def check_layer(ranks, world):
    """The layer: outputs and every gradient as on one device, bytes as predicted."""
    assert [r["held"] for r in ranks] == [list(range(i * 8 // world,
                                                     (i + 1) * 8 // world))
                                          for i in range(world)]
    for r in ranks:
        assert r["y"] < 1e-6 and r["x_grad"] < 1e-6, r
        assert r["expert_grads"] < 1e-5 and r["replicated_grads"] < 1e-5, r
        # forward and backward: 4 all-to-alls of (E, capacity, C) fp32 values
        assert r["payload"]["all_to_all"] == ep_payload(TOKENS, C, LAYER, 1)[
            "all_to_all"] == 4 * 8 * capacity(TOKENS, 2, 8, 1.0) * C * 4
    assert sum(r["dropped"] for r in ranks) > 0, "capacity 1.0 should drop some"


def check_training(ranks, world, data):
    """Training: the one-device run with the ranks' slices as micro-batches."""
    ref = one_device(CFG, data, lr=0.5, micro_batches=world)
    mean_loss = torch.tensor([r["losses"] for r in ranks]).mean(0)
    torch.testing.assert_close(mean_loss, torch.tensor(ref["losses"]),
                               rtol=1e-5, atol=1e-6)
    experts = set()
    for r in ranks:
        assert set(r["state"]) <= set(ref["state"])
        assert max_abs_diff(r["state"], ref["state"]) < 1e-5
        assert torch.equal(r["loads"], ref["loads"])  # every rank sees the step's
        experts |= {k for k in r["state"] if ".experts." in k}
    assert experts == {k for k in ref["state"] if ".experts." in k}  # all, once
    bias = ref["state"]["blocks.0.ffn.expert_bias"]
    assert bias.abs().sum() > 0  # the bias moved, and moved alike on every rank
    tokens_per_rank = 8 // world * 8
    for r in ranks:
        assert r["payload"]["all_to_all"] == 3 * ep_payload(
            tokens_per_rank, 16, CFG.moe, 2)["all_to_all"]


def test_experts_must_divide_over_the_ranks():
    three = SimpleNamespace(world_size=3, rank=0)
    with pytest.raises(ValueError, match="multiple of the 3 ranks"):
        ExpertParallelMoE(16, replace(LAYER, n_experts=8), three)
