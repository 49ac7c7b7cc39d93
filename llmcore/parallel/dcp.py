"""Parallel checkpoints: every rank writes its own shards, any layout reads them.

``torch.distributed.checkpoint`` saves each rank's pieces of the (DTensor) parameters
and optimizer state with their place in the global tensor, so a run saved on a
(dp=2, tp=2) mesh of 4 processes resumes on 2 processes with another layout: each
rank reads the parts of the global tensors its new shards cover. Nothing is
gathered on rank 0.

Saving is atomic at the level of the directory: the ranks write into a temporary
directory beside the target, then rank 0 renames it into place (the old checkpoint
moves aside first and is removed after). A crash leaves either the old checkpoint or
the new one, never half of one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

# torch.distributed.checkpoint is imported where it is used: it pulls in DTensor and
# sympy, seconds of start-up for every process that imports the training loop, and
# only runs on a mesh need it.


def save(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
         step: int, extra: dict | None = None) -> Path:
    """Write model and optimizer state of every rank to the directory ``path``;
    ``extra`` (plain data, rank 0's) goes beside them as ``extra.pt``, in the same
    atomic rename (read it with :func:`read_extra`).

    Collective: every rank calls it with the same ``path`` and ``step``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{step}")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, "step": torch.tensor(step)},
             checkpoint_id=str(tmp))
    dist.barrier()  # every rank's shards are on disk
    if dist.get_rank() == 0:
        if extra is not None:
            torch.save(extra, tmp / "extra.pt")
        old = path.with_name(path.name + ".old")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def load(path: str | Path, model: nn.Module,
         optimizer: torch.optim.Optimizer) -> int:
    """Load ``path`` into ``model`` and ``optimizer`` (already parallelized, any
    layout, same parameter names); return the step it was saved at. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    if not (path / ".metadata").exists():
        raise FileNotFoundError(f"{path} is not a distributed checkpoint (no "
                                ".metadata); pass the directory save() wrote")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "step": torch.tensor(0)}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    return int(state["step"])


def read_extra(path: str | Path) -> dict:
    """The ``extra`` that :func:`save` stored in ``path`` (empty if none)."""
    file = Path(path) / "extra.pt"
    return torch.load(file, weights_only=True) if file.is_file() else {}
