"""``python -m llmcore.train``: the output folder (refuse, --resume, --overwrite, lock,
bad folders), resuming with changed flags, metrics.json, argument errors."""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from llmcore.config import Tiered
from llmcore.data import load_corpus, split_tokens
from llmcore.tokenizer import CharTokenizer
from llmcore.train import TrainConfig, read_checkpoint
from llmcore.train import run as run_module
from llmcore.train.__main__ import main
from llmcore.train.outdir import LOCK

TINY = run_module.RunPreset("shakespeare", n_layer=1, n_head=2, n_embd=16,
                            block_size=16, batch_size=4, train=TrainConfig(
                                max_steps=4, warmup_steps=0, eval_steps=2))


@pytest.fixture(scope="module")
def small_data():
    text = load_corpus("shakespeare")[:20_000]
    tok = CharTokenizer.train(text)
    ids = torch.from_numpy(np.array(tok.encode(text), dtype=np.int64))
    return run_module.RunData(tok, *split_tokens(ids, 0.1))


@pytest.fixture(autouse=True)
def tiny(monkeypatch, small_data):
    monkeypatch.setitem(run_module.PRESETS, "tiny", Tiered(cpu=TINY, gpu=TINY))
    monkeypatch.setattr(run_module, "build_data", lambda preset, *_, **__: small_data)


def cli(out, *extra):
    return main(["--preset", "tiny", "--tier", "cpu", "--out", str(out),
                 "--no-progress", *extra])


def test_an_existing_run_is_refused_without_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    assert cli(out) == 0
    before = (out / "ckpt.pt").read_bytes()
    with pytest.raises(FileExistsError, match=rf"(?s){out}.*--resume.*--overwrite"):
        cli(out)
    assert (out / "ckpt.pt").read_bytes() == before  # the finished run is intact
    assert cli(out, "--overwrite", "--seed", "1") == 0
    assert read_checkpoint(out / "ckpt.pt")["extra"]["meta"]["seed"] == 1
    assert not (out / LOCK).exists()  # released at the end


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        cli(tmp_path / "empty", "--resume")


def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(tmp_path,
                                                                         capsys):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(f"{sleeper.pid} {os.uname().nodename}\n")
        with pytest.raises(RuntimeError, match=f"another run \\(pid {sleeper.pid}"):
            cli(out)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not (out / "ckpt.pt").exists()
    assert cli(out) == 0  # the same pid is dead now: its lock is stale
    assert f"stale lock {out / LOCK} of pid {sleeper.pid}" in capsys.readouterr().err


def test_bad_out_fails_before_training(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")
    monkeypatch.setattr(run_module, "train", no_training)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        cli(a_file)
    with pytest.raises(PermissionError, match="not a writable folder"):
        cli(a_file / "below")
    if os.geteuid() != 0:  # root writes into read-only folders
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        with pytest.raises(PermissionError, match="not a writable folder"):
            cli(ro)


def test_resume_compares_the_request_with_the_saved_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(out) == 0
    with pytest.raises(ValueError, match="(?s)precision: 'fp32' in the checkpoint, "
                                         "'fp16' requested.*--precision"):
        cli(out, "--resume", "--precision", "fp16")
    with pytest.raises(ValueError, match="seed: 0 in the checkpoint, 3 requested"):
        cli(out, "--resume", "--seed", "3")
    capsys.readouterr()
    assert cli(out, "--resume", "--steps", "7") == 0
    assert "max_steps: 4 -> 7" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["history"]["step"] == list(range(7))
    assert metrics["preset"]["train"]["max_steps"] == 7
    (resumed,) = metrics["resumes"]
    assert resumed["at_step"] == 4
    assert "preset.train.max_steps: 4 -> 7" in resumed["changes"]
    lr = metrics["history"]["lr"]
    assert lr[4] <= lr[3] and all(a >= b for a, b in zip(lr, lr[1:]))


def test_files_have_ordinary_modes_and_no_temporaries_stay(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt.x1y2.tmp").write_bytes(b"left by a killed save")
    assert cli(out) == 0
    plain = tmp_path / "plain"
    plain.write_text("x")
    mode = stat.S_IMODE(plain.stat().st_mode)
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "metrics.json",
                                                     "tokenizer.json"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {mode}


def test_a_weights_only_checkpoint_cannot_be_resumed_and_says_why(tmp_path):
    out = tmp_path / "run"
    assert cli(out) == 0
    payload = read_checkpoint(out / "ckpt.pt")
    vocab = payload["model"]["tok_emb.weight"].shape[0]
    model = run_module.build_model(TINY, vocab)
    model.load_state_dict(payload["model"])
    run_module.save_checkpoint(out / "ckpt.pt", model, step=4, extra={
        "meta": payload["extra"]["meta"], "config": payload["extra"]["config"]})
    with pytest.raises(ValueError, match="final weights only, no optimizer state.*"
                                         "--overwrite"):
        cli(out, "--resume")


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--steps", "2.5"),
                                         ("--steps", "-3"), ("--lr", "nan"),
                                         ("--lr", "-1"), ("--lr", "fast"),
                                         ("--seed", "-1"), ("--seed", str(2**64)),
                                         ("--seed", "1e3")])
def test_bad_numbers_are_argument_errors(tmp_path, flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(tmp_path / "run", flag, value)
    assert exit_.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(tmp_path / "run", "--resume", "--overwrite")
    assert "not allowed with argument" in capsys.readouterr().err


def test_the_summary_of_a_run_stopped_before_validation_prints_no_nan(tmp_path,
                                                                     capsys):
    assert cli(tmp_path / "run", "--steps", "4", "--stop-at", "2") == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("2 steps, final train loss ") and "no validation yet" in last
    assert "nan" not in last
