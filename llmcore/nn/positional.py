"""Position information: sinusoidal and learned tables added to embeddings, and RoPE.

Attention by itself is blind to order: permute the tokens and the outputs permute the
same way. The Transformer *adds* a position vector to each token embedding (Vaswani et
al. 2017, section 3.5); rotary embeddings instead rotate queries and keys so that their
dot product depends on the positions' difference (Su et al., "RoFormer", 2021).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def sinusoidal_table(max_len: int, d_model: int, base: float = 10000.0) -> Tensor:
    """(max_len, d_model): PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(...)."""
    if d_model % 2 != 0:
        raise ValueError(f"d_model={d_model} must be even for sinusoidal encodings")
    pos = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)  # (max_len, 1)
    inv_freq = base ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table.float()


def _check_length(x: Tensor, offset: int, max_len: int, what: str) -> None:
    if x.dim() < 2 or offset + x.shape[-2] > max_len:
        raise ValueError(f"x has shape {tuple(x.shape)} with offset {offset}; {what} "
                         f"expects (..., T, C) with offset + T <= max_len={max_len}: "
                         "build it with a larger max_len or crop the sequence")


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sinusoidal table to x (B, T, C); no parameters."""

    def __init__(self, d_model: int, max_len: int = 4096):
        super().__init__()
        self.d_model, self.max_len = d_model, max_len
        self.register_buffer("pe", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        _check_length(x, offset, self.max_len, "SinusoidalPositionalEncoding")
        return x + self.pe[offset:offset + x.shape[-2]].to(x.dtype)  # (B, T, C)


class LearnedPositionalEmbedding(nn.Module):
    """Adds a trained vector per position to x (B, T, C), as GPT-2 and BERT do."""

    def __init__(self, max_len: int, d_model: int, init_std: float = 0.02):
        super().__init__()
        self.max_len = max_len
        self.weight = nn.Parameter(torch.randn(max_len, d_model) * init_std)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        _check_length(x, offset, self.max_len, "LearnedPositionalEmbedding")
        return x + self.weight[offset:offset + x.shape[-2]]  # (B, T, C)


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE: rotate pairs of coordinates of q and k by angles proportional to position.

    Pairs are (x[i], x[i + hs/2]) (the "half" layout of GPT-NeoX and LLaMA); pair i
    turns by p * base^(-2i/hs) at position p. Call on (B, nh, T, hs) queries and keys;
    ``offset`` is the position of the first token (a KV cache's length).
    """

    def __init__(self, head_size: int, max_len: int = 4096, base: float = 10000.0):
        super().__init__()
        if head_size % 2 != 0:
            raise ValueError(f"head_size={head_size} must be even for RoPE")
        self.head_size, self.max_len = head_size, max_len
        inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float64)
                            / head_size)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # (max_len, hs)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        _check_length(x, offset, self.max_len, "RotaryEmbedding")
        if x.shape[-1] != self.head_size:
            raise ValueError(f"x has shape {tuple(x.shape)}; RotaryEmbedding expects "
                             f"(..., T, {self.head_size}) (the head size)")
        t = x.shape[-2]
        cos = self.cos[offset:offset + t].to(x.dtype)  # (T, hs)
        sin = self.sin[offset:offset + t].to(x.dtype)
        return x * cos + rotate_half(x) * sin
