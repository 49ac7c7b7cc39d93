"""Checkpoints of a run on a device mesh, in the three calls of
:mod:`llmcore.train.checkpoint` (save, read, restore), so that the loop uses either.

The weights and the optimizer's moments go through ``torch.distributed.checkpoint``
(:mod:`llmcore.parallel.dcp`): every rank writes its own shards into a directory that
appears atomically, and a run saved on 4 processes resumes on 2 with another layout.
The scheduler, the gradient scaler, the step and the caller's ``extra`` (history,
config) are the same on every rank; rank 0 stores them beside the shards.

What such a checkpoint cannot hold is each rank's batch generator: the number of
ranks may change. The resumed run reseeds it from its seed and the step, so it draws
fresh batches, not the ones an uninterrupted run would have drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmcore.parallel import dcp


def save_checkpoint(path: str | Path, model: nn.Module, *,
                    optimizer: torch.optim.Optimizer, scheduler: Any = None,
                    scaler: Any = None, step: int = 0,
                    generator: torch.Generator | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it. ``generator`` is not saved (see above)."""
    side = {"step": int(step), "extra": extra or {},
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None}
    return dcp.save(path, model, optimizer, step, extra=side)


def read_checkpoint(path: str | Path, map_location: Any = None) -> dict[str, Any]:
    """Step, extra, scheduler and scaler state; the shards stay on disk until
    :func:`restore_checkpoint`."""
    side = dcp.read_extra(path)
    if not side:
        raise FileNotFoundError(f"{path} is not a sharded llmcore checkpoint (no "
                                "extra.pt beside the shards)")
    return {**side, "path": str(path)}


def restore_checkpoint(payload: dict[str, Any], model: nn.Module, *,
                       optimizer: torch.optim.Optimizer, scheduler: Any = None,
                       scaler: Any = None, generator: torch.Generator | None = None,
                       source: Any = None) -> None:
    """Load the shards this rank's layout needs (collective) and the rest."""
    dcp.load(payload["path"], model, optimizer)
    for name, obj in (("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None and payload[name] is not None:
            obj.load_state_dict(payload[name])
    if generator is not None:  # new batches after the step, on every layout
        generator.manual_seed(generator.initial_seed() + payload["step"])
