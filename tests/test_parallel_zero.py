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
from book.workers.costmodel import zero_payload
from book.workers.memory import zero_bytes_per_param, zero_state_bytes
from book.workers.zero import fsdp_worker, zero_worker
from llmcore.config import override
from book.workers.launch import launch
from llmcore.parallel.comm import Comm
from llmcore.parallel.quantized_comm import (FORMATS, decode, encode,
                                             quantized_all_gather,
                                             quantized_all_reduce, quantized_payload,
                                             quantized_reduce_scatter)
from llmcore.parallel.zero import ZeroDataParallel
from llmcore.precision.formats import round_to_format
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
    out["fsdp_keep"] = fsdp_worker(rank, world_size, MODEL, DATA, units="mlp",
                                   reshard_after_forward=False)
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
    # FSDP2's ZeRO-2 mode: the unit stays gathered from its forward to its backward
    assert max_diff(r0["fsdp_keep"]["params"], ref) < 1e-5
    assert r0["fsdp_keep"]["gathered"] == [True] * 3
    assert r0["fsdp"]["gathered"] == [False] * 3
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


# ------------------------------------------------- communication in 8 bits


def reference_decode(x: torch.Tensor, fmt: str, block: int) -> torch.Tensor:
    """What 8-bit transport makes of each row of ``x``, in float64, by rounding to
    the format's grid with ``llmcore.precision.formats`` (not torch's casts): one
    scale per block maps the block's largest magnitude onto the largest value."""
    top = {"e4m3": 448.0, "e5m2": 57344.0, "int8": 127.0}[fmt]
    out = torch.empty(x.shape, dtype=torch.float64)
    for i in range(0, x.shape[-1], block):
        part = x[..., i:i + block].double()
        scale = (top / part.abs().amax(-1, keepdim=True).float()).double()
        y = (part.float() * scale.float()).double()  # the product, rounded to fp32
        grid = (y.round() if fmt == "int8"
                else round_to_format(y, FORMATS[fmt], saturate=True))
        out[..., i:i + block] = (grid / scale).nan_to_num(0.0)  # a block of zeros
    return out


def test_encode_decode_rounds_to_the_grid_of_each_format():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 300, generator=g) * torch.logspace(-4, 3, 300)  # wide range
    x[1, :128] = 0.0  # an all-zero block keeps a finite scale
    for fmt in FORMATS:
        codes, scales = encode(x, fmt, 128)
        assert codes.dtype == torch.uint8 and codes.shape == x.shape
        assert scales.shape == (3, 3)  # ceil(300 / 128) blocks per row
        got = decode(codes, scales, fmt, 128).double()
        torch.testing.assert_close(got, reference_decode(x, fmt, 128), rtol=1e-6,
                                   atol=0.0)
        assert (got[1, :128] == 0).all()


def eight_bit_collectives(rank, world_size):
    comm = Comm()
    g = torch.Generator().manual_seed(rank)
    full = torch.randn(world_size * 200, generator=g) * torch.logspace(
        -2, 2, world_size * 200)
    shard = full[:200].clone()
    out = {"gathered": quantized_all_gather(comm, shard, "e4m3", 64),
           "reduced": quantized_reduce_scatter(comm, full, "e4m3", 64),
           "int8_sum": quantized_all_reduce(comm, full[:301], "int8", 64)}
    return {**out, "payload": dict(comm.stats.payload)}


@pytest.mark.distributed
def test_8bit_collectives_equal_a_one_process_float64_reference():
    n = 2
    ranks = launch(eight_bit_collectives, n)
    fulls = []
    for r in range(n):
        g = torch.Generator().manual_seed(r)
        fulls.append(torch.randn(n * 200, generator=g) * torch.logspace(-2, 2, n * 200))
    want_gather = torch.cat([reference_decode(f[:200], "e4m3", 64) for f in fulls])
    chunks = [reference_decode(f.view(n, 200), "e4m3", 64) for f in fulls]
    for rank, got in enumerate(ranks):
        torch.testing.assert_close(got["gathered"].double(), want_gather, rtol=1e-6,
                                   atol=0.0)
        # rank j sums chunk j of every rank's tensor, each decoded on its own
        want = sum(c[rank] for c in chunks)
        torch.testing.assert_close(got["reduced"].double(), want, rtol=1e-5,
                                   atol=1e-6)
        exact = sum(f.view(n, 200)[rank] for f in fulls)
        assert (got["reduced"] - exact).abs().max() < 0.1 * exact.abs().max()
        # int8 all-reduce: both ranks hold the same sum, close to the exact one
        assert torch.equal(got["int8_sum"], ranks[0]["int8_sum"])
        exact = sum(f[:301] for f in fulls)
        assert (got["int8_sum"] - exact).abs().max() < 0.02 * exact.abs().max()
        # a byte per value and 4 per block of 64; the all-reduce of 301 values
        # reduce-scatters and gathers chunks of 151
        a, b = quantized_payload(200, n, 64), quantized_payload(151, n, 64)
        assert a["all_gather"] == n * (200 + 4 * 4)
        for op in ("all_gather", "all_to_all"):
            assert got["payload"][op] == a[op] + b[op], op


def fp8_zero(rank, world_size):
    runs = {}
    for label, kw in {"exact": {}, "fp8": dict(gather_format="e4m3",
                                               reduce_format="e4m3")}.items():
        for stage in (1, 3):
            runs[label, stage] = zero_worker(rank, world_size, MODEL, stage, DATA,
                                             torch.bfloat16, "mlp", **kw)
    return runs


@pytest.mark.distributed
def test_zero_with_fp8_communication_halves_the_bytes_and_stays_close():
    r0, r1 = launch(fp8_zero, 2)
    shapes = [p.numel() for p in MODEL().parameters()]
    n_unit = sum(p.numel() for p in MODEL().mlp.parameters())
    for stage in (1, 3):
        exact, fp8 = r0["exact", stage], r0["fp8", stage]
        # every parameter: its shards travel as a byte per value + a scale per block
        per = sum(quantized_payload(-(-n // 2), 2)["all_gather"] for n in shapes)
        gathers = 1 if stage == 1 else 2
        unit = sum(quantized_payload(-(-n // 2), 2)["all_gather"]
                   for n in [p.numel() for p in MODEL().mlp.parameters()])
        want = per if stage == 1 else gathers * per - (per - unit)
        assert fp8["payload_per_step"]["all_gather"] == want
        assert fp8["payload_per_step"]["all_to_all"] == per
        bf16 = exact["payload_per_step"]
        assert bf16["reduce_scatter"] == 2 * sum(2 * -(-n // 2) for n in shapes)
        ratio = fp8["payload_per_step"]["all_to_all"] / bf16["reduce_scatter"]
        assert 0.5 < ratio < 0.6, ratio
        # the fp32 masters move apart by a small part of how far training moved
        # them (rounding the weights of every forward to FP8 costs the most)
        start = launch_free_init()
        moved = distance(exact["params"], start)
        assert 0 < distance(fp8["params"], exact["params"]) < 0.25 * moved
        # replicas agree although every rank rounded its own shards
        assert max_diff(fp8["params"], r1["fp8", stage]["params"]) == 0.0
    assert n_unit < sum(shapes)


def distance(a, b):
    return sum(((a[k] - b[k]) ** 2).sum() for k in b).sqrt().item()


def launch_free_init():
    torch.manual_seed(0)
    return {n: p.detach().clone() for n, p in MODEL().named_parameters()}


def test_8bit_formats_are_checked():
    with pytest.raises(ValueError, match="fmt must be one of"):
        encode(torch.zeros(4), "fp4")
    with pytest.raises(ValueError, match="block must be a positive int"):
        encode(torch.zeros(4), "e4m3", 0)
