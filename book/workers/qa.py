"""Extractive question answering: a span head on an encoder, questions made from the
corpus, trivial baselines, and the SQuAD metrics.

An extractive reader (Devlin et al. 2019, on SQuAD, Rajpurkar et al. 2016) reads
``question <|sep|> context`` with an encoder and predicts, at every context position,
a logit for "the answer starts here" and one for "it ends here"; the answer is the
span with the highest sum of the two, start before end. The questions here are made
from the play text, so no labelled data is needed. A passage of whole speeches by at
least three characters gives questions like

    Who says "Dally not with the"?      ->  TRANIO

where the quote opens one of the speeches and the answer is the name above it. The
speaker is drawn uniformly from the passage's characters, so "the first (last, most
frequent) speaker" is right only about one time in three: the quote must be found.

    speaker_questions(text, n, context_chars, span, rename, generator) -> examples
    speaker_baselines(examples, generator) -> {heuristic: list of answers}
    encode(examples, tokenizer, block_size) -> dict of (B, T) tensors
    SpanReader(encoder, n_embd)(ids, attention_mask, context_mask) -> (start, end)
    span_loss(start_logits, end_logits, start, end) -> loss
    qa_loss(model, batch) -> loss                 # a loss_fn for llmcore.train
    predict_answers(model, batch, tokenizer, max_answer_len) -> list of answers
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
# A speech is a block "Name:\nwords...", blocks separated by a blank line.
TAG = re.compile(r"(?:^|\n\n)([A-Z][A-Za-z' ]*):\n(?=\S)")


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


def speakers(context: str) -> list[str]:
    """The names of the speeches of a passage, in order (with repeats)."""
    return [m.group(1) for m in TAG.finditer(context)]


def _windows(text: str, context_chars: int, min_speakers: int,
             span: tuple[float, float]) -> list[tuple[int, int]]:
    """(start, end) character ranges of runs of whole speeches, inside ``span`` (a
    fraction of the speeches), at most ``context_chars`` long, with at least
    ``min_speakers`` different names."""
    blocks, pos = [], 0
    for block in text.split("\n\n"):
        m = TAG.match("\n\n" + block)
        blocks.append((pos, pos + len(block), m.group(1)) if m else None)
        pos += len(block) + 2
    lo, hi = int(span[0] * len(blocks)), int(span[1] * len(blocks))
    out = []
    for i in range(lo, hi):
        names = set()
        for j in range(i, hi):
            if blocks[j] is None or blocks[j][1] - blocks[i][0] > context_chars:
                break
            names.add(blocks[j][2])
            if len(names) >= min_speakers:
                out.append((blocks[i][0], blocks[j][1]))
    return out


def speaker_questions(text: str, n: int, context_chars: int = 250,
                      min_speakers: int = 3, quote_words: int = 4,
                      span: tuple[float, float] = (0.0, 1.0), rename: bool = False,
                      generator: torch.Generator | None = None) -> list[QAExample]:
    """``n`` "who says" questions on passages of whole speeches of ``text`` (from the
    ``span`` fraction of its speeches, so that a held-out part can be kept apart).

    ``rename`` gives the speakers of each passage other names of the cast, drawn at
    random: a model can then not learn who says a line by heart, only by reading
    (the entity anonymisation of Hermann et al., "Teaching Machines to Read and
    Comprehend", 2015).
    """
    if n < 1 or context_chars < 40 or min_speakers < 2 or quote_words < 1:
        raise ValueError(f"need n >= 1, context_chars >= 40, min_speakers >= 2 and "
                         f"quote_words >= 1, got {n}, {context_chars}, {min_speakers}, "
                         f"{quote_words}")
    if not 0.0 <= span[0] < span[1] <= 1.0:
        raise ValueError(f"span must be (lo, hi) with 0 <= lo < hi <= 1, got {span}")
    windows = _windows(text, context_chars, min_speakers, span)
    if not windows:
        raise ValueError(f"no passage of at most {context_chars} characters has "
                         f"{min_speakers} speakers; raise context_chars or use the "
                         "play text")

    def pick(seq):
        return seq[int(torch.randint(len(seq), (1,), generator=generator))]

    cast = sorted(set(speakers(text)))
    examples, tries = [], 0
    while len(examples) < n:
        tries += 1
        if tries > 50 * n:
            raise ValueError(f"found only {len(examples)} questions for n={n}; "
                             f"lower quote_words ({quote_words})")
        a, b = pick(windows)
        context = text[a:b]
        tags = list(TAG.finditer(context))
        who = pick(sorted({m.group(1) for m in tags}))  # uniform over the speakers
        tag = pick([m for m in tags if m.group(1) == who])
        quote = " ".join(context[tag.end():].split()[:quote_words])
        if len(quote.split()) < quote_words or context.count(quote) != 1:
            continue  # too short a speech, or a quote that occurs twice
        start = tag.start(1)
        if rename:
            context, start, who = _rename(context, tags, tag, cast, generator)
        examples.append(QAExample(context, f'Who says "{quote}"?', who, start))
    return examples


def _rename(context: str, tags: list, answer: re.Match, cast: list[str],
            generator: torch.Generator | None) -> tuple[str, int, str]:
    """The passage with each speaker's name replaced by a distinct random one of the
    cast; the answer's new offset and name."""
    names = sorted({m.group(1) for m in tags})
    pick = torch.randperm(len(cast), generator=generator)[:len(names)].tolist()
    new = dict(zip(names, (cast[i] for i in pick)))
    out, at, start = [], 0, 0
    for m in tags:
        out.append(context[at:m.start(1)])
        if m is answer:
            start = sum(map(len, out))
        out.append(new[m.group(1)])
        at = m.end(1)
    out.append(context[at:])
    return "".join(out), start, new[answer.group(1)]


def speaker_baselines(examples: list[QAExample],
                      generator: torch.Generator | None = None) -> dict[str, list[str]]:
    """Answers of heuristics that do not read the question: the passage's first,
    last and most frequent speaker, the speaker of its longest speech, and a speaker
    drawn at random."""
    out = collections.defaultdict(list)
    for ex in examples:
        tags = list(TAG.finditer(ex.context))
        names = [m.group(1) for m in tags]
        ends = [m.start() for m in tags[1:]] + [len(ex.context)]
        out["first speaker"].append(names[0])
        out["last speaker"].append(names[-1])
        out["most frequent"].append(collections.Counter(names).most_common(1)[0][0])
        out["longest speech"].append(max(zip((e - m.end() for m, e in zip(tags, ends)),
                                             names))[1])
        distinct = sorted(set(names))
        i = int(torch.randint(len(distinct), (1,), generator=generator))
        out["random speaker"].append(distinct[i])
    return dict(out)


def encode(examples: list[QAExample], tokenizer, block_size: int) -> dict[str, Tensor]:
    """``question <|sep|> context`` ids, right-padded with the separator; masks for
    real tokens and for context tokens; the answer's first and last token index."""
    rows, starts, ends, context_at = [], [], [], []
    for ex in examples:
        head = tokenizer.encode(ex.question) + tokenizer.encode(SEP)
        # The context is encoded in three pieces, so that the answer is whole tokens
        # at a known place whatever the tokenizer (a subword one could merge across
        # the answer's edges otherwise).
        before = tokenizer.encode(ex.context[:ex.start])
        answer = tokenizer.encode(ex.answer)
        ids = (head + before + answer
               + tokenizer.encode(ex.context[ex.start + len(ex.answer):]))
        if len(ids) > block_size:
            raise ValueError(f"an example has {len(ids)} tokens, block_size is "
                             f"{block_size}; make context_chars smaller")
        rows.append(ids)
        context_at.append(len(head))
        starts.append(len(head) + len(before))
        ends.append(len(head) + len(before) + len(answer) - 1)
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


def qa_loss(model: SpanReader, batch: dict[str, Tensor]) -> Tensor:
    """A ``loss_fn`` for ``llmcore.train``: the span loss of a batch from
    :func:`encode`."""
    start, end = model(batch["input_ids"], batch["attention_mask"],
                       batch["context_mask"])
    return span_loss(start, end, batch["start"], batch["end"])


@torch.no_grad()
def predict_answers(model: SpanReader, batch: dict[str, Tensor], tokenizer,
                    max_answer_len: int = 30) -> list[str]:
    """The text of the best span of each row of a batch from :func:`encode`."""
    model.eval()
    start, end = model(batch["input_ids"], batch["attention_mask"],
                       batch["context_mask"])
    s, e = best_span(start, end, max_answer_len)
    ids = batch["input_ids"].tolist()
    return [tokenizer.decode(row[a:b + 1])
            for row, a, b in zip(ids, s.tolist(), e.tolist())]


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
