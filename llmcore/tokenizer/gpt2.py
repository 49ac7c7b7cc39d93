"""GPT-2's own tokenizer files, read into llmcore's byte-level BPE.

GPT-2 (Radford et al., "Language Models are Unsupervised Multitask Learners", 2019)
ships its BPE as two files: ``vocab.json`` (token -> id) and ``merges.txt`` (one merge
per line, in the order learned, after a ``#version`` line). Both spell bytes as
printable characters: the 188 printable bytes stand for themselves and the other 68
(controls, the space, ...) are moved to U+0100 and up (:func:`byte_to_unicode`), so
" the" is written "Ġthe". Its pre-tokenizer is :data:`GPT2_PATTERN`, whose Unicode
classes need the ``regex`` package.

Read into :class:`~llmcore.tokenizer.BPETokenizer`, the merges are the tokenizer's
merges and ``vocab.json`` gives each token its GPT-2 id (the ``ids`` argument), so the
ids are those the released GPT-2 weights were trained with. A vocabulary entry that
no merge builds (``<|endoftext|>``) is a special token.

Public API::

    load_gpt2_files(vocab_json, merges_txt, pattern=GPT2_PATTERN) -> BPETokenizer
    gpt2_tokenizer(name="gpt2") -> BPETokenizer  # the two files from the Hugging
                                                 # Face Hub (needs a network)
    byte_to_unicode() -> {byte: character}       # GPT-2's spelling of the bytes
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llmcore.tokenizer.bpe import BPETokenizer

# GPT-2's pre-tokenizer, as published: contractions, letters, numbers, other
# symbols, whitespace not followed by a word, other whitespace.
GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                r"""|\s+(?!\S)|\s+""")


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's character for each byte: printable Latin-1 bytes stand for themselves,
    the rest take the characters from U+0100 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def load_gpt2_files(vocab_json: str | os.PathLike, merges_txt: str | os.PathLike,
                    pattern: str = GPT2_PATTERN) -> BPETokenizer:
    """A :class:`BPETokenizer` with GPT-2's merges, ids and special tokens."""
    try:
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{vocab_json} is not a GPT-2 vocab.json ({err})") from None
    if not isinstance(vocab, dict) or not all(isinstance(i, int)
                                              for i in vocab.values()):
        raise ValueError(f"{vocab_json} is not a GPT-2 vocab.json: expected a JSON "
                         "object of token -> integer id")
    char_to_byte = {c: b for b, c in byte_to_unicode().items()}

    def spelled(token: str) -> bytes | None:  # None: not a spelling of bytes
        if not token or any(c not in char_to_byte for c in token):
            return None
        return bytes(char_to_byte[c] for c in token)

    position = {bytes([b]): b for b in range(256)}  # bytes -> position in llmcore
    merges = []
    lines = Path(merges_txt).read_text(encoding="utf-8").splitlines()
    for line_no, line in enumerate(lines, 1):
        if not line.strip() or (line_no == 1 and line.startswith("#version")):
            continue
        parts = [spelled(p) for p in line.split()]
        if len(parts) != 2 or None in parts:
            raise ValueError(f"{merges_txt}, line {line_no}: {line!r} is not a merge "
                             "of two byte-level tokens")
        a, b = parts
        if a not in position or b not in position:
            raise ValueError(f"{merges_txt}, line {line_no}: {line!r} uses a token "
                             "that no earlier line builds")
        if a + b in position:
            raise ValueError(f"{merges_txt}, line {line_no}: {line!r} builds "
                             f"{(a + b)!r} a second time")
        merges.append((position[a], position[b]))
        position[a + b] = 255 + len(merges)
    ids_of = {}  # bytes -> GPT-2 id, for every vocab entry that spells bytes
    special = []
    for token, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        raw = spelled(token)
        if raw in position:
            ids_of[raw] = i
        else:
            special.append(token)
    missing = [t for t in position if t not in ids_of]
    if missing:
        raise ValueError(f"{vocab_json} has no id for {len(missing)} tokens that bytes "
                         f"or {merges_txt} define, e.g. {missing[:3]!r}; the two "
                         "files do not belong together")
    tokens = sorted(position, key=position.get)  # llmcore's order: bytes, merges
    ids = [ids_of[t] for t in tokens] + [vocab[s] for s in special]
    return BPETokenizer(merges, special, pattern, ids)


def gpt2_tokenizer(name: str = "gpt2") -> BPETokenizer:
    """GPT-2's tokenizer (``name``: a model on the Hugging Face Hub with GPT-2's
    files, e.g. "gpt2", "gpt2-medium"), its two files downloaded once through
    ``huggingface_hub`` and cached; a clear error where the machine is offline."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ImportError("downloading GPT-2's tokenizer needs huggingface_hub: pip "
                          "install huggingface_hub (or transformers)") from None
    paths = []
    for file in ("vocab.json", "merges.txt"):
        try:
            paths.append(hf_hub_download(name, file))
        except Exception as err:  # offline, unknown name, hub down: all say the same
            raise RuntimeError(
                f"could not fetch {file} of {name!r} from the Hugging Face Hub "
                f"({type(err).__name__}: {str(err)[:200]}). This needs a network "
                "connection (Colab has one); offline, pass files you have to "
                "load_gpt2_files(vocab_json, merges_txt), or train a tokenizer "
                "with BPETokenizer.train") from None
    return load_gpt2_files(*paths)
