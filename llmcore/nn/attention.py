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

from llmcore.nn.kvcache import KVCache
from llmcore.nn.layers import make_norm


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


class MultiHeadAttention(nn.Module):
    """Multi-head attention, batch first: heads of width ``head_size`` = C / n_heads.

    ``forward(query, key=None, value=None, ...)`` takes (B, T, C) tensors and returns
    (B, T, C). ``key=None`` means self-attention (key = value = query); ``value=None``
    means value = key. ``attn_mask`` broadcasts to (B, nh, T, S): (T, S), (B, T, S) (a
    head axis is inserted) or (B|1, nh|1, T, S); boolean True = may attend.
    ``use_sdpa`` picks PyTorch's fused kernel or the hand-written one;
    ``need_weights=True`` uses the hand-written one and returns ``(out, weights)``
    with per-head weights (B, nh, T, S). ``rope``: an optional ``RotaryEmbedding``
    applied to queries and keys (Su et al. 2021). ``qk_norm`` ("layernorm" or
    "rmsnorm", with a learned gain per head dimension) normalises each head's queries
    and keys before RoPE and the dot product, so the attention logits stay bounded
    however large the projections grow (Dehghani et al., "Scaling Vision
    Transformers to 22B Parameters", 2023, used LayerNorm).

    ``fused_qkv=True`` holds one ``qkv_proj`` (3C rows: q, then k, then v) instead of
    ``q_proj``, ``k_proj``, ``v_proj``: one matmul instead of three for
    self-attention. Either layout loads the other's ``state_dict``.

    The number of heads computed is read from the projections' output width at
    forward time (width // head_size), so a module whose projections keep only some
    heads' rows (tensor parallelism) computes those heads, and its ``out_proj`` (with
    the matching input columns) gives a partial sum of the full output.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0,
                 bias: bool = True, use_sdpa: bool = True,
                 rope: nn.Module | None = None, fused_qkv: bool = False,
                 qk_norm: str | None = None):
        super().__init__()
        if d_model <= 0 or n_heads <= 0 or d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be a positive multiple of "
                             f"n_heads={n_heads}; head size is d_model // n_heads")
        self.d_model, self.n_heads = d_model, n_heads
        self.head_size = d_model // n_heads
        self.dropout = dropout
        self.use_sdpa = use_sdpa
        self.rope = rope
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=bias)
        else:
            self.q_proj = nn.Linear(d_model, d_model, bias=bias)
            self.k_proj = nn.Linear(d_model, d_model, bias=bias)
            self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.q_norm = self.k_norm = None
        if qk_norm is not None:  # one gain per head dimension, shared by the heads
            self.q_norm = make_norm(qk_norm, self.head_size, bias=False)
            self.k_norm = make_norm(qk_norm, self.head_size, bias=False)
        self.register_load_state_dict_pre_hook(convert_qkv_layout)

    def split_heads(self, x: Tensor) -> Tensor:
        b, t, width = x.shape
        x = x.view(b, t, width // self.head_size, self.head_size)  # (B, T, nh, hs)
        return x.transpose(1, 2)  # (B, nh, T, hs)

    def merge_heads(self, x: Tensor) -> Tensor:
        b, nh, t, hs = x.shape
        return x.transpose(1, 2).reshape(b, t, nh * hs)  # (B, T, C) or local width

    def project_qkv(self, query: Tensor, key: Tensor, value: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """The q, k, v projections, each (B, T|S, width): one matmul when fused."""
        if not self.fused_qkv:
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if key is query and value is query:
            qkv = self.qkv_proj(query)  # (B, T, 3 width): [q | k | v]
            return qkv.split(qkv.shape[-1] // 3, dim=-1)
        # Cross-attention: each input meets its own third of the rows.
        w = self.qkv_proj.weight.chunk(3, dim=0)
        b = (self.qkv_proj.bias.chunk(3) if self.qkv_proj.bias is not None
             else (None,) * 3)
        return tuple(F.linear(x, w[i], b[i]) for i, x in enumerate((query, key, value)))

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
        q, k, v = (self.split_heads(x) for x in self.project_qkv(query, key, value))
        # q: (B, nh, T, hs), k and v: (B, nh, S, hs); nh may be a shard's local heads
        past = len(kv_cache) if kv_cache is not None else 0
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # over hs: (B, nh, T, hs)
        if self.rope is not None:
            q, k = self.rope(q, offset=past), self.rope(k, offset=past)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)  # (B, 1, T, S): same mask for every head
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, nh, past + S, hs) or (B, nh, max, hs)
            cache_mask = kv_cache.key_mask(is_causal)
            if cache_mask is None and is_causal and past > 0:
                # The new queries sit after `past` cached keys: shift the diagonal.
                # A single new token may attend to everything: this mask is all True.
                cache_mask = causal_mask(q.shape[2], k.shape[2], past, q.device)
            if cache_mask is not None:
                if attn_mask is not None:
                    raise ValueError("with a KV cache pass is_causal=True, not an "
                                     "attn_mask: the cache builds the mask")
                attn_mask, is_causal = cache_mask, False
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


QKV = ("q_proj", "k_proj", "v_proj")


def convert_qkv_layout(module: MultiHeadAttention, state_dict: dict, prefix: str,
                       *args) -> None:
    """``load_state_dict`` pre-hook: a separate q/k/v ``state_dict`` loads into a fused
    module (the three matrices stacked, rows [q; k; v]) and a fused one into a module
    with separate projections (the rows split in three)."""
    for name in ("weight", "bias"):
        fused = f"{prefix}qkv_proj.{name}"
        parts = [f"{prefix}{p}.{name}" for p in QKV]
        if module.fused_qkv and fused not in state_dict and all(
                p in state_dict for p in parts):
            state_dict[fused] = torch.cat([state_dict.pop(p) for p in parts], dim=0)
        elif not module.fused_qkv and fused in state_dict and not any(
                p in state_dict for p in parts):
            for p, chunk in zip(parts, state_dict.pop(fused).chunk(3, dim=0)):
                state_dict[p] = chunk
