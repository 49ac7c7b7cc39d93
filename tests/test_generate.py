"""Generation: greedy with and without the KV cache agree; filters; bad input."""

import pytest
import torch

from llmcore.generate import filter_top_k, filter_top_p, generate, sample_next
from llmcore.models.gpt import GPT, GPTConfig


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


def test_training_mode_restored(model):
    model.train()
    generate(model, torch.zeros(1, 1, dtype=torch.long), 2)
    assert model.training
    model.eval()
