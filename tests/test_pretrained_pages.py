"""The gpu tier's GPT-2 in chapters 9, 22 and 25 (``book.workers.pretrained``),
without a download: a small random GPT2LMHeadModel and a vocabulary made here stand
in for the Hub, so the pages' GPT-2 path runs on the CPU."""

import json
from types import SimpleNamespace

import pytest
import torch

import book.workers.pretrained as pretrained_module
from book.workers.pretrained import classification_data, pretrained
from llmcore.apps.finetune import text_classification_data
from llmcore.models import hf
from llmcore.tokenizer import BPETokenizer
from llmcore.tokenizer.gpt2 import byte_to_unicode, load_gpt2_files

transformers = pytest.importorskip("transformers")
pytest.importorskip("regex")

SENTENCES = ["a fine, moving film", "dull and far too long", "the best this year",
             "i walked out", "warm and funny", "a mess"] * 5
LABELS = [1, 0, 1, 0, 1, 0] * 5
GPU = SimpleNamespace(tier="gpu", device=torch.device("cpu"))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hub that serves a small random GPT-2 and a vocabulary learned here."""
    learned = BPETokenizer.train(" ".join(SENTENCES) * 3, 300)
    table = byte_to_unicode()

    def spell(b):
        return "".join(table[x] for x in b)
    vocab = {spell(learned.token_bytes(i)): i for i in range(300)}
    vocab["<|endoftext|>"] = 300
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("\n".join(
        f"{spell(learned.vocab[a])} {spell(learned.vocab[b])}"
        for a, b in learned.merges))
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=301, n_positions=64, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=300, eos_token_id=300))
    monkeypatch.setattr(hf, "download", lambda name: model)
    monkeypatch.setattr(pretrained_module, "gpt2_tokenizer", lambda name:
                        load_gpt2_files(tmp_path / "vocab.json",
                                        tmp_path / "merges.txt"))
    return model, dict(name="tiny", n_layer=2, n_head=2, n_embd=32, vocab_size=301,
                       block_size=64)


def test_the_cpu_tier_keeps_its_small_model(capsys):
    assert pretrained(SimpleNamespace(tier="cpu"), None) is None
    assert "the small model above" in capsys.readouterr().out


def test_the_gpu_tier_loads_gpt2_into_llmcores_gpt(hub, capsys):
    reference, preset = hub
    model, tok = pretrained(GPU, preset)
    assert "released weights in llmcore's GPT" in capsys.readouterr().out
    idx = torch.tensor([tok.encode("a fine film<|endoftext|>")])
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], reference.eval()(idx).logits,
                                   atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="not the declared"):
        pretrained(GPU, dict(preset, n_layer=12))


def test_offline_the_gpu_tier_says_so_and_goes_on(monkeypatch, capsys):
    def offline(name):
        raise RuntimeError("could not load 'gpt2' ... needs a network connection")
    monkeypatch.setattr(hf, "download", offline)
    assert pretrained(GPU, dict(name="gpt2")) is None
    assert "cannot be had here" in capsys.readouterr().out


def test_classification_data_in_gpt2_tokens(hub):
    _, preset = hub
    _, tok = pretrained(GPU, preset)
    data = text_classification_data(SENTENCES, LABELS, vocab_size=280, max_len=8)
    data.examples["labelled"] = data.examples["train"][:5]
    data.texts["labelled"] = data.texts["train"][:5]
    mine = classification_data(data, tok, max_len=8)
    assert mine.examples.keys() == data.examples.keys()
    for split, rows in mine.examples.items():
        assert [r["label"] for r in rows] == [r["label"] for r in data.examples[split]]
        for row, text in zip(rows, data.texts[split]):
            assert row["input_ids"] == tok.encode(text)[:7] + [300]
    batch = mine.batches("test")[0]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 300).all()
