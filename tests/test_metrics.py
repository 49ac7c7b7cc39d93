"""Metrics: BLEU on hand-computed examples and its known properties; diversity,
repetition, accuracy intervals and the confusion matrix."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from book.workers.metrics import (accuracy_ci, confusion_matrix, corpus_bleu,
                                  distinct_n, mcnemar_test, ngrams,
                                  paired_difference_ci, repetition_rate,
                                  wilson_interval)

# The example of Papineni et al. (2002), section 2.1.
H1 = ("It is a guide to action which ensures that the military always obeys the "
      "commands of the party").split()
R1 = ("It is a guide to action that ensures that the military will forever heed "
      "Party commands").split()
R2 = ("It is the guiding principle which guarantees the military forces always "
      "being under the command of the Party").split()
R3 = ("It is the practical guide for the army always to heed the directions of the "
      "party").split()
H2 = "he read the book because he was interested in world history".split()
R2A = "he was interested in world history because he read the book".split()


def test_papineni_example_by_hand():
    b = corpus_bleu([H1], [[R1, R2, R3]])
    # Counted by hand: 17 of 18 unigrams appear in a reference ("obeys" does not);
    # bigrams 10/17, trigrams 7/16, 4-grams 4/15. Lengths 18 vs 16, 18, 16: BP = 1.
    expected = [Fraction(17, 18), Fraction(10, 17), Fraction(7, 16), Fraction(4, 15)]
    assert b.precisions == pytest.approx([float(f) for f in expected])
    assert b.brevity_penalty == 1.0 and (b.hyp_len, b.ref_len) == (18, 18)
    geo = math.prod(float(f) for f in expected) ** 0.25
    assert b.score == pytest.approx(geo) == pytest.approx(0.5045666840058485)


def test_corpus_bleu_sums_counts_before_dividing():
    b = corpus_bleu([H1, H2], [[R1, R2, R3], [R2A]])
    # H2 is R2A reordered: all 11 unigrams match, bigrams 9/10, trigrams 6/9, 4-grams
    # 4/8; pooled with H1's counts.
    expected = [Fraction(28, 29), Fraction(19, 27), Fraction(13, 25), Fraction(8, 23)]
    assert b.precisions == pytest.approx([float(f) for f in expected])
    assert b.score == pytest.approx(0.5920778868801042)
    mean_of_sentences = (corpus_bleu([H1], [[R1, R2, R3]]).score
                         + corpus_bleu([H2], [[R2A]]).score) / 2
    assert b.score != pytest.approx(mean_of_sentences)


def test_clipping_the_the_the():
    # Papineni's example: 7 x "the" gets unigram precision 2/7, not 7/7.
    b = corpus_bleu(["the the the the the the the"],
                    [["the cat is on the mat", "there is a cat on the mat"]], max_n=1)
    assert b.precisions[0] == pytest.approx(2 / 7)


def test_brevity_penalty_and_closest_reference_length():
    ref = "a b c d e f g h".split()
    b = corpus_bleu([ref[:4]], [[ref]])  # a correct but short hypothesis
    assert b.precisions == (1.0, 1.0, 1.0, 1.0)
    assert b.brevity_penalty == pytest.approx(math.exp(1 - 8 / 4)) == b.score
    # closest reference length; ties go to the shorter one
    assert corpus_bleu(["a b c"], [["a b", "a b c d"]], max_n=1).ref_len == 2
    assert corpus_bleu(["a b c"], [["a b c d e", "a b c d"]], max_n=1).ref_len == 4
    # a longer hypothesis is not penalised by BP (its precision already is)
    assert corpus_bleu(["a b c d x"], [["a b c d"]], max_n=1).brevity_penalty == 1.0


words = st.lists(st.sampled_from("abcdefgh"), min_size=4, max_size=12)


@settings(max_examples=60, deadline=None)
@given(words, words)
def test_bleu_properties(hyp, ref):
    assert corpus_bleu([ref], [[ref]]).score == pytest.approx(1.0)
    b = corpus_bleu([hyp], [[ref]])
    assert 0.0 <= b.score <= 1.0
    assert all(0.0 <= p <= 1.0 for p in b.precisions)
    # adding the hypothesis itself as a reference can only help
    assert corpus_bleu([hyp], [[ref, hyp]]).score == pytest.approx(1.0)


def test_bleu_zero_and_bad_input():
    assert corpus_bleu(["x y z w"], [["a b c d"]]).score == 0.0
    with pytest.raises(ValueError, match="one list of references"):
        corpus_bleu(["a"], [])
    with pytest.raises(ValueError, match="non-empty list"):
        corpus_bleu(["a b"], ["a b"])


def test_distinct_and_repetition():
    assert ngrams("a b a b", 2) == {("a", "b"): 2, ("b", "a"): 1}
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b", "a c"], 1) == pytest.approx(3 / 4)
    assert distinct_n(["a b c d"], 2) == 1.0
    assert repetition_rate(["a b a b a b"], n=2) == pytest.approx(1 - 2 / 5)
    assert repetition_rate(["a b c d e"], n=2) == 0.0
    assert repetition_rate(["x x x x", "a b c"], n=1) == pytest.approx((0.75 + 0) / 2)
    assert distinct_n([], 2) == 0.0 and repetition_rate(["a"], n=2) == 0.0


def test_wilson_interval_known_values():
    # Wilson's interval for 8/10 at 95%: [0.4902, 0.9433] (e.g. Newcombe 1998, table)
    iv = wilson_interval(8, 10)
    assert iv.value == 0.8
    assert iv.low == pytest.approx(0.4902, abs=1e-4)
    assert iv.high == pytest.approx(0.9433, abs=1e-4)
    zero = wilson_interval(0, 20)
    assert zero.low == 0.0 and 0.0 < zero.high < 0.2
    assert wilson_interval(20, 20).high == 1.0
    # narrower with more data and lower confidence
    assert (wilson_interval(800, 1000).high - wilson_interval(800, 1000).low
            < iv.high - iv.low)
    assert wilson_interval(8, 10, 0.8).high < iv.high
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_accuracy_ci_wilson_and_bootstrap_agree():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(2, (2000,), generator=g)
    preds = torch.where(torch.rand(2000, generator=g) < 0.8, labels, 1 - labels)
    w = accuracy_ci(preds, labels)
    b = accuracy_ci(preds, labels, method="bootstrap", generator=g)
    assert w.value == b.value == (preds == labels).sum().item() / 2000
    assert w.low < w.value < w.high and b.low < b.value < b.high
    assert abs(w.low - b.low) < 0.01 and abs(w.high - b.high) < 0.01
    with pytest.raises(ValueError, match="method"):
        accuracy_ci(preds, labels, method="exact")


def test_confusion_matrix():
    preds = torch.tensor([0, 1, 1, 2, 2, 2, 0])
    labels = torch.tensor([0, 1, 2, 2, 2, 0, 0])
    cm = confusion_matrix(preds, labels, 3)
    assert cm.tolist() == [[2, 0, 1], [0, 1, 0], [0, 1, 2]]
    assert cm.sum() == 7 and cm.trace() == (preds == labels).sum()
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix([3], [0], 3)


def _pairs(b, c, both_right=0, both_wrong=0):
    """Predictions of A and B on binary labels with the given cell counts."""
    labels = torch.zeros(b + c + both_right + both_wrong, dtype=torch.long)
    right = [(1, 0)] * b + [(0, 1)] * c + [(1, 1)] * both_right + [(0, 0)] * both_wrong
    a = torch.tensor([0 if ra else 1 for ra, _ in right])
    bb = torch.tensor([0 if rb else 1 for _, rb in right])
    return a, bb, labels


def test_mcnemar_exact_values_by_hand():
    a, b, y = _pairs(10, 0, both_right=50, both_wrong=7)
    t = mcnemar_test(a, b, y)
    assert (t.only_a, t.only_b) == (10, 0)
    assert t.p_value == pytest.approx(2 / 2 ** 10)        # both tails of 10 heads
    assert mcnemar_test(a, b, y, "greater").p_value == pytest.approx(1 / 2 ** 10)
    assert mcnemar_test(b, a, y, "greater").p_value == 1.0
    # 7 against 2 of 9 discordant: P(X >= 7) = (36 + 9 + 1) / 512, doubled
    t = mcnemar_test(*_pairs(7, 2, both_right=30))
    assert t.p_value == pytest.approx(float(Fraction(2 * 46, 512)))
    assert mcnemar_test(*_pairs(2, 7)).p_value == t.p_value    # symmetric
    assert mcnemar_test(*_pairs(7, 2), "greater").p_value == pytest.approx(46 / 512)
    # the concordant examples do not change the test
    assert mcnemar_test(*_pairs(7, 2, 500, 500)).p_value == t.p_value
    assert mcnemar_test(*_pairs(5, 5)).p_value == 1.0
    assert mcnemar_test(*_pairs(0, 0, both_right=3)).p_value == 1.0


def test_mcnemar_matches_a_binomial_sum_for_large_counts():
    b, c = 180, 120
    t = mcnemar_test(*_pairs(b, c, both_right=600))
    tail = sum(Fraction(math.comb(300, i), 2 ** 300) for i in range(180, 301))
    assert t.p_value == pytest.approx(float(2 * tail), rel=1e-12)
    assert 1e-4 < t.p_value < 1e-3        # a normal approximation: z = 60/sqrt(300)


def test_mcnemar_rejects_at_its_level_under_the_null():
    """Two models that are equally accurate (and independent): p < 0.05 in at most
    about 5% of test sets; a model 15 points better: nearly always."""
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(400, dtype=torch.long)

    def model(acc):
        return (torch.rand(200, 400, generator=g) > acc).long()  # 200 test sets

    a, b, better = model(0.7), model(0.7), model(0.85)
    null = sum(mcnemar_test(a[i], b[i], y).p_value < 0.05 for i in range(200))
    power = sum(mcnemar_test(better[i], b[i], y).p_value < 0.05 for i in range(200))
    assert null <= 20 and power >= 190, (null, power)


def test_paired_difference_ci():
    """The paired bootstrap on two classifiers' per-example correctness."""
    g = torch.Generator().manual_seed(1)

    def right(a, b, y):
        return (a == y).float(), (b == y).float()

    a, b, y = _pairs(180, 120, both_right=600, both_wrong=100)
    iv = paired_difference_ci(*right(a, b, y), generator=g)
    assert iv.value == pytest.approx(60 / 1000)
    # the paired standard error: sqrt((b + c) / n - d^2) / sqrt(n)
    se = math.sqrt((300 / 1000 - 0.06 ** 2) / 1000)
    assert iv.low == pytest.approx(0.06 - 1.96 * se, abs=0.006)
    assert iv.high == pytest.approx(0.06 + 1.96 * se, abs=0.006)
    # 0.75 against 0.71: the two intervals overlap, the paired one excludes 0, and
    # McNemar agrees
    a, b, y = _pairs(150, 110, both_right=600, both_wrong=140)
    assert accuracy_ci(a, y).low < accuracy_ci(b, y).high
    assert paired_difference_ci(*right(a, b, y), generator=g).low > 0
    assert mcnemar_test(a, b, y).p_value < 0.05
    with pytest.raises(ValueError, match="same non-zero length"):
        mcnemar_test(a[:-1], b, y)
    with pytest.raises(ValueError, match="alternative"):
        mcnemar_test(a, b, y, alternative="less")
