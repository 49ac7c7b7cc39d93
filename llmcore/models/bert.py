"""A BERT-style encoder trained with masked language modelling.

Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding" (2019). Token and learned position embeddings, a LayerNorm, a stack of
bidirectional blocks (no causal mask: every token sees the whole sequence), and an MLM
head (dense, GELU, LayerNorm, then an output layer tied to the token embedding, with
its own bias) that predicts the original token at each masked position. The corruption
itself is data, not model: see ``llmcore.data.mlm.mask_tokens``.

Departures from the paper, for the small models of the book: pre-LN blocks with a
final LayerNorm (as in the GPT here, so the objectives are compared on one
architecture), no segment embeddings and no next-sentence task (Liu et al., "RoBERTa",
2019, found that task does not help).

The pieces (``Embeddings``, ``TransformerEncoder``, ``MLMHead``) are shared with the
ELECTRA pair of chapter 7 (``book/workers/electra.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmcore.models.gpt import GPT, GPTConfig
from llmcore.nn import EncoderBlock, LearnedPositionalEmbedding, make_norm
from llmcore.nn.loss import lm_loss


@dataclass(frozen=True)
class BertConfig(GPTConfig):
    """The shape of a BERT-style encoder: the same fields, defaults and checks as a
    GPT's (so biases are off by default here too, unlike the paper's BERT: chapter 7
    compares the objectives on one architecture).

    ``vocab_size`` includes the [MASK] id; ``block_size`` is the longest sequence.
    """


def init_weights(module: nn.Module) -> None:
    """BERT's initialisation, which is GPT-2's: N(0, 0.02) weights, zero biases."""
    GPT._init_weights(module)


def key_padding_mask(attention_mask: Tensor | None, idx: Tensor) -> Tensor | None:
    """(B, T) bool, True = real token -> (B, 1, 1, T): no query attends to a pad."""
    if attention_mask is None:
        return None
    if attention_mask.shape != idx.shape:
        raise ValueError(f"attention_mask must have the shape of idx "
                         f"{tuple(idx.shape)}, got {tuple(attention_mask.shape)}")
    return attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)


def check_ids(idx: Tensor, block_size: int) -> None:
    if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"idx must be an int64 tensor (B, T), got {tuple(idx.shape)} "
                         f"{idx.dtype}")
    if idx.shape[1] > block_size:
        raise ValueError(f"idx has {idx.shape[1]} positions, more than block_size="
                         f"{block_size}")


class Embeddings(nn.Module):
    """Token + learned position embeddings, LayerNorm, dropout: (B, T) -> (B, T, C)."""

    def __init__(self, vocab_size: int, block_size: int, n_embd: int,
                 dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = LearnedPositionalEmbedding(block_size, n_embd)
        self.norm = make_norm("layernorm", n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, idx: Tensor) -> Tensor:
        return self.drop(self.norm(self.pos_emb(self.tok_emb(idx))))  # (B, T, C)


class TransformerEncoder(nn.Module):
    """Bidirectional pre-LN blocks and a final LayerNorm: (B, T, C) -> (B, T, C)."""

    def __init__(self, n_layer: int, n_head: int, n_embd: int, dropout: float = 0.0,
                 bias: bool = True, use_sdpa: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(
            EncoderBlock(n_embd, n_head, 4 * n_embd, dropout, activation="gelu",
                         norm_first=True, bias=bias, use_sdpa=use_sdpa)
            for _ in range(n_layer))
        self.norm = make_norm("layernorm", n_embd, bias=bias)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        return self.norm(x)


class MLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> tied output layer + bias: (B, T, C) -> (B, T, V).

    ``embedding`` is the token embedding (V, E) whose matrix the output layer reuses;
    the dense layer maps the encoder's width C to E.
    """

    def __init__(self, n_embd: int, embedding: nn.Embedding, bias: bool = True):
        super().__init__()
        vocab_size, emb_dim = embedding.weight.shape
        self.dense = nn.Linear(n_embd, emb_dim, bias=bias)
        self.norm = make_norm("layernorm", emb_dim, bias=bias)
        self.embedding = embedding  # shared, not a copy
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, h: Tensor) -> Tensor:
        h = self.norm(F.gelu(self.dense(h)))
        return F.linear(h, self.embedding.weight, self.bias)  # (B, T, V)


def mlm_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the positions whose label is not IGNORE_INDEX."""
    return lm_loss(logits, labels)


class BERT(nn.Module):
    """``forward(idx, labels=None, attention_mask=None) -> (logits, loss)``.

    ``labels`` (B, T) holds the original id at masked positions and -100 elsewhere
    (what ``mask_tokens`` returns); ``attention_mask`` (B, T) is True at real tokens.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = c = config
        self.embeddings = Embeddings(c.vocab_size, c.block_size, c.n_embd, c.dropout,
                                     c.bias)
        self.encoder = TransformerEncoder(c.n_layer, c.n_head, c.n_embd, c.dropout,
                                          c.bias, c.use_sdpa)
        self.mlm_head = MLMHead(c.n_embd, self.embeddings.tok_emb, c.bias)
        self.apply(init_weights)

    def hidden(self, idx: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The encoder's output (B, T, C): contextual vectors for probes and heads."""
        check_ids(idx, self.config.block_size)
        mask = key_padding_mask(attention_mask, idx)
        return self.encoder(self.embeddings(idx), mask)

    def forward(self, idx: Tensor, labels: Tensor | None = None,
                attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        logits = self.mlm_head(self.hidden(idx, attention_mask))  # (B, T, V)
        loss = mlm_cross_entropy(logits, labels) if labels is not None else None
        return logits, loss
