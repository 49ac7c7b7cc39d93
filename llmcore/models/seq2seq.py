"""The encoder-decoder Transformer of Vaswani et al., "Attention Is All You Need", 2017.

The encoder reads the whole source at once (no causal mask); the decoder writes the
target one token at a time, attending causally to what it wrote and, through
cross-attention, to every source position. Masks are built from token ids: a padding
mask hides ``pad_id`` keys, a causal mask hides the future. Boolean masks are True
where attention is allowed (the SDPA convention of ``llmcore.nn``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmcore.config import check_fields
from llmcore.nn import (DecoderBlock, EncoderBlock, KVCache,
                        SinusoidalPositionalEncoding, causal_mask, make_norm)


@dataclass(frozen=True)
class Seq2SeqConfig:
    src_vocab: int  # source vocabulary size
    tgt_vocab: int  # target vocabulary size
    d_model: int = 128  # width C of every token vector
    n_heads: int = 4  # attention heads per layer; d_model must be a multiple
    n_enc_layers: int = 2  # encoder blocks
    n_dec_layers: int = 2  # decoder blocks
    d_ff: int = 512  # feed-forward hidden width (4 d_model in the paper)
    dropout: float = 0.0  # on attention weights, sub-layer outputs and embeddings
    max_len: int = 256  # longest source or target; size of the positional table
    pad_id: int = 0  # padding token id, in source and target alike
    norm_first: bool = True  # pre-LN (True) or the paper's post-LN (False)
    activation: str = "relu"  # feed-forward activation: relu, gelu, swiglu

    def __post_init__(self):
        check_fields(self, "src_vocab", "tgt_vocab", "d_model", "n_heads",
                     "n_enc_layers", "n_dec_layers", "d_ff", "max_len", integer=True,
                     above=0)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of "
                             f"n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must lie in [0, 1)")


def padding_mask(ids: Tensor, pad_id: int) -> Tensor:
    """(B, S) token ids -> (B, 1, 1, S), True at real tokens: every query sees them."""
    return (ids != pad_id)[:, None, None, :]


def target_mask(ids: Tensor, pad_id: int) -> Tensor:
    """(B, T) token ids -> (B, 1, T, T): causal and not padding."""
    t = ids.shape[1]
    return causal_mask(t, device=ids.device) & padding_mask(ids, pad_id)


def _check_ids(name: str, ids: Tensor, vocab: int, max_len: int) -> None:
    if ids.dim() != 2 or ids.dtype != torch.long or ids.shape[1] > max_len:
        raise ValueError(f"{name} must be a (B, T) tensor of int64 token ids with "
                         f"T <= max_len={max_len}; got {tuple(ids.shape)} {ids.dtype}")
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"{name} holds ids outside [0, {vocab}); check the vocabulary")


class Embedding(nn.Module):
    """Token embedding times sqrt(d_model) plus sinusoidal positions (sec. 3.4-3.5)."""

    def __init__(self, vocab: int, cfg: Seq2SeqConfig):
        super().__init__()
        self.tok = nn.Embedding(vocab, cfg.d_model)
        nn.init.normal_(self.tok.weight, std=cfg.d_model ** -0.5)
        self.pos = SinusoidalPositionalEncoding(cfg.d_model, cfg.max_len)
        self.drop = nn.Dropout(cfg.dropout)
        self.scale = math.sqrt(cfg.d_model)

    def forward(self, ids: Tensor, offset: int = 0) -> Tensor:
        return self.drop(self.pos(self.tok(ids) * self.scale, offset))  # (B, T, C)


def _block_kwargs(cfg: Seq2SeqConfig) -> dict:
    return dict(d_model=cfg.d_model, n_heads=cfg.n_heads, d_ff=cfg.d_ff,
                dropout=cfg.dropout, activation=cfg.activation,
                norm_first=cfg.norm_first)


class Encoder(nn.Module):
    """Source ids (B, S) -> memory (B, S, C): bidirectional self-attention."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg.src_vocab, cfg)
        self.layers = nn.ModuleList(EncoderBlock(**_block_kwargs(cfg))
                                    for _ in range(cfg.n_enc_layers))
        # Pre-LN leaves the residual stream un-normalized: normalize it once at the end.
        self.norm = make_norm("layernorm", cfg.d_model) if cfg.norm_first else None

    def forward(self, src: Tensor) -> Tensor:
        _check_ids("src", src, self.cfg.src_vocab, self.cfg.max_len)
        mask = padding_mask(src, self.cfg.pad_id)
        x = self.embed(src)
        for layer in self.layers:
            x = layer(x, attn_mask=mask)
        return x if self.norm is None else self.norm(x)


class Decoder(nn.Module):
    """Target ids (B, T) and memory (B, S, C) -> next-token logits (B, T, V)."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg.tgt_vocab, cfg)
        self.layers = nn.ModuleList(DecoderBlock(**_block_kwargs(cfg))
                                    for _ in range(cfg.n_dec_layers))
        self.norm = make_norm("layernorm", cfg.d_model) if cfg.norm_first else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.tgt_vocab)

    def forward(self, tgt: Tensor, memory: Tensor, memory_mask: Tensor | None = None,
                kv_caches: list[KVCache] | None = None, need_weights: bool = False):
        """With ``kv_caches`` (one per layer) ``tgt`` holds only the new tokens.

        ``need_weights=True`` returns ``(logits, cross)``, ``cross`` a list with each
        layer's cross-attention weights (B, nh, T, S).
        """
        past = len(kv_caches[0]) if kv_caches else 0
        _check_ids("tgt", tgt, self.cfg.tgt_vocab, self.cfg.max_len - past)
        x = self.embed(tgt, offset=past)
        # With a cache the new tokens are real ones: the causal mask alone is right.
        mask = None if kv_caches else target_mask(tgt, self.cfg.pad_id)
        cross = []
        for i, layer in enumerate(self.layers):
            out = layer(x, memory, tgt_mask=mask, memory_mask=memory_mask,
                        tgt_is_causal=mask is None,
                        kv_cache=kv_caches[i] if kv_caches else None,
                        need_weights=need_weights)
            x = out[0] if need_weights else out
            if need_weights:
                cross.append(out[2])
        x = x if self.norm is None else self.norm(x)
        logits = self.lm_head(x)  # (B, T, V)
        return (logits, cross) if need_weights else logits


class EncoderDecoder(nn.Module):
    """The full model: ``forward(src, tgt_in)`` gives next-target-token logits."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, src: Tensor, tgt_in: Tensor, need_weights: bool = False):
        memory = self.encoder(src)
        return self.decoder(tgt_in, memory, padding_mask(src, self.cfg.pad_id),
                            need_weights=need_weights)

    def loss(self, src: Tensor, tgt: Tensor) -> Tensor:
        """Teacher forcing: predict tgt[:, 1:] from tgt[:, :-1]; padding is ignored."""
        logits = self(src, tgt[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(),
                               ignore_index=self.cfg.pad_id)

    @torch.no_grad()
    def generate(self, src: Tensor, bos_id: int, eos_id: int, max_new_tokens: int,
                 use_cache: bool = True) -> Tensor:
        """Greedy decoding: (B, S) source -> (B, 1 + n) target starting with ``bos_id``.

        The source is encoded once; with ``use_cache`` each step feeds only the newest
        token and reuses the cached keys and values. After ``eos_id`` a row is padded.
        """
        if self.cfg.pad_id in (bos_id, eos_id):
            raise ValueError(f"bos_id={bos_id} and eos_id={eos_id} must differ from "
                             f"pad_id={self.cfg.pad_id}, which the masks hide")
        memory = self.encoder(src)
        mem_mask = padding_mask(src, self.cfg.pad_id)
        out = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        # Static caches: preallocated for the steps ahead, written in place; eager
        # steps read only the written prefix.
        room = min(self.cfg.max_len, max(1, max_new_tokens))
        caches = ([KVCache(max_len=room, fixed_shapes=False)
                   for _ in self.decoder.layers] if use_cache else None)
        for _ in range(max_new_tokens):
            step_in = out[:, -1:] if use_cache else out
            logits = self.decoder(step_in, memory, mem_mask, kv_caches=caches)
            # Never emit padding for a live row: the masks would hide that token.
            nxt = logits[:, -1].index_fill(-1, torch.tensor([self.cfg.pad_id],
                                           device=src.device), float("-inf")).argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.cfg.pad_id), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == eos_id
            if done.all():
                break
        return out
