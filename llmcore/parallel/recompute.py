"""Activation checkpointing: recompute a block's forward in backward instead of
keeping its activations (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
Cost").

A checkpointed block keeps only its input; during backward it runs its forward again
to rebuild what the gradients need: about one more forward per step (a third more
compute) for most of the activation memory. ``torch.utils.checkpoint`` does the
work; this module chooses the blocks.
"""

from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward):
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def apply_activation_checkpointing(model: nn.Module, every: int = 1) -> list[int]:
    """Recompute every ``every``-th block of ``model.blocks`` in backward instead of
    saving its activations; in place, parameter names unchanged. Returns the indices
    of the checkpointed blocks."""
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int (1: every block), "
                         f"got {every!r}")
    chosen = list(range(0, len(model.blocks), every))
    for i in chosen:
        block = model.blocks[i]
        block.forward = _checkpointed(block.forward)
    return chosen
