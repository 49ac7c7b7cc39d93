"""MX block formats: 32 narrow floats sharing one power-of-two scale.

The OCP Microscaling (MX) specification (v1.0, 2023; Rouhani et al., 2023,
"Microscaling Data Formats for Deep Learning") stores a tensor in blocks of
``k = 32`` consecutive values along one dimension. A block holds one shared scale
``X = 2**e`` in E8M0 (8 exponent bits, no sign, no mantissa: bias 127, the pattern
0xFF is NaN) and 32 elements ``P_i`` in an element format: FP8 (E4M3, E5M2), FP6
(E3M2, E2M3) or FP4 (E2M1). A value reads back as ``X * P_i``.

The spec's conversion (its section 6.3) takes the shared exponent from the largest
magnitude of the block, ``e = floor(log2(amax)) - emax_elem``, where ``emax_elem`` is
the exponent of the element format's largest normal number; so the block's largest
value lands in the element format's top binade. Each ``V_i / X`` is then rounded to
the element format, to nearest with ties to even, and a value past the element's
largest magnitude saturates to it (the top binade can reach past the maximum: 7 in
E2M1, whose largest value is 6). ``e`` outside E8M0's [-127, 127] clamps at the
bottom and is NaN at the top, as is the scale of a block holding inf or NaN.
``scale_rule="ceil"`` rounds the scale up instead, so that no element saturates
(Mishra, Stosic and Layton, 2025, "Recipes for Pre-training LLMs with MXFP8", found
that the spec's rule can make pre-training diverge and this one does not).

Everything is emulated on float64, which holds every value involved exactly: the
bit patterns are those a device with MX support stores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmcore.precision.formats import (E2M1, E2M3, E3M2, E4M3, E5M2, FloatFormat,
                                       decode, encode)

E8M0_BIAS = 127  # scale = 2 ** (code - 127); code 255 is NaN
E8M0_NAN = 255


@dataclass(frozen=True)
class MXFormat:
    """An MX format: an element format and the size of the blocks sharing a scale."""

    name: str  # "mxfp8_e4m3", "mxfp4", ...
    element: FloatFormat  # the format of each element
    block: int = 32  # values per shared scale (the spec fixes 32)

    def __post_init__(self):
        if not (isinstance(self.block, int) and self.block > 0):
            raise ValueError(f"{self.name}: block must be a positive int, got "
                             f"{self.block!r}")

    @property
    def emax_elem(self) -> int:
        """Exponent of the element format's largest normal binade."""
        return self.element.emax

    @property
    def bits_per_value(self) -> float:
        """Storage per value: the element plus its share of the 8-bit scale."""
        return self.element.bits + 8 / self.block


MXFP8_E4M3 = MXFormat("mxfp8_e4m3", E4M3)
MXFP8_E5M2 = MXFormat("mxfp8_e5m2", E5M2)
MXFP6_E3M2 = MXFormat("mxfp6_e3m2", E3M2)
MXFP6_E2M3 = MXFormat("mxfp6_e2m3", E2M3)
MXFP4 = MXFormat("mxfp4", E2M1)
MX_FORMATS = {f.name: f for f in (MXFP8_E4M3, MXFP8_E5M2, MXFP6_E3M2, MXFP6_E2M3,
                                  MXFP4)}
SCALE_RULES = ("floor", "ceil")


@dataclass
class MXTensor:
    """A tensor in an MX format: element bit patterns and E8M0 scale codes."""

    codes: torch.Tensor  # (..., K) uint8: each element's bit pattern
    scales: torch.Tensor  # (..., K // block) uint8: E8M0 codes
    fmt: MXFormat  # the format the codes are in

    def nbytes(self) -> int:
        """Bytes as stored: elements packed at their width, one byte per scale."""
        return (self.codes.numel() * self.fmt.element.bits + 7) // 8 + \
            self.scales.numel()


def get_mx_format(fmt: MXFormat | str) -> MXFormat:
    if isinstance(fmt, MXFormat):
        return fmt
    if fmt not in MX_FORMATS:
        raise ValueError(f"fmt={fmt!r} is not an MX format; use one of "
                         f"{list(MX_FORMATS)}")
    return MX_FORMATS[fmt]


def e8m0_decode(codes: torch.Tensor) -> torch.Tensor:
    """The float64 values of E8M0 codes: ``2 ** (code - 127)``, NaN for 255."""
    c = codes.long()
    value = torch.exp2((c - E8M0_BIAS).double())
    return torch.where(c == E8M0_NAN, torch.nan, value)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` as float64, reshaped to (..., K // block, block)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    k = x.shape[-1] if x.dim() else 1
    if x.dim() == 0 or k % block:
        raise ValueError(f"the last dimension of x ({k}) must be a multiple of the "
                         f"block size {block}; pad it or pick another layout")
    return x.double().reshape(*x.shape[:-1], k // block, block)


def shared_exponent(amax: torch.Tensor, fmt: MXFormat | str,
                    scale_rule: str = "floor") -> torch.Tensor:
    """E8M0 codes (int64) of the scales for blocks whose largest magnitude is amax.

    ``"floor"`` is the spec's ``floor(log2(amax)) - emax_elem``; ``"ceil"`` the
    smallest power of two that maps amax to at most the element's largest value.
    """
    fmt = get_mx_format(fmt)
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"scale_rule={scale_rule!r}; use one of {SCALE_RULES}")
    a = amax.double()
    _, e = torch.frexp(a)  # a = f * 2**e, 0.5 <= f < 1: floor(log2(a)) = e - 1
    if scale_rule == "floor":
        shared = e - 1 - fmt.emax_elem
    else:  # the exact ceil(log2(a / max)): frexp of the quotient, one down if exact
        f, q = torch.frexp(a / fmt.element.max)
        shared = torch.where(f == 0.5, q - 1, q)
    shared = torch.where(a == 0, -E8M0_BIAS, shared).clamp(min=-E8M0_BIAS)
    bad = ~a.isfinite() | (shared > E8M0_BIAS)  # inf or NaN in the block; too big
    return torch.where(bad, E8M0_NAN, shared + E8M0_BIAS).long()


def mx_quantize(x: torch.Tensor, fmt: MXFormat | str = "mxfp8_e4m3",
                scale_rule: str = "floor") -> MXTensor:
    """``x`` in an MX format, blocks along the last dimension (spec section 6.3)."""
    fmt = get_mx_format(fmt)
    v = _blocks(x, fmt.block)  # (..., K / 32, 32)
    codes = shared_exponent(v.abs().amax(dim=-1), fmt, scale_rule)  # (..., K / 32)
    scale = e8m0_decode(codes).unsqueeze(-1)  # (..., K / 32, 1)
    # A NaN scale marks the whole block; its elements are stored as zeros.
    p = torch.where(scale.isnan(), 0.0, v / scale)
    elements = encode(p, fmt.element, saturate=True)  # RNE, then saturation
    return MXTensor(elements.reshape(x.shape).to(torch.uint8),
                    codes.to(torch.uint8), fmt)


def mx_dequantize(t: MXTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values ``X * P_i`` of an ``MXTensor``, in ``dtype``."""
    block = t.fmt.block
    p = decode(t.codes.long(), t.fmt.element)
    p = p.reshape(*p.shape[:-1], p.shape[-1] // block, block)  # (..., K / 32, 32)
    x = p * e8m0_decode(t.scales).unsqueeze(-1)
    return x.reshape(t.codes.shape).to(dtype)


def mx_round(x: torch.Tensor, fmt: MXFormat | str = "mxfp8_e4m3",
             scale_rule: str = "floor") -> torch.Tensor:
    """``x`` rounded to an MX format and read back, in ``x``'s dtype."""
    return mx_dequantize(mx_quantize(x, fmt, scale_rule), x.dtype)
