"""Variable-length batches: padding, attention masks and a collate function.

Sentences differ in length, tensors do not: a batch pads every sequence to the longest
one with a ``pad_id`` and carries an *attention mask* (True = real token) so that no
real token attends to a pad and no loss is taken at a pad. Right padding suits
encoders and training; left padding suits batched generation with a decoder, where
every prompt must end at the same position.

Public API::

    pad_sequences(seqs, pad_id, max_len=None, side="right", multiple_of=None)
        -> (input_ids, attention_mask)
    collate(batch, pad_id, max_len=None, side="right", multiple_of=None) -> dict
    attention_mask_matrix(attention_mask, causal=False) -> (B, 1, T, T) bool
    causal_lm_targets(input_ids, attention_mask) -> (inputs, targets)

``seqs`` is a list of 1-D id sequences (lists, arrays or tensors). ``input_ids`` is
int64 ``(B, T)``, ``attention_mask`` bool ``(B, T)``; ``T`` is the longest length, or
``max_len`` if given (a longer sequence is an error, not silently cut), rounded up to a
multiple of ``multiple_of`` (tensor cores like multiples of 8). ``collate`` takes a
list of sequences, or of dicts holding ``"input_ids"`` plus other per-example fields
(e.g. ``"label"``), and returns a dict with ``"input_ids"``, ``"attention_mask"`` and
each other field stacked with ``torch.tensor``: pass it as a ``DataLoader``'s
``collate_fn`` through ``functools.partial``. ``attention_mask_matrix`` turns a
``(B, T)`` mask into the ``attn_mask`` that ``F.scaled_dot_product_attention`` takes
(True = may attend; optionally causal). ``causal_lm_targets`` shifts a padded batch
by one for next-token prediction, with ``-100`` targets where the target is a pad.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from llmcore.config import IGNORE_INDEX


def _as_list(seq) -> list[int]:
    if isinstance(seq, torch.Tensor):
        if seq.ndim != 1:
            raise ValueError(f"each sequence must be 1-D, got shape {tuple(seq.shape)}")
        return seq.tolist()
    return [int(t) for t in seq]


def pad_sequences(seqs: Sequence, pad_id: int, max_len: int | None = None,
                  side: str = "right", multiple_of: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``seqs`` to one length: ``(input_ids, attention_mask)``, both ``(B, T)``."""
    if side not in ("right", "left"):
        raise ValueError(f"side={side!r} must be 'right' or 'left'")
    if len(seqs) == 0:
        raise ValueError("seqs is empty: a batch needs at least one sequence")
    rows = [_as_list(s) for s in seqs]
    longest = max(len(r) for r in rows)
    length = longest if max_len is None else max_len
    if length < longest:
        raise ValueError(f"a sequence has {longest} ids, more than max_len={max_len}: "
                         "truncate the sequences first or raise max_len")
    if multiple_of:
        length = -(-length // multiple_of) * multiple_of  # round up
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for b, row in enumerate(rows):
        n = len(row)
        cols = slice(0, n) if side == "right" else slice(length - n, length)
        ids[b, cols] = torch.tensor(row, dtype=torch.long)
        mask[b, cols] = True
    return ids, mask


def collate(batch: Sequence, pad_id: int, max_len: int | None = None,
            side: str = "right", multiple_of: int | None = None) -> dict[str, Any]:
    """A padded batch dict from a list of sequences or of dicts with ``input_ids``."""
    if len(batch) == 0:
        raise ValueError("batch is empty")
    if isinstance(batch[0], dict):
        if any("input_ids" not in item for item in batch):
            raise ValueError("every dict in batch needs an 'input_ids' entry")
        seqs = [item["input_ids"] for item in batch]
        extra = {k: torch.tensor([item[k] for item in batch])
                 for k in batch[0] if k != "input_ids"}
    else:
        seqs, extra = batch, {}
    ids, mask = pad_sequences(seqs, pad_id, max_len, side, multiple_of)
    return {"input_ids": ids, "attention_mask": mask, **extra}


def attention_mask_matrix(attention_mask: torch.Tensor, causal: bool = False
                          ) -> torch.Tensor:
    """``(B, 1, T, T)`` bool: may query ``i`` attend to key ``j`` (SDPA's attn_mask).

    A pad *query* is allowed to attend to itself: a row with nothing allowed would give
    NaN from the softmax, and its output is ignored anyway.
    """
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be (B, T), got "
                         f"{tuple(attention_mask.shape)}")
    m = attention_mask.bool()
    T = m.shape[1]
    allowed = m[:, None, None, :].expand(-1, 1, T, T)  # (B, 1, T, T) keys that are real
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool,
                                       device=m.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=m.device)
    return allowed | eye


def causal_lm_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids[:, :-1], ids[:, 1:])``, with target ``-100`` where it is a pad."""
    if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask "
                         f"{tuple(attention_mask.shape)} must both be (B, T)")
    targets = input_ids[:, 1:].masked_fill(~attention_mask[:, 1:].bool(), IGNORE_INDEX)
    return input_ids[:, :-1].contiguous(), targets  # (B, T - 1) each
