"""Slow, clear references the tests check the library against (not part of it)."""

import torch
from torch import Tensor

from llmcore.precision.formats import get_format


def rope_reference(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """RoPE through complex numbers, z_i = x[i] + j x[i + hs/2], z_i *= e^(j p theta_i).

    A float64 reference for the rotary embedding; slow and clear.
    """
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    theta = base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    z = z * torch.polar(torch.ones_like(theta), positions.double()[:, None] * theta)
    return torch.cat([z.real, z.imag], dim=-1)


def to_bits(x: torch.Tensor) -> torch.Tensor:
    """The bit patterns (int64, non-negative) of a torch tensor in its own dtype."""
    fmt = get_format(x.dtype)
    as_int = {8: torch.uint8, 16: torch.int16, 32: torch.int32}[fmt.bits]
    return x.view(as_int).long() & (2 ** fmt.bits - 1)
