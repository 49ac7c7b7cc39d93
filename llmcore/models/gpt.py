"""A decoder-only Transformer language model in the style of GPT-2.

Radford et al., "Language Models are Unsupervised Multitask Learners" (2019): token and
learned position embeddings, a stack of pre-LN blocks (causal self-attention + GELU
feed-forward), a final LayerNorm, and an output layer that shares its weights with the
token embedding (Press & Wolf, "Using the Output Embedding to Improve Language Models",
2017). The blocks are ``llmcore.nn.GPTBlock``: one fused q/k/v projection, GPT-2's
dropout placement, PyTorch's fused LayerNorm kernel; attention runs on PyTorch's fused
SDPA kernel unless ``use_sdpa=False`` asks for the hand-written one.

Initialisation follows GPT-2: every weight from N(0, 0.02), biases zero, and the two
projections that write into the residual stream (attention output, second FFN layer)
scaled by 1/sqrt(2 n_layer), so that the residual's variance does not grow with depth.

Options that later models use, each off by default (the "training faster" chapter
measures what each buys): rotary positions instead of the learned table (Su et al.
2021), RMSNorm (Zhang & Sennrich 2019), normalised queries and keys (Dehghani et al.
2023), a ReLU^2 (So et al. 2021) or SwiGLU (Shazeer 2020) MLP, an output layer of its
own, and residual projections that start at zero, so that every block starts as the
identity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from llmcore.config import check_fields
from llmcore.models import hf
from llmcore.nn import (GPTBlock, KVCache, LearnedPositionalEmbedding, RotaryEmbedding,
                        make_norm)
from llmcore.nn.loss import lm_loss
from llmcore.nn.moe import MoE, MoEConfig


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT; ``GPTConfig(65, 64, 4, 4, 128)``: the CPU-tier char model."""

    vocab_size: int  # V: number of token ids
    block_size: int  # the context: the longest sequence the model reads
    n_layer: int  # number of Transformer blocks
    n_head: int  # nh: attention heads per block
    n_embd: int  # C: model width; head size hs = C // nh
    dropout: float = 0.0  # on embeddings, attention weights and residual branches
    bias: bool = False  # biases in linear layers and LayerNorms (GPT-2 had them;
    # without them each layer does a little less work per step)
    use_sdpa: bool = True  # fused attention kernel; False: the hand-written one
    activation: str = "gelu"  # the MLP's: "gelu" (exact, erf), "gelu_tanh" (the
    # tanh approximation GPT-2's released weights were trained with), "relu2" (ReLU
    # squared) or "swiglu" (gated, three matrices of 8 C / 3: a 4 C MLP's parameters)
    norm_eps: float = 1e-5  # the LayerNorms' epsilon (GPT-2's layer_norm_epsilon)
    moe: MoEConfig | None = None  # every block's MLP a mixture of experts
    # (llmcore.nn.moe); None: the dense MLP
    pos: str = "learned"  # positions: "learned" (a table added to the embeddings,
    # GPT-2) or "rope" (queries and keys rotated inside attention)
    norm: str = "layernorm"  # every norm: "layernorm" or "rmsnorm" (no centring, no
    # bias: one reduction instead of two)
    qk_norm: bool = False  # normalise each head's queries and keys (with `norm`)
    tie_weights: bool = True  # the output layer reuses the token embedding's matrix
    zero_init: bool = False  # attention output, second MLP layer and an untied output
    # layer start at zero (every block starts as the identity)

    def __post_init__(self):
        check_fields(self, "vocab_size", "block_size", "n_layer", "n_head", "n_embd",
                     integer=True, above=0)
        if self.n_embd % self.n_head:
            raise ValueError(f"{type(self).__name__}.n_embd={self.n_embd} must be a "
                             f"multiple of n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{type(self).__name__}.dropout must be in [0, 1), got "
                             f"{self.dropout}")
        for name, allowed in (("activation", ("gelu", "gelu_tanh", "relu2", "swiglu")),
                              ("pos", ("learned", "rope")),
                              ("norm", ("layernorm", "rmsnorm"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{type(self).__name__}.{name}="
                                 f"{getattr(self, name)!r}; use one of {allowed}")
        check_fields(self, "norm_eps", above=0)
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            raise ValueError(f"{type(self).__name__}.moe must be an "
                             f"llmcore.nn.moe.MoEConfig or None, got {self.moe!r}")

    @property
    def d_ff(self) -> int:
        """The MLP's hidden width: 4 C; SwiGLU's three matrices 8 C / 3 (rounded up
        to a multiple of 8), the parameters and FLOPs of the two 4 C ones."""
        return 8 * -(-self.n_embd // 3) if self.activation == "swiglu" else \
            4 * self.n_embd


class GPT(nn.Module):
    """``forward(idx, targets=None) -> (logits, loss)``; logits (B, T, V).

    ``hidden(idx)`` is the trunk alone, (B, T, C): what fine-tuning heads and the
    pipeline's stages build on.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.pos_emb = (LearnedPositionalEmbedding(c.block_size, c.n_embd)
                        if c.pos == "learned" else None)
        # RoPE: one table of angles, shared by every block's attention
        rope = (RotaryEmbedding(c.n_embd // c.n_head, c.block_size)
                if c.pos == "rope" else None)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            GPTBlock(c.n_embd, c.n_head, c.dropout, c.bias, c.use_sdpa, norm=c.norm,
                     eps=c.norm_eps, activation=c.activation, rope=rope,
                     qk_norm=c.qk_norm, d_ff=c.d_ff)
            for _ in range(c.n_layer))
        if c.moe is not None:  # the experts take the MLP's place, same activation
            for block in self.blocks:
                block.ffn = MoE(c.n_embd, c.moe, c.bias, block.ffn.activation)
        self.ln_f = make_norm(c.norm, c.n_embd, eps=c.norm_eps, bias=c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_weights:
            self.lm_head.weight = self.tok_emb.weight  # weight tying: one (V, C) matrix
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * c.n_layer)
        for block in self.blocks:
            out = [block.self_attn.out_proj.weight] + [
                p for name, p in block.ffn.named_parameters()  # each expert's too
                if name.endswith("linear2.weight")]
            for p in out:
                if c.zero_init:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, 0.0, residual_std)
        if c.zero_init and not c.tie_weights:  # the first logits are all 0: uniform
            nn.init.zeros_(self.lm_head.weight)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Embedding, LearnedPositionalEmbedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)

    def new_kv_caches(self, static: bool = True) -> list[KVCache]:
        """One empty cache per block, for :func:`llmcore.generate.generate`: static
        (preallocated for ``block_size`` positions) or growing."""
        max_len = self.config.block_size if static else None
        return [KVCache(max_len=max_len) for _ in self.blocks]

    def hidden(self, idx: Tensor, kv_caches: list[KVCache] | None = None) -> Tensor:
        """The trunk: embeddings, blocks and final norm, (B, T) ids -> (B, T, C).

        With ``kv_caches`` (from :meth:`new_kv_caches`) ``idx`` continues the sequence
        the caches hold: positions start at their length and keys/values are stored.
        """
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be an int64 tensor (B, T), got "
                             f"{tuple(idx.shape)} {idx.dtype}")
        if isinstance(kv_caches, Tensor):
            raise ValueError("kv_caches must be a list of KVCache (new_kv_caches()), "
                             "got a tensor; a GPT takes no attention mask: it is "
                             "causal, so right padding needs none")
        past = len(kv_caches[0]) if kv_caches is not None else 0
        if past + idx.shape[1] > self.config.block_size:
            raise ValueError(f"idx has {idx.shape[1]} positions (+{past} cached), more "
                             f"than block_size={self.config.block_size}; crop it to "
                             f"idx[:, -{self.config.block_size}:]")
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:  # with RoPE, positions enter in attention
            x = self.pos_emb(x, offset=past)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, kv_cache=kv_caches[i] if kv_caches is not None else None)
        return self.ln_f(x)

    def forward(self, idx: Tensor, targets: Tensor | None = None,
                kv_caches: list[KVCache] | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits for every position of ``idx`` (B, T), and the mean cross-entropy
        against ``targets`` (B, T) if given (-100 marks a position to ignore).

        With ``config.moe``, in training mode, the loss also holds the routers'
        load-balancing losses, summed over blocks and weighted by ``aux_loss_coef``
        (evaluation reports the cross-entropy alone)."""
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, "
                             f"got {tuple(targets.shape)}")
        logits = self.lm_head(self.hidden(idx, kv_caches))  # (B, T, V)
        loss = lm_loss(logits, targets) if targets is not None else None
        if loss is not None and self.training and self.config.moe is not None:
            aux = sum(block.ffn.aux_loss for block in self.blocks)
            loss = loss + self.config.moe.aux_loss_coef * aux
        return logits, loss

    @classmethod
    def from_hf(cls, source, config=None) -> "GPT":
        """The GPT with the weights of a Hugging Face ``GPT2LMHeadModel``, or of its
        state dict (``config``: its ``GPT2Config``); see :mod:`llmcore.models.hf`."""
        fields, state = hf.from_hf(source, config)
        model = cls(GPTConfig(**fields))
        model.load_state_dict(state)
        return model

    def to_hf(self):
        """A ``transformers`` ``GPT2LMHeadModel`` with this model's weights."""
        return hf.to_hf(asdict(self.config), self.state_dict())

    @classmethod
    def from_pretrained(cls, name: str = "gpt2") -> "GPT":
        """GPT-2's released weights ("gpt2": 124M parameters, "gpt2-medium",
        "gpt2-large", "gpt2-xl"), downloaded through ``transformers`` (online)."""
        return cls.from_hf(hf.download(name))
