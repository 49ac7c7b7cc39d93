"""Distributed checkpoints: a run saved with one layout (dp 2: FSDP) resumes with
another (tp 2: tensor parallel) and continues exactly as the uninterrupted run.

Two processes each time, to keep the suite fast on two cores: every shard is read
into another one all the same (FSDP's row shards of a matrix into TP's row or column
blocks). A save on 4 processes resumed on 2 is tested through the command line, in
test_train_mesh.py."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from llmcore.models.gpt import GPT, GPTConfig
from book.workers.launch import launch
from llmcore.parallel import dcp
from llmcore.parallel.native import parallelize_gpt
from llmcore.train.step import clip_grad_norm

CFG = GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=4, n_embd=16)
X = torch.randint(32, (4, 8), generator=torch.Generator().manual_seed(1))
Y = torch.randint(32, (4, 8), generator=torch.Generator().manual_seed(2))


def run(rank, world_size, dp, tp, path, steps, save_at=None, resume=False):
    """Clipped AdamW steps on a (dp, tp) mesh; the mean loss of each step."""
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = parallelize_gpt(GPT(CFG), mesh, param_dtype=None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    start = dcp.load(path, model, opt) if resume else 0
    row, losses = mesh.get_local_rank("dp"), {}
    for step in range(start, steps):
        x, y = X.roll(step, 0).chunk(dp)[row], Y.roll(step, 0).chunk(dp)[row]
        loss = model(x, y)[1]
        loss.backward()
        clip_grad_norm(model.parameters(), 0.05)
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses[step] = mean.item() / world_size
        if step + 1 == save_at:
            dcp.save(path, model, opt, step + 1)
    return losses


@pytest.mark.distributed
def test_saved_as_fsdp_resumes_as_tensor_parallel(tmp_path):
    path = tmp_path / "ckpt"
    whole = launch(run, 2, 2, 1, path, 4, 2)[0]
    assert (path / ".metadata").exists()
    assert not list(tmp_path.glob("ckpt.*"))  # no temporary left behind
    resumed = launch(run, 2, 1, 2, path, 4, None, True)[0]
    assert sorted(resumed) == [2, 3]
    for step, loss in resumed.items():
        assert loss == pytest.approx(whole[step], abs=1e-5), (step, whole, resumed)


def test_load_names_a_wrong_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata"):
        dcp.load(tmp_path, None, None)
