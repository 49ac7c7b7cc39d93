"""Training on your own text: reading files and folders in pieces (exact, UTF-8
errors with their byte offset), the token cache and its reuse on --resume, and
``python -m llmcore.train --data`` end to end with its clear errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

import llmcore.data.textfiles as textfiles
from llmcore.data import load_corpus, load_token_cache
from llmcore.data.textfiles import (TextDataError, prepare_text, read_text, text_files,
                                    train_tokenizer)
from llmcore.sample import main as sample_main
from llmcore.tokenizer import BPETokenizer, CharTokenizer
from llmcore.train import read_checkpoint
from llmcore.train.__main__ import main

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
        "--batch-size", "4", "--no-progress", "--tier", "cpu"]
TEXT = load_corpus("shakespeare")[:6000]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """Three .txt files (one nested, one without a final newline, one with a
    byte-order mark and characters of 2 to 4 bytes), a hidden one and a .md file."""
    monkeypatch.setattr(textfiles, "CHUNK", 61)  # many chunk edges inside characters
    root = tmp_path / "texts"
    (root / "b").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.txt").write_text(TEXT[:3000], encoding="utf-8")  # ends mid-line
    unicode = "naïve café ünï 日本語 🙂🙂 " * 20  # characters of 2, 3 and 4 bytes
    (root / "b" / "c.txt").write_bytes(b"\xef\xbb\xbf" + unicode.encode())
    (root / "z.txt").write_text(TEXT[3000:] + "\n", encoding="utf-8")
    (root / ".hidden" / "x.txt").write_text("never read")
    (root / "notes.md").write_text("never read")
    whole = TEXT[:3000] + "\n" + unicode + "\n" + TEXT[3000:] + "\n"
    return root, whole


def test_a_folder_reads_as_one_text_in_pieces_that_encode_as_the_whole(folder):
    root, whole = folder
    files = text_files(root)
    assert [p.name for p in files] == ["a.txt", "c.txt", "z.txt"]  # b/c.txt < z.txt
    pieces = list(read_text(files))
    assert len(pieces) > 10 and "".join(pieces) == whole
    assert all(p[-1].isspace() is False for p in pieces[:-1])  # cut before a space
    bpe = train_tokenizer(files, "bpe", 300)
    assert bpe.merges == BPETokenizer.train(whole, 300).merges
    assert train_tokenizer(files, "char").chars == CharTokenizer.train(whole).chars
    tok, ids = prepare_text(root, "bpe", 300, progress=False)
    assert ids.tolist() == tok.encode(whole)


def test_bad_text_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(textfiles, "CHUNK", 7)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("a café at dawn, ".encode() * 3 + "déjà".encode("latin-1"))
    with pytest.raises(TextDataError, match=rf"{bad} is not UTF-8 text: byte 52 "
                                            r"\(0xe9\).*iconv"):
        list(read_text([bad]))
    cut = tmp_path / "cut.txt"
    cut.write_bytes("ok 日本".encode()[:-1])  # the last character lacks its last byte
    with pytest.raises(TextDataError, match="byte 6 "):
        list(read_text([cut]))
    with pytest.raises(TextDataError, match="no such file or folder"):
        text_files(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.md").write_text("markdown")
    with pytest.raises(TextDataError, match="folder without .txt files"):
        text_files(tmp_path / "empty")
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(TextDataError, match="is empty"):
        text_files(tmp_path / "empty")


def test_the_cache_is_read_back_instead_of_the_text(folder, tmp_path, monkeypatch,
                                                    capsys):
    root, whole = folder
    out = tmp_path / "run"
    tok, ids = prepare_text(root, "char", folder=out, progress=False)
    assert isinstance(ids, np.memmap) and ids.tolist() == tok.encode(whole)
    record = json.loads((out / "tokens.json").read_text())
    assert record["tokens"] == len(ids) and len(record["source"]) == 3

    def no_reading(*args, **kwargs):
        raise AssertionError("the text was read again")
    monkeypatch.setattr(textfiles, "read_text", no_reading)
    (root / "z.txt").write_text("changed")
    again, ids2 = prepare_text(root, "char", folder=out, reuse=True)
    assert ids2.tolist() == ids.tolist() and again.chars == tok.chars
    assert "has changed or gone since" in capsys.readouterr().out
    with pytest.raises(TextDataError, match="char tokenizer .* a resumed run keeps"):
        prepare_text(root, "bpe", 300, folder=out, reuse=True)  # never replaced
    assert load_token_cache(out / "tokens.bin").tolist() == ids.tolist()


def test_train_on_your_own_text_then_resume_from_the_cache(tmp_path, monkeypatch,
                                                           capsys):
    data = tmp_path / "mine.txt"
    data.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "run"
    assert main(["--data", str(data), "--tokenizer", "bpe", "--vocab-size", "300",
                 "--steps", "4", "--out", str(out), *TINY]) == 0
    said = capsys.readouterr().out
    n = len(BPETokenizer.load(out / "tokenizer.json").encode(TEXT))
    assert f"{n:,} tokens (bpe, 300 ids)" in said
    assert f"validating on the last {n - int(n * 0.9):,} (10%, held out)" in said
    saved = read_checkpoint(out / "ckpt.pt")["extra"]["meta"]
    assert saved["preset"]["corpus"] == str(data.resolve())
    assert saved["model"]["n_embd"] == 16 and saved["model"]["vocab_size"] == 300
    assert len(np.fromfile(out / "tokens.bin", dtype=np.uint8)) > 2 * n  # uint16 ids

    def no_reading(*args, **kwargs):
        raise AssertionError("the text was read again")
    monkeypatch.setattr(textfiles, "read_text", no_reading)
    assert main(["--data", str(data), "--tokenizer", "bpe", "--vocab-size", "300",
                 "--steps", "6", "--out", str(out), "--resume", *TINY]) == 0
    assert f"reading the {n:,} tokens cached" in capsys.readouterr().out
    assert read_checkpoint(out / "ckpt.pt")["step"] == 6
    with pytest.raises(ValueError, match="tokenizer"):  # a resumed run is one run
        main(["--data", str(data), "--steps", "8", "--out", str(out), "--resume",
              *TINY])


def test_bad_data_and_shapes_are_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["--data", str(empty), "--out", str(tmp_path / "a"), *TINY]) == 1
    assert "empty.txt is empty" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # refused before the folder is made
    short = tmp_path / "short.txt"
    short.write_text("a few words, not enough for a context of sixteen " * 2)
    assert main(["--data", str(short), "--out", str(tmp_path / "b"), *TINY]) == 1
    err = capsys.readouterr().err
    assert "too short for a context of 16 tokens" in err and "--block-size" in err
    assert list((tmp_path / "b").iterdir()) == []  # nothing left: no half run
    assert main(["--data", str(short), "--n-embd", "30", "--n-head", "4",
                 "--out", str(tmp_path / "c"), "--no-progress"]) == 2
    assert "multiple of n_head=4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--data", str(short), "--vocab-size", "300"])
    assert "--vocab-size is for --tokenizer bpe" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--steps", "3"])
    assert "--data PATH" in capsys.readouterr().err


@pytest.mark.parametrize("tokenizer", [["--tokenizer", "bpe", "--vocab-size", "300"],
                                       ["--tokenizer", "char"]])
def test_train_then_sample_the_same_text_twice(tmp_path, tokenizer, capsys):
    data, out = tmp_path / "mine.txt", tmp_path / "run"
    data.write_text(TEXT.lower(), encoding="utf-8")
    assert main(["--data", str(data), *tokenizer, "--steps", "60", "--out", str(out),
                 *TINY]) == 0
    capsys.readouterr()
    texts = []
    for _ in range(2):
        assert sample_main([str(out), "--prompt", "the cat", "--seed", "1",
                            "--max-new-tokens", "40"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0].startswith("the cat") and len(texts[0]) > len("the cat") + 20
    assert texts[0] == texts[1]


def shell(*args, cwd):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_the_commands_fail_in_one_line_from_a_shell(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    failed = shell("llmcore.train", "--data", "empty.txt", "--out", "e", *TINY,
                   cwd=tmp_path)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "empty.txt is empty" in failed.stderr.splitlines()[-1]
    failed = shell("llmcore.sample", "nowhere", "--prompt", "x", cwd=tmp_path)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.startswith("llmcore.sample: nowhere: no such folder")
