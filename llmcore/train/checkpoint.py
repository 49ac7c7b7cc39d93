"""Checkpoints that resume a run exactly, written atomically, loaded without pickle.

A checkpoint holds everything the next step depends on: the model, the optimizer's
moments, the scheduler's position, the gradient scaler's scale, the step, and the state
of every random number generator (Python, NumPy, torch on CPU and on each GPU, and the
generator that draws the training batches). Restore all of them and the resumed run
computes the same losses, bit for bit, as the run that was never interrupted.

The file is written to a temporary name in the same folder and then renamed with
``os.replace``, which is atomic: a crash mid-write leaves the previous checkpoint
intact, never half a file. It holds only tensors, plain containers, numbers and
strings, so it loads with ``torch.load(weights_only=True)``, which cannot run code.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llmcore.io import atomic_write

FORMAT = "llmcore-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """The file is not an llmcore checkpoint, or not one this model can load."""


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """The state of every random number generator, as plain data."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None):
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["key"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None:
        if "generator" not in state:
            raise CheckpointError("the checkpoint has no data-generator state, but a "
                                  "generator was passed; pass generator=None")
        generator.set_state(state["generator"])


def save_checkpoint(path: str | Path, model: nn.Module, *,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, scaler: Any = None, step: int = 0,
                    generator: torch.Generator | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically; ``extra`` is any plain data (config, history).

    ``step`` is the number of optimizer updates done: the resumed run starts there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT, "version": VERSION, "step": int(step),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(generator),
        "extra": extra or {},
    }
    with atomic_write(path) as f:
        torch.save(payload, f)
    return path


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint's contents, loaded with ``weights_only=True``, format checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # not a torch file, or one that needs pickle to load
        raise CheckpointError(
            f"{path} is not an llmcore checkpoint (torch.load with weights_only=True "
            f"failed: {type(err).__name__}). Pass a file written by "
            "save_checkpoint.") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a torch file but not an llmcore checkpoint "
                              f"(no 'format': {FORMAT!r} entry)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')}"
                              f"; this llmcore reads version {VERSION}")
    return payload


def load_checkpoint(path: str | Path, model: nn.Module, *,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, scaler: Any = None,
                    generator: torch.Generator | None = None,
                    restore_rng: bool = True, map_location: Any = "cpu") -> dict:
    """Restore what :func:`save_checkpoint` wrote into the given objects.

    Returns the whole payload; ``payload["step"]`` is where to continue and
    ``payload["extra"]`` what the caller stored. Objects passed as None are skipped.
    """
    payload = read_checkpoint(path, map_location)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise CheckpointError(
            f"{path} holds weights of a different model: {err}") from err
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler),
                      ("scaler", scaler)):
        if obj is None:
            continue
        if payload[name] is None:
            raise CheckpointError(f"{path} has no {name} state; pass {name}=None")
        obj.load_state_dict(payload[name])
    if restore_rng:
        set_rng_state(payload["rng"], generator)
    return payload
