"""The encoder-decoder: masks from ids, causality, caching, a tiny task learned."""

import pytest
import torch

from llmcore.models.seq2seq import (EncoderDecoder, Seq2SeqConfig, padding_mask,
                                    target_mask)

PAD, BOS, EOS = 0, 1, 2


def tiny(norm_first=True, **kw):
    torch.manual_seed(0)
    cfg = Seq2SeqConfig(src_vocab=12, tgt_vocab=12, d_model=32, n_heads=4,
                        n_enc_layers=2, n_dec_layers=2, d_ff=64, max_len=24,
                        norm_first=norm_first, **kw)
    return EncoderDecoder(cfg).eval()


def test_masks_from_ids():
    ids = torch.tensor([[5, 6, 0], [7, 0, 0]])
    assert padding_mask(ids, 0).shape == (2, 1, 1, 3)
    assert padding_mask(ids, 0)[1, 0, 0].tolist() == [True, False, False]
    m = target_mask(ids, 0)
    assert m.shape == (2, 1, 3, 3)
    assert m[0, 0].tolist() == [[True, False, False], [True, True, False],
                                [True, True, False]]


@pytest.mark.parametrize("norm_first", [False, True])
def test_shapes_and_causality(norm_first):
    model = tiny(norm_first)
    src = torch.randint(3, 12, (2, 7))
    tgt = torch.randint(3, 12, (2, 5))
    logits = model(src, tgt)
    assert logits.shape == (2, 5, 12) and torch.isfinite(logits).all()
    changed = tgt.clone()
    changed[:, 3:] = (changed[:, 3:] + 1 - 3) % 9 + 3  # change the future only
    torch.testing.assert_close(model(src, changed)[:, :3], logits[:, :3])
    assert not torch.allclose(model(src, changed)[:, 3:], logits[:, 3:])


def test_source_padding_changes_nothing():
    model = tiny()
    src = torch.randint(3, 12, (2, 6))
    tgt = torch.randint(3, 12, (2, 4))
    padded = torch.cat([src, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded, tgt), model(src, tgt),
                               atol=1e-5, rtol=1e-5)


def test_cross_attention_weights_and_cached_generation():
    model = tiny()
    src = torch.randint(3, 12, (3, 6))
    src[0, 4:] = PAD
    _, cross = model(src, torch.randint(3, 12, (3, 5)), need_weights=True)
    assert len(cross) == 2 and cross[0].shape == (3, 4, 5, 6)
    assert (cross[-1][0, ..., 4:] == 0).all()  # no attention to source padding
    a = model.generate(src, BOS, EOS, 10, use_cache=True)
    b = model.generate(src, BOS, EOS, 10, use_cache=False)
    assert torch.equal(a, b) and (a[:, 0] == BOS).all()


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from threads, and lose much when cores are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_learns_to_reverse_short_sequences(one_thread):
    """Golden short run: 150 steps on reversing 5 digits drives the loss well down."""
    model = tiny()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(150):
        src = torch.randint(3, 12, (32, 5), generator=g)
        tgt = torch.cat([torch.full((32, 1), BOS), src.flip(1),
                         torch.full((32, 1), EOS)], dim=1)
        loss = model.loss(src, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5, loss.item()
    model.eval()
    src = torch.randint(3, 12, (64, 5), generator=g)
    out = model.generate(src, BOS, EOS, 6)
    acc = (out[:, 1:6] == src.flip(1)).all(1).float().mean().item()
    assert acc > 0.5, acc


def test_bad_inputs():
    with pytest.raises(ValueError, match="multiple of n_heads"):
        Seq2SeqConfig(src_vocab=5, tgt_vocab=5, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="d_model"):
        Seq2SeqConfig(src_vocab=5, tgt_vocab=5, d_model=0)
    model = tiny()
    with pytest.raises(ValueError, match=r"src must be a \(B, T\).*max_len=24"):
        model(torch.randint(3, 12, (2, 30)), torch.randint(3, 12, (2, 4)))
    with pytest.raises(ValueError, match="outside"):
        model(torch.randint(3, 12, (2, 3)), torch.full((2, 4), 50))
    with pytest.raises(ValueError, match="pad_id"):
        model.generate(torch.randint(3, 12, (2, 3)), PAD, EOS, 4)
