"""Transformer building blocks, each written by hand and tested against PyTorch's own.

attention.py   scaled_dot_product_attention, MultiHeadAttention, KVCache, causal_mask
layers.py      LayerNorm, RMSNorm, FeedForward (ReLU, GELU, SwiGLU)
positional.py  sinusoidal and learned positional encodings, rotary embeddings (RoPE)
blocks.py      EncoderBlock, DecoderBlock (post-LN or pre-LN)

Masks follow ``torch.nn.functional.scaled_dot_product_attention``: a boolean mask is
True where attention is allowed, a float mask is added to the scores.
"""

from llmcore.nn.attention import (KVCache, MultiHeadAttention, causal_mask,
                                  scaled_dot_product_attention)
from llmcore.nn.blocks import DecoderBlock, EncoderBlock, load_torch_weights
from llmcore.nn.layers import FeedForward, LayerNorm, RMSNorm, make_norm
from llmcore.nn.positional import (LearnedPositionalEmbedding, RotaryEmbedding,
                                   SinusoidalPositionalEncoding, sinusoidal_table)

__all__ = [
    "DecoderBlock", "EncoderBlock", "FeedForward", "KVCache", "LayerNorm",
    "LearnedPositionalEmbedding", "MultiHeadAttention", "RMSNorm", "RotaryEmbedding",
    "SinusoidalPositionalEncoding", "causal_mask", "load_torch_weights", "make_norm",
    "scaled_dot_product_attention", "sinusoidal_table",
]
