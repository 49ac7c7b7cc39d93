"""The frontier low-precision parts on a CUDA GPU: the same numbers as on the CPU,
and the tensor core's own FP8 accumulation where the device has FP8 tensor cores."""

import copy

import pytest
import torch
import torch.nn as nn

from llmcore.precision.adam8bit import AdamW8bit
from llmcore.precision.fp8 import Float8Linear, fp8_backend, to_float8
from llmcore.precision.mx import MX_FORMATS, mx_quantize

pytestmark = pytest.mark.gpu


def test_mx_codes_are_the_same_on_the_gpu():
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 30
    for fmt in MX_FORMATS:
        cpu, gpu = mx_quantize(x, fmt), mx_quantize(x.cuda(), fmt)
        assert torch.equal(cpu.codes, gpu.codes.cpu()), fmt
        assert torch.equal(cpu.scales, gpu.scales.cpu()), fmt


def test_blockwise_linear_matches_the_cpu():
    torch.manual_seed(0)
    cpu = Float8Linear(256, 128, scaling="blockwise")
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(300, 256)
    outs = []
    for layer, dev in ((cpu, "cpu"), (gpu, "cuda")):
        xi = x.to(dev).requires_grad_()
        y = layer(xi)
        y.square().sum().backward()
        outs.append((y.cpu(), xi.grad.cpu(), layer.weight.grad.cpu()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())


def test_adamw8bit_steps_match_the_cpu():
    torch.manual_seed(1)
    cpu = nn.Linear(128, 128)
    gpu = copy.deepcopy(cpu).cuda()
    opts = [AdamW8bit(m.parameters(), lr=1e-2, block_size=256) for m in (cpu, gpu)]
    for _ in range(3):
        x = torch.randn(16, 128)
        for m, o, dev in ((cpu, opts[0], "cpu"), (gpu, opts[1], "cuda")):
            o.zero_grad()
            m(x.to(dev)).square().mean().backward()
            o.step()
    torch.testing.assert_close(cpu.weight, gpu.weight.cpu(), rtol=1e-4, atol=1e-5)


def test_scaled_mm_accumulation_with_and_without_fast_accum():
    """Positive e4m3 operands, K = 16384: the kernel's error against the exact sum,
    promoted (the default) and with fast accumulation. Both stay within a few
    percent; the promoted one is not worse."""
    if fp8_backend("cuda")[0] != "scaled_mm":
        pytest.skip(fp8_backend("cuda")[1])
    g = torch.Generator(device="cuda").manual_seed(0)
    a8 = to_float8(torch.rand(256, 16384, device="cuda", generator=g))[0]
    b8 = to_float8(torch.rand(256, 16384, device="cuda", generator=g))[0]
    exact = a8.double() @ b8.double().t()
    one = torch.ones((), device="cuda")
    err = {}
    for fast in (False, True):
        y = torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one,
                             out_dtype=torch.float32, use_fast_accum=fast)
        err[fast] = ((y.double() - exact).abs() / exact).max().item()
    print(f"max relative error: promoted {err[False]:.2e}, fast {err[True]:.2e}")
    assert max(err.values()) < 0.05
    assert err[False] <= err[True] * 1.01 + 1e-6
