"""LossScaler against torch.amp.GradScaler on identical gradient streams."""

import copy

import pytest
import torch

from llmcore.precision import LossScaler
from tests.host_reads import count_host_reads


def run(scaler, model, opt, stream):
    """Train on ``stream``; return the scale before each step and which steps ran."""
    scales, stepped = [], []
    for x, y, poison in stream:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scales.append(scaler.get_scale())
        scaler.scale(loss).backward()
        if poison is not None:  # inject an overflow into one gradient
            model.weight.grad[0, 0] = poison
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        before = model.weight.detach().clone()
        scaler.step(opt)
        scaler.update()
        stepped.append(not torch.equal(before, model.weight))
    scales.append(scaler.get_scale())
    return scales, stepped


def make_stream(n, seed):
    gen = torch.Generator().manual_seed(seed)
    bad = {2: float("inf"), 3: float("nan"), 9: -float("inf"), 10: float("inf"),
           11: float("nan"), 17: float("inf")}
    return [(torch.randn(8, 5, generator=gen), torch.randn(8, 3, generator=gen),
             bad.get(i)) for i in range(n)]


@pytest.mark.parametrize("kwargs", [
    dict(init_scale=2.0 ** 16, growth_interval=3),
    dict(init_scale=1024.0, growth_factor=1.5, backoff_factor=0.7, growth_interval=2),
    dict(init_scale=2.0 ** 127, growth_interval=1),  # growth would overflow fp32
])
def test_same_decisions_and_scales_as_gradscaler(kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    twin = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt_twin = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    stream = make_stream(25, seed=1)
    ours = run(LossScaler(**kwargs), model, opt, stream)
    theirs = run(torch.amp.GradScaler("cpu", **kwargs), twin, opt_twin, stream)
    assert ours[1] == theirs[1]  # the same steps skipped
    assert ours[0] == theirs[0]  # the same scale sequence, bit for bit
    assert not all(ours[1]) and any(ours[1])
    assert len(set(ours[0])) > 2  # it really backed off and grew
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_step_without_explicit_unscale_and_state_dict():
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = LossScaler(init_scale=8.0, growth_interval=1)
    model(torch.ones(2, 4)).sum().backward()
    g = model.weight.grad.clone()
    opt.zero_grad()
    s.scale(model(torch.ones(2, 4)).sum()).backward()
    torch.testing.assert_close(model.weight.grad, 8 * g)
    s.step(opt)
    s.update()
    assert s.get_scale() == 16.0
    state = s.state_dict()
    ref = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1)
    assert set(state) == set(ref.state_dict())
    s2 = LossScaler()
    s2.load_state_dict(state)
    assert s2.get_scale() == 16.0 and s2.state_dict() == state


def test_misuse_is_refused():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = LossScaler()
    s.scale(model(torch.ones(1, 2)).sum()).backward()
    s.unscale_(opt)
    with pytest.raises(RuntimeError, match="already"):
        s.unscale_(opt)
    with pytest.raises(RuntimeError, match="no inf checks"):
        LossScaler().update()
    with pytest.raises(ValueError, match="growth_interval"):
        LossScaler(growth_interval=0)
    with pytest.raises(ValueError, match="backoff_factor"):
        LossScaler(backoff_factor=2.0)
    half = torch.nn.Linear(2, 2).half()
    opt_h = torch.optim.SGD(half.parameters(), lr=0.1)
    half.weight.grad = torch.ones(2, 2, dtype=torch.float16)
    with pytest.raises(ValueError, match="fp16 gradient"):
        LossScaler().unscale_(opt_h)


def test_disabled_is_a_passthrough():
    s = LossScaler(enabled=False)
    loss = torch.tensor(3.0)
    assert s.scale(loss) is loss and s.get_scale() == 1.0


def test_underflow_fraction():
    from book.workers.formats import underflow_fraction

    x = torch.tensor([1e-9, 1e-6, 1e-3, 0.0])  # fp16's smallest subnormal is 6e-8
    assert underflow_fraction([x]) == pytest.approx(1 / 3)
    assert underflow_fraction([x], scale=1024.0) == 0.0
    assert underflow_fraction([x], dtype=torch.bfloat16) == 0.0
    with pytest.raises(ValueError, match="no nonzero"):
        underflow_fraction([torch.zeros(3)])


def test_autocast_table_and_saved_bytes():
    from book.workers.autocast import autocast_op_table, saved_tensor_bytes

    verdict = {r["op"]: r["autocast"] for r in autocast_op_table("cpu", torch.bfloat16)}
    assert verdict["linear"] == verdict["matmul"] == "low precision"
    assert verdict["cross_entropy"] == "fp32"
    assert verdict["add"] == "follows inputs"
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64, requires_grad=True)
    with saved_tensor_bytes() as mem32:
        (x @ w).sum()
    with saved_tensor_bytes() as mem16, torch.autocast("cpu", dtype=torch.bfloat16):
        (x @ w).sum()
    assert mem32["bytes"] == (32 * 64 + 64 * 64) * 4  # both matmul operands, fp32
    assert mem16["bytes"] == (32 * 64 + 64 * 64) * 2  # their bf16 copies


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 0.0, -1.0])
def test_initial_scale_must_be_finite_and_positive(bad):
    """An infinite initial scale turns every gradient into inf: every step skipped."""
    with pytest.raises(ValueError, match="init_scale must be finite and > 0"):
        LossScaler(init_scale=bad)


def test_one_host_sync_per_step_not_one_per_parameter(monkeypatch):
    """GradScaler reads the device once per step (in ``step``); LossScaler used to call
    ``bool()`` on every parameter's finiteness check. Count the host reads."""
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(6)])  # 12 params
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = LossScaler(init_scale=4.0, growth_interval=2)
    reads = count_host_reads(monkeypatch)
    for poison in (None, None, float("inf"), None):
        reads.clear()
        opt.zero_grad()
        s.scale(model(torch.ones(3, 4)).sum()).backward()
        if poison is not None:
            model[3].weight.grad[0, 0] = poison
        s.unscale_(opt)
        s.step(opt)
        s.update()
        assert reads == ["item"], reads  # the skip decision, nothing else
    monkeypatch.undo()
    # and the decisions are still GradScaler's: grow at 2 clean steps, then back off
    assert s.get_scale() == 4.0 * 2 * 0.5


@pytest.mark.gpu
def test_unscale_and_update_make_no_host_sync_on_the_gpu():
    """Only step() reads the device (whether to skip); unscale_ and update stay on
    it, as the device's own sync detector confirms."""
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)]).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = LossScaler(init_scale=4.0, growth_interval=1)
    x = torch.randn(8, 64, device="cuda")
    for step in range(3):
        opt.zero_grad()
        s.scale(model(x).sum()).backward()
        if step:  # after a warm-up step (the scale moves to the GPU there)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            s.unscale_(opt)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        s.step(opt)  # the one read
        torch.cuda.set_sync_debug_mode("error" if step else "default")
        try:
            s.update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert s.get_scale() == 4.0 * 2 ** 3
