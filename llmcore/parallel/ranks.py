"""Which backend a process group uses and where each of its ranks keeps its tensors.

:func:`default_backend` picks NCCL (one GPU per rank) or gloo (every rank a CPU
process), :func:`rank_device` a rank's device, :func:`torchrun_env` reads the rank
torchrun (or accelerate) gave this process. This module and ``llmcore.runtime`` are
the only ones that read environment variables.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def gpu_count() -> int:
    """CUDA devices this process sees (0 on a machine or a torch build without)."""
    return torch.cuda.device_count()


def default_backend(world_size: int, tier: str | None = None) -> str:
    """``"nccl"``, one rank per GPU, when ``world_size`` GPUs are visible and
    ``tier`` is ``"gpu"`` (None: whenever the GPUs suffice); else ``"gloo"``, every
    rank a CPU process. Ranks must agree on one backend and two ranks must never
    share a GPU, so with fewer GPUs than ranks all of them run on the CPU; on the
    cpu tier they stay there beside GPUs, so the tier means the same everywhere."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if tier not in (None, "cpu", "gpu"):
        raise ValueError(f"tier must be 'cpu', 'gpu' or None, got {tier!r}")
    if tier != "cpu" and gpu_count() >= world_size:
        return "nccl"
    return "gloo"


def rank_device(local_rank: int | None = None,
                backend: str | None = None) -> torch.device:
    """Where a rank keeps its tensors: ``cuda:local_rank`` under NCCL, the CPU under
    gloo. Without arguments, this process's in its initialized group (LOCAL_RANK
    under torchrun, else its rank: ``launch`` starts every rank on one machine)."""
    if backend is None:
        backend = dist.get_backend()
    if local_rank is None:
        env = torchrun_env()
        local_rank = env[2] if env is not None else dist.get_rank()
    if backend != "nccl":
        return torch.device("cpu")
    gpus = gpu_count()
    if not 0 <= local_rank < gpus:
        raise ValueError(f"local_rank={local_rank} has no GPU of its own under "
                         f"backend='nccl': {gpus} GPU(s) visible; start at most one "
                         "rank per GPU, or use backend='gloo' (CPU processes)")
    return torch.device("cuda", local_rank)


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) set by torchrun / accelerate, or None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
