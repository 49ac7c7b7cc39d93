"""Measure the constants of the step-time model on the machine it runs on.

* :func:`sweep_worker` times each collective over a few message sizes (run it on
  every rank with :func:`llmcore.parallel.launch`); :func:`fit_link` fits
  ``t = steps * alpha + wire_bytes / bandwidth`` to the points by least squares.
* :func:`fit_compute` splits the time of a training step at two batch sizes into a
  fixed part and a part proportional to the FLOPs: ``t = fixed + flops / rate``.

Timings are medians over repetitions after warm-up, with a barrier before each
repetition so that every rank starts together: a shared machine is noisy, and one
slow repetition must not decide the constant.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist

from llmcore.parallel.comm import wire_bytes
from llmcore.parallel.steptime import OPS, Link, ring_steps


def median_time(fn: Callable[[], object], reps: int, warmup: int = 2,
                barrier: bool = True) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after ``warmup`` runs."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    times = []
    for i in range(warmup + reps):
        if barrier and dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


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


def sweep_worker(rank: int, world_size: int, sizes: tuple[int, ...] = (
        2**10, 2**14, 2**17, 2**20), reps: int = 7) -> dict:
    """Seconds per call of every collective, by payload in bytes (fp32 messages).

    A send is timed as a round trip (there and back) and halved.
    """
    out = {}
    for op in OPS:
        points = []
        for numel in sizes:
            t = median_time(_collective(op, numel, rank, world_size), reps)
            t = t / 2 if op == "send" else t
            points.append((4 * (numel - numel % world_size), t))
        out[op] = points
    return out


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


def median_times(fns: dict[str, Callable[[], object]], reps: int,
                 warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, timed in turns (one call of each per round):
    a machine whose load drifts slows every function alike, not the last ones."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            if dist.is_initialized():
                dist.barrier()
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def fit_compute(t_small: float, t_big: float, f_small: float, f_big: float) -> dict:
    """Split a step's seconds into ``fixed + flops / rate`` from the times of two
    batch sizes with ``f_small`` < ``f_big`` FLOPs."""
    if not 0 < f_small < f_big:
        raise ValueError(f"need 0 < f_small < f_big, got {f_small}, {f_big}")
    if t_big <= t_small:  # noise hid the growth: all of it proportional to FLOPs
        return {"flops": f_big / t_big, "fixed_s": 0.0}
    rate = (f_big - f_small) / (t_big - t_small)
    return {"flops": rate, "fixed_s": max(t_big - f_big / rate, 0.0)}
