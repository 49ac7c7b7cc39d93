"""Your own text as a corpus: a UTF-8 file or a folder of ``.txt`` files, tokenised
once into a token cache.

The text is read in pieces, never whole, so a corpus larger than memory costs none:
each file is decoded as UTF-8 chunk by chunk (an invalid byte is an error that names
the file and its byte offset; a leading byte-order mark is dropped), the files of a
folder in sorted order with a newline between two files where the first lacks one.
Pieces end between a non-space character and a space, where no pre-token of the BPE
patterns can continue (``llmcore.tokenizer.bpe``), so encoding piece by piece gives
the ids of the whole text.

``prepare_text`` trains the tokenizer on the text (every character, or byte-level BPE
merges), then encodes it into ``tokens.bin`` (``llmcore.data.lm.write_token_cache``,
read back as a memmap) with a progress bar, and saves the tokenizer and a record of
the source beside it. ``reuse=True`` (a resumed run) reads them back instead of the
text, even if the text has changed or gone since.

Public API::

    text_files(path) -> list[Path]          # the file, or the folder's .txt files
    read_text(files, desc=None) -> iterator of str pieces  # desc: a progress bar
    train_tokenizer(files, kind="char" | "bpe", vocab_size=None) -> Tokenizer
    prepare_text(path, kind, vocab_size, folder=None, reuse=False, progress=True)
        -> (tokenizer, ids)                 # ids: 1-D, a memmap when folder is given
    remove_cache(folder)                    # what prepare_text wrote there
    TextDataError                           # bad data: names the path and the fix
"""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from llmcore.data.lm import load_token_cache, token_dtype, write_token_cache
from llmcore.io import atomic_write
from llmcore.tokenizer import BPETokenizer, CharTokenizer, Tokenizer

CHUNK = 1 << 20  # bytes read at a time
MAX_PIECE = 1 << 24  # characters: text without spaces is cut here regardless
# In the folder given to prepare_text; tokenizer.json is also the run's tokenizer.
TOKENS, RECORD, TOKENIZER = "tokens.bin", "tokens.json", "tokenizer.json"
TOKENIZERS = {"char": CharTokenizer, "bpe": BPETokenizer}


class TextDataError(ValueError):
    """Training text that cannot be used, with the path and the fix."""


def text_files(path: str | os.PathLike) -> list[Path]:
    """``path`` if it is a file, else every ``.txt`` file below the folder (hidden
    files and folders skipped), sorted; an error if there is no text at all."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise TextDataError(f"{path} is a folder without .txt files (its "
                                "subfolders searched too); put your text in .txt "
                                "files there, or pass one text file")
    else:
        raise TextDataError(f"{path}: no such file or folder; pass a UTF-8 text "
                            "file or a folder of .txt files")
    if sum(p.stat().st_size for p in files) == 0:
        raise TextDataError(f"{path} is empty ({len(files)} file(s) of 0 bytes); "
                            "give it some text to train on")
    return files


def _decode(path: Path, bar: tqdm) -> Iterator[str]:
    """The text of one file, chunk by chunk; a clear error at the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        offset = 3 if f.read(3) == codecs.BOM_UTF8 else 0  # bytes before `raw`
        f.seek(offset)
        while True:
            raw = f.read(CHUNK)
            pending = len(decoder.getstate()[0])  # bytes of a character cut in two
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as err:
                at = offset - pending + err.start
                raise TextDataError(
                    f"{path} is not UTF-8 text: byte {at:,} "
                    f"(0x{err.object[err.start]:02x}) {err.reason}. Save the file as "
                    "UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or move it out of the "
                    "data folder") from None
            offset += len(raw)
            bar.update(len(raw))
            if text:
                yield text
            if not raw:
                return


def _last_cut(text: str, start: int) -> int:
    """The last position from ``start`` on that follows a non-space and precedes a
    space (0: none)."""
    for i in range(len(text) - 1, max(start, 1) - 1, -1):
        if text[i].isspace() and not text[i - 1].isspace():
            return i
    return 0


def read_text(files: Iterable[Path], desc: str | None = None) -> Iterator[str]:
    """The files' text as pieces that end where no pre-token continues; ``desc``
    shows a progress bar over the bytes read."""
    files = list(files)
    with tqdm(total=sum(p.stat().st_size for p in files), desc=desc, unit="B",
              unit_scale=True, disable=desc is None, dynamic_ncols=True) as bar:
        buffer, last = "", "\n"
        for n, path in enumerate(files):
            if n and last != "\n":
                buffer += "\n"  # files are separate texts: do not run them together
            for text in _decode(path, bar):
                start = len(buffer)  # the buffer before has no place to cut
                buffer += text
                last = text[-1]
                cut = _last_cut(buffer, start)
                if not cut and len(buffer) > MAX_PIECE:
                    cut = len(buffer)  # no space anywhere: cut regardless
                if cut:
                    yield buffer[:cut]
                    buffer = buffer[cut:]
        if buffer:
            yield buffer


def train_tokenizer(files: list[Path], kind: str = "char",
                    vocab_size: int | None = None, progress: bool = False) -> Tokenizer:
    """A tokenizer of the files' text: its characters (``char``), or ``vocab_size``
    ids of byte-level BPE (``bpe``)."""
    desc = f"{kind} tokenizer" if progress else None
    if kind == "char":
        chars: set[str] = set()
        for piece in read_text(files, desc):
            chars.update(piece)
        return CharTokenizer(chars)
    if kind == "bpe":
        return BPETokenizer.train(read_text(files, desc), vocab_size)
    raise ValueError(f"kind={kind!r}: use 'char' or 'bpe'")


def _source(files: list[Path]) -> list[dict]:
    return [{"path": str(p.resolve()), "bytes": p.stat().st_size,
             "mtime": p.stat().st_mtime} for p in files]


def _reuse(folder: Path, kind: str, vocab_size: int | None, path: Path):
    """The cached tokenizer and ids in ``folder``; None if there are none (or they
    are damaged: made again), an error if they were made another way."""
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
        made = (record["kind"], record["vocab_size"])
        tok = TOKENIZERS[made[0]].load(folder / TOKENIZER)
        ids = load_token_cache(folder / TOKENS)
    except (OSError, ValueError, KeyError):
        return None
    if len(ids) != record["tokens"]:
        return None
    if made != (kind, vocab_size):  # never replace the tokens a run was trained on
        raise TextDataError(
            f"{folder / TOKENS} holds the tokens of a {made[0]} tokenizer (vocab_size "
            f"{made[1]}), not {kind} ({vocab_size}): a resumed run keeps its "
            "tokenizer. Resume with the settings the run started with, or start a "
            "new run (--overwrite, or another --out)")
    try:
        same = _source(text_files(path)) == record["source"]
    except TextDataError:
        same = False
    print(f"reading the {len(ids):,} tokens cached in {folder / TOKENS}"
          + ("" if same else f" ({path} has changed or gone since; the run goes on "
             "with the text it started with)"))
    return tok, ids


def remove_cache(folder: str | os.PathLike) -> None:
    """Delete the token cache and tokenizer that :func:`prepare_text` wrote."""
    for name in (TOKENS, RECORD, TOKENIZER):
        (Path(folder) / name).unlink(missing_ok=True)


def prepare_text(path: str | os.PathLike, kind: str = "char",
                 vocab_size: int | None = None, folder: str | os.PathLike | None = None,
                 reuse: bool = False, progress: bool = True
                 ) -> tuple[Tokenizer, np.ndarray]:
    """The tokenizer and the ids of the text at ``path``; see the module docstring.

    With ``folder`` the ids go to ``folder/tokens.bin`` (returned as a memmap) and the
    tokenizer to ``folder/tokenizer.json``; ``reuse`` reads them back (an error if
    they were made with another ``kind`` or ``vocab_size``). Without, the ids stay
    in memory.
    """
    path = Path(path)
    if kind == "bpe" and vocab_size is None:
        raise ValueError("the bpe tokenizer needs a vocab_size")
    if folder is not None and reuse:
        cached = _reuse(Path(folder), kind, vocab_size, path)
        if cached is not None:
            return cached
    files = text_files(path)
    tok = train_tokenizer(files, kind, vocab_size, progress)
    pieces = read_text(files, "tokenize" if progress else None)
    chunks = (np.asarray(tok.encode(p), dtype=token_dtype(tok.vocab_size))
              for p in pieces)
    if folder is None:
        return tok, np.concatenate(list(chunks))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    count = write_token_cache(folder / TOKENS, chunks, tok.vocab_size)
    tok.save(folder / TOKENIZER)
    record = {"kind": kind, "vocab_size": vocab_size, "tokens": count,
              "source": _source(files)}
    with atomic_write(folder / RECORD, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    return tok, load_token_cache(folder / TOKENS)
