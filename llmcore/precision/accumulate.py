"""The tensor core's accumulator, emulated: what a narrow running sum does to long
dot products, and how promoting partial sums to fp32 repairs it.

An FP8 tensor core multiplies e4m3 or e5m2 values exactly and adds the products of
each MMA instruction (``mma_k`` of them along K: 32 for FP8 on Hopper) into an
accumulator. On Hopper that accumulator keeps about 14 significant bits, not fp32's
24 (DeepSeek-V3 technical report, 2024, section 3.3.2, which measured a maximum
relative error near 2% for K = 4096). Once the running sum is large, each new
partial sum loses its low bits, and the loss grows with K. DeepSeek-V3's remedy,
*promotion*: every ``N_C = 128`` products the partial sum is added into an fp32
total on the CUDA cores and the accumulator starts again from zero. cuBLAS does the
same unless asked for "fast accumulation" (``torch._scaled_mm(...,
use_fast_accum=True)``), which its documentation describes as faster "at the cost
of lower accuracy because intermediate results will not periodically be promoted to
a higher precision".

This module emulates that model on float64, which holds every intermediate value:
products and the sum of each instruction's products are exact (a modelling choice),
the accumulator is cut to ``acc_bits`` significant bits after every addition, and
the promoted total is rounded to fp32. NVIDIA does not document how the accumulator
rounds, so both round-to-nearest-even and truncation (toward zero) are offered.
"""

from __future__ import annotations

import torch

ROUNDINGS = ("nearest", "truncate")


def round_significand(x: torch.Tensor, bits: int,
                      rounding: str = "nearest") -> torch.Tensor:
    """``x`` (float64) cut to ``bits`` significant bits, exponent unbounded:
    to nearest with ties to even, or toward zero."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r}; use one of {ROUNDINGS}")
    if not (isinstance(bits, int) and 1 <= bits <= 53):
        raise ValueError(f"bits={bits!r} must be an int in [1, 53] (53: float64)")
    _, e = torch.frexp(x)  # x = f * 2**e with 0.5 <= |f| < 1: bits above 2**(e-bits)
    quantum = torch.exp2((e - bits).double())
    q = x / quantum
    q = torch.round(q) if rounding == "nearest" else torch.trunc(q)
    return q * quantum


def accumulated_matmul(a: torch.Tensor, b_t: torch.Tensor, acc_bits: int = 14,
                       mma_k: int = 32, promote_every: int | None = None,
                       rounding: str = "nearest") -> torch.Tensor:
    """``a @ b_t.T`` (float64) for ``a`` (M, K) and ``b_t`` (N, K) as a tensor core
    with an ``acc_bits``-bit accumulator sums it: each instruction's ``mma_k``
    products are added exactly, then into the accumulator, which is rounded; with
    ``promote_every`` (a multiple of ``mma_k``) the accumulator is added into an fp32
    total every that many products and cleared. Pass operands already in FP8 (their
    values as floats): the products are then exact."""
    if a.dim() != 2 or b_t.dim() != 2 or a.shape[1] != b_t.shape[1]:
        raise ValueError(f"a (M, K) and b_t (N, K) must share K, got {tuple(a.shape)} "
                         f"and {tuple(b_t.shape)}")
    k = a.shape[1]
    if not (isinstance(mma_k, int) and mma_k > 0):
        raise ValueError(f"mma_k={mma_k!r} must be a positive int")
    if promote_every is not None and (promote_every <= 0 or promote_every % mma_k):
        raise ValueError(f"promote_every={promote_every!r} must be a positive multiple "
                         f"of mma_k={mma_k} (promotion happens between instructions)")
    a, b_t = a.double(), b_t.double()
    total = torch.zeros(a.shape[0], b_t.shape[0], dtype=torch.float64)  # (M, N)
    acc = torch.zeros_like(total)
    for start in range(0, k, mma_k):
        part = a[:, start:start + mma_k] @ b_t[:, start:start + mma_k].t()  # exact
        acc = round_significand(acc + part, acc_bits, rounding)
        done = start + mma_k
        if promote_every is not None and (done % promote_every == 0 or done >= k):
            total = (total + acc).float().double()  # fp32 addition on the CUDA cores
            acc = torch.zeros_like(acc)
    return total if promote_every is not None else acc
