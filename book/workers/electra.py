"""ELECTRA: a small masked-LM generator and a discriminator that detects its edits.

Clark et al., "ELECTRA: Pre-training Text Encoders as Discriminators Rather Than
Generators" (ICLR 2020). The generator is a small BERT that fills the masked positions
with tokens sampled from its predictions; the discriminator reads the result and
predicts, for every token, whether it was replaced. The discriminator learns from all
T positions of a sequence instead of the 15% that are masked, which is where ELECTRA's
sample efficiency comes from. The two are trained jointly on

    loss = mlm_loss(generator) + rtd_weight * bce(discriminator)      (paper: weight 50)

with no gradient through the sampling. They share the token and position embeddings
(section 3.2); a generator narrower than the embeddings reads them through a linear
projection. After pre-training the generator is dropped and the discriminator is the
encoder to fine-tune.

Chapter 7 trains it beside a GPT and a BERT of the same shape; it is built from the
library's BERT parts (``llmcore.models.bert``) and lives beside the chapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from book.workers.rtd import detection_loss, replace_tokens
from llmcore.models.bert import (BertConfig, Embeddings, MLMHead, TransformerEncoder,
                                 check_ids, init_weights, key_padding_mask,
                                 mlm_cross_entropy)


@dataclass(frozen=True)
class ElectraConfig(BertConfig):
    """The discriminator's shape (the BertConfig fields) plus the generator's."""

    gen_n_layer: int = 2  # generator blocks
    gen_n_head: int = 2  # generator heads
    gen_n_embd: int = 64  # generator width (paper: 1/4 to 1/2 of the discriminator's)
    rtd_weight: float = 50.0  # lambda, the weight of the detection loss
    sample_temperature: float = 1.0  # generator sampling temperature (0: argmax)

    def __post_init__(self):
        super().__post_init__()
        if self.gen_n_layer <= 0 or self.gen_n_head <= 0 or self.gen_n_embd <= 0 or (
                self.gen_n_embd % self.gen_n_head):
            raise ValueError(f"ElectraConfig: gen_n_embd={self.gen_n_embd} must be a "
                             f"positive multiple of gen_n_head={self.gen_n_head}, and "
                             f"gen_n_layer={self.gen_n_layer} positive")
        if self.rtd_weight < 0 or self.sample_temperature < 0:
            raise ValueError("ElectraConfig: rtd_weight and sample_temperature must be "
                             ">= 0")


@dataclass
class ElectraOutput:
    """What one ELECTRA forward computed."""

    loss: Tensor  # mlm_loss + rtd_weight * rtd_loss, what to backpropagate
    mlm_loss: Tensor  # the generator's masked-LM cross-entropy
    rtd_loss: Tensor  # the discriminator's replaced-token binary cross-entropy
    gen_logits: Tensor  # (B, T, V)
    disc_logits: Tensor  # (B, T): > 0 means "replaced"
    disc_inputs: Tensor  # (B, T): the sequence the discriminator read
    disc_labels: Tensor  # (B, T): 1 replaced, 0 original, -100 padding


class Electra(nn.Module):
    """``forward(inputs, labels, attention_mask=None) -> ElectraOutput``.

    ``inputs, labels`` come from ``mask_tokens``. Sampling draws from ``generator``
    if given, else from torch's global RNG (which checkpoints restore).
    """

    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.config = c = config
        self.embeddings = Embeddings(c.vocab_size, c.block_size, c.n_embd, c.dropout,
                                     c.bias)
        self.gen_in = (nn.Identity() if c.gen_n_embd == c.n_embd
                       else nn.Linear(c.n_embd, c.gen_n_embd, bias=c.bias))
        self.generator = TransformerEncoder(c.gen_n_layer, c.gen_n_head, c.gen_n_embd,
                                            c.dropout, c.bias, c.use_sdpa)
        self.gen_head = MLMHead(c.gen_n_embd, self.embeddings.tok_emb, c.bias)
        self.discriminator = TransformerEncoder(c.n_layer, c.n_head, c.n_embd,
                                                c.dropout, c.bias, c.use_sdpa)
        self.disc_head = nn.Sequential(nn.Linear(c.n_embd, c.n_embd, bias=c.bias),
                                       nn.GELU(), nn.Linear(c.n_embd, 1))
        self.apply(init_weights)

    def generator_logits(self, idx: Tensor, attention_mask: Tensor | None = None
                         ) -> Tensor:
        """The generator's MLM predictions (B, T, V)."""
        check_ids(idx, self.config.block_size)
        mask = key_padding_mask(attention_mask, idx)
        h = self.generator(self.gen_in(self.embeddings(idx)), mask)
        return self.gen_head(h)

    def hidden(self, idx: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The discriminator's output (B, T, C): the encoder kept after pre-training."""
        check_ids(idx, self.config.block_size)
        mask = key_padding_mask(attention_mask, idx)
        return self.discriminator(self.embeddings(idx), mask)

    def discriminate(self, idx: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Replaced-token logits (B, T)."""
        return self.disc_head(self.hidden(idx, attention_mask)).squeeze(-1)

    def forward(self, inputs: Tensor, labels: Tensor,
                attention_mask: Tensor | None = None,
                generator: torch.Generator | None = None) -> ElectraOutput:
        gen_logits = self.generator_logits(inputs, attention_mask)  # (B, T, V)
        mlm_loss = mlm_cross_entropy(gen_logits, labels)
        disc_inputs, disc_labels = replace_tokens(
            inputs, labels, gen_logits, attention_mask, generator=generator,
            temperature=self.config.sample_temperature)
        disc_logits = self.discriminate(disc_inputs, attention_mask)  # (B, T)
        rtd_loss = detection_loss(disc_logits, disc_labels)
        loss = mlm_loss + self.config.rtd_weight * rtd_loss
        return ElectraOutput(loss, mlm_loss, rtd_loss, gen_logits, disc_logits,
                             disc_inputs, disc_labels)


def electra_loss(model: Electra, batch) -> Tensor:
    """A ``loss_fn`` for ``llmcore.train.train``: batch is ``(inputs, labels)``."""
    return model(*batch).loss
