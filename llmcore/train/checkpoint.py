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
A SHA-256 of its contents is stored beside them and checked on every load, since a
flipped bit in a weight would otherwise load silently. Weights that are not finite are
never written: a run that diverged must not replace its last good checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llmcore.io import atomic_write, remove_stale_temps
from llmcore.parallel.dcp import IMPLEMENTATION

FORMAT = "llmcore-checkpoint"
VERSION = 2
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
ZIP_END = b"PK\x05\x06"  # the end-of-central-directory record


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


def checksum(obj: Any) -> str:
    """SHA-256 of a nest of tensors, containers, numbers and strings.

    Tensors contribute their dtype, shape and bytes; everything else its ``repr``
    (exact for floats), in the order the containers hold them.
    """
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(b"{")
            for k, v in x.items():
                walk(k)
                walk(v)
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[" if isinstance(x, list) else b"(")
            for v in x:
                walk(v)
            h.update(b"]")
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())
    walk(obj)
    return h.hexdigest()


def non_finite_weights(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers that hold a NaN or an infinity."""
    return [name for name, t in model.state_dict().items()
            if torch.is_floating_point(t) and not bool(torch.isfinite(t).all())]


def is_truncated_zip(path: Path) -> bool:
    """A file that starts as a zip archive but lacks the end record every complete
    archive closes with (within its last 64 KiB + 22 bytes)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(0, size - 65_557))
        tail = f.read()
    return head == ZIP_MAGIC and ZIP_END not in tail


def _no_space(err: BaseException) -> bool:
    # torch.save reports a failed write as a RuntimeError with the OSError as context
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False


def save_checkpoint(path: str | Path, model: nn.Module, *,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, scaler: Any = None, step: int = 0,
                    generator: torch.Generator | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically; ``extra`` is any plain data (config, history).

    ``step`` is the number of optimizer updates done: the resumed run starts there.
    Refuses weights that are not finite (FloatingPointError), keeping the old file.
    """
    path = Path(path)
    bad = non_finite_weights(model)
    if bad:
        raise FloatingPointError(
            f"not saving {path}: {len(bad)} tensors hold NaN or inf ({bad[:3]}...); "
            "the previous checkpoint is kept")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    payload = {
        "format": FORMAT, "version": VERSION, "step": int(step),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(generator),
        "extra": extra or {},
    }
    payload["sha256"] = checksum(payload)
    try:
        with atomic_write(path) as f:
            torch.save(payload, f)
    except Exception as err:
        if _no_space(err):
            raise OSError(errno.ENOSPC, f"no space left on device while saving {path}; "
                          "the previous checkpoint is kept. Free space or choose "
                          "another --out.") from err
        raise
    return path


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint's contents, loaded with ``weights_only=True``, format and
    checksum checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # not a torch file, or one that needs pickle to load
        if is_truncated_zip(path):
            raise CheckpointError(
                f"{path} is truncated ({path.stat().st_size:,} bytes; the end of the "
                "archive is missing): an interrupted copy or a full disk. Use an "
                "earlier checkpoint or start again.") from err
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
    stored = payload.pop("sha256", None)
    if stored != checksum(payload):
        raise CheckpointError(
            f"{path} is corrupted: its contents do not match the SHA-256 stored in it "
            "(a flipped bit on disk or in transfer). Use another copy.")
    return payload


def restore_checkpoint(payload: dict[str, Any], model: nn.Module, *,
                       optimizer: torch.optim.Optimizer | None = None,
                       scheduler: Any = None, scaler: Any = None,
                       generator: torch.Generator | None = None,
                       restore_rng: bool = True, source: Any = "the checkpoint"):
    """Load a payload from :func:`read_checkpoint` into the given objects."""
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise CheckpointError(
            f"{source} holds weights of a different model: {err}") from err
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler),
                      ("scaler", scaler)):
        if obj is None:
            continue
        if payload[name] is None:
            raise CheckpointError(f"{source} has no {name} state; pass {name}=None")
        # the saved groups carry the saving optimizer's kernel choice (fused,
        # foreach): the optimizer that loads keeps its own
        how = [{k: g[k] for k in IMPLEMENTATION if k in g}
               for g in getattr(obj, "param_groups", [])]
        obj.load_state_dict(payload[name])
        for group, kept in zip(getattr(obj, "param_groups", []), how):
            group.update(kept)
    if restore_rng:
        set_rng_state(payload["rng"], generator)


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
    restore_checkpoint(payload, model, optimizer=optimizer, scheduler=scheduler,
                       scaler=scaler, generator=generator, restore_rng=restore_rng,
                       source=path)
    return payload
