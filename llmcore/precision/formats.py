"""Binary floating-point formats, bit by bit: fp32, tf32, fp16, bf16, the two FP8s and
the FP6 and FP4 elements of the MX formats.

A float is ``sign | exponent | mantissa``. With ``e`` exponent bits the stored exponent
``E`` has a bias ``2**(e-1) - 1``; a normal number is ``(-1)**s * 1.m * 2**(E - bias)``
and ``E == 0`` holds the subnormals ``(-1)**s * 0.m * 2**(1 - bias)``. IEEE 754 formats
keep the all-ones exponent for infinity and NaN. The OCP FP8 format E4M3FN ("finite,
NaN") has no infinity: it spends the all-ones exponent on numbers and keeps only
``S.1111.111`` for NaN, which stretches its range to 448 (Micikevicius et al., 2022,
"FP8 Formats for Deep Learning"). The FP6 (E2M3, E3M2) and FP4 (E2M1) formats of the
OCP Microscaling specification (2023) keep neither: every pattern is a number.

Everything here works on float64 tensors, which hold every value of these formats
exactly, so the encoders double as exact references for torch's own casts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format described by its field widths."""

    name: str  # short name used in tables: "fp32", "e4m3fn", ...
    exp_bits: int  # width of the exponent field
    man_bits: int  # width of the mantissa (fraction) field, without the implicit 1
    has_inf: bool  # IEEE-style: the all-ones exponent means inf (mantissa 0) or NaN
    torch_dtype: torch.dtype | None  # the matching torch dtype (None: tf32, FP6, FP4)
    has_nan: bool = True  # False: no NaN pattern either (FP6, FP4); overflow saturates

    def __post_init__(self):
        if self.exp_bits < 2 or self.man_bits < 1:
            raise ValueError(f"{self.name}: exp_bits must be >= 2 and man_bits >= 1, "
                             f"got {self.exp_bits} and {self.man_bits}")
        if self.has_inf and not self.has_nan:
            raise ValueError(f"{self.name}: a format with inf has NaN too (IEEE 754); "
                             "pass has_nan=True")

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite number."""
        top = 2 ** self.exp_bits - 1  # the all-ones exponent field
        return (top - 1 if self.has_inf else top) - self.bias

    @property
    def max(self) -> float:
        # NaN without inf takes only the all-ones mantissa at the top exponent.
        nan_on_top = self.has_nan and not self.has_inf
        frac = 2 - 2.0 ** -self.man_bits * (2 if nan_on_top else 1)
        return frac * 2.0 ** self.emax

    @property
    def min_normal(self) -> float:
        return 2.0 ** self.emin

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.man_bits)

    @property
    def eps(self) -> float:
        """Distance from 1.0 to the next larger number: the precision."""
        return 2.0 ** -self.man_bits


FP32 = FloatFormat("fp32", 8, 23, True, torch.float32)
TF32 = FloatFormat("tf32", 8, 10, True, None)  # fp32's range, fp16's precision
FP16 = FloatFormat("fp16", 5, 10, True, torch.float16)
BF16 = FloatFormat("bf16", 8, 7, True, torch.bfloat16)
E4M3 = FloatFormat("e4m3fn", 4, 3, False, torch.float8_e4m3fn)
E5M2 = FloatFormat("e5m2", 5, 2, True, torch.float8_e5m2)
FORMATS = {f.name: f for f in (FP32, TF32, FP16, BF16, E4M3, E5M2)}
# The element formats of MXFP6 and MXFP4: all 64 or 16 patterns are numbers.
E3M2 = FloatFormat("e3m2", 3, 2, False, None, has_nan=False)
E2M3 = FloatFormat("e2m3", 2, 3, False, None, has_nan=False)
E2M1 = FloatFormat("e2m1", 2, 1, False, None, has_nan=False)
SMALL_FORMATS = {f.name: f for f in (E3M2, E2M3, E2M1)}


def get_format(fmt: FloatFormat | str | torch.dtype) -> FloatFormat:
    """A ``FloatFormat`` from itself, its name or its torch dtype."""
    if isinstance(fmt, FloatFormat):
        return fmt
    for f in (*FORMATS.values(), *SMALL_FORMATS.values()):
        if fmt == f.name or (isinstance(fmt, torch.dtype) and fmt == f.torch_dtype):
            return f
    raise ValueError(f"fmt={fmt!r} is not a known format; use one of "
                     f"{list(FORMATS) + list(SMALL_FORMATS)} or their torch dtypes")


def split_bits(bits: torch.Tensor, fmt) -> tuple[torch.Tensor, ...]:
    """The (sign, exponent, mantissa) fields of integer bit patterns."""
    fmt = get_format(fmt)
    bits = torch.as_tensor(bits, dtype=torch.int64) & (2 ** fmt.bits - 1)
    mantissa = bits & (2 ** fmt.man_bits - 1)
    exponent = (bits >> fmt.man_bits) & (2 ** fmt.exp_bits - 1)
    sign = bits >> (fmt.bits - 1)
    return sign, exponent, mantissa


def decode(bits: torch.Tensor, fmt) -> torch.Tensor:
    """The values (float64) of integer bit patterns in format ``fmt``."""
    fmt = get_format(fmt)
    sign, exponent, mantissa = split_bits(bits, fmt)
    m = mantissa.double() * 2.0 ** -fmt.man_bits
    normal = (1 + m) * torch.exp2((exponent - fmt.bias).double())
    subnormal = m * 2.0 ** fmt.emin
    value = torch.where(exponent == 0, subnormal, normal)
    top = exponent == 2 ** fmt.exp_bits - 1
    if fmt.has_inf:
        value = torch.where(top & (mantissa == 0), torch.inf, value)
        value = torch.where(top & (mantissa != 0), torch.nan, value)
    elif fmt.has_nan:
        value = torch.where(top & (mantissa == 2 ** fmt.man_bits - 1), torch.nan, value)
    return torch.where(sign == 1, -value, value)


def round_to_format(x: torch.Tensor, fmt, saturate: bool = False) -> torch.Tensor:
    """Round ``x`` to the nearest value of ``fmt``, ties to even (IEEE 754 default).

    The result is float64. Magnitudes past the largest finite value become inf when the
    format has one, NaN when it has none; ``saturate=True`` clamps them (and inf) to
    +-max instead, which is what this torch's cast to ``float8_e4m3fn`` does. A format
    with neither inf nor NaN (FP6, FP4) can only saturate.
    """
    fmt = get_format(fmt)
    x = torch.as_tensor(x).double()
    _, e = torch.frexp(x)  # x = f * 2**e with 0.5 <= |f| < 1: the binade is e - 1
    e = torch.clamp(e - 1, min=fmt.emin)  # below emin the spacing is fixed: subnormals
    quantum = torch.exp2((e - fmt.man_bits).double())
    y = torch.round(x / quantum) * quantum  # torch.round rounds half to even
    # IEEE overflow: a result past max (after rounding, unbounded exponent) is inf.
    over = y.abs() > fmt.max
    if saturate or not fmt.has_nan:
        y = torch.where(over | x.isinf(), x.sign() * fmt.max, y)
    else:
        big = torch.inf if fmt.has_inf else torch.nan
        y = torch.where(over, x.sign() * big, y)
    return torch.where(x.isnan(), x, y)


def encode(x: torch.Tensor, fmt, saturate: bool = False) -> torch.Tensor:
    """Round ``x`` to ``fmt`` and return the bit patterns as int64."""
    fmt = get_format(fmt)
    y = round_to_format(x, fmt, saturate)
    if not fmt.has_nan and bool(y.isnan().any()):
        raise ValueError(f"x holds NaN, which {fmt.name} cannot encode (it has no "
                         "NaN); an MX block marks NaN in its scale instead")
    sign = (torch.signbit(y)).long()
    a = y.abs()
    _, e = torch.frexp(a)
    e = e - 1
    normal = a >= fmt.min_normal
    exp_field = torch.where(normal, e + fmt.bias, 0)
    scale = torch.exp2(torch.where(normal, e, fmt.emin).double())
    frac = torch.where(normal, a / scale - 1, a / scale)
    man_field = torch.round(frac * 2 ** fmt.man_bits).long()
    top = 2 ** fmt.exp_bits - 1
    exp_field = torch.where(a.isinf(), top, exp_field)
    man_field = torch.where(a.isinf(), 0, man_field)
    exp_field = torch.where(y.isnan(), top, exp_field)
    man_field = torch.where(y.isnan(), 2 ** fmt.man_bits - 1, man_field)
    return (sign << (fmt.bits - 1)) | (exp_field.long() << fmt.man_bits) | man_field


def all_values(fmt) -> torch.Tensor:
    """Every value of a format of at most 16 bits, by bit pattern (NaNs included)."""
    fmt = get_format(fmt)
    if fmt.bits > 16:
        raise ValueError(f"fmt={fmt.name} has {fmt.bits} bits; enumerate at most 16")
    return decode(torch.arange(2 ** fmt.bits), fmt)


def from_bits(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``dtype`` holding the bit patterns ``bits``."""
    fmt = get_format(dtype)
    b = torch.as_tensor(bits, dtype=torch.int64)
    signed = torch.where(b >= 2 ** (fmt.bits - 1), b - 2 ** fmt.bits, b)
    if fmt.bits == 8:
        return (b & 0xFF).to(torch.uint8).view(dtype)
    as_int = {16: torch.int16, 32: torch.int32}[fmt.bits]
    return signed.to(as_int).view(dtype)
