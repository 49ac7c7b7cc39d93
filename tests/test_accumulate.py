"""The narrow-accumulator emulation against sequential sums done by hand."""

import numpy as np
import pytest
import torch

from llmcore.precision.accumulate import accumulated_matmul, round_significand


def sums(terms: torch.Tensor, **kw) -> float:
    """A sum of terms as the emulated tensor core adds it (terms times ones)."""
    row = terms.double().view(1, -1)
    return accumulated_matmul(row, torch.ones_like(row), **kw).item()


def test_24_bits_one_product_at_a_time_is_float32():
    gen = torch.Generator().manual_seed(0)
    terms = (torch.randn(3000, generator=gen) * torch.exp2(
        torch.randint(-8, 8, (3000,), generator=gen).float())).float()
    acc = np.float32(0)
    for t in terms.numpy():  # numpy's float32 addition: IEEE round to nearest even
        acc = np.float32(acc + t)
    assert sums(terms, acc_bits=24, mma_k=1) == float(acc)


def test_53_bits_is_float64():
    terms = torch.rand(1000, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)
    acc = 0.0
    for t in terms.tolist():
        acc += t
    assert sums(terms, acc_bits=53, mma_k=1) == acc


def test_small_terms_stall_and_promotion_recovers_them():
    """1 + 2047 terms of 2**-15: half a 14-bit ulp of 1, so each one rounds away (a
    tie, to the even 1) or truncates away; promotion every 128 products restarts the
    narrow sum, which then holds 128 terms exactly: only the first chunk's are lost."""
    terms = torch.full((2048,), 2.0 ** -15, dtype=torch.float64)
    terms[0] = 1.0
    for rounding in ("nearest", "truncate"):
        assert sums(terms, acc_bits=14, mma_k=1, rounding=rounding) == 1.0
        promoted = sums(terms, acc_bits=14, mma_k=1, promote_every=128,
                        rounding=rounding)
        assert promoted == 1.0 + (2048 - 128) * 2.0 ** -15
    # Instructions add their products exactly: 32 at once pass half an ulp.
    assert sums(terms, acc_bits=14, mma_k=32) > 1.0


def test_round_significand_by_hand():
    x = torch.tensor([1 + 2.0 ** -13, 1 + 3 * 2.0 ** -14, -(1 + 3 * 2.0 ** -14), 0.0],
                     dtype=torch.float64)
    # 14 significant bits: spacing 2**-13 above 1; 1 + 1.5 * 2**-13 is a tie.
    assert round_significand(x, 14).tolist() == [1 + 2.0 ** -13, 1 + 2.0 ** -12,
                                                 -(1 + 2.0 ** -12), 0.0]
    assert round_significand(x, 14, "truncate").tolist() == [
        1 + 2.0 ** -13, 1 + 2.0 ** -13, -(1 + 2.0 ** -13), 0.0]


def test_error_grows_with_k_and_promotion_bounds_it():
    gen = torch.Generator().manual_seed(2)
    err = {}
    for k in (256, 8192):
        a = torch.rand(8, k, generator=gen, dtype=torch.float64)
        b = torch.rand(8, k, generator=gen, dtype=torch.float64)
        exact = a @ b.t()
        for promote in (None, 128):
            y = accumulated_matmul(a, b, acc_bits=14, rounding="truncate",
                                   promote_every=promote)
            err[k, promote] = ((y - exact).abs() / exact).max().item()
    assert err[8192, None] > 10 * err[256, None]  # truncation: error ~ K
    assert err[8192, 128] < 2 * err[256, 128]  # promoted: flat in K


def test_bad_arguments():
    a = torch.ones(2, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match="promote_every"):
        accumulated_matmul(a, a, promote_every=100)
    with pytest.raises(ValueError, match="share K"):
        accumulated_matmul(a, torch.ones(2, 32))
    with pytest.raises(ValueError, match="rounding="):
        round_significand(a, 14, "up")
    with pytest.raises(ValueError, match="bits="):
        round_significand(a, 0)
