"""How long a training step of a parallel plan takes: compute, messages, bubble,
overlap.

The byte counts of :mod:`book.workers.costmodel` become seconds with three models:

* compute: a rank's share of the step's FLOPs at the device's sustained rate, plus a
  fixed time per step that does not shrink with the work (operator dispatch, small
  kernels), plus the optimizer's pass over its parameters (memory bound);
* every collective with the alpha-beta (Hockney) model: a ring of n ranks takes
  ``steps * alpha + wire_bytes / bandwidth``, where all-reduce has 2(n-1) steps and
  moves 2(n-1)/n of the payload, all-gather and reduce-scatter (n-1) steps and
  (n-1)/n, a send one step and the whole message (Patarasuk & Yuan 2009);
* the pipeline: m slots of one micro-batch's forward and backward plus the idle
  time of the plan's schedule (:func:`book.workers.costmodel.bubble_fraction`:
  (p - 1) slots for 1F1B or GPipe, Narayanan et al. 2021), and overlap: bucketed
  all-reduce behind backward (Li et al. 2020), FSDP's prefetched all-gathers behind
  the blocks' compute.

Processes sharing fewer cores than there are ranks (``Device.cores``) each get
``cores / ranks`` of the compute rate: the oversubscription of a small machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from book.workers.costmodel import Plan, bubble_fraction, tp_payload, zero_payload
from book.workers.memory import gpt_param_count
from llmcore.accounting import flops_per_token
from llmcore.config import check_fields
from llmcore.parallel.comm import wire_bytes

OPS = ("all_reduce", "reduce_scatter", "all_gather", "send")


def ring_steps(op: str, n: int) -> int:
    """Latency terms of ``op`` on a ring of ``n`` ranks."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return {"all_reduce": 2 * (n - 1), "send": 1}.get(op, n - 1)


@dataclass(frozen=True)
class Link:
    """alpha-beta model of one link: latency per message step, bandwidth per rank."""

    alpha: float  # seconds of latency per ring step
    bandwidth: float  # bytes per second one rank sends

    def __post_init__(self):
        if self.alpha < 0 or self.bandwidth <= 0:
            raise ValueError(f"Link needs alpha >= 0 and bandwidth > 0, got "
                             f"alpha={self.alpha}, bandwidth={self.bandwidth}")

    def time(self, op: str, payload: float, n: int, messages: int = 1) -> float:
        """Seconds for ``messages`` calls of ``op`` carrying ``payload`` bytes."""
        if n <= 1 or payload <= 0:
            return 0.0
        return (messages * ring_steps(op, n) * self.alpha
                + wire_bytes(op, payload, n) / self.bandwidth)


def fabric(link: Link | dict) -> dict:
    """One Link per collective: a measured table, or the same link for every op."""
    if isinstance(link, Link):
        return {op: link for op in OPS}
    missing = set(OPS) - set(link)
    if missing:
        raise ValueError(f"the link table lacks {sorted(missing)}")
    return dict(link)


@dataclass(frozen=True)
class Device:
    """What one rank computes per second."""

    name: str
    flops: float  # sustained FLOP/s of a training step on one rank
    fixed_s: float = 0.0  # seconds per forward+backward of the whole model that do not
    # shrink with the batch (dispatch, small ops); per micro-batch
    adam_s_per_param: float = 0.0  # seconds of the optimizer step per parameter
    cores: int = 0  # cores all ranks share (a CPU); 0: every rank has its own device

    def __post_init__(self):
        check_fields(self, "flops", above=0)

    def slowdown(self, ranks: int) -> float:
        """How much slower each rank computes when ``ranks`` share ``cores``."""
        return max(1.0, ranks / self.cores) if self.cores else 1.0


@dataclass(frozen=True)
class Cluster:
    """Devices in nodes: fast links inside a node, slower ones between nodes."""

    device: Device
    intra: dict = field(default_factory=dict)  # op -> Link inside a node
    inter: dict = field(default_factory=dict)  # op -> Link between nodes
    per_node: int = 8  # ranks per node

    def __post_init__(self):
        object.__setattr__(self, "intra", fabric(self.intra))
        object.__setattr__(self, "inter", fabric(self.inter or self.intra))

    def links(self, span: int) -> dict:
        """The links of a group whose ranks lie within ``span`` consecutive ranks."""
        return self.intra if span <= self.per_node else self.inter


def _sum(lk: dict, ops: dict, n: int, messages: dict) -> float:
    return sum(lk[op].time(op, b, n, messages.get(op, 1)) for op, b in ops.items())


def step_time(cfg, plan: Plan, batch: int, seq: int, cluster: Cluster, *,
              dp_messages: int | None = None, bucket_mb: float = 25.0,
              prefetch: bool = True, grad_bytes: int = 4, act_bytes: int = 4,
              vocab_parallel: bool = True) -> dict:
    """Seconds of one training step of ``plan`` and their parts.

    ``batch`` is the global batch (sequences of ``seq`` tokens). Pipeline plans run
    ``plan.micro_batches`` micro-batches with ``plan.schedule``. ``dp_messages``:
    calls per collective of the data-parallel traffic: by default one per gradient
    bucket of ``bucket_mb`` (DDP) and one per block for ZeRO (FSDP's units); a
    per-tensor implementation passes its tensor count. ``prefetch``: ZeRO-3 gathers
    the next unit while the current one computes.
    """
    dev, tp, pp, dp, m = cluster.device, plan.tp, plan.pp, plan.dp, plan.micro_batches
    if batch % (dp * m):
        raise ValueError(f"batch={batch} must divide into dp={dp} x micro_batches={m}")
    slow = dev.slowdown(plan.world_size)
    n = gpt_param_count(cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.block_size,
                        bias=getattr(cfg, "bias", True))
    local = n / (tp * pp)
    mb = batch // (dp * m)  # sequences per micro-batch
    flops = mb * seq * flops_per_token(cfg, seq)  # one micro-batch, whole model
    t_mb = slow * (dev.fixed_s / pp + flops / (tp * pp) / dev.flops)
    tp_lk = cluster.links(tp)
    t_tp = 0.0
    if tp > 1:
        layers = cfg.n_layer // pp
        ops = tp_payload(mb, seq, cfg.n_embd, layers, cfg.vocab_size, act_bytes,
                         vocab_parallel)
        msgs = {"all_reduce": 4 * layers + 2 * vocab_parallel, "all_gather": 1}
        t_tp = _sum(tp_lk, ops, tp, msgs)
    t_pp = 0.0
    if pp > 1:  # an activation forward and its gradient back, per micro-batch and
        act = mb * seq * cfg.n_embd * act_bytes  # chunk (interleaving sends more)
        t_pp = 2 * plan.chunks * cluster.links(tp * pp)["send"].time("send", act, 2)
    slot = t_mb + t_tp + t_pp
    bubble = 0.0
    if pp > 1:  # idle / busy = f / (1 - f) for the schedule's bubble fraction f
        f = bubble_fraction(pp, m, plan.schedule, plan.chunks)
        bubble = f / (1 - f) * m * slot
    busy = m * slot + bubble
    if pp > 1:  # first and last stage share the tied embedding: sum its gradients
        busy += cluster.links(tp * pp)["all_reduce"].time(
            "all_reduce", cfg.vocab_size * cfg.n_embd / tp * grad_bytes, 2)
    dp_lk = cluster.links(plan.world_size)
    t_dp, exposed = 0.0, 0.0
    if dp > 1:
        ops = zero_payload(plan.zero, round(local), grad_bytes,
                           root_params=round((cfg.vocab_size + cfg.block_size)
                                             * cfg.n_embd / (tp * pp)))
        if plan.zero == 0:
            buckets = math.ceil(local * grad_bytes / (bucket_mb * 2**20))
            msgs = dp_messages or buckets
            t_dp = _sum(dp_lk, ops, dp, {"all_reduce": msgs})
            backward = 2 / 3 * m * t_mb  # backward is about twice the forward
            last = t_dp / msgs
            exposed = last + max(0.0, t_dp - last - backward * (msgs - 1) / msgs)
        else:
            units = cfg.n_layer // pp + 1
            msgs = dp_messages or units
            gathers = 2 * msgs - 1 if plan.zero == 3 else msgs
            t_dp = _sum(dp_lk, ops, dp, {"reduce_scatter": msgs,
                                          "all_gather": gathers})
            exposed = t_dp
            if plan.zero == 3 and prefetch:  # all but the first gather hide
                exposed = t_dp / gathers + max(0.0, t_dp - busy)
    opt_params = local / dp if plan.zero else local
    t_opt = slow * dev.adam_s_per_param * opt_params
    total = busy + exposed + t_opt
    return {"total": total, "compute": m * t_mb, "tp": m * t_tp, "pp": m * t_pp,
            "bubble": bubble, "dp": t_dp, "dp_exposed": exposed, "optimizer": t_opt,
            "slowdown": slow}


def scaling_efficiency(cfg, plan: Plan, batch_per_replica: int, seq: int,
                       cluster: Cluster, **kw) -> float:
    """Throughput of ``plan`` over that of its ranks each computing alone: ideal
    weak scaling is 1 (same work per replica, no communication, no bubble)."""
    t = step_time(cfg, plan, batch_per_replica * plan.dp, seq, cluster, **kw)["total"]
    alone = batch_per_replica * plan.dp * seq * flops_per_token(cfg, seq) / (
        plan.world_size * cluster.device.flops)
    return alone / t
