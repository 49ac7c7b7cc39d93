"""What every tokenizer here shares: special tokens, the JSON file, ``load``.

A subclass names its file ``KIND`` and says what it stores beyond the special tokens
(``_fields``) and how to rebuild itself from that (``_from_fields``); ``save`` and
``load`` are written once, here. A special token is a string such as
``"<|endoftext|>"`` that ``encode`` maps to one id wherever it occurs in the text;
the special tokens take the ids after the ordinary vocabulary, in the order given.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from llmcore.io import atomic_write


def check_special_tokens(special_tokens: Iterable[str]) -> list[str]:
    """The special tokens as a list; a clear error for anything but distinct,
    non-empty strings (a bare string would otherwise become one token per char)."""
    if isinstance(special_tokens, (str, bytes)):
        raise ValueError(f"special_tokens must be a list of strings, got the "
                         f"string {special_tokens!r}; write "
                         f"special_tokens=[{special_tokens!r}]")
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


class Tokenizer:
    """The shared half of a tokenizer: special tokens, ``save``/``load``, sizes.

    Subclasses set ``KIND``, fill ``self.special_tokens`` with ``_init_special`` and
    define ``encode``, ``decode``, ``vocab_size``, ``_fields`` and ``_from_fields``.
    """

    KIND = ""
    VERSION = 1

    def _init_special(self, special_tokens: Iterable[str], first_id: int) -> list[str]:
        """Give the special tokens the ids from ``first_id`` on; keep their splitter."""
        special = check_special_tokens(special_tokens)
        self.special_tokens = {s: first_id + i for i, s in enumerate(special)}
        self._splitter = special_splitter(special)
        return special

    def _pieces(self, text: str, allow_special: bool) -> list[str]:
        """``text`` cut around its special tokens (kept as pieces), or whole."""
        if allow_special and self._splitter is not None:
            return self._splitter.split(text)
        return [text]

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.vocab_size

    def _fields(self) -> dict:
        """What the file holds besides type, version and special tokens."""
        raise NotImplementedError

    @classmethod
    def _from_fields(cls, obj: dict, special_tokens: list[str]) -> "Tokenizer":
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON, atomically (see ``llmcore.io.atomic_write``)."""
        obj = {"type": self.KIND, "version": self.VERSION, **self._fields(),
               "special_tokens": list(self.special_tokens)}
        with atomic_write(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """The tokenizer ``save`` wrote to ``path``; a clear error for other files."""
        try:
            obj = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a tokenizer file (not JSON: {err})"
                             ) from None
        if not isinstance(obj, dict) or obj.get("type") != cls.KIND:
            found = obj.get("type") if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{path} does not hold a {cls.KIND!r} tokenizer (type: "
                             f"{found!r}); load it with the class that saved it")
        if obj.get("version") != cls.VERSION:  # another layout: read, it would mislead
            raise ValueError(f"{path} is a {cls.KIND} tokenizer of version "
                             f"{obj.get('version')!r}; this llmcore reads version "
                             f"{cls.VERSION}. Train the tokenizer again with this one")
        try:
            return cls._from_fields(obj, obj["special_tokens"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path} is a damaged {cls.KIND} tokenizer file "
                             f"({err!r})") from None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, "
                f"special_tokens={list(self.special_tokens)})")
