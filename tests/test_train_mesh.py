"""``torchrun -m llmcore.train --dp N --tp M``: the GPT on a device mesh from the
command line, checkpointed in shards and resumed at another number of processes (CPU
processes, gloo)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from llmcore.parallel.launch import free_port
from llmcore.train import read_checkpoint
from llmcore.train.__main__ import main, parse_args


def torchrun(nproc: int, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
           str(nproc), "--master_port", str(free_port()), "-m", "llmcore.train",
           "--preset", "shakespeare-char", "--tier", "cpu", "--no-progress", *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.distributed
def test_mesh_run_resumes_on_fewer_processes(tmp_path):
    out = tmp_path / "mesh"
    first = torchrun(4, "--dp", "2", "--tp", "2", "--steps", "4", "--out", str(out))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "4 steps, final train loss" in first.stdout
    assert (out / "ckpt.dcp" / ".metadata").is_file()
    before = json.loads((out / "metrics.json").read_text())["history"]["loss"]
    # the whole model for single-process tools: fused qkv, full (V, C) embedding
    state = read_checkpoint(out / "ckpt.pt")["model"]
    assert state["tok_emb.weight"].shape == (65, 128)
    assert state["blocks.0.self_attn.qkv_proj.weight"].shape == (384, 128)
    assert all(type(t) is torch.Tensor for t in state.values())

    again = torchrun(2, "--dp", "2", "--tp", "1", "--steps", "6", "--out", str(out),
                     "--resume")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming" in again.stdout and "at step 4" in again.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    loss = metrics["history"]["loss"]
    assert len(loss) == 6 and loss[:4] == before  # continued, not restarted
    assert loss[4] < before[0] - 0.3  # from the trained weights, not fresh ones
    assert metrics["resumes"][0]["at_step"] == 4
    assert read_checkpoint(out / "ckpt.pt")["step"] == 6
    with pytest.raises(ValueError, match="final weights of a --dp/--tp run; resume "
                                         "it with --dp/--tp under torchrun"):
        main(["--preset", "shakespeare-char", "--tier", "cpu", "--steps", "8",
              "--no-progress", "--out", str(out), "--resume"])


@pytest.mark.distributed
def test_mesh_that_does_not_fit_the_processes_is_a_clear_error(tmp_path):
    result = torchrun(2, "--dp", "2", "--tp", "2", "--steps", "1", "--out",
                      str(tmp_path / "x"))
    assert result.returncode != 0
    assert "--dp 2 x --tp 2 = 4 processes, but torchrun started 2" in result.stderr


@pytest.mark.distributed
def test_mesh_resume_of_a_single_process_run_is_refused(tmp_path):
    out = tmp_path / "single"
    assert main(["--preset", "shakespeare-char", "--tier", "cpu", "--steps", "1",
                 "--no-progress", "--out", str(out)]) == 0
    result = torchrun(2, "--dp", "2", "--steps", "2", "--out", str(out), "--resume")
    assert result.returncode != 0
    assert "--resume with --dp/--tp continues the sharded checkpoint" in result.stderr
    assert read_checkpoint(out / "ckpt.pt")["step"] == 1  # the run is untouched


def test_mesh_flags_with_parallel_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--preset", "shakespeare-char", "--dp", "2", "--parallel", "ddp"])
    assert "--dp/--tp and --parallel exclude each other" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--preset", "shakespeare-char", "--tp", "0"])
    assert "must be positive" in capsys.readouterr().err


def test_mesh_without_torchrun_names_torchrun():
    with pytest.raises(ValueError, match="needs several processes; start the run "
                                         "with `torchrun --nproc_per_node 2"):
        main(["--preset", "shakespeare-char", "--tier", "cpu", "--steps", "1",
              "--tp", "2", "--no-progress", "--out", "/nonexistent/x"])
