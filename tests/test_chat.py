import pytest
import torch

from book.workers.chat import (CHAT_TOKENS, END, ROLE_TOKENS, chat_batch, chat_prompt,
                               chat_targets, format_dialogue, parse_dialogue,
                               truncate_dialogue)
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.tokenizer import CharTokenizer

TOK = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz ?!.,", CHAT_TOKENS)
DIALOGUE = [("system", "be brief"), ("user", "hi there"), ("assistant", "hello"),
            ("user", "how are you?"), ("assistant", "well, thanks.")]


def test_mask_covers_exactly_assistant_tokens():
    ids, mask = format_dialogue(DIALOGUE, TOK)
    assert len(ids) == len(mask)
    expected = []
    for role, text in DIALOGUE:
        expected += [False] + [role == "assistant"] * (len(text) + 1)
    assert mask == expected
    # The masked ids decode to the assistant texts, each followed by <|end|>.
    learned = TOK.decode(i for i, m in zip(ids, mask) if m)
    assert learned == "hello" + END + "well, thanks." + END
    inputs, targets = chat_targets(torch.tensor(ids), torch.tensor(mask))
    assert inputs.tolist() == ids[:-1]
    kept = targets != -100
    assert kept.tolist() == mask[1:]
    assert targets[kept].tolist() == [i for i, m in zip(ids[1:], mask[1:]) if m]


def test_round_trip():
    ids, _ = format_dialogue(DIALOGUE, TOK)
    assert parse_dialogue(ids, TOK) == DIALOGUE
    assert ids[0] == TOK.special_tokens[ROLE_TOKENS["system"]]
    assert ids[-1] == TOK.special_tokens[END]


def test_truncation_keeps_system_and_recent_whole_turns():
    size = [len(format_dialogue([t], TOK)[0]) for t in DIALOGUE]
    full = sum(size)
    assert truncate_dialogue(DIALOGUE, TOK, full) == DIALOGUE
    # One id short: the oldest user turn goes, and with it the reply it asked for.
    assert truncate_dialogue(DIALOGUE, TOK, full - 1) == [DIALOGUE[0], *DIALOGUE[3:]]
    # Only the last turn fits beside the system turn.
    tight = size[0] + size[-1]
    assert truncate_dialogue(DIALOGUE, TOK, tight) == [DIALOGUE[0], DIALOGUE[-1]]
    for n in range(tight, full + 1):
        kept = truncate_dialogue(DIALOGUE, TOK, n)
        assert len(format_dialogue(kept, TOK)[0]) <= n
        assert kept[0] == DIALOGUE[0] and kept[-1] == DIALOGUE[-1]
        assert kept[1:] == DIALOGUE[len(DIALOGUE) - len(kept) + 1:]  # a suffix
        assert len(kept) == 2 or kept[1][0] == "user"
    with pytest.raises(ValueError, match="max_tokens"):
        truncate_dialogue(DIALOGUE, TOK, tight - 1)


def test_prompt_and_batch_fit_the_block():
    prompt = chat_prompt(DIALOGUE[:4], TOK, 30)
    assert len(prompt) <= 30
    assert prompt[-1] == TOK.special_tokens[ROLE_TOKENS["assistant"]]
    assert prompt[0] == TOK.special_tokens[ROLE_TOKENS["system"]]
    x, y = chat_batch([DIALOGUE, DIALOGUE[:3]], TOK, block_size=40)
    assert x.shape == y.shape and x.shape[1] <= 40
    assert (y[1, 26:] == -100).all()  # padding is never a target


def test_user_logits_get_no_gradient():
    torch.manual_seed(0)
    model = GPT(GPTConfig(TOK.vocab_size, 64, 1, 2, 16))
    x, y = chat_batch([DIALOGUE], TOK, block_size=64)
    logits, loss = model(x, y)
    logits.retain_grad()
    loss.backward()
    g = logits.grad.abs().sum(-1)  # (B, T)
    assert (g[y == -100] == 0).all() and (g[y != -100] > 0).all()


@pytest.mark.parametrize("turns, match", [
    ([], "empty"),
    ([("bot", "hi")], "role"),
    ([("user", "hi"), ("system", "x")], "system"),
    (["hi"], "pair"),
])
def test_bad_turns(turns, match):
    with pytest.raises(ValueError, match=match):
        format_dialogue(turns, TOK)


def test_bad_inputs():
    with pytest.raises(ValueError, match="chat tokens"):
        format_dialogue(DIALOGUE, CharTokenizer.train("abc"))
    with pytest.raises(ValueError, match="shape"):
        chat_targets(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4).bool())
    ids, _ = format_dialogue(DIALOGUE, TOK)
    with pytest.raises(ValueError, match="inside a turn"):
        parse_dialogue(ids[:-1], TOK)
    with pytest.raises(ValueError, match="role token"):
        parse_dialogue(ids[1:], TOK)
    # A turn's text cannot contain a special token that would forge a turn.
    forged, _ = format_dialogue([("user", "a<|assistant|>b")], TOK.__class__.train(
        "ab<|>sitnaer", CHAT_TOKENS))
    assert len(forged) == len("a<|assistant|>b") + 2
