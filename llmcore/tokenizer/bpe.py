"""Byte-level byte-pair encoding (BPE), trained from scratch.

Sennrich et al., "Neural Machine Translation of Rare Words with Subword Units" (2016)
merge the most frequent adjacent pair of symbols into a new symbol, again and again;
Radford et al., "Language Models are Unsupervised Multitask Learners" (GPT-2, 2019)
start from the 256 byte values instead of characters, so every string has an
encoding (no unknown token, ever) and ``decode(encode(s)) == s`` for any text.
Like GPT-2, the text is first cut into *pre-tokens* (words with their leading space,
numbers, runs of punctuation, whitespace) by a regex, and merges never cross a
pre-token boundary: " the" becomes one token, "the." does not.

Training is incremental. Each distinct pre-token is stored once with its frequency;
pair counts live in a heap, and an index from each pair to the words that contain it
means a merge rewrites only those words and updates only the counts they change. The
naive version recounts every pair of the corpus after every merge. Encoding applies
the merges in the order they were learned and caches the result per pre-token, since
natural text repeats its words; a long pre-token (a script written without spaces)
is merged through a heap, so its cost grows as n log n rather than n squared.

Public API::

    BPETokenizer(merges, special_tokens=(), pattern=PRETOKEN_PATTERN, ids=None)
    BPETokenizer.train(text, vocab_size, special_tokens=())  # classmethod, -> tokenizer
                                        # text: a str or an iterable of str pieces
    tok.encode(text, allow_special=True) -> list[int]
    tok.decode(ids) -> str              # invalid UTF-8 (a cut character) becomes U+FFFD
    tok.decode_bytes(ids) -> bytes; tok.token_bytes(id) -> bytes  # what ids stand for
    tok.save(path); BPETokenizer.load(path)  # JSON (llmcore.tokenizer.base)
    tok.vocab_size, len(tok), tok.merges, tok.special_tokens  # {token string: id}
    pretokenize(text, pattern=PRETOKEN_PATTERN) -> list[str]

Ids: 0-255 are the bytes, 256 + k is the k-th merge, the special tokens come last.
``vocab_size`` in ``train`` counts all three (fewer merges only if pairs run out).
A tokenizer read from another library's files numbers the same tokens its own way
(GPT-2's ``vocab.json``: ``llmcore.tokenizer.gpt2``): ``ids`` lists the id of each
token in the order above, and ``encode``/``decode`` speak those ids.
A ``pattern`` must cover the whole text; one that skips a character is an error.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter, defaultdict
from typing import Iterable, Sequence

from llmcore.tokenizer.base import Tokenizer, check_special_tokens, special_splitter

# GPT-2's pre-tokenizer, for the standard library's `re` (no \p{L}): contractions,
# letters ([^\W\d_] is "a word character but not a digit or _"), digits, other
# non-space symbols, whitespace not followed by a word, and any leftover whitespace.
PRETOKEN_PATTERN = (r"'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+"
                    r"|\s+(?!\S)|\s+")
CACHE_SIZE = 200_000  # pre-tokens remembered by encode before the cache is emptied
LONG_WORD = 64  # bytes: longer pre-tokens are encoded with a heap, not a rescan


def compile_pattern(pattern: str) -> re.Pattern:
    """The pre-token regex, without capturing groups (``findall`` returns those).

    A pattern with Unicode classes (``\\p{L}``, as GPT-2's own) needs the ``regex``
    package; the standard library's ``re`` has none.
    """
    engine = re
    if r"\p{" in pattern:
        try:
            import regex as engine
        except ImportError:
            raise ImportError(f"the pre-token pattern {pattern!r} uses Unicode classes "
                              r"(\p{...}), which need the `regex` package: pip install "
                              "regex (or use PRETOKEN_PATTERN)") from None
    pre = engine.compile(pattern)
    if pre.groups:
        raise ValueError(f"pattern {pattern!r} has capturing groups; write them as "
                         "non-capturing (?:...) so each match is a whole pre-token")
    return pre


def _findall(pre: re.Pattern, text: str) -> list[str]:
    """The pre-tokens of ``text``; an error if they skip a character of it."""
    words = pre.findall(text)
    if sum(map(len, words)) != len(text):
        lost = 0  # the first character no match starts at
        for m in pre.finditer(text):
            if m.start() != lost:
                break
            lost = m.end()
        raise ValueError(f"the pre-token pattern {pre.pattern!r} does not cover the "
                         f"text: character {text[lost]!r} at position {lost} matches "
                         "no alternative; end the pattern with a catch-all such as "
                         r"'|\s+|.' (or use PRETOKEN_PATTERN)")
    return words


def pretokenize(text: str, pattern: str = PRETOKEN_PATTERN) -> list[str]:
    """Cut ``text`` into the pieces that merges stay inside; they join back to it."""
    return _findall(compile_pattern(pattern), text)


def _pairs(word: Sequence[int]) -> Counter:
    return Counter(zip(word, word[1:]))


def _merge(word: Sequence[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """``word`` with each non-overlapping ``pair``, scanned left to right, fused."""
    out, i, n = [], 0, len(word)
    a, b = pair
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def learn_merges(word_counts: dict[bytes, int], n_merges: int) -> list[tuple[int, int]]:
    """The first ``n_merges`` BPE merges of a corpus given as ``{pre-token: count}``.

    Ties between equally frequent pairs go to the smallest pair of ids, so training is
    deterministic.
    """
    words = [list(w) for w in word_counts]  # each pre-token as a list of byte ids
    freqs = list(word_counts.values())
    counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> word indices
    for w, (word, f) in enumerate(zip(words, freqs)):
        for pair, k in _pairs(word).items():
            counts[pair] += k * f
            where[pair].add(w)
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    while len(merges) < n_merges and heap:
        neg, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg or -neg <= 0:
            continue  # a stale heap entry: the count changed after it was pushed
        new_id = 256 + len(merges)
        merges.append(pair)
        changed: set[tuple[int, int]] = set()
        for w in list(where[pair]):
            old = words[w]
            new = _merge(old, pair, new_id)
            words[w] = new
            before, after = _pairs(old), _pairs(new)
            for p in before.keys() | after.keys():
                delta = after.get(p, 0) - before.get(p, 0)
                if delta:
                    counts[p] += delta * freqs[w]
                    changed.add(p)
                if p not in after:
                    where[p].discard(w)
                elif p not in before:
                    where[p].add(w)
        del counts[pair], where[pair]
        for p in changed - {pair}:
            heapq.heappush(heap, (-counts[p], p))
    return merges


def apply_merges(ids: list[int], ranks: dict[tuple[int, int], int]) -> list[int]:
    """Encode one pre-token: apply the earliest-learned merge present, until none is.

    ``ranks`` maps a pair to the id it merges into; ids grow in the order merges were
    learned, so the smallest id is the earliest merge, as in training.
    """
    while len(ids) > 1:
        best = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, 1 << 62))
        if best not in ranks:
            break
        ids = _merge(ids, best, ranks[best])
    return ids


def apply_merges_heap(ids: list[int], ranks: dict[tuple[int, int], int]) -> list[int]:
    """``apply_merges`` in O(n log n) for long pre-tokens (text without spaces).

    The symbols form a linked list and the mergeable pairs a heap keyed by (rank,
    position): the leftmost occurrence of the earliest merge goes first, as in
    ``apply_merges``. A merge removes the right symbol and pushes the two new pairs.
    """
    if len(ids) < 2:
        return list(ids)
    sym: list[int | None] = list(ids)
    nxt = list(range(1, len(ids))) + [-1]
    prv = list(range(-1, len(ids) - 1))
    heap = [(ranks[p], i) for i, p in enumerate(zip(ids, ids[1:])) if p in ranks]
    heapq.heapify(heap)
    while heap:
        rank, i = heapq.heappop(heap)
        j = nxt[i]
        if sym[i] is None or j < 0 or ranks.get((sym[i], sym[j])) != rank:
            continue  # stale: one of the two symbols was merged away since
        sym[i], sym[j] = rank, None
        nxt[i] = k = nxt[j]
        if k >= 0:
            prv[k] = i
            if (sym[i], sym[k]) in ranks:
                heapq.heappush(heap, (ranks[(sym[i], sym[k])], i))
        h = prv[i]
        if h >= 0 and (sym[h], sym[i]) in ranks:
            heapq.heappush(heap, (ranks[(sym[h], sym[i])], h))
    out, i = [], 0
    while i >= 0:
        out.append(sym[i])
        i = nxt[i]
    return out


class BPETokenizer(Tokenizer):
    """A byte-level BPE tokenizer: 256 byte ids, learned merges, then special tokens."""

    KIND = "byte-bpe"

    def __init__(self, merges: Iterable[Sequence[int]],
                 special_tokens: Iterable[str] = (), pattern: str = PRETOKEN_PATTERN,
                 ids: Sequence[int] | None = None):
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.vocab = [bytes([i]) for i in range(256)]  # id -> the bytes it stands for
        for k, (a, b) in enumerate(self.merges):
            if not (0 <= a < 256 + k and 0 <= b < 256 + k):
                raise ValueError(f"merge {k} = {(a, b)} uses an id not yet defined")
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self.ranks = {pair: 256 + k for k, pair in enumerate(self.merges)}
        self._init_special(special_tokens, len(self.vocab))
        self.ids = self._check_ids(ids)  # None: the ids are the positions above
        if self.ids is not None:
            self.special_tokens = {s: self.ids[i]
                                   for s, i in self.special_tokens.items()}
            self._position = {i: k for k, i in enumerate(self.ids)}
        self.special_ids = {i: s for s, i in self.special_tokens.items()}
        self.pattern = pattern
        self._pre = compile_pattern(pattern)
        self._cache: dict[str, list[int]] = {}

    def _check_ids(self, ids: Sequence[int] | None) -> list[int] | None:
        if ids is None:
            return None
        ids, n = [int(i) for i in ids], len(self.vocab) + len(self.special_tokens)
        if sorted(ids) != list(range(n)):
            raise ValueError(f"ids must number the {n} tokens (256 bytes, "
                             f"{len(self.merges)} merges, {len(self.special_tokens)} "
                             f"special) 0 to {n - 1}, each once; got {len(ids)} ids")
        return ids

    @classmethod
    def train(cls, text: str | Iterable[str], vocab_size: int,
              special_tokens: Iterable[str] = (),
              pattern: str = PRETOKEN_PATTERN) -> "BPETokenizer":
        """Learn ``vocab_size - 256 - len(special_tokens)`` merges from ``text``.

        ``text`` may come in pieces (an iterable of str, for a corpus read file by
        file); the merges are those of the joined text when each piece ends at a
        pre-token boundary. Special tokens in ``text`` are cut out first: no merge
        spans or learns them.
        """
        special = check_special_tokens(special_tokens)
        if vocab_size < 256 + len(special):
            raise ValueError(f"vocab_size={vocab_size} must be at least 256 (bytes) "
                             f"+ {len(special)} (the special tokens)")
        splitter = special_splitter(special)
        counts: Counter = Counter()
        pre = compile_pattern(pattern)
        for chunk in [text] if isinstance(text, str) else text:
            for piece in splitter.split(chunk) if splitter else [chunk]:
                if piece not in special:
                    counts.update(_findall(pre, piece))
        word_counts = {w.encode("utf-8", "surrogatepass"): c for w, c in counts.items()}
        merges = learn_merges(word_counts, vocab_size - 256 - len(special))
        return cls(merges, special, pattern)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + len(self.special_tokens)

    def _encode_word(self, word: str) -> list[int]:
        ids = list(word.encode("utf-8", "surrogatepass"))
        if len(ids) > LONG_WORD:
            return apply_merges_heap(ids, self.ranks)
        return apply_merges(ids, self.ranks)

    def _encode_ordinary(self, text: str, out: list[int]) -> None:
        cache = self._cache
        for word in _findall(self._pre, text):
            ids = cache.get(word)
            if ids is None:
                ids = self._encode_word(word)
                if self.ids is not None:
                    ids = [self.ids[i] for i in ids]
                if len(word) <= LONG_WORD:  # a huge run of letters is not worth keeping
                    if len(cache) >= CACHE_SIZE:
                        cache.clear()
                    cache[word] = ids
            out.extend(ids)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of ``text``; with ``allow_special`` a special token is one id."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        out: list[int] = []
        if not (allow_special and self._splitter):
            self._encode_ordinary(text, out)
            return out
        for piece in self._splitter.split(text):
            if piece in self.special_tokens:
                out.append(self.special_tokens[piece])
            elif piece:
                self._encode_ordinary(piece, out)
        return out

    def token_bytes(self, i: int) -> bytes:
        if i in self.special_ids:
            return self.special_ids[i].encode("utf-8")
        k = i if self.ids is None else self._position.get(i, -1)
        if 0 <= k < len(self.vocab):
            return self.vocab[k]
        raise ValueError(f"id {i} is outside [0, vocab_size={self.vocab_size})")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.token_bytes(int(i)) for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        data = self.decode_bytes(ids)
        try:
            return data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:  # e.g. ids cut in the middle of a character
            return data.decode("utf-8", "replace")

    def _fields(self) -> dict:
        ids = {} if self.ids is None else {"ids": self.ids}
        return {"pattern": self.pattern, "merges": [list(m) for m in self.merges],
                **ids}

    @classmethod
    def _from_fields(cls, obj: dict, special_tokens: list[str]) -> "BPETokenizer":
        return cls(obj["merges"], special_tokens, obj["pattern"], obj.get("ids"))

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", merges={len(self.merges)})"
