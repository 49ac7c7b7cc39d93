"""Tokenizers: text to token ids and back.

``CharTokenizer`` (one id per character, ``char.py``) and ``BPETokenizer`` (byte-level
byte-pair encoding trained from scratch, ``bpe.py``) share one interface: ``train``
(a classmethod), ``encode(str) -> list[int]``, ``decode(ids) -> str``, ``save(path)``
and ``load(path)`` (JSON), ``vocab_size`` and ``special_tokens``. What they share is
written once, in ``Tokenizer`` (``base.py``).
"""

from llmcore.tokenizer.base import Tokenizer
from llmcore.tokenizer.bpe import PRETOKEN_PATTERN, BPETokenizer, pretokenize
from llmcore.tokenizer.char import CharTokenizer

__all__ = ["BPETokenizer", "CharTokenizer", "PRETOKEN_PATTERN", "pretokenize",
           "Tokenizer"]
