"""Integer quantization: qparams and integers against torch, error bounds, modules."""

import warnings

import pytest
import torch
import torch.nn as nn

from book.workers.memory import model_bytes
from llmcore.precision.quant import (QATLinear, QuantizedLinear, calc_qparams,
                                     dequantize, fake_quantize, pack_int4, prepare_qat,
                                     qrange, quantize, quantize_int8, quantize_weights,
                                     unpack_int4)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver


def observer(bits, symmetric, axis):
    qmin, qmax = qrange(bits, symmetric)
    scheme = {(True, None): torch.per_tensor_symmetric,
              (False, None): torch.per_tensor_affine,
              (True, 0): torch.per_channel_symmetric,
              (False, 0): torch.per_channel_affine}[(symmetric, axis)]
    kw = dict(dtype=torch.qint8, qscheme=scheme, quant_min=qmin, quant_max=qmax)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (MinMaxObserver(**kw) if axis is None
                else PerChannelMinMaxObserver(ch_axis=axis, **kw))


CASES = [(b, s, a) for b in (8, 4) for s in (True, False) for a in (None, 0)]


@pytest.mark.parametrize("bits,symmetric,axis", CASES)
def test_qparams_and_integers_match_torch(bits, symmetric, axis):
    gen = torch.Generator().manual_seed(bits + 2 * symmetric)
    w = torch.randn(16, 40, generator=gen) + 0.3
    q, scale, zp = quantize(w, bits, axis, symmetric)
    obs = observer(bits, symmetric, axis)
    obs(w)
    t_scale, t_zp = obs.calculate_qparams()
    torch.testing.assert_close(scale.flatten(), t_scale.flatten(), rtol=1e-6, atol=0)
    assert torch.equal(zp.flatten(), t_zp.flatten().int())
    qmin, qmax = qrange(bits, symmetric)
    if axis is None:
        fq = torch.fake_quantize_per_tensor_affine(w, t_scale.item(), int(t_zp), qmin,
                                                   qmax)
    else:
        fq = torch.fake_quantize_per_channel_affine(w, t_scale, t_zp.int(), axis, qmin,
                                                    qmax)
    assert torch.equal(dequantize(q, scale, zp), fq)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax


def test_int8_integers_match_quantize_per_channel():
    w = torch.randn(8, 32)
    q, scale, zp = quantize_int8(w, axis=0, symmetric=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated in torch
        tq = torch.quantize_per_channel(w, scale.flatten().double(),
                                        zp.flatten().long(), 0, torch.qint8)
    assert torch.equal(q, tq.int_repr())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("kw", [dict(), dict(axis=0), dict(axis=1),
                                dict(group_size=16)])
def test_error_at_most_half_a_step(bits, symmetric, kw):
    w = torch.randn(12, 64) * torch.logspace(-2, 1, 64)
    q, scale, zp = quantize(w, bits, symmetric=symmetric, **kw)
    err = (dequantize(q, scale, zp) - w).abs()
    step = scale if "group_size" not in kw else scale.repeat_interleave(16, dim=-1)
    assert bool((err <= step / 2 * (1 + 1e-5)).all())


def test_finer_granularity_smaller_error():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen) * torch.rand(64, 1, generator=gen) * 3
    w[:, ::37] *= 8  # outlier input columns, as in LLM weights
    errs = {}
    for name, kw in {"tensor": dict(), "channel": dict(axis=0),
                     "group": dict(group_size=32)}.items():
        q, s, z = quantize(w, 4, **kw)
        errs[name] = (dequantize(q, s, z) - w).pow(2).mean().item()
    assert errs["group"] < errs["channel"] < errs["tensor"]


def test_asymmetric_helps_one_sided_weights():
    w = torch.rand(32, 32) + 0.5  # all positive: symmetric wastes the negative half
    err = {s: (dequantize(*quantize(w, 4, symmetric=s)) - w).abs().mean().item()
           for s in (True, False)}
    assert err[False] < 0.6 * err[True]


def test_pack_int4_roundtrip():
    q = torch.randint(-8, 8, (6, 10), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 5)
    assert torch.equal(unpack_int4(packed), q)


@pytest.mark.parametrize("bad", [8, -9, 17, 127])
def test_pack_int4_refuses_values_outside_int4(bad):
    """Masking to 4 bits used to wrap them silently: 8 came back as -8, 17 as 1."""
    q = torch.zeros(2, 4, dtype=torch.int8)
    q[1, 2] = bad
    with pytest.raises(ValueError, match=r"outside int4's \[-8, 7\]"):
        pack_int4(q)
    with pytest.raises(ValueError, match="integers"):
        pack_int4(torch.zeros(2, 4))


@pytest.mark.parametrize("bits,group_size,ratio", [(8, None, 0.3), (4, 32, 0.2)])
def test_quantize_weights_module(bits, group_size, ratio):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    x = torch.randn(10, 64)
    y = model(x)
    before = model_bytes(model)
    out = quantize_weights(model, bits, group_size=group_size)
    assert out is model and all(isinstance(model[i], QuantizedLinear) for i in (0, 2))
    assert model_bytes(model) < ratio * before
    rel = ((model(x) - y).norm() / y.norm()).item()
    assert rel < (0.01 if bits == 8 else 0.15)
    assert rel > 0  # it really quantized
    assert "bits=4" in repr(model) or bits == 8


def test_fake_quantize_straight_through():
    w = torch.randn(8, 16, requires_grad=True)
    g = torch.randn(8, 16)
    wq = fake_quantize(w, 4, axis=0)
    q, s, z = quantize(w.detach(), 4, axis=0)
    assert torch.equal(wq.detach(), dequantize(q, s, z))
    wq.backward(g)
    assert torch.equal(w.grad, g)  # the rounding is invisible to the gradient


def test_qat_model_equals_its_quantized_twin():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    prepare_qat(model, bits=4, group_size=16)
    assert isinstance(model[0], QATLinear)
    x = torch.randn(5, 32)
    model(x).sum().backward()
    assert model[0].weight.grad is not None
    y_qat = model(x)
    quantize_weights(model, bits=4, group_size=16)
    torch.testing.assert_close(model(x), y_qat, rtol=1e-5, atol=1e-6)


def test_bad_inputs_name_the_argument():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="w must be a floating-point"):
        quantize_int8(torch.arange(8))
    with pytest.raises(ValueError, match="bits=3"):
        quantize(w, bits=3)
    with pytest.raises(ValueError, match="group_size=24"):
        quantize(w, 4, group_size=24)
    with pytest.raises(ValueError, match="axis=2"):
        quantize_int8(w, axis=2)
    with pytest.raises(ValueError, match="either axis"):
        calc_qparams(w, 4, axis=0, group_size=16)
    with pytest.raises(ValueError, match="bits=2"):
        quantize_weights(nn.Sequential(nn.Linear(4, 4)), bits=2)


def test_per_tensor_module_and_qat_twin():
    torch.manual_seed(2)
    lin = nn.Linear(32, 16)
    qt = QuantizedLinear(lin, bits=4, per_channel=False)
    assert qt.scale.numel() == 1 and "per-tensor" in repr(qt)
    q, s, z = quantize(lin.weight.detach(), 4)
    torch.testing.assert_close(qt.dequantized_weight(), dequantize(q, s, z))
    model = prepare_qat(nn.Sequential(nn.Linear(32, 16)), bits=4, per_channel=False)
    x = torch.randn(3, 32)
    y = model(x)
    quantize_weights(model, bits=4, per_channel=False)
    torch.testing.assert_close(model(x), y)
