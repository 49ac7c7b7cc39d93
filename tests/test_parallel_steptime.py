"""The step-time model: alpha-beta collectives, calibration fits, bubble, overlap."""

import os
import subprocess
import sys
import time

import pytest

from book.workers.costmodel import Plan, bubble_fraction
from book.workers.steptime import (Cluster, Device, Link, ring_steps,
                                   scaling_efficiency, step_time)
from llmcore.accounting import flops_per_token
from llmcore.models.gpt import GPTConfig
from book.workers.launch import launch
from tools.bench import calibrate
from tools.bench.calibrate import (fit_compute, fit_link, median_times, run_queue_s,
                                   sweep_worker)

CFG = GPTConfig(vocab_size=64, block_size=64, n_layer=4, n_head=4, n_embd=128)


def test_ring_collectives_cost_latency_steps_and_ring_bytes():
    link = Link(alpha=1e-3, bandwidth=1e9)
    assert link.time("all_reduce", 4e9, 4) == pytest.approx(6e-3 + 6.0)
    assert link.time("all_gather", 4e9, 4) == pytest.approx(3e-3 + 3.0)
    assert link.time("reduce_scatter", 4e9, 4, messages=10) == pytest.approx(3e-2 + 3)
    assert link.time("send", 1e9, 2) == pytest.approx(1e-3 + 1.0)
    assert link.time("all_reduce", 4e9, 1) == 0.0
    assert ring_steps("all_reduce", 8) == 14
    with pytest.raises(ValueError, match="op"):
        ring_steps("gather", 2)
    with pytest.raises(ValueError, match="bandwidth"):
        Link(alpha=0.0, bandwidth=0.0)


def test_fits_recover_the_constants_they_were_made_from():
    truth = Link(alpha=2e-4, bandwidth=3e8)
    points = [(b, truth.time("all_gather", b, 2)) for b in (1e3, 1e5, 1e6, 4e6)]
    fitted = fit_link("all_gather", points, 2)
    assert fitted.alpha == pytest.approx(2e-4, rel=1e-6)
    assert fitted.bandwidth == pytest.approx(3e8, rel=1e-6)
    fit = fit_compute([(f, 0.02 + f / 5e9) for f in (1e9, 2e9, 4e9)])
    assert fit["flops"] == pytest.approx(5e9) and fit["fixed_s"] == pytest.approx(0.02)


def _cluster(alpha=0.0, bandwidth=1e18, cores=0, flops=1e12):
    return Cluster(Device("test", flops, cores=cores),
                   intra=Link(alpha, bandwidth), per_node=8)


def test_free_links_scale_perfectly_and_the_bubble_costs_its_fraction():
    c = _cluster()
    one = step_time(CFG, Plan(), 16, 64, c)["total"]
    assert one == pytest.approx(16 * 64 * flops_per_token(CFG, 64) / 1e12)
    for plan in (Plan(dp=4), Plan(tp=4), Plan(dp=2, tp=2, zero=3)):
        assert step_time(CFG, plan, 16, 64, c)["total"] == pytest.approx(one / 4)
    pp = step_time(CFG, Plan(pp=2, micro_batches=4), 16, 64, c)
    assert pp["bubble"] / pp["total"] == pytest.approx(bubble_fraction(2, 4))
    assert scaling_efficiency(CFG, Plan(dp=8), 2, 64, c) == pytest.approx(1.0)


def test_oversubscribed_cores_slow_every_rank():
    c = _cluster(cores=2)
    two = step_time(CFG, Plan(dp=2), 16, 64, c)
    four = step_time(CFG, Plan(dp=4), 16, 64, c)
    assert four["slowdown"] == 2 and two["slowdown"] == 1
    assert four["compute"] == pytest.approx(two["compute"])  # half the work, half speed


def test_buckets_hide_all_reduce_behind_backward_and_prefetch_hides_gathers():
    c = _cluster(alpha=1e-5, bandwidth=1e9, flops=1e10)  # backward longer than comm
    one_bucket = step_time(CFG, Plan(dp=2), 16, 64, c, bucket_mb=100)
    buckets = step_time(CFG, Plan(dp=2), 16, 64, c, bucket_mb=0.25)
    assert one_bucket["dp_exposed"] == pytest.approx(one_bucket["dp"])
    assert buckets["dp_exposed"] < 0.5 * buckets["dp"]
    z3 = step_time(CFG, Plan(dp=2, zero=3), 16, 64, c, prefetch=False)
    z3p = step_time(CFG, Plan(dp=2, zero=3), 16, 64, c, prefetch=True)
    assert z3p["total"] < z3["total"] and z3["dp_exposed"] == z3["dp"]
    z1 = step_time(CFG, Plan(dp=2, zero=1), 16, 64, c)
    assert z3["dp"] > z1["dp"] > 0  # ZeRO-3 gathers twice
    with pytest.raises(ValueError, match="batch"):
        step_time(CFG, Plan(dp=3), 16, 64, c)


@pytest.mark.distributed
def test_sweep_times_grow_with_the_message():
    ranks = launch(sweep_worker, 2, (2**8, 2**21), 5, backend="gloo")
    sweep = ranks[0]
    assert ranks[1] == sweep  # both ranks report the slowest one's times
    for op, ((_, small), (_, big)) in sweep.items():
        assert 0 < small < big, (op, small, big)


def test_median_times_reports_each_calls_own_wait(monkeypatch):
    clock = iter(range(100))  # the run queue grows by 1 s between any two reads
    monkeypatch.setattr(calibrate, "run_queue_s", lambda: float(next(clock)))
    waits: dict = {}
    times = median_times({"a": lambda: None, "b": lambda: None}, reps=3, warmup=1,
                         waits=waits)
    assert waits == {"a": 1.0, "b": 1.0} and set(times) == {"a", "b"}


@pytest.mark.skipif(not os.path.exists("/proc/thread-self/schedstat"),
                    reason="needs Linux scheduler statistics")
def test_run_queue_wait_grows_when_another_process_takes_the_core():
    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    rival = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(rival.pid, {cpu})
        os.sched_setaffinity(0, {cpu})
        q0, t0 = run_queue_s(), time.perf_counter()
        while time.perf_counter() - t0 < 0.3:  # compete with the rival for 0.3 s
            pass
        waited, wall = run_queue_s() - q0, time.perf_counter() - t0
    finally:
        os.sched_setaffinity(0, before)
        rival.kill()
        rival.wait()
    assert 0.1 * wall < waited < wall


@pytest.mark.parametrize("schedule,chunks", [("gpipe", 1), ("interleaved", 2),
                                             ("zbh1", 1)])
def test_each_schedule_idles_its_bubble_fraction(schedule, chunks):
    plan = Plan(pp=2, micro_batches=4, schedule=schedule, chunks=chunks)
    t = step_time(CFG, plan, 16, 64, _cluster())
    assert t["bubble"] / t["total"] == pytest.approx(
        bubble_fraction(2, 4, schedule, chunks))
    slow_links = _cluster(alpha=1e-3, bandwidth=1e8)
    one = step_time(CFG, Plan(pp=2, micro_batches=4), 16, 64, slow_links)["pp"]
    assert step_time(CFG, plan, 16, 64, slow_links)["pp"] == pytest.approx(
        chunks * one)  # interleaving sends each micro-batch through more boundaries
