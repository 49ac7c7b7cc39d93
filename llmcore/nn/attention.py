"""Scaled dot-product attention and multi-head attention, written out by hand.

Vaswani et al., "Attention Is All You Need" (2017), section 3.2. The kernel mirrors
``torch.nn.functional.scaled_dot_product_attention`` (SDPA): same arguments, same mask
convention, same result, so the two can be swapped and compared.

Mask convention (as in SDPA): a boolean mask holds True where a query *may attend* to
a key; a float mask is *added* to the scores (use ``-inf`` to forbid). Beware:
``nn.MultiheadAttention`` and ``nn.Transformer*Layer`` use the opposite boolean
convention (True means *masked*); convert with ``~mask``.

A query row whose keys are all masked gets zero weights and a zero output, never NaN
(SDPA does the same since torch 2.5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def causal_mask(t_q: int, t_k: int | None = None, offset: int = 0,
                device: torch.device | str | None = None) -> Tensor:
    """Boolean (t_q, t_k) mask, True where query i may attend key j, i.e. j <= i+offset.

    ``offset`` is the number of keys that precede the first query (a KV cache's
    length); ``offset=0`` is SDPA's ``is_causal`` (aligned top-left).
    """
    t_k = t_q + offset if t_k is None else t_k
    ones = torch.ones(t_q, t_k, dtype=torch.bool, device=device)
    return torch.tril(ones, diagonal=offset)


def check_mask(attn_mask: Tensor, scores_shape: torch.Size, dtype: torch.dtype,
               name: str = "attn_mask") -> None:
    """ValueError unless ``attn_mask`` is bool or ``dtype`` and broadcasts to scores."""
    if attn_mask.dtype != torch.bool and attn_mask.dtype != dtype:
        raise ValueError(f"{name} must be torch.bool (True = may attend) or a float "
                         f"mask of the query dtype {dtype}, got {attn_mask.dtype}")
    try:
        shape = torch.broadcast_shapes(attn_mask.shape, scores_shape)
    except RuntimeError:
        shape = None
    if shape != scores_shape:
        raise ValueError(f"{name} has shape {tuple(attn_mask.shape)}, which does not "
                         f"broadcast to the scores' shape {tuple(scores_shape)}; "
                         f"expected (..., {scores_shape[-2]}, {scores_shape[-1]}) "
                         "(T_query, T_key)")


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor,
                                 attn_mask: Tensor | None = None, *,
                                 is_causal: bool = False, dropout_p: float = 0.0,
                                 scale: float | None = None,
                                 return_weights: bool = False):
    """softmax(q k^T / sqrt(d_k) + mask) v, the same computation as SDPA.

    q: (..., T, E), k: (..., S, E), v: (..., S, Ev) -> (..., T, Ev); with
    ``return_weights=True`` returns ``(out, weights)``, weights (..., T, S).
    ``is_causal`` lets query i see keys 0..i (top-left aligned, like SDPA). The options
    after ``attn_mask`` are keyword-only: SDPA's positional order differs.
    """
    if q.dim() < 2 or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"q, k, v must have the same rank >= 2, (..., T, E), got "
                         f"shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have the query's last dimension E={q.shape[-1]}: "
                         f"k is {tuple(k.shape)}, expected (..., S, {q.shape[-1]})")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"v must have as many positions as k (S={k.shape[-2]}): "
                         f"v is {tuple(v.shape)}, expected (..., {k.shape[-2]}, Ev)")
    if is_causal and attn_mask is not None:
        raise ValueError("pass either attn_mask or is_causal=True, not both; fold "
                         "the causal mask in: attn_mask & causal_mask(T, S)")
    t_q, t_k = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., T, S)
    if is_causal:
        attn_mask = causal_mask(t_q, t_k, device=q.device)
    if attn_mask is not None:
        check_mask(attn_mask, scores.shape, q.dtype)
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    # A fully masked row is all -inf; subtracting its max (-inf) would give NaN. Use 0
    # as the max there: exp(-inf) = 0, and the weights of that row become 0 below.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    expo = torch.exp(scores - row_max)  # exactly 0 where masked
    denom = expo.sum(dim=-1, keepdim=True)
    weights = expo / torch.where(denom > 0, denom, torch.ones_like(denom))
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    out = weights @ v  # (..., T, Ev)
    return (out, weights) if return_weights else out


class KVCache:
    """Keys and values of the positions a decoder has already seen, for generation.

    One cache per attention layer. ``update(k, v)`` appends the new positions' keys and
    values, each (B, nh, T_new, hs), and returns all of them, (B, nh, T_past + T_new,
    hs). Generation prefills the prompt once (T_new = prompt length, causal) and then
    feeds one token at a time: that token's query attends to every cached position, so
    it needs no mask. ``MultiHeadAttention`` builds the right causal mask for any
    T_new (also a chunk after a non-empty cache) when called with ``is_causal=True``.
    """

    def __init__(self, max_len: int | None = None):
        self.max_len = max_len  # refuse to grow past this many positions (None: no cap)
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[-2]

    def reset(self) -> None:
        self.k = self.v = None

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.max_len is not None and len(self) + k.shape[-2] > self.max_len:
            raise ValueError(f"KVCache holds {len(self)} positions and got "
                             f"{k.shape[-2]} more, past max_len={self.max_len}; "
                             "reset() it or crop the sequence")
        if self.k is None:
            self.k, self.v = k, v
        else:
            if k.shape[:2] != self.k.shape[:2] or k.shape[-1] != self.k.shape[-1]:
                raise ValueError(f"k has shape {tuple(k.shape)}, expected "
                                 f"{tuple(self.k.shape[:2])} + (T_new, "
                                 f"{self.k.shape[-1]}) to match the cache")
            self.k = torch.cat([self.k, k], dim=-2)  # (B, nh, T_past + T_new, hs)
            self.v = torch.cat([self.v, v], dim=-2)
        return self.k, self.v


class MultiHeadAttention(nn.Module):
    """Multi-head attention, batch first: n_heads attentions of width d_model/n_heads.

    ``forward(query, key=None, value=None, ...)`` takes (B, T, C) tensors and returns
    (B, T, C). ``key=None`` means self-attention (key = value = query); ``value=None``
    means value = key. ``attn_mask`` broadcasts to (B, nh, T, S): (T, S), (B, T, S) (a
    head axis is inserted) or (B|1, nh|1, T, S); boolean True = may attend.
    ``use_sdpa`` picks PyTorch's fused kernel or the hand-written one;
    ``need_weights=True`` uses the hand-written one and returns ``(out, weights)``
    with per-head weights (B, nh, T, S). ``rope``: an optional ``RotaryEmbedding``
    applied to queries and keys (Su et al. 2021).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0,
                 bias: bool = True, use_sdpa: bool = True,
                 rope: nn.Module | None = None):
        super().__init__()
        if d_model <= 0 or n_heads <= 0 or d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be a positive multiple of "
                             f"n_heads={n_heads}; head size is d_model // n_heads")
        self.d_model, self.n_heads = d_model, n_heads
        self.head_size = d_model // n_heads
        self.dropout = dropout
        self.use_sdpa = use_sdpa
        self.rope = rope
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def split_heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        x = x.view(b, t, self.n_heads, self.head_size)  # (B, T, nh, hs)
        return x.transpose(1, 2)  # (B, nh, T, hs)

    def merge_heads(self, x: Tensor) -> Tensor:
        b, _, t, _ = x.shape
        return x.transpose(1, 2).reshape(b, t, self.d_model)  # (B, T, C)

    def _check(self, name: str, x: Tensor, batch: int | None = None) -> None:
        if x.dim() != 3 or x.shape[-1] != self.d_model or (
                batch is not None and x.shape[0] != batch):
            b = "B" if batch is None else batch
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected "
                             f"({b}, T, {self.d_model}) (batch first, d_model last)")

    def forward(self, query: Tensor, key: Tensor | None = None,
                value: Tensor | None = None, attn_mask: Tensor | None = None,
                is_causal: bool = False, kv_cache: KVCache | None = None,
                need_weights: bool = False):
        self._check("query", query)
        key = query if key is None else key
        value = key if value is None else value
        self._check("key", key, query.shape[0])
        self._check("value", value, query.shape[0])
        if value.shape[1] != key.shape[1]:
            raise ValueError(f"value has {value.shape[1]} positions, key has "
                             f"{key.shape[1]}; they must match")
        q = self.split_heads(self.q_proj(query))  # (B, nh, T, hs)
        k = self.split_heads(self.k_proj(key))  # (B, nh, S, hs)
        v = self.split_heads(self.v_proj(value))  # (B, nh, S, hs)
        past = len(kv_cache) if kv_cache is not None else 0
        if self.rope is not None:
            q, k = self.rope(q, offset=past), self.rope(k, offset=past)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, nh, past + S, hs)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)  # (B, 1, T, S): same mask for every head
        if is_causal and past > 0:
            # The new queries sit after `past` cached keys: shift the diagonal by past.
            # A single new token may attend to everything, so this mask is all True.
            if attn_mask is not None:
                raise ValueError("pass either attn_mask or is_causal=True, not both")
            attn_mask = causal_mask(q.shape[2], k.shape[2], past, q.device)
            is_causal = False
        drop = self.dropout if self.training else 0.0
        if need_weights or not self.use_sdpa:
            out = scaled_dot_product_attention(q, k, v, attn_mask, is_causal=is_causal,
                                               dropout_p=drop,
                                               return_weights=need_weights)
        else:
            if attn_mask is not None:
                check_mask(attn_mask, torch.Size([*q.shape[:3], k.shape[2]]), q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                 dropout_p=drop, is_causal=is_causal)
        if need_weights:
            out, weights = out
            return self.out_proj(self.merge_heads(out)), weights
        return self.out_proj(self.merge_heads(out))  # (B, T, C)
