"""Interrupted runs keep their work: SIGTERM (a scheduler, a Colab session ending) and
SIGINT (Ctrl-C) sent to ``python -m llmcore.train`` mid-run finish the step, save,
release the lock and end with one line and the shell's status for the signal; the
run then resumes exactly. An error inside the final evaluation keeps the final
checkpoint. Real processes receive real signals."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import llmcore.train.sharded as sharded
from book.workers.launch import free_port
from llmcore.train import read_checkpoint, train
from llmcore.train.loop import TrainConfig
from llmcore.train.outdir import LOCK
from tests.test_train import batch_fn, make_model

# The command line on a tiny preset and 20,000 characters of the corpus; every step
# prints its number and sleeps a little, so that the test can signal mid-run.
DRIVER = """
import sys, time
import numpy as np, torch
from llmcore.config import Tiered
from llmcore.data import load_corpus, split_tokens
from llmcore.tokenizer import CharTokenizer
from llmcore.train import TrainConfig
from llmcore.train import run as run_module
from llmcore.train.__main__ import main

TINY = run_module.RunPreset("shakespeare", n_layer=1, n_head=2, n_embd=16,
                            block_size=16, batch_size=4, train=TrainConfig(
                                max_steps=4, warmup_steps=0, eval_steps=2))
run_module.PRESETS["tiny"] = Tiered(cpu=TINY, gpu=TINY)
text = load_corpus("shakespeare")[:20_000]
tok = CharTokenizer.train(text)
ids = torch.from_numpy(np.array(tok.encode(text), dtype=np.int64))
data = run_module.RunData(tok, *split_tokens(ids, 0.1))
run_module.build_data = lambda preset, *args, **kwargs: data
pace = float(sys.argv[1])
real_train = run_module.train

def paced_train(*args, **kwargs):
    def on_step(done, *_):
        sys.stdout.write(f"step {done}\\n")  # one write: ranks share torchrun's pipe
        sys.stdout.flush()
        time.sleep(pace)
    return real_train(*args, on_step=on_step, **kwargs)

run_module.train = paced_train
sys.exit(main(["--preset", "tiny", "--tier", "cpu", "--no-progress", *sys.argv[2:]]))
"""


def start(tmp_path, *flags, pace=0.0, nproc=0):
    """The driver as a process; with ``nproc``, under torchrun with that many
    ranks, in a session of its own (so that the test can signal the whole job)."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
           str(nproc), "--master_port", str(free_port())] if nproc else [sys.executable]
    return subprocess.Popen([*run, str(script), str(pace), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=os.getcwd(), start_new_session=bool(nproc))


def wait_for_step(proc, step: int) -> None:
    """Read the driver's output until it reports ``step`` or a later one."""
    for line in proc.stdout:
        if any(int(n) >= step for n in re.findall(r"step (\d+)", line)):
            return
    raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()}")


def finish(proc) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The losses and final weights of the 30-step run, never stopped."""
    out = tmp_path_factory.mktemp("whole") / "run"
    code, _, err = finish(start(out.parent, "--steps", "30", "--out", str(out)))
    assert code == 0, err
    history = json.loads((out / "metrics.json").read_text())["history"]
    return history, read_checkpoint(out / "ckpt.pt")["model"]


def interrupt(tmp_path, out, sig, after: int, *flags) -> int:
    """Start the 30-step run (or resume it), signal it once it reports step
    ``after``; check how it ended and return the step it saved."""
    proc = start(tmp_path, "--steps", "30", "--out", str(out), *flags, pace=0.05)
    wait_for_step(proc, after)
    proc.send_signal(sig)
    code, _, err = finish(proc)
    assert code == 128 + sig, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    name = signal.Signals(sig).name
    assert lines[0].startswith(f"llmcore.train: stopped by {name} after step "), err
    stopped = int(lines[0].split("after step ")[1].split(";")[0])
    assert after <= stopped < 30
    assert f"checkpoint saved to {out / 'ckpt.pt'}" in lines[0]
    assert read_checkpoint(out / "ckpt.pt")["step"] == stopped
    assert not (out / LOCK).exists(), "the lock is released"
    assert not list(out.glob("*.tmp"))
    return stopped


@pytest.mark.slow
def test_signals_save_stop_with_one_line_and_the_run_resumes_exactly(tmp_path,
                                                                      uninterrupted):
    out = tmp_path / "run"
    first = interrupt(tmp_path, out, signal.SIGTERM, 3)
    second = interrupt(tmp_path, out, signal.SIGINT, first + 3, "--resume")
    code, stdout, err = finish(start(tmp_path, "--steps", "30", "--out", str(out),
                                     "--resume"))
    assert code == 0, err
    assert f"resuming {out / 'ckpt.pt'} at step {second}" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["at_step"] for r in metrics["resumes"]] == [first, second]
    whole, whole_weights = uninterrupted
    history = metrics["history"]
    assert history["loss"] == whole["loss"] and history["lr"] == whole["lr"]
    assert history["eval_loss"] == whole["eval_loss"]
    weights = read_checkpoint(out / "ckpt.pt")["model"]
    for name, t in whole_weights.items():
        assert torch.equal(weights[name], t), name


@pytest.mark.slow
def test_a_second_signal_stops_at_once_keeping_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    # no checkpoint yet; both signals arrive while step 1 is still running
    proc = start(tmp_path, "--steps", "30", "--out", str(out), pace=2.0)
    wait_for_step(proc, 1)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.2)  # a second signal well after the first: stop now
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    assert code == 128 + signal.SIGTERM, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "stopped at once by SIGTERM" in lines[0]
    assert not (out / "ckpt.pt").exists(), "stopped before its step ended"
    assert not (out / LOCK).exists()


class FailingEvaluation:
    """A validation batch_fn that raises on the evaluation at the last step."""

    def __init__(self, fail_at_call: int):
        self.calls, self.fail_at_call = 0, fail_at_call

    def __call__(self, step, generator):
        self.calls += 1
        if self.calls >= self.fail_at_call:
            raise OSError("the validation shard vanished")
        return batch_fn(step, generator)


def test_an_error_in_the_final_evaluation_keeps_the_final_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    cfg = TrainConfig(max_steps=6, warmup_steps=0, eval_interval=3, eval_steps=2,
                      progress=False)
    with pytest.raises(OSError, match="vanished"):
        # the evaluation at step 3 draws 2 batches; the final one fails at once
        train(make_model(), batch_fn, cfg, val_batch_fn=FailingEvaluation(3),
              ckpt_path=path)
    saved = read_checkpoint(path)
    assert saved["step"] == 6 and len(saved["extra"]["history"]["loss"]) == 6
    assert saved["extra"]["history"]["eval_step"] == [3]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_mesh_run_signalled_as_a_job_saves_its_shards_and_resumes_exactly(
        tmp_path):
    """SIGTERM to torchrun and its ranks at once, as a scheduler or a terminal sends
    it (torchrun then forwards it to the ranks a second time)."""
    flags = ("--steps", "24", "--dp", "2")
    whole = tmp_path / "whole"
    code, _, err = finish(start(tmp_path, *flags, "--out", str(whole), nproc=2))
    assert code == 0, err
    out = tmp_path / "run"
    proc = start(tmp_path, *flags, "--out", str(out), nproc=2, pace=0.1)
    wait_for_step(proc, 3)
    os.killpg(proc.pid, signal.SIGTERM)
    code, _, err = finish(proc)
    assert code != 0
    ours = [line for line in err.splitlines() if line.startswith("llmcore.train")]
    assert len(ours) == 1, err  # one line, from rank 0
    assert ours[0].startswith("llmcore.train: stopped by SIGTERM after step "), err
    stopped = int(ours[0].split("after step ")[1].split(";")[0])
    assert 3 <= stopped < 24
    assert sharded.read_checkpoint(out / "ckpt.dcp")["step"] == stopped
    assert not (out / LOCK).exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("ckpt")) == \
        ["ckpt.dcp"]
    code, _, err = finish(start(tmp_path, *flags, "--out", str(out), "--resume",
                                nproc=2))
    assert code == 0, err
    history = json.loads((out / "metrics.json").read_text())["history"]
    expected = json.loads((whole / "metrics.json").read_text())["history"]
    assert history["loss"] == expected["loss"]
    assert history["eval_loss"] == expected["eval_loss"]
    weights = read_checkpoint(out / "ckpt.pt")["model"]
    for name, t in read_checkpoint(whole / "ckpt.pt")["model"].items():
        assert torch.equal(weights[name], t), name
