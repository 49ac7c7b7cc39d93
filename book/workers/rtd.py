"""Replaced-token detection: ELECTRA's corruption of a batch for the discriminator.

Clark et al., "ELECTRA: Pre-training Text Encoders as Discriminators Rather Than
Generators" (ICLR 2020), section 2. A small masked-LM *generator* sees the masked
inputs (from ``llmcore.data.mlm.mask_tokens``) and proposes a token at every masked
position; the proposals are *sampled* from its softmax, not taken greedily. The
*discriminator* reads the original sequence with those proposals written in and
predicts, at every position, whether the token there differs from the original. A
sampled token that equals the original counts as original (label 0), as in the
paper: no discriminator could tell it apart. No gradient flows through the sampling;
the generator learns from its own MLM loss.

Public API::

    replace_tokens(inputs, labels, generator_logits, attention_mask=None,
                   generator=None, temperature=1.0) -> (disc_inputs, disc_labels)
    detection_loss(disc_logits, disc_labels) -> scalar tensor

``inputs`` and ``labels`` are the ``(B, T)`` pair from ``mask_tokens``: the masked
positions are ``labels != -100``, where ``labels`` holds the original id; elsewhere
``inputs`` holds the original id. ``generator_logits`` is ``(B, T, V)``, the
generator's output on ``inputs`` (detached here). ``disc_inputs`` (``(B, T)``, dtype
of ``inputs``) is the original sequence with a sampled token at every masked position.
``disc_labels`` (``(B, T)``, int64) is 1 where ``disc_inputs`` differs from the
original, 0 where it equals it, and ``-100`` where ``attention_mask`` (bool ``(B, T)``,
True = real token) is False. ``temperature=0`` takes the generator's argmax. The
Gumbel noise is drawn from ``generator`` on its own device, so a seeded CPU generator
gives the same replacements on every device.

``detection_loss`` is the discriminator's binary cross-entropy, averaged over the
positions whose label is not ``-100``; ``disc_logits`` is ``(B, T)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmcore.config import IGNORE_INDEX


@torch.no_grad()
def replace_tokens(inputs: torch.Tensor, labels: torch.Tensor,
                   generator_logits: torch.Tensor,
                   attention_mask: torch.Tensor | None = None,
                   generator: torch.Generator | None = None,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Write sampled generator proposals into the masked positions; label them."""
    if inputs.shape != labels.shape:
        raise ValueError(f"inputs {tuple(inputs.shape)} and labels "
                         f"{tuple(labels.shape)} must have the same shape (B, T)")
    if generator_logits.shape[:-1] != labels.shape:
        raise ValueError(f"generator_logits must be (B, T, V) with (B, T) = "
                         f"{tuple(labels.shape)}, got {tuple(generator_logits.shape)}")
    if attention_mask is not None and attention_mask.shape != labels.shape:
        raise ValueError(f"attention_mask must be (B, T) = {tuple(labels.shape)}, got "
                         f"{tuple(attention_mask.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 means argmax)")

    masked = labels != IGNORE_INDEX
    original = torch.where(masked, labels, inputs.long())
    logits = generator_logits.detach()[masked].float()  # (N, V), N masked positions
    if temperature == 0:
        sampled = logits.argmax(-1)
    else:
        # Gumbel-max: argmax(logits/t + Gumbel noise) is a sample of softmax(logits/t).
        dev = generator.device if generator is not None else logits.device
        u = torch.rand(logits.shape, generator=generator, device=dev).to(logits.device)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
        sampled = (logits / temperature + gumbel).argmax(-1)

    disc_inputs = original.clone()
    disc_inputs[masked] = sampled
    disc_labels = (disc_inputs != original).long()
    if attention_mask is not None:
        disc_labels[~attention_mask.bool()] = IGNORE_INDEX
    return disc_inputs.to(inputs.dtype), disc_labels


def detection_loss(disc_logits: torch.Tensor,
                   disc_labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of "replaced?" over the positions not labelled ``-100``."""
    if disc_logits.shape != disc_labels.shape:
        raise ValueError(f"disc_logits {tuple(disc_logits.shape)} must have the shape "
                         f"of disc_labels {tuple(disc_labels.shape)}: one logit per "
                         "token, (B, T)")
    keep = disc_labels != IGNORE_INDEX
    return F.binary_cross_entropy_with_logits(disc_logits[keep].float(),
                                              disc_labels[keep].float())
