"""One training loop for every model in the book.

The loop knows nothing about the model. It asks a ``batch_fn(step, generator)`` for
batches and a ``loss_fn(model, batch)`` for a scalar loss; the default ``lm_loss``
calls ``model(x, y)`` on a batch ``(x, y)`` and takes the loss from the returned
``(logits, loss)`` pair. A masked LM, ELECTRA or a classifier plugs in its own
``loss_fn``. Around that it does what every run needs: AdamW with decay and no-decay
groups, warm-up + cosine, gradient accumulation and clipping, mixed precision through
``torch.autocast`` (with a ``GradScaler`` for fp16), optional ``torch.compile``,
periodic evaluation, checkpoints that resume exactly, and a metrics history.

Precision is applied from outside the model: the weights stay in fp32 and autocast
runs the matmuls in the chosen format (see Micikevicius et al., "Mixed Precision
Training", 2018).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from llmcore.config import check_positive
from llmcore.train.checkpoint import load_checkpoint, save_checkpoint
from llmcore.train.optim import make_optimizer, make_scheduler

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
Batch = Any
BatchFn = Callable[[int, torch.Generator], Batch]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """How to train; the model and the data are arguments of :func:`train`."""

    max_steps: int = 1000  # optimizer updates in the whole run (sets the schedule)
    lr: float = 1e-3  # peak learning rate, reached at the end of warm-up
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 100  # linear warm-up length in updates (0: none)
    weight_decay: float = 0.1  # AdamW decay of the matrices (not biases, norms)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW moment decay rates
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0: no clipping
    grad_accum: int = 1  # micro-batches summed into one update
    eval_interval: int = 0  # evaluate every this many updates; 0: only at the end
    eval_steps: int = 20  # batches per evaluation
    eval_seed: int = 1234  # evaluation always draws the same batches from this seed
    precision: str = "fp32"  # fp32 | tf32 | bf16 | fp16 (fp16 adds a GradScaler)
    compile: bool = False  # run the forward through torch.compile
    ckpt_interval: int = 0  # save every this many updates; 0: only at the end
    progress: bool = True  # show a tqdm progress bar

    def __post_init__(self):
        check_positive(self, "max_steps", "lr", "grad_accum", "eval_steps")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "eval_interval",
                     "ckpt_interval", "min_lr_ratio"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, "
                                 f"got {getattr(self, name)}")
        if self.min_lr_ratio > 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be <= 1, "
                             f"got {self.min_lr_ratio}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, "
                             f"got {self.precision!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), "
                             f"got {self.betas}")


@dataclass
class History:
    """What :func:`train` measured, one entry per update (eval: per evaluation)."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)  # mean over the micro-batches
    lr: list[float] = field(default_factory=list)  # the lr this update used
    grad_norm: list[float] = field(default_factory=list)  # before clipping
    tokens_per_s: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)  # updates done at evaluation
    eval_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0  # wall time spent in training steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "History":
        return cls(**{k: (list(v) if isinstance(v, (list, tuple)) else v)
                      for k, v in d.items()})


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The loss of a model whose ``forward(x, targets)`` returns ``(logits, loss)``."""
    x, y = batch
    _, loss = model(x, y)
    return loss


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor of a (nested) tuple, list or dict batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
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


@contextlib.contextmanager
def precision_context(precision: str, device_type: str):
    """Autocast for bf16/fp16; TF32 matmuls for tf32; nothing for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision in ("bf16", "fp16"):
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
def evaluate(model: nn.Module, batch_fn: BatchFn, steps: int, *,
             loss_fn: LossFn = lm_loss, precision: str = "fp32",
             device: torch.device | None = None, seed: int = 1234) -> float:
    """Mean loss over ``steps`` batches drawn from a generator seeded with ``seed``.

    The same seed gives the same batches, so successive evaluations differ only by the
    model; the training generator and the global RNG are left untouched.
    """
    device = device or next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(steps):
        batch = to_device(batch_fn(i, generator), device)
        with precision_context(precision, device.type):
            total += loss_fn(model, batch).float().item()
    model.train(was_training)
    return total / steps


def clip_grad_norm(parameters, max_norm: float) -> float:
    """``nn.utils.clip_grad_norm_``, also for tensor-parallel models that mix DTensor
    and plain parameters (PyTorch's foreach kernels refuse the mix); returns the
    norm."""
    params = [p for p in parameters if p.grad is not None]
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        DTensor = ()  # noqa: N806
    if not any(isinstance(p.grad, DTensor) for p in params):
        return nn.utils.clip_grad_norm_(params, max_norm).item()
    norms = [torch.linalg.vector_norm(p.grad) for p in params]
    norms = [n.full_tensor() if isinstance(n, DTensor) else n for n in norms]
    total = torch.linalg.vector_norm(torch.stack(norms)).item()
    if total > max_norm:
        for p in params:
            p.grad.mul_(max_norm / (total + 1e-6))
    return total


def train(model: nn.Module, batch_fn: BatchFn, cfg: TrainConfig, *,
          val_batch_fn: BatchFn | None = None, loss_fn: LossFn = lm_loss,
          generator: torch.Generator | None = None,
          ckpt_path: str | Path | None = None, resume: bool = False,
          stop_at: int | None = None) -> History:
    """Train ``model`` in place for ``cfg.max_steps`` updates; return the history.

    ``batch_fn(step, generator)`` returns one micro-batch (called ``grad_accum`` times
    per update); ``generator`` (default: seeded with 0) is the only randomness it should
    use, so that it can be checkpointed. With ``ckpt_path`` a checkpoint is written
    every ``cfg.ckpt_interval`` updates and at the end; ``resume=True`` continues from
    it if it exists. ``stop_at`` ends the run early after that many updates without
    changing the schedule, as an interruption would.
    """
    device = next(model.parameters()).device
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)
    scheduler = make_scheduler(optimizer, cfg.warmup_steps, cfg.max_steps,
                               cfg.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    history, start = History(), 0
    if resume and ckpt_path is not None and Path(ckpt_path).exists():
        payload = load_checkpoint(ckpt_path, model, optimizer=optimizer,
                                  scheduler=scheduler, scaler=scaler,
                                  generator=generator, map_location=device)
        start = payload["step"]
        history = History.from_dict(payload["extra"]["history"])
    end = cfg.max_steps if stop_at is None else min(stop_at, cfg.max_steps)
    forward = torch.compile(model) if cfg.compile else model

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt_path, model, optimizer=optimizer, scheduler=scheduler,
                        scaler=scaler, step=step, generator=generator,
                        extra={"history": history.to_dict(), "config": asdict(cfg)})

    model.train()
    bar = tqdm(range(start, end), initial=start, total=end, disable=not cfg.progress,
               desc="train", dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        loss_sum, tokens = torch.zeros((), device=device), 0
        for micro in range(cfg.grad_accum):
            batch = to_device(batch_fn(step, generator), device)
            tokens += count_tokens(batch)
            last = micro == cfg.grad_accum - 1
            # DistributedDataParallel syncs gradients on the last micro-step only.
            sync = (contextlib.nullcontext() if last or not hasattr(model, "no_sync")
                    else model.no_sync())
            with sync:
                with precision_context(cfg.precision, device.type):
                    loss = loss_fn(forward, batch) / cfg.grad_accum
                scaler.scale(loss).backward()
            loss_sum += loss.detach().float()
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"the loss is {loss_value} at step {step} "
                f"(lr {scheduler.get_last_lr()[0]:.3g}); stopping before the update. "
                "Lower the lr, check the data, or use bf16 instead of fp16.")
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = clip_grad_norm(model.parameters(), max_norm)
        lr = scheduler.get_last_lr()[0]
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        dt = time.perf_counter() - t0
        history.step.append(step)
        history.loss.append(loss_value)
        history.lr.append(lr)
        history.grad_norm.append(grad_norm)
        history.tokens_per_s.append(tokens / dt)
        history.seconds += dt
        done = step + 1
        if val_batch_fn is not None and (
                done == cfg.max_steps
                or (cfg.eval_interval and done % cfg.eval_interval == 0)):
            history.eval_step.append(done)
            history.eval_loss.append(evaluate(
                model, val_batch_fn, cfg.eval_steps, loss_fn=loss_fn,
                precision=cfg.precision, device=device, seed=cfg.eval_seed))
        if ckpt_path is not None and cfg.ckpt_interval and (
                done % cfg.ckpt_interval == 0):
            checkpoint(done)
        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
    bar.close()
    if ckpt_path is not None and end > start:
        checkpoint(end)
    return history
