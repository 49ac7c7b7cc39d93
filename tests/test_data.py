"""Data pipeline: LM windows and token cache, MLM masking, RTD corruption, collate."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from book.workers.rtd import detection_loss, replace_tokens
from llmcore.data import (IGNORE_INDEX, LMWindows, attention_mask_matrix,
                          causal_lm_targets, collate, get_batch, lm, load_token_cache,
                          mask_tokens, pad_sequences, split_tokens, write_token_cache)
from llmcore.data.lm import token_dtype, unigram_loss

# ---------------------------------------------------------------- causal LM windows

@pytest.mark.parametrize("kind", ["tensor", "numpy", "list"])
def test_get_batch_targets_are_inputs_shifted(kind):
    ids = np.arange(1000) % 97
    data = {"tensor": torch.tensor(ids), "numpy": ids, "list": ids.tolist()}[kind]
    x, y = get_batch(data, 8, 16, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal((x + 1) % 97, y)  # consecutive ids: y is x shifted by one
    assert x.is_contiguous() and y.is_contiguous()  # y.view(-1) works in a loss


def test_get_batch_seeded_and_same_for_tensor_and_numpy():
    ids = np.random.default_rng(0).integers(0, 50, 5000)
    a = get_batch(ids, 4, 32, generator=torch.Generator().manual_seed(1))
    b = get_batch(torch.tensor(ids), 4, 32, generator=torch.Generator().manual_seed(1))
    c = get_batch(ids, 4, 32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_get_batch_covers_the_last_window():
    ids = torch.arange(12)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        x, y = get_batch(ids, 4, 10, generator=g)
        seen |= {int(v) for v in y[:, -1]}
    assert seen == {10, 11}  # two possible windows, the last id 11 included


def test_get_batch_bad_input():
    with pytest.raises(ValueError, match="block_size"):
        get_batch(torch.arange(5), 2, 5)
    with pytest.raises(ValueError, match="1-D"):
        get_batch(torch.zeros(3, 3, dtype=torch.long), 2, 1)


def test_split_tokens_keeps_order():
    train, val = split_tokens(torch.arange(100), 0.1)
    assert torch.equal(train, torch.arange(90))
    assert torch.equal(val, torch.arange(90, 100))
    with pytest.raises(ValueError, match="val_fraction"):
        split_tokens(torch.arange(100), 1.0)


def test_lm_windows_cover_every_target_once():
    ids = torch.arange(101)
    ds = LMWindows(ids, block_size=10)
    assert len(ds) == 10
    targets = torch.cat([ds[i][1] for i in range(len(ds))])
    assert torch.equal(targets, torch.arange(1, 101))
    x, y = ds[-1]
    assert torch.equal(x + 1, y)
    assert len(LMWindows(ids, 10, stride=5)) == 19
    with pytest.raises(IndexError):
        ds[10]


def test_token_cache_roundtrip_in_chunks(tmp_path):
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 70000, n) for n in (5, 0, 300)]
    path = tmp_path / "ids.bin"
    assert write_token_cache(path, iter(chunks), vocab_size=70000) == 305
    ids = load_token_cache(path)
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint32
    assert np.array_equal(ids, np.concatenate(chunks))
    x, y = get_batch(ids, 3, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 1:], y[:, :-1])
    # one flat sequence, small vocabulary: two bytes per id
    assert write_token_cache(path, [1, 2, 3], vocab_size=256) == 3
    assert load_token_cache(path).dtype == np.uint16
    assert list(load_token_cache(path)) == [1, 2, 3]
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed away


def test_token_cache_rejects_bad_files(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a cache at all, just bytes")
    with pytest.raises(ValueError, match="not a token cache"):
        load_token_cache(junk)
    good = tmp_path / "good.bin"
    write_token_cache(good, torch.arange(10), vocab_size=10)
    good.write_bytes(good.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated"):
        load_token_cache(good)
    before = good.read_bytes()
    with pytest.raises(ValueError, match="vocab_size"):
        write_token_cache(good, [5, 11], vocab_size=10)
    # the failed write left the old file as it was and no temporary file behind
    assert good.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


def test_token_ids_past_two_to_the_32_do_not_wrap(tmp_path):
    """A vocabulary beyond 2**32 ids needs 8 bytes per id; uint32 used to wrap 2**32
    to 0 without a word."""
    path = tmp_path / "big.bin"
    ids = [0, 2**32 - 1, 2**32, 2**32 + 7]
    assert write_token_cache(path, ids, vocab_size=2**32 + 8) == 4
    back = load_token_cache(path)
    assert back.dtype == np.uint64 and [int(i) for i in back] == ids
    x, y = get_batch(back, 1, 3, generator=torch.Generator().manual_seed(0))
    assert x.tolist() == [ids[:3]] and y.tolist() == [ids[1:]]
    # the boundaries: exactly 2**16 and 2**32 ids still fit the smaller type
    assert token_dtype(2**16) == np.uint16 and token_dtype(2**16 + 1) == np.uint32
    assert token_dtype(2**32) == np.uint32 and token_dtype(2**32 + 1) == np.uint64
    for bad in (0, 2.5, True, 2**64):
        with pytest.raises(ValueError, match="vocab_size"):
            token_dtype(bad)
    with pytest.raises(ValueError, match="integers"):
        write_token_cache(path, np.array([1.5]), vocab_size=10)


def test_stride_zero_is_an_error_not_the_default():
    """``stride or block_size`` used to turn stride=0 into block_size silently."""
    with pytest.raises(ValueError, match="stride=0"):
        LMWindows(torch.arange(101), block_size=10, stride=0)
    with pytest.raises(ValueError, match="stride=-1"):
        LMWindows(torch.arange(101), block_size=10, stride=-1)
    assert LMWindows(torch.arange(101), 10, stride=None).stride == 10


def test_token_cache_is_written_through_atomic_write(tmp_path, monkeypatch):
    """One atomic write in the package: the cache goes through llmcore.io's."""
    calls = []
    real = lm.atomic_write

    def spy(path, mode="wb", **kw):
        calls.append((str(path), mode))
        return real(path, mode, **kw)

    monkeypatch.setattr(lm, "atomic_write", spy)
    assert write_token_cache(tmp_path / "a.bin", [1, 2], vocab_size=3) == 2
    assert calls == [(str(tmp_path / "a.bin"), "wb")]
    assert list(load_token_cache(tmp_path / "a.bin")) == [1, 2]


def test_unigram_loss_is_the_frequency_model():
    """Against the definition: -mean log p(id), p from smoothed training counts."""
    train, held = [0, 0, 0, 1], [0, 1, 2]
    p = np.array([4, 2, 1]) / 7  # counts + 1
    want = -np.log(p[held]).mean()
    assert unigram_loss(train, held, 3) == pytest.approx(want)
    # uniform data: the unigram loss is log V, the loss of guessing
    ids = torch.arange(50).repeat(20)
    assert unigram_loss(ids, ids, 50) == pytest.approx(math.log(50))
    with pytest.raises(ValueError, match="vocab_size"):
        unigram_loss([0, 5], [0], 3)
    with pytest.raises(ValueError, match="empty"):
        unigram_loss([0], [], 3)


# ---------------------------------------------------------------- masked LM

V, MASK, PAD, CLS = 1000, 3, 0, 1


def test_mask_tokens_statistics():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, V, (256, 256), generator=g)
    ids[:, 0] = CLS
    ids[:, -20:] = PAD
    inputs, labels = mask_tokens(ids, MASK, V, special_ids=[PAD, CLS], generator=g)
    chosen = labels != IGNORE_INDEX
    assert labels.dtype == torch.int64 and inputs.dtype == ids.dtype
    assert torch.equal(labels[chosen], ids[chosen])
    assert not chosen[:, 0].any() and not chosen[:, -20:].any()  # specials untouched
    assert torch.equal(inputs[~chosen], ids[~chosen])  # nothing else changed
    n_ordinary = 256 * (256 - 21)
    frac = chosen.sum().item() / n_ordinary
    assert abs(frac - 0.15) < 0.005
    n = chosen.sum().item()
    masked = (inputs == MASK) & chosen
    kept = (inputs == ids) & chosen
    rand = chosen & ~masked & ~kept
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    # a random draw equals the original with probability ~1/996: counted as kept
    assert abs(kept.sum().item() / n - 0.1) < 0.01
    assert abs(rand.sum().item() / n - 0.1) < 0.01
    assert not torch.isin(inputs[rand], torch.tensor([PAD, CLS, MASK])).any()
    # the random tokens are spread over the vocabulary, not a constant
    assert inputs[rand].unique().numel() > 500


def test_mask_tokens_deterministic_with_generator_and_loss_ignores_unmasked():
    ids = torch.randint(4, V, (4, 64))
    a = mask_tokens(ids, MASK, V, generator=torch.Generator().manual_seed(5))
    b = mask_tokens(ids, MASK, V, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    logits = torch.randn(4, 64, V)
    loss = F.cross_entropy(logits.view(-1, V), a[1].view(-1))
    chosen = a[1] != IGNORE_INDEX
    ref = F.cross_entropy(logits[chosen], ids[chosen])
    assert torch.allclose(loss, ref)


def test_mask_tokens_p_one_and_fraction_knobs():
    ids = torch.randint(4, V, (8, 32))
    inputs, labels = mask_tokens(ids, MASK, V, p=1.0, keep_frac=0.0, random_frac=0.0,
                                 generator=torch.Generator().manual_seed(0))
    assert (inputs == MASK).all() and torch.equal(labels, ids)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.floats(0.01, 1.0), st.integers(0, 99),
       st.sampled_from([torch.int32, torch.int64]))
def test_mask_tokens_invariants(B, T, p, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 12, (B, T), generator=g, dtype=dtype)
    inputs, labels = mask_tokens(ids, MASK, 12, special_ids=[PAD, CLS], p=p,
                                 generator=g)
    chosen = labels != IGNORE_INDEX
    assert inputs.shape == labels.shape == ids.shape and inputs.dtype == dtype
    assert torch.equal(labels[chosen], ids[chosen].long())
    assert torch.equal(inputs[~chosen], ids[~chosen])
    special = torch.tensor([PAD, CLS, MASK], dtype=dtype)
    assert not torch.isin(ids[chosen], special).any()  # specials are never chosen
    changed = inputs != ids
    assert not (changed & ~chosen).any()
    assert not torch.isin(inputs[changed], special[:2]).any()  # nor drawn at random


def test_mask_tokens_bad_input():
    ids = torch.randint(4, V, (2, 8))
    with pytest.raises(ValueError, match="p="):
        mask_tokens(ids, MASK, V, p=0.0)
    with pytest.raises(ValueError, match="mask_id"):
        mask_tokens(ids, V, V)
    with pytest.raises(ValueError, match="vocab_size"):
        mask_tokens(ids + V, MASK, V)
    with pytest.raises(ValueError, match="integer"):
        mask_tokens(ids.float(), MASK, V)
    with pytest.raises(ValueError, match="keep_frac"):
        mask_tokens(ids, MASK, V, keep_frac=0.6, random_frac=0.6)


# ------------------------------------------------------- replaced-token detection

def test_replace_tokens_labels_and_sampled_equal_original_is_original():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 20, (16, 32), generator=g)
    inputs, labels = mask_tokens(ids, MASK, 20, special_ids=[PAD], generator=g)
    masked = labels != IGNORE_INDEX
    # A generator that puts all its mass on the original token at even columns and on
    # token 4 (a replacement unless the original is 4) at odd ones.
    logits = torch.full((16, 32, 20), -1e4)
    logits.scatter_(-1, ids[..., None], 0.0)
    logits[:, 1::2] = -1e4
    logits[:, 1::2, 4] = 0.0
    disc_in, disc_lab = replace_tokens(inputs, labels, logits, generator=g)
    assert disc_lab.dtype == torch.int64 and disc_in.shape == ids.shape
    assert torch.equal(disc_in[~masked], ids[~masked])  # unmasked: the original
    even = torch.zeros_like(masked)
    even[:, 0::2] = True
    assert torch.equal(disc_in[masked & even], ids[masked & even])
    assert (disc_lab[masked & even] == 0).all()  # sampled == original: "original"
    odd = masked & ~even
    assert (disc_in[odd] == 4).all()
    assert torch.equal(disc_lab[odd], (ids[odd] != 4).long())
    assert torch.equal(disc_lab, (disc_in != ids).long())
    assert (disc_lab[~masked] == 0).all()


def test_replace_tokens_samples_from_the_softmax():
    # One masked position repeated many times; the logits favour 2:1:1 among three ids.
    n = 20000
    ids = torch.zeros(n, 1, dtype=torch.long)
    labels = torch.zeros(n, 1, dtype=torch.long)  # original id 0 everywhere, all masked
    logits = torch.log(torch.tensor([0.5, 0.25, 0.25]))[None, None].expand(n, 1, 3)
    g = torch.Generator().manual_seed(0)
    disc_in, disc_lab = replace_tokens(ids, labels, logits, generator=g)
    freq = torch.bincount(disc_in.view(-1), minlength=3).float() / n
    assert torch.allclose(freq, torch.tensor([0.5, 0.25, 0.25]), atol=0.015)
    assert abs(disc_lab.float().mean().item() - 0.5) < 0.015
    greedy, _ = replace_tokens(ids, labels, logits, temperature=0)
    assert (greedy == 0).all()


def test_replace_tokens_padding_and_loss():
    ids = torch.randint(4, 20, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 1] = ids[:, 1]
    logits = torch.randn(2, 6, 20, requires_grad=True)
    disc_in, disc_lab = replace_tokens(ids, labels, logits, attention_mask=mask,
                                       generator=torch.Generator().manual_seed(0))
    assert (disc_lab[~mask] == IGNORE_INDEX).all() and (disc_lab[mask] >= 0).all()
    d = torch.randn(2, 6)
    ref = F.binary_cross_entropy_with_logits(d[mask], disc_lab[mask].float())
    assert torch.allclose(detection_loss(d, disc_lab), ref)
    with pytest.raises(ValueError, match="generator_logits"):
        replace_tokens(ids, labels, logits[:, :3])
    with pytest.raises(ValueError, match="disc_labels"):
        detection_loss(d[:, :3], disc_lab)


# ---------------------------------------------------------------- padding and collate

def test_pad_sequences_right_left_and_multiple():
    seqs = [[5, 6, 7], [8], torch.tensor([9, 10])]
    ids, mask = pad_sequences(seqs, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[True] * 3, [True, False, False], [True, True, False]]
    ids, mask = pad_sequences(seqs, pad_id=0, side="left", multiple_of=4)
    assert ids.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 9, 10]]
    assert mask.sum(1).tolist() == [3, 1, 2]
    with pytest.raises(ValueError, match="max_len"):
        pad_sequences(seqs, 0, max_len=2)
    with pytest.raises(ValueError, match="side"):
        pad_sequences(seqs, 0, side="middle")


def test_collate_dicts_and_sequences():
    out = collate([{"input_ids": [1, 2], "label": 1}, {"input_ids": [3], "label": 0}],
                  pad_id=0)
    assert out["input_ids"].tolist() == [[1, 2], [3, 0]]
    assert out["label"].tolist() == [1, 0]
    assert out["attention_mask"].dtype == torch.bool
    out = collate([[1], [2, 3, 4]], pad_id=9, max_len=5)
    assert out["input_ids"].tolist() == [[1, 9, 9, 9, 9], [2, 3, 4, 9, 9]]


def test_attention_mask_matrix_matches_unpadded_attention():
    torch.manual_seed(0)
    seqs = [torch.randint(0, 10, (n,)) for n in (5, 3, 1)]
    for side in ("right", "left"):
        for causal in (False, True):
            ids, mask = pad_sequences(seqs, 0, side=side)
            B, T = ids.shape
            q, k, v = (torch.randn(B, 1, T, 4) for _ in range(3))  # (B, nh, T, hs)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask_matrix(mask, causal=causal))
            assert torch.isfinite(out).all()
            for b in range(B):
                real = mask[b]
                ref = F.scaled_dot_product_attention(
                    q[b:b + 1, :, real], k[b:b + 1, :, real], v[b:b + 1, :, real],
                    is_causal=causal)
                assert torch.allclose(out[b:b + 1, :, real], ref, atol=1e-6)


def test_causal_lm_targets_ignore_pads():
    ids, mask = pad_sequences([[1, 2, 3], [4, 5]], pad_id=0)
    x, y = causal_lm_targets(ids, mask)
    assert x.tolist() == [[1, 2], [4, 5]]
    assert y.tolist() == [[2, 3], [5, IGNORE_INDEX]]
