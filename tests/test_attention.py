"""Hand-written attention against PyTorch's: SDPA, nn.MultiheadAttention, KV cache."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmcore.nn import KVCache, MultiHeadAttention, RotaryEmbedding, causal_mask
from llmcore.nn import scaled_dot_product_attention as sdpa

ATOL = 1e-5


def qkv(b=2, h=3, t=7, s=11, e=8, ev=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, t, e, generator=g), torch.randn(b, h, s, e, generator=g),
            torch.randn(b, h, s, ev, generator=g))


@pytest.mark.parametrize("t,s", [(7, 11), (1, 1), (5, 5), (13, 3)])
def test_sdpa_matches_torch_without_mask(t, s):
    q, k, v = qkv(t=t, s=s)
    torch.testing.assert_close(sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v),
                               atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("t,s", [(7, 7), (7, 11), (9, 4)])
def test_sdpa_matches_torch_causal(t, s):
    q, k, v = qkv(t=t, s=s)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(sdpa(q, k, v, is_causal=True), ref, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("shape", [(7, 11), (2, 1, 7, 11), (2, 3, 7, 11), (1, 11)])
def test_sdpa_matches_torch_bool_and_float_masks(shape):
    q, k, v = qkv()
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(shape, generator=g) > 0.3
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(sdpa(q, k, v, attn_mask=mask), ref, atol=ATOL, rtol=ATOL)
    fmask = torch.randn(shape, generator=g)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=fmask)
    torch.testing.assert_close(sdpa(q, k, v, attn_mask=fmask), ref,
                               atol=ATOL, rtol=ATOL)


def test_sdpa_scale_and_weights():
    q, k, v = qkv()
    out, w = sdpa(q, k, v, scale=0.3, return_weights=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3),
                               atol=ATOL, rtol=ATOL)
    assert w.shape == (2, 3, 7, 11)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 7))
    torch.testing.assert_close(w, torch.softmax(q @ k.transpose(-2, -1) * 0.3, -1))


def test_fully_masked_rows_give_zeros_not_nan():
    q, k, v = qkv()
    q.requires_grad_(True)
    mask = torch.rand(7, 11, generator=torch.Generator().manual_seed(2)) > 0.5
    mask[2] = False  # query 2 may attend nothing
    out, w = sdpa(q, k, v, attn_mask=mask, return_weights=True)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    assert (out[..., 2, :] == 0).all() and (w[..., 2, :] == 0).all()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    fmask = torch.zeros(7, 11).masked_fill(~mask, float("-inf"))
    assert (sdpa(q, k, v, attn_mask=fmask)[..., 2, :] == 0).all()


def test_float64_reference():
    q, k, v = (x.double() for x in qkv())
    mask = causal_mask(7, 11)
    ref = torch.softmax((q @ k.transpose(-2, -1) / 8 ** 0.5).masked_fill(
        ~mask, float("-inf")), dim=-1) @ v
    torch.testing.assert_close(sdpa(q, k, v, attn_mask=mask), ref, atol=1e-12, rtol=0)


def test_causality_through_gradients():
    q, k, v = qkv(t=9, s=9)
    for x in (q, k, v):
        x.requires_grad_(True)
    out = sdpa(q, k, v, is_causal=True)
    t = 4
    out[..., t, :].sum().backward()
    assert (k.grad[..., t + 1:, :] == 0).all() and (v.grad[..., t + 1:, :] == 0).all()
    assert (k.grad[..., :t + 1, :].abs().sum() > 0) and (v.grad[..., t, :] != 0).any()
    assert (q.grad[..., :t, :] == 0).all() and (q.grad[..., t + 1:, :] == 0).all()


def test_dropout_changes_the_output():
    q, k, v = qkv()
    torch.manual_seed(0)
    out = sdpa(q, k, v, dropout_p=0.5)
    assert not torch.allclose(out, sdpa(q, k, v))


def test_sdpa_bad_inputs():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k must have"):
        sdpa(q, k[..., :4], v)
    with pytest.raises(ValueError, match="v must have"):
        sdpa(q, k, v[..., :3, :])
    with pytest.raises(ValueError, match=r"attn_mask.*\(\.\.\., 7, 11\)"):
        sdpa(q, k, v, attn_mask=torch.ones(7, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must be torch.bool"):
        sdpa(q, k, v, attn_mask=torch.ones(7, 11, dtype=torch.int64))
    with pytest.raises(ValueError, match="not both"):
        sdpa(q, k, v, attn_mask=torch.ones(7, 11, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="same rank"):
        sdpa(q[0], k, v)


# ---------------------------------------------------------------- MultiHeadAttention

def copy_from_torch(mine: MultiHeadAttention, ref: nn.MultiheadAttention) -> None:
    """Split nn.MultiheadAttention's packed in_proj (3C, C) into q, k, v projections."""
    c = mine.d_model
    with torch.no_grad():
        for i, proj in enumerate((mine.q_proj, mine.k_proj, mine.v_proj)):
            proj.weight.copy_(ref.in_proj_weight[i * c:(i + 1) * c])
            proj.bias.copy_(ref.in_proj_bias[i * c:(i + 1) * c])
        mine.out_proj.load_state_dict(ref.out_proj.state_dict())


@pytest.fixture
def pair():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    mine = MultiHeadAttention(16, 4).eval()
    copy_from_torch(mine, ref)
    return mine, ref


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_mha_matches_torch_self_and_cross(pair, use_sdpa):
    mine, ref = pair
    mine.use_sdpa = use_sdpa
    x, mem = torch.randn(3, 7, 16), torch.randn(3, 5, 16)
    torch.testing.assert_close(mine(x), ref(x, x, x, need_weights=False)[0],
                               atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(mine(x, mem), ref(x, mem, mem, need_weights=False)[0],
                               atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_mha_masks_use_the_opposite_convention_of_torch(pair, use_sdpa):
    mine, ref = pair
    mine.use_sdpa = use_sdpa
    x = torch.randn(3, 7, 16)
    allowed = causal_mask(7)
    expect = ref(x, x, x, attn_mask=~allowed, need_weights=False)[0]  # True = masked
    torch.testing.assert_close(mine(x, attn_mask=allowed), expect, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(mine(x, is_causal=True), expect, atol=ATOL, rtol=ATOL)
    # key padding: torch takes (B, S) with True = pad; ours is (B, 1, 1, S), True = keep
    keep = torch.ones(3, 7, dtype=torch.bool)
    keep[0, 5:], keep[2, 3:] = False, False
    expect = ref(x, x, x, key_padding_mask=~keep, need_weights=False)[0]
    torch.testing.assert_close(mine(x, attn_mask=keep[:, None, None, :]), expect,
                               atol=ATOL, rtol=ATOL)


def test_mha_weights_average_to_torch(pair):
    mine, ref = pair
    x = torch.randn(2, 6, 16)
    out, w = mine(x, need_weights=True)
    ref_out, ref_w = ref(x, x, x, need_weights=True)  # averaged over heads
    assert w.shape == (2, 4, 6, 6)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(w.mean(1), ref_w, atol=ATOL, rtol=ATOL)


def test_mha_causality_through_gradients():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4)
    x = torch.randn(2, 9, 16, requires_grad=True)
    mha(x, is_causal=True)[:, 3].sum().backward()
    assert (x.grad[:, 4:] == 0).all() and (x.grad[:, :4] != 0).any()


@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("rope", [False, True])
def test_kv_cache_prefill_then_one_token_matches_full(use_sdpa, rope):
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, use_sdpa=use_sdpa,
                             rope=RotaryEmbedding(4, 64) if rope else None).eval()
    x = torch.randn(2, 10, 16)
    full = mha(x, is_causal=True)
    cache = KVCache()
    parts = [mha(x[:, :6], is_causal=True, kv_cache=cache)]  # prefill, empty cache
    for t in range(6, 8):
        parts.append(mha(x[:, t:t + 1], kv_cache=cache))  # one token: no mask needed
    parts.append(mha(x[:, 8:], is_causal=True, kv_cache=cache))  # a chunk of two
    assert len(cache) == 10 and cache.k.shape == (2, 4, 10, 4)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=ATOL, rtol=ATOL)


def test_kv_cache_max_len():
    cache = KVCache(max_len=4)
    cache.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="max_len=4"):
        cache.update(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4))
    cache.reset()
    assert len(cache) == 0


def test_mha_bad_inputs():
    with pytest.raises(ValueError, match="multiple of n_heads"):
        MultiHeadAttention(10, 4)
    mha = MultiHeadAttention(16, 4)
    with pytest.raises(ValueError, match=r"query .*\(B, T, 16\)"):
        mha(torch.randn(2, 7, 12))
    with pytest.raises(ValueError, match=r"query .*\(B, T, 16\)"):
        mha(torch.randn(7, 16))
    with pytest.raises(ValueError, match=r"key .*\(2, T, 16\)"):
        mha(torch.randn(2, 7, 16), torch.randn(3, 5, 16))
    with pytest.raises(ValueError, match="value has 4 positions"):
        mha(torch.randn(2, 7, 16), torch.randn(2, 5, 16), torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match="attn_mask"):
        mha(torch.randn(2, 7, 16), attn_mask=torch.ones(6, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must be torch.bool"):
        mha(torch.randn(2, 7, 16), attn_mask=torch.ones(7, 7, dtype=torch.long))


# ------------------------------------------------- fused q/k/v and sharded heads

@pytest.mark.parametrize("bias", [True, False])
def test_fused_qkv_matches_separate_forward_and_gradients(bias):
    torch.manual_seed(0)
    sep = MultiHeadAttention(16, 4, bias=bias)
    fused = MultiHeadAttention(16, 4, bias=bias, fused_qkv=True)
    assert not hasattr(fused, "q_proj") and fused.qkv_proj.weight.shape == (48, 16)
    fused.load_state_dict(sep.state_dict())  # separate -> fused
    # rows [q; k; v]: the fused matrix is the three stacked
    torch.testing.assert_close(fused.qkv_proj.weight, torch.cat(
        [sep.q_proj.weight, sep.k_proj.weight, sep.v_proj.weight]))
    x = torch.randn(3, 7, 16, requires_grad=True)
    xf = x.detach().clone().requires_grad_(True)
    out, out_f = sep(x, is_causal=True), fused(xf, is_causal=True)
    torch.testing.assert_close(out_f, out, atol=ATOL, rtol=ATOL)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_f.backward(grad)
    torch.testing.assert_close(xf.grad, x.grad, atol=ATOL, rtol=ATOL)
    sep_grad = torch.cat([p.weight.grad for p in (sep.q_proj, sep.k_proj, sep.v_proj)])
    torch.testing.assert_close(fused.qkv_proj.weight.grad, sep_grad, atol=ATOL,
                               rtol=ATOL)
    # cross-attention through the fused rows: each input meets its own third
    mem = torch.randn(3, 5, 16)
    torch.testing.assert_close(fused(x, mem), sep(x, mem), atol=ATOL, rtol=ATOL)


def test_fused_state_dict_loads_into_separate_projections():
    torch.manual_seed(0)
    fused = MultiHeadAttention(16, 4, fused_qkv=True)
    sep = MultiHeadAttention(16, 4)
    sep.load_state_dict(fused.state_dict())  # fused -> separate
    assert set(sep.state_dict()) == {f"{p}.{n}" for p in (
        "q_proj", "k_proj", "v_proj", "out_proj") for n in ("weight", "bias")}
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(sep(x), fused(x), atol=ATOL, rtol=ATOL)
    # inside a bigger model the prefix is kept
    outer = nn.ModuleDict({"attn": MultiHeadAttention(16, 4, fused_qkv=True)})
    outer.load_state_dict({f"attn.{k}": v for k, v in sep.state_dict().items()})
    torch.testing.assert_close(outer["attn"](x), sep(x), atol=ATOL, rtol=ATOL)


def shard_heads(full: MultiHeadAttention, rank: int, world: int) -> MultiHeadAttention:
    """A copy keeping this rank's heads, by hand: q/k/v rows, out_proj columns."""
    part = MultiHeadAttention(full.d_model, full.n_heads, bias=True,
                              fused_qkv=full.fused_qkv)
    c = full.d_model
    lo, hi = rank * c // world, (rank + 1) * c // world
    with torch.no_grad():
        if full.fused_qkv:  # keep this rank's slice of q, of k and of v
            rows = torch.cat([torch.arange(lo, hi) + i * c for i in range(3)])
            part.qkv_proj = nn.Linear(c, 3 * (hi - lo))
            part.qkv_proj.weight.copy_(full.qkv_proj.weight[rows])
            part.qkv_proj.bias.copy_(full.qkv_proj.bias[rows])
        else:
            for name in ("q_proj", "k_proj", "v_proj"):
                lin = nn.Linear(c, hi - lo)
                lin.weight.copy_(getattr(full, name).weight[lo:hi])
                lin.bias.copy_(getattr(full, name).bias[lo:hi])
                setattr(part, name, lin)
        part.out_proj = nn.Linear(hi - lo, c)
        part.out_proj.weight.copy_(full.out_proj.weight[:, lo:hi])
        # the bias is added once, after the partial sums
        part.out_proj.bias.copy_(full.out_proj.bias if rank == 0 else 0)
    return part.eval()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_head_sharded_attention_sums_to_the_full_module(fused, use_sdpa):
    torch.manual_seed(0)
    full = MultiHeadAttention(16, 4, fused_qkv=fused, use_sdpa=use_sdpa).eval()
    x = torch.randn(2, 7, 16)
    halves = [shard_heads(full, r, 2) for r in range(2)]
    for h in halves:
        h.use_sdpa = use_sdpa
    partial = [h(x, is_causal=True) for h in halves]
    torch.testing.assert_close(partial[0] + partial[1], full(x, is_causal=True),
                               atol=ATOL, rtol=ATOL)
    # two heads per half, also through a KV cache (B, 2, T, hs)
    cache = KVCache(max_len=8)
    halves[1](x[:, :5], is_causal=True, kv_cache=cache)
    assert cache.k.shape == (2, 2, 5, 4)
