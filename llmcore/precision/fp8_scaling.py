"""FP8 scaled casts: tensorwise, rowwise, tile, block and delayed scales.

A tensor is stored as ``x_fp8 = cast(x * scale)``, with a float32 ``scale`` that maps
its largest magnitude (amax) onto the format's largest value, and read back as
``x ~= x_fp8 / scale``. The scale is one number per tensor (*tensorwise*), per row
(*rowwise*), per tile of ``1 x block`` values along the last dimension (*tile*) or per
``block x block`` square (*block*): DeepSeek-V3 (2024, section 3.3) scales activations
by 1 x 128 tiles and weights by 128 x 128 blocks, so that an outlier spoils only its
own tile. Delayed scaling takes the scale from the amaxes of the last few steps, kept
in a small history on the device, so the scale is known before the tensor is and no
step reads a tensor back to the host.
"""

from __future__ import annotations

import torch
import torch.nn as nn

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
GRANULARITIES = ("tensorwise", "rowwise", "tile", "block")


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in FP8_DTYPES:
        raise ValueError(f"dtype={dtype} is not an FP8 dtype; use one of {FP8_DTYPES}")


def amax_to_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float32 scale that maps ``amax`` onto the largest value of ``dtype``."""
    _check_dtype(dtype)
    # An all-zero tensor has amax 0: any scale works, keep it finite.
    return torch.finfo(dtype).max / amax.float().clamp(min=1e-12)


def _amax(x: torch.Tensor, scaling: str, block: int) -> torch.Tensor:
    """The largest magnitude per scaling group, shaped to broadcast per group."""
    a = x.abs()
    if scaling == "tensorwise":
        return a.amax()  # ()
    if scaling == "rowwise":
        return a.amax(dim=-1, keepdim=True)  # (..., 1)
    k = x.shape[-1]
    if k % block or (scaling == "block" and (x.dim() != 2 or x.shape[0] % block)):
        raise ValueError(f"scaling={scaling!r} with block={block} needs the last "
                         f"dimension (and for 'block' a 2-D x's rows) divisible by "
                         f"{block}, got x of shape {tuple(x.shape)}")
    tiles = a.reshape(*x.shape[:-1], k // block, block).amax(dim=-1)  # (..., K/b)
    if scaling == "tile":
        return tiles
    m = x.shape[0]
    return tiles.reshape(m // block, block, k // block).amax(dim=1)  # (M/b, K/b)


def expand_scale(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A scale per group, repeated to one entry per value of a tensor of ``shape``
    (tile and block scales); tensorwise and rowwise scales broadcast as they are."""
    for d in range(-scale.dim(), 0):
        if scale.shape[d] not in (1, shape[d]):
            scale = scale.repeat_interleave(shape[d] // scale.shape[d], dim=d)
    return scale


def to_float8(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn,
              scaling: str = "tensorwise", scale: torch.Tensor | None = None,
              block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_fp8, scale)`` with ``x ~= from_float8(x_fp8, scale)``.

    ``scaling``: ``"tensorwise"`` gives a 0-d scale, ``"rowwise"`` one per row (shape
    ``(..., 1)``), ``"tile"`` one per ``1 x block`` tile of the last dimension (shape
    ``(..., K / block)``), ``"block"`` one per ``block x block`` square of a matrix
    (shape ``(M / block, K / block)``). A given ``scale`` (from delayed scaling) is
    used as is; values it pushes past the format's range saturate.
    """
    _check_dtype(dtype)
    if scaling not in GRANULARITIES:
        raise ValueError(f"scaling={scaling!r}; use one of {GRANULARITIES} (delayed "
                         "scaling passes its own `scale`)")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    x = x.float()
    if scale is None:
        scale = amax_to_scale(_amax(x, scaling, block), dtype)
    fmax = torch.finfo(dtype).max
    # Saturate before the cast: torch's cast to e5m2 overflows to inf.
    x_fp8 = (x * expand_scale(scale, x.shape)).clamp(-fmax, fmax).to(dtype)
    return x_fp8, scale.float()


def from_float8(x_fp8: torch.Tensor, scale: torch.Tensor,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The high-precision values ``x_fp8 / scale`` of a scaled FP8 tensor."""
    return (x_fp8.float() / expand_scale(scale, x_fp8.shape)).to(dtype)


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
