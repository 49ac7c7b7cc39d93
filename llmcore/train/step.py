"""What one training step is made of: batches on the device, the loss, the token count
that weights it, the precision context, the gradient norm and clipping.

Everything here stays on the device: no function reads a tensor back to the host, so a
step can be queued on a GPU without waiting for it (the loop reads its numbers only
every ``log_interval`` steps).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
from torch import nn

from llmcore.config import IGNORE_INDEX
from llmcore.runtime import default_precision, device_caps

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
Batch = Any
BatchFn = Callable[[int, torch.Generator], Batch]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The loss of a model whose ``forward(x, targets)`` returns ``(logits, loss)``."""
    x, y = batch
    _, loss = model(x, y)
    return loss


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Every tensor of a (nested) tuple, list or dict batch, on ``device``.

    To a GPU the copy goes from pinned host memory without blocking, so it overlaps
    with the work already queued there.
    """
    if isinstance(batch, torch.Tensor):
        if device.type == "cuda" and batch.device.type == "cpu":
            return batch.pin_memory().to(device, non_blocking=True)
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def count_tokens(batch: Batch) -> int:
    """Tokens in a batch: the size of its first tensor (the input ids)."""
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    values = batch.values() if isinstance(batch, dict) else batch
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.numel()
    return 0


def targets_of(batch: Batch) -> torch.Tensor | None:
    """The targets of a batch: the second entry of ``(x, y, ...)``, or ``labels``,
    ``targets`` or ``y`` of a dict; None when there are none."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        y = batch[1]
    elif isinstance(batch, dict):
        y = next((batch[k] for k in ("labels", "targets", "y") if k in batch), None)
    else:
        y = None
    return y if isinstance(y, torch.Tensor) else None


def valid_tokens(batch: Batch, device: torch.device) -> torch.Tensor:
    """The targets a loss counts (not ``IGNORE_INDEX``), as a device tensor; 1 for a
    batch without targets, so such micro-batches weigh the same."""
    y = targets_of(batch)
    if y is None:
        return torch.ones((), device=device)
    return (y != IGNORE_INDEX).sum().float()


def resolve_precision(precision: str, device: torch.device) -> str:
    """``precision``, with ``"auto"`` replaced by the device's own
    (:func:`llmcore.runtime.default_precision`: bf16 on sm80+ GPUs and on CPUs with
    bf16 instructions, fp16 on T4/V100, else fp32)."""
    if precision == "auto":
        return default_precision(device_caps(device))
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or 'auto', got "
                         f"{precision!r}")
    return precision


@contextlib.contextmanager
def precision_context(precision: str, device_type: str):
    """Autocast for bf16/fp16; TF32 matmuls for tf32; nothing for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision in ("bf16", "fp16") and device_type != "meta":  # meta: shapes only
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        with torch.autocast(device_type=device_type, dtype=dtype):
            yield
    elif precision == "tf32":
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")  # TF32 on Ampere and later GPUs
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)
    else:
        yield


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their global 2-norm is at most ``max_norm``
    (``math.inf``: measure only); return the norm before clipping, on the device,
    unread.

    ``nn.utils.clip_grad_norm_`` for plain tensors; for a model whose gradients live
    on several meshes (tensor parallel, FSDP2, both) each gradient's norm is first
    reduced over its own mesh, then the squares are summed (PyTorch's foreach
    kernels refuse such a mix).
    """
    from torch.distributed.tensor import DTensor  # slow to import: only when used

    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(())
    if not any(isinstance(g, DTensor) for g in grads):
        if math.isinf(max_norm):
            return nn.utils.get_total_norm(grads)
        return nn.utils.clip_grad_norm_(params, max_norm)
    norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
    norms = [n.full_tensor() if isinstance(n, DTensor) else n for n in norms]
    total = torch.stack([n.to(norms[0].device) ** 2 for n in norms]).sum().sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # 1: nothing to clip
    for g in grads:
        g.mul_(coef.to(g.device, g.dtype))
    return total


@torch.no_grad()
def evaluate(model: nn.Module, batch_fn: BatchFn, steps: int, *,
             loss_fn: LossFn = default_loss, precision: str = "fp32",
             device: torch.device | None = None, seed: int = 1234) -> float:
    """Mean loss over ``steps`` batches drawn from a generator seeded with ``seed``.

    The same seed gives the same batches, so successive evaluations differ only by the
    model; the training generator and the global RNG are left untouched, and the
    model's mode is restored, also when a batch raises. A batch with no target to
    score (every one ``IGNORE_INDEX``) is an error: its mean loss would be NaN.
    """
    device = device or next(model.parameters()).device
    precision = resolve_precision(precision, device)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    fewest = torch.full((), math.inf, device=device)  # valid targets of a batch
    try:
        for i in range(steps):
            batch = to_device(batch_fn(i, generator), device)
            fewest = torch.minimum(fewest, valid_tokens(batch, device))
            with precision_context(precision, device.type):
                total += loss_fn(model, batch).float()
    finally:
        model.train(was_training)
    if fewest.item() == 0:
        raise ValueError(f"evaluate: a batch from batch_fn has no target to score "
                         f"(every target is IGNORE_INDEX={IGNORE_INDEX}), so its mean "
                         "loss is NaN; check the batch_fn's masking")
    return total.item() / steps
