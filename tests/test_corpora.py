"""The vendored corpora load only when their bytes are the expected ones."""

import shutil

import pytest

from llmcore.data import CorpusError, load_corpus
from llmcore.data.corpora import CORPORA, DATA_DIR


def test_shakespeare_and_polarity_load():
    text = load_corpus("shakespeare")
    assert len(text) == 1_115_394 and text.startswith("First Citizen:")
    sentences, labels = load_corpus("polarity")
    assert len(sentences) == len(labels) == 10_662
    assert labels.count(1) == labels.count(0) == 5_331


def test_corrupted_copy_raises_an_error_naming_the_file_and_the_fix(tmp_path):
    for f in CORPORA["shakespeare"]:
        shutil.copy(DATA_DIR / f.name, tmp_path / f.name)
    path = tmp_path / "tinyshakespeare.txt"
    data = bytearray(path.read_bytes())
    data[1000] ^= 0x01  # one flipped bit
    path.write_bytes(bytes(data))
    with pytest.raises(CorpusError,
                       match=r"tinyshakespeare.txt is corrupt.*git checkout"):
        load_corpus("shakespeare", data_dir=tmp_path)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(CorpusError, match=r"rt-polarity.pos is missing.*git checkout"):
        load_corpus("polarity", data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"name='wiki'.*polarity.*shakespeare"):
        load_corpus("wiki")
