"""One training loop for every model in the book.

The loop knows nothing about the model: it asks a ``batch_fn(step, generator)`` for
batches and a ``loss_fn(model, batch)`` for a scalar loss (``default_loss`` takes
it from ``model(x, y)``, which returns ``(logits, loss)``). Around that it does what
every run needs: AdamW with decay and no-decay groups (or the optimizer it is given),
warm-up + cosine, gradient accumulation weighted by tokens, clipping, mixed precision
through ``torch.autocast`` (with a ``GradScaler`` for fp16), optional
``torch.compile``, periodic evaluation, checkpoints that resume exactly, and a history.

The model may be a wrapper: PyTorch's DDP or FSDP, or the book's hand-written data
parallel and ZeRO modules. The loop uses what such a wrapper offers through PyTorch's
own conventions: ``no_sync()`` for the micro-batches before the last, and
``clip_grad_norm_(max_norm)`` where the gradients are sharded.

A step never waits for the device: the loss and the gradient norm stay there and are
read every ``log_interval`` steps, before every evaluation and checkpoint, and at the
end. A non-finite loss or gradient found there stops the run with
``FloatingPointError``; no checkpoint is ever written after such a step, and the
model is put back to the last checkpoint, which is finite.

With a checkpoint path, SIGINT (Ctrl-C) and SIGTERM (a job scheduler, a Colab
session ending) finish the current step, save, and raise :class:`Interrupted`; a
second signal stops at once.

Precision is applied from outside the model: fp32 weights, matmuls in the chosen format
by autocast (Micikevicius et al., "Mixed Precision Training", 2018).

On the ``meta`` device the loop is a dry run: every step's shapes and device placement
are checked, nothing is computed or read (``tests/test_gpu_dryrun.py`` runs the
gpu-tier presets this way on a machine without a GPU).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import llmcore.train.checkpoint as whole_file
import llmcore.train.sharded as sharded
from llmcore.config import IGNORE_INDEX, check_fields
from llmcore.train.optim import any_dtensor, make_optimizer, make_scheduler
from llmcore.train.resume import MAY_CHANGE, check_resume, schedule_restart
from llmcore.train.step import (PRECISIONS, BatchFn, LossFn, clip_grad_norm,
                                count_tokens, default_loss, evaluate, precision_context,
                                resolve_precision, to_device, valid_tokens)

__all__ = ["PRECISIONS", "TrainConfig", "History", "Interrupted", "train",
           "default_loss", "evaluate", "precision_context"]


@dataclass(frozen=True)
class TrainConfig:
    """How to train; the model and the data are arguments of :func:`train`."""

    max_steps: int = 1000  # optimizer updates in the whole run (sets the schedule)
    lr: float = 1e-3  # peak learning rate, reached at the end of warm-up
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio (1: constant)
    warmup_steps: int = 100  # linear warm-up length in updates (0: none)
    weight_decay: float = 0.1  # AdamW decay of the matrices (not biases, norms)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW moment decay rates
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0: no clipping
    grad_accum: int = 1  # micro-batches summed into one update
    eval_interval: int = 0  # evaluate every this many updates; 0: only at the end
    eval_steps: int = 20  # batches per evaluation
    eval_seed: int = 1234  # evaluation always draws the same batches from this seed
    precision: str = "fp32"  # fp32 | tf32 | bf16 | fp16 (+ GradScaler) | auto: the
    #                          device's (rt.precision)
    compile: bool = False  # run the forward through torch.compile
    ckpt_interval: int = 0  # save every this many updates; 0: only at the end
    log_interval: int = 10  # read loss and grad norm from the device this often
    progress: bool = True  # show a tqdm progress bar

    def __post_init__(self):
        check_fields(self, "max_steps", "grad_accum", "eval_steps", "log_interval",
                     integer=True, above=0)
        check_fields(self, "warmup_steps", "eval_interval", "ckpt_interval",
                     "eval_seed", integer=True, minimum=0)
        check_fields(self, "lr", above=0)
        check_fields(self, "min_lr_ratio", "weight_decay", "grad_clip", minimum=0)
        if self.min_lr_ratio > 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be <= 1, got "
                             f"{self.min_lr_ratio!r}")
        if self.precision not in (*PRECISIONS, "auto"):
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS} or "
                             f"'auto', got {self.precision!r}")
        if (len(self.betas) != 2 or not all(isinstance(b, (int, float))
                                            and 0 <= b < 1 for b in self.betas)):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), "
                             f"got {self.betas!r}")


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

    def add(self, step, loss, grad_norm, targets, lr, tokens, seconds):
        self.rows.append([step, torch.stack([loss, grad_norm.float(), targets]), lr,
                          tokens, seconds])

    def read(self) -> None:
        if self.device.type == "meta":  # a dry run: shapes and placement, no values
            self.rows = []
        if not self.rows:
            return
        t0 = time.perf_counter()
        values = torch.stack([r[1] for r in self.rows]).tolist()  # the one sync
        wait = time.perf_counter() - t0
        rows, self.rows = self.rows, []
        if self.device.type == "cuda":  # steps were queued, not run: share the time
            seconds = [(sum(r[4] for r in rows) + wait) / len(rows)] * len(rows)
        else:
            seconds = [r[4] for r in rows]
            seconds[-1] += wait
        h = self.history
        for (step, _, lr, tokens, _), (loss, norm, targets), dt in zip(rows, values,
                                                                      seconds):
            if targets == 0:  # the loss is 0 / 0: not a numerical problem
                raise ValueError(f"step {step} has no target to learn from: every "
                                 f"target of its micro-batches is IGNORE_INDEX "
                                 f"({IGNORE_INDEX}); check the batch_fn's masking")
            # fp16: a non-finite gradient is the GradScaler's business (it skips the
            # update and lowers the scale); a non-finite loss is not.
            if not math.isfinite(loss) or not (self.fp16 or math.isfinite(norm)):
                raise FloatingPointError(
                    f"the loss is {loss} and the gradient norm {norm} at step {step} "
                    f"(lr {lr:.3g}): the run stops. Lower the lr, check the data, or "
                    "use bf16 instead of fp16.")
            h.step.append(step)
            h.loss.append(loss)
            h.lr.append(lr)
            h.grad_norm.append(norm)
            h.tokens_per_s.append(tokens / dt)
            h.seconds += dt


class Interrupted(Exception):
    """The run was stopped by a signal after saving its checkpoint."""

    def __init__(self, signum: int, step: int, path: Any):
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; "
                         f"checkpoint saved to {path} (continue with resume)")


@contextlib.contextmanager
def stop_signals(enabled: bool):
    """Within: SIGINT and SIGTERM set ``flag["signum"]`` instead of stopping the
    process; one more a second or more later stops it at once (KeyboardInterrupt
    with the signal number). Copies within that second are the same request: torchrun
    forwards the signal a terminal or a scheduler already sent to every process.
    The old handlers are restored after."""
    flag: dict[str, Any] = {"signum": None, "at": 0.0}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["signum"] is None:
            flag["signum"], flag["at"] = signum, time.monotonic()
        elif time.monotonic() - flag["at"] >= 1.0:  # asked again: stop now
            raise KeyboardInterrupt(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def stop_requested(flag: dict, collective: bool,
                   device: torch.device | None = None) -> int | None:
    """The signal this process (or, collectively, any rank) received, or None;
    ``device``: where the group's backend reduces (NCCL: the rank's GPU)."""
    if not collective:
        return flag["signum"]
    got = torch.tensor([flag["signum"] or 0], device=device)
    dist.all_reduce(got, op=dist.ReduceOp.MAX)  # every rank stops at the same step
    return int(got) or None


def train(model: nn.Module, batch_fn: BatchFn, cfg: TrainConfig, *,
          val_batch_fn: BatchFn | None = None, loss_fn: LossFn = default_loss,
          generator: torch.Generator | None = None,
          optimizer: torch.optim.Optimizer | None = None,
          ckpt_path: str | Path | None = None, resume: bool = False,
          start_from: dict | None = None, stop_at: int | None = None,
          dp_group: Any = None, meta: dict | None = None,
          on_step: Callable[[int, History], None] | None = None) -> History:
    """Train ``model`` in place for ``cfg.max_steps`` updates; return the history.

    ``batch_fn(step, generator)`` returns one micro-batch (called ``grad_accum`` times
    per update); ``generator`` (default: seeded with 0) is the only randomness it should
    use, so that it can be checkpointed. ``optimizer``: used instead of AdamW; the
    schedule multiplies its own learning rate. With ``ckpt_path`` a checkpoint is
    written every ``cfg.ckpt_interval`` updates and at the end (before the final
    evaluation, then again with it); ``resume=True`` continues from it if it exists,
    ``start_from`` from a payload the caller has read already (see
    :mod:`llmcore.train.resume` for what may differ); a model of DTensors saves in
    shards. ``stop_at`` ends the run after that many updates (schedule unchanged).
    ``dp_group``: the data-parallel group over which the token count weighting the
    gradients is summed. ``meta``: plain data stored in the checkpoint.
    ``on_step(updates_done, history)`` is called after every update, before the
    numbers of that update are read (``history`` holds the steps read so far).
    """
    device = next(model.parameters()).device
    ckpt = sharded if any_dtensor(model) else whole_file
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    if optimizer is None:
        optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)
    if start_from is None and resume and ckpt_path and Path(ckpt_path).exists():
        start_from = ckpt.read_checkpoint(ckpt_path, map_location=device)
    restart = None
    if start_from is not None:
        old = start_from["extra"]["config"]
        check_resume(old, asdict(cfg), MAY_CHANGE, source=str(ckpt_path),
                     hint="Train with the saved values, or start a fresh run.")
        restart = schedule_restart(old, start_from["extra"].get("restart"), cfg,
                                   start_from["step"])
    scheduler = make_scheduler(optimizer, cfg.warmup_steps, cfg.max_steps,
                               cfg.min_lr_ratio, restart)
    precision = resolve_precision(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16"
                                  and device.type != "meta")
    history, start = History(), 0
    if start_from is not None:
        ckpt.restore_checkpoint(start_from, model, optimizer=optimizer,
                                scheduler=scheduler, scaler=scaler, generator=generator,
                                source=ckpt_path)
        start = start_from["step"]
        history = History.from_dict(start_from["extra"]["history"])
    end = cfg.max_steps if stop_at is None else min(stop_at, cfg.max_steps)
    forward = torch.compile(model) if cfg.compile else model
    # A wrapper whose gradients are sharded clips them itself (as FSDP does).
    clip = getattr(model, "clip_grad_norm_", None) or (
        lambda max_norm: clip_grad_norm(model.parameters(), max_norm))
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    world = dist.get_world_size(dp_group) if dp_group is not None else 1
    pending = Pending(history, device, precision == "fp16")
    collective = dist.is_initialized() and dist.get_world_size() > 1

    def checkpoint(step: int) -> None:
        pending.read()  # raises before a non-finite step can be saved
        ckpt.save_checkpoint(ckpt_path, model, optimizer=optimizer, scheduler=scheduler,
                             scaler=scaler, step=step, generator=generator,
                             extra={"history": history.to_dict(), "config": asdict(cfg),
                                    "restart": restart, "meta": meta or {}})

    def fetch(step: int) -> list:
        return [to_device(batch_fn(step, generator), device)
                for _ in range(cfg.grad_accum)]

    def update(batches: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer update from the micro-batches; (loss, grad norm, valid
        targets of all ranks) on device."""
        # Weight each micro-batch by its share of the step's valid targets, so that
        # masked batches of unequal counts add up to the mean over all their tokens.
        counts = [valid_tokens(b, device) for b in batches]
        local = torch.stack(counts).sum()
        total = local.clone()
        if dp_group is not None:  # data-parallel ranks average: weigh by the global
            dist.all_reduce(total, group=dp_group)
        loss_sum = torch.zeros((), device=device)
        for micro, (batch, count) in enumerate(zip(batches, counts)):
            # A data-parallel wrapper syncs gradients on the last micro-step only.
            sync = (model.no_sync() if micro < len(batches) - 1
                    and hasattr(model, "no_sync") else contextlib.nullcontext())
            with sync:
                with precision_context(precision, device.type):
                    loss = loss_fn(forward, batch).float()
                scaler.scale(loss * (count * world / total)).backward()
            loss_sum += loss.detach() * (count / local)  # this rank's token mean
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = clip(max_norm)
        scaler.step(optimizer)  # fp16: skipped when a gradient is not finite
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return loss_sum, grad_norm, total

    model.train()
    bar = tqdm(range(start, end), initial=start, total=end, disable=not cfg.progress,
               desc="train", dynamic_ncols=True)
    batches = fetch(start) if start < end else []
    with stop_signals(ckpt_path is not None) as flag:
        try:
            for step in bar:
                t0 = time.perf_counter()
                done = step + 1
                saving = ckpt_path is not None and (done == end or (
                    cfg.ckpt_interval and done % cfg.ckpt_interval == 0))
                lr = scheduler.get_last_lr()[0]
                tokens = sum(count_tokens(b) for b in batches)
                loss, grad_norm, targets = update(batches)
                # A stop is decided before the next batches are drawn, so that its
                # checkpoint holds the generator's state for the next step.
                signum = stop_requested(flag, collective, device) if (
                    ckpt_path is not None and done < end and (
                        not collective or saving or done % cfg.log_interval == 0)) \
                    else None
                # Fetch the next batches while the device works on this step; not
                # past a checkpoint, so that it saves the RNG state of the next step.
                batches = fetch(done) if done < end and not saving and signum is None \
                    else None
                pending.add(step, loss, grad_norm, targets, lr, tokens,
                            time.perf_counter() - t0)
                if on_step is not None:
                    on_step(done, history)
                evaluating = val_batch_fn is not None and (
                    done == cfg.max_steps or (cfg.eval_interval
                                              and done % cfg.eval_interval == 0))
                if done % cfg.log_interval == 0 or evaluating or saving:
                    pending.read()
                    bar.set_postfix(loss=f"{history.loss[-1]:.3f}", refresh=False)
                if saving and (done == end or not evaluating):
                    checkpoint(done)  # the last one before the final evaluation
                if evaluating:
                    history.eval_step.append(done)
                    history.eval_loss.append(evaluate(
                        model, val_batch_fn, cfg.eval_steps, loss_fn=loss_fn,
                        precision=precision, device=device, seed=cfg.eval_seed))
                    if saving:
                        checkpoint(done)  # again, with the evaluation in its history
                if signum is not None:
                    if not saving:
                        checkpoint(done)
                    raise Interrupted(signum, done, ckpt_path)
                if batches is None and done < end:
                    batches = fetch(done)
            pending.read()
        except FloatingPointError as err:
            if ckpt_path is not None and Path(ckpt_path).exists():
                good = ckpt.read_checkpoint(ckpt_path, map_location=device)
                ckpt.restore_checkpoint(good, model, restore_rng=False,
                                        source=ckpt_path)
                raise FloatingPointError(f"{err} The model holds the weights of the "
                                         f"last good checkpoint, step {good['step']}, "
                                         f"in {ckpt_path}.") from None
            raise
        finally:
            bar.close()
    return history
