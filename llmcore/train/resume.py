"""Resuming with a changed request: what may change and how, what is refused.

A resumed run is one run. What decides what a step computes (the model's shape, the
data, the batch, the precision, the seed, the optimizer's settings) must be what the
checkpoint was trained with; a difference is refused, listed field by field. What only
decides how long the run goes on or how it reports (the number of steps, evaluation and
checkpoint intervals, compilation, the progress bar) may change. A new ``max_steps``
keeps the learning rate continuous: the cosine goes on from the multiplier already
reached and ends at the floor at the new last step (:func:`resumed_cosine`).
"""

from __future__ import annotations

from typing import Any

from llmcore.train.optim import resumed_cosine

# TrainConfig fields a resumed run may change.
MAY_CHANGE = ("max_steps", "eval_interval", "eval_steps", "ckpt_interval", "progress",
              "compile", "log_interval")


def differences(saved: Any, requested: Any, prefix: str = "") -> list[tuple]:
    """``(field, saved, requested)`` for every leaf that differs; nested dicts are
    compared field by field (``train.lr``); tuples and lists compare as lists."""
    if isinstance(saved, dict) and isinstance(requested, dict):
        out = []
        for key in sorted(set(saved) | set(requested), key=str):
            name = f"{prefix}{key}"
            if key not in saved or key not in requested:
                out.append((name, saved.get(key, "(absent)"),
                            requested.get(key, "(absent)")))
            else:
                out += differences(saved[key], requested[key], name + ".")
        return out
    norm = (lambda v: list(v) if isinstance(v, (tuple, list)) else v)  # noqa: E731
    if norm(saved) != norm(requested):
        return [(prefix.rstrip("."), saved, requested)]
    return []


def check_resume(saved: dict, requested: dict, may_change: tuple[str, ...], *,
                 source: str, hint: str) -> list[str]:
    """Refuse a resume whose request differs from ``saved`` outside ``may_change``
    (ValueError listing each difference); return the accepted changes as text."""
    diffs = differences(saved, requested)
    refused = [d for d in diffs if d[0].split(".")[-1] not in may_change]
    if refused:
        lines = "\n".join(f"  {name}: {old!r} in the checkpoint, {new!r} requested"
                          for name, old, new in refused)
        raise ValueError(f"cannot resume from {source}: the request differs from the "
                         f"saved run in what one step computes:\n{lines}\n{hint}")
    return [f"{name}: {old!r} -> {new!r}" for name, old, new in diffs]


def schedule_restart(saved_cfg: dict, saved_restart: Any, cfg, step: int):
    """The ``restart`` of the lr schedule for a run resumed at ``step`` with config
    ``cfg`` (a TrainConfig) from one saved with ``saved_cfg`` and ``saved_restart``.

    The same ``max_steps``: the saved schedule. During the warm-up: none (the warm-up
    does not depend on the length). Otherwise the cosine restarts from the multiplier
    the saved schedule has at ``step``.
    """
    restart = None if saved_restart is None else tuple(saved_restart)
    if cfg.max_steps == saved_cfg["max_steps"]:
        return restart
    if step < cfg.warmup_steps:
        return None
    ratio = resumed_cosine(step, saved_cfg["warmup_steps"], saved_cfg["max_steps"],
                           saved_cfg["min_lr_ratio"], restart)
    return (step, ratio)
