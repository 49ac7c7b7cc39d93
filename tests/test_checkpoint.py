"""Checkpoints: exact resume, atomic writes, weights_only loading, clear errors."""

import errno
import random
import stat

import numpy as np
import pytest
import torch

from llmcore.data.lm import get_batch
from llmcore.io import atomic_write
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.train import (CheckpointError, TrainConfig, load_checkpoint,
                           read_checkpoint, save_checkpoint, train)
from llmcore.train.checkpoint import rng_state, set_rng_state

# Dropout > 0: the resumed run must also restore torch's global RNG to match.
CFG = GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16,
                dropout=0.1)
DATA = torch.randint(32, (3000,), generator=torch.Generator().manual_seed(0))


def batch_fn(step, generator):
    x, y = get_batch(DATA, 4, 8, generator)
    # Python's and NumPy's RNGs take part too: they are restored as well.
    shift = random.randrange(2) + int(np.random.randint(2))
    return x, (y + shift) % 32


def fresh(seed=0):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    return GPT(CFG)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_reproduces_uninterrupted_run(tmp_path, precision):
    cfg = TrainConfig(max_steps=12, lr=3e-3, warmup_steps=3, eval_interval=4,
                      precision=precision, progress=False)
    whole = train(fresh(), batch_fn, cfg, val_batch_fn=batch_fn,
                  generator=torch.Generator().manual_seed(1))
    path = tmp_path / "run.pt"
    first = train(fresh(), batch_fn, cfg, val_batch_fn=batch_fn, ckpt_path=path,
                  generator=torch.Generator().manual_seed(1), stop_at=5)
    assert len(first.loss) == 5
    torch.manual_seed(123)  # disturb every RNG: the checkpoint must restore them
    random.seed(123)
    np.random.seed(123)
    resumed = train(fresh(seed=7), batch_fn, cfg, val_batch_fn=batch_fn,
                    ckpt_path=path, resume=True,
                    generator=torch.Generator().manual_seed(99))
    assert resumed.step == list(range(12))
    assert resumed.loss == whole.loss  # exactly, not approximately
    assert resumed.grad_norm == whole.grad_norm
    assert resumed.lr == whole.lr
    assert resumed.eval_loss == whole.eval_loss
    assert read_checkpoint(path)["step"] == 12


def test_file_is_plain_and_atomic(tmp_path):
    m = fresh()
    opt = torch.optim.AdamW(m.parameters())
    path = save_checkpoint(tmp_path / "a" / "c.pt", m, optimizer=opt, step=3,
                           generator=torch.Generator(), extra={"note": "x"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.pt"]  # no temp left
    payload = torch.load(path, weights_only=True)
    assert payload["step"] == 3 and payload["extra"] == {"note": "x"}
    m2 = GPT(CFG)
    load_checkpoint(path, m2, optimizer=torch.optim.AdamW(m2.parameters()))
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    m = fresh()
    path = save_checkpoint(tmp_path / "c.pt", m, step=1)

    def boom(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, m, step=2)
    monkeypatch.undo()
    assert read_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_rng_round_trip():
    g = torch.Generator().manual_seed(5)
    state = rng_state(g)
    draws = (random.random(), np.random.rand(), torch.rand(1).item(),
             torch.rand(1, generator=g).item())
    set_rng_state(state, g)
    assert draws == (random.random(), np.random.rand(), torch.rand(1).item(),
                     torch.rand(1, generator=g).item())


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("content", [b"not a checkpoint at all",
                                     "torch-dict", "pickle-object"])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content == "torch-dict":
        torch.save({"weights": torch.zeros(2)}, path)
    elif content == "pickle-object":
        torch.save({"x": Evil()}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not an llmcore checkpoint"):
        load_checkpoint(path, fresh())


def test_wrong_model_and_missing_file(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", fresh())
    other = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16))
    with pytest.raises(CheckpointError, match="different model"):
        load_checkpoint(path, other)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="optimizer"):
        sgd = torch.optim.SGD(fresh().parameters(), 1.0)
        load_checkpoint(path, fresh(), optimizer=sgd)


def test_checkpoint_has_the_mode_of_an_ordinary_file(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")  # what open() gives under this umask (e.g. 0644)
    path = save_checkpoint(tmp_path / "c.pt", fresh())
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    with atomic_write(tmp_path / "t.json", "w") as f:
        f.write("{}")
    assert stat.S_IMODE((tmp_path / "t.json").stat().st_mode) == stat.S_IMODE(
        plain.stat().st_mode)


def test_a_flipped_bit_is_detected(tmp_path):
    m = fresh()
    path = save_checkpoint(tmp_path / "c.pt", m, step=1)
    data = bytearray(path.read_bytes())
    weight = m.state_dict()["lm_head.weight"].numpy().tobytes()
    at = data.find(weight[:64])
    assert at > 0
    data[at + 10] ^= 0x04  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path, fresh())


def test_a_truncated_checkpoint_says_so(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", fresh(), step=1)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"c\.pt is truncated \("):
        read_checkpoint(path)


def test_disk_full_names_the_cause_and_keeps_the_old_file(tmp_path, monkeypatch):
    m = fresh()
    path = save_checkpoint(tmp_path / "c.pt", m, step=1)

    def full(*args, **kwargs):  # what torch.save raises when a write fails
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="no space left on device"):
        save_checkpoint(path, m, step=2)
    monkeypatch.undo()
    assert read_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_temporary_files_of_a_crashed_save_are_cleaned(tmp_path):
    stale = tmp_path / "c.pt.abc123.tmp"  # what SIGKILL during a save leaves behind
    stale.write_bytes(b"half a checkpoint")
    save_checkpoint(tmp_path / "c.pt", fresh())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_non_finite_weights_are_never_saved(tmp_path):
    m = fresh()
    path = save_checkpoint(tmp_path / "c.pt", m, step=1)
    with torch.no_grad():
        next(m.parameters())[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        save_checkpoint(path, m, step=2)
    assert read_checkpoint(path)["step"] == 1
