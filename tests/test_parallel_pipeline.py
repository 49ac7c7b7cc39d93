"""Pipeline schedules: the gradients of one device, torch.distributed.pipelining's
gradients, the bubble formula, and 1F1B's smaller activation footprint."""

import functools
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from book.workers.pipeline import dp_pp_worker, pipeline_worker, torch_pipelining_worker
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.parallel import launch, pipeline
from llmcore.parallel.comm import CommStats
from llmcore.parallel.costmodel import bubble_fraction, pp_payload
from llmcore.parallel.pipeline import bubble, gpipe, one_f_one_b, simulate

CFG = GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)
MODEL = functools.partial(GPT, CFG)
X = torch.randint(32, (8, 8), generator=torch.Generator().manual_seed(1))
Y = torch.randint(32, (8, 8), generator=torch.Generator().manual_seed(2))


def both_schedules(rank, world_size):
    out = {s: pipeline_worker(rank, world_size, MODEL, s, X, Y, n_micro=4)
           for s in ("gpipe", "1f1b")}
    out["torch"] = torch_pipelining_worker(rank, world_size, MODEL, "1f1b", X, Y, 4)
    return out


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (3, 2)])
def test_schedules_run_every_microbatch_once_and_bubble_matches(p, m):
    for sched in (gpipe, one_f_one_b):
        for s in range(p):
            plan = sched(s, p, m)
            assert sorted(plan) == sorted([("F", i) for i in range(m)] +
                                          [("B", i) for i in range(m)])
            assert all(plan.index(("F", i)) < plan.index(("B", i)) for i in range(m))
    for name in ("gpipe", "1f1b"):
        assert bubble(simulate(name, p, m)) == pytest.approx(bubble_fraction(p, m))


@pytest.mark.distributed
def test_pipeline_matches_single_device_and_torch():
    torch.manual_seed(0)
    model = MODEL()
    _, loss = model(X, Y)
    loss.backward()
    ranks = launch(both_schedules, 2)
    for sched in ("gpipe", "1f1b"):
        assert abs(ranks[1][sched]["loss"] - loss.item()) < 1e-5
        grads = {**ranks[0][sched]["grads"], **ranks[1][sched]["grads"]}
        assert sorted(grads) == sorted(n for n, _ in model.named_parameters())
        for n, p in model.named_parameters():
            assert (grads[n] - p.grad).abs().max() < 1e-5, (sched, n)
        for s in (0, 1):
            pred = pp_payload(8, 8, 16, stage=s, n_stages=2)
            assert ranks[s][sched]["payload"] == pytest.approx(pred)
    # activations held at once: GPipe all 4 micro-batches, 1F1B at most p - s
    assert [r["gpipe"]["peak_in_flight"] for r in ranks] == [4, 4]
    assert [r["1f1b"]["peak_in_flight"] for r in ranks] == [2, 1]
    # torch.distributed.pipelining's 1F1B computes the same gradients
    assert abs(ranks[1]["torch"]["loss"] - loss.item()) < 1e-5
    for r in ranks:
        for n, g in r["torch"]["grads"].items():
            assert (g - r["1f1b"]["stage_grads"][n]).abs().max() < 1e-5, n


@pytest.mark.distributed
def test_data_times_pipeline_parallel_on_four_ranks():
    torch.manual_seed(0)
    model = MODEL()
    model(X, Y)[1].backward()
    ranks = launch(dp_pp_worker, 4, MODEL, X, Y, 2)
    assert [r["coords"] for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for row in (ranks[:2], ranks[2:]):
        grads = {**row[0]["grads"], **row[1]["grads"]}
        assert sorted(grads) == sorted(n for n, _ in model.named_parameters())
        for n, p in model.named_parameters():
            assert (grads[n] - p.grad).abs().max() < 1e-5, n


# wide enough that a micro-batch's compute outweighs its messages
BIG = functools.partial(GPT, GPTConfig(vocab_size=64, block_size=32, n_layer=2,
                                       n_head=4, n_embd=256))


def timed_schedules(rank, world_size, x, repeats=3):
    """1F1B and the sequential baseline, alternating so both meet the same load."""
    runs = {"1f1b": [], "sequential": []}
    for _ in range(repeats):
        for s in runs:
            out = pipeline_worker(rank, world_size, BIG, s, x, x, 4, 0, 2)
            runs[s] += out["runs"][1:]  # the first step of each launch warms up
    return runs


@pytest.mark.distributed
def test_measured_1f1b_bubble_follows_the_formula():
    x = torch.randint(64, (64, 32), generator=torch.Generator().manual_seed(1))
    r0, r1 = launch(timed_schedules, 2, x)
    # the quietest of the timed steps: other processes on the machine only ever add
    # idle time
    measured = {s: min(bubble(a + b) for a, b in zip(r0[s], r1[s])) for s in r0}
    # 1F1B: (p-1)/(m+p-1) = 0.2; without pipelining (p-1)/p = 0.5. Messages and a
    # machine shared with other work add idle time, hence the tolerance; a schedule
    # that did not overlap the stages fails the second check.
    assert abs(measured["1f1b"] - bubble_fraction(2, 4)) < 0.2, measured
    assert abs(measured["sequential"] - bubble_fraction(2, 1)) < 0.2, measured
    assert measured["1f1b"] < measured["sequential"] - 0.1, measured


# ------------------------------------------------- no deadlock under NCCL


def recorded_batches(monkeypatch, schedule: str, p: int, m: int) -> list:
    """The batches of sends and receives every stage of run_pipeline hands to
    batch_isend_irecv, recorded without a process group."""
    cfg = GPTConfig(vocab_size=32, block_size=8, n_layer=4, n_head=2, n_embd=16)
    log: list = []

    def fake_batch(ops):
        log.append([("send" if op.op is dist.isend else "recv", op.peer) for op in ops])
        for op in ops:
            if op.op is dist.irecv:
                op.tensor.zero_()
        return [SimpleNamespace(wait=lambda: None) for _ in ops]

    monkeypatch.setattr(dist, "batch_isend_irecv", fake_batch)
    monkeypatch.setattr(dist, "P2POp", lambda op, t, peer, group: SimpleNamespace(
        op=op, tensor=t, peer=peer))
    monkeypatch.setattr(dist, "barrier", lambda group=None: None)
    out = []
    for s in range(p):
        torch.manual_seed(0)
        stage = pipeline.GPTStage(GPT(cfg), s, p)
        comm = SimpleNamespace(rank=s, world_size=p, group=None, stats=CommStats(),
                               global_rank=lambda r: r)
        log.clear()
        x = torch.randint(32, (2 * m, 8))
        pipeline.run_pipeline(stage, schedule, comm, x, x, m, (2, 8, 16))
        out.append(list(log))
    return out


def deadlocks(batches: list) -> bool:
    """Whether ranks that each run their batches in order get stuck, when every
    transfer needs sender and receiver in their current batch at once (NCCL without
    buffering: the strictest case)."""
    msgs = []  # per rank, per batch: the messages (src, dst, k) its ops take part in
    for s, bs in enumerate(batches):
        seen: dict = {}
        rank_msgs = []
        for b in bs:
            ids = []
            for kind, peer in b:
                key = (s, peer) if kind == "send" else (peer, s)
                k = seen.get((kind, key), 0)
                seen[(kind, key)] = k + 1
                ids.append(key + (k,))
            rank_msgs.append(ids)
        msgs.append(rank_msgs)
    pos, done = [0] * len(batches), set()
    while True:
        active = {i: set(msgs[i][pos[i]]) for i in range(len(msgs))
                  if pos[i] < len(msgs[i])}
        if not active:
            return False
        for i, mine in active.items():
            for msg in mine:
                peer = msg[1] if msg[0] == i else msg[0]
                if msg in active.get(peer, ()):
                    done.add(msg)
        moved = [i for i, mine in active.items() if mine <= done]
        if not moved:
            return True
        for i in moved:
            pos[i] += 1


@pytest.mark.parametrize("schedule,p,m", [("1f1b", 2, 4), ("1f1b", 4, 8),
                                          ("gpipe", 2, 4), ("sequential", 2, 3),
                                          ("1f1b", 3, 2)])
def test_sends_and_receives_cannot_deadlock_even_without_buffering(
        monkeypatch, schedule, p, m):
    batches = recorded_batches(monkeypatch, schedule, p, m)
    assert not deadlocks(batches)
    if schedule == "1f1b":
        # the same operations one by one, in the same order, would wait forever
        single = [[[op] for b in bs for op in b] for bs in batches]
        assert deadlocks(single)
