"""A multi-turn chat format: role tokens, an end-of-turn token, a loss mask.

A dialogue is a list of ``(role, text)`` turns; each turn becomes
``<|role|> text <|end|>``. Supervised chat fine-tuning (as in InstructGPT, Ouyang et
al., 2022) trains only on what the assistant says: the loss mask is true on the
assistant's text and its ``<|end|>`` (so the model learns to stop), false on the
role tokens and on every system and user token. ``chat_targets`` turns the mask
into next-token targets with ``-100`` (ignored by ``F.cross_entropy``) elsewhere.
"""

from __future__ import annotations

from typing import Sequence

import torch

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>",
               "assistant": "<|assistant|>"}
END = "<|end|>"
CHAT_TOKENS = (*ROLE_TOKENS.values(), END)  # special tokens the tokenizer needs
IGNORE_INDEX = -100
Turn = tuple[str, str]


def check_turns(turns: Sequence[Turn], tokenizer) -> None:
    """Raise a ValueError unless ``turns`` is a well-formed dialogue."""
    missing = [t for t in CHAT_TOKENS if t not in tokenizer.special_tokens]
    if missing:
        raise ValueError(f"tokenizer lacks the chat tokens {missing}; build it with "
                         "special_tokens=book.workers.chat.CHAT_TOKENS")
    if len(turns) == 0:
        raise ValueError("turns is empty: a dialogue needs at least one turn")
    for i, turn in enumerate(turns):
        if not (isinstance(turn, (tuple, list)) and len(turn) == 2
                and isinstance(turn[1], str)):
            raise ValueError(f"turns[{i}] must be a (role, text) pair, got {turn!r}")
        if turn[0] not in ROLE_TOKENS:
            raise ValueError(f"turns[{i}] has role {turn[0]!r}; expected one of "
                             f"{list(ROLE_TOKENS)}")
        if turn[0] == "system" and i > 0:
            raise ValueError(f"turns[{i}] is a system turn; only the first turn may "
                             "be one")


def encode_turn(role: str, text: str, tokenizer) -> tuple[list[int], list[bool]]:
    """``<|role|> text <|end|>`` as ids, and the loss mask of those ids."""
    # allow_special=False: a turn's text cannot smuggle in role or end tokens.
    body = tokenizer.encode(text, allow_special=False)
    ids = [tokenizer.special_tokens[ROLE_TOKENS[role]], *body,
           tokenizer.special_tokens[END]]
    learn = role == "assistant"
    return ids, [False] + [learn] * (len(body) + 1)


def format_dialogue(turns: Sequence[Turn], tokenizer
                    ) -> tuple[list[int], list[bool]]:
    """``(ids, loss_mask)`` of a dialogue; the mask is true on assistant tokens only."""
    check_turns(turns, tokenizer)
    ids: list[int] = []
    mask: list[bool] = []
    for role, text in turns:
        i, m = encode_turn(role, text, tokenizer)
        ids += i
        mask += m
    return ids, mask


def parse_dialogue(ids: Sequence[int], tokenizer) -> list[Turn]:
    """The turns of formatted ``ids``: the inverse of :func:`format_dialogue`."""
    role_of = {tokenizer.special_tokens[t]: r for r, t in ROLE_TOKENS.items()}
    end = tokenizer.special_tokens[END]
    turns, role, body = [], None, []
    for t in (int(x) for x in ids):
        if role is None:
            if t not in role_of:
                raise ValueError(f"expected a role token, got id {t}: ids must be "
                                 "whole turns as format_dialogue writes them")
            role, body = role_of[t], []
        elif t == end:
            turns.append((role, tokenizer.decode(body)))
            role = None
        else:
            body.append(t)
    if role is not None:
        raise ValueError("ids end inside a turn (no <|end|> token)")
    return turns


def truncate_dialogue(turns: Sequence[Turn], tokenizer, max_tokens: int
                      ) -> list[Turn]:
    """The most recent whole turns that fit in ``max_tokens`` ids.

    Rules: a leading system turn is always kept; older turns are dropped whole,
    never cut; the kept window starts with a user turn (a reply without its
    question is dropped too) unless only the last turn fits. The last turn must fit.
    """
    check_turns(turns, tokenizer)
    sizes = [len(encode_turn(r, t, tokenizer)[0]) for r, t in turns]
    head = 1 if turns[0][0] == "system" else 0
    budget = max_tokens - sum(sizes[:head])
    if len(turns) == head or sizes[-1] > budget:
        raise ValueError(f"max_tokens={max_tokens} cannot hold the system turn and "
                         f"the last turn ({sum(sizes[:head])} + {sizes[-1]} ids); "
                         "raise max_tokens or shorten the turn")
    start = len(turns) - 1
    while start - 1 >= head and sizes[start - 1] <= budget - sum(sizes[start:]):
        start -= 1
    while start < len(turns) - 1 and turns[start][0] != "user":
        start += 1
    return list(turns[:head]) + list(turns[start:])


def chat_prompt(turns: Sequence[Turn], tokenizer, max_tokens: int) -> list[int]:
    """Ids that ask the model for the next assistant turn, within ``max_tokens``."""
    kept = truncate_dialogue(turns, tokenizer, max_tokens - 1)  # room for the tag
    return format_dialogue(kept, tokenizer)[0] + [
        tokenizer.special_tokens[ROLE_TOKENS["assistant"]]]


def chat_targets(ids: torch.Tensor, loss_mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids[..., :-1], ids[..., 1:])`` with target -100 where the mask is false."""
    ids, loss_mask = torch.as_tensor(ids), torch.as_tensor(loss_mask)
    if ids.shape != loss_mask.shape or ids.ndim not in (1, 2) or ids.shape[-1] < 2:
        raise ValueError(f"ids {tuple(ids.shape)} and loss_mask "
                         f"{tuple(loss_mask.shape)} must share one shape, (T,) or "
                         "(B, T) with T >= 2")
    targets = ids[..., 1:].masked_fill(~loss_mask[..., 1:].bool(), IGNORE_INDEX)
    return ids[..., :-1].contiguous(), targets


def chat_batch(dialogues: Sequence[Sequence[Turn]], tokenizer, block_size: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` (B, T): each dialogue truncated to ``block_size + 1``
    ids (one is lost to the shift), right-padded with <|end|> that is never a target.
    """
    rows = [format_dialogue(truncate_dialogue(d, tokenizer, block_size + 1),
                            tokenizer) for d in dialogues]
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), tokenizer.special_tokens[END], dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for b, (i, m) in enumerate(rows):
        ids[b, :len(i)] = torch.tensor(i)
        mask[b, :len(m)] = torch.tensor(m)
    return chat_targets(ids, mask)
