"""Beam search: greedy at beam size 1, exact with a huge beam, not worse than greedy."""

import itertools

import pytest
import torch

from book.workers.beam import beam_search, length_norm, sequence_logprob
from llmcore.models.seq2seq import EncoderDecoder, Seq2SeqConfig

PAD, BOS, EOS = 0, 1, 2


def make_model(tgt_vocab=12, seed=0):
    torch.manual_seed(seed)
    cfg = Seq2SeqConfig(src_vocab=10, tgt_vocab=tgt_vocab, d_model=32, n_heads=4,
                        n_enc_layers=1, n_dec_layers=2, d_ff=64, max_len=16)
    model = EncoderDecoder(cfg).eval()
    # Sharpen the output so that some rows stop early and others do not.
    with torch.no_grad():
        model.decoder.lm_head.weight.mul_(8.0)
    return model


def sources(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, 10, (n, 5), generator=g)
    src[1, 3:] = PAD  # a padded row
    return src


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_size_one_is_greedy(seed):
    model, src = make_model(seed=seed), sources(seed=seed)
    greedy = model.generate(src, BOS, EOS, max_new_tokens=8)
    out = beam_search(model, src, BOS, EOS, max_new_tokens=8, beam_size=1)
    assert torch.equal(out.tokens, greedy)
    assert torch.allclose(out.logprob, sequence_logprob(model, src, greedy, EOS),
                          atol=1e-4)


def test_wider_beam_is_not_worse_than_greedy():
    for seed in range(3):
        model, src = make_model(seed=seed), sources(n=8, seed=seed)
        greedy = model.generate(src, BOS, EOS, max_new_tokens=8)
        lp_greedy = sequence_logprob(model, src, greedy, EOS)
        out = beam_search(model, src, BOS, EOS, 8, beam_size=8, length_penalty=0.0)
        # The returned score is the true log-probability of the returned tokens.
        rescored = sequence_logprob(model, src, out.tokens, EOS)
        assert torch.allclose(out.logprob, rescored, atol=1e-4)
        assert (out.logprob >= lp_greedy - 1e-4).all()
        assert (out.tokens[:, 0] == BOS).all()


def test_batched_equals_one_at_a_time():
    model, src = make_model(), sources()
    batched = beam_search(model, src, BOS, EOS, 8, beam_size=3)
    for i in range(src.shape[0]):
        single = beam_search(model, src[i:i + 1], BOS, EOS, 8, beam_size=3)
        n = single.tokens.shape[1]
        assert torch.equal(batched.tokens[i, :n], single.tokens[0])
        assert (batched.tokens[i, n:] == PAD).all()
        assert torch.allclose(batched.score[i], single.score[0], atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_huge_beam_is_exhaustive_search(alpha):
    """Vocabulary {bos, eos, a, b}, 3 steps: a beam of 64 sees every hypothesis."""
    model, src = make_model(tgt_vocab=5, seed=3), sources(n=3, seed=3)
    steps, words = 3, [BOS, EOS, 3, 4]
    out = beam_search(model, src, BOS, EOS, steps, beam_size=64, length_penalty=alpha)
    hyps = [body for n in range(1, steps + 1)
            for body in itertools.product(words, repeat=n)
            # <eos> ends a hypothesis; a shorter one must end with it
            if EOS not in body[:-1] and (n == steps or body[-1] == EOS)]
    tgt = torch.tensor([[BOS, *h] + [PAD] * (steps - len(h)) for h in hyps])
    norm = torch.tensor([length_norm(len(h), alpha) for h in hyps])
    for b in range(src.shape[0]):
        lp = sequence_logprob(model, src[b:b + 1].expand(len(hyps), -1), tgt, EOS)
        best = (lp / norm).max().item()
        assert out.score[b].item() == pytest.approx(best, abs=1e-4)


def test_finished_hypotheses_are_padded_after_eos():
    model, src = make_model(), sources()
    out = beam_search(model, src, BOS, EOS, 8, beam_size=4)
    for row in out.tokens.tolist():
        if EOS in row:
            assert all(t == PAD for t in row[row.index(EOS) + 1:])
        else:
            assert PAD not in row and len(row) == 9  # ran out of steps
    # A model that always ends at once: every row is <bos> <eos>.
    with torch.no_grad():
        model.decoder.lm_head.bias.fill_(0.0)
        model.decoder.lm_head.bias[EOS] = 1e4
    out = beam_search(model, src, BOS, EOS, 8, beam_size=4)
    assert out.tokens.tolist() == [[BOS, EOS]] * src.shape[0]
    assert torch.allclose(out.logprob, torch.zeros(src.shape[0]), atol=1e-3)


def test_bad_input():
    model, src = make_model(), sources()
    with pytest.raises(ValueError, match="src"):
        beam_search(model, src[0], BOS, EOS, 8)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, src, BOS, EOS, 8, beam_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        beam_search(model, src, BOS, EOS, 0)
    with pytest.raises(ValueError, match="pad_id"):
        beam_search(model, src, PAD, EOS, 8)
    with pytest.raises(ValueError, match="eos_id"):
        beam_search(model, src, BOS, 99, 8)
