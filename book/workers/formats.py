"""Looking at number formats: their ranges side by side, one bit pattern's fields, and
what a cast to a narrow format loses.

Chapters 10 and 11 print these from the decoder of ``llmcore.precision.formats``: the
table is computed from the bit patterns, never typed in.
"""

from __future__ import annotations

import torch

from llmcore.precision.formats import FORMATS, decode, encode, get_format


def format_table(formats=tuple(FORMATS.values())) -> list[dict]:
    """Range and precision of each format, computed from the decoder."""
    rows = []
    for f in formats:
        pos_max = 2 ** (f.bits - 1) - 1  # the largest positive bit pattern
        # The largest finite value sits just below the top pattern (no inf) or at
        # the top mantissa of the exponent below it (IEEE: the top one is inf/NaN).
        top = decode(torch.tensor([pos_max - 2 ** f.man_bits, pos_max - 1, pos_max]), f)
        rows.append({"format": f.name, "bits": f.bits, "exponent": f.exp_bits,
                     "mantissa": f.man_bits,
                     "max": top[top.isfinite()].max().item(),
                     "min_normal": decode(torch.tensor(1 << f.man_bits), f).item(),
                     "min_subnormal": decode(torch.tensor(1), f).item(),
                     "eps": (decode(encode(torch.tensor(1.0), f) + 1, f) - 1).item(),
                     "has_inf": f.has_inf})
    return rows


def bit_string(bits: int, fmt) -> str:
    """``'0 1000 110'``: the sign, exponent and mantissa fields of one pattern."""
    fmt = get_format(fmt)
    s = format(int(bits) & (2 ** fmt.bits - 1), f"0{fmt.bits}b")
    return f"{s[0]} {s[1:1 + fmt.exp_bits]} {s[1 + fmt.exp_bits:]}"


def underflow_fraction(tensors, dtype: torch.dtype = torch.float16,
                       scale: float = 1.0) -> float:
    """The fraction of the nonzero entries of ``tensors`` that become 0 when
    ``x * scale`` is cast to ``dtype``: the gradient signal fp16 would lose."""
    nonzero = lost = 0
    for t in tensors:
        x = t.detach().float().flatten()
        x = x[x != 0]
        nonzero += x.numel()
        lost += int(((x * scale).to(dtype) == 0).sum())
    if nonzero == 0:
        raise ValueError("tensors hold no nonzero entries")
    return lost / nonzero
