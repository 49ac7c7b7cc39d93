"""Pipeline schedules as action lists, and a simulator that plays them.

A pipeline of p ranks runs m micro-batches. A *schedule* says, for each rank, in
which order it runs its actions: ``Action("F", i, c)``, the forward of micro-batch i
through its model chunk c; ``Action("B", i, c)``, its backward; and, when the backward
is split in two, ``B`` computes only the gradient of the chunk's input (what the
previous stage waits for) and ``Action("W", i, c)`` the gradient of its weights
(which nobody waits for). Rank r's chunk c is *virtual stage* ``c * p + r`` of the
model's ``p * chunks`` consecutive pieces.

* GPipe (Huang et al. 2019): all forwards, then all backwards;
* 1F1B (PipeDream-Flush, Narayanan et al. 2021): p - r - 1 warm-up forwards, then
  one forward and one backward in turn;
* interleaved 1F1B (Narayanan et al. 2021, section 2.2): v chunks per rank, each
  micro-batch crosses every rank v times, the bubble shrinks v-fold;
* ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"): 1F1B with the
  backward split into B and W, rank r holding back r of its W's to fill the
  cool-down, the bubble cut by the W's share at 1F1B's memory;
* sequential: each micro-batch's forward and backward before the next (no overlap).
"""

from __future__ import annotations

from typing import NamedTuple


class Action(NamedTuple):
    """One step of a rank's schedule."""

    kind: str  # "F" forward, "B" backward (input gradient when split), "W" weights
    mb: int  # micro-batch
    chunk: int = 0  # which of the rank's model chunks (interleaved schedules)


def gpipe(stage: int, n_stages: int, n_micro: int) -> list[Action]:
    """All forwards, then all backwards."""
    return [Action("F", i) for i in range(n_micro)] + \
        [Action("B", i) for i in range(n_micro)]


def one_f_one_b(stage: int, n_stages: int, n_micro: int) -> list[Action]:
    """p - s - 1 warm-up forwards, then one forward / one backward, then cool-down."""
    warm = min(n_stages - stage - 1, n_micro)
    sched = [Action("F", i) for i in range(warm)]
    for i in range(warm, n_micro):
        sched += [Action("F", i), Action("B", i - warm)]
    return sched + [Action("B", i) for i in range(n_micro - warm, n_micro)]


def interleaved_1f1b(stage: int, n_stages: int, n_micro: int,
                     chunks: int = 2) -> list[Action]:
    """1F1B over ``chunks`` virtual stages per rank (Megatron's order, as
    ``torch.distributed.pipelining.ScheduleInterleaved1F1B``): micro-batches go in
    rounds of p, each round through chunk 0, then chunk 1, ...; backwards visit the
    chunks in reverse. The warm-up covers (chunks - 1) rounds plus two forwards per
    rank downstream."""
    p, v = n_stages, chunks
    if v < 1 or n_micro % p:
        raise ValueError(f"interleaved 1F1B needs chunks >= 1 (got {chunks}) and "
                         f"n_micro a multiple of n_stages (got {n_micro} and {p}): "
                         "micro-batches travel in rounds of one per stage")

    def nth(k: int, kind: str) -> Action:  # the k-th forward or backward of the rank
        c = (k // p) % v
        return Action(kind, (k // (p * v)) * p + k % p, c if kind == "F" else v - 1 - c)

    total = n_micro * v
    warm = min((v - 1) * p + 2 * (p - stage - 1), total)
    sched = [nth(k, "F") for k in range(warm)]
    for k in range(warm, total):
        sched += [nth(k, "F"), nth(k - warm, "B")]
    return sched + [nth(k, "B") for k in range(total - warm, total)]


def zb_h1(stage: int, n_stages: int, n_micro: int) -> list[Action]:
    """1F1B with each backward split into B and W: rank s runs a W only once it
    has s of them waiting, so later ranks keep their W's for the end of the step,
    where 1F1B leaves them idle, and every rank holds at most p micro-batches."""
    warm = min(n_stages - stage - 1, n_micro)
    sched = [Action("F", i) for i in range(warm)]
    waiting: list[int] = []  # micro-batches whose W is still to run

    def backward(i: int) -> None:
        sched.append(Action("B", i))
        waiting.append(i)
        if len(waiting) > stage:
            sched.append(Action("W", waiting.pop(0)))

    for i in range(warm, n_micro):
        sched.append(Action("F", i))
        backward(i - warm)
    for i in range(n_micro - warm, n_micro):
        backward(i)
    return sched + [Action("W", i) for i in waiting]


def sequential(stage: int, n_stages: int, n_micro: int) -> list[Action]:
    """No pipelining: each micro-batch's forward and backward before the next one;
    the baseline whose bubble is (p - 1) / p whatever m is."""
    return [a for i in range(n_micro) for a in (Action("F", i), Action("B", i))]


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "interleaved": interleaved_1f1b,
             "zbh1": zb_h1, "sequential": sequential}


def make_plan(schedule: str, stage: int, n_stages: int, n_micro: int,
              chunks: int = 1) -> list[Action]:
    """Stage ``stage``'s actions under ``schedule`` (a key of SCHEDULES)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got "
                         f"{schedule!r}")
    if not 0 <= stage < n_stages or n_micro < 1:
        raise ValueError(f"need 0 <= stage < n_stages and n_micro >= 1, got "
                         f"stage={stage}, n_stages={n_stages}, n_micro={n_micro}")
    if schedule == "interleaved":
        return interleaved_1f1b(stage, n_stages, n_micro, chunks)
    if chunks != 1:
        raise ValueError(f"chunks={chunks}: only 'interleaved' gives a rank several "
                         "model chunks")
    return SCHEDULES[schedule](stage, n_stages, n_micro)


def with_comms(plans: list[list[Action]], chunks: int = 1) -> list[list[Action]]:
    """Every rank's actions with its sends and receives in place.

    A send follows the action that produced its tensor: ``SEND_F`` (the forward's
    output) or ``SEND_B`` (the input gradient). Its receive (``RECV_F``/``RECV_B``,
    named by the receiver's micro-batch and chunk) is placed in the receiver's list
    at the same moment of one global order, in which every rank's actions run as
    soon as their inputs are there (as torch.distributed.pipelining places them).
    Each pair of ranks then sees the same messages in the same order, so the plan
    cannot deadlock even where a send waits for its receive (NCCL).
    """
    p, last = len(plans), len(plans) * chunks - 1
    out: list[list[Action]] = [[] for _ in range(p)]
    got: list[set] = [set() for _ in range(p)]
    pos = [0] * p
    while any(pos[r] < len(plans[r]) for r in range(p)):
        progress = False
        for r in range(p):
            if pos[r] == len(plans[r]):
                continue
            a = plans[r][pos[r]]
            k = a.chunk * p + r  # the virtual stage
            need = "RECV_F" if a.kind == "F" and k > 0 else \
                "RECV_B" if a.kind == "B" and k < last else None
            if need and (need, a.mb, a.chunk) not in got[r]:
                continue  # its input has not been sent yet
            out[r].append(a)
            pos[r], progress = pos[r] + 1, True
            for kind, to in (("F", k + 1), ("B", k - 1)):
                if a.kind == kind and 0 <= to <= last:
                    recv = Action("RECV_" + kind, a.mb, to // p)
                    out[r].append(Action("SEND_" + kind, a.mb, a.chunk))
                    out[to % p].append(recv)
                    got[to % p].add(recv)
        if not progress:
            raise RuntimeError("the plans deadlock: every rank waits for an input")
    return out


def in_flight(plan: list[Action]) -> int:
    """The most chunk-micro-batches whose activations ``plan`` holds at once: from
    a forward until its backward frees them, or its W when the backward is split."""
    split = any(a.kind == "W" for a in plan)
    held = peak = 0
    for a in plan:
        held += 1 if a.kind == "F" else -1 if a.kind == ("W" if split else "B") else 0
        peak = max(peak, held)
    return peak


def simulate(schedule: str, n_stages: int, n_micro: int, t_f: float = 1.0,
             t_b: float = 2.0, t_w: float | None = None, chunks: int = 1,
             t_p2p: float = 0.0, slowdown: list[float] | None = None) -> list[dict]:
    """Events of an ideal run: each rank runs its actions in order, each as soon as
    its input exists.

    ``t_f``, ``t_b``: one micro-batch's forward and whole backward through one rank's
    share of the model (a chunk takes 1/chunks of it); ``t_w``: the weight-gradient
    part of ``t_b`` when the schedule splits it (default half); ``t_p2p``: the time a
    message between ranks takes; ``slowdown``: per rank, a factor on its times.
    """
    p, v = n_stages, chunks
    slow = slowdown or [1.0] * p
    if len(slow) != p:
        raise ValueError(f"slowdown needs one factor per stage ({p}), got {len(slow)}")
    plans = [make_plan(schedule, s, p, n_micro, v) for s in range(p)]
    t_w = t_b / 2 if t_w is None else t_w
    split = any(a.kind == "W" for a in plans[0])
    length = {"F": t_f, "B": t_b - t_w if split else t_b, "W": t_w}
    done: dict[tuple, float] = {}
    free, pos, events = [0.0] * p, [0] * p, []
    while any(pos[s] < len(plans[s]) for s in range(p)):
        progress = False
        for s in range(p):
            if pos[s] == len(plans[s]):
                continue
            a = plans[s][pos[s]]
            k = a.chunk * p + s  # the virtual stage
            dep = {"F": ("F", k - 1, a.mb) if k > 0 else None,
                   "B": ("B", k + 1, a.mb) if k < p * v - 1 else ("F", k, a.mb),
                   "W": ("B", k, a.mb)}[a.kind]
            if dep is not None and dep not in done:
                continue  # waits for a neighbour
            ready = 0.0 if dep is None else done[dep] + (t_p2p if dep[1] % p != s
                                                          else 0.0)
            start = max(free[s], ready)
            end = start + length[a.kind] * slow[s] / v
            done[(a.kind, k, a.mb)] = free[s] = end
            events.append({"stage": s, "kind": a.kind, "mb": a.mb, "chunk": a.chunk,
                           "start": start, "end": end})
            pos[s] += 1
            progress = True
        if not progress:
            raise RuntimeError(f"schedule {schedule!r} deadlocks: every rank waits")
    return events


def bubble(events: list[dict]) -> float:
    """Share of stage-time spent idle between the first start and the last end."""
    stages = {e["stage"] for e in events}
    span = max(e["end"] for e in events) - min(e["start"] for e in events)
    busy = sum(e["end"] - e["start"] for e in events)
    return 1 - busy / (len(stages) * span)
