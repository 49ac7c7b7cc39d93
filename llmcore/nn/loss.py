"""The language-modelling loss: mean cross-entropy over the positions that count.

A target equal to ``IGNORE_INDEX`` (-100, PyTorch's default ``ignore_index``) marks a
position that does not count: padding, a prompt in chat fine-tuning, an unmasked token
in masked LM. One function serves causal LM, masked LM and the pipeline's last stage.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from llmcore.config import IGNORE_INDEX


def lm_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of ``logits`` (..., V) against ``targets`` (...), skipping
    ``IGNORE_INDEX``; ``reduction="sum"`` for token-weighted accumulation."""
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])} (the "
                         f"logits' without V), got {tuple(targets.shape)}")
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)
