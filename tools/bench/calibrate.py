"""Measure the constants of the step-time model on the machine it runs on.

* :func:`sweep_worker` times each collective over a few message sizes (run it on
  every rank with :func:`book.workers.launch.launch`; :func:`sweep_steps` gives the
  closures to time along with other work); :func:`fit_link` fits
  ``t = steps * alpha + wire_bytes / bandwidth`` to the points by least squares.
* :func:`fit_compute` splits the time of a training step at several batch sizes into a
  fixed part and a part proportional to the FLOPs: ``t = fixed + flops / rate``.

Timings are medians over repetitions after warm-up, with a barrier before each
repetition so that every rank starts together, and functions timed in turns
(:func:`median_times`): a shared machine is noisy, one slow repetition must not
decide a constant, and a load that drifts must touch every measurement alike. Beside
each time, :func:`median_times` can record how long the timing thread sat ready to
run while other processes held the cores (:func:`run_queue_s`): on a loaded machine
that wait, not the code, decides the time, and it differs between codes that sleep
often (waiting on messages) and codes that compute without a break.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist

from book.workers.steptime import OPS, Link, ring_steps
from llmcore.parallel.comm import wire_bytes


def _collective(op: str, numel: int, rank: int, world: int) -> Callable[[], object]:
    """A closure running ``op`` once with a payload of ``numel`` fp32 values."""
    numel -= numel % world
    full = torch.ones(numel)
    part = torch.empty(numel // world)
    if op == "all_reduce":
        return lambda: dist.all_reduce(full)
    if op == "reduce_scatter":
        return lambda: dist.reduce_scatter_single(part, full)
    if op == "all_gather":
        return lambda: dist.all_gather_single(full, part)
    peer = rank ^ 1  # pairs (0, 1), (2, 3): one message each way, like a pipeline

    def send_recv():
        if peer >= world:
            return
        if rank % 2 == 0:
            dist.send(full, peer)
            dist.recv(full, peer)
        else:
            dist.recv(full, peer)
            dist.send(full, peer)
    return send_recv


SIZES = (2**10, 2**15, 2**20)  # fp32 values per message in a sweep


def sweep_steps(rank: int, world_size: int, sizes=SIZES) -> dict:
    """``{(op, payload bytes): closure}``: one call of each collective and size."""
    return {(op, 4 * (n - n % world_size)): _collective(op, n, rank, world_size)
            for op in OPS for n in sizes}


def sweep_points(times: dict) -> dict:
    """``{op: [(payload bytes, seconds per call)]}`` from the times of
    :func:`sweep_steps`' closures; a send was timed there and back, so halved."""
    out: dict[str, list] = {op: [] for op in OPS}
    for (op, nbytes), t in sorted(times.items()):
        out[op].append((nbytes, t / 2 if op == "send" else t))
    return out


def sweep_worker(rank: int, world_size: int, sizes: tuple[int, ...] = SIZES,
                 reps: int = 7) -> dict:
    """Seconds per call of every collective, by payload in bytes (fp32 messages), on
    the slowest rank."""
    return sweep_points(slowest(median_times(sweep_steps(rank, world_size, sizes),
                                             reps)))


def fit_link(op: str, points: list[tuple[float, float]], n: int) -> Link:
    """Least-squares alpha and bandwidth of ``op`` on ``n`` ranks from (bytes, s)."""
    if len(points) < 2:
        raise ValueError(f"fit_link needs at least 2 points, got {len(points)}")
    xs = [wire_bytes(op, b, n if op != "send" else 2) for b, _ in points]
    ys = [t for _, t in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    slope = max(slope, 1e-15)  # a noisy sweep must not give a negative bandwidth
    intercept = max(my - slope * mx, 0.0)
    return Link(alpha=intercept / ring_steps(op, n if op != "send" else 2),
                bandwidth=1 / slope)


def run_queue_s() -> float:
    """Seconds the calling thread has waited, ready to run, for a core (Linux's
    per-thread scheduler statistics); 0.0 where the kernel does not report it."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def median_times(fns: dict, reps: int, warmup: int = 2,
                 waits: dict | None = None) -> dict:
    """Median seconds of each function, timed in turns (one call of each per round):
    a machine whose load drifts slows every function alike, not the last ones.

    ``waits``: if given, filled with the median seconds of each call that this
    thread spent waiting for a core (:func:`run_queue_s`).
    """
    times: dict = {k: [] for k in fns}
    queued: dict = {k: [] for k in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            if dist.is_initialized():
                dist.barrier()
            q0, start = run_queue_s(), time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
                queued[name].append(run_queue_s() - q0)
    if waits is not None:
        waits.update({k: statistics.median(v) for k, v in queued.items()})
    return {k: statistics.median(v) for k, v in times.items()}


def slowest(values: dict) -> dict:
    """Each value's maximum over the ranks (the same keys in the same order on every
    rank): a synchronous step lasts as long as its slowest rank, whichever it is."""
    if not dist.is_initialized():
        return dict(values)
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(values, t.tolist()))


def fit_compute(points: list[tuple[float, float]]) -> dict:
    """Split a step's seconds into ``fixed + flops / rate`` by least squares over
    (FLOPs, seconds) points of several batch sizes."""
    if len({f for f, _ in points}) < 2:
        raise ValueError("fit_compute needs points of at least 2 different sizes")
    xs, ys = [f for f, _ in points], [t for _, t in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum(
        (x - mx) ** 2 for x in xs)
    if slope <= 0:  # noise hid the growth: all of it proportional to FLOPs
        return {"flops": sum(xs) / sum(ys), "fixed_s": 0.0}
    fixed = my - slope * mx
    if fixed < 0:  # a fixed part cannot be negative: a line through the origin
        slope = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
        fixed = 0.0
    return {"flops": 1 / slope, "fixed_s": fixed}
