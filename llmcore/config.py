"""Configs are frozen dataclasses; experiment sizes come in pairs, one per tier.

A page never writes ``if gpu: n_layer = 12 else: n_layer = 4``. It names a preset,

    SIZES = Tiered(cpu=GPTConfig(n_layer=4, ...), gpu=GPTConfig(n_layer=12, ...))
    cfg = rt.pick(SIZES)

and the runtime picks the entry for its tier (see ``llmcore.runtime``). Presets live
beside the code they configure; this module holds what they share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")

# The experiment sizes a page can ask for; ``llmcore.runtime`` picks one per machine.
TIERS = ("cpu", "gpu")

# Gpu-tier presets fit a 16 GiB GPU (Colab's T4) unless a page declares a larger need
# and picks its size from the device's memory (``Runtime.fit``). A test builds every
# gpu preset on the meta device and checks its training memory against this.
GPU_BUDGET_GB = 16

# A target position that no loss counts (padding, prompts, unmasked tokens): the
# default ignore_index of torch.nn.functional.cross_entropy.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Tiered(Generic[T]):
    """One preset per tier: ``cpu``, a minute or two on two cores; ``gpu``, one GPU."""

    cpu: T  # small enough for a laptop and for CI
    gpu: T  # a real experiment, minutes on one GPU

    def __getitem__(self, tier: str) -> T:
        if tier not in TIERS:
            raise KeyError(f"unknown tier {tier!r}; use one of {TIERS}")
        return getattr(self, tier)

    def __contains__(self, tier: object) -> bool:
        return tier in TIERS

    def __iter__(self) -> Iterator[str]:
        return iter(TIERS)

    def keys(self) -> tuple[str, ...]:
        return TIERS


def check_positive(obj: object, *names: str) -> None:
    """Raise a ValueError naming the first field of ``obj`` that is not a positive,
    finite number (NaN and infinity are refused). For ``__post_init__``."""
    for name in names:
        value = getattr(obj, name)
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or not math.isfinite(value) or value <= 0):
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive number, "
                             f"got {value!r}")


def check_positive_int(obj: object, *names: str) -> None:
    """Like :func:`check_positive` for sizes and counts: each must be an ``int``
    (``128.0`` is refused: a float size would fail later, far from its cause)."""
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive int, "
                             f"got {value!r}; write it without a decimal point")


def override(cfg: T, **changes) -> T:
    """A copy of the frozen ``cfg`` with ``changes``; unknown names are errors."""
    known = {f.name for f in fields(cfg)}  # type: ignore[arg-type]
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"{type(cfg).__name__} has no field(s) {unknown}; "
                         f"fields are {sorted(known)}")
    return replace(cfg, **changes)  # type: ignore[type-var]
