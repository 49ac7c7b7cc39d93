"""Encoder and decoder blocks against nn.TransformerEncoderLayer / DecoderLayer."""

import pytest
import torch
from torch import nn

from book.workers.torch_layers import load_torch_weights
from llmcore.nn import DecoderBlock, EncoderBlock, GPTBlock, KVCache, causal_mask

D, NH, FF = 16, 4, 24
TOL = dict(atol=2e-5, rtol=2e-5)


def randomize(module):
    """Non-trivial norms too: the defaults (ones, zeros) would hide a swapped norm."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_gain = name.startswith("norm") and name.endswith("weight")
            p.normal_(1.0 if is_gain else 0.0, 0.3)
    return module


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_encoder_block_matches_torch(norm_first, activation, bias, use_sdpa):
    ref = randomize(nn.TransformerEncoderLayer(D, NH, FF, dropout=0.0,
                                               activation=activation, batch_first=True,
                                               norm_first=norm_first, bias=bias)).eval()
    mine = EncoderBlock(D, NH, FF, activation=activation, norm_first=norm_first,
                        bias=bias, use_sdpa=use_sdpa).eval()
    load_torch_weights(mine, ref)
    x = torch.randn(3, 7, D)
    torch.testing.assert_close(mine(x), ref(x), **TOL)
    allowed = causal_mask(7)
    torch.testing.assert_close(mine(x, attn_mask=allowed),
                               ref(x, src_mask=~allowed), **TOL)  # torch: True = masked
    torch.testing.assert_close(mine(x, is_causal=True),
                               ref(x, src_mask=~allowed, is_causal=True), **TOL)
    keep = torch.ones(3, 7, dtype=torch.bool)
    keep[1, 4:] = False
    out = mine(x, attn_mask=keep[:, None, None, :])
    torch.testing.assert_close(out, ref(x, src_key_padding_mask=~keep), **TOL)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_decoder_block_matches_torch(norm_first, activation, use_sdpa):
    ref = randomize(nn.TransformerDecoderLayer(D, NH, FF, dropout=0.0,
                                               activation=activation, batch_first=True,
                                               norm_first=norm_first)).eval()
    mine = DecoderBlock(D, NH, FF, activation=activation, norm_first=norm_first,
                        use_sdpa=use_sdpa).eval()
    load_torch_weights(mine, ref)
    x, mem = torch.randn(3, 6, D), torch.randn(3, 9, D)
    allowed = causal_mask(6)
    src_keep = torch.ones(3, 9, dtype=torch.bool)
    src_keep[0, 5:] = False
    expect = ref(x, mem, tgt_mask=~allowed, memory_key_padding_mask=~src_keep)
    out = mine(x, mem, tgt_mask=allowed, memory_mask=src_keep[:, None, None, :])
    torch.testing.assert_close(out, expect, **TOL)
    out = mine(x, mem, tgt_is_causal=True, memory_mask=src_keep[:, None, None, :])
    torch.testing.assert_close(out, expect, **TOL)


def test_decoder_uses_memory_and_is_causal():
    torch.manual_seed(0)
    block = DecoderBlock(D, NH, FF, norm_first=True)
    x = torch.randn(2, 8, D, requires_grad=True)
    mem = torch.randn(2, 5, D, requires_grad=True)
    block(x, mem, tgt_is_causal=True)[:, 3].sum().backward()
    assert (x.grad[:, 4:] == 0).all() and (x.grad[:, :4] != 0).any()
    assert (mem.grad != 0).any()  # the cross-attention reads the encoder's output


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_gpt_style_block_with_kv_cache(norm):
    torch.manual_seed(0)
    block = EncoderBlock(D, NH, FF, activation="gelu", norm_first=True,
                         norm=norm).eval()
    x = torch.randn(2, 9, D)
    full = block(x, is_causal=True)
    cache = KVCache()
    parts = [block(x[:, :5], is_causal=True, kv_cache=cache)]
    parts += [block(x[:, t:t + 1], kv_cache=cache) for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(parts, 1), full, **TOL)


def test_need_weights_shapes():
    torch.manual_seed(0)
    enc = EncoderBlock(D, NH, FF, activation="swiglu").eval()
    out, w = enc(torch.randn(2, 7, D), need_weights=True)
    assert out.shape == (2, 7, D) and w.shape == (2, NH, 7, 7)
    dec = DecoderBlock(D, NH, FF).eval()
    out, ws, wc = dec(torch.randn(2, 4, D), torch.randn(2, 7, D), tgt_is_causal=True,
                      need_weights=True)
    assert ws.shape == (2, NH, 4, 4) and wc.shape == (2, NH, 4, 7)
    torch.testing.assert_close(ws.triu(1), torch.zeros_like(ws))
    torch.testing.assert_close(wc.sum(-1), torch.ones(2, NH, 4))


def test_block_bad_inputs():
    with pytest.raises(ValueError, match="norm='batchnorm'"):
        EncoderBlock(D, NH, FF, norm="batchnorm")
    with pytest.raises(ValueError, match="multiple of n_heads"):
        DecoderBlock(18, NH, FF)
    dec = DecoderBlock(D, NH, FF)
    with pytest.raises(ValueError, match=r"key .*\(2, T, 16\)"):
        dec(torch.randn(2, 4, D), torch.randn(3, 7, D))


@pytest.mark.parametrize("static", [False, True])
def test_gpt_block_with_kv_cache_and_its_dropout_placement(static):
    torch.manual_seed(0)
    block = GPTBlock(D, NH, dropout=0.5).eval()
    x = torch.randn(2, 9, D)
    full = block(x)
    cache = KVCache(max_len=12 if static else None)
    parts = [block(x[:, :5], kv_cache=cache)]
    parts += [block(x[:, t:t + 1], kv_cache=cache) for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(parts, 1), full, **TOL)
    # GPT-2: dropout on the attention weights and the two residual branches only
    assert block.self_attn.dropout == 0.5 and block.ffn.dropout.p == 0.0
    assert block.dropout1.p == block.dropout2.p == 0.5
    block.train()
    torch.manual_seed(1)
    assert not torch.allclose(block(x), full)


def test_gpt_block_loads_torch_encoder_layer_weights():
    ref = randomize(nn.TransformerEncoderLayer(D, NH, 4 * D, dropout=0.0,
                                               activation="gelu", batch_first=True,
                                               norm_first=True, bias=True)).eval()
    mine = GPTBlock(D, NH, bias=True).eval()
    load_torch_weights(mine, ref)  # packed in_proj -> fused qkv_proj
    x = torch.randn(3, 7, D)
    torch.testing.assert_close(mine(x), ref(x, src_mask=~causal_mask(7),
                                            is_causal=True), **TOL)
