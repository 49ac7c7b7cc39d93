"""One training loop for every model in the book.

The loop knows nothing about the model: it asks a ``batch_fn(step, generator)`` for
batches and a ``loss_fn(model, batch)`` for a scalar loss (``default_loss`` takes
it from ``model(x, y)``, which returns ``(logits, loss)``). Around that it does what
every run needs: AdamW with decay and no-decay groups, warm-up + cosine, gradient
accumulation weighted by tokens, clipping, mixed precision through ``torch.autocast``
(with a ``GradScaler`` for fp16), optional ``torch.compile``, periodic evaluation,
checkpoints that resume exactly, and a history.

A step never waits for the device: the loss, the gradient norm and a flag saying both
are finite stay there, and the update of a step whose flag is down is skipped on the
device (the fused AdamW's ``found_inf``, as a ``GradScaler`` uses it). They are read
every ``log_interval`` steps, before every evaluation and checkpoint, and at the end;
a non-finite step found there stops the run, and nothing is saved after it.

Precision is applied from outside the model: fp32 weights, matmuls in the chosen format
by autocast (Micikevicius et al., "Mixed Precision Training", 2018).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import llmcore.train.checkpoint as whole_file
import llmcore.train.sharded as sharded
from llmcore.runtime import keep_freed_memory
from llmcore.train.optim import any_dtensor, make_optimizer, make_scheduler
from llmcore.train.resume import MAY_CHANGE, check_resume, schedule_restart
from llmcore.train.step import (PRECISIONS, BatchFn, LossFn, clip_grad_norm,
                                count_tokens, default_loss, evaluate, precision_context,
                                to_device, valid_tokens)

__all__ = ["PRECISIONS", "TrainConfig", "History", "train", "default_loss", "evaluate",
           "precision_context"]
INTS = ("max_steps", "grad_accum", "eval_steps", "warmup_steps", "eval_interval",
        "ckpt_interval", "log_interval", "eval_seed")


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
    log_interval: int = 10  # read loss and grad norm from the device this often
    progress: bool = True  # show a tqdm progress bar

    def __post_init__(self):
        for name in INTS:  # 2.5 steps or NaN steps are mistakes, not sizes
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"TrainConfig.{name} must be an int, got {value!r}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", *self.betas):
            value = getattr(self, name) if isinstance(name, str) else name
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"TrainConfig.{name} must be a finite number, "
                                 f"got {value!r}")
        if min(self.max_steps, self.lr, self.grad_accum, self.eval_steps,
               self.log_interval) <= 0:
            raise ValueError("TrainConfig.max_steps, lr, grad_accum, eval_steps and "
                             f"log_interval must be positive, got {self}")
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
    loss: list[float] = field(default_factory=list)  # token-weighted micro-batch mean
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


class Pending:
    """Steps whose numbers are still on the device; :meth:`read` fetches them all in
    one transfer, appends them to the history and raises at a non-finite step."""

    def __init__(self, history: History, device: torch.device, fp16: bool):
        self.history, self.device, self.fp16, self.rows = history, device, fp16, []

    def add(self, step, loss, grad_norm, lr, tokens, seconds):
        # fp16: a non-finite gradient is the GradScaler's business (skip, lower scale)
        bad = ~torch.isfinite(loss) if self.fp16 else ~(
            torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.rows.append((step, torch.stack([loss, grad_norm.float(), bad.float()]),
                          lr, tokens, seconds))

    def check_last(self) -> None:
        """Read the last step's flag now (one sync) and raise if it is down."""
        if self.rows and self.rows[-1][1][2].item():
            self.read()

    def read(self) -> None:
        if not self.rows:
            return
        t0 = time.perf_counter()
        values = torch.stack([r[1] for r in self.rows]).tolist()  # the one sync
        wait = time.perf_counter() - t0
        rows, self.rows = self.rows, []
        if self.device.type == "cuda":  # steps were queued, not run: share the time
            mean = (sum(r[4] for r in rows) + wait) / len(rows)
            seconds = [mean] * len(rows)
        else:
            seconds = [r[4] for r in rows]
            seconds[-1] += wait
        h = self.history
        for (step, _, lr, tokens, _), (loss, norm, bad), dt in zip(rows, values,
                                                                   seconds):
            if bad:
                raise FloatingPointError(
                    f"the loss is {loss} and the gradient norm {norm} at step {step} "
                    f"(lr {lr:.3g}); its update was skipped and the run stops, with no "
                    "checkpoint after it. Lower the lr, check the data, or use bf16 "
                    "instead of fp16.")
            h.step.append(step)
            h.loss.append(loss)
            h.lr.append(lr)
            h.grad_norm.append(norm)
            h.tokens_per_s.append(tokens / dt)
            h.seconds += dt


def train(model: nn.Module, batch_fn: BatchFn, cfg: TrainConfig, *,
          val_batch_fn: BatchFn | None = None, loss_fn: LossFn = default_loss,
          generator: torch.Generator | None = None,
          ckpt_path: str | Path | None = None, resume: bool = False,
          stop_at: int | None = None, dp_group: Any = None,
          meta: dict | None = None) -> History:
    """Train ``model`` in place for ``cfg.max_steps`` updates; return the history.

    ``batch_fn(step, generator)`` returns one micro-batch (called ``grad_accum`` times
    per update); ``generator`` (default: seeded with 0) is the only randomness it should
    use, so that it can be checkpointed. With ``ckpt_path`` a checkpoint is written
    every ``cfg.ckpt_interval`` updates and at the end; ``resume=True`` continues from
    it if it exists (see :mod:`llmcore.train.resume` for what may differ); a model of
    DTensors saves it in shards. ``stop_at`` ends the run early after that many updates
    (schedule unchanged). ``dp_group``: the data-parallel group over which the token
    count weighting the gradients is summed. ``meta``: plain data stored in the
    checkpoint (``extra["meta"]``). CPU runs keep freed memory (``keep_freed_memory``).
    """
    device = next(model.parameters()).device
    keep_freed_memory(device)
    ckpt = sharded if any_dtensor(model) else whole_file
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)
    saved, restart, start = None, None, 0
    if resume and ckpt_path is not None and Path(ckpt_path).exists():
        saved = ckpt.read_checkpoint(ckpt_path, map_location=device)
        old = saved["extra"]["config"]
        check_resume(old, asdict(cfg), MAY_CHANGE, source=str(ckpt_path),
                     hint="Train with the saved values, or start a fresh run.")
        restart = schedule_restart(old, saved["extra"].get("restart"), cfg,
                                   saved["step"])
    scheduler = make_scheduler(optimizer, cfg.warmup_steps, cfg.max_steps,
                               cfg.min_lr_ratio, restart)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    history = History()
    if saved is not None:
        ckpt.restore_checkpoint(saved, model, optimizer=optimizer, scheduler=scheduler,
                                scaler=scaler, generator=generator, source=ckpt_path)
        start = saved["step"]
        history = History.from_dict(saved["extra"]["history"])
    end = cfg.max_steps if stop_at is None else min(stop_at, cfg.max_steps)
    forward = torch.compile(model) if cfg.compile else model
    # The fused AdamW skips an update on the device when found_inf is 1; fp16 leaves
    # that to the GradScaler, other optimizers need the flag read before each step.
    device_skip = (bool(optimizer.defaults.get("fused")) and cfg.precision != "fp16"
                   and not any_dtensor(model))
    world = dist.get_world_size(dp_group) if dp_group is not None else 1
    pending = Pending(history, device, cfg.precision == "fp16")

    def checkpoint(step: int) -> None:
        pending.read()  # raises before a non-finite step can be saved
        ckpt.save_checkpoint(ckpt_path, model, optimizer=optimizer, scheduler=scheduler,
                        scaler=scaler, step=step, generator=generator,
                        extra={"history": history.to_dict(), "config": asdict(cfg),
                               "restart": restart, "meta": meta or {}})

    def fetch(step: int) -> list:
        return [to_device(batch_fn(step, generator), device)
                for _ in range(cfg.grad_accum)]

    model.train()
    bar = tqdm(range(start, end), initial=start, total=end, disable=not cfg.progress,
               desc="train", dynamic_ncols=True)
    batches = fetch(start) if start < end else []
    for step in bar:
        t0 = time.perf_counter()
        done = step + 1
        saving = ckpt_path is not None and cfg.ckpt_interval and (
            done % cfg.ckpt_interval == 0)
        # Weight each micro-batch by its share of the step's valid targets, so that
        # masked batches of unequal counts add up to the mean over all their tokens.
        counts = [valid_tokens(b, device) for b in batches]
        local = torch.stack(counts).sum()
        total = local.clone()
        if dp_group is not None:  # DDP/FSDP average over ranks: weigh by the global
            dist.all_reduce(total, group=dp_group)
        loss_sum = torch.zeros((), device=device)
        tokens = sum(count_tokens(b) for b in batches)
        for micro, (batch, count) in enumerate(zip(batches, counts)):
            last = micro == len(batches) - 1
            # DistributedDataParallel syncs gradients on the last micro-step only.
            sync = (contextlib.nullcontext() if last or not hasattr(model, "no_sync")
                    else model.no_sync())
            with sync:
                with precision_context(cfg.precision, device.type):
                    loss = loss_fn(forward, batch).float()
                weight = count * world / total
                # A non-finite loss makes every gradient NaN, so the skip also holds
                # where the gradient alone would have looked finite.
                poison = torch.where(torch.isfinite(loss.detach()), 1.0, math.nan)
                scaler.scale(loss * weight * poison).backward()
            loss_sum += loss.detach() * (count / local)  # this rank's token mean
        # Fetch the next step's batches while the device works on this one; not past
        # a checkpoint, so that the saved RNG states are those of the next step.
        batches = fetch(done) if done < end and not saving else None
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = clip_grad_norm(model.parameters(), max_norm)
        lr = scheduler.get_last_lr()[0]
        pending.add(step, loss_sum, grad_norm, lr, tokens, 0.0)
        if device_skip:
            optimizer.found_inf = pending.rows[-1][1][2]
        elif cfg.precision != "fp16":
            pending.check_last()  # this optimizer cannot skip on the device
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        pending.rows[-1] = pending.rows[-1][:4] + (time.perf_counter() - t0,)
        evaluating = val_batch_fn is not None and (
            done == cfg.max_steps or (cfg.eval_interval
                                      and done % cfg.eval_interval == 0))
        if done % cfg.log_interval == 0 or evaluating or saving or done == end:
            pending.read()
            bar.set_postfix(loss=f"{history.loss[-1]:.3f}", refresh=False)
        if evaluating:
            history.eval_step.append(done)
            history.eval_loss.append(evaluate(
                model, val_batch_fn, cfg.eval_steps, loss_fn=loss_fn,
                precision=cfg.precision, device=device, seed=cfg.eval_seed))
        if saving:
            checkpoint(done)
        if batches is None and done < end:
            batches = fetch(done)
    bar.close()
    pending.read()
    if ckpt_path is not None and end > start:
        checkpoint(end)
    return history
