"""Pipeline schedules: action lists against torch.distributed.pipelining's, the
simulated bubble and memory against their formulas, sends and receives that cannot
deadlock, the split backward against the plain one, and real runs on 2 and 3
processes against one process and against torch's schedules."""

import copy
import functools
import statistics
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from book.workers.costmodel import bubble_fraction, in_flight_bound, pp_payload
from book.workers.pipeline import (dp_pp_worker, pipeline_worker, schedule_sweep,
                                   timed_sweep)
from llmcore.models.gpt import GPT, GPTConfig
from book.workers.launch import launch
from llmcore.parallel import pipeline
from llmcore.parallel.comm import CommStats
from llmcore.parallel.schedules import (bubble, in_flight, make_plan,
                                        simulate, with_comms)
from llmcore.parallel.split_backward import DeferredLinear, defer_weight_grads

CFG = GPTConfig(vocab_size=32, block_size=8, n_layer=4, n_head=2, n_embd=16)
MODEL = functools.partial(GPT, CFG)
X = torch.randint(32, (8, 8), generator=torch.Generator().manual_seed(1))
Y = torch.randint(32, (8, 8), generator=torch.Generator().manual_seed(2))
CASES = [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 3),
         ("zbh1", 1), ("sequential", 1)]


def one_process(model_fn=MODEL, x=X, y=Y) -> nn.Module:
    torch.manual_seed(0)
    model = model_fn()
    model(x, y)[1].backward()
    return model


# ------------------------------------------------- the action lists


@pytest.mark.parametrize("schedule,v", CASES)
@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (3, 6), (4, 4)])
def test_each_action_runs_once_after_what_it_needs(schedule, v, p, m):
    for s in range(p):
        plan = make_plan(schedule, s, p, m, v)
        kinds = "FBW" if schedule == "zbh1" else "FB"
        assert sorted(plan) == sorted((k, i, c) for k in kinds for i in range(m)
                                      for c in range(v))
        for i in range(m):
            for c in range(v):
                at = [plan.index((k, i, c)) for k in kinds]
                assert at == sorted(at), (s, i, c)  # F before B before W


@pytest.mark.parametrize("schedule,v", CASES)
@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (3, 6), (4, 12), (8, 16)])
@pytest.mark.parametrize("t_f,t_b,t_w", [(1, 2, 1), (1, 2, 0.6), (1.5, 2, 0.8),
                                         (0.5, 3, 2)])  # W longer than F and B
def test_simulated_bubble_and_memory_follow_the_formulas(schedule, v, p, m, t_f, t_b,
                                                          t_w):
    events = simulate(schedule, p, m, t_f, t_b, t_w, chunks=v)
    assert bubble(events) == pytest.approx(
        bubble_fraction(p, m, schedule, v, t_f, t_b, t_w), abs=1e-12)
    for s in range(p):
        held = in_flight(make_plan(schedule, s, p, m, v)) / v
        assert held == pytest.approx(in_flight_bound(p, m, s, schedule, v))


def test_the_new_schedules_beat_1f1b_at_its_memory_or_a_little_more():
    p, m = 4, 8
    assert bubble_fraction(p, m, "interleaved", 2) < bubble_fraction(p, m)
    assert bubble_fraction(p, m, "zbh1") == pytest.approx(
        bubble_fraction(p, m) / (3 - 2 * bubble_fraction(p, m)))  # 1/3 of its idle
    assert in_flight_bound(p, m, 0, "zbh1") == in_flight_bound(p, m, 0, "1f1b")
    assert in_flight_bound(p, m, 0, "interleaved", 2) == 5.5  # p (1 + 1/v) - 1/v


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="multiple of n_stages"):
        make_plan("interleaved", 0, 4, 6, 2)
    with pytest.raises(ValueError, match="only 'interleaved'"):
        make_plan("1f1b", 0, 2, 4, 2)
    with pytest.raises(ValueError, match="schedule must be one of"):
        make_plan("zb-v", 0, 2, 4)
    with pytest.raises(ValueError, match="n_micro >= n_stages"):
        bubble_fraction(4, 2, "zbh1")
    with pytest.raises(ValueError, match="slowdown"):
        simulate("1f1b", 2, 4, slowdown=[1.0])


def test_a_slow_last_stage_sets_the_pace():
    even = bubble(simulate("1f1b", 4, 8))
    slow = simulate("1f1b", 4, 8, slowdown=[1, 1, 1, 1.5])
    assert bubble(slow) > even
    idle = {s: 1 - sum(e["end"] - e["start"] for e in slow if e["stage"] == s)
            / max(e["end"] for e in slow) for s in range(4)}
    assert min(idle, key=idle.get) == 3  # the slow stage idles least


# ------------------------------------------------- sends and receives


def deadlocks(sequences: list[list[tuple[str, int]]]) -> bool:
    """Whether ranks that post their ("send" | "recv", peer) operations in order get
    stuck, when every transfer needs sender and receiver at it at once (a send that
    waits for its receive, as NCCL may: the strictest case)."""
    msgs = []  # per rank, the messages (src, dst, k) in order
    for s, ops in enumerate(sequences):
        seen: dict = {}
        mine = []
        for kind, peer in ops:
            key = (s, peer) if kind == "send" else (peer, s)
            seen[kind, key] = seen.get((kind, key), -1) + 1
            mine.append(key + (seen[kind, key],))
        msgs.append(mine)
    pos = [0] * len(msgs)
    while any(pos[i] < len(msgs[i]) for i in range(len(msgs))):
        moved = False
        for i, mine in enumerate(msgs):
            if pos[i] == len(mine):
                continue
            msg = mine[pos[i]]
            j = msg[1] if msg[0] == i else msg[0]
            if pos[j] < len(msgs[j]) and msgs[j][pos[j]] == msg:
                pos[i], pos[j], moved = pos[i] + 1, pos[j] + 1, True
        if not moved:
            return True
    return False


def comm_ops(ops: list, r: int, p: int) -> list[tuple[str, int]]:
    peer = {"SEND_F": ("send", 1), "SEND_B": ("send", -1), "RECV_F": ("recv", -1),
            "RECV_B": ("recv", 1)}
    return [(peer[a.kind][0], (r + peer[a.kind][1]) % p) for a in ops
            if a.kind in peer]


def naive_ops(plan, r: int, p: int, v: int) -> list[tuple[str, int]]:
    """Each receive just before the action that needs it, each send just after."""
    out, last = [], p * v - 1
    for a in plan:
        k = a.chunk * p + r
        prev, nxt = ("recv", (r - 1) % p), ("send", (r + 1) % p)
        if a.kind == "F":
            out += [prev] * (k > 0) + [nxt] * (k < last)
        if a.kind == "B":
            out += [("recv", (r + 1) % p)] * (k < last)
            out += [("send", (r - 1) % p)] * (k > 0)
    return out


@pytest.mark.parametrize("schedule,v", CASES)
@pytest.mark.parametrize("p,m", [(2, 4), (3, 6), (4, 8), (4, 4)])
def test_placed_sends_and_receives_cannot_deadlock(schedule, v, p, m):
    plans = [make_plan(schedule, r, p, m, v) for r in range(p)]
    placed = with_comms(plans, v)
    assert [[a for a in ops if "_" not in a.kind] for ops in placed] == plans
    assert not deadlocks([comm_ops(ops, r, p) for r, ops in enumerate(placed)])
    if schedule not in ("gpipe", "sequential"):
        # receiving only where an input is needed would wait forever
        assert deadlocks([naive_ops(plan, r, p, v) for r, plan in enumerate(plans)])


@pytest.mark.parametrize("schedule,v", [("1f1b", 1), ("interleaved", 2), ("zbh1", 1)])
def test_run_pipeline_posts_the_placed_operations(monkeypatch, schedule, v):
    p, m = 3, 6
    log: list = []

    def fake(kind):
        def op(t, peer, group=None):
            log.append((kind, peer))
            if kind == "recv":
                t.zero_()
            return SimpleNamespace(wait=lambda: None)
        return op

    def forbidden(*args, **kwargs):
        raise AssertionError("an untimed step waited for the device or the ranks")

    monkeypatch.setattr(dist, "isend", fake("send"))
    monkeypatch.setattr(dist, "irecv", fake("recv"))
    monkeypatch.setattr(dist, "barrier", forbidden)
    monkeypatch.setattr(torch.cuda, "synchronize", forbidden)
    cfg = GPTConfig(vocab_size=32, block_size=8, n_layer=p * v, n_head=2, n_embd=16)
    plans = [make_plan(schedule, r, p, m, v) for r in range(p)]
    for r, ops in enumerate(with_comms(plans, v)):
        stages = nn.ModuleList(pipeline.GPTStage(GPT(cfg), c * p + r, p * v)
                               for c in range(v))
        store = defer_weight_grads(stages) if schedule == "zbh1" else None
        comm = SimpleNamespace(rank=r, world_size=p, group=None, stats=CommStats(),
                               global_rank=lambda q: q)
        log.clear()
        x = torch.randint(32, (2 * m, 8))
        out = pipeline.run_pipeline(stages, schedule, comm, x, x, m, (2, 8, 16),
                                    weight_grads=store)
        assert log == comm_ops(ops, r, p)
        assert out["events"] == []  # no clock: nothing timed, nothing waited for
        assert out["peak_in_flight"] == in_flight(plans[r])
    with pytest.raises(ValueError, match="weight_grads"):
        pipeline.run_pipeline(stages[0], "zbh1", comm, x, x, m, (2, 8, 16))


# ------------------------------------------------- the split backward


def test_split_backward_gives_the_plain_gradients_later():
    cfg = GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16,
                    bias=True)
    torch.manual_seed(0)
    model = GPT(cfg)
    ref = copy.deepcopy(model)
    ref(X, Y)[1].backward()
    names = [n for n, _ in model.named_parameters()]
    store = defer_weight_grads(model)
    assert [n for n, _ in model.named_parameters()] == names
    assert isinstance(model.blocks[0].ffn.linear1, DeferredLinear)
    assert model.lm_head.weight is model.tok_emb.weight  # still tied
    with store.capture("mb0"):
        model(X, Y)[1].backward()
    lin = model.blocks[0].ffn.linear1
    assert lin.weight.grad is None and lin.bias.grad is None  # waiting for W
    # W keeps each linear's input and output gradient: (B, T, in) + (B, T, out)
    widths = [(m.in_features + m.out_features) for m in model.modules()
              if isinstance(m, DeferredLinear)]
    assert store.held_bytes("mb0") == 4 * X.numel() * sum(widths)
    store.run("mb0")
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=n)
    with pytest.raises(KeyError, match="run its B first"):
        store.run("mb0")
    model.zero_grad()
    model(X, Y)[1].backward()  # outside a capture: an ordinary backward
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


# ------------------------------------------------- real runs


def grads_of(ranks, key):
    return {n: g for r in ranks for n, g in r[key]["grads"].items()}


@pytest.mark.distributed
def test_every_schedule_matches_one_process_and_torch_pipelining():
    model = one_process()
    ranks = launch(schedule_sweep, 2, MODEL, X, Y, 4)
    for s in ("gpipe", "1f1b", "interleaved", "zbh1"):
        v = 2 if s == "interleaved" else 1
        assert abs(ranks[1][s]["loss"] - model(X, Y)[1].item()) < 1e-5
        grads = grads_of(ranks, s)
        assert sorted(grads) == sorted(n for n, _ in model.named_parameters())
        for n, p in model.named_parameters():
            assert (grads[n] - p.grad).abs().max() < 1e-5, (s, n)
        for r, out in enumerate(ranks):
            mine, theirs = out[s], out[s]["torch"]
            for n, g in theirs["grads"].items():  # torch's schedule, same gradients
                assert (g - mine["stage_grads"][n]).abs().max() < 1e-5, (s, n)
            if s != "1f1b":  # torch's Schedule1F1B keeps no plan to compare
                assert theirs["order"] == make_plan(s, r, 2, 4, v), (s, r)
            assert mine["payload"] == pytest.approx(pp_payload(8, 8, 16, r, 2,
                                                               chunks=v))
            assert mine["peak_in_flight"] == in_flight_bound(2, 4, r, s, v) * v


def three_stages(rank, world_size):
    return {s: pipeline_worker(rank, world_size, MODEL6, s, X6, X6, 3,
                               chunks=2 if s == "interleaved" else 1)
            for s in ("1f1b", "interleaved", "zbh1")}


MODEL6 = functools.partial(GPT, GPTConfig(vocab_size=32, block_size=8, n_layer=6,
                                          n_head=2, n_embd=16))
X6 = torch.randint(32, (6, 8), generator=torch.Generator().manual_seed(3))


@pytest.mark.distributed
def test_three_ranks_pass_chunks_round_the_ring():
    model = one_process(MODEL6, X6, X6)
    ranks = launch(three_stages, 3)
    for s in ("1f1b", "interleaved", "zbh1"):
        grads = grads_of(ranks, s)
        for n, p in model.named_parameters():
            assert (grads[n] - p.grad).abs().max() < 1e-5, (s, n)
    assert [r["zbh1"]["peak_in_flight"] for r in ranks] == [3, 3, 3]
    assert [r["1f1b"]["peak_in_flight"] for r in ranks] == [3, 2, 1]


@pytest.mark.distributed
def test_data_times_pipeline_parallel_on_four_ranks():
    model = one_process()
    ranks = launch(dp_pp_worker, 4, MODEL, X, Y, 2)
    assert [r["coords"] for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for row in (ranks[:2], ranks[2:]):
        grads = {**row[0]["grads"], **row[1]["grads"]}
        assert sorted(grads) == sorted(n for n, _ in model.named_parameters())
        for n, p in model.named_parameters():
            assert (grads[n] - p.grad).abs().max() < 1e-5, n


# wide enough that a micro-batch's compute outweighs its messages
BIG = functools.partial(GPT, GPTConfig(vocab_size=64, block_size=32, n_layer=4,
                                       n_head=4, n_embd=192))


@pytest.mark.distributed
def test_measured_bubbles_follow_the_formulas():
    x = torch.randint(64, (32, 32), generator=torch.Generator().manual_seed(1))
    schedules = {"1f1b": 1, "zbh1": 1, "sequential": 1}
    r0, r1 = launch(timed_sweep, 2, BIG, x, x, 4, schedules, 2)
    measured, formula = {}, {}
    for s, v in schedules.items():
        # the quietest step: other processes on the machine only ever add idle time
        events = min((a + b for a, b in zip(r0[s], r1[s])), key=bubble)
        t = {k: statistics.mean(e["end"] - e["start"] for e in events
                                if e["kind"] == k) for k in "FBW" if
             any(e["kind"] == k for e in events)}
        t_b = t["B"] + t.get("W", 0.0)
        measured[s] = bubble(events)
        formula[s] = bubble_fraction(2, 4, s, v, t["F"], t_b, t.get("W"))
    # messages and a shared machine add idle time, hence the tolerance; a schedule
    # that did not overlap the stages fails the ordering
    for s in schedules:
        assert abs(measured[s] - formula[s]) < 0.2, (measured, formula)
    assert measured["1f1b"] < measured["sequential"] - 0.1, measured
