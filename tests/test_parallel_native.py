"""PyTorch's engines: DDP, FSDP2 and DTensor TP alone and composed on a mesh give what
one device computes; a rank never lands on a GPU that is missing or taken."""

import copy
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from llmcore.models.gpt import GPT, GPTConfig
from book.workers.launch import launch
from llmcore.parallel import native
from llmcore.parallel.native import (full_state, init_distributed, parallelize_gpt,
                                     pick_device)
from book.workers.common import plain_config
from llmcore.train import train

CFG = GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=4, n_embd=16)
X = torch.randint(32, (4, 8), generator=torch.Generator().manual_seed(1))
Y = torch.randint(32, (4, 8), generator=torch.Generator().manual_seed(2))


def wrap(model, mode, world_size):
    """DDP, or llmcore's GPT on a (world, 1) mesh (FSDP2) or a (1, world) one (TP)."""
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    shape = (world_size, 1) if mode == "fsdp" else (1, world_size)
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "tp"))
    return parallelize_gpt(model, mesh, param_dtype=None)


def every_mode(rank, world_size):
    torch.manual_seed(0)
    ref = GPT(CFG)
    ref(X, Y)[1].backward()
    worst = {}
    for mode in ("ddp", "fsdp", "tp"):
        model = copy.deepcopy(ref)
        model.zero_grad(set_to_none=True)
        model = wrap(model, mode, world_size)
        if mode == "tp":  # tensor parallel ranks read the same batch
            x, y = X, Y
        else:
            x, y = X.chunk(world_size)[rank], Y.chunk(world_size)[rank]
        model(x, y)[1].backward()
        grads = full_state(model, grads=True)
        worst[mode] = max((grads[n] - p.grad).abs().max().item()
                          for n, p in ref.named_parameters())
    return worst


def test_single_process_without_torchrun():
    info = init_distributed()
    assert info.world_size == 1 and info.rank == 0 and info.is_main


@pytest.mark.distributed
def test_native_engines_match_one_device():
    for worst in launch(every_mode, 2):
        assert max(worst.values()) < 1e-5, worst


def test_ranks_get_their_own_existing_gpu_or_all_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device(1, 2)[:2] == (torch.device("cuda", 1), "nccl")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    device, backend, note = pick_device(1, 2)  # two ranks, one GPU
    assert (device, backend) == (torch.device("cpu"), "gloo") and "1 GPU" in note
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert pick_device(0, 2) == (torch.device("cpu"), "gloo", "")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ValueError, match="local_rank"):
        pick_device(2, 2)


def test_torchrun_with_two_ranks_on_one_visible_gpu(monkeypatch):
    """Rank 1 of ``torchrun --nproc_per_node 2`` on a one-GPU machine: no cuda:1."""
    calls = {}
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                       "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda d: calls.setdefault("set_device", d))
    monkeypatch.setattr(native.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(native.dist, "init_process_group",
                        lambda backend, **kw: calls.setdefault("backend", backend))
    info = init_distributed()
    assert info.device == torch.device("cpu") and "gloo" in info.note
    assert calls == {"backend": "gloo"}  # no GPU bound, gloo for every rank
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    calls.clear()
    info = init_distributed()
    assert info.device == torch.device("cuda", 1)
    assert calls == {"set_device": torch.device("cuda", 1), "backend": "nccl"}


def dp_tp_steps(rank, world_size, steps=4, max_norm=0.05):
    """Clipped AdamW steps of a (dp=2, tp=2) GPT through the book's loop, and of one
    process on the whole batch with PyTorch's own clipping."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    ref = GPT(CFG)
    model = parallelize_gpt(copy.deepcopy(ref), mesh, param_dtype=None)
    row = mesh.get_local_rank("dp")

    def batch(step, generator):  # this row's half of the step's batch
        return X.roll(step, 0).chunk(2)[row], Y.roll(step, 0).chunk(2)[row]

    cfg = replace(plain_config(steps), grad_clip=max_norm)
    history = train(model, batch, cfg, dp_group=mesh.get_group("dp"),
                    optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2,
                                                foreach=False))
    mean = torch.tensor(history.loss)
    dist.all_reduce(mean)  # over all 4 ranks: each dp row twice
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    ref_losses = []
    for step in range(steps):  # the reference: one process, torch's own clipping
        loss = ref(X.roll(step, 0), Y.roll(step, 0))[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        opt.step()
        opt.zero_grad()
        ref_losses.append(loss.item())
    state = full_state(model)
    gap = max((state[n] - p.detach()).abs().max().item()
              for n, p in ref.named_parameters())
    return {"losses": list(zip(ref_losses, (mean / world_size).tolist())),
            "weight_gap": gap}


@pytest.mark.distributed
def test_dp_x_tp_on_four_processes_matches_one_process():
    for r in launch(dp_tp_steps, 4):
        for ref_loss, loss in r["losses"]:
            assert loss == pytest.approx(ref_loss, abs=1e-5)
        assert r["weight_gap"] < 1e-5
    assert r["losses"][-1][0] < r["losses"][0][0]  # it trained


def mixed_and_checkpointed(rank, world_size):
    """FSDP2 with bf16 compute / fp32 reduction, and with checkpointing, against an
    fp32 FSDP2 run: the loss of one step and the dtype of the kept shards."""
    mesh = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("dp", "tp"))
    x, y = X.chunk(world_size)[rank], Y.chunk(world_size)[rank]
    out = {}
    for name, kw in (("fp32", dict(param_dtype=None)), ("bf16", {}),
                     ("ckpt", dict(param_dtype=None, checkpoint_every=1))):
        torch.manual_seed(0)
        model = parallelize_gpt(GPT(CFG), mesh, **kw)
        loss = model(x, y)[1]
        loss.backward()
        out[name] = (loss.item(), full_state(model, grads=True))
        out[name + "_dtype"] = model.tok_emb.weight.dtype
    return out


@pytest.mark.distributed
def test_mixed_precision_and_checkpointing_on_fsdp2():
    for r in launch(mixed_and_checkpointed, 2):
        (ref, ref_g), (bf16, bf16_g), (ckpt, ckpt_g) = r["fp32"], r["bf16"], r["ckpt"]
        assert r["bf16_dtype"] == torch.float32  # the sharded master stays fp32
        assert bf16 != ref and bf16 == pytest.approx(ref, abs=5e-2)  # bf16 compute
        assert all(bf16_g[n].dtype == torch.float32 for n in bf16_g)
        assert ckpt == ref  # recomputation changes nothing
        assert all(torch.equal(ckpt_g[n], ref_g[n]) for n in ref_g)
