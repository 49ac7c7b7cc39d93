"""ZeRO 1/2/3 equal the unsharded run and FSDP2; memory per rank follows formulas."""

import functools

import pytest
import torch
import torch.distributed as dist
from parallel_fixtures import TinyLM, WithIdle, random_batches

from book.workers.common import (
    local_batches,
    plain_config,
    replay,
    train_adam_single,
    units_of,
)
from book.workers.zero import fsdp_worker, zero_worker
from llmcore.accounting import zero_bytes_per_param, zero_state_bytes
from llmcore.config import override
from llmcore.parallel import launch
from llmcore.parallel.costmodel import zero_payload
from llmcore.parallel.zero import ZeroDataParallel
from llmcore.train import train

MODEL = functools.partial(TinyLM, vocab_size=32, n_embd=16, hidden=32)
DATA = random_batches(steps=3, batch=8, seq=6, vocab=32)


def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def every_stage(rank, world_size):
    out = {s: zero_worker(rank, world_size, MODEL, s, DATA, units="mlp")
           for s in (0, 1, 2, 3)}
    out["bf16"] = {s: zero_worker(rank, world_size, MODEL, s, DATA, units="mlp",
                                  param_dtype=torch.bfloat16) for s in (0, 1, 2, 3)}
    out["fsdp"] = fsdp_worker(rank, world_size, MODEL, DATA, units="mlp")
    return out


def test_formulas():
    assert zero_bytes_per_param(0, 4) == 16 and zero_bytes_per_param(3, 4) == 4
    assert zero_bytes_per_param(1, 4) == 7 and zero_bytes_per_param(2, 4) == 5.5


@pytest.mark.distributed
def test_zero_stages_match_unsharded_adam_and_fsdp2():
    ref = train_adam_single(MODEL, DATA)
    r0, r1 = launch(every_stage, 2)
    for s in (0, 1, 2, 3):
        assert max_diff(r0[s]["params"], ref) < 1e-5, s
        assert max_diff(r1[s]["params"], ref) < 1e-5, s
    assert max_diff(r0["fsdp"]["params"], ref) < 1e-5
    n = r0[0]["numel"]
    for s in (0, 1, 2, 3):  # mixed precision: bf16 working copy, fp32 master + Adam
        per_param = sum(r0["bf16"][s]["memory"].values()) / n
        assert per_param == pytest.approx(zero_bytes_per_param(s, 2), rel=0.01), s
    # FSDP2 keeps fp32 shards of parameters and gradients: 16 bytes / N as well
    assert sum(r0["fsdp"]["memory"].values()) / n == pytest.approx(8.0, rel=0.01)
    # payload per step: stage 0 all-reduces 4 bytes/param; 1-2 reduce-scatter and
    # all-gather
    pay = {s: r0[s]["payload_per_step"] for s in (0, 1, 2, 3)}
    n_unit = sum(p.numel() for p in MODEL().mlp.parameters())
    for s in (0, 1, 2, 3):  # the cost model predicts every byte
        # stage 3: the root (embedding, head) stays gathered from forward to backward
        assert pay[s] == pytest.approx(zero_payload(s, n, 4, root_params=n - n_unit)), s
        assert sum(r0["bf16"][s]["memory"].values()) == pytest.approx(
            zero_state_bytes(n, s, 2), rel=0.01)


# ------------------------------------------------- fixes: nothing silently wrong

IDLE = functools.partial(WithIdle, vocab_size=32, n_embd=16, hidden=32)


def discarded_backward(rank, world_size, stage):
    """A backward whose gradients are dropped by zero_grad() before any step."""
    torch.manual_seed(0)
    model = MODEL()
    z = ZeroDataParallel(model, stage, units=units_of(model, "mlp"))
    opt = z.make_optimizer(torch.optim.Adam, lr=1e-2)
    batches = list(local_batches(DATA, rank, world_size))
    z(*batches[0])[1].backward()
    z.zero_grad()  # forget it
    for x, y in batches:
        z(x, y)[1].backward()
        opt.step()
    return z.full_parameters()


def master_from_fp32(rank, world_size):
    torch.manual_seed(0)
    fp32 = {n: p.detach().clone() for n, p in MODEL().named_parameters()}
    return {s: max_diff(_zero_of(fp32, s).full_parameters(), fp32) for s in (0, 1, 3)}


def _zero_of(weights, stage):
    model = MODEL()
    model.load_state_dict(weights)
    return ZeroDataParallel(model, stage, units=units_of(model, "mlp"),
                            param_dtype=torch.bfloat16)


def idle_unit(rank, world_size):
    """Stage 3 with a frozen and an unused parameter inside the unit: the unit stays
    gathered until the step (no gradient says it is done), then every parameter is
    freed."""
    torch.manual_seed(rank)  # frozen weights differ too: the broadcast must fix them
    model = IDLE()
    z = ZeroDataParallel(model, 3, units=units_of(model, "mlp"))
    opt = z.make_optimizer(torch.optim.Adam, lr=1e-2)
    freed = []
    for x, y in local_batches(DATA, rank, world_size):
        z(x, y)[1].backward()
        opt.step()
        freed.append(all(p.untyped_storage().nbytes() == 0 for p in z.params))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()
              if not p.requires_grad}
    return {"params": {**z.full_parameters(), **frozen}, "freed": freed}


def clipped(rank, world_size, stage):
    """ZeRO's clip_grad_norm_ in the book's loop against torch's on one process."""
    torch.manual_seed(0)
    model = MODEL()
    z = ZeroDataParallel(model, stage, units=units_of(model, "mlp"))
    cfg = override(plain_config(len(DATA[0])), grad_clip=0.05)
    history = train(z, replay(DATA, rank, world_size), cfg,
                    optimizer=z.make_optimizer(torch.optim.Adam, lr=1e-2),
                    dp_group=dist.group.WORLD)
    return {"params": z.full_parameters(), "norms": history.grad_norm}


def every_fix(rank, world_size):
    return {"discard": {s: discarded_backward(rank, world_size, s) for s in (1, 2, 3)},
            "master": master_from_fp32(rank, world_size),
            "idle": idle_unit(rank, world_size),
            "clip": {s: clipped(rank, world_size, s) for s in (0, 2, 3)}}


@pytest.fixture(scope="module")
def fixes():
    return launch(every_fix, 2)


@pytest.mark.distributed
def test_zero_grad_without_step_leaves_nothing_behind(fixes):
    ref = train_adam_single(MODEL, DATA)
    for r in fixes:
        for s, params in r["discard"].items():
            assert max_diff(params, ref) < 1e-5, s


@pytest.mark.distributed
def test_master_copy_is_built_from_the_fp32_weights(fixes):
    # bf16 would round every weight by up to 2^-9 relative; the master keeps fp32
    assert all(gap == 0.0 for gap in fixes[0]["master"].values())


@pytest.mark.distributed
def test_stage3_frees_a_unit_with_frozen_and_unused_parameters(fixes):
    ref = train_adam_single(IDLE, DATA)
    for r in fixes:
        assert all(r["idle"]["freed"])  # nothing left gathered after the step
        assert max_diff(r["idle"]["params"], ref) < 1e-5  # every forward saw the step


@pytest.mark.distributed
def test_clipping_in_the_loop_measures_the_global_norm(fixes):
    torch.manual_seed(0)
    ref = MODEL()
    cfg = override(plain_config(len(DATA[0])), grad_clip=0.05)
    history = train(ref, replay(DATA), cfg,
                    optimizer=torch.optim.Adam(ref.parameters(), lr=1e-2))
    want = {n: p.detach() for n, p in ref.named_parameters()}
    for r in fixes:
        for s, run in r["clip"].items():
            assert run["norms"] == pytest.approx(history.grad_norm, rel=1e-4), s
            assert run["norms"][0] > 0.05  # the clip did act
            assert max_diff(run["params"], want) < 1e-5, s
