"""Pruning masks against torch.nn.utils.prune; distillation loss against its formula."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from book.workers.compress import (apply_masks, distillation_loss, l1_unstructured_mask,
                                   ln_structured_mask, prune_model, sparsity)
from llmcore.models.gpt import GPT, GPTConfig


@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 0.95, 7])
def test_unstructured_mask_matches_torch_prune(amount):
    torch.manual_seed(0)
    lin = nn.Linear(11, 9)
    mine = l1_unstructured_mask(lin.weight.detach(), amount)
    prune.l1_unstructured(lin, "weight", amount)
    assert torch.equal(mine, lin.weight_mask)


@pytest.mark.parametrize("amount, n, dim", [(0.25, 2, 0), (0.5, 1, 0), (3, 2, 1),
                                            (0.4, float("inf"), -1)])
def test_structured_mask_matches_torch_prune(amount, n, dim):
    torch.manual_seed(1)
    lin = nn.Linear(10, 8)
    mine = ln_structured_mask(lin.weight.detach(), amount, n, dim)
    prune.ln_structured(lin, "weight", amount, n=n, dim=dim)
    assert torch.equal(mine, lin.weight_mask)
    # whole slices: every row (dim 0) or column (dim 1) is all ones or all zeros
    slices = mine.sum(dim=1 - (dim % 2))
    size = mine.shape[1 - (dim % 2)]
    assert set(slices.tolist()) <= {0.0, float(size)}


def test_prune_model_reaches_the_sparsity_and_masks_survive_training():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=30, block_size=8, n_layer=2, n_head=2, n_embd=16))
    emb = gpt.tok_emb.weight.clone()
    masks = prune_model(gpt, 0.5)
    assert "lm_head.weight" not in masks  # tied to the embedding: left alone
    assert torch.equal(gpt.tok_emb.weight, emb)
    # per block: the fused q/k/v projection, out, ffn.linear1, ffn.linear2
    assert len(masks) == 2 * 4
    for name, mask in masks.items():
        assert mask.mean().item() == pytest.approx(0.5, abs=0.01), name
    opt = torch.optim.SGD(gpt.parameters(), lr=0.1)
    idx = torch.randint(30, (2, 8))
    gpt(idx, idx)[1].backward()
    opt.step()
    params = dict(gpt.named_parameters())
    assert any((params[n][m == 0] != 0).any() for n, m in masks.items())  # regrown
    apply_masks(gpt, masks)
    for n, m in masks.items():
        assert torch.all(params[n][m == 0] == 0), n


def test_structured_prune_model_zeroes_rows_and_sparsity_counts():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    masks = prune_model(model, 0.25, structured=True,
                        filter_fn=lambda m, name: m.out_features == 16)
    assert list(masks) == ["0.weight"]
    rows_gone = (model[0].weight == 0).all(dim=1).sum().item()
    assert rows_gone == 4
    assert sparsity(model) == pytest.approx(4 * 8 / (16 * 8 + 4 * 16))
    with pytest.raises(ValueError, match="amount"):
        prune_model(model, 1.5)
    with pytest.raises(ValueError, match="not a parameter"):
        apply_masks(model, {"nope.weight": torch.ones(1)})


def test_distillation_loss_formula_and_properties():
    torch.manual_seed(0)
    s = torch.randn(4, 5, 7, requires_grad=True)
    t = torch.randn(4, 5, 7, requires_grad=True)
    T = 3.0
    loss = distillation_loss(s, t, temperature=T)
    p_t = F.softmax(t / T, -1)
    ref = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert t.grad is None  # the teacher is fixed
    # zero iff the distributions agree; always >= 0
    same = distillation_loss(t.detach(), t.detach())
    assert same.item() == pytest.approx(0, abs=1e-6)
    assert loss.item() > 0
    # mixed with cross-entropy, ignoring -100 positions
    y = torch.randint(7, (4, 5))
    y[0, :2] = -100
    mixed = distillation_loss(s, t, T, targets=y, alpha=0.3)
    keep = y.view(-1) != -100
    kl = distillation_loss(s.reshape(-1, 7)[keep], t.reshape(-1, 7)[keep], T)
    ce = F.cross_entropy(s.reshape(-1, 7), y.reshape(-1))
    torch.testing.assert_close(mixed, 0.3 * kl + 0.7 * ce)


def test_distillation_gradient_scale_is_stable_in_temperature():
    # Hinton et al.: the T^2 factor keeps the soft-target gradients' size roughly
    # constant; without it they shrink like 1/T^2.
    torch.manual_seed(0)
    t = torch.randn(256, 10)
    norms = []
    for T in (2.0, 8.0):
        s = (t + 0.5 * torch.randn(256, 10)).requires_grad_()
        distillation_loss(s, t, temperature=T).backward()
        norms.append(s.grad.norm().item())
    assert 0.3 < norms[1] / norms[0] < 1.5
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(t, t, temperature=0)
