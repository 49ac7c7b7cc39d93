"""The optimizer and the learning-rate schedule every chapter trains with.

AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019) with two
parameter groups: matrices (linear and embedding weights) are decayed; biases, norm
gains and other vectors are not, since shrinking them towards zero only fights the
normalisation they implement. The schedule is a linear warm-up followed by a cosine
decay to a floor (as in GPT-3, Brown et al. 2020, and nanoGPT).
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: every tensor with 2 or more dims decays, the rest does not.

    Tied weights (the GPT embedding shared with the output layer) appear once, because
    ``named_parameters`` de-duplicates shared tensors.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def fused_available(device: torch.device | str) -> bool:
    """Whether torch has a fused AdamW kernel for ``device`` (CUDA; CPU since 2.4)."""
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    return torch.device(device).type in ("cuda", "cpu", "mps", "xpu")


def any_dtensor(model: nn.Module) -> bool:
    """Whether some parameter is a DTensor (FSDP2, tensor parallelism)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def mixes_dtensors(model: nn.Module) -> bool:
    """Whether the parameters live on more than one mesh: some plain, some DTensors
    (tensor parallelism), or DTensors on two meshes (FSDP over tensor parallelism)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    meshes = {p.device_mesh if isinstance(p, DTensor) else None
              for p in model.parameters()}
    return len(meshes) > 1


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                   fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; ``fused=None``: the fused kernel if it exists.

    The fused kernel does the whole update of all parameters in a few launches instead
    of several per tensor: on a GPU this is a measurable share of a small model's step.
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    device = next(model.parameters()).device
    if fused is None:
        fused = fused_available(device) and not mixes_dtensors(model)
    # A tensor-parallel model mixes DTensor and plain parameters, which the fused and
    # foreach kernels refuse: update those one tensor at a time.
    kwargs = {"fused": True} if fused else (
        {"foreach": False} if mixes_dtensors(model) else {})
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas,
                             eps=eps, **kwargs)


def warmup_cosine(step: int, warmup_steps: int, max_steps: int,
                  min_ratio: float = 0.1) -> float:
    """The learning-rate multiplier at ``step``: linear warm-up, then cosine to a floor.

    Warm-up rises from 1/warmup to 1 over ``warmup_steps`` (never 0, so the first step
    moves); the cosine then falls from 1 at ``warmup_steps`` to ``min_ratio`` at
    ``max_steps`` and stays there.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= max_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * progress))


def resumed_cosine(step: int, warmup_steps: int, max_steps: int, min_ratio: float,
                   restart: tuple[int, float] | None = None) -> float:
    """:func:`warmup_cosine`, or, from ``restart = (step r, multiplier m)`` on, a cosine
    from ``m`` at step ``r`` down to ``min_ratio`` at ``max_steps``.

    A resumed run that asks for a different ``max_steps`` continues this way: its lr
    goes on from the value it had reached instead of jumping to where a schedule of the
    new length would have been at that step.
    """
    if restart is None or step < restart[0]:
        return warmup_cosine(step, warmup_steps, max_steps, min_ratio)
    start, ratio = restart
    if step >= max_steps:
        return min_ratio
    progress = (step - start) / max(1, max_steps - start)
    return min_ratio + 0.5 * (ratio - min_ratio) * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int,
                   min_ratio: float = 0.1, restart: tuple[int, float] | None = None
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` that follows :func:`warmup_cosine` (:func:`resumed_cosine` with
    a ``restart``); step it once per update.

    The multiplier is a ``functools.partial`` rather than a lambda so that the
    scheduler's ``state_dict`` holds only plain numbers (checkpoints load with
    ``weights_only=True``).
    """
    if warmup_steps < 0 or max_steps <= 0:
        raise ValueError(f"need warmup_steps >= 0 and max_steps > 0, got "
                         f"{warmup_steps} and {max_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    fn = functools.partial(resumed_cosine, warmup_steps=warmup_steps,
                           max_steps=max_steps, min_ratio=min_ratio,
                           restart=None if restart is None else tuple(restart))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
