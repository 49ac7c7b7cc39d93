"""Pipeline parallelism: consecutive blocks on consecutive ranks, micro-batches flowing.

A GPT is cut into stages; stage s sends its output activations to stage s + 1 and
receives the gradient of them back. With one batch only one stage works at a time, so
the batch is cut into m micro-batches, and a *schedule*
(:mod:`llmcore.parallel.schedules`: GPipe, 1F1B, interleaved 1F1B, ZB-H1) says in
which order each rank runs their forwards and backwards. :func:`run_pipeline` plays
one rank's schedule for real: receive, compute, send.

Sends and receives do not block: each rank posts them in the order
:func:`llmcore.parallel.schedules.with_comms` gives, the same on both ends of every
pair of ranks, and waits for a received tensor only where it computes with it.
Nothing waits for the device unless a ``clock`` is given to time the actions: the
overlap of stages is what a pipeline is for.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from llmcore.nn.loss import lm_loss
from llmcore.parallel.comm import Comm
from llmcore.parallel.schedules import make_plan, with_comms
from llmcore.parallel.split_backward import WeightGradStore


class GPTStage(nn.Module):
    """Blocks ``[lo, hi)`` of a GPT; the first stage embeds, the last one projects to
    logits. Holds references to the model's own modules (parameter names survive)."""

    def __init__(self, model: nn.Module, stage: int, n_stages: int):
        super().__init__()
        n_layer = len(model.blocks)
        if not 0 < n_stages <= n_layer:
            raise ValueError(f"n_stages={n_stages} must be between 1 and the number of "
                             f"blocks ({n_layer})")
        lo, hi = (n_layer * stage) // n_stages, (n_layer * (stage + 1)) // n_stages
        self.first, self.last = stage == 0, stage == n_stages - 1
        self.embed = [model.tok_emb, model.pos_emb, model.drop] if self.first else []
        self.embed = nn.ModuleList(self.embed)
        self.blocks = nn.ModuleList(model.blocks[lo:hi])
        self.head = nn.ModuleList([model.ln_f, model.lm_head] if self.last else [])

    def forward(self, x):
        """(B, T) token ids on the first stage, else (B, T, C); logits on the last."""
        if self.first:
            tok, pos, drop = self.embed
            x = drop(pos(tok(x)))  # (B, T, C)
        for block in self.blocks:
            x = block(x, is_causal=True)
        if self.last:
            ln_f, lm_head = self.head
            x = lm_head(ln_f(x))  # (B, T, V)
        return x


# ------------------------------------------------- running a schedule


def run_pipeline(stages: nn.Module | list[nn.Module], schedule: str, comm: Comm,
                 x, y, n_micro: int, act_shape: tuple[int, ...], *,
                 weight_grads: WeightGradStore | None = None,
                 clock: Callable[[], float] | None = None) -> dict:
    """One training step (forward and backward of all micro-batches) of this rank.

    ``stages``: this rank's stage, or its chunks (virtual stages c * p + rank, for
    interleaved 1F1B); ``schedule``: a key of
    :data:`llmcore.parallel.schedules.SCHEDULES`; ``x``, ``y``: the whole batch (only
    the first stage reads x, the last y); ``act_shape``: (micro-batch, T, C), the
    activations between stages; ``weight_grads``: the store of
    :func:`llmcore.parallel.split_backward.defer_weight_grads`, needed by a schedule
    that splits the backward (ZB-H1); ``clock``: if given (:func:`device_clock`),
    every computing action is timed with it; without it nothing waits for the device.

    Returns the loss (a tensor on the device, 0 but on the last stage), the timed
    events (with a clock), and the most micro-batches (in chunks) whose activations
    were held at once.
    """
    chunks = list(stages) if isinstance(stages, (list, tuple, nn.ModuleList)) \
        else [stages]
    r, p, v = comm.rank, comm.world_size, len(chunks)
    if p == 1 and v > 1:
        raise ValueError("several chunks on one rank would send to itself: "
                         "interleave over at least 2 ranks")
    plans = [make_plan(schedule, s, p, n_micro, v) for s in range(p)]
    split = any(a.kind == "W" for a in plans[r])
    if split and weight_grads is None:
        raise ValueError(f"schedule {schedule!r} splits the backward into B and W: "
                         "pass weight_grads=defer_weight_grads(stage)")
    last = p * v - 1  # the virtual stage that computes the loss
    xs, ys = x.chunk(n_micro), y.chunk(n_micro)
    param = next(chunks[0].parameters())
    dt = param.dtype  # activations travel in the model dtype
    inputs, outputs, input_grads, received, sends, events = {}, {}, {}, {}, [], []
    loss, peak = torch.zeros((), device=param.device), 0
    if clock is not None:
        dist.barrier(group=comm.group)  # start together: one time axis for all
    for a in with_comms(plans, v)[r]:
        key = (a.mb, a.chunk)
        if a.kind.startswith("RECV"):  # posted early; waited for where it is used
            buf = torch.empty(act_shape, dtype=dt, device=param.device)
            peer = (r - 1) % p if a.kind == "RECV_F" else (r + 1) % p
            received[a.kind, key] = (buf, dist.irecv(buf, comm.global_rank(peer),
                                                     group=comm.group))
            continue
        if a.kind.startswith("SEND"):
            t = outputs[key] if a.kind == "SEND_F" else input_grads.pop(key)
            t = t.detach().contiguous()
            peer = (r + 1) % p if a.kind == "SEND_F" else (r - 1) % p
            comm.stats.record("send", t.numel() * t.element_size())
            sends.append((t, dist.isend(t, comm.global_rank(peer), group=comm.group)))
            continue
        k = a.chunk * p + r
        if a.kind == "F":
            inp = xs[a.mb] if k == 0 else _wait(received.pop(("RECV_F", key)))
            inp.requires_grad_(k > 0)
            start = clock() if clock else 0.0
            out = chunks[a.chunk](inp)
            if k == last:
                out = lm_loss(out, ys[a.mb]) / n_micro  # the mean over micro-batches
                loss += out.detach()
            inputs[key], outputs[key] = inp, out
        elif a.kind == "B":
            grad = None if k == last else _wait(received.pop(("RECV_B", key)))
            start = clock() if clock else 0.0
            with weight_grads.capture(key) if split else contextlib.nullcontext():
                outputs.pop(key).backward(grad)
            inp = inputs.pop(key)
            if k > 0:
                input_grads[key] = inp.grad  # for the previous stage
        else:  # W: the weight gradients B left waiting
            start = clock() if clock else 0.0
            weight_grads.run(key)
        # activations alive: graphs not yet run backward, and tensors kept for a W
        waiting = weight_grads.queues.keys() if split else set()
        peak = max(peak, len(outputs.keys() | waiting))
        if clock is not None:
            events.append({"stage": r, "kind": a.kind, "mb": a.mb, "chunk": a.chunk,
                           "start": start, "end": clock()})
    for _, work in sends:  # the tensors stay referenced until they have left
        work.wait()
    return {"loss": loss, "events": events, "peak_in_flight": peak}


def _wait(received: tuple[torch.Tensor, object]) -> torch.Tensor:
    buf, work = received
    work.wait()
    return buf


def device_clock(device: torch.device) -> Callable[[], float]:
    """A clock for :func:`run_pipeline`: the time once ``device`` has finished what
    was queued (CUDA runs asynchronously: without the wait an action would time only
    its launch). It removes the overlap it measures; use it to draw timelines."""
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    return now


def sync_tied_grads(model: nn.Module, comm: Comm) -> None:
    """The first and last stages share the embedding matrix: sum its two gradients."""
    first_last = [0, comm.world_size - 1]
    if comm.world_size == 2:
        group = comm.group
    elif comm.group is None:
        group = dist.new_group(first_last)
    else:
        raise ValueError("with more than two stages in a subgroup, create the group of "
                         "the first and last stages on every rank and all-reduce there")
    if comm.rank in first_last:
        w = model.tok_emb.weight
        grad = w.grad if w.grad is not None else torch.zeros_like(w)
        dist.all_reduce(grad, group=group)
        w.grad = grad
