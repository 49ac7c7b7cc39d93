"""FP8: scaled casts, delayed scaling, Float8Linear against float64 and _scaled_mm."""

import copy

import pytest
import torch
import torch.nn as nn

from llmcore.models.gpt import GPT, GPTConfig
from llmcore.nn import MultiHeadAttention
from llmcore.precision import fp8
from llmcore.precision.formats import E4M3, E5M2, round_to_format
from llmcore.precision.fp8 import (AmaxHistory, Float8Linear, convert_to_float8,
                                   fp8_backend, from_float8, scaled_matmul, to_float8,
                                   size_filter)
from tests.host_reads import count_host_reads

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype,fmt", [(E4, E4M3), (E5, E5M2)])
def test_tensorwise_roundtrip_error_bound(dtype, fmt):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen) * torch.logspace(-3, 2, 64)
    x8, scale = to_float8(x, dtype)
    assert x8.dtype == dtype and scale.dim() == 0
    assert x8.float().abs().max() == fmt.max  # amax lands on the largest value
    err = (from_float8(x8, scale) - x).abs()
    # Half an ulp: relative 2**-(m+1) for normals, half the subnormal step below.
    bound = torch.maximum(x.abs() * 2.0 ** -(fmt.man_bits + 1),
                          torch.tensor(fmt.min_subnormal / 2) / scale)
    assert bool((err <= bound * (1 + 1e-6)).all())
    # The cast is exactly the saturating round-to-nearest-even of x * scale.
    assert torch.equal(x8.double(), round_to_format(x * scale, fmt, saturate=True))


def test_rowwise_scales_each_row():
    x = torch.randn(8, 32) * torch.logspace(-4, 4, 8)[:, None]
    x8, scale = to_float8(x, E4, "rowwise")
    assert scale.shape == (8, 1)
    assert torch.equal(x8.float().abs().amax(dim=1), torch.full((8,), 448.0))
    # Per-row scales keep small rows accurate where one tensor scale cannot.
    err_row = rel(from_float8(x8, scale)[0], x[0])
    x8t, st = to_float8(x, E4, "tensorwise")
    err_tensor = rel(from_float8(x8t, st)[0], x[0])
    assert err_row < 0.05 < err_tensor


def test_given_scale_saturates_instead_of_overflowing():
    x = torch.tensor([1.0, 100.0, -1e4])
    x8, _ = to_float8(x, E5, scale=torch.tensor(100.0))
    assert x8.float().tolist() == [96.0, 10240.0, -57344.0]  # no inf
    assert not x.to(E5).float().isinf().any() and (x * 100).to(E5).float().isinf().any()


def test_delayed_scaling_uses_past_amax():
    h = AmaxHistory(length=3)
    s1 = h.scale(torch.tensor([2.0]), E4)
    assert s1 == 448 / 2  # first step: nothing recorded, use the tensor itself
    s2 = h.scale(torch.tensor([8.0]), E4)
    assert s2 == 448 / 2  # the scale is fixed before this tensor is seen
    h.scale(torch.tensor([1.0]), E4)
    assert h.scale(torch.tensor([1.0]), E4) == 448 / 8
    h.scale(torch.tensor([1.0]), E4)
    assert h.scale(torch.tensor([1.0]), E4) == 448 / 1  # the 8 left the window
    with pytest.raises(ValueError, match="length"):
        AmaxHistory(0)


@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise", "delayed"])
def test_float8_linear_close_to_float64(scaling):
    torch.manual_seed(0)
    ref = nn.Linear(64, 32).double()
    f8 = Float8Linear(64, 32, scaling=scaling)
    with torch.no_grad():
        f8.weight.copy_(ref.weight)
        f8.bias.copy_(ref.bias)
    x, g = torch.randn(4, 16, 64), torch.randn(4, 16, 32)
    x64 = x.double().requires_grad_()
    ref(x64).backward(g.double())
    xq = x.clone().requires_grad_()
    y = f8(xq)
    y.backward(g)
    assert y.shape == (4, 16, 32) and y.dtype == torch.float32
    # Stated tolerances: e4m3 forward within 6%, e5m2 gradients within 10% (relative
    # Frobenius error); above 1%, so the layer really quantizes.
    assert 0.01 < rel(y, ref(x64)) < 0.06
    assert 0.01 < rel(xq.grad, x64.grad) < 0.10
    assert 0.01 < rel(f8.weight.grad, ref.weight.grad) < 0.10
    torch.testing.assert_close(f8.bias.grad, ref.bias.grad.float())


def test_forward_is_exactly_the_fp8_product():
    """Same numerics as the kernel: the float64 product of the quantized operands."""
    torch.manual_seed(1)
    f8 = Float8Linear(48, 32, bias=False)
    x = torch.randn(20, 48)
    xq, sx = to_float8(x, E4)
    wq, sw = to_float8(f8.weight.detach(), E4)
    expect = (xq.double() / sx.double()) @ (wq.double() / sw.double()).t()
    torch.testing.assert_close(f8(x).double(), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("b_dtype", [E4, E5])
def test_emulation_matches_scaled_mm(scaling, b_dtype):
    """torch._scaled_mm runs on the CPU too: the emulation must agree with it."""
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(32, 64, generator=gen), torch.randn(48, 64, generator=gen)
    args = (a, b, E4, b_dtype, scaling, torch.float32)
    torch.testing.assert_close(scaled_matmul(*args, "emulate"),
                               scaled_matmul(*args, "scaled_mm"), rtol=1e-5, atol=1e-4)


def test_float8_linear_backends_agree_with_gradients():
    torch.manual_seed(3)
    emu = Float8Linear(64, 32, backend="emulate")
    real = Float8Linear(64, 32, backend="scaled_mm")
    real.load_state_dict(emu.state_dict())
    x = torch.randn(16, 64)
    outs = []
    for m in (emu, real):
        xi = x.clone().requires_grad_()
        m(xi).square().sum().backward()
        outs.append((m(x), xi.grad, m.weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
    assert fp8_backend("cpu")[0] == "emulate"


def test_autocast_bf16_output():
    f8 = Float8Linear(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = f8(torch.randn(4, 32))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert f8.weight.grad.dtype == torch.float32  # master weights stay fp32


def test_convert_to_float8(capsys):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64),
                          nn.Linear(64, 10))
    x = torch.randn(8, 32)
    y_ref = model(x)
    w0 = model[0].weight
    out = convert_to_float8(model, module_filter_fn=lambda m, fqn: fqn != "2")
    assert out is model
    assert isinstance(model[0], Float8Linear) and model[0].weight is w0
    assert type(model[2]) is nn.Linear  # filtered out
    assert type(model[3]) is nn.Linear  # 10 outputs: not a multiple of 16
    line = capsys.readouterr().out
    assert "1 Linear -> Float8Linear" in line and "emulate" in line
    # It really quantizes: close to, but not equal to, the fp32 model.
    assert 1e-3 < rel(model(x), y_ref) < 0.06


def test_bad_inputs():
    with pytest.raises(ValueError, match="dtype="):
        to_float8(torch.randn(3), torch.float16)
    with pytest.raises(ValueError, match="x must be"):
        to_float8(torch.arange(3))
    with pytest.raises(ValueError, match="scaling="):
        to_float8(torch.randn(3), scaling="columnwise")
    with pytest.raises(ValueError, match="scaling="):
        Float8Linear(16, 16, scaling="none")
    with pytest.raises(ValueError, match="divisible by 16"):
        scaled_matmul(torch.randn(4, 20), torch.randn(16, 20), E4, E4, "tensorwise",
                      torch.float32, "scaled_mm")


def test_delayed_from_linear_keeps_history_and_refuses_bare_linear():
    lin = nn.Linear(32, 16)
    f8 = Float8Linear.from_linear(lin, scaling="delayed")
    assert f8.weight is lin.weight
    assert f8.hist_x.history.device.type == "cpu" and int(f8.hist_x.seen) == 0
    f8(torch.randn(4, 32)).sum().backward()
    assert int(f8.hist_x.seen) == 1 and int(f8.hist_g.seen) == 1
    assert f8.hist_w.history[0] == lin.weight.detach().abs().max()
    with pytest.raises(ValueError, match="wrap it"):
        convert_to_float8(nn.Linear(16, 16), quiet=True)


def test_delayed_scaling_never_reads_the_device(monkeypatch):
    """``if seen > 0`` used to read a tensor into Python for every operand every
    step; the history and the choice now stay on the device (``torch.where``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    convert_to_float8(model, scaling="delayed", quiet=True)
    reads = count_host_reads(monkeypatch)
    for _ in range(3):
        model(torch.randn(8, 32)).sum().backward()
    assert reads == []
    monkeypatch.undo()
    assert int(model[0].hist_x.seen) == 3 and int(model[2].hist_g.seen) == 3


@pytest.mark.parametrize("scaling", ["tensorwise", "delayed"])
def test_compiles_as_one_graph_and_matches_eager(scaling):
    """The compiled path: ``fullgraph=True`` fails on any graph break (a ``.item()``
    or a tensor used as a bool). aot_eager traces forward and backward as inductor
    would, without needing a C++ compiler."""
    torch.manual_seed(1)
    eager = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    convert_to_float8(eager, scaling=scaling, quiet=True)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    for step in range(3):
        x = torch.randn(8, 32)
        y_e, y_c = eager(x), compiled(x)
        assert torch.equal(y_e, y_c), step
        y_e.square().sum().backward()
        y_c.square().sum().backward()
        assert torch.equal(eager[0].weight.grad, twin[0].weight.grad), step
    if scaling == "delayed":  # the backward's history update ran in the graph too
        assert torch.equal(eager[2].hist_g.history, twin[2].hist_g.history)
        assert int(twin[2].hist_g.seen) == 3


def test_size_filter_keeps_small_matmuls_in_high_precision(capsys):
    """Only linears with both sizes >= min_features become FP8, never the output
    layer; a GPT too small for FP8 to pay is left as it is."""
    model = nn.ModuleDict({"small": nn.Linear(256, 1024), "big": nn.Linear(1024, 4096),
                           "lm_head": nn.Linear(1024, 1024)})
    convert_to_float8(model, module_filter_fn=size_filter())
    assert isinstance(model["big"], Float8Linear)
    assert type(model["small"]) is nn.Linear and type(model["lm_head"]) is nn.Linear
    assert "1 Linear -> Float8Linear" in capsys.readouterr().out
    keep = size_filter(min_features=64, skip=())
    assert keep(nn.Linear(64, 128), "a.lm_head") and not keep(nn.Linear(32, 128), "b")
    with pytest.raises(ValueError, match="min_features"):
        size_filter(min_features=0)


def test_fused_projection_casts_its_input_once(monkeypatch):
    """A fused q/k/v projection is one Float8Linear: its input is cast to FP8 once
    (plus its one weight); three projections cast the same input three times."""
    casts = []
    real = fp8.to_float8
    monkeypatch.setattr(fp8, "to_float8", lambda x, *a, **k: casts.append(
        tuple(x.shape)) or real(x, *a, **k))
    x = torch.randn(2, 8, 64)
    for fused, expected in ((True, 1), (False, 3)):
        attn = MultiHeadAttention(64, 4, fused_qkv=fused)
        convert_to_float8(attn, quiet=True)
        casts.clear()
        attn.project_qkv(x, x, x)
        assert casts.count((16, 64)) == expected, (fused, casts)
    gpt = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=4, n_embd=64))
    convert_to_float8(gpt, quiet=True)
    names = [n for n, m in gpt.named_modules() if isinstance(m, Float8Linear)]
    assert sum(n.endswith("qkv_proj") for n in names) == 2  # one per block
    assert not {n.rsplit(".", 1)[-1] for n in names} & {"q_proj", "k_proj", "v_proj"}


@pytest.mark.gpu
@pytest.mark.parametrize("scaling", ["tensorwise", "delayed"])
def test_training_steps_make_no_host_sync_on_the_gpu(scaling):
    """On CUDA the device itself reports a synchronisation: none may happen in the
    forward and backward of Float8Linear (either backend), after a warm-up step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256)).cuda()
    convert_to_float8(model, scaling=scaling, quiet=True)
    x = torch.randn(64, 256, device="cuda")
    model(x).sum().backward()  # warm-up: lazy initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            model(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(model[0].weight.grad).all()


def test_tile_and_block_scales_by_hand():
    """One scale per 1 x b tile and per b x b block, each from its own amax, checked
    against loops over the tiles; a tile's outlier leaves the other tiles alone."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 32, generator=gen) * torch.logspace(-3, 3, 8)[:, None]
    x[0, 3] = 1e4  # an outlier in the first tile of row 0
    b = 8
    t8, ts = to_float8(x, E4, "tile", block=b)
    _, ks = to_float8(x, E4, "block", block=b)
    assert ts.shape == (8, 4) and ks.shape == (1, 4)
    for r in range(8):
        for c in range(4):
            tile = x[r, c * b:(c + 1) * b]
            assert ts[r, c] == 448 / tile.abs().max()
            want = (tile * ts[r, c]).clamp(-448, 448).to(E4)
            assert torch.equal(t8[r, c * b:(c + 1) * b].float(), want.float())
    for c in range(4):
        assert ks[0, c] == 448 / x[:, c * b:(c + 1) * b].abs().max()
    back = from_float8(t8, ts)
    assert rel(back[0, b:], x[0, b:]) < 0.05  # row 0 beyond the outlier's tile
    assert rel(from_float8(*to_float8(x, E4))[0, b:], x[0, b:]) > 0.5  # tensorwise
    # A square block's scale is the same for the transpose: the weight's trick.
    w = torch.randn(16, 16, generator=gen)
    w8, sw = to_float8(w, E4, "block", block=8)
    wt8, swt = to_float8(w.t(), E4, "block", block=8)
    assert torch.equal(wt8.float(), w8.t().float()) and torch.equal(swt, sw.t())
    with pytest.raises(ValueError, match="divisible"):
        to_float8(torch.randn(4, 20), E4, "tile", block=8)


def test_blockwise_linear_against_tiles_by_hand():
    """Forward and both gradients equal float64 products of the operands quantized
    tile by tile and block by block in loops: x in 1 x b tiles along K, w in b x b
    blocks, the output gradient in tiles along N (grad x) and, with x, along the M
    tokens (grad w); M = 20 is not a multiple of b, the last tile is short."""
    torch.manual_seed(6)
    b, M, K, N = 8, 20, 16, 24
    layer = Float8Linear(K, N, bias=False, scaling="blockwise", block=b)
    w = layer.weight.detach()
    x = (torch.randn(M, K) * torch.logspace(-2, 2, M)[:, None]).requires_grad_()
    gy = torch.randn(M, N) * torch.logspace(1, -1, N)

    def tiles(t):  # t (R, C): each row cut in tiles of b along C, read back
        out = torch.empty_like(t, dtype=torch.float64)
        for r in range(t.shape[0]):
            for c in range(0, t.shape[1], b):
                seg = t[r, c:c + b]
                s = 448 / seg.abs().max()
                out[r, c:c + b] = (seg * s).clamp(-448, 448).to(E4).double() / s
        return out

    def blocks(t):
        out = torch.empty_like(t, dtype=torch.float64)
        for r in range(0, t.shape[0], b):
            for c in range(0, t.shape[1], b):
                seg = t[r:r + b, c:c + b]
                s = 448 / seg.abs().max()
                out[r:r + b, c:c + b] = (seg * s).to(E4).double() / s
        return out

    y = layer(x)
    y.backward(gy)
    xd, wd = x.detach(), w
    torch.testing.assert_close(y.double(), tiles(xd) @ blocks(wd).t(), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(x.grad.double(), tiles(gy) @ blocks(wd), rtol=1e-5,
                               atol=1e-5)
    want_gw = tiles(gy.t().contiguous()) @ tiles(xd.t().contiguous()).t()
    torch.testing.assert_close(layer.weight.grad.double(), want_gw, rtol=1e-5,
                               atol=1e-4)


def test_blockwise_is_emulated_and_checks_sizes(capsys):
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 48))
    convert_to_float8(model, scaling="blockwise")
    assert isinstance(model[0], Float8Linear) and type(model[1]) is nn.Linear
    line = capsys.readouterr().out
    assert "1 kept (sizes not multiples of 128)" in line and "emulate" in line
    assert model[0].resolved_backend(torch.device("cpu")) == "emulate"
    with pytest.raises(ValueError, match="divisible by block"):
        Float8Linear(256, 48, scaling="blockwise")
    with pytest.raises(ValueError, match="emulation only"):
        Float8Linear(256, 256, scaling="blockwise", backend="scaled_mm")
