"""``torchrun -m llmcore.train --dp N --tp M``: the GPT on a device mesh from the
command line, checkpointed in shards and resumed at another number of processes (CPU
processes, gloo)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import llmcore.train.sharded as sharded
from llmcore.config import override
from llmcore.data import get_batch
from llmcore.models.gpt import GPT, GPTConfig
from book.workers.launch import free_port
from book.workers.launch import launch as spawn
from llmcore.parallel.native import DistInfo, full_state, parallelize_gpt
from llmcore.runtime import setup
from llmcore.train import TrainConfig, read_checkpoint, train
from llmcore.train import run as run_module
from llmcore.train.__main__ import main, parse_args
from llmcore.train.run import PRESETS, build_data, build_model


def torchrun(nproc: int, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
           str(nproc), "--master_port", str(free_port()), "-m", "llmcore.train",
           "--preset", "shakespeare-char", "--tier", "cpu", "--no-progress", *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def launch(out, nproc: int, *flags: str) -> tuple[dict, dict]:
    """Run the CLI on a mesh into ``out``; its metrics and whole final weights."""
    result = torchrun(nproc, "--out", str(out), *flags)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics, read_checkpoint(out / "ckpt.pt")["model"]


@pytest.fixture(scope="module")
def reference():
    """What the 6-step fp32 runs below compute, on one process: the same initial
    weights (seed 0), each step's global batch of 2 x 12 rows from
    ``global_batches``, the same schedule. Returns (losses, whole weights at the
    end, at step 5); the losses are those of the first 12 rows, which rank 0 of a
    mesh reports."""
    rt = setup(seed=0, tier="cpu")
    preset = rt.pick(PRESETS["shakespeare-char"])
    cfg = override(preset.train, max_steps=6, warmup_steps=0, progress=False)
    data = build_data(preset)
    model = build_model(preset, data.tokenizer.vocab_size)
    rows = preset.batch_size
    batches = sharded.global_batches(
        lambda g: get_batch(data.train, 2 * rows, preset.block_size, g), rt.seed, 0, 1)
    rank0 = []

    def loss_fn(model, batch):
        logits, loss = model(*batch)
        rank0.append(F.cross_entropy(logits[:rows].flatten(0, 1),
                                     batch[1][:rows].flatten()).item())
        return loss
    at_5 = {}

    def keep(done, *_):
        if done == 5:
            at_5.update({k: v.clone() for k, v in model.state_dict().items()})
    train(model, batches, cfg, loss_fn=loss_fn, on_step=keep)
    return rank0, model.state_dict(), at_5


def test_global_batches_are_a_function_of_seed_and_step():
    data = torch.arange(1000)

    def sample(g):
        return get_batch(data, 8, 5, g)
    whole, g = sharded.global_batches(sample, 3, 0, 1), torch.Generator()
    first, second = whole(4, g), whole(4, g)  # two micro-batches of step 4
    assert not torch.equal(first[0], second[0])
    assert not torch.equal(whole(5, g)[0], first[0])
    assert torch.equal(whole(4, g)[0], first[0])  # after other steps: the same
    other = sharded.global_batches(sample, 4, 0, 1)(4, torch.Generator())
    assert not torch.equal(other[0], first[0])  # another seed, other batches
    for rank in (0, 1):  # each data-parallel rank takes its rows of the global batch
        half, h = sharded.global_batches(sample, 3, rank, 2), torch.Generator()
        rows = slice(4 * rank, 4 * rank + 4)
        for micro in (first, second):
            x, y = half(4, h)
            assert torch.equal(x, micro[0][rows]) and torch.equal(y, micro[1][rows])
    with pytest.raises(ValueError, match="dp_rank must lie in"):
        sharded.global_batches(sample, 0, 2, 2)
    with pytest.raises(ValueError, match="cannot share evenly"):
        sharded.global_batches(sample, 0, 0, 3)(0, g)


@pytest.mark.distributed
def test_mesh_run_resumes_on_fewer_processes(tmp_path, reference):
    out = tmp_path / "mesh"
    result = torchrun(4, "--dp", "2", "--tp", "2", "--steps", "6", "--stop-at", "3",
                      "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 steps, final train loss" in result.stdout
    assert (out / "ckpt.dcp" / ".metadata").is_file()
    before = json.loads((out / "metrics.json").read_text())["history"]["loss"]
    # the whole model for single-process tools: fused qkv, full (V, C) embedding
    state = read_checkpoint(out / "ckpt.pt")["model"]
    assert state["tok_emb.weight"].shape == (65, 128)
    assert state["blocks.0.self_attn.qkv_proj.weight"].shape == (384, 128)
    assert all(type(t) is torch.Tensor for t in state.values())

    metrics, state = launch(out, 2, "--dp", "2", "--tp", "1", "--steps", "6",
                            "--stop-at", "5", "--resume")
    loss = metrics["history"]["loss"]
    assert len(loss) == 5 and loss[:3] == before  # continued, not restarted
    assert metrics["resumes"][0]["at_step"] == 3
    assert any("mesh" in c for c in metrics["resumes"][0]["changes"])
    assert read_checkpoint(out / "ckpt.pt")["step"] == 5
    # Only the tensor-parallel degree changed: the same global batches, so the run
    # is one device's on them, up to fp32 rounding of the other reductions. Fresh
    # batches (or fresh weights) after the resume would be off by far more.
    ref_loss, _, ref_state = reference
    assert loss == pytest.approx(ref_loss[:5], rel=1e-4)
    for name, t in state.items():
        torch.testing.assert_close(t, ref_state[name], rtol=1e-3, atol=1e-4)
    # and the last step on one process, without torchrun: a group of one, sharded
    # all the same. Its global batch is one row's 12 rows, the 12 that rank 0 drew
    # before: the same loss at the same weights.
    assert main(["--preset", "shakespeare-char", "--tier", "cpu", "--steps", "6",
                 "--no-progress", "--out", str(out), "--dp", "1", "--tp", "1",
                 "--resume"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["history"]["loss"][:5] == loss
    assert metrics["history"]["loss"][5] == pytest.approx(ref_loss[5], rel=1e-4)
    assert [r["at_step"] for r in metrics["resumes"]] == [3, 5]
    assert sharded.read_checkpoint(out / "ckpt.dcp")["step"] == 6
    with pytest.raises(ValueError, match="final weights of a --dp/--tp run; resume "
                                         "it with --dp/--tp under torchrun"):
        main(["--preset", "shakespeare-char", "--tier", "cpu", "--steps", "8",
              "--no-progress", "--out", str(out), "--resume"])


@pytest.mark.distributed
def test_bf16_mesh_run_resumes_bit_for_bit(tmp_path, reference):
    flags = ("--dp", "2", "--tp", "1", "--steps", "6", "--precision", "bf16")
    whole, whole_state = launch(tmp_path / "whole", 2, *flags)
    part = tmp_path / "part"
    launch(part, 2, *flags, "--stop-at", "3")
    metrics, state = launch(part, 2, *flags, "--resume")
    loss = whole["history"]["loss"]
    assert all(math.isfinite(v) for v in loss) and loss[-1] < loss[0] - 0.3
    # bf16 ran (FSDP2 casts the weights it gathers): not the fp32 run's losses
    assert loss != reference[0] and loss == pytest.approx(reference[0], abs=0.1)
    # stopped at 3 and resumed: the uninterrupted run's losses and weights, exactly
    assert metrics["resumes"][0]["at_step"] == 3
    assert metrics["history"]["loss"] == loss
    assert state.keys() == whole_state.keys()
    for name, t in whole_state.items():
        assert t.dtype == torch.float32 and torch.equal(state[name], t), name


def test_mesh_that_does_not_fit_the_processes_is_a_clear_error(monkeypatch):
    # what torchrun's two processes would each see; the check comes before any
    # process group or mesh is made, so no processes need starting to reach it
    two = DistInfo(0, 2, 0, torch.device("cpu"))
    monkeypatch.setattr(run_module, "init_distributed", lambda: two)
    with pytest.raises(ValueError, match=r"--dp 2 x --tp 2 = 4 processes, but "
                                         r"torchrun started 2: .*--nproc_per_node 4"):
        run_module.prepare_mesh(torch.nn.Linear(2, 2), 2, 2)


def test_mesh_resume_of_a_single_process_run_is_refused(tmp_path):
    out = tmp_path / "single"
    flags = ["--preset", "shakespeare-char", "--tier", "cpu", "--no-progress", "--out",
             str(out)]
    assert main([*flags, "--steps", "1"]) == 0
    # refused before any process group is joined, so one process shows what each
    # rank of `torchrun --nproc_per_node 2 ... --dp 2 --resume` does
    with pytest.raises(FileNotFoundError, match="--resume with --dp/--tp continues "
                                                "the sharded checkpoint"):
        main([*flags, "--dp", "2", "--steps", "2", "--resume"])
    assert read_checkpoint(out / "ckpt.pt")["step"] == 1  # the run is untouched


def test_one_way_to_parallelise_and_bad_degrees_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--preset", "shakespeare-char", "--dp", "2", "--parallel", "ddp"])
    assert "unrecognized arguments: --parallel" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--preset", "shakespeare-char", "--tp", "0"])
    assert "--tp: must be a whole number >= 1, got '0'" in capsys.readouterr().err


def test_mesh_without_torchrun_names_torchrun():
    with pytest.raises(ValueError, match="needs several processes; start the run "
                                         "with `torchrun --nproc_per_node 2"):
        main(["--preset", "shakespeare-char", "--tier", "cpu", "--steps", "1",
              "--tp", "2", "--no-progress", "--out", "/nonexistent/x"])


# Every layout resumes every other: one launch of 4 processes trains a step or two
# on each of its layouts, each continuing the checkpoint the last one wrote; one
# launch of 2 processes goes on from there on its layouts (the crash this guards
# against: a run saved with FSDP resumed tensor parallel). One process continues a
# 2-process run through the command line above
# (test_mesh_run_resumes_on_fewer_processes).
SMALL = GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=4, n_embd=16)
TOKENS = torch.randint(32, (2000,), generator=torch.Generator().manual_seed(3))
LAYOUTS = {4: [(2, 2, 2), (4, 1, 3), (1, 4, 4)], 2: [(2, 1, 5), (1, 2, 6)]}
STEPS = TrainConfig(max_steps=6, lr=1e-2, warmup_steps=2, progress=False,
                    log_interval=1)


def sample(g):
    return get_batch(TOKENS, 4, 8, g)  # the global batch: 4 rows on any layout


def train_layouts(rank, world_size, path, layouts):
    """(dp, tp, stop_at) in turn on the same processes, each resuming ``path``;
    the whole weights at the end and the steps each layout ran."""
    from torch.distributed.device_mesh import init_device_mesh

    ran = []
    for dp, tp, stop in layouts:
        mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
        torch.manual_seed(0)
        model = parallelize_gpt(GPT(SMALL), mesh, param_dtype=None)
        dp_rank = mesh["dp"].get_local_rank()
        batches = sharded.global_batches(sample, 0, dp_rank, dp)
        history = train(model, batches, STEPS, ckpt_path=path, resume=True,
                        stop_at=stop, dp_group=mesh["dp"].get_group() if dp > 1
                        else None)
        ran.append(history.step[-1] + 1)
    return {k: v.clone() for k, v in full_state(model).items()}, ran


@pytest.mark.distributed
@pytest.mark.slow
def test_every_layout_resumes_every_other(tmp_path):
    torch.manual_seed(0)
    model, reference = GPT(SMALL), {}

    def keep(done, *_):
        if done in (4, 6):
            reference[done] = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, sharded.global_batches(sample, 0, 0, 1), STEPS, on_step=keep)
    path = tmp_path / "ckpt.dcp"
    for world, layouts in LAYOUTS.items():
        state, ran = spawn(train_layouts, world, path, layouts)[0]
        assert ran == [stop for *_, stop in layouts]
        for name, t in state.items():  # every hop continued the same run
            torch.testing.assert_close(t, reference[ran[-1]][name], rtol=1e-3,
                                       atol=1e-4, msg=name)
