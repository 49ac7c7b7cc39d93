"""Mixture of experts on one device: routing against a hand count, the balancing loss
against its formula, the bias update, the layer against a float64 loop over tokens,
and the GPT whose MLPs are MoE layers."""

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from llmcore.accounting import flops_per_token
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.nn.moe import (MoE, MoEConfig, active_flops_per_token, capacity,
                            end_moe_step, load_balancing_loss, top_k_route)

# Five tokens, three experts: the routing example worked by hand below.
PROBS = torch.tensor([[0.6, 0.3, 0.1],
                      [0.5, 0.1, 0.4],
                      [0.7, 0.2, 0.1],
                      [0.2, 0.5, 0.3],
                      [0.1, 0.3, 0.6]])


def test_capacity_counts_slots():
    assert capacity(64, 2, 8, 1.25) == 20  # 1.25 * 2 * 64 / 8
    assert capacity(10, 1, 4, 1.0) == 3  # 2.5 rounds up
    assert capacity(3, 2, 2, 2.0) == 3  # never more than the tokens
    assert capacity(100, 2, 8, 1.2) == 30  # 30.000000000000004 is 30


def test_top_k_route_against_a_hand_count():
    r = top_k_route(PROBS, k=2, capacity=2)
    # Choices: t0 (0, 1), t1 (0, 2), t2 (0, 1), t3 (1, 2), t4 (2, 1).
    assert r.expert.tolist() == [[0, 1], [0, 2], [0, 1], [1, 2], [2, 1]]
    # First choices fill the buffers first: expert 0 gets t0, t1, then t2 (slot 2,
    # dropped); expert 1 gets t3, expert 2 gets t4. Then the second choices: t0 ->
    # expert 1 slot 1, t1 -> expert 2 slot 1, t2 -> expert 1 slot 2 (dropped), t3 ->
    # expert 2 slot 2 (dropped), t4 -> expert 1 slot 3 (dropped).
    assert r.slot.tolist() == [[0, 1], [1, 1], [2, 2], [0, 2], [0, 3]]
    assert r.keep.tolist() == [[True, True], [True, True], [False, False],
                               [True, False], [True, False]]
    torch.testing.assert_close(r.gate, torch.tensor(
        [[0.6, 0.3], [0.5, 0.4], [0.7, 0.2], [0.5, 0.3], [0.6, 0.3]]))
    kept = torch.bincount(r.expert[r.keep], minlength=3)
    assert kept.tolist() == [2, 2, 2]  # each buffer full, none over


def test_normalized_gates_sum_to_one_over_the_choices():
    r = top_k_route(PROBS, k=2, capacity=5, normalize=True)
    torch.testing.assert_close(r.gate, torch.tensor(
        [[0.6, 0.3], [0.5, 0.4], [0.7, 0.2], [0.5, 0.3], [0.6, 0.3]]) / torch.tensor(
        [[0.9], [0.9], [0.9], [0.8], [0.9]]))


def test_bias_steers_the_choice_not_the_gate():
    r = top_k_route(PROBS, k=2, capacity=5, bias=torch.tensor([0.0, 0.35, 0.0]))
    # t1's scores become (0.5, 0.45, 0.4): expert 1 replaces expert 2 ...
    assert r.expert[1].tolist() == [0, 1]
    # ... with its own probability as the gate, not probability + bias.
    torch.testing.assert_close(r.gate[1], torch.tensor([0.5, 0.1]))
    assert r.keep.all()


def test_load_balancing_loss_against_its_formula():
    g = torch.Generator().manual_seed(0)
    S, E, k = 40, 6, 2
    probs = torch.randn(S, E, generator=g, dtype=torch.float64).softmax(-1)
    probs.requires_grad_()
    expert = probs.topk(k, dim=-1).indices
    loss = load_balancing_loss(probs, expert)
    chosen = expert.tolist()
    f = [sum(row.count(i) for row in chosen) / (k * S) for i in range(E)]
    P = [sum(probs[s, i].item() for s in range(S)) / S for i in range(E)]
    assert math.isclose(loss.item(), E * sum(a * b for a, b in zip(f, P)),
                        rel_tol=1e-12)
    loss.backward()  # only P carries a gradient: d/dp[s, i] = E f_i / S
    want = torch.tensor([E * fi / S for fi in f], dtype=torch.float64).expand(S, E)
    torch.testing.assert_close(probs.grad, want)


def test_load_balancing_loss_is_one_when_balanced_and_e_when_collapsed():
    E = 4
    uniform = torch.full((8, E), 1 / E)
    round_robin = torch.arange(8).remainder(E).unsqueeze(1)
    assert load_balancing_loss(uniform, round_robin).item() == pytest.approx(1.0)
    collapsed = F.one_hot(torch.zeros(8, dtype=torch.long), E).float()
    assert load_balancing_loss(collapsed, torch.zeros(8, 1, dtype=torch.long)).item() \
        == pytest.approx(E)


def test_bias_update_moves_toward_the_less_loaded_experts():
    cfg = MoEConfig(n_experts=4, top_k=1, bias_rate=0.1, d_expert=8)
    moe = MoE(8, cfg)
    moe.load.copy_(torch.tensor([5.0, 1.0, 3.0, 3.0]))  # mean 3
    load = moe.end_step()
    assert load.tolist() == [5.0, 1.0, 3.0, 3.0]
    torch.testing.assert_close(moe.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    assert moe.load.sum() == 0  # counting starts again
    off = MoE(8, MoEConfig(n_experts=4, top_k=1, d_expert=8))
    off.load.fill_(2.0)
    off.load[0] = 9.0
    off.end_step()
    assert off.expert_bias.abs().sum() == 0  # bias_rate 0: no bias balancing


def gelu_ffn(ffn, x):
    """An expert written out: W2 gelu(W1 x)."""
    return ffn.linear2.weight @ F.gelu(ffn.linear1.weight @ x)


def loop_reference(moe: MoE, x: torch.Tensor, training: bool) -> torch.Tensor:
    """The MoE layer token by token in plain Python, float64."""
    S, E, k = x.shape[0], moe.cfg.n_experts, moe.cfg.top_k
    cap = capacity(S, k, E, moe.cfg.capacity_factor) if training else S
    probs = [torch.softmax(moe.router.weight @ x[s], 0) for s in range(S)]
    bias = moe.expert_bias if moe.cfg.bias_rate else torch.zeros(E)
    choices = [sorted(range(E), key=lambda e: -(p[e] + bias[e]).item())[:k]
               for p in probs]
    taken, kept = [0] * E, [[] for _ in range(S)]
    for j in range(k):  # every token's first choice, then every second choice
        for s in range(S):
            e = choices[s][j]
            if taken[e] < cap:
                kept[s].append(e)
            taken[e] += 1
    rows = []
    for s in range(S):
        total = sum(probs[s][e] for e in choices[s]) if moe.cfg.norm_topk else 1.0
        y = sum((probs[s][e] / total * gelu_ffn(moe.experts[e], x[s])
                 for e in kept[s]), torch.zeros(x.shape[1], dtype=x.dtype))
        if moe.shared is not None:
            y = y + gelu_ffn(moe.shared, x[s])
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("cfg", [
    MoEConfig(n_experts=4, top_k=2, capacity_factor=0.75),  # tokens dropped
    MoEConfig(n_experts=6, top_k=1, n_shared=1, capacity_factor=1.0, norm_topk=False),
    MoEConfig(n_experts=4, top_k=2, capacity_factor=1.0, bias_rate=0.05),
    MoEConfig(n_experts=5, top_k=3, d_expert=10, capacity_factor=1.0, norm_topk=False),
])
@pytest.mark.parametrize("training", [True, False])
def test_moe_layer_matches_a_float64_loop_over_tokens(cfg, training):
    torch.manual_seed(0)
    moe = MoE(8, cfg).double().train(training)
    if cfg.bias_rate:
        moe.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    x = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    ref_moe = copy.deepcopy(moe)
    y = moe(x)
    x_ref = x.detach().clone().requires_grad_()
    ref = loop_reference(ref_moe, x_ref.view(18, 8), training)
    torch.testing.assert_close(y.view(18, 8), ref, rtol=1e-12, atol=1e-12)
    if training and cfg.capacity_factor < 1:
        assert (~moe.routing.keep).any(), "the example must drop tokens"
    w = torch.randn(18, 8, dtype=torch.float64)
    (y.view(18, 8) * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(moe.named_parameters(), ref_moe.parameters()):
        want = torch.zeros_like(q) if q.grad is None else q.grad  # an unused expert
        torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-12, msg=name)


def test_moe_counts_the_load_in_training_only():
    torch.manual_seed(0)
    moe = MoE(8, MoEConfig(n_experts=4, top_k=2))
    x = torch.randn(3, 5, 8)
    moe(x)
    moe(x)
    assert moe.load.sum().item() == 2 * 2 * 15  # two forwards of k * S choices
    torch.testing.assert_close(moe.load, 2 * torch.bincount(
        moe.routing.expert.flatten(), minlength=4).float())
    moe.eval()
    moe(x)
    assert moe.load.sum().item() == 60


CFG = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16)


def test_gpt_adds_the_weighted_aux_loss_in_training_only():
    # No token dropped (capacity = all tokens), so training and evaluation route alike.
    moe = MoEConfig(n_experts=4, top_k=2, capacity_factor=2.0, aux_loss_coef=0.3)
    torch.manual_seed(0)
    model = GPT(replace(CFG, moe=moe))
    x = torch.randint(40, (2, 16))
    y = torch.randint(40, (2, 16))
    _, train_loss = model(x, y)
    aux = [block.ffn.aux_loss.item() for block in model.blocks]
    model.eval()
    _, eval_loss = model(x, y)
    assert train_loss.item() == pytest.approx(eval_loss.item() + 0.3 * sum(aux),
                                              rel=1e-6)


def test_gpt_with_moe_builds_experts_and_inits_their_output_layers():
    moe = MoEConfig(n_experts=4, top_k=1, n_shared=1)
    torch.manual_seed(0)
    model = GPT(replace(CFG, moe=moe))
    block = model.blocks[0]
    assert isinstance(block.ffn, MoE) and len(block.ffn.experts) == 4
    assert block.ffn.experts[0].linear1.weight.shape == (32, 16)  # 4 C / (1 + 1)
    residual_std = 0.02 / math.sqrt(2 * CFG.n_layer)
    outs = torch.cat([e.linear2.weight.flatten() for e in block.ffn.experts])
    assert abs(outs.std().item() - residual_std) < 0.2 * residual_std
    assert abs(block.ffn.router.weight.std().item() - 0.02) < 0.004
    torch.manual_seed(0)
    dense = GPT(CFG)
    assert not any(".experts." in n for n, _ in dense.named_parameters())


def test_eval_mode_makes_cached_generation_equal_the_full_forward():
    moe = MoEConfig(n_experts=4, top_k=2, capacity_factor=0.5)
    torch.manual_seed(0)
    model = GPT(replace(CFG, moe=moe)).eval()
    idx = torch.randint(40, (2, 10))
    full, _ = model(idx)
    caches = model.new_kv_caches()
    steps = [model(idx[:, t:t + 1], kv_caches=caches)[0] for t in range(10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_end_moe_step_returns_every_layers_load_and_resets():
    moe = MoEConfig(n_experts=4, top_k=2)
    model = GPT(replace(CFG, moe=moe))
    model(torch.randint(40, (2, 16)), torch.randint(40, (2, 16)))
    loads = end_moe_step(model)
    assert loads.shape == (2, 4) and loads.sum(1).tolist() == [64.0, 64.0]
    assert end_moe_step(model).sum() == 0
    with pytest.raises(ValueError, match="no MoE layer"):
        end_moe_step(GPT(CFG))


def test_active_flops_count_the_weights_a_token_meets():
    moe = MoEConfig(n_experts=8, top_k=2, n_shared=1, d_expert=24)
    cfg = replace(CFG, moe=moe)
    model = GPT(cfg)
    block = model.blocks[0]
    expert = sum(p.numel() for p in block.ffn.experts[0].parameters())
    per_block = (sum(p.numel() for p in block.self_attn.parameters())
                 + 2 * expert + sum(p.numel() for p in block.ffn.shared.parameters())
                 + block.ffn.router.weight.numel())
    matmul_weights = cfg.n_layer * per_block + model.lm_head.weight.numel()
    attention = 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    assert active_flops_per_token(cfg) == 6 * matmul_weights + attention
    # The default expert width keeps the dense FFN's compute; the router adds C E.
    even = replace(CFG, moe=MoEConfig(n_experts=8, top_k=2))
    assert active_flops_per_token(even) - flops_per_token(CFG) == 6 * 2 * 16 * 8


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": 9}, "top_k=9 must be at most n_experts=8"),
    ({"n_experts": 0}, "n_experts must be a positive int"),
    ({"capacity_factor": 0}, "capacity_factor must be"),
    ({"bias_rate": -1.0}, "bias_rate must be"),
    ({"d_expert": 2.5}, "d_expert must be a positive int"),
])
def test_bad_moe_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**kwargs)


def test_expert_width_that_does_not_divide_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="set MoEConfig.d_expert"):
        MoEConfig(top_k=2, n_shared=1).expert_width(16)  # 64 / 3
    with pytest.raises(ValueError, match="moe must be an llmcore.nn.moe.MoEConfig"):
        GPTConfig(**{**CFG.__dict__, "moe": {"n_experts": 8}})
