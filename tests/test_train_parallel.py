"""``accelerate launch -m llmcore.train --dp 2``, and data-parallel ranks through the
book's loop, on two CPU processes."""

import json
import os
import subprocess
import sys

import pytest
import torch

from book.workers.launch import free_port
from llmcore.train import read_checkpoint

LAUNCHERS = {
    # `accelerate launch --cpu` would start ONE process; this is how to get two on CPU.
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                   "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                   "no", "--dynamo_backend", "no"],
}


@pytest.mark.distributed
def test_accelerate_launch_runs_the_mesh_and_writes_a_whole_model(tmp_path):
    """The same command under `accelerate launch`, which sets torchrun's variables:
    two FSDP2 ranks (--dp 2), and at the end the whole model, not one rank's shard."""
    out = tmp_path / "dp"
    cmd = LAUNCHERS["accelerate"] + [
        "--main_process_port", str(free_port()), "-m", "llmcore.train", "--preset",
        "shakespeare-char", "--tier", "cpu", "--steps", "4", "--dp", "2", "--out",
        str(out), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 steps, final train loss" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]["loss"]) == 4 and metrics["sample"]
    state = read_checkpoint(out / "ckpt.pt")["model"]
    # the whole model, not one rank's shard: full (V, C) embedding, plain tensors
    assert state["tok_emb.weight"].shape == (65, 128)
    assert all(type(t) is torch.Tensor for t in state.values())


def masked_batch():
    """Eight rows whose first half keeps one target per row, the second half all 8."""
    from llmcore.config import IGNORE_INDEX
    from llmcore.data.lm import get_batch

    data = torch.arange(4000) % 16
    x, y = get_batch(data, 8, 8, torch.Generator().manual_seed(0))
    y = y.clone()
    y[:4, 1:] = IGNORE_INDEX
    return x, y


def tiny_gpt():
    from llmcore.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16))


def ddp_half_batches(rank, world_size):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from llmcore.train import TrainConfig, train
    x, y = masked_batch()
    half = (x[4 * rank:4 * rank + 4], y[4 * rank:4 * rank + 4])
    model = DistributedDataParallel(tiny_gpt())
    train(model, lambda s, g: half, TrainConfig(max_steps=3, warmup_steps=0,
                                                progress=False),
          dp_group=dist.group.WORLD)
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


@pytest.mark.distributed
def test_data_parallel_ranks_weigh_gradients_by_global_valid_tokens():
    from book.workers.launch import launch
    from llmcore.train import TrainConfig, train

    states = launch(ddp_half_batches, 2, backend="gloo", threads=1)
    whole = tiny_gpt()
    batch = masked_batch()
    train(whole, lambda s, g: batch, TrainConfig(max_steps=3, warmup_steps=0,
                                                 progress=False))
    for name, ref in whole.state_dict().items():
        torch.testing.assert_close(states[0][name], ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(states[1][name], ref, atol=1e-5, rtol=1e-4)
