"""Tokenizers: round trips, incremental BPE against a naive one, save/load."""

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmcore.data import load_corpus
from llmcore.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, pretokenize
from llmcore.tokenizer.bpe import _merge, apply_merges, apply_merges_heap, learn_merges

SPECIAL = ["<|endoftext|>", "<pad>"]


@pytest.fixture(scope="module")
def shakespeare():
    return load_corpus("shakespeare")[:100_000]


@pytest.fixture(scope="module")
def bpe(shakespeare):
    return BPETokenizer.train(shakespeare, 600, special_tokens=SPECIAL)


# ---------------------------------------------------------------- reference BPE

def naive_merges(word_counts, n_merges):
    """Recount every pair of every word after each merge: slow but obviously right."""
    words = {tuple(w): c for w, c in word_counts.items()}
    merges = []
    for k in range(n_merges):
        counts = Counter()
        for w, c in words.items():
            for pair in zip(w, w[1:]):
                counts[pair] += c
        if not counts:
            break
        # the most frequent pair; among equals, the smallest
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        new = Counter()
        for w, c in words.items():
            new[tuple(_merge(w, pair, 256 + k))] += c
        words = new
    return merges


def encode_by_replaying_merges(tok, text):
    """Apply each merge, in order, to each pre-token: the definition of encoding."""
    out = []
    for word in pretokenize(text):
        ids = list(word.encode("utf-8"))
        for k, pair in enumerate(tok.merges):
            ids = _merge(ids, pair, 256 + k)
        out += ids
    return out


@pytest.mark.parametrize("seed", range(3))
def test_incremental_merges_equal_naive_merges(seed):
    import random
    rng = random.Random(seed)
    # a small alphabet makes overlapping pairs ("aaa") and ties frequent
    text = " ".join("".join(rng.choice("aab ba") for _ in range(rng.randint(1, 9)))
                    for _ in range(400))
    counts = Counter(w.encode() for w in pretokenize(text))
    assert learn_merges(counts, 60) == naive_merges(counts, 60)


def test_merges_on_real_text_equal_naive(shakespeare):
    counts = Counter(w.encode() for w in pretokenize(shakespeare[:20_000]))
    assert learn_merges(counts, 80) == naive_merges(counts, 80)


def test_encode_equals_replaying_the_merges(bpe, shakespeare):
    text = shakespeare[-3000:] + " Zebras quizzed 1234 naïve café ünïcödé 🙂!"
    # a long pre-token (no spaces) takes the heap path of the encoder
    text += " " + shakespeare[:2000].replace(" ", "").replace("\n", "")
    assert bpe.encode(text) == encode_by_replaying_merges(bpe, text)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="the ouwaT", max_size=200))
def test_heap_encoder_equals_simple_encoder(bpe, word):
    ids = list(word.encode())
    assert apply_merges_heap(ids, bpe.ranks) == apply_merges(ids, bpe.ranks)


def test_first_merges_and_ids(bpe):
    assert bpe.vocab_size == len(bpe) == 600
    assert len(bpe.merges) == 600 - 256 - len(SPECIAL)
    assert bpe.special_tokens == {"<|endoftext|>": 598, "<pad>": 599}
    # every merge's bytes are the concatenation of its parts
    for k, (a, b) in enumerate(bpe.merges):
        assert bpe.token_bytes(256 + k) == bpe.token_bytes(a) + bpe.token_bytes(b)
    assert b" the" in {bpe.token_bytes(i) for i in range(256, 598)}


def test_compression_improves_with_vocabulary(shakespeare):
    text = shakespeare[:50_000]
    ratios = [len(text.encode()) / len(BPETokenizer.train(text, v).encode(text))
              for v in (256, 300, 500, 1000)]
    assert ratios[0] == 1.0
    assert all(a < b for a, b in zip(ratios, ratios[1:])), ratios
    assert ratios[-1] > 2.5


# ---------------------------------------------------------------- round trips

@settings(max_examples=300, deadline=None)
@given(st.text())
def test_bpe_roundtrip_any_unicode(bpe, s):
    assert bpe.decode(bpe.encode(s)) == s


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8")))
def test_pretokens_cover_the_text(s):
    assert "".join(pretokenize(s)) == s


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=10), st.sampled_from(SPECIAL)), max_size=8))
def test_special_tokens_are_single_ids_and_roundtrip(bpe, parts):
    s = "".join(parts)
    ids = bpe.encode(s)
    assert bpe.decode(ids) == s
    assert ids.count(bpe.special_tokens["<pad>"]) == s.count("<pad>")
    plain = bpe.encode(s, allow_special=False)
    assert bpe.decode(plain) == s and not set(plain) & set(bpe.special_tokens.values())


def test_surrogates_and_cut_characters():
    tok = BPETokenizer.train("abc", 260)
    assert tok.decode(tok.encode("a\ud800b")) == "a\ud800b"  # a lone surrogate
    ids = tok.encode("é")  # two bytes; the first alone is not valid UTF-8
    assert len(ids) == 2 and tok.decode(ids[:1]) == "\ufffd"


def test_training_ignores_special_tokens_and_is_deterministic():
    text = "low lower lowest <|endoftext|> newer wider " * 20
    a = BPETokenizer.train(text, 300, special_tokens=["<|endoftext|>"])
    b = BPETokenizer.train(text, 300, special_tokens=["<|endoftext|>"])
    assert a.merges == b.merges
    learned = {a.token_bytes(i) for i in range(256, 256 + len(a.merges))}
    assert not any(b"<|" in t or b"|>" in t for t in learned)


def test_train_stops_when_pairs_run_out():
    tok = BPETokenizer.train("aaaa", 1000)
    assert tok.merges == [(97, 97), (256, 256)] and tok.vocab_size == 258


# ---------------------------------------------------------------- save, load, errors

def test_bpe_save_load(bpe, shakespeare, tmp_path):
    path = tmp_path / "tok" / "bpe.json"
    bpe.save(path)
    again = BPETokenizer.load(path)
    assert again.merges == bpe.merges and again.special_tokens == bpe.special_tokens
    text = shakespeare[:5000] + "<pad>"
    assert again.encode(text) == bpe.encode(text)
    assert not list(path.parent.glob("*.tmp"))


def test_load_rejects_other_files(tmp_path):
    junk = tmp_path / "junk.json"
    junk.write_text("not json")
    with pytest.raises(ValueError, match="not a tokenizer"):
        BPETokenizer.load(junk)
    CharTokenizer.train("abc").save(junk)
    with pytest.raises(ValueError, match="byte-bpe"):
        BPETokenizer.load(junk)
    junk.write_text(json.dumps({"type": "byte-bpe", "version": 1, "pattern": ".",
                                "merges": [[300, 1]], "special_tokens": []}))
    with pytest.raises(ValueError, match="merge 0"):
        BPETokenizer.load(junk)
    junk.write_text(json.dumps({"type": "byte-bpe", "version": 1}))
    with pytest.raises(ValueError, match="damaged"):
        BPETokenizer.load(junk)


def test_bpe_bad_input(bpe):
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train("abc", 100)
    with pytest.raises(ValueError, match="duplicates"):
        BPETokenizer.train("abc", 300, special_tokens=["<a>", "<a>"])
    with pytest.raises(ValueError, match="outside"):
        bpe.decode([bpe.vocab_size])
    with pytest.raises(ValueError, match="str"):
        bpe.encode(b"bytes")


def test_char_tokenizer(shakespeare, tmp_path):
    tok = CharTokenizer.train(shakespeare, special_tokens=["<eos>"])
    assert tok.vocab_size == len(set(shakespeare)) + 1
    assert tok.decode(tok.encode(shakespeare)) == shakespeare
    assert tok.encode("ab<eos>") == [tok.encode("a")[0], tok.encode("b")[0],
                                     tok.special_tokens["<eos>"]]
    assert tok.chars == sorted(tok.chars)
    tok.save(tmp_path / "char.json")
    again = CharTokenizer.load(tmp_path / "char.json")
    assert again.encode("To be<eos>") == tok.encode("To be<eos>")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.encode("日本")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])


# ---------------------------------------------------------------- bad input (issue 11)

@pytest.mark.parametrize("cls", [CharTokenizer, BPETokenizer])
def test_special_tokens_as_a_bare_string_is_an_error(cls):
    """A string is iterable: "<eos>" used to become five one-character tokens."""
    text = "hello <eos> world"
    train = (lambda **kw: cls.train(text, **kw)) if cls is CharTokenizer else \
        (lambda **kw: cls.train(text, 260, **kw))
    with pytest.raises(ValueError, match=r"special_tokens=\['<eos>'\]"):
        train(special_tokens="<eos>")
    tok = train(special_tokens=["<eos>"])
    ids = tok.encode("hello <eos>")
    assert ids.count(tok.special_tokens["<eos>"]) == 1
    assert tok.decode(tok.encode("e o")) == "e o"  # ordinary letters stay ordinary


def test_a_pattern_that_skips_characters_is_an_error():
    """A split pattern must cover the text; one matching letters only used to drop
    the spaces silently, so decode(encode(s)) != s."""
    with pytest.raises(ValueError, match="does not cover the text.*' ' at position 2"):
        BPETokenizer.train("ab cd", 260, pattern=r"[a-z]+")
    with pytest.raises(ValueError, match="does not cover"):
        pretokenize("ab!", pattern=r"[a-z]+")
    tok = BPETokenizer([], pattern=r"[a-z]+")
    with pytest.raises(ValueError, match="does not cover"):
        tok.encode("ab cd")
    with pytest.raises(ValueError, match="capturing groups"):
        BPETokenizer([], pattern=r"([a-z]+)|\s+")
    ok = BPETokenizer.train("ab cd", 260, pattern=r"[a-z]+|\s+|.")
    assert ok.decode(ok.encode("ab cd!")) == "ab cd!"


def test_base_holds_save_and_load_once(tmp_path):
    """One load/save for both tokenizers, and each refuses the other's file."""
    assert "load" not in vars(CharTokenizer) and "load" not in vars(BPETokenizer)
    assert "save" not in vars(CharTokenizer) and "save" not in vars(BPETokenizer)
    char = CharTokenizer.train("abc", ["<s>"])
    char.save(tmp_path / "c.json")
    assert isinstance(CharTokenizer.load(tmp_path / "c.json"), Tokenizer)
    with pytest.raises(ValueError, match="does not hold a 'byte-bpe'"):
        BPETokenizer.load(tmp_path / "c.json")
