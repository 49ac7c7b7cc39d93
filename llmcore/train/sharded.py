"""Checkpoints of a run on a device mesh, in the three calls of
:mod:`llmcore.train.checkpoint` (save, read, restore), so that the loop uses either.

The weights and the optimizer's moments go through ``torch.distributed.checkpoint``
(:mod:`llmcore.parallel.dcp`): every rank writes its own shards into a directory that
appears atomically, each file checked against its SHA-256 when it is loaded, and a run
saved on 4 processes resumes on 2 (or 1) with another layout.
The scheduler, the gradient scaler, the step and the caller's ``extra`` (history,
config) are the same on every rank; rank 0 stores them beside the shards.

What such a checkpoint cannot hold is each rank's batch generator: the number of
ranks may change. So a mesh run does not carry a random stream across steps at all:
:func:`global_batches` draws every step's global batch afresh from the run's seed and
the step, and each data-parallel rank takes its rows of it. A run stopped and resumed
on the same mesh then sees the batches of the uninterrupted run, bit for bit, and one
resumed with another tensor-parallel degree the same global batches.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from llmcore.parallel import dcp


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s batches, a hash of both: the CPU generator keeps
    only 32 bits of a seed, so packing them side by side would collide."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def global_batches(sample: Callable[[torch.Generator], tuple], seed: int,
                   dp_rank: int, dp_size: int) -> Callable[[int, torch.Generator],
                                                           tuple]:
    """A ``batch_fn(step, generator)`` for :func:`llmcore.train.train` whose batches
    are a pure function of ``(seed, step)``, whatever the mesh.

    ``sample(generator)`` draws one global micro-batch, a tuple of tensors whose
    first dimension ``dp_size`` divides. At the first call of a step the generator is
    reseeded with :func:`step_seed`; each call (one per micro-batch) then draws the
    global micro-batch, the same on every rank, and returns the rows of data-parallel
    rank ``dp_rank``. Tensor-parallel peers share ``dp_rank`` and so the batch;
    nothing of the stream needs saving.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must lie in [0, dp_size={dp_size}), got {dp_rank}")
    last = {"step": None}

    def batch_fn(step: int, generator: torch.Generator) -> tuple:
        if step != last["step"]:
            generator.manual_seed(step_seed(seed, step))
            last["step"] = step
        batch = sample(generator)
        rows, left = divmod(len(batch[0]), dp_size)
        if left:
            raise ValueError(f"the global batch has {len(batch[0])} rows, which "
                             f"dp_size={dp_size} ranks cannot share evenly")
        return tuple(t[dp_rank * rows:(dp_rank + 1) * rows] for t in batch)
    return batch_fn


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
    """Step, extra, scheduler and scaler state (format and version checked); the
    shards stay on disk until :func:`restore_checkpoint` checks and loads them."""
    return {**dcp.read_extra(path), "path": str(path)}


def restore_checkpoint(payload: dict[str, Any], model: nn.Module, *,
                       optimizer: torch.optim.Optimizer | None = None,
                       scheduler: Any = None, scaler: Any = None,
                       generator: torch.Generator | None = None,
                       restore_rng: bool = True, source: Any = None) -> None:
    """Load the shards this rank's layout needs (collective) and the rest; without
    ``optimizer``, the weights only. ``restore_rng``: reseed ``generator`` (nothing
    else of the random state is saved, see above)."""
    dcp.load(payload["path"], model, optimizer)
    for name, obj in (("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None and payload[name] is not None:
            obj.load_state_dict(payload[name])
    # A batch_fn of global_batches reseeds the generator at every step; for any
    # other, at least draw new batches after the step, on every layout.
    if generator is not None and restore_rng:
        generator.manual_seed(generator.initial_seed() + payload["step"])
