"""Random streams across ranks: which ranks must draw the same dropout mask, which not.

* Data parallelism: each rank sees other samples, so its dropout masks must be its
  own; one seed for all would make every rank drop the same positions of its batch.
  :func:`rank_seed` derives a different seed per data-parallel rank.
* Tensor parallelism (Megatron-LM's model-parallel RNG tracker, Shoeybi et al. 2019):
  inside the parallel region a rank holds other heads and hidden units than its
  peers, so its masks must differ; outside it (residual dropout on replicated
  activations) every rank of the group must draw the *same* mask, or the replicas
  drift apart. :class:`RNGTracker` keeps a named generator state apart from the
  default one and swaps it in for the region (:func:`fork_around`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

_TP_OFFSET = 7919  # any constant works; it keeps the region's seeds off the others


def rank_seed(seed: int, dp_rank: int = 0, pp_rank: int = 0) -> int:
    """The default generator's seed of a rank: different per data-parallel rank and
    pipeline stage, equal within a tensor-parallel group."""
    return seed + 1_000_003 * dp_rank + 10_007 * pp_rank


def tp_region_seed(seed: int, tp_rank: int) -> int:
    """The tensor-parallel region's seed: different on every rank of the group."""
    return seed + _TP_OFFSET + tp_rank


class RNGTracker:
    """Named random states beside the default generator; ``fork(name)`` runs a block
    on that state and restores the default one, which does not advance."""

    def __init__(self, device: str = "cpu"):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.device = device
        self.states: dict[str, torch.Tensor] = {}
        self._saved: list[torch.Tensor] = []

    def _get(self) -> torch.Tensor:
        return torch.cuda.get_rng_state() if self.device == "cuda" else \
            torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.device == "cuda":
            torch.cuda.set_rng_state(state)
        else:
            torch.set_rng_state(state)

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise ValueError(f"random state {name!r} exists already")
        saved = self._get()
        if self.device == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self.states[name] = self._get()
        self._set(saved)

    def enter(self, name: str) -> None:
        if name not in self.states:
            raise KeyError(f"no random state {name!r}; add it first")
        self._saved.append(self._get())
        self._set(self.states[name])

    def exit(self, name: str) -> None:
        self.states[name] = self._get()
        self._set(self._saved.pop())

    @contextlib.contextmanager
    def fork(self, name: str):
        self.enter(name)
        try:
            yield
        finally:
            self.exit(name)


def fork_around(module: nn.Module, tracker: RNGTracker, name: str) -> None:
    """Run every forward of ``module`` on the tracker's state ``name``."""
    module.register_forward_pre_hook(lambda m, args: tracker.enter(name))
    module.register_forward_hook(lambda m, args, out: tracker.exit(name),
                                 always_call=True)
