"""Norms, feed-forward and positional encodings against PyTorch or float64 formulas."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from references import rope_reference

from llmcore.nn import (FeedForward, LayerNorm, LearnedPositionalEmbedding, RMSNorm,
                        RotaryEmbedding, SinusoidalPositionalEncoding, sinusoidal_table)


@pytest.mark.parametrize("shape", [16, (4, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_torch(shape, bias):
    torch.manual_seed(0)
    ref = nn.LayerNorm(shape, bias=bias)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    mine = LayerNorm(shape, bias=bias)
    mine.load_state_dict(ref.state_dict())
    x = (torch.randn(3, 5, 4, 16) * 3 + 2).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(mine(x), ref(x2), atol=1e-5, rtol=1e-5)
    mine(x).square().sum().backward()
    ref(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mine.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-4)


def test_layernorm_without_affine_is_standardization():
    x = torch.randn(6, 32, dtype=torch.float64) * 5 + 1
    y = LayerNorm(32, elementwise_affine=False)(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(y.var(-1, unbiased=False),
                               1 / (1 + 1e-5 / x.var(-1, unbiased=False)))


@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rmsnorm_matches_torch_and_float64(eps):
    torch.manual_seed(0)
    ref = nn.RMSNorm(16, eps=eps)
    with torch.no_grad():
        ref.weight.normal_()
    mine = RMSNorm(16, eps=eps)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(mine(x), ref(x), atol=1e-5, rtol=1e-5)
    xd = x.double()
    e = torch.finfo(torch.float32).eps if eps is None else eps
    formula = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + e)
    formula = formula * ref.weight.double()
    torch.testing.assert_close(mine(x).double(), formula, atol=1e-5, rtol=1e-5)


def test_norm_bad_shape():
    with pytest.raises(ValueError, match=r"\(\.\.\., 16\)"):
        LayerNorm(16)(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"\(\.\.\., 16\)"):
        RMSNorm(16)(torch.randn(2, 8))


@pytest.mark.parametrize("act,fn", [("relu", F.relu), ("gelu", F.gelu),
                                    ("gelu_tanh",
                                     lambda x: F.gelu(x, approximate="tanh"))])
def test_feedforward_is_w2_act_w1x_plus_b1_plus_b2(act, fn):
    torch.manual_seed(0)
    ffn = FeedForward(8, 20, act)
    x = torch.randn(2, 5, 8)
    w1, b1 = ffn.linear1.weight, ffn.linear1.bias
    w2, b2 = ffn.linear2.weight, ffn.linear2.bias
    torch.testing.assert_close(ffn(x), fn(x @ w1.T + b1) @ w2.T + b2)
    assert sum(p.numel() for p in ffn.parameters()) == 8 * 20 + 20 + 20 * 8 + 8


def test_swiglu():
    torch.manual_seed(0)
    ffn = FeedForward(8, 12, "swiglu", bias=False)
    x = torch.randn(2, 5, 8)
    gate = x @ ffn.gate.weight.T
    hidden = gate * torch.sigmoid(gate) * (x @ ffn.linear1.weight.T)
    expect = hidden @ ffn.linear2.weight.T
    torch.testing.assert_close(ffn(x), expect)
    with pytest.raises(ValueError, match="activation='tanh'"):
        FeedForward(8, 12, "tanh")


def test_sinusoidal_table_formula():
    pe = sinusoidal_table(50, 10)
    for p in (0, 3, 49):
        for i in range(5):
            angle = p / 10000 ** (2 * i / 10)
            assert math.isclose(pe[p, 2 * i], math.sin(angle), abs_tol=1e-6)
            assert math.isclose(pe[p, 2 * i + 1], math.cos(angle), abs_tol=1e-6)


def test_positional_modules_add_and_check_length():
    x = torch.randn(2, 6, 10)
    sin = SinusoidalPositionalEncoding(10, max_len=8)
    assert sin(x).shape == x.shape  # added, not concatenated
    torch.testing.assert_close(sin(x) - x, sinusoidal_table(8, 10)[:6].expand(2, 6, 10))
    torch.testing.assert_close(sin(x[:, 4:], offset=4), sin(x)[:, 4:])
    learned = LearnedPositionalEmbedding(8, 10)
    torch.testing.assert_close(learned(x[:, 2:], offset=2), learned(x)[:, 2:])
    for module in (sin, learned):
        with pytest.raises(ValueError, match="max_len=8"):
            module(torch.randn(2, 9, 10))
        with pytest.raises(ValueError, match="max_len=8"):
            module(x, offset=3)


def test_rope_matches_complex_reference():
    x = torch.randn(2, 3, 7, 16)
    rope = RotaryEmbedding(16, max_len=32)
    torch.testing.assert_close(rope(x).double(), rope_reference(x, torch.arange(7)),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rope(x, offset=5).double(),
                               rope_reference(x, torch.arange(5, 12)),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rope(x).norm(dim=-1), x.norm(dim=-1))  # a rotation


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(8, max_len=64)
    q, k = torch.randn(8), torch.randn(8)

    def score(m, n):
        qm = rope(q.expand(64, 8))[m]
        kn = rope(k.expand(64, 8))[n]
        return qm @ kn

    assert math.isclose(score(10, 7), score(40, 37), rel_tol=1e-4, abs_tol=1e-5)
    assert math.isclose(score(3, 3), q @ k, rel_tol=1e-4, abs_tol=1e-5)
    with pytest.raises(ValueError, match=r"\(\.\.\., T, 8\)"):
        rope(torch.randn(2, 5, 6))
