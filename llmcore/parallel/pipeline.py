"""Pipeline parallelism: consecutive blocks on consecutive ranks, micro-batches flowing.

A GPT is cut into p stages; stage s sends its output activations to stage s + 1 and
receives the gradient of them back. With one batch only one stage works at a time, so
the batch is cut into m micro-batches:

* GPipe (Huang et al. 2019): every stage runs all m forwards, then all m backwards;
  it keeps the activations of all m micro-batches;
* 1F1B (Narayanan et al. 2021, PipeDream-Flush): after p - s - 1 warm-up forwards a
  stage alternates one forward and one backward, keeping at most p - s in flight.

Both leave each stage idle for the same share of the step, the *bubble*
(p - 1) / (m + p - 1). Sends do not block, and a send followed by a receive from
the same neighbour travels with it as one batch, so two neighbours that both send
never wait on each other (NCCL would); receives block.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from llmcore.nn.loss import lm_loss
from llmcore.parallel.comm import Comm


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


# ------------------------------------------------- schedules


def gpipe(stage: int, n_stages: int, n_micro: int) -> list[tuple[str, int]]:
    """All forwards, then all backwards."""
    return [("F", i) for i in range(n_micro)] + [("B", i) for i in range(n_micro)]


def one_f_one_b(stage: int, n_stages: int, n_micro: int) -> list[tuple[str, int]]:
    """p - s - 1 warm-up forwards, then one forward / one backward, then cool-down."""
    warm = min(n_stages - stage - 1, n_micro)
    sched = [("F", i) for i in range(warm)]
    for i in range(warm, n_micro):
        sched += [("F", i), ("B", i - warm)]
    return sched + [("B", i) for i in range(n_micro - warm, n_micro)]


def sequential(stage: int, n_stages: int, n_micro: int) -> list[tuple[str, int]]:
    """No pipelining: each micro-batch's forward and backward before the next one;
    the baseline whose bubble is (p - 1) / p whatever m is."""
    return [step for i in range(n_micro) for step in (("F", i), ("B", i))]


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "sequential": sequential}


def simulate(schedule: str, n_stages: int, n_micro: int, t_f: float = 1.0,
             t_b: float = 2.0) -> list[dict]:
    """Events of an ideal run (forward t_f, backward t_b, free communication)."""
    plans = [SCHEDULES[schedule](s, n_stages, n_micro) for s in range(n_stages)]
    done: dict[tuple, float] = {}
    free, pos, events = [0.0] * n_stages, [0] * n_stages, []
    while any(pos[s] < len(plans[s]) for s in range(n_stages)):
        for s in range(n_stages):
            if pos[s] == len(plans[s]):
                continue
            kind, mb = plans[s][pos[s]]
            dep = (("F", s - 1, mb) if s > 0 else None) if kind == "F" else \
                (("B", s + 1, mb) if s < n_stages - 1 else ("F", s, mb))
            if dep is not None and dep not in done:
                continue  # waits for a neighbour
            start = max(free[s], done.get(dep, 0.0))
            end = start + (t_f if kind == "F" else t_b)
            done[(kind, s, mb)] = free[s] = end
            events.append({"stage": s, "kind": kind, "mb": mb, "start": start,
                           "end": end})
            pos[s] += 1
    return events


def bubble(events: list[dict]) -> float:
    """Share of stage-time spent idle between the first start and the last end."""
    stages = {e["stage"] for e in events}
    span = max(e["end"] for e in events) - min(e["start"] for e in events)
    busy = sum(e["end"] - e["start"] for e in events)
    return 1 - busy / (len(stages) * span)


# ------------------------------------------------- running a schedule


def run_pipeline(stage_mod: GPTStage, schedule: str, comm: Comm, x, y, n_micro: int,
                 act_shape: tuple[int, ...]) -> dict:
    """One training step (forward and backward of all micro-batches) of this stage.

    ``x``, ``y``: the whole batch (only the first stage reads x, the last y);
    ``act_shape``: (micro-batch, T, C), the activations between stages.
    Returns the loss (last stage), timed compute events, and the largest number of
    micro-batches whose activations were held at once.
    """
    s, p = comm.rank, comm.world_size
    plan = SCHEDULES[schedule](s, p, n_micro)
    xs, ys = x.chunk(n_micro), y.chunk(n_micro)
    inputs, outputs, events = {}, {}, []
    p2p = _P2P(comm)
    param = next(stage_mod.parameters())
    dt = param.dtype  # activations travel in the model dtype
    loss, peak = torch.zeros((), device=param.device), 0
    dist.barrier(group=comm.group)  # start together (under NCCL: connect first)
    for i, (kind, mb) in enumerate(plan):
        if kind == "F":
            inp = xs[mb] if s == 0 else \
                p2p.recv(x.new_empty(act_shape, dtype=dt, device=param.device), s - 1)
            inp.requires_grad_(s > 0)
            start = _clock(param)
            out = stage_mod(inp)
            if s == p - 1:
                out = lm_loss(out, ys[mb]) / n_micro  # the mean over micro-batches
                loss += out.detach()
            inputs[mb], outputs[mb] = inp, out
            peak = max(peak, len(outputs))
        else:
            out, inp = outputs.pop(mb), inputs.pop(mb)
            grad = None if s == p - 1 else p2p.recv(out.new_empty(act_shape), s + 1)
            start = _clock(param)
            out.backward(grad)
        events.append({"stage": s, "kind": kind, "mb": mb, "start": start,
                       "end": _clock(param)})
        after = plan[i + 1] if i + 1 < len(plan) else None
        if kind == "F" and s < p - 1:
            p2p.send(out.detach(), s + 1, _source(after, s, p))
        if kind == "B" and s > 0:
            p2p.send(inp.grad, s - 1, _source(after, s, p))
    p2p.finish()
    return {"loss": loss.item(), "events": events, "peak_in_flight": peak}


def _clock(param: torch.Tensor) -> float:
    """The time now, after the GPU has finished what was queued (CUDA runs
    asynchronously: without the wait an event would time only the launch)."""
    if param.is_cuda:
        torch.cuda.synchronize(param.device)
    return time.perf_counter()


def _source(step, s: int, p: int) -> int | None:
    """The stage that ``step`` of stage ``s`` receives from (None: no receive)."""
    if step is None:
        return None
    kind, _ = step
    if kind == "F":
        return s - 1 if s > 0 else None
    return s + 1 if s < p - 1 else None


class _P2P:
    """Sends and receives of one stage. A send whose next step receives from the
    same neighbour travels with that receive as one batch (Megatron's
    send_forward_recv_backward): in 1F1B both neighbours send, then receive, and
    under NCCL two blocking sends towards each other would wait forever."""

    def __init__(self, comm: Comm):
        self.comm = comm
        self.held: list[dist.P2POp] = []  # sends waiting for the next receive
        self.works: list = []
        self.sent: list[torch.Tensor] = []  # kept alive until the sends complete

    def _op(self, fn, t: torch.Tensor, peer: int) -> dist.P2POp:
        return dist.P2POp(fn, t, self.comm.global_rank(peer), self.comm.group)

    def send(self, t: torch.Tensor, dst: int, next_source: int | None) -> None:
        t = t.contiguous()
        self.comm.stats.record("send", t.numel() * t.element_size())
        self.sent.append(t)
        self.held.append(self._op(dist.isend, t, dst))
        if next_source != dst:
            self.works += dist.batch_isend_irecv(self.held)
            self.held = []

    def recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        works = dist.batch_isend_irecv(self.held + [self._op(dist.irecv, t, src)])
        self.held = []
        self.works += works[:-1]
        works[-1].wait()
        return t

    def finish(self) -> None:
        if self.held:
            self.works += dist.batch_isend_irecv(self.held)
        for work in self.works:
            work.wait()
        self.held, self.works, self.sent = [], [], []


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
