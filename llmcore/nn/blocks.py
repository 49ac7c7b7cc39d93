"""Transformer blocks: the encoder block, GPT's decoder-only block, and the decoder
block with cross-attention.

Vaswani et al. (2017), section 3.1: each sub-layer (attention, feed-forward) sits in a
residual connection with a norm. ``norm_first=False`` is the original *post-LN*,
x = norm(x + sublayer(x)); ``norm_first=True`` is *pre-LN*, x = x + sublayer(norm(x))
(Xiong et al. 2020), which trains without learning-rate warm-up and is what GPT-2 and
later models use. Parameter names follow ``nn.TransformerEncoderLayer`` and
``nn.TransformerDecoderLayer`` (norm1, norm2, norm3, dropout1, ...), so weights copy
over one to one (chapter 5 does, ``book/workers/torch_layers.py``); masks follow SDPA
(boolean True = may attend).
"""

from __future__ import annotations

from torch import Tensor, nn

from llmcore.nn.attention import MultiHeadAttention
from llmcore.nn.kvcache import KVCache
from llmcore.nn.layers import FeedForward, make_norm


class SelfAttentionBlock(nn.Module):
    """Self-attention + feed-forward, each in a residual with a norm (x: (B, T, C)).

    The body that :class:`EncoderBlock` and :class:`GPTBlock` share; they differ in
    where dropout goes, the q/k/v layout and what their ``forward`` is for.
    ``ffn_dropout`` is the dropout inside the feed-forward network.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0,
                 activation: str = "relu", norm_first: bool = False, bias: bool = True,
                 norm: str = "layernorm", use_sdpa: bool = True, eps: float = 1e-5,
                 rope: nn.Module | None = None, fused_qkv: bool = False,
                 ffn_dropout: float = 0.0, qk_norm: bool = False):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout, bias, use_sdpa,
                                            rope=rope, fused_qkv=fused_qkv,
                                            qk_norm=norm if qk_norm else None)
        self.ffn = FeedForward(d_model, d_ff, activation, ffn_dropout, bias)
        self.norm1 = make_norm(norm, d_model, eps, bias)
        self.norm2 = make_norm(norm, d_model, eps, bias)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def _sa(self, x, attn_mask, is_causal, kv_cache, need_weights):
        out = self.self_attn(x, attn_mask=attn_mask, is_causal=is_causal,
                             kv_cache=kv_cache, need_weights=need_weights)
        out, w = out if need_weights else (out, None)
        return self.dropout1(out), w

    def forward(self, x: Tensor, attn_mask: Tensor | None = None,
                is_causal: bool = False, kv_cache: KVCache | None = None,
                need_weights: bool = False):
        """(B, T, C) -> (B, T, C); ``need_weights=True`` -> (out, (B, nh, T, S))."""
        if self.norm_first:
            h, w = self._sa(self.norm1(x), attn_mask, is_causal, kv_cache, need_weights)
            x = x + h
            x = x + self.dropout2(self.ffn(self.norm2(x)))
        else:
            h, w = self._sa(x, attn_mask, is_causal, kv_cache, need_weights)
            x = self.norm1(x + h)
            x = self.norm2(x + self.dropout2(self.ffn(x)))
        return (x, w) if need_weights else x


class EncoderBlock(SelfAttentionBlock):
    """The Transformer's encoder block, laid out like ``nn.TransformerEncoderLayer``:
    separate q/k/v projections and dropout also inside the feed-forward network.

    Bidirectional by default; ``is_causal=True`` masks the future.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0,
                 activation: str = "relu", norm_first: bool = False, bias: bool = True,
                 norm: str = "layernorm", use_sdpa: bool = True, eps: float = 1e-5,
                 rope: nn.Module | None = None):
        super().__init__(d_model, n_heads, d_ff, dropout, activation, norm_first,
                         bias, norm, use_sdpa, eps, rope, fused_qkv=False,
                         ffn_dropout=dropout)


class GPTBlock(SelfAttentionBlock):
    """GPT-2's decoder block: pre-LN causal self-attention, then a GELU MLP.

    x = x + dropout(attn(norm1(x))); x = x + dropout(mlp(norm2(x))). Dropout sits on
    the attention weights and on each residual branch's output, not inside the MLP
    (Radford et al. 2019). One fused q/k/v projection; ``kv_cache`` carries the keys
    and values of earlier positions during generation. ``rope``: see
    :class:`~llmcore.nn.MultiHeadAttention`; ``qk_norm=True`` normalises queries and
    keys with the block's ``norm``; ``d_ff``: the MLP's hidden width (default 4 C).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0,
                 bias: bool = False, use_sdpa: bool = True, norm: str = "layernorm",
                 eps: float = 1e-5, activation: str = "gelu",
                 rope: nn.Module | None = None, qk_norm: bool = False,
                 d_ff: int | None = None):
        super().__init__(d_model, n_heads, d_ff or 4 * d_model, dropout, activation,
                         norm_first=True, bias=bias, norm=norm, use_sdpa=use_sdpa,
                         eps=eps, rope=rope, fused_qkv=True, ffn_dropout=0.0,
                         qk_norm=qk_norm)

    def forward(self, x: Tensor, kv_cache: KVCache | None = None,
                is_causal: bool = True) -> Tensor:
        """(B, T, C) -> (B, T, C). ``is_causal=False`` only with a one-token step
        after a cache, where it changes nothing."""
        h = self.self_attn(self.norm1(x), is_causal=is_causal, kv_cache=kv_cache)
        x = x + self.dropout1(h)
        return x + self.dropout2(self.ffn(self.norm2(x)))


class DecoderBlock(nn.Module):
    """Masked self-attention, cross-attention to the encoder's output, feed-forward.

    The cross-attention is what connects decoder and encoder: its queries come from
    the decoder (x, (B, T, C)), its keys and values from ``memory`` (B, S, C).
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0,
                 activation: str = "relu", norm_first: bool = False, bias: bool = True,
                 norm: str = "layernorm", use_sdpa: bool = True, eps: float = 1e-5):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout, bias, use_sdpa)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, dropout, bias, use_sdpa)
        self.ffn = FeedForward(d_model, d_ff, activation, dropout, bias)
        self.norm1 = make_norm(norm, d_model, eps, bias)
        self.norm2 = make_norm(norm, d_model, eps, bias)
        self.norm3 = make_norm(norm, d_model, eps, bias)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, tgt_is_causal: bool = False,
                kv_cache: KVCache | None = None, need_weights: bool = False):
        """(B, T, C), (B, S, C) -> (B, T, C).

        ``tgt_mask`` masks the self-attention, (T, T) or (B, 1, T, T); ``memory_mask``
        the cross-attention, e.g. a source padding mask (B, 1, 1, S).
        ``need_weights=True`` -> (out, self weights, cross weights).
        """
        def sa(h):
            return self.self_attn(h, attn_mask=tgt_mask, is_causal=tgt_is_causal,
                                  kv_cache=kv_cache, need_weights=need_weights)

        def ca(h):
            return self.cross_attn(h, memory, attn_mask=memory_mask,
                                   need_weights=need_weights)

        def unpack(out):
            return out if need_weights else (out, None)

        if self.norm_first:
            h, w_self = unpack(sa(self.norm1(x)))
            x = x + self.dropout1(h)
            h, w_cross = unpack(ca(self.norm2(x)))
            x = x + self.dropout2(h)
            x = x + self.dropout3(self.ffn(self.norm3(x)))
        else:
            h, w_self = unpack(sa(x))
            x = self.norm1(x + self.dropout1(h))
            h, w_cross = unpack(ca(x))
            x = self.norm2(x + self.dropout2(h))
            x = self.norm3(x + self.dropout3(self.ffn(x)))
        return (x, w_self, w_cross) if need_weights else x
