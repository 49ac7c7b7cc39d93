"""apply_parallel: DDP, FSDP2 and DTensor TP give the gradients of one device."""

import copy

import pytest
import torch

from llmcore.models.gpt import GPT, GPTConfig
from llmcore.parallel import launch
from llmcore.parallel.native import apply_parallel, init_distributed

CFG = GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=4, n_embd=16)
X = torch.randint(32, (4, 8), generator=torch.Generator().manual_seed(1))
Y = torch.randint(32, (4, 8), generator=torch.Generator().manual_seed(2))


def every_mode(rank, world_size):
    torch.manual_seed(0)
    ref = GPT(CFG)
    _, loss = ref(X, Y)
    loss.backward()
    worst = {}
    for mode in ("ddp", "fsdp", "tp"):
        model = apply_parallel(_fresh(ref), mode, torch.device("cpu"))
        if mode == "tp":  # tensor parallel ranks read the same batch
            x, y = X, Y
        else:
            x, y = X.chunk(world_size)[rank], Y.chunk(world_size)[rank]
        _, l = model(x, y)
        l.backward()
        inner = model.module if mode == "ddp" else model
        diffs = []
        for (n, p), (_, q) in zip(inner.named_parameters(), ref.named_parameters()):
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            diffs.append((g - q.grad).abs().max().item())
        worst[mode] = max(diffs)
    return worst


def _fresh(ref):
    model = copy.deepcopy(ref)
    model.zero_grad(set_to_none=True)
    return model


def test_single_process_without_torchrun():
    info = init_distributed()
    assert info.world_size == 1 and info.rank == 0 and info.is_main


@pytest.mark.distributed
def test_native_engines_match_one_device():
    for worst in launch(every_mode, 2):
        assert max(worst.values()) < 1e-5, worst
