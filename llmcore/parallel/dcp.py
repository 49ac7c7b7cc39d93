"""Parallel checkpoints: every rank writes its own shards, any layout reads them.

``torch.distributed.checkpoint`` saves each rank's pieces of the (DTensor) parameters
and optimizer state with their place in the global tensor, so a run saved on a
(dp=2, tp=2) mesh of 4 processes resumes on 2 processes with another layout: each
rank reads the parts of the global tensors its new shards cover. Nothing is
gathered on rank 0.

Saving is atomic at the level of the directory. The ranks write into ``NAME.tmp-STEP``
beside the target; once all have, rank 0 writes ``extra.pt`` last: the caller's
plain data and a manifest (format, version, step, the SHA-256 of every file). Then it
renames ``NAME`` to ``NAME.old``, the temporary directory to ``NAME``, and removes
``NAME.old``. A crash can stop that sequence anywhere; :func:`recover`, run before
the next start, keeps the newest directory whose files all match their manifest and
removes the rest, so no point of the sequence loses the last complete checkpoint or
leaves a half-written one in place. :func:`load` checks every shard against the
manifest first: a flipped byte is an error naming the file.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

# torch.distributed.checkpoint is imported where it is used: it pulls in DTensor and
# sympy, seconds of start-up for every process that imports the training loop, and
# only runs on a mesh need it.

FORMAT = "llmcore-sharded-checkpoint"
VERSION = 1
EXTRA = "extra.pt"  # the manifest and the caller's data, written last
# Optimizer settings that say how the update is computed, not what it is: they stay
# those of the optimizer that loads (a fused kernel refuses a tensor-parallel model).
IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


class ShardError(ValueError):
    """A sharded checkpoint that is incomplete, corrupted or of another version."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
         step: int, extra: dict | None = None) -> Path:
    """Write model and optimizer state of every rank to the directory ``path``;
    ``extra`` (plain data, rank 0's) goes beside them in ``extra.pt`` with the
    manifest (read it with :func:`read_extra`).

    Collective: every rank calls it with the same ``path`` and ``step``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{step}")
    if _rank() == 0 and tmp.exists():  # a save of this step that crashed
        shutil.rmtree(tmp)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, "step": torch.tensor(step)},
             checkpoint_id=str(tmp))
    dist.barrier()  # every rank's shards are on disk
    if dist.get_rank() == 0:
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"format": FORMAT, "version": VERSION, "step": int(step),
                    "files": files, "extra": extra or {}}
        torch.save(manifest, tmp / EXTRA)  # last: the directory is complete
        old = path.with_name(path.name + ".old")
        if path.exists():
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def read_manifest(path: str | Path) -> dict:
    """The manifest of the directory ``path``: format and version checked."""
    file = Path(path) / EXTRA
    if not file.is_file():
        raise ShardError(f"{path} is not a complete sharded checkpoint: {EXTRA}, "
                         "written last by a save, is missing (the save was "
                         "interrupted)")
    try:
        manifest = torch.load(file, weights_only=True)
    except Exception as err:
        raise ShardError(f"{file} cannot be read ({type(err).__name__}: {err}); the "
                         "checkpoint is damaged") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{file} is not the manifest of an llmcore sharded "
                         f"checkpoint (no 'format': {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise ShardError(f"{path} has sharded-checkpoint version "
                         f"{manifest.get('version')}; this llmcore reads version "
                         f"{VERSION}")
    return manifest


def verify(path: str | Path, part: int = 0, parts: int = 1) -> dict:
    """Check the files of ``path`` (those numbered ``part`` modulo ``parts``) against
    the manifest, raising ShardError naming the first that is missing or differs;
    return the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    for i, (name, digest) in enumerate(sorted(manifest["files"].items())):
        if i % parts != part:
            continue
        file = path / name
        if not file.is_file():
            raise ShardError(f"{file} is missing: the checkpoint {path} is incomplete")
        if file_sha256(file) != digest:
            raise ShardError(f"{file} is corrupted: its SHA-256 differs from the one "
                             "saved with it (a flipped bit on disk or in transfer); "
                             "use another copy of the checkpoint")
    return manifest


def _verify_collectively(path: Path) -> None:
    """Each rank checks its share of the files; all raise the first error found."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        verify(path)
        return
    error = ""
    try:
        verify(path, dist.get_rank(), dist.get_world_size())
    except ShardError as err:
        error = str(err)
    errors = [""] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    found = [e for e in errors if e]
    if found:
        raise ShardError(found[0])


def load(path: str | Path, model: nn.Module,
         optimizer: torch.optim.Optimizer | None = None) -> int:
    """Load ``path`` into ``model`` and ``optimizer`` (already parallelized, any
    layout, same parameter names; None: the weights only), after checking every
    shard; return the step it was saved at. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    path = Path(path)
    if not (path / ".metadata").exists():
        raise FileNotFoundError(f"{path} is not a distributed checkpoint (no "
                                ".metadata); pass the directory save() wrote")
    _verify_collectively(path)
    if optimizer is None:
        state = {"model": get_model_state_dict(model), "step": torch.tensor(0)}
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(model, state["model"])
        return int(state["step"])
    how = [{k: g[k] for k in IMPLEMENTATION if k in g} for g in optimizer.param_groups]
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "step": torch.tensor(0)}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    for group, kept in zip(optimizer.param_groups, how):
        group.update(kept)
    return int(state["step"])


def read_extra(path: str | Path) -> dict:
    """The ``extra`` that :func:`save` stored in ``path`` (format and version
    checked; the shards are checked when they are loaded)."""
    return read_manifest(path)["extra"]


def recover(path: str | Path) -> list[str]:
    """Make ``path`` the newest complete checkpoint among ``path``, ``path.old`` and
    ``path.tmp-*`` (files matching their manifest) and remove the others; return what
    was done, in words. Run it on one process, before a run starts, while no save is
    under way. A ``path`` that exists is kept unless a newer complete save exists,
    and a damaged former checkpoint with nothing to replace it stays too: damage is
    reported (when loaded, or here), never removed."""
    path = Path(path)
    aside = path.with_name(path.name + ".replaced")
    others = [path.with_name(path.name + ".old"), aside,
              *sorted(path.parent.glob(f"{path.name}.tmp-*"))]
    others = [p for p in others if p.is_dir()]
    if not others:
        return []
    try:
        current = read_manifest(path)["step"] if path.exists() else None
    except ShardError:
        return []  # damaged: left as it is, for load to name the file
    complete = {}
    for candidate in others:
        try:
            complete[candidate] = verify(candidate)["step"]
        except ShardError:
            pass
    newer = [p for p, s in complete.items() if current is None or s > current]
    done = []
    if newer:
        best = max(newer, key=lambda p: complete[p])
        if path.exists():  # moved aside first: a crash here leaves best to find
            spot = aside if best != aside else path.with_name(path.name + ".old")
            shutil.rmtree(spot, ignore_errors=True)
            path.rename(spot)
            others.append(spot)
        best.rename(path)
        others = [p for p in dict.fromkeys(others) if p != best]
        done.append(f"{path}: a save was interrupted while being put in place; "
                    f"continuing from {best.name}, the newest complete checkpoint "
                    f"(step {complete[best]})")
    for p in others:
        if p not in complete and ".tmp-" not in p.name and not path.is_dir():
            # a damaged former checkpoint and nothing better: kept, for a person
            done.append(f"{p} is damaged (its files do not match its manifest); "
                        "left in place")
            continue
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"removed {p.name}, left by an interrupted save")
    return done
