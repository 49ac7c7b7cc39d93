"""Compression hooks: exact where they should be, close where they round, same bytes
as counted, and PowerSGD identical to torch's powerSGD_hook."""

import functools

import pytest
import torch
from parallel_fixtures import TinyLM, random_batches

from book.workers.common import max_abs_diff, train_single
from book.workers.data import train_worker
from book.workers.launch import launch
from llmcore.parallel.compression import make_hook, orthogonalize
from llmcore.parallel.quantized_comm import quantized_payload

pytestmark = pytest.mark.distributed

MODEL = functools.partial(TinyLM, vocab_size=32, n_embd=16, hidden=32)
DATA = random_batches(steps=4, batch=8, seq=6, vocab=32)
N_PARAMS = sum(p.numel() for p in MODEL().parameters())
PSGD = dict(matrix_approximation_rank=2, start_powerSGD_iter=2, random_seed=7)


def every_hook(rank, world_size):
    run = functools.partial(train_worker, rank, world_size, MODEL, data=DATA)
    return {
        "fp16": run("bucketed", hook="fp16"),
        "fp16_ddp": run("ddp", hook="fp16"),
        "bf16": run("bucketed", hook="bf16"),
        "int8": run("bucketed", hook="int8"),
        "quantized": run("bucketed", hook="quantized"),
        "quantized_fp8_ddp": run("ddp", hook="quantized", fmt="e4m3", block=32),
        "topk_all": run("bucketed", hook="topk", ratio=1.0),
        "topk": run("ddp", hook="topk", ratio=0.1),
        "psgd_full": run("bucketed", hook="powersgd", matrix_approximation_rank=64,
                         min_compression_rate=0.0),
        "psgd": run("ddp", hook="powersgd", **PSGD),
        "psgd_ours_bucketed": run("bucketed", hook="powersgd", **PSGD),
        "psgd_torch": run("ddp", hook="torch_powersgd", **PSGD),
    }


def test_make_hook_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown compression"):
        make_hook("zip")


def test_orthogonalize_gives_orthonormal_columns():
    m = orthogonalize(torch.randn(10, 3, dtype=torch.float64))
    assert torch.allclose(m.T @ m, torch.eye(3, dtype=torch.float64), atol=1e-12)


def test_hooks_under_ddp_and_bucketed():
    ref = train_single(MODEL, DATA)
    r0, r1 = launch(every_hook, 2)
    diff = {k: max_abs_diff(v["state"], ref["state"]) for k, v in r0.items()}
    assert diff["topk_all"] < 1e-5 and diff["psgd_full"] < 1e-4  # lossless settings
    assert diff["fp16"] < 1e-3 and diff["bf16"] < 1e-2 and diff["int8"] < 2e-2
    assert 0 < diff["quantized"] < 2e-2 and 0 < diff["quantized_fp8_ddp"] < 5e-2
    assert 1e-4 < diff["topk"] and 1e-4 < diff["psgd"]  # these really compress
    # bytes per step: casting halves, int8 quarters (+ a scale), top-k 10 % x (4 + 4)
    full = 4 * N_PARAMS * len(DATA[0])
    assert r0["fp16"]["bytes_sent"] == full // 2
    assert r0["int8"]["bytes_sent"] == full // 4 + 4 * len(DATA[0])
    assert r0["topk"]["bytes_sent"] <= 0.2 * full
    # the 8-bit all-reduce: reduce-scatter and all-gather one chunk of N_PARAMS / 2
    # values, a byte each and a 4-byte scale per 128 (one bucket per step)
    per = quantized_payload(N_PARAMS // 2, 2)
    assert r0["quantized"]["bytes_sent"] == len(DATA[0]) * (per["all_to_all"]
                                                            + per["all_gather"])
    # PowerSGD: ours equals torch's, under DDP and under our wrapper
    assert max_abs_diff(r0["psgd"]["state"], r0["psgd_torch"]["state"]) < 1e-5
    assert max_abs_diff(r0["psgd_ours_bucketed"]["state"], r0["psgd"]["state"]) < 1e-5
    for k in r0:  # replicas identical even when lossy
        assert max_abs_diff(r0[k]["state"], r1[k]["state"]) == 0.0, k


# ------------------------------------------------- top-k when DDP regroups its buckets

def topk_reference(ratio, world_size, lr=0.1):
    """Top-k with error feedback per rank and per gradient, on one process."""
    torch.manual_seed(0)
    model = MODEL()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    params = list(model.parameters())
    errors = [[torch.zeros(p.numel()) for p in params] for _ in range(world_size)]
    for x, y in zip(*DATA):
        sent = [torch.zeros(p.numel()) for p in params]
        for r in range(world_size):
            model.zero_grad()
            model(x.chunk(world_size)[r], y.chunk(world_size)[r])[1].backward()
            for i, p in enumerate(params):
                acc = p.grad.reshape(-1) + errors[r][i]
                idx = acc.abs().topk(max(1, int(ratio * acc.numel()))).indices
                part = torch.zeros_like(acc)
                part[idx] = acc[idx]
                errors[r][i] = acc - part
                sent[i] += part
        for i, p in enumerate(params):
            p.grad = (sent[i] / world_size).view_as(p)
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def topk_several_buckets(rank, world_size):
    run = functools.partial(train_worker, rank, world_size, MODEL, data=DATA,
                            hook="topk", ratio=0.1)
    # DDP starts with one bucket and regroups into several after the first step
    return {"ddp": run("ddp", bucket_cap_mb=0.002),
            "bucketed": run("bucketed", bucket_cap_mb=0.002),
            "one_bucket": run("bucketed", bucket_cap_mb=25.0)}


def test_topk_error_feedback_survives_ddp_rebuilding_its_buckets():
    ref = topk_reference(0.1, 2)
    r0, _ = launch(topk_several_buckets, 2)
    for k, run in r0.items():
        assert max_abs_diff(run["state"], ref) < 1e-5, k
