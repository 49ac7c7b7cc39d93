"""Measured timelines: when each rank computes and when it communicates.

Every process of one machine reads the same monotonic clock (``time.perf_counter``),
so events recorded on different ranks share one time axis. On a GPU the work runs
asynchronously: the step's start, the end of forward and the end of the step wait
for the device; the end of backward is when the host saw the last gradient, and an
all-reduce ends when a CUDA event queued behind it on the GPU fires.

* :func:`dp_timeline_worker`: a step of :class:`BucketedDataParallel` with each
  bucket's all-reduce timed from launch to completion, beside forward and backward
  (:func:`dp_timelines`: for several bucket caps in one launch);
* the 1F1B pipeline records its own compute events
  (:func:`llmcore.parallel.pipeline.run_pipeline`); :func:`plot_schedule` draws both.
"""

from __future__ import annotations

import time

import torch

from llmcore.parallel.comm import HookState, allreduce_hook
from llmcore.parallel.data_parallel import BucketedDataParallel
from llmcore.parallel.ranks import rank_device
from llmcore.parallel.rng import rank_seed


class TimedHookState(HookState):
    """The all-reduce hook's state, plus (bucket, start, end) of every all-reduce."""

    def __init__(self, process_group=None):
        super().__init__(process_group)
        self.events: list[dict] = []


def timed_allreduce_hook(state: TimedHookState, bucket):
    """DDP's all-reduce hook, recording when it was launched and when it completed."""
    start = time.perf_counter()

    def finished(fut):
        value, end = fut.value(), time.perf_counter()
        if value.is_cuda:  # NCCL's future completes once the work is queued: time
            end = torch.cuda.Event(enable_timing=True)  # its end on the GPU instead
            end.record()
        state.events.append({"kind": "comm", "bucket": bucket.index(),
                             "start": start, "end": end})
        return value

    return allreduce_hook(state, bucket).then(finished)


def dp_timeline_worker(rank: int, world_size: int, model_fn, x, y,
                       bucket_cap_mb: float, repeats: int = 3,
                       seed: int = 0) -> dict:
    """Time a bucketed data-parallel step (the last of ``repeats``): forward,
    backward (until the last gradient), each bucket's all-reduce, the wait."""
    torch.manual_seed(rank_seed(seed, rank))
    device = rank_device()
    model = model_fn().to(device)
    last_grad = [0.0]

    def grad_ready(p):  # no wait for the GPU here: it would wait for the buckets too
        last_grad[0] = time.perf_counter()

    # Registered before the wrapper's hooks, so it runs first: for the last gradient
    # the wrapper's hook then waits for every bucket, which is not backward's time.
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(grad_ready)
    dp = BucketedDataParallel(model, bucket_cap_mb=bucket_cap_mb)
    xs = x.chunk(world_size)[rank].to(device)
    ys = y.chunk(world_size)[rank].to(device)
    for _ in range(repeats):
        state = TimedHookState()
        dp.register_comm_hook(state, timed_allreduce_hook)
        t0 = _clock(device)
        mark = _mark(device)
        _, loss = dp(xs, ys)
        t1 = _clock(device)
        loss.backward()  # returns after the wrapper waited for every bucket
        t2 = _clock(device)
        for e in state.events:  # GPU events into seconds on the host's clock
            if not isinstance(e["end"], float):
                e["end"] = t0 + mark.elapsed_time(e["end"]) / 1e3
        model.zero_grad()
    events = [{"kind": "forward", "start": t0, "end": t1},
              {"kind": "backward", "start": t1, "end": last_grad[0]},
              {"kind": "wait", "start": last_grad[0], "end": t2}] + state.events
    return {"events": events, "buckets": len(dp.buckets), "rank": rank}


def dp_timelines(rank: int, world_size: int, model_fn, x, y, caps: dict) -> dict:
    """:func:`dp_timeline_worker` for every bucket cap of ``caps`` {label: MB}."""
    return {label: dp_timeline_worker(rank, world_size, model_fn, x, y, cap)
            for label, cap in caps.items()}


def _clock(device: torch.device) -> float:
    """The time now, once the GPU has finished the work queued before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _mark(device: torch.device):
    """A CUDA event recorded now (the GPU is idle: it matches the host's clock)."""
    if device.type != "cuda":
        return None
    mark = torch.cuda.Event(enable_timing=True)
    mark.record()
    return mark


def overlap(events: list[dict]) -> float:
    """Share of the all-reduce time that ran while backward was still computing."""
    bwd = next(e for e in events if e["kind"] == "backward")
    comm = [e for e in events if e["kind"] == "comm"]
    total = sum(e["end"] - e["start"] for e in comm)
    hidden = sum(max(0.0, min(e["end"], bwd["end"]) - max(e["start"], bwd["start"]))
                 for e in comm)
    return hidden / total if total else 0.0


COLORS = {"F": "tab:blue", "B": "tab:green", "forward": "tab:blue",
          "backward": "tab:green", "wait": "tab:red", "comm": "tab:orange"}


def plot_schedule(events: list[dict], ax, title: str = "") -> None:
    """A Gantt chart: one row per stage, forwards blue, backwards green, labelled by
    micro-batch."""
    t0 = min(e["start"] for e in events)
    for e in events:
        start, width = e["start"] - t0, e["end"] - e["start"]
        ax.broken_barh([(start, width)], (e["stage"] - 0.4, 0.8),
                       facecolors=COLORS[e["kind"]], edgecolor="white")
        ax.text(start + width / 2, e["stage"], str(e["mb"]), ha="center",
                va="center", color="white", fontsize=8)
    ax.set_yticks(sorted({e["stage"] for e in events}))
    ax.set_ylabel("stage")
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)


def plot_dp_timeline(ranks: list[dict], ax, title: str = "") -> None:
    """Per rank two rows: compute (forward, backward, wait) and the buckets'
    all-reduces; times in milliseconds from the first forward."""
    t0 = min(e["start"] for r in ranks for e in r["events"])
    for r in ranks:
        for e in r["events"]:
            row = 2 * r["rank"] + (1 if e["kind"] == "comm" else 0)
            start, width = 1e3 * (e["start"] - t0), 1e3 * (e["end"] - e["start"])
            ax.broken_barh([(start, width)], (row - 0.4, 0.8),
                           facecolors=COLORS[e["kind"]], edgecolor="white")
    ax.set_yticks(range(2 * len(ranks)),
                  [f"rank {r['rank']} {w}" for r in ranks for w in ("compute", "comm")])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(title, fontsize=9)
