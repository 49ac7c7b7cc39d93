"""GPT's optional architecture (RoPE, RMSNorm, QK-norm, ReLU^2, SwiGLU, untied head,
zero-init): every combination against a float64 forward written from the formulas,
causality and the KV cache with RoPE, zero-init's first step, bf16 autocast."""

import math

import pytest
import torch
import torch.nn.functional as F
from references import rope_reference

from llmcore.models.gpt import GPT, GPTConfig

BASE = dict(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=24)
OPTIONS = [dict(), dict(pos="rope"), dict(norm="rmsnorm"), dict(qk_norm=True),
           dict(qk_norm=True, norm="rmsnorm"), dict(activation="relu2"),
           dict(activation="swiglu"), dict(tie_weights=False),
           dict(pos="rope", norm="rmsnorm", qk_norm=True, activation="relu2",
                tie_weights=False, zero_init=True)]


def perturbed(**options) -> GPT:
    """A model whose every parameter is random (norm gains too, zero-init undone),
    so that no term of the forward can hide behind a 0 or a 1."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(**BASE, **options)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.eval()


def reference_logits(m: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The forward of ``m`` in float64 from its state_dict and the papers' formulas."""
    c, sd = m.config, m.state_dict()
    t, hs = idx.shape[1], c.n_embd // c.n_head

    def norm(x, name):
        if c.norm == "layernorm":
            x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(
                x.var(-1, unbiased=False, keepdim=True) + 1e-5)
        else:
            x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        return x * sd[f"{name}.weight"]

    def heads(x):  # (B, T, C) -> (B, nh, T, hs)
        return x.view(x.shape[0], t, c.n_head, hs).transpose(1, 2)

    x = sd["tok_emb.weight"][idx]
    if c.pos == "learned":
        x = x + sd["pos_emb.weight"][:t]
    for i in range(c.n_layer):
        b = f"blocks.{i}"
        q, k, v = (norm(x, f"{b}.norm1") @ sd[f"{b}.self_attn.qkv_proj.weight"].T
                   ).chunk(3, dim=-1)
        q, k, v = heads(q), heads(k), heads(v)
        if c.qk_norm:
            q, k = norm(q, f"{b}.self_attn.q_norm"), norm(k, f"{b}.self_attn.k_norm")
        if c.pos == "rope":
            pos = torch.arange(t)
            q, k = rope_reference(q, pos), rope_reference(k, pos)
        scores = q @ k.transpose(-2, -1) / math.sqrt(hs)
        scores = scores.masked_fill(~torch.ones(t, t).tril().bool(), float("-inf"))
        att = torch.softmax(scores, dim=-1) @ v  # (B, nh, T, hs)
        x = x + att.transpose(1, 2).reshape(x.shape) @ sd[
            f"{b}.self_attn.out_proj.weight"].T
        h = norm(x, f"{b}.norm2")
        a = h @ sd[f"{b}.ffn.linear1.weight"].T
        if c.activation == "gelu":
            a = 0.5 * a * (1 + torch.erf(a / math.sqrt(2)))
        elif c.activation == "relu2":
            a = torch.clamp(a, min=0) ** 2
        else:  # swiglu
            g = h @ sd[f"{b}.ffn.gate.weight"].T
            a = g * torch.sigmoid(g) * a
        x = x + a @ sd[f"{b}.ffn.linear2.weight"].T
    head = sd["tok_emb.weight" if c.tie_weights else "lm_head.weight"]
    return norm(x, "ln_f") @ head.T


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(o) or "default")
def test_forward_matches_the_float64_formulas(options):
    m = perturbed(**options)
    idx = torch.randint(40, (2, 16), generator=torch.Generator().manual_seed(1))
    logits, _ = m(idx)
    # RotaryEmbedding keeps its cos/sin tables in fp32 (the model's dtype casts them)
    tol = 1e-6 if options.get("pos") == "rope" else 1e-10
    torch.testing.assert_close(logits, reference_logits(m, idx), rtol=tol, atol=tol)


def test_rope_replaces_the_position_table_and_stays_causal():
    m = perturbed(pos="rope")
    assert m.pos_emb is None and not any("pos_emb" in n for n, _ in
                                         m.named_parameters())
    rope = m.blocks[0].self_attn.rope
    assert all(b.self_attn.rope is rope for b in m.blocks)  # one table for all
    emb = {}
    m.tok_emb.register_forward_hook(lambda mod, a, out: emb.update(x=out) or
                                    out.retain_grad())
    idx = torch.randint(40, (1, 10))
    m(idx)[0][0, 4].sum().backward()
    g = emb["x"].grad[0].abs().sum(-1)  # (T,)
    assert (g[5:] == 0).all() and (g[:5] > 0).all()


@pytest.mark.parametrize("static", [True, False])
def test_rope_with_a_kv_cache_matches_the_full_forward(static):
    m = perturbed(pos="rope", qk_norm=True)
    idx = torch.randint(40, (2, 12))
    full, _ = m(idx)
    caches = m.new_kv_caches(static=static)
    parts = [m(idx[:, :7], kv_caches=caches)[0]]
    parts += [m(idx[:, i:i + 1], kv_caches=caches)[0] for i in range(7, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-9, atol=1e-9)


def test_zero_init_starts_uniform_and_learns():
    """Every block starts as the identity and the logits at 0. The first step moves
    only the output layer (every other gradient flows back through it, and it is
    0); from the second on the zero projections get gradients too."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(**BASE, tie_weights=False, zero_init=True))
    idx = torch.randint(40, (4, 16))
    logits, loss = m(idx, idx)
    assert torch.equal(logits, torch.zeros_like(logits))
    assert loss.item() == pytest.approx(math.log(40), abs=1e-6)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    grads = []
    for _ in range(6):
        opt.zero_grad()
        m(idx, idx)[1].backward()
        grads.append([b.self_attn.out_proj.weight.grad.abs().sum().item() +
                      b.ffn.linear2.weight.grad.abs().sum().item() for b in m.blocks])
        opt.step()
    assert grads[0] == [0.0, 0.0] and all(g > 0 for g in grads[1])
    assert m(idx, idx)[1].item() < math.log(40) - 0.1


def test_untied_head_and_swiglu_widths():
    tied, untied = GPT(GPTConfig(**BASE)), GPT(GPTConfig(**BASE, tie_weights=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight
    extra = sum(p.numel() for p in untied.parameters()) - sum(
        p.numel() for p in tied.parameters())
    assert extra == 40 * 24
    cfg = GPTConfig(**{**BASE, "n_embd": 768, "n_head": 12}, activation="swiglu")
    assert cfg.d_ff == 2048  # 8 C / 3: three matrices with two 4 C ones' parameters
    assert 3 * cfg.d_ff * 768 == 2 * 4 * 768 * 768


@pytest.mark.parametrize("options", OPTIONS[1:], ids=lambda o: "+".join(o))
def test_every_option_trains_under_bf16_autocast(options):
    torch.manual_seed(0)
    m = GPT(GPTConfig(**BASE, **options))
    idx = torch.randint(40, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = m(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in m.parameters())


@pytest.mark.parametrize("field,value", [("pos", "alibi"), ("norm", "batchnorm"),
                                         ("activation", "tanh")])
def test_unknown_options_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**BASE, **{field: value})


def test_relu2_is_relu_squared_with_its_gradient():
    from llmcore.nn.layers import ACTIVATIONS
    x = torch.linspace(-3, 3, 61, dtype=torch.float64, requires_grad=True)
    y = ACTIVATIONS["relu2"](x)
    y.sum().backward()
    torch.testing.assert_close(y, F.relu(x) ** 2)
    torch.testing.assert_close(x.grad, 2 * F.relu(x.detach()))
