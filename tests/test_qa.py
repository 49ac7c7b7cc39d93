"""Extractive QA: the generated questions, the encoding, the span choice, the metrics,
and a reader that learns."""

import itertools

import pytest
import torch

from llmcore.apps.qa import (SEP, QAExample, SpanReader, best_span, encode,
                             exact_match, f1, normalize_answer, span_loss,
                             speaker_questions)
from llmcore.data import load_corpus
from llmcore.models.bert import BERT, BertConfig
from llmcore.tokenizer import CharTokenizer

TEXT = load_corpus("shakespeare")


def test_questions_name_the_speaker_of_the_quoted_line():
    examples = speaker_questions(TEXT, 50, generator=torch.Generator().manual_seed(0))
    assert len(examples) == 50
    for ex in examples:
        assert ex.context[ex.start:ex.start + len(ex.answer)] == ex.answer
        assert ex.context[ex.start + len(ex.answer)] == ":"
        quote = ex.question[len("Who says: "):-1]
        line = ex.context[ex.start + len(ex.answer) + 2:].split("\n")[0]
        assert line.lower().startswith(quote), (quote, line)
    assert len({ex.answer for ex in examples}) > 5


def test_an_answer_outside_its_context_is_refused():
    with pytest.raises(ValueError, match="not at offset"):
        QAExample("ROMEO:\nhi", "Who says: hi?", "JULIET", 0)
    with pytest.raises(ValueError, match="fewer than three"):
        speaker_questions("no speakers here", 3)


def test_encode_marks_the_answer_tokens():
    tok = CharTokenizer.train(TEXT, special_tokens=[SEP])
    examples = speaker_questions(TEXT, 8, generator=torch.Generator().manual_seed(1))
    batch = encode(examples, tok, 256)
    for b, ex in enumerate(examples):
        s, e = batch["start"][b].item(), batch["end"][b].item()
        assert tok.decode(batch["input_ids"][b, s:e + 1].tolist()) == ex.answer
        assert batch["context_mask"][b, s:e + 1].all()
        assert not batch["context_mask"][b, :len(ex.question)].any()
    with pytest.raises(ValueError, match="block_size"):
        encode(examples, tok, 50)


def test_best_span_is_the_brute_force_maximum():
    g = torch.Generator().manual_seed(0)
    start, end = torch.randn(4, 12, generator=g), torch.randn(4, 12, generator=g)
    s, e = best_span(start, end, max_answer_len=3)
    for b in range(4):
        best = max(((i, j) for i, j in itertools.product(range(12), repeat=2)
                    if i <= j < i + 3), key=lambda p: start[b, p[0]] + end[b, p[1]])
        assert (s[b].item(), e[b].item()) == best


def test_squad_metrics():
    assert normalize_answer("The  Duke, of York!") == "duke of york"
    assert exact_match("the Duke of York", "Duke of York.") == 1.0
    assert exact_match("York", "Duke of York") == 0.0
    assert f1("York", "Duke of York") == pytest.approx(2 * 1 * (1 / 3) / (1 + 1 / 3))
    assert f1("Romeo", "Juliet") == 0.0 and f1("", "") == 1.0


def test_reader_masks_the_question_and_learns_a_small_set():
    torch.manual_seed(0)
    tok = CharTokenizer.train(TEXT, special_tokens=[SEP])
    examples = speaker_questions(TEXT, 16, context_chars=80,
                                 generator=torch.Generator().manual_seed(2))
    batch = encode(examples, tok, 128)
    cfg = BertConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2,
                     n_embd=32)
    reader = SpanReader(BERT(cfg), cfg.n_embd)
    start, end = reader(batch["input_ids"], batch["attention_mask"],
                        batch["context_mask"])
    assert torch.isinf(start[~batch["context_mask"]]).all()
    assert torch.isfinite(start[batch["context_mask"]]).all()
    opt = torch.optim.AdamW(reader.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        start, end = reader(batch["input_ids"], batch["attention_mask"],
                            batch["context_mask"])
        loss = span_loss(start, end, batch["start"], batch["end"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::10]
