"""A character tokenizer: one id per character of the training text.

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

from typing import Iterable

from llmcore.tokenizer.base import Tokenizer


class CharTokenizer(Tokenizer):
    """One id per character of the training text (plus the special tokens)."""

    KIND = "char"

    def __init__(self, chars: Iterable[str], special_tokens: Iterable[str] = ()):
        self.chars = sorted(set(chars))
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("chars must be single characters")
        special = self._init_special(special_tokens, len(self.chars))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.itos = self.chars + special

    @classmethod
    def train(cls, text: str, special_tokens: Iterable[str] = ()) -> "CharTokenizer":
        """The vocabulary of ``text``: every character that occurs in it."""
        return cls(set(text), special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        ids: list[int] = []
        for piece in self._pieces(text, allow_special):
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

    def _fields(self) -> dict:
        return {"chars": self.chars}

    @classmethod
    def _from_fields(cls, obj: dict, special_tokens: list[str]) -> "CharTokenizer":
        return cls(obj["chars"], special_tokens)
