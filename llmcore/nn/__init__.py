"""Transformer building blocks, each written by hand and tested against PyTorch's own.

attention.py   scaled_dot_product_attention, MultiHeadAttention (separate or fused
               q/k/v), causal_mask
kvcache.py     KVCache: growing, or static (preallocated, written in place)
layers.py      LayerNorm, RMSNorm, FeedForward (ReLU, GELU, SwiGLU), make_norm
positional.py  sinusoidal and learned positional encodings, rotary embeddings (RoPE)
blocks.py      EncoderBlock (post-LN or pre-LN), GPTBlock, DecoderBlock
loss.py        lm_loss; swap.py: swap_modules
moe.py         MoE, MoEConfig: a mixture of experts (router, capacity, balancing)

Masks follow ``torch.nn.functional.scaled_dot_product_attention``: a boolean mask is
True where attention is allowed, a float mask is added to the scores.
"""

from llmcore.nn.attention import (MultiHeadAttention, causal_mask,
                                  scaled_dot_product_attention)
from llmcore.nn.blocks import DecoderBlock, EncoderBlock, GPTBlock, SelfAttentionBlock
from llmcore.nn.kvcache import KVCache
from llmcore.nn.layers import FeedForward, LayerNorm, RMSNorm, make_norm
from llmcore.nn.positional import (LearnedPositionalEmbedding, RotaryEmbedding,
                                   SinusoidalPositionalEncoding, sinusoidal_table)

__all__ = [
    "DecoderBlock", "EncoderBlock", "FeedForward", "GPTBlock", "KVCache", "LayerNorm",
    "LearnedPositionalEmbedding", "MultiHeadAttention", "RMSNorm", "RotaryEmbedding",
    "SelfAttentionBlock", "SinusoidalPositionalEncoding", "causal_mask",
    "make_norm", "scaled_dot_product_attention",
    "sinusoidal_table",
]
