"""MX block formats against the spec's tables, brute-force rounding, torch's casts."""

import math

import pytest
import torch

from llmcore.precision.formats import (E2M1, E2M3, E3M2, E4M3, E5M2, all_values,
                                       split_bits)
from llmcore.precision.mx import (MX_FORMATS, MXFP4, MXFP8_E4M3, MXTensor,
                                  e8m0_decode, mx_dequantize, mx_quantize, mx_round,
                                  shared_exponent)

FORMATS = list(MX_FORMATS.values())


def test_element_formats_match_the_spec_tables():
    """OCP MX v1.0, section 5.3: largest, smallest normal, smallest subnormal."""
    spec = {E2M1: (6.0, 1.0, 0.5), E2M3: (7.5, 1.0, 0.125),
            E3M2: (28.0, 0.25, 0.0625), E4M3: (448.0, 2.0 ** -6, 2.0 ** -9),
            E5M2: (57344.0, 2.0 ** -14, 2.0 ** -16)}
    for fmt, (top, normal, sub) in spec.items():
        v = all_values(fmt)
        pos = v[(v > 0) & v.isfinite()]
        assert (pos.max().item(), pos.min().item()) == (top, sub), fmt.name
        assert (fmt.max, fmt.min_normal, fmt.min_subnormal) == (top, normal, sub)
    # FP4 in full, and FP6/FP4 have no NaN and no inf: every pattern is a number.
    assert all_values(E2M1)[:8].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    for fmt in (E2M1, E2M3, E3M2):
        assert all_values(fmt).isfinite().all()


def test_e8m0_decodes_like_torch():
    codes = torch.arange(256)
    ours = e8m0_decode(codes)
    theirs = codes.to(torch.uint8).view(torch.float8_e8m0fnu).double()
    assert torch.equal(ours.isnan(), theirs.isnan()) and ours.isnan().sum() == 1
    ok = ~ours.isnan()
    assert torch.equal(ours[ok], theirs[ok])


def brute_force_element(y: torch.Tensor, fmt) -> torch.Tensor:
    """Bit patterns of y rounded to fmt by searching every value: the nearest wins,
    a tie goes to the pattern with an even mantissa, beyond the range saturates."""
    codes = torch.arange(2 ** fmt.bits)
    values = all_values(fmt)
    keep = values.isfinite()
    codes, values = codes[keep], values[keep]
    y = y.double().clamp(-fmt.max, fmt.max)
    dist = (y[:, None] - values[None, :]).abs()  # (n, patterns)
    best = dist.min(dim=1, keepdim=True).values
    tied = dist == best
    _, _, man = split_bits(codes, fmt)
    even = tied & (man % 2 == 0)[None, :]
    pick = torch.where(even.any(dim=1, keepdim=True), even, tied)
    # among equal candidates (+0 / -0) take the one with y's sign
    sign_ok = (codes >= 2 ** (fmt.bits - 1))[None, :] == (y < 0)[:, None]
    pick = torch.where((pick & sign_ok).any(dim=1, keepdim=True), pick & sign_ok, pick)
    return codes[pick.float().argmax(dim=1)]


def reference_exponent(amax: float, emax: int) -> int:
    """The E8M0 code of the spec's scale, by searching powers of two."""
    if amax == 0:
        return 0
    if not math.isfinite(amax):
        return 255
    e = -200
    while 2.0 ** (e + 1) <= amax:  # the largest e with 2**e <= amax: floor(log2)
        e += 1
    shared = max(e - emax, -127)
    return 255 if shared > 127 else shared + 127


def sample(gen, rows=8, k=64):
    """Blocks of very different magnitudes, with exact ties and zeros inside."""
    x = torch.randn(rows, k, generator=gen) * torch.exp2(
        torch.randint(-20, 20, (rows, 1), generator=gen).float())
    x[:, 3] = 0.0
    return x.float()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_quantize_matches_brute_force(fmt):
    gen = torch.Generator().manual_seed(0)
    x = sample(gen)
    # Exact midpoints between neighbouring element values, all over the range, in a
    # block whose largest value, the element's maximum, makes its scale 1.
    v = all_values(fmt.element)
    v = torch.unique(v[v.isfinite() & (v >= 0)])
    mids = (v[:-1] + v[1:]) / 2
    mids = mids[torch.linspace(0, mids.numel() - 1, 31).long().unique()]
    x[0, :mids.numel()] = mids.float()
    x[0, 31] = float(v.max())
    x[1, :mids.numel()] = -mids.float()
    x[1, 31] = -float(v.max())
    t = mx_quantize(x, fmt)
    assert t.scales[:2, 0].tolist() == [127, 127]
    for r in range(x.shape[0]):
        for b in range(x.shape[1] // 32):
            block = x[r, 32 * b:32 * b + 32].double()
            code = reference_exponent(block.abs().max().item(), fmt.element.emax)
            assert t.scales[r, b].item() == code, (r, b)
            want = brute_force_element(block / 2.0 ** (code - 127), fmt.element)
            assert torch.equal(t.codes[r, 32 * b:32 * b + 32].long(), want), (r, b)


@pytest.mark.parametrize("fmt,dtype", [(MXFP8_E4M3, torch.float8_e4m3fn),
                                       (MX_FORMATS["mxfp8_e5m2"], torch.float8_e5m2)])
def test_fp8_elements_are_torch_casts(fmt, dtype):
    gen = torch.Generator().manual_seed(1)
    x = sample(gen, rows=64, k=128)
    t = mx_quantize(x, fmt)
    scale = e8m0_decode(t.scales).repeat_interleave(32, dim=-1)
    fmax = torch.finfo(dtype).max
    theirs = (x.double() / scale).clamp(-fmax, fmax).to(dtype)
    assert torch.equal(t.codes, theirs.view(torch.uint8))
    assert torch.equal(mx_dequantize(t, torch.float64), theirs.double() * scale)


def test_floor_rule_saturates_and_ceil_rule_does_not():
    x = torch.ones(1, 32)
    x[0, 0] = 7.0  # floor(log2 7) = 2 = E2M1's emax: scale 1, and 7 > 6 saturates
    assert mx_round(x, MXFP4)[0, :2].tolist() == [6.0, 1.0]
    assert mx_round(x, MXFP4, "ceil")[0, :2].tolist() == [8.0, 1.0]  # scale 2: 4 * 2
    gen = torch.Generator().manual_seed(2)
    for fmt in FORMATS:
        y = sample(gen)
        t = mx_quantize(y, fmt, "ceil")
        scale = e8m0_decode(t.scales)
        amax = y.double().abs().reshape(*y.shape[:-1], -1, 32).amax(-1)
        assert (amax <= fmt.element.max * scale).all()  # never past the maximum
        assert ((amax > fmt.element.max * scale / 2) | (amax == 0)).all()  # tight


def test_special_blocks():
    x = torch.zeros(3, 64)
    x[0, 5] = float("inf")  # a block holding inf (or NaN) gets the NaN scale
    x[1, 32:] = 1e-40  # a tiny block: the scale clamps at 2**-127
    x[2, :32] = 3e38  # floor(log2) = 127, minus emax: fits
    t = mx_quantize(x, MXFP8_E4M3)
    assert t.scales.tolist() == [[255, 0], [0, 0], [127 + 127 - 8, 0]]
    y = mx_dequantize(t)
    assert y[0, :32].isnan().all() and (y[0, 32:] == 0).all()
    assert (y[1, 32:] > 0).all()  # 1e-40 / 2**-127 is a normal e4m3 value
    assert torch.equal(shared_exponent(torch.tensor([2.0 ** 200]), MXFP4),
                       torch.tensor([255]))  # beyond E8M0: NaN
    assert isinstance(t, MXTensor) and t.nbytes() == 3 * 64 + 6
    assert mx_quantize(x, MXFP4).nbytes() == 3 * 64 // 2 + 6


def test_bad_inputs():
    with pytest.raises(ValueError, match="multiple of the block"):
        mx_quantize(torch.randn(4, 30))
    with pytest.raises(ValueError, match="fmt="):
        mx_quantize(torch.randn(4, 32), "mxfp5")
    with pytest.raises(ValueError, match="scale_rule="):
        mx_quantize(torch.randn(4, 32), scale_rule="round")
    with pytest.raises(ValueError, match="floating-point"):
        mx_quantize(torch.arange(32))
