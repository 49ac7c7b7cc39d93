"""Extractive QA: the generated questions, the encoding, the span choice, the metrics,
and a reader that learns."""

import itertools

import pytest
import torch

from book.workers.metrics import paired_difference_ci
from book.workers.qa import (SEP, QAExample, SpanReader, best_span, encode, exact_match,
                             f1, normalize_answer, predict_answers, qa_loss, span_loss,
                             speaker_baselines, speaker_questions, speakers)
from llmcore.data import load_corpus
from llmcore.models.bert import BERT, BertConfig
from llmcore.tokenizer import BPETokenizer, CharTokenizer

TEXT = load_corpus("shakespeare")


def test_questions_name_the_speaker_whose_speech_opens_with_the_quote():
    examples = speaker_questions(TEXT, 60, generator=torch.Generator().manual_seed(0))
    assert len(examples) == 60
    for ex in examples:
        assert ex.context[ex.start:ex.start + len(ex.answer)] == ex.answer
        assert ex.context[ex.start + len(ex.answer):].startswith(":\n")
        assert ex.start == 0 or ex.context[ex.start - 2:ex.start] == "\n\n"
        quote = ex.question[len('Who says "'):-2]
        assert len(quote.split()) == 4 and ex.context.count(quote) == 1
        speech = ex.context[ex.start + len(ex.answer) + 2:]
        assert " ".join(speech.split()).startswith(quote), (quote, speech)
        assert len(set(speakers(ex.context))) >= 3 and len(ex.context) <= 250
    assert len({ex.answer for ex in examples}) > 10


def test_renamed_passages_keep_the_words_and_change_the_names():
    renamed = speaker_questions(TEXT, 40, rename=True,
                                generator=torch.Generator().manual_seed(3))
    cast = set(speakers(TEXT))
    moved = 0
    for ex in renamed:
        assert ex.context[ex.start:ex.start + len(ex.answer)] == ex.answer
        quote = ex.question[len('Who says "'):-2]
        speech = ex.context[ex.start + len(ex.answer) + 2:]
        assert " ".join(speech.split()).startswith(quote)
        names = speakers(ex.context)
        assert len(set(names)) >= 3 and set(names) <= cast
        blocks = ex.context.split("\n\n")
        assert len(blocks) == len(names)  # every speech kept its (new) name tag
        for block in blocks:  # the words of every speech are the play's
            assert "\n" + block.split(":\n", 1)[1] in TEXT
        moved += f"\n{ex.answer}:\n{speech.split(chr(10))[0]}" not in TEXT
    assert moved > 30  # most quotes now belong to a speaker who never said them


def test_held_out_passages_come_from_another_part_of_the_text():
    g = torch.Generator().manual_seed(1)
    train = speaker_questions(TEXT, 200, span=(0.0, 0.9), generator=g)
    test = speaker_questions(TEXT, 200, span=(0.9, 1.0), generator=g)
    cut = TEXT.index(test[0].context)
    assert all(TEXT.index(ex.context) < cut for ex in train[:50])
    assert not {ex.context for ex in train} & {ex.context for ex in test}
    with pytest.raises(ValueError, match="span"):
        speaker_questions(TEXT, 3, span=(0.5, 0.5))


def test_no_heuristic_that_skips_the_question_answers_it():
    examples = speaker_questions(TEXT, 600, generator=torch.Generator().manual_seed(2))
    baselines = speaker_baselines(examples, torch.Generator().manual_seed(0))
    assert set(baselines) == {"first speaker", "last speaker", "most frequent",
                              "longest speech", "random speaker"}
    for name, answers in baselines.items():
        em = sum(map(exact_match, answers, [ex.answer for ex in examples])) / 600
        assert 0.15 < em < 0.45, (name, em)  # three or more speakers, drawn uniformly


def test_baselines_on_a_passage_by_hand():
    context = "Ann:\nHi.\n\nBob:\nA long speech, this one.\n\nCy:\nNo.\n\nAnn:\nYes."
    ex = QAExample(context, 'Who says "No."?', "Cy", context.index("Cy"))
    assert speakers(context) == ["Ann", "Bob", "Cy", "Ann"]
    got = {k: v[0] for k, v in speaker_baselines([ex]).items()}
    assert got["first speaker"] == "Ann" and got["last speaker"] == "Ann"
    assert got["most frequent"] == "Ann" and got["longest speech"] == "Bob"
    assert got["random speaker"] in {"Ann", "Bob", "Cy"}


def test_an_answer_outside_its_context_is_refused():
    with pytest.raises(ValueError, match="not at offset"):
        QAExample("ROMEO:\nhi", "Who says: hi?", "JULIET", 0)
    with pytest.raises(ValueError, match="no passage"):
        speaker_questions("no speakers here", 3)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_encode_marks_the_answer_tokens(kind):
    if kind == "char":  # the play has no double quote: the questions add one
        tok = CharTokenizer.train(TEXT + '"', special_tokens=[SEP])
    else:
        tok = BPETokenizer.train(TEXT[:100_000], 400, special_tokens=[SEP])
    examples = speaker_questions(TEXT, 8, generator=torch.Generator().manual_seed(1))
    batch = encode(examples, tok, 300)
    for b, ex in enumerate(examples):
        s, e = batch["start"][b].item(), batch["end"][b].item()
        n = batch["attention_mask"][b].sum().item()
        assert tok.decode(batch["input_ids"][b, s:e + 1].tolist()) == ex.answer
        assert tok.decode(batch["input_ids"][b, :n].tolist()) == (ex.question + SEP
                                                                   + ex.context)
        assert batch["context_mask"][b, s:e + 1].all()
        assert not batch["context_mask"][b, :len(tok.encode(ex.question)) + 1].any()
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
    tok = CharTokenizer.train(TEXT + '"', special_tokens=[SEP])
    examples = speaker_questions(TEXT, 16, context_chars=100, min_speakers=2,
                                 quote_words=2,
                                 generator=torch.Generator().manual_seed(2))
    batch = encode(examples, tok, 160)
    cfg = BertConfig(vocab_size=tok.vocab_size, block_size=160, n_layer=2, n_head=2,
                     n_embd=32)
    reader = SpanReader(BERT(cfg), cfg.n_embd)
    start, end = reader(batch["input_ids"], batch["attention_mask"],
                        batch["context_mask"])
    assert torch.isinf(start[~batch["context_mask"]]).all()
    assert torch.isfinite(start[batch["context_mask"]]).all()
    assert qa_loss(reader, batch) == span_loss(start, end, batch["start"],
                                               batch["end"])
    opt = torch.optim.AdamW(reader.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = qa_loss(reader, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::10]
    answers = predict_answers(reader, batch, tok, max_answer_len=20)
    right = sum(map(exact_match, answers, [ex.answer for ex in examples]))
    assert right >= 12, list(zip(answers, [ex.answer for ex in examples]))


def test_paired_difference_interval():
    g = torch.Generator().manual_seed(0)
    same = paired_difference_ci([1, 0, 1, 1], [1, 0, 1, 1], generator=g)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    a = (torch.rand(400, generator=g) < 0.7).float()
    b = a * (torch.rand(400, generator=g) < 0.6).float()  # b right only where a is
    better = paired_difference_ci(a, b, generator=g)
    assert better.value == pytest.approx((a - b).mean().item())
    assert 0 < better.low < better.value < better.high
    worse = paired_difference_ci(b, a, generator=g)
    assert worse.high < 0
    # Unpaired, the same two accuracies would overlap far more: pairing is the point.
    narrow = better.high - better.low
    assert narrow < 0.12
    with pytest.raises(ValueError, match="same non-zero length"):
        paired_difference_ci([1, 0], [1])
