"""Configs are frozen dataclasses; experiment sizes come in pairs, one per tier.

A page never writes ``if gpu: n_layer = 12 else: n_layer = 4``. It names a preset,

    SIZES = Tiered(cpu=GPTConfig(n_layer=4, ...), gpu=GPTConfig(n_layer=12, ...))
    cfg = rt.pick(SIZES)

and the runtime picks the entry for its tier (see ``llmcore.runtime``). Presets live
beside the code they configure; this module holds what they share.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields, replace
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")

# The experiment sizes a page can ask for; ``llmcore.runtime`` picks one per machine.
TIERS = ("cpu", "gpu")

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


def within(value: float, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None) -> bool:
    """Whether ``value`` is finite and within the bounds: the rule that the config
    checks and the command lines' flags share."""
    return (math.isfinite(value) and (minimum is None or value >= minimum)
            and (maximum is None or value <= maximum)
            and (above is None or value > above))


def check_fields(obj: object, *names: str, integer: bool = False,
                 minimum: float | None = None, above: float | None = None) -> None:
    """Raise a ValueError naming the first field of ``obj`` that is not a finite
    number (NaN and infinity are refused), not an ``int`` where ``integer`` (``128.0``
    is refused: a float size would fail later, far from its cause), below
    ``minimum`` or not above ``above``. The one check of every config's
    ``__post_init__``."""
    for name in names:
        value = getattr(obj, name)
        kinds = (int,) if integer else (int, float)
        ok = (isinstance(value, kinds) and not isinstance(value, bool)
              and within(value, minimum, above=above))
        if not ok:
            kind = "int" if integer else "number"
            want = (f"a positive {kind}" if above == 0 else f"a finite {kind}"
                    + (f" > {above}" if above is not None else "")
                    + (f" >= {minimum}" if minimum is not None else ""))
            hint = "; write it without a decimal point" if integer and isinstance(
                value, float) else ""
            raise ValueError(f"{type(obj).__name__}.{name} must be {want}, got "
                             f"{value!r}{hint}")


def arg_number(integer: bool = False, minimum: float | None = None,
               maximum: float | None = None, above: float | None = None):
    """An argparse ``type=`` for the command lines: the text as a finite number (an
    ``int`` where ``integer``) within the bounds, else an error that says what is
    allowed, e.g. ``--steps: must be a whole number >= 1, got '0'``."""
    kind = "a whole number" if integer else "a finite number"
    bounds = [f"{op} {b}" for op, b in ((">=", minimum), ("<=", maximum), (">", above))
              if b is not None]
    want = f"{kind} {' and '.join(bounds)}".strip()

    def parse(text: str) -> float:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        if not within(value, minimum, maximum, above):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return value
    return parse


def override(cfg: T, **changes) -> T:
    """A copy of the frozen ``cfg`` with ``changes``; unknown names are errors."""
    known = {f.name for f in fields(cfg)}  # type: ignore[arg-type]
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"{type(cfg).__name__} has no field(s) {unknown}; "
                         f"fields are {sorted(known)}")
    return replace(cfg, **changes)  # type: ignore[type-var]
