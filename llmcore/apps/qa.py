"""Extractive question answering: a span head on an encoder, questions made from the
corpus, and the SQuAD metrics.

An extractive reader (Devlin et al. 2019, on SQuAD, Rajpurkar et al. 2016) reads
``question <|sep|> context`` with an encoder and predicts, at every context position,
a logit for "the answer starts here" and one for "it ends here"; the answer is the
span with the highest sum of the two, start before end. The questions here are made
from the play text, so no labelled data is needed: a passage of turns

    ROMEO:
    But soft, what light through yonder window breaks?

gives "Who says: but soft, what light?" with the answer "ROMEO", the speaker
named in the passage above that line. Character tokens keep positions simple: token
``i`` of the context is its character ``i``.

    speaker_questions(text, n, context_chars, generator) -> list[QAExample]
    encode(examples, tokenizer, block_size) -> dict of (B, T) tensors
    SpanReader(encoder, n_embd)(ids, attention_mask, context_mask) -> (start, end)
    span_loss(start_logits, end_logits, start, end) -> loss
    best_span(start_logits, end_logits, max_answer_len) -> (B,), (B,)
    exact_match(prediction, gold), f1(prediction, gold)   # SQuAD's normalisation
"""

from __future__ import annotations

import collections
import re
import string
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SEP = "<|sep|>"
SPEAKER = re.compile(r"^([A-Z][A-Z ]+):$", re.MULTILINE)


@dataclass(frozen=True)
class QAExample:
    context: str
    question: str
    answer: str
    start: int  # character offset of the answer in the context

    def __post_init__(self):
        if self.context[self.start:self.start + len(self.answer)] != self.answer:
            raise ValueError(f"the answer {self.answer!r} is not at offset "
                             f"{self.start} of the context")


def speaker_questions(text: str, n: int, context_chars: int = 200,
                      quote_words: int = 4, generator: torch.Generator | None = None
                      ) -> list[QAExample]:
    """``n`` "who says" questions on passages of ``text`` of at most
    ``context_chars`` characters, each holding at least two speakers' turns."""
    if n < 1 or context_chars < 40:
        raise ValueError(f"need n >= 1 and context_chars >= 40, got {n}, {context_chars}")
    turns = [m for m in SPEAKER.finditer(text)]
    if len(turns) < 3:
        raise ValueError("text has fewer than three 'NAME:' turns; use the play text")
    examples, tries = [], 0
    while len(examples) < n:
        tries += 1
        if tries > 50 * n:
            raise ValueError(f"found only {len(examples)} questions for n={n}; "
                             f"raise context_chars ({context_chars})")
        i = int(torch.randint(len(turns) - 2, (1,), generator=generator))
        start = turns[i].start()
        context = text[start:start + context_chars]
        inside = [m for m in SPEAKER.finditer(context)]
        names = {m.group(1) for m in inside}
        if len(names) < 2:
            continue
        m = inside[int(torch.randint(len(inside), (1,), generator=generator))]
        line_end = context.find("\n", m.end() + 1)
        line = context[m.end() + 1: line_end if line_end > 0 else None]
        words = line.split()
        if len(words) < quote_words or line_end < 0:
            continue
        quote = " ".join(words[:quote_words]).lower()
        examples.append(QAExample(context, f"Who says: {quote}?", m.group(1),
                                  m.start(1)))
    return examples


def encode(examples: list[QAExample], tokenizer, block_size: int) -> dict[str, Tensor]:
    """``question <|sep|> context`` ids, right-padded with the separator; masks for
    real tokens and for context tokens; the answer's first and last token index."""
    rows, starts, ends, context_at = [], [], [], []
    for ex in examples:
        head = tokenizer.encode(ex.question) + tokenizer.encode(SEP)
        ids = head + tokenizer.encode(ex.context)
        if len(ids) > block_size:
            raise ValueError(f"an example has {len(ids)} tokens, block_size is "
                             f"{block_size}; make context_chars smaller")
        rows.append(ids)
        context_at.append(len(head))
        starts.append(len(head) + ex.start)      # character tokens: offset = position
        ends.append(len(head) + ex.start + len(ex.answer) - 1)
    T = max(map(len, rows))
    pad = tokenizer.encode(SEP)[0]
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    attention = torch.zeros(len(rows), T, dtype=torch.bool)
    context = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
        attention[b, :len(row)] = True
        context[b, context_at[b]:len(row)] = True
    return {"input_ids": ids, "attention_mask": attention, "context_mask": context,
            "start": torch.tensor(starts), "end": torch.tensor(ends)}


class SpanReader(nn.Module):
    """Start and end logits (B, T) over the context positions of an encoder's output;
    every other position gets -inf, so it can never be chosen."""

    def __init__(self, encoder: nn.Module, n_embd: int):
        super().__init__()
        self.encoder = encoder
        self.span = nn.Linear(n_embd, 2)

    def forward(self, input_ids: Tensor, attention_mask: Tensor,
                context_mask: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder.hidden(input_ids, attention_mask)  # (B, T, C)
        logits = self.span(h).masked_fill(~context_mask.unsqueeze(-1), float("-inf"))
        return logits[..., 0], logits[..., 1]  # (B, T) each


def span_loss(start_logits: Tensor, end_logits: Tensor, start: Tensor,
              end: Tensor) -> Tensor:
    return (F.cross_entropy(start_logits, start) + F.cross_entropy(end_logits, end)) / 2


@torch.no_grad()
def best_span(start_logits: Tensor, end_logits: Tensor,
              max_answer_len: int = 30) -> tuple[Tensor, Tensor]:
    """Per row, (start, end) maximising start_logit + end_logit with
    start <= end < start + max_answer_len."""
    if max_answer_len < 1:
        raise ValueError(f"max_answer_len must be >= 1, got {max_answer_len}")
    T = start_logits.shape[-1]
    scores = start_logits.unsqueeze(-1) + end_logits.unsqueeze(-2)  # (B, T, T)
    i, j = torch.arange(T).unsqueeze(1), torch.arange(T).unsqueeze(0)
    allowed = ((j >= i) & (j < i + max_answer_len)).to(scores.device)
    flat = scores.masked_fill(~allowed, float("-inf")).flatten(1).argmax(-1)
    return flat // T, flat % T


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall after normalisation."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)
