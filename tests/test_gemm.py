"""The CPU's GEMM library: oneDNN linears equal PyTorch's (forward and backward), the
context routes exactly the calls it should, and the training loop uses it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmcore.models.gpt import GPT, GPTConfig
from llmcore.nn import gemm
from llmcore.train import TrainConfig, train

needs_onednn = pytest.mark.skipif(not gemm.onednn_available(),
                                  reason="this torch has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("shape,bias", [((5, 7), True), ((3, 4, 7), False),
                                        ((2, 3, 4, 7), True)])
def test_onednn_linear_equals_f_linear_forward_and_backward(shape, bias):
    torch.manual_seed(0)
    w = torch.randn(6, 7, requires_grad=True)
    b = torch.randn(6, requires_grad=True) if bias else None
    x = torch.randn(*shape, requires_grad=True)
    grad = torch.randn(*shape[:-1], 6)
    grads = []
    for fn in (F.linear, gemm.onednn_linear):
        y = fn(x, w, b)
        grads.append((y, *torch.autograd.grad(y, [x, w, *([b] if bias else [])],
                                              grad)))
    for ours, ref in zip(grads[1], grads[0]):
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@needs_onednn
def test_the_context_routes_fp32_cpu_linears_only():
    lin = nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    assert "OneDNN" not in type(lin(x).grad_fn).__name__  # outside: PyTorch's
    with gemm.cpu_gemm("onednn"):
        assert "OneDNN" in type(lin(x).grad_fn).__name__
        assert "OneDNN" in type(F.linear(x, lin.weight).grad_fn).__name__
        by_name = F.linear(input=x, weight=lin.weight, bias=lin.bias)
        assert "OneDNN" in type(by_name.grad_fn).__name__
        lin16 = nn.Linear(8, 4).bfloat16()
        assert "OneDNN" not in type(lin16(x.bfloat16()).grad_fn).__name__
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides there
            assert lin(x).dtype == torch.bfloat16
        frozen = lin(x.detach())  # no input gradient needed: fine
        frozen.sum().backward()
        assert lin.weight.grad is not None
    with gemm.cpu_gemm("mkl"):
        assert "OneDNN" not in type(lin(x).grad_fn).__name__


def test_choices_are_checked_and_named(monkeypatch):
    with pytest.raises(ValueError, match="library must be one of"):
        gemm.set_cpu_gemm("openblas")
    with pytest.raises(ValueError, match="library must be one of"):
        with gemm.cpu_gemm("blis"):
            pass
    monkeypatch.setenv(gemm.ENV, "fast")
    with pytest.raises(ValueError, match="LLMCORE_CPU_GEMM"):
        gemm.cpu_gemm_library()
    monkeypatch.setenv(gemm.ENV, "mkl")
    assert gemm.cpu_gemm_library() == "mkl"
    previous = gemm.set_cpu_gemm("auto")
    try:
        for machine, want in (("x86_64", "onednn"), ("arm64", "mkl")):
            monkeypatch.setattr(gemm.platform, "machine", lambda: machine)
            assert gemm.cpu_gemm_library() == (want if gemm.onednn_available()
                                               else "mkl")
        monkeypatch.setattr(gemm.platform, "machine", lambda: "x86_64")
    finally:
        gemm.set_cpu_gemm(previous)
    monkeypatch.setattr(gemm, "onednn_available", lambda: False)  # a torch without it
    with pytest.raises(ValueError, match="no working oneDNN"):
        gemm.set_cpu_gemm("onednn")
    monkeypatch.delenv(gemm.ENV)
    assert gemm.cpu_gemm_library() == "mkl"  # auto falls back


@needs_onednn
def test_training_runs_its_linears_on_the_chosen_library(monkeypatch):
    calls = []
    real = gemm._onednn_mm
    monkeypatch.setattr(gemm, "_onednn_mm",
                        lambda *a: calls.append(1) or real(*a))
    data = torch.randint(65, (64, 17), generator=torch.Generator().manual_seed(0))

    def batch_fn(step, generator):
        rows = data[torch.randint(64, (4,), generator=generator)]
        return rows[:, :-1], rows[:, 1:]

    cfg = TrainConfig(max_steps=6, warmup_steps=0, progress=False)
    losses = {}
    for library in ("mkl", "onednn"):
        calls.clear()
        previous = gemm.set_cpu_gemm(library)
        try:
            torch.manual_seed(0)
            losses[library] = train(GPT(GPTConfig(65, 16, 2, 2, 32)), batch_fn,
                                    cfg).loss
        finally:
            gemm.set_cpu_gemm(previous)
        # 2 blocks x 4 linears + the output layer, 3 matmuls each per step
        assert len(calls) == (0 if library == "mkl" else 6 * 3 * 9)
    torch.testing.assert_close(losses["onednn"], losses["mkl"], rtol=1e-5, atol=0)


def test_gemm_speeds_measures_each_library():
    speeds = gemm.gemm_speeds(64, 32, 48, repeats=2, rounds=2)
    assert speeds["mkl"] > 0
    assert ("onednn" in speeds) == gemm.onednn_available()
    assert all(v > 0 for v in speeds.values())
