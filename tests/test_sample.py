"""``python -m llmcore.sample`` and ``llmcore.sample.sample``: loading a run
(weights_only), reproducible text through the KV cache, prompts from a file or
standard input, and clear errors for folders that hold no run."""

import io
import json

import pytest
import torch

from llmcore.data import load_corpus
from llmcore.generate import generate
from llmcore.sample import RunError, load_run, main, sample
from llmcore.train.__main__ import main as train_main

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
        "--batch-size", "4", "--no-progress", "--tier", "cpu", "--steps", "30"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    (root / "mine.txt").write_text(load_corpus("shakespeare")[:8000].lower(),
                                   encoding="utf-8")
    assert train_main(["--data", str(root / "mine.txt"), "--tokenizer", "bpe",
                       "--vocab-size", "300", "--out", str(root / "run"), *TINY]) == 0
    return root / "run"


def test_a_run_loads_as_it_was_trained(run_dir):
    run = load_run(run_dir)
    assert run.step == 30 and not run.model.training
    assert run.model.config.n_embd == 16 and run.tokenizer.vocab_size == 300
    saved = torch.load(run_dir / "ckpt.pt", weights_only=True)["model"]
    for name, t in run.model.state_dict().items():
        assert torch.equal(t, saved[name]), name


def test_the_same_seed_gives_the_same_text_drawn_through_the_kv_cache(run_dir):
    run = load_run(run_dir)
    a = sample(run, "the king", max_new_tokens=30, seed=3, top_k=20, top_p=0.9)
    assert a == sample(run_dir, "the king", max_new_tokens=30, seed=3, top_k=20,
                       top_p=0.9, device="cpu")
    assert a != sample(run, "the king", max_new_tokens=30, seed=4, top_k=20,
                       top_p=0.9)
    assert a[0].startswith("the king")
    # The text is the model's: the same draws without the cache give the same ids.
    ids = torch.tensor([run.tokenizer.encode("the king")])
    plain = generate(run.model, ids, 30, temperature=0.8, top_k=20, top_p=0.9,
                     use_cache=False, generator=torch.Generator().manual_seed(3))
    assert a == ["the king" + run.tokenizer.decode(plain[0, ids.shape[1]:].tolist())]


def test_several_samples_and_a_prompt_longer_than_the_context(run_dir):
    run = load_run(run_dir)
    texts = sample(run, "the", max_new_tokens=20, num_samples=3, seed=0)
    assert len(texts) == 3 and len(set(texts)) > 1
    assert all(t.startswith("the") for t in texts)
    long = "to be or not to be, that is the question " * 3  # > 16 tokens
    out = sample(run, long, max_new_tokens=5, temperature=0)
    assert out[0].startswith(long) and len(out[0]) > len(long)
    with pytest.raises(ValueError, match="prompt is empty"):
        sample(run, "")


def test_the_command_reads_a_prompt_from_a_file_or_standard_input(run_dir, tmp_path,
                                                                   monkeypatch, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("my lord,", encoding="utf-8")
    assert main([str(run_dir), "--prompt-file", str(prompt), "--seed", "5",
                 "--max-new-tokens", "25"]) == 0
    from_file = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("my lord,"))
    assert main([str(run_dir), "--prompt", "-", "--seed", "5",
                 "--max-new-tokens", "25"]) == 0
    assert capsys.readouterr().out == from_file
    assert from_file.startswith("my lord,")
    assert from_file.rstrip("\n") == sample(run_dir, "my lord,", max_new_tokens=25,
                                            seed=5)[0]
    assert main([str(run_dir), "--prompt", "a", "--num-samples", "2",
                 "--max-new-tokens", "5"]) == 0
    assert "-" * 40 in capsys.readouterr().out


def test_folders_without_a_run_are_clear_errors(run_dir, tmp_path, capsys):
    with pytest.raises(RunError, match="no such folder"):
        load_run(tmp_path / "missing")
    with pytest.raises(RunError, match="has no ckpt.pt or tokenizer.json"):
        load_run(tmp_path)
    (tmp_path / "tokenizer.json").write_text(
        (run_dir / "tokenizer.json").read_text())
    torch.save({"model": object()}, tmp_path / "ckpt.pt")  # needs pickle to load
    with pytest.raises(RunError, match="not the checkpoint of an llmcore GPT run"):
        load_run(tmp_path)
    (tmp_path / "ckpt.pt").write_bytes((run_dir / "ckpt.pt").read_bytes())
    (tmp_path / "tokenizer.json").write_text(json.dumps({"type": "sentencepiece"}))
    with pytest.raises(RunError, match="type 'sentencepiece'"):
        load_run(tmp_path)
    assert main([str(tmp_path / "missing"), "--prompt", "x"]) == 1
    assert "no such folder" in capsys.readouterr().err
    assert main([str(run_dir), "--prompt", "x", "--device", "nonsense"]) == 1
    with pytest.raises(SystemExit):
        main([str(run_dir), "--prompt", "x", "--top-k", "0"])
    assert "--top-k: must be a whole number >= 1" in capsys.readouterr().err
