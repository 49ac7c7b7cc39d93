"""A character tokenizer, and what every tokenizer here shares: special tokens, JSON.

The simplest tokenizer gives every distinct character of the training text an id. Its
vocabulary is tiny (65 characters for the Shakespeare corpus) and a sequence is as
long as the text. Its weakness is the open world: a character never seen in training
has no id (``encode`` raises), which the byte-level BPE of ``llmcore.tokenizer.bpe``
removes by starting from the 256 byte values.

Public API::

    CharTokenizer(chars, special_tokens=())
    CharTokenizer.train(text, special_tokens=()) -> CharTokenizer   # classmethod
    tok.encode(text, allow_special=True) -> list[int]
    tok.decode(ids) -> str
    tok.save(path); CharTokenizer.load(path) -> CharTokenizer       # JSON, atomic
    tok.vocab_size, len(tok), tok.special_tokens  # {token string: id}

Ids: the characters in sorted order, then the special tokens in the order given.
A special token is a string such as ``"<|endoftext|>"`` that ``encode`` maps to one id
wherever it occurs in the text (``allow_special=False`` treats it as plain text).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from llmcore.io import atomic_write


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as JSON, atomically (see ``llmcore.io.atomic_write``)."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)


def read_json(path: str | os.PathLike, kind: str) -> dict:
    """The JSON object a ``kind`` tokenizer saved; a clear error for anything else."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a tokenizer file (not JSON: {err})") from None
    if not isinstance(obj, dict) or obj.get("type") != kind:
        found = obj.get("type") if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path} does not hold a {kind!r} tokenizer (type: {found!r});"
                         " load it with the class that saved it")
    return obj


def check_special_tokens(special_tokens: Iterable[str]) -> list[str]:
    special = list(special_tokens)
    if any(not isinstance(s, str) or not s for s in special):
        raise ValueError(f"special_tokens must be non-empty strings, got {special!r}")
    if len(set(special)) != len(special):
        raise ValueError(f"special_tokens has duplicates: {special!r}")
    return special


def special_splitter(special: Sequence[str]) -> re.Pattern | None:
    """A regex whose ``split`` cuts text around special tokens, keeping them."""
    if not special:
        return None
    # Longest first, so a special token that contains another one wins.
    alternatives = sorted(special, key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(s) for s in alternatives) + ")")


class CharTokenizer:
    """One id per character of the training text (plus the special tokens)."""

    def __init__(self, chars: Iterable[str], special_tokens: Iterable[str] = ()):
        self.chars = sorted(set(chars))
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("chars must be single characters")
        special = check_special_tokens(special_tokens)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.special_tokens = {s: len(self.chars) + i for i, s in enumerate(special)}
        self.itos = self.chars + special
        self._splitter = special_splitter(special)

    @classmethod
    def train(cls, text: str, special_tokens: Iterable[str] = ()) -> "CharTokenizer":
        """The vocabulary of ``text``: every character that occurs in it."""
        return cls(set(text), special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        pieces = [text]
        if allow_special and self._splitter is not None:
            pieces = self._splitter.split(text)
        ids: list[int] = []
        for piece in pieces:
            if piece in self.special_tokens and allow_special:
                ids.append(self.special_tokens[piece])
                continue
            try:
                ids.extend([self.stoi[c] for c in piece])
            except KeyError:
                unknown = sorted(set(piece) - set(self.stoi))
                raise ValueError(
                    f"text has characters outside the vocabulary: {unknown[:10]!r}; a "
                    "character tokenizer only knows the characters of its training "
                    "text (a byte-level BPETokenizer has no such gaps)") from None
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids {bad[:10]} are outside [0, vocab_size="
                             f"{self.vocab_size})")
        return "".join(self.itos[i] for i in ids)

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, {"type": "char", "version": 1, "chars": self.chars,
                                 "special_tokens": list(self.special_tokens)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CharTokenizer":
        obj = read_json(path, "char")
        try:
            return cls(obj["chars"], obj["special_tokens"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path} is a damaged char tokenizer file ({err!r})"
                             ) from None

    def __repr__(self) -> str:
        return (f"CharTokenizer(vocab_size={self.vocab_size}, "
                f"special_tokens={list(self.special_tokens)})")
