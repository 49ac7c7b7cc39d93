"""Normalization layers and the position-wise feed-forward network.

LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019) mirror ``nn.LayerNorm``
and ``nn.RMSNorm``: same arguments, same parameter names, so a ``state_dict`` moves
between them. ``FeedForward`` is W2 act(W1 x + b1) + b2 (Vaswani et al. 2017, eq. 2),
or the gated SwiGLU variant (Shazeer 2020).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _shape(normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(normalized_shape)


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dimensions.

    The variance is the biased one (divide by n, not n - 1), as in ``nn.LayerNorm``.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True):
        super().__init__()
        self.normalized_shape = _shape(normalized_shape)
        self.eps = eps
        self.weight = self.bias = None
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape))
            if bias:
                self.bias = nn.Parameter(torch.zeros(self.normalized_shape))

    def forward(self, x: Tensor) -> Tensor:
        n = len(self.normalized_shape)
        if tuple(x.shape[-n:]) != self.normalized_shape:
            raise ValueError(f"x has shape {tuple(x.shape)}; LayerNorm expects "
                             f"(..., {', '.join(map(str, self.normalized_shape))})")
        dims = tuple(range(-n, 0))
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, keepdim=True, unbiased=False)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without centring or bias.

    ``eps=None`` uses ``torch.finfo(x.dtype).eps``, as ``nn.RMSNorm`` does.
    """

    def __init__(self, normalized_shape, eps: float | None = None,
                 elementwise_affine: bool = True):
        super().__init__()
        self.normalized_shape = _shape(normalized_shape)
        self.eps = eps
        self.weight = None
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape))

    def forward(self, x: Tensor) -> Tensor:
        n = len(self.normalized_shape)
        if tuple(x.shape[-n:]) != self.normalized_shape:
            raise ValueError(f"x has shape {tuple(x.shape)}; RMSNorm expects "
                             f"(..., {', '.join(map(str, self.normalized_shape))})")
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        dims = tuple(range(-n, 0))
        y = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
        return y if self.weight is None else y * self.weight


def make_norm(kind: str, d_model: int, eps: float = 1e-5, bias: bool = True,
              fused: bool = True) -> nn.Module:
    """A norm by name: "layernorm" or "rmsnorm" (RMSNorm has no bias).

    ``fused=True`` returns PyTorch's ``nn.LayerNorm``/``nn.RMSNorm``, one fused kernel
    (``F.layer_norm``) where the classes above launch one per operation and keep more
    activations for backward; ``fused=False`` the hand-written twins above. Both have
    the same parameter names, so a ``state_dict`` moves between them.
    """
    if kind == "layernorm":
        cls = nn.LayerNorm if fused else LayerNorm
        return cls(d_model, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return (nn.RMSNorm if fused else RMSNorm)(d_model, eps=eps)
    raise ValueError(f"norm={kind!r}; use 'layernorm' or 'rmsnorm'")


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact, with erf: what nn.TransformerEncoderLayer uses
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's approximation
    "swiglu": F.silu,  # the gate's activation; the gating happens in FeedForward
    # ReLU squared (So et al., "Primer", 2021): sparse like ReLU, smooth at 0 like
    # GELU. Written x * relu(x), the same values: on a CPU its backward is several
    # times faster than that of relu(x).square(), which goes through pow.
    "relu2": lambda x: x * F.relu(x),
}


class FeedForward(nn.Module):
    """Position-wise FFN: linear2(dropout(act(linear1(x)))), applied to every token.

    ``activation`` is a key of ``ACTIVATIONS``: relu, gelu, gelu_tanh, relu2 (ReLU
    squared) or swiglu.

    With ``activation="swiglu"``: linear2(silu(gate(x)) * linear1(x)), three matrices;
    pick d_ff about 2/3 of the usual 4 d_model to keep the parameter count.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu",
                 dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}; "
                             f"use one of {list(ACTIVATIONS)}")
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias)
        self.gate = None  # SwiGLU's gate projection
        if activation == "swiglu":
            self.gate = nn.Linear(d_model, d_ff, bias=bias)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None:
            h = self.act(self.gate(x)) * self.linear1(x)  # (B, T, d_ff)
        else:
            h = self.act(self.linear1(x))  # (B, T, d_ff)
        return self.linear2(self.dropout(h))  # (B, T, C)
