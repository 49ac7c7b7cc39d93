"""GPT: shapes, initial loss, weight tying, init, causality, kernel parity, KV cache."""

import math

import pytest
import torch

from llmcore.accounting import count_params
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.nn import EncoderBlock, GPTBlock, LayerNorm
from llmcore.nn.swap import swap_modules

CFG = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)


def model(**changes):
    torch.manual_seed(0)
    cfg = GPTConfig(**{**CFG.__dict__, **changes})
    return GPT(cfg).eval()


@pytest.mark.parametrize("changes", [dict(n_embd=30, n_head=4), dict(n_layer=0),
                                     dict(vocab_size=-1), dict(dropout=1.0)])
def test_config_validation(changes):
    with pytest.raises(ValueError):
        GPTConfig(**{**CFG.__dict__, **changes})


def test_shapes_and_initial_loss():
    m = model()
    idx, targets = torch.randint(50, (2, 3, 16))
    logits, loss = m(idx, targets)
    assert logits.shape == (3, 16, 50)
    # Small init: the first prediction is close to uniform, loss close to ln V.
    assert abs(loss.item() - math.log(50)) < 0.1
    assert m(idx)[1] is None


def test_weight_tying_and_the_parameter_count():
    m = model()
    assert m.lm_head.weight is m.tok_emb.weight
    every = dict(m.named_parameters(remove_duplicate=False))  # the tied one twice
    assert "lm_head.weight" in every and "tok_emb.weight" in every
    assert count_params(m) == sum(p.numel() for p in every.values()) - 50 * 32
    assert count_params(m, exclude=("pos_emb.weight",)) == count_params(m) - 16 * 32


def test_residual_projections_are_scaled():
    m = GPT(GPTConfig(50, 16, 8, 2, 256))
    std = torch.cat([b.ffn.linear2.weight.flatten() for b in m.blocks]).std().item()
    assert std == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert m.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_causal_through_gradients():
    m = model()
    idx = torch.randint(50, (1, 10))
    emb = {}

    def keep(module, args, out):
        out.retain_grad()
        emb["x"] = out

    m.tok_emb.register_forward_hook(keep)
    logits, _ = m(idx)
    logits[0, 4].sum().backward()
    g = emb["x"].grad[0].abs().sum(-1)  # (T,)
    assert (g[5:] == 0).all() and (g[:5] > 0).all()


def test_hand_attention_matches_sdpa():
    idx = torch.randint(50, (2, 16))
    a, _ = model(use_sdpa=True)(idx)
    b, _ = model(use_sdpa=False)(idx)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_kv_cache_forward_matches_full():
    m = model()
    idx = torch.randint(50, (2, 12))
    full, _ = m(idx)
    caches = m.new_kv_caches()
    parts = [m(idx[:, :5], kv_caches=caches)[0]]
    parts += [m(idx[:, t:t + 1], kv_caches=caches)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_bad_input():
    m = model()
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        m(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="targets"):
        m(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


def test_overfits_one_batch():
    m = model().train()
    idx = torch.randint(50, (4, 16))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(30):
        _, loss = m(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5


def test_blocks_are_gpt_blocks_with_fused_qkv_and_fused_norms():
    m = model()
    assert all(type(b) is GPTBlock and not isinstance(b, EncoderBlock)
               for b in m.blocks)
    attn = m.blocks[0].self_attn
    assert attn.fused_qkv and attn.qkv_proj.weight.shape == (3 * 32, 32)
    assert type(m.ln_f) is torch.nn.LayerNorm and type(m.blocks[0].norm1) is \
        torch.nn.LayerNorm
    assert not CFG.bias and all(b.ffn.linear1.bias is None for b in m.blocks)
    assert m.blocks[0].ffn.dropout.p == 0.0  # GPT-2: no dropout inside the MLP


def test_fused_norms_match_the_hand_written_twins():
    m = model(bias=True)
    with torch.no_grad():  # non-trivial gains and shifts
        for name, p in m.named_parameters():
            if "norm" in name or "ln_f" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    state = m.state_dict()
    hand = model(bias=True)
    swapped = swap_modules(hand, lambda mod, _: isinstance(mod, torch.nn.LayerNorm),
                           lambda mod: LayerNorm(mod.normalized_shape, mod.eps))
    assert len(swapped) == 2 * 2 + 1
    hand.load_state_dict(state)  # same names: weight, bias
    idx = torch.randint(50, (2, 16))
    torch.testing.assert_close(hand(idx)[0], m(idx)[0], atol=1e-5, rtol=1e-5)


def test_hidden_is_the_trunk_and_old_separate_qkv_checkpoints_load():
    m = model()
    idx = torch.randint(50, (2, 16))
    h = m.hidden(idx)
    assert h.shape == (2, 16, 32)
    torch.testing.assert_close(m.lm_head(h), m(idx)[0])
    # a checkpoint with separate q/k/v projections (the layout before fusing) loads
    state = {}
    for k, v in m.state_dict().items():
        if "qkv_proj" in k:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3)):
                state[k.replace("qkv_proj", name)] = part
        else:
            state[k] = v
    other = model()
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    other.load_state_dict(state)
    torch.testing.assert_close(other(idx)[0], m(idx)[0])
