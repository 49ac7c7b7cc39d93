"""Number formats: tables against torch.finfo, every FP8 value and random casts."""

import pytest
import torch
from references import to_bits

from book.workers.formats import bit_string, format_table
from llmcore.precision.formats import (BF16, E4M3, E5M2, FORMATS, FP16, FP32, TF32,
                                       all_values, decode, encode, from_bits,
                                       get_format, round_to_format, split_bits)

TORCH_FORMATS = [f for f in FORMATS.values() if f.torch_dtype is not None]


@pytest.mark.parametrize("fmt", TORCH_FORMATS, ids=lambda f: f.name)
def test_table_matches_finfo(fmt):
    row = {r["format"]: r for r in format_table()}[fmt.name]
    fi = torch.finfo(fmt.torch_dtype)
    assert row["bits"] == fi.bits
    assert row["max"] == fi.max == fmt.max
    assert row["min_normal"] == fi.smallest_normal == fmt.min_normal
    assert row["eps"] == fi.eps == fmt.eps
    smallest = from_bits(torch.tensor([1]), fmt.torch_dtype).double().item()
    assert row["min_subnormal"] == smallest == fmt.min_subnormal


def test_tf32_has_fp32_range_and_fp16_precision():
    row = {r["format"]: r for r in format_table()}
    assert row["tf32"]["min_normal"] == row["fp32"]["min_normal"]
    assert row["tf32"]["eps"] == row["fp16"]["eps"]
    assert row["tf32"]["max"] == pytest.approx(row["fp32"]["max"], rel=1e-3)
    assert TF32.bits == 19


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_every_fp8_pattern_decodes_like_torch(fmt):
    bits = torch.arange(256)
    ours = all_values(fmt)
    theirs = from_bits(bits, fmt.torch_dtype).double()
    assert torch.equal(ours.isnan(), theirs.isnan())
    ok = ~ours.isnan()
    assert torch.equal(ours[ok], theirs[ok])
    # Encoding each value gives back its own pattern (NaNs and -0 aside).
    back = encode(ours, fmt)
    finite = ok & (ours != 0)
    assert torch.equal(back[finite], bits[finite])


def test_nan_counts():
    assert all_values(E4M3).isnan().sum() == 2  # only S.1111.111
    assert all_values(E5M2).isnan().sum() == 6  # mantissa != 0 at the top exponent
    assert all_values(E5M2).isinf().sum() == 2
    assert all_values(E4M3).isinf().sum() == 0


def random_floats(n, gen):
    """Values over many binades, plus exact ties between neighbours."""
    mag = torch.exp2(torch.empty(n).uniform_(-30, 30, generator=gen))
    x = mag * torch.randn(n, generator=gen).sign()
    return x.float()


@pytest.mark.parametrize("fmt", TORCH_FORMATS[1:], ids=lambda f: f.name)
def test_encode_matches_torch_cast(fmt):
    gen = torch.Generator().manual_seed(0)
    x = random_floats(20000, gen)
    saturate = fmt is E4M3  # torch's cast to e4m3fn saturates; the others overflow
    ours = round_to_format(x, fmt, saturate=saturate)
    theirs = x.to(fmt.torch_dtype).double()
    assert torch.equal(ours.isinf(), theirs.isinf())
    fin = ours.isfinite()
    assert torch.equal(ours[fin], theirs[fin])
    bits = encode(x, fmt, saturate=saturate)
    assert torch.equal(bits[fin], to_bits(x.to(fmt.torch_dtype))[fin])


def test_fp32_rounding_from_float64():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10000, dtype=torch.float64, generator=gen) * 1e3
    assert torch.equal(round_to_format(x, FP32), x.float().double())


@pytest.mark.parametrize("fmt", TORCH_FORMATS[1:], ids=lambda f: f.name)
def test_ties_round_to_even(fmt):
    # Midpoints between consecutive values of fmt, all representable in fp32.
    vals = decode(torch.arange(1, 2 ** (fmt.bits - 1) - 2 ** fmt.man_bits - 1), fmt)
    vals = vals[vals.isfinite()]
    mids = ((vals[:-1] + vals[1:]) / 2).float()
    ours = round_to_format(mids, fmt)
    theirs = mids.to(fmt.torch_dtype).double()
    assert torch.equal(ours, theirs)
    # The winner of every tie has an even mantissa.
    _, _, man = split_bits(encode(mids, fmt), fmt)
    assert bool((man % 2 == 0).all())


def test_overflow_and_saturation():
    x = torch.tensor([447.0, 464.0, 465.0, 500.0, 1e6, float("inf"), -1e6])
    assert round_to_format(x, E4M3, saturate=True).tolist() == [
        448.0, 448.0, 448.0, 448.0, 448.0, 448.0, -448.0]
    assert x.to(torch.float8_e4m3fn).double().tolist() == [
        448.0, 448.0, 448.0, 448.0, 448.0, 448.0, -448.0]
    # Without saturation e4m3fn has nowhere to go but NaN: it has no inf.
    assert round_to_format(x, E4M3).isnan().tolist() == [
        False, False, True, True, True, True, True]
    y = torch.tensor([57344.0, 61439.0, 61440.0, 1e6])
    assert round_to_format(y, E5M2).tolist() == [57344.0, 57344.0, float("inf"),
                                                 float("inf")]
    assert y.to(torch.float8_e5m2).double().tolist() == [57344.0, 57344.0,
                                                         float("inf"), float("inf")]
    assert round_to_format(torch.tensor([65519.0, 65520.0]), FP16).tolist() == [
        65504.0, float("inf")]


def test_underflow_to_subnormal_and_zero():
    tiny = FP16.min_subnormal
    x = torch.tensor([tiny, tiny * 0.5, tiny * 0.51, tiny * 1.5, 1e-10])
    assert round_to_format(x, FP16).tolist() == [tiny, 0.0, tiny, 2 * tiny, 0.0]
    assert torch.equal(round_to_format(x, FP16), x.half().double())


def test_bf16_matches_torch_on_float32_inputs():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(10000, generator=gen) * 1e20
    assert torch.equal(round_to_format(x, BF16), x.bfloat16().double())


def test_bit_strings_and_lookup():
    assert bit_string(encode(torch.tensor(448.0), E4M3).item(), E4M3) == "0 1111 110"
    assert bit_string(encode(torch.tensor(-1.0), FP16).item(), FP16) == \
        "1 01111 0000000000"
    assert get_format(torch.bfloat16) is BF16 and get_format("e5m2") is E5M2
    with pytest.raises(ValueError, match="fmt="):
        get_format(torch.int8)
