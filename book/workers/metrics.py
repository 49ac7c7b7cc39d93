"""Evaluation metrics: BLEU, diversity and repetition, accuracy with an interval.

- :func:`corpus_bleu`: Papineni et al., "BLEU: a Method for Automatic Evaluation of
  Machine Translation" (2002). Clipped n-gram precisions summed over the corpus
  (n = 1..4), their geometric mean, times a brevity penalty.
- :func:`distinct_n`: Li et al., "A Diversity-Promoting Objective Function for Neural
  Conversation Models" (2016): distinct n-grams / all n-grams.
- :func:`repetition_rate`: rep-n of Welleck et al., "Neural Text Generation with
  Unlikelihood Training" (2019): the share of a text's n-grams that repeat an earlier
  one, averaged over texts.
- :func:`accuracy_ci`: accuracy with a Wilson score interval (Wilson 1927) or a
  percentile bootstrap (Efron 1979).
- :func:`paired_difference_ci`: the mean difference of two systems scored on the same
  examples, with a paired bootstrap interval (Efron and Tibshirani 1993).
- :func:`mcnemar_test`: McNemar's exact test (McNemar 1947) of two classifiers scored
  on the same examples, from the examples on which they disagree.
- :func:`confusion_matrix`: counts, rows = true class, columns = predicted class
  (the layout of scikit-learn's ``confusion_matrix``).

Tokens are any hashable items; a string is split on whitespace.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from statistics import NormalDist
from typing import Hashable, Sequence

import torch

Tokens = Sequence[Hashable] | str


def _tokens(seq: Tokens) -> list:
    return seq.split() if isinstance(seq, str) else list(seq)


def ngrams(tokens: Tokens, n: int) -> Counter:
    """Counts of the n-grams (as tuples) of one token sequence."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    t = _tokens(tokens)
    return Counter(tuple(t[i:i + n]) for i in range(len(t) - n + 1))


@dataclass(frozen=True)
class BleuScore:
    """A corpus BLEU score (in [0, 1]) and its parts."""

    score: float  # bp * exp(mean of log precisions)
    precisions: tuple[float, ...]  # clipped n-gram precision for n = 1..max_n
    brevity_penalty: float  # 1 if the hypotheses are longer than the references
    hyp_len: int  # c: total hypothesis length
    ref_len: int  # r: total effective reference length


def corpus_bleu(hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]],
                max_n: int = 4) -> BleuScore:
    """BLEU of ``hypotheses`` against ``references`` (one list of references each).

    Counts are summed over the corpus before dividing (corpus BLEU, not the mean of
    sentence scores). Each hypothesis n-gram counts at most as often as it appears in
    any single reference (clipping). The effective reference length of a sentence is
    the reference length closest to the hypothesis's (the shorter on a tie); with
    c <= r the brevity penalty is exp(1 - r / c). No smoothing: a zero precision gives
    a score of 0.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} hypotheses but {len(references)} "
                         "reference lists: give one list of references per hypothesis")
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        if isinstance(refs, str) or not refs:
            raise ValueError("each entry of references must be a non-empty list of "
                             "reference token sequences, e.g. [['the', 'cat']]")
        hyp = _tokens(hyp)
        refs = [_tokens(r) for r in refs]
        hyp_len += len(hyp)
        ref_len += min((len(r) for r in refs), key=lambda n: (abs(n - len(hyp)), n))
        for n in range(1, max_n + 1):
            counts = ngrams(hyp, n)
            max_ref = Counter()
            for r in refs:
                max_ref |= ngrams(r, n)  # element-wise max over the references
            matches[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    precisions = tuple(m / t if t else 0.0 for m, t in zip(matches, totals))
    if hyp_len == 0:
        bp = 0.0
    else:
        bp = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    if min(precisions) == 0.0:
        score = 0.0
    else:
        score = bp * math.exp(sum(math.log(p) for p in precisions) / max_n)
    return BleuScore(score, precisions, bp, hyp_len, ref_len)


def distinct_n(texts: Sequence[Tokens], n: int) -> float:
    """Distinct n-grams / all n-grams, pooled over ``texts`` (0 if there are none)."""
    pooled = Counter()
    for t in texts:
        pooled.update(ngrams(t, n))
    total = sum(pooled.values())
    return len(pooled) / total if total else 0.0


def repetition_rate(texts: Sequence[Tokens], n: int = 4) -> float:
    """Mean over texts of 1 - unique n-grams / n-grams (texts too short: skipped)."""
    rates = []
    for t in texts:
        counts = ngrams(t, n)
        total = sum(counts.values())
        if total:
            rates.append(1.0 - len(counts) / total)
    return sum(rates) / len(rates) if rates else 0.0


@dataclass(frozen=True)
class Interval:
    """An estimate with a confidence interval."""

    value: float
    low: float
    high: float
    confidence: float

    def __str__(self) -> str:
        return (f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] "
                f"({self.confidence:.0%})")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """The Wilson score interval of a binomial proportion: inside [0, 1] even at 0 or n
    successes, where the normal approximation p +- z sqrt(p(1-p)/n) is not."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need n > 0 and 0 <= successes <= n, got {successes}, {n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n successes the interval touches 0 or 1 exactly; rounding may miss it.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(p, low, high, confidence)


def accuracy_ci(preds, labels, confidence: float = 0.95, method: str = "wilson",
                n_boot: int = 2000, generator: torch.Generator | None = None
                ) -> Interval:
    """Accuracy of ``preds`` against ``labels`` with a ``wilson`` or ``bootstrap``
    confidence interval (the bootstrap resamples the examples ``n_boot`` times)."""
    preds, labels = torch.as_tensor(preds), torch.as_tensor(labels)
    if preds.shape != labels.shape or preds.dim() != 1 or preds.numel() == 0:
        raise ValueError(f"preds and labels must be 1-D of the same non-zero length, "
                         f"got {tuple(preds.shape)} and {tuple(labels.shape)}")
    correct = (preds == labels).float()
    if method == "wilson":
        return wilson_interval(int(correct.sum()), correct.numel(), confidence)
    if method != "bootstrap":
        raise ValueError(f"method must be 'wilson' or 'bootstrap', got {method!r}")
    n = correct.numel()
    idx = torch.randint(n, (n_boot, n), generator=generator)
    means = correct[idx].mean(dim=1)  # (n_boot,)
    alpha = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1 - alpha])).tolist()
    return Interval(int(correct.sum()) / n, low, high, confidence)


def confusion_matrix(preds, labels, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts; entry [i, j]: true i predicted j."""
    preds = torch.as_tensor(preds).long().flatten()
    labels = torch.as_tensor(labels).long().flatten()
    if preds.shape != labels.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and labels {tuple(labels.shape)} "
                         "must have the same length")
    for name, t in (("preds", preds), ("labels", labels)):
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, num_classes={num_classes})")
    flat = labels * num_classes + preds
    return torch.bincount(flat, minlength=num_classes ** 2).view(num_classes,
                                                                 num_classes)


@dataclass(frozen=True)
class PairedTest:
    """McNemar's exact test of two classifiers scored on the same examples."""

    only_a: int  # examples that only model A gets right
    only_b: int  # examples that only model B gets right
    p_value: float  # exact binomial p-value of "A and B are equally accurate"
    alternative: str  # "two-sided", or "greater": A is more accurate than B

    def __str__(self) -> str:
        return (f"only A right {self.only_a}, only B right {self.only_b}, "
                f"McNemar exact p = {self.p_value:.2g} ({self.alternative})")


def _paired_correct(preds_a, preds_b, labels) -> tuple[torch.Tensor, torch.Tensor]:
    preds_a, preds_b = torch.as_tensor(preds_a), torch.as_tensor(preds_b)
    labels = torch.as_tensor(labels)
    if not (preds_a.shape == preds_b.shape == labels.shape) or labels.dim() != 1 \
            or labels.numel() == 0:
        raise ValueError("preds_a, preds_b and labels must be 1-D of the same non-zero "
                         f"length (one entry per test example), got "
                         f"{tuple(preds_a.shape)}, {tuple(preds_b.shape)} and "
                         f"{tuple(labels.shape)}")
    return preds_a == labels, preds_b == labels


def mcnemar_test(preds_a, preds_b, labels, alternative: str = "two-sided"
                 ) -> PairedTest:
    """McNemar's exact test (McNemar 1947) on the discordant examples.

    Examples both models get right, or both wrong, say nothing about which is better.
    Under "equally accurate" each of the n discordant examples is a fair coin, so
    ``only_a`` follows Binomial(n, 1/2); the p-value sums its tail exactly.
    """
    if alternative not in ("two-sided", "greater"):
        raise ValueError(f"alternative must be 'two-sided' or 'greater', got "
                         f"{alternative!r}")
    right_a, right_b = _paired_correct(preds_a, preds_b, labels)
    b, c = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    n = b + c

    def upper_tail(k: int) -> float:  # P(X >= k), X ~ Binomial(n, 1/2), in integers
        return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n

    if alternative == "greater":
        p = upper_tail(b)
    else:  # the binomial is symmetric: double the smaller tail
        p = min(1.0, 2 * upper_tail(max(b, c)))
    return PairedTest(b, c, p, alternative)


def paired_difference_ci(scores_a, scores_b, confidence: float = 0.95,
                         n_boot: int = 2000, generator: torch.Generator | None = None
                         ) -> Interval:
    """Mean of ``scores_a - scores_b`` over the same examples with a paired percentile
    bootstrap interval: each resample draws examples, keeping both systems' scores of
    an example together, so what the systems share (easy and hard examples) cancels.
    An interval above 0 says system a is better on this population of examples."""
    a = torch.as_tensor(scores_a, dtype=torch.float64)
    b = torch.as_tensor(scores_b, dtype=torch.float64)
    if a.shape != b.shape or a.dim() != 1 or a.numel() == 0:
        raise ValueError(f"scores_a and scores_b must be 1-D of the same non-zero "
                         f"length (one score per example), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diff = a - b
    idx = torch.randint(diff.numel(), (n_boot, diff.numel()), generator=generator)
    means = diff[idx].mean(dim=1)  # (n_boot,)
    alpha = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1 - alpha],
                                                   dtype=torch.float64)).tolist()
    return Interval(diff.mean().item(), low, high, confidence)
