"""Causal language modelling data: a long array of token ids cut into windows.

A causal LM learns to predict token ``t + 1`` from tokens ``0..t``. The corpus is
encoded once into a 1-D array of ids; a training example is a window of ``T + 1``
consecutive ids, the first ``T`` as input ``x`` and the last ``T`` as target ``y``
(``y`` is ``x`` shifted by one), so every window trains ``T`` predictions at once.
The recipe follows nanoGPT (random windows for training, a contiguous held-out tail
for validation, a ``.bin`` file of token ids read through ``np.memmap`` so a corpus
larger than memory costs no RAM).

Public API::

    split_tokens(tokens, val_fraction=0.1) -> (train, val)
    get_batch(data, batch_size, block_size, generator=None, device="cpu") -> (x, y)
    LMWindows(tokens, block_size, stride=None)          # a torch Dataset of (x, y)
    write_token_cache(path, tokens, vocab_size) -> int  # number of ids written
    load_token_cache(path) -> np.memmap                 # read-only, 1-D
    unigram_loss(train, held_out, vocab_size) -> float  # the no-context baseline

``tokens``/``data`` is any 1-D sequence of ids: a ``torch.Tensor``, a NumPy array or
memmap, or a list. ``x`` and ``y`` are int64 tensors of shape ``(batch_size,
block_size)`` on ``device``. ``get_batch`` draws window starts uniformly with
``generator`` (a CPU ``torch.Generator``; pass ``rt.generator``), so a seeded run
draws the same batches on every device. ``split_tokens`` keeps the order: the last
``val_fraction`` of the ids is the validation set, so no window straddles both.
``write_token_cache`` accepts one sequence of ids or an iterable of chunks (for a
corpus encoded piece by piece), stores the smallest unsigned type that holds every id
below ``vocab_size`` (``uint16`` up to 2**16 ids, ``uint32`` up to 2**32, then
``uint64``), and writes atomically (``llmcore.io.atomic_write``).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from llmcore.io import atomic_write

MAGIC = b"LLMCTOK1"  # first bytes of a token cache, so a stray file is not read as ids
HEADER = struct.Struct("<8sQQ")  # magic, bytes per id, number of ids


def _as_1d(tokens, name: str = "tokens"):
    if isinstance(tokens, (list, tuple)):
        tokens = np.asarray(tokens, dtype=np.int64)
    if not isinstance(tokens, (np.ndarray, torch.Tensor)) or tokens.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of token ids (tensor, NumPy "
                         f"array or list), got {type(tokens).__name__} with shape "
                         f"{getattr(tokens, 'shape', None)}")
    return tokens


def split_tokens(tokens, val_fraction: float = 0.1):
    """``(train, val)``: the first ``1 - val_fraction`` of the ids, then the rest."""
    tokens = _as_1d(tokens)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must lie strictly between 0 "
                         "and 1")
    n = int(len(tokens) * (1.0 - val_fraction))
    if n == 0 or n == len(tokens):
        raise ValueError(f"{len(tokens)} ids are too few to split with "
                         f"val_fraction={val_fraction}")
    return tokens[:n], tokens[n:]


def _window(data, start: int, length: int) -> torch.Tensor:
    piece = data[start:start + length]
    if isinstance(piece, torch.Tensor):
        return piece.long()
    return torch.from_numpy(np.asarray(piece, dtype=np.int64))


def get_batch(data, batch_size: int, block_size: int,
              generator: torch.Generator | None = None,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows: ``x = ids[i:i+T]``, ``y = ids[i+1:i+T+1]``."""
    data = _as_1d(data, "data")
    if batch_size <= 0 or block_size <= 0:
        raise ValueError(f"batch_size={batch_size} and block_size={block_size} must "
                         "be positive")
    if len(data) < block_size + 1:
        raise ValueError(f"data has {len(data)} ids, fewer than block_size + 1 = "
                         f"{block_size + 1}: use a shorter block_size or more data")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    if isinstance(data, torch.Tensor):
        offsets = starts[:, None] + torch.arange(block_size + 1)  # (B, T + 1)
        xy = data[offsets.to(data.device)].long()
    else:  # a NumPy array or memmap: read only the windows' slices
        xy = torch.stack([_window(data, int(i), block_size + 1) for i in starts])
    device = torch.device(device)
    if device.type == "cuda" and xy.device.type == "cpu":
        # Pinned host memory lets the copy overlap with the GPU's work.
        xy = xy.pin_memory().to(device, non_blocking=True)
    else:
        xy = xy.to(device)
    # contiguous copies: a loss may call .view(-1) on the targets
    return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()  # (B, T) each


class LMWindows(Dataset):
    """Windows every ``stride`` ids (default ``block_size``: disjoint targets).

    For evaluation: iterating over all windows scores every id of a validation set
    once, where ``get_batch`` samples. Item ``i`` is ``(x, y)``, int64 ``(T,)`` each.
    """

    def __init__(self, tokens, block_size: int, stride: int | None = None):
        self.tokens = _as_1d(tokens)
        self.block_size = block_size
        # stride=0 is an error, not "the default": only None means block_size.
        self.stride = block_size if stride is None else stride
        if block_size <= 0 or self.stride <= 0:
            raise ValueError(f"block_size={block_size} and stride={stride} must be "
                             "positive")
        if len(self.tokens) < block_size + 1:
            raise ValueError(f"tokens has {len(self.tokens)} ids, fewer than "
                             f"block_size + 1 = {block_size + 1}")

    def __len__(self) -> int:
        return (len(self.tokens) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        xy = _window(self.tokens, (i % len(self)) * self.stride, self.block_size + 1)
        return xy[:-1], xy[1:]


def _chunks(tokens) -> Iterable:
    """One sequence of ids, or an iterable of such sequences, as an iterable."""
    if isinstance(tokens, (np.ndarray, torch.Tensor)):
        return [tokens]
    if isinstance(tokens, (list, tuple)) and (not tokens or
                                              isinstance(tokens[0], (int, np.integer))):
        return [tokens]
    return tokens


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds the ids ``0 .. vocab_size - 1``."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) \
            or vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size!r} must be a positive int")
    if vocab_size > 2**63:  # torch reads ids as int64
        raise ValueError(f"vocab_size={vocab_size} has ids beyond int64")
    for dtype in (np.uint16, np.uint32, np.uint64):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)


def write_token_cache(path: str | os.PathLike, tokens: Sequence[int] | Iterable,
                      vocab_size: int) -> int:
    """Write ids to a ``.bin`` token cache atomically; return how many were written."""
    dtype = token_dtype(vocab_size)
    count = 0
    # The count is known only at the end (chunks may be a generator): the header is
    # written first with 0 and rewritten after a seek, all inside the atomic file.
    with atomic_write(path, "wb") as f:
        f.write(HEADER.pack(MAGIC, dtype.itemsize, 0))
        for chunk in _chunks(tokens):
            if isinstance(chunk, torch.Tensor):
                chunk = chunk.cpu().numpy()
            arr = np.asarray(chunk).ravel()
            if arr.size and arr.dtype.kind not in "iu":
                raise ValueError(f"token ids must be integers, got {arr.dtype}")
            if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
                raise ValueError(f"token ids must lie in [0, vocab_size="
                                 f"{vocab_size}), got [{arr.min()}, {arr.max()}]")
            f.write(arr.astype(dtype).tobytes())
            count += arr.size
        f.seek(0)
        f.write(HEADER.pack(MAGIC, dtype.itemsize, count))
    return count


def load_token_cache(path: str | os.PathLike) -> np.memmap:
    """The ids of a token cache as a read-only 1-D memmap (read when sliced)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size or head[:8] != MAGIC:
        raise ValueError(f"{path} is not a token cache written by write_token_cache "
                         "(wrong header); rebuild it with write_token_cache")
    _, itemsize, count = HEADER.unpack(head)
    dtype = {2: np.uint16, 4: np.uint32, 8: np.uint64}.get(itemsize)
    expected = HEADER.size + itemsize * count
    if dtype is None or path.stat().st_size != expected:
        raise ValueError(f"{path} is truncated or corrupt: expected {expected} bytes "
                         f"for {count} ids, found {path.stat().st_size}; rebuild it")
    if count == 0:  # mmap cannot map zero bytes
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(count,))


def unigram_loss(train_tokens, eval_tokens, vocab_size: int) -> float:
    """Cross-entropy, in nats per token, of ``eval_tokens`` under the unigram model
    of ``train_tokens``: each id's frequency (add-one smoothed), context ignored.

    The loss a language model reaches by learning nothing but which tokens are
    common; a model that has learned anything from context must beat it.
    """
    train_np, eval_np = (np.asarray(t.cpu() if isinstance(t, torch.Tensor) else t,
                                    dtype=np.int64)
                         for t in (_as_1d(train_tokens), _as_1d(eval_tokens)))
    if len(eval_np) == 0:
        raise ValueError("eval_tokens is empty")
    for name, ids in (("train_tokens", train_np), ("eval_tokens", eval_np)):
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"{name} has ids outside [0, vocab_size={vocab_size})")
    counts = np.bincount(train_np, minlength=vocab_size) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[eval_np].mean())
