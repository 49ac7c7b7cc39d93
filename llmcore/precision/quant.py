"""Integer weight quantization: int8 and int4, symmetric or asymmetric, per tensor,
per channel or per group; weight-only quantized linears and quantization-aware training.

A weight ``w`` becomes integers ``q = clamp(round(w / scale) + zero_point, qmin, qmax)``
and is read back as ``(q - zero_point) * scale``. Symmetric quantization fixes
``zero_point = 0`` and uses ``[-(2**(b-1) - 1), 2**(b-1) - 1]``; asymmetric (affine)
quantization uses the whole ``[-2**(b-1), 2**(b-1) - 1]`` and shifts it onto
``[min(w), max(w)]``. The scale and zero point follow torch's ``MinMaxObserver``
(Jacob et al., 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference"). One scale per group of ``group_size`` inputs per
output row is what GPTQ and AWQ use at 4 bits.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcore.nn.swap import swap_modules

BITS = (4, 8)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer range ``(qmin, qmax)`` for ``bits``-bit signed integers."""
    if bits not in BITS:
        raise ValueError(f"bits={bits!r} is not supported; use one of {BITS}")
    top = 2 ** (bits - 1) - 1
    return (-top if symmetric else -top - 1), top


def _grouped(w: torch.Tensor, axis: int | None, group_size: int | None) -> torch.Tensor:
    """``w`` reshaped so that each quantization group is one row of the last dim."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ValueError(f"w must be a floating-point tensor, got "
                         f"{getattr(w, 'dtype', type(w).__name__)}")
    if group_size is not None:
        if axis is not None:
            raise ValueError("pass either axis (per channel) or group_size (per group "
                             "along the last dimension), not both")
        k = w.shape[-1]
        if not (isinstance(group_size, int) and group_size > 0 and k % group_size == 0):
            raise ValueError(f"group_size={group_size!r} must be a positive divisor of "
                             f"the last dimension of w, {k}; e.g. 32, 64 or 128")
        return w.reshape(*w.shape[:-1], k // group_size, group_size)  # (..., G, g)
    if axis is not None and not -w.dim() <= axis < w.dim():
        raise ValueError(f"axis={axis} is out of range for w of shape {tuple(w.shape)}")
    return w


def calc_qparams(w: torch.Tensor, bits: int = 8, axis: int | None = None,
                 symmetric: bool = True, group_size: int | None = None):
    """``(scale, zero_point)`` from the min and max of each tensor, channel or group."""
    qmin, qmax = qrange(bits, symmetric)
    g = _grouped(w, axis, group_size).float()
    if group_size is not None:
        dims = (-1,)
    elif axis is None:
        dims = tuple(range(w.dim()))
    else:
        dims = tuple(d for d in range(w.dim()) if d != axis % w.dim())
    lo = g.amin(dim=dims, keepdim=True).clamp(max=0)  # the range always holds 0
    hi = g.amax(dim=dims, keepdim=True).clamp(min=0)
    eps = torch.finfo(torch.float32).eps
    if symmetric:
        scale = (torch.maximum(-lo, hi) / ((qmax - qmin) / 2)).clamp(min=eps)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=eps)
        zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).int()
    if group_size is not None:  # (..., G, 1) -> (..., G): one entry per group
        scale, zero_point = scale.squeeze(-1), zero_point.squeeze(-1)
    return scale, zero_point


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-group parameters (..., G) broadcast to the weight (..., G * g)."""
    if t.dim() == like.dim() and t.shape[-1] not in (1, like.shape[-1]):
        return t.repeat_interleave(like.shape[-1] // t.shape[-1], dim=-1)
    return t


def quantize(w: torch.Tensor, bits: int = 8, axis: int | None = None,
             symmetric: bool = True, group_size: int | None = None):
    """``(q, scale, zero_point)``: ``q`` is int8 (int4 values sit in int8 too);
    ``scale`` and ``zero_point`` broadcast against ``w`` (per group: one per group)."""
    qmin, qmax = qrange(bits, symmetric)
    scale, zero_point = calc_qparams(w, bits, axis, symmetric, group_size)
    inv = 1.0 / _expand(scale, w)  # multiply by 1/scale, as torch's kernels do
    q = torch.round(w.float() * inv) + _expand(zero_point, w)  # half to even
    return q.clamp(qmin, qmax).to(torch.int8), scale, zero_point


def quantize_int8(w: torch.Tensor, axis: int | None = None, symmetric: bool = True):
    """int8 quantization, per tensor (``axis=None``) or one scale per index of
    ``axis``."""
    return quantize(w, 8, axis, symmetric)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return ((q.float() - _expand(zero_point, q)) * _expand(scale, q)).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two int4 values (in -8..7) per byte along the last dim, which must be even."""
    if q.shape[-1] % 2:
        raise ValueError(f"q's last dimension must be even to pack int4, got {q.shape}")
    if q.is_floating_point() or q.is_complex():
        raise ValueError(f"q must hold integers (from quantize), got {q.dtype}")
    # A nibble keeps the low 4 bits: 8 would come back as -8, 17 as 1. One check per
    # tensor (packing happens once, when a model is quantized).
    if q.numel() and not bool(((q >= -8) & (q <= 7)).all()):
        raise ValueError(f"q holds values in [{int(q.min())}, {int(q.max())}], outside "
                         "int4's [-8, 7]; quantize with bits=4 before packing")
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    lo, hi = (packed & 0xF).to(torch.int8), (packed >> 4).to(torch.int8)
    both = torch.stack([lo, hi], dim=-1).flatten(-2)  # interleave back
    return torch.where(both > 7, both - 16, both)  # sign-extend the nibbles


def fake_quantize(w: torch.Tensor, bits: int = 8, axis: int | None = None,
                  symmetric: bool = True,
                  group_size: int | None = None) -> torch.Tensor:
    """``dequantize(quantize(w))`` in the forward pass, identity in the backward pass:
    the straight-through estimator (Bengio et al., 2013) that QAT trains through."""
    q, scale, zp = quantize(w.detach(), bits, axis, symmetric, group_size)
    wq = dequantize(q, scale, zp, w.dtype)
    return w + (wq - w).detach()


def _axis(group_size: int | None, per_channel: bool) -> int | None:
    """A linear weight (out, in): one scale per output row (axis 0), per group, or
    one for the whole tensor."""
    return 0 if group_size is None and per_channel else None


class QuantizedLinear(nn.Module):
    """Weight-only quantized ``nn.Linear``: integer weights in memory, dequantized to
    the input's dtype on the fly for the matmul."""

    def __init__(self, linear: nn.Linear, bits: int = 8, group_size: int | None = None,
                 symmetric: bool = True, per_channel: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.per_channel = per_channel
        q, scale, zp = quantize(linear.weight.detach(), bits,
                                _axis(group_size, per_channel), symmetric, group_size)
        self.register_buffer("qweight", pack_int4(q) if bits == 4 else q)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zp.to(torch.int8))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach())

    def weight_int(self) -> torch.Tensor:
        return unpack_int4(self.qweight) if self.bits == 4 else self.qweight

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.weight_int(), self.scale, self.zero_point, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def weight_bytes(self) -> int:
        """Bytes of the quantized weight and its scales and zero points."""
        return sum(t.numel() * t.element_size()
                   for t in (self.qweight, self.scale, self.zero_point))

    def extra_repr(self) -> str:
        gran = (f"group_size={self.group_size}" if self.group_size else
                "per-channel" if self.per_channel else "per-tensor")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, {gran}, symmetric={self.symmetric}")


class QATLinear(nn.Linear):
    """``nn.Linear`` that trains through fake-quantized weights (QAT)."""

    bits: int = 4
    group_size: int | None = None
    symmetric: bool = True
    per_channel: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = _axis(self.group_size, self.per_channel)
        w = fake_quantize(self.weight, self.bits, axis, self.symmetric, self.group_size)
        return F.linear(x, w, self.bias)


def _swap_linears(model: nn.Module, make, module_filter_fn) -> list[str]:
    if isinstance(model, nn.Linear):
        raise ValueError("model is itself an nn.Linear; wrap it in a module first")

    def select(module: nn.Module, fqn: str) -> bool:
        return type(module) in (nn.Linear, QATLinear) and (
            module_filter_fn is None or module_filter_fn(module, fqn))

    return swap_modules(model, select, make)


def quantize_weights(model: nn.Module, bits: int = 8, group_size: int | None = None,
                     symmetric: bool = True, module_filter_fn=None,
                     per_channel: bool = True) -> nn.Module:
    """Swap, in place, each ``nn.Linear`` (and ``QATLinear``) passing
    ``module_filter_fn(module, fqn)`` for a ``QuantizedLinear``; return the model.
    Scales: one per ``group_size`` inputs of each output row if given, else one per
    output row (``per_channel``) or one per tensor.

    Weights tied to another module (a GPT's ``lm_head`` and token embedding) are
    quantized in the linear only; the embedding keeps its float copy.
    """
    qrange(bits, symmetric)  # validate before touching the model
    _swap_linears(model, lambda m: QuantizedLinear(m, bits, group_size, symmetric,
                                                   per_channel), module_filter_fn)
    return model


def prepare_qat(model: nn.Module, bits: int = 4, group_size: int | None = None,
                symmetric: bool = True, module_filter_fn=None,
                per_channel: bool = True) -> nn.Module:
    """Swap, in place, each ``nn.Linear`` for a ``QATLinear`` sharing its parameters."""
    qrange(bits, symmetric)

    def make(lin: nn.Linear) -> QATLinear:
        new = QATLinear.__new__(QATLinear)
        new.__dict__ = lin.__dict__.copy()  # same parameters, hooks and flags
        new.bits, new.group_size, new.symmetric = bits, group_size, symmetric
        new.per_channel = per_channel
        return new

    _swap_linears(model, make, module_filter_fn)
    return model
