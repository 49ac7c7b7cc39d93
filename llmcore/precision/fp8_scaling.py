"""FP8 scaled casts: tensorwise, rowwise and delayed scales.

A tensor is stored as ``x_fp8 = cast(x * scale)``, with a float32 ``scale`` that maps
its largest magnitude (amax) onto the format's largest value, and read back as
``x ~= x_fp8 / scale``. Delayed scaling takes the scale from the amaxes of the last
few steps, kept in a small history on the device, so the scale is known before the
tensor is and no step reads a tensor back to the host.
"""

from __future__ import annotations

import torch
import torch.nn as nn

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in FP8_DTYPES:
        raise ValueError(f"dtype={dtype} is not an FP8 dtype; use one of {FP8_DTYPES}")


def amax_to_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float32 scale that maps ``amax`` onto the largest value of ``dtype``."""
    _check_dtype(dtype)
    # An all-zero tensor has amax 0: any scale works, keep it finite.
    return torch.finfo(dtype).max / amax.float().clamp(min=1e-12)


def quantize(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn,
             scaling: str = "tensorwise", scale: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_fp8, scale)`` with ``x ~= x_fp8.float() / scale``.

    ``scaling="tensorwise"`` gives a 0-d scale, ``"rowwise"`` one scale per row (shape
    ``(..., 1)``, the amax taken over the last dimension). A given ``scale`` (from
    delayed scaling) is used as is; values it pushes past the format's range saturate.
    """
    _check_dtype(dtype)
    if scaling not in ("tensorwise", "rowwise"):
        raise ValueError(f"scaling={scaling!r}; use 'tensorwise' or 'rowwise' (delayed "
                         "scaling passes its own `scale`)")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    x = x.float()
    if scale is None:
        amax = x.abs().amax() if scaling == "tensorwise" else \
            x.abs().amax(dim=-1, keepdim=True)
        scale = amax_to_scale(amax, dtype)
    fmax = torch.finfo(dtype).max
    # Saturate before the cast: torch's cast to e5m2 overflows to inf.
    x_fp8 = (x * scale).clamp(-fmax, fmax).to(dtype)
    return x_fp8, scale.float()


def dequantize(x_fp8: torch.Tensor, scale: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (x_fp8.float() / scale).to(dtype)


def delayed_scale(history: torch.Tensor, seen: torch.Tensor, x: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """The scale for ``x`` from the largest amax in ``history`` (from ``x`` itself on
    the first step), then ``x``'s amax pushed into ``history``, in place.

    Everything stays on the device: ``torch.where`` picks between the two amaxes where
    ``if seen > 0`` would read a tensor into Python (a host sync per operand per step,
    and a graph break under ``torch.compile``).
    """
    amax = x.detach().abs().amax().float()
    past = torch.where(seen > 0, history.amax(), amax)
    history.copy_(torch.cat([amax.view(1), history[:-1]]))  # newest first
    seen.add_(1)
    return amax_to_scale(past, dtype)


class AmaxHistory(nn.Module):
    """Delayed scaling: the scale comes from the largest amax of the last ``length``
    steps, so it is known before the tensor is (Transformer Engine's default recipe)."""

    def __init__(self, length: int = 16):
        super().__init__()
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.register_buffer("history", torch.zeros(length))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def scale(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return delayed_scale(self.history, self.seen, x, dtype)
