"""Generation: greedy with and without the KV cache agree; static == growing cache;
filters; compiled decode step; clear errors for bad input."""

import pytest
import torch

import llmcore.generate as generate_module
from llmcore.generate import filter_top_k, filter_top_p, generate, sample_next
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.nn import KVCache


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32))


@pytest.mark.parametrize("new", [5, 30])  # 30 runs past the context of 16
def test_cached_equals_uncached_greedy(model, new):
    idx = torch.randint(40, (3, 4), generator=torch.Generator().manual_seed(1))
    a = generate(model, idx, new, temperature=0, use_cache=True)
    b = generate(model, idx, new, temperature=0, use_cache=False)
    assert a.shape == (3, 4 + new)
    assert torch.equal(a[:, :4], idx)
    assert torch.equal(a, b)


def test_sampling_reproducible_and_cache_agnostic(model):
    idx = torch.zeros(2, 1, dtype=torch.long)
    runs = [generate(model, idx, 12, temperature=1.0, top_k=10, use_cache=c,
                     generator=torch.Generator().manual_seed(3)) for c in (True, False)]
    assert torch.equal(runs[0], runs[1])


def test_top_k_one_is_greedy(model):
    idx = torch.zeros(1, 1, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, idx, 8, top_k=1, generator=g),
                       generate(model, idx, 8, temperature=0))


def test_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    def dropped(x):
        return torch.isinf(x).tolist()[0]
    assert dropped(filter_top_k(logits, 2)) == [False, False, True, True]
    assert dropped(filter_top_p(logits, 0.8)) == [False, False, True, True]
    assert dropped(filter_top_p(logits, 0.81)) == [False, False, False, True]
    # p small: the top token always stays
    assert dropped(filter_top_p(logits, 0.01)) == [False, True, True, True]
    # shuffled vocabulary order: same kept set
    perm = torch.tensor([2, 0, 3, 1])
    kept = ~torch.isinf(filter_top_p(logits[:, perm], 0.8))
    assert kept.tolist() == [[False, True, False, True]]


def test_sample_frequencies_follow_temperature():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    freq = torch.bincount(sample_next(logits, 1.0, generator=g).flatten(), minlength=3)
    assert torch.allclose(freq / 20000, torch.tensor([0.7, 0.2, 0.1]), atol=0.02)
    cold = torch.bincount(sample_next(logits, 0.3, generator=g).flatten(), minlength=3)
    assert cold[0] / 20000 > 0.95


def test_bad_input(model):
    with pytest.raises(ValueError, match="block_size=16"):
        generate(model, torch.zeros(1, 17, dtype=torch.long), 1)
    for kwargs in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0),
                   dict(top_p=1.5), dict(max_new_tokens=-1)):
        args = {"max_new_tokens": 1, **kwargs}
        with pytest.raises(ValueError):
            generate(model, torch.zeros(1, 2, dtype=torch.long), **args)
    with pytest.raises(ValueError, match="idx"):
        generate(model, torch.zeros(1, 2), 1)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=float("nan")), r"temperature must be a number >= 0.*nan"),
    (dict(temperature=1e-7), r"too small.*temperature=0 for greedy"),
    (dict(temperature=1e-30), r"too small.*temperature=0 for greedy"),
    (dict(top_k=5.0), r"top_k must be a positive int.*pass top_k=5"),
    (dict(top_k=2.5), r"top_k must be a positive int or None, got 2.5$"),
    (dict(top_k=True), r"top_k must be a positive int"),
    (dict(max_new_tokens=2.0), r"max_new_tokens must be an int"),
])
def test_clear_messages_for_bad_sampling_arguments(model, kwargs, message):
    args = {"max_new_tokens": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, torch.zeros(1, 2, dtype=torch.long), **args)


@pytest.mark.parametrize("bad", [40, 1000, -1])
def test_token_id_outside_the_vocabulary(model, bad):
    idx = torch.tensor([[1, bad, 2]])
    with pytest.raises(ValueError, match=rf"token id {bad}, outside the model's "
                       r"vocabulary \[0, 40\); encode the prompt with the tokenizer"):
        generate(model, idx, 1)
    generate(model, torch.tensor([[0, 39]]), 1)  # the edges are fine


def test_tiny_but_allowed_temperature_is_nearly_greedy(model):
    idx = torch.zeros(2, 1, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, idx, 6, temperature=1e-5, generator=g),
                       generate(model, idx, 6, temperature=0))


# ------------------------------------------------------------ static KV cache

@pytest.mark.parametrize("new", [6, 14])
@pytest.mark.parametrize("fixed_shapes", [True, False])
def test_static_cache_equals_the_growing_cache(model, new, fixed_shapes):
    """Step by step, the preallocated cache gives the logits the torch.cat one did,
    reading all slots (masked) or only the written prefix."""
    idx = torch.randint(40, (3, 2), generator=torch.Generator().manual_seed(2))
    runs = []
    for static in (True, False):
        caches = model.new_kv_caches(static=static)
        assert all(c.static == static for c in caches)
        for c in caches:
            c.fixed_shapes = fixed_shapes
        fresh, out, logits = idx, idx, []
        for _ in range(new):
            step, _ = model(fresh, kv_caches=caches)
            logits.append(step[:, -1])
            fresh = step[:, -1:].argmax(-1)
            out = torch.cat([out, fresh], 1)
        runs.append((out, torch.stack(logits, 1), caches))
    (out_s, log_s, caches_s), (out_g, log_g, caches_g) = runs
    assert torch.equal(out_s, out_g)
    torch.testing.assert_close(log_s, log_g, atol=1e-5, rtol=1e-5)
    c_s, c_g = caches_s[0], caches_g[0]
    assert len(c_s) == len(c_g) == 2 + new - 1
    assert c_s._k.shape == (3, 2, 16, 16)  # (B, nh, block_size, hs), allocated once
    torch.testing.assert_close(c_s.k, c_g.k)


def test_static_cache_writes_in_place_and_reorders():
    cache = KVCache(max_len=6)
    k = torch.randn(3, 2, 4, 5)
    cache.update(k, -k)
    buf = cache._k
    for t in range(2):
        k_new = torch.randn(3, 2, 1, 5)
        k_all, v_all = cache.update(k_new, -k_new)
        assert k_all is buf and k_all.shape == (3, 2, 6, 5)  # same buffer every step
        torch.testing.assert_close(cache.k[:, :, 4 + t], k_new[:, :, 0])
    assert len(cache) == 6
    mask = cache.key_mask(causal=True)
    assert mask.tolist() == [[True] * 6]
    with pytest.raises(ValueError, match="max_len=6"):
        cache.update(k_new, k_new)
    # beam search's reordering, by method and by assignment, keeps the buffer
    sel = torch.tensor([2, 2, 0])
    expect = cache.k[sel].clone()
    cache.reorder(sel)
    torch.testing.assert_close(cache.k, expect)
    growing = KVCache()
    growing.update(expect, expect)
    growing.reorder(torch.tensor([1, 0, 2]))
    torch.testing.assert_close(growing.k, expect[[1, 0, 2]])
    cache.k, cache.v = cache.k[[1, 0, 2]], cache.v[[1, 0, 2]]
    assert cache._k is buf and len(cache) == 6
    torch.testing.assert_close(cache.k, growing.k)
    cache.reset()
    assert len(cache) == 0 and cache._k is buf


def test_static_cache_masks_the_slots_not_yet_written():
    cache = KVCache(max_len=5)
    k = torch.randn(1, 1, 2, 3)
    cache.update(k, k)
    assert cache.key_mask(causal=True).tolist() == [
        [True, False, False, False, False], [True, True, False, False, False]]
    assert cache.key_mask(causal=False).tolist() == [
        [True, True, False, False, False]] * 2


def test_compiled_decode_step_gives_the_same_tokens(model, monkeypatch):
    """The compile path traced by dynamo (the eager backend keeps the test fast on
    a CPU; on CUDA ``generate`` compiles with inductor by default)."""
    calls, real_compile = [], torch.compile

    def eager_compile(m, **kwargs):
        calls.append(kwargs)
        return real_compile(m, backend="eager", **kwargs)

    caches = []
    new_kv_caches = model.new_kv_caches
    monkeypatch.setattr(model, "new_kv_caches",
                        lambda: caches.extend(new_kv_caches()) or caches)

    torch._dynamo.reset()
    monkeypatch.setattr(generate_module.torch, "compile", eager_compile)
    idx = torch.randint(40, (2, 3), generator=torch.Generator().manual_seed(4))
    a = generate(model, idx, 8, temperature=0, compile=True)
    monkeypatch.undo()
    assert calls == [dict(dynamic=True)]
    assert all(c.static and c.fixed_shapes for c in caches)  # all slots, masked
    assert torch.equal(a, generate(model, idx, 8, temperature=0, compile=False))


def test_training_mode_restored(model):
    model.train()
    generate(model, torch.zeros(1, 1, dtype=torch.long), 2)
    assert model.training
    model.eval()
