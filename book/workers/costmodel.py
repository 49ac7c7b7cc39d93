"""What a parallel plan costs: memory per rank and bytes communicated per step.

Closed-form counts for a GPT (``llmcore.models.gpt.GPTConfig``) trained with Adam:

* training state: 16 bytes per parameter in mixed precision (ZeRO paper, section 3),
  divided by the sharding of each scheme;
* communication *payload* per step and rank, per collective, exactly as
  ``llmcore.parallel.comm.Comm`` counts it, so the tests compare prediction and
  measurement byte for byte; :func:`llmcore.parallel.comm.wire_bytes` turns a payload
  into bytes on the wire for a ring;
* the pipeline bubble of each schedule of :mod:`llmcore.parallel.schedules` and the
  micro-batches whose activations a stage holds at once;
* memory per rank: the state plus the activations in flight
  (:mod:`book.workers.activations`).

:mod:`book.workers.steptime` turns the bytes into seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from book.workers.activations import activation_bytes
from book.workers.memory import gpt_param_count, zero_state_bytes
from llmcore.config import check_fields
from llmcore.parallel.comm import wire_bytes


def dp_payload(n_params: int, grad_bytes: int = 4) -> dict[str, float]:
    """Data parallel: one all-reduce of every gradient."""
    return {"all_reduce": grad_bytes * n_params}


def zero_payload(stage: int, n_params: int, param_bytes: int = 4,
                 root_params: int = 0) -> dict[str, float]:
    """ZeRO: reduce-scatter the gradients, all-gather the parameters.

    Stages 1-2 gather the updated parameters once; stage 3 gathers each unit before
    its forward and again before its backward, except the ``root_params`` that stay
    gathered from the root's forward to its backward.
    """
    if stage == 0:
        return dp_payload(n_params, param_bytes)
    gathers = 1 if stage in (1, 2) else 2
    return {"reduce_scatter": param_bytes * n_params,
            "all_gather": param_bytes * (gathers * n_params
                                         - (gathers - 1) * root_params)}


def tp_payload(batch: int, seq: int, n_embd: int, n_layer: int, vocab_size: int,
               act_bytes: int = 4, vocab_parallel: bool = True) -> dict[str, float]:
    """Megatron tensor parallelism of a GPT, per training step (forward + backward).

    Each block all-reduces (B, T, C) twice forward (after attention and MLP, the g
    operator) and twice backward (the f operator before them). A vocabulary-parallel
    embedding adds one forward all-reduce, the parallel head one backward all-reduce
    and the all-gather of the logits (B, T, V).
    """
    act = batch * seq * n_embd * act_bytes
    out = {"all_reduce": 4 * n_layer * act}
    if vocab_parallel:
        out["all_reduce"] += 2 * act
        out["all_gather"] = batch * seq * vocab_size * act_bytes
    return out


def pp_payload(batch: int, seq: int, n_embd: int, stage: int, n_stages: int,
               act_bytes: int = 4, chunks: int = 1) -> dict[str, float]:
    """Pipeline: each of a rank's chunks (virtual stage c * p + stage) sends its
    output activations forward unless it is the last, and the gradient of its input
    backward unless it is the first; all micro-batches together are the batch."""
    act = batch * seq * n_embd * act_bytes
    last = n_stages * chunks - 1
    ks = [c * n_stages + stage for c in range(chunks)]
    sent = act * (sum(k < last for k in ks) + sum(k > 0 for k in ks))
    return {"send": sent} if sent else {}


def bubble_fraction(n_stages: int, n_micro: int, schedule: str = "1f1b",
                    chunks: int = 1, t_f: float = 1.0, t_b: float = 2.0,
                    t_w: float | None = None) -> float:
    """Idle share of a pipeline step with equal stages and free messages.

    GPipe and 1F1B: (p - 1) / (m + p - 1) (Huang et al. 2019); interleaved 1F1B
    with v chunks per rank: (p - 1) / (v m + p - 1) (Narayanan et al. 2021);
    sequential: (p - 1) / p. ZB-H1 (Qi et al. 2023), with ``t_b`` the whole backward
    and ``t_w`` its weight-gradient part (default half), so that B takes
    t_B = t_b - t_w: each stage idles (p - 1)(t_f + t_B - t_w) of a step that
    computes m (t_f + t_b), as long as W is no longer than F and B (the paper's
    case); past that the W's no longer fit the gaps and the idle time is
    (p - 1) max(t_f + t_B - t_w, t_f, t_B), for m >= p.
    """
    p, m = n_stages, n_micro
    for name, value in (("n_stages", p), ("n_micro", m), ("chunks", chunks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if schedule == "interleaved":
        return (p - 1) / (chunks * m + p - 1)
    if schedule == "sequential":
        return (p - 1) / p
    if schedule != "zbh1":
        raise ValueError(f"bubble_fraction knows gpipe, 1f1b, interleaved, zbh1 and "
                         f"sequential, not {schedule!r}")
    if m < p:
        raise ValueError(f"the ZB-H1 formula holds for n_micro >= n_stages, got "
                         f"n_micro={m} and n_stages={p}")
    t_w = t_b / 2 if t_w is None else t_w
    t_in = t_b - t_w  # B: the input gradient
    idle = (p - 1) * max(t_f + t_in - t_w, t_f, t_in)
    return idle / (m * (t_f + t_b) + idle)


def in_flight_bound(n_stages: int, n_micro: int, stage: int, schedule: str = "1f1b",
                    chunks: int = 1) -> float:
    """Micro-batches whose activations stage ``stage`` holds at most (a chunk's
    counting 1/chunks): GPipe m; 1F1B min(p - s, m); ZB-H1 min(p, m), its W's held
    back on the later stages; interleaved ((v - 1) p + 2 (p - s) - 1) / v chunks'
    worth, at most m; sequential 1."""
    p, m, s, v = n_stages, n_micro, stage, chunks
    bounds = {"gpipe": m, "1f1b": min(p - s, m), "zbh1": min(p, m), "sequential": 1,
              "interleaved": min((v - 1) * p + 2 * (p - s) - 1, v * m) / v}
    if schedule not in bounds:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {list(bounds)}")
    return bounds[schedule]


@dataclass(frozen=True)
class Plan:
    """A hybrid layout: dp x tp x pp ranks, ZeRO stage inside the dp group."""

    dp: int = 1  # data-parallel replicas (or ZeRO shards)
    tp: int = 1  # tensor-parallel ranks: each holds 1/tp of every block
    pp: int = 1  # pipeline stages: each holds n_layer/pp blocks
    zero: int = 0  # ZeRO stage within the dp group (0 = plain data parallel)
    micro_batches: int = 1  # per step, for the pipeline bubble
    schedule: str = "1f1b"  # pipeline schedule: gpipe, 1f1b, interleaved or zbh1
    chunks: int = 1  # model chunks per pipeline rank (interleaved 1F1B)

    def __post_init__(self):
        check_fields(self, "dp", "tp", "pp", "micro_batches", "chunks", integer=True,
                     above=0)
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"Plan.zero must be 0-3, got {self.zero!r}")
        if self.schedule not in ("gpipe", "1f1b", "interleaved", "zbh1"):
            raise ValueError(f"Plan.schedule must be gpipe, 1f1b, interleaved or "
                             f"zbh1, got {self.schedule!r}")
        if self.chunks > 1 and self.schedule != "interleaved":
            raise ValueError(f"Plan.chunks={self.chunks} needs schedule='interleaved'")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp


def estimate(cfg, plan: Plan, batch: int, seq: int, act_bytes: int = 2) -> dict:
    """Memory (bytes of training state) and wire bytes per rank per step for ``plan``.

    ``cfg`` has vocab_size, block_size, n_layer, n_embd (a GPTConfig); ``batch`` is the
    global batch. Model-parallel splits divide the state evenly (embeddings included),
    which is the usual first-order estimate.
    """
    n = gpt_param_count(cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.block_size,
                        bias=getattr(cfg, "bias", True))
    local = n / (plan.tp * plan.pp)
    state = zero_state_bytes(round(local), plan.zero, plan.dp)
    local_batch = batch // plan.dp
    dp = zero_payload(plan.zero, round(local), 2) if plan.dp > 1 else {}
    tp = (tp_payload(local_batch, seq, cfg.n_embd, cfg.n_layer // plan.pp,
                     cfg.vocab_size, act_bytes) if plan.tp > 1 else {})
    pp = pp_payload(local_batch, seq, cfg.n_embd, 1 if plan.pp > 2 else 0, plan.pp,
                    act_bytes) if plan.pp > 1 else {}
    wire = {
        "dp": sum(wire_bytes(op, b, plan.dp) for op, b in dp.items()),
        "tp": sum(wire_bytes(op, b, plan.tp) for op, b in tp.items()),
        "pp": sum(wire_bytes(op, b, 2) for op, b in pp.items()),
    }
    return {"params": n, "state_bytes": state, "wire_bytes": wire,
            "bubble": bubble_fraction(plan.pp, plan.micro_batches, plan.schedule,
                                      plan.chunks) if plan.pp > 1 else 0.0}


def memory_per_rank(cfg, plan: Plan, batch: int, seq: int, act_bytes: int = 2,
                    checkpoint_every: int = 0) -> dict:
    """Bytes per rank: training state (mixed-precision Adam, sharded by the plan) and
    the activations of the micro-batches in flight on the first pipeline stage (the
    one that holds most, :func:`in_flight_bound`), with tensor parallelism splitting
    what lies between its matmuls."""
    state = estimate(cfg, plan, batch, seq, act_bytes)["state_bytes"]
    micro = batch // (plan.dp * plan.micro_batches)
    local = replace(cfg, n_layer=max(1, cfg.n_layer // plan.pp))
    in_flight = in_flight_bound(plan.pp, plan.micro_batches, 0, plan.schedule,
                                plan.chunks) if plan.pp > 1 else 1
    acts = in_flight * activation_bytes(local, micro, seq, act_bytes, checkpoint_every,
                                        tp=plan.tp)
    return {"state": state, "activations": acts, "total": state + acts}


def powersgd_payload(shapes, rank: int, min_compression_rate: float = 2.0) -> int:
    """Elements one PowerSGD step all-reduces for gradients of these shapes: (n + m) r
    per compressed matrix, everything for the rest (the rule of
    ``llmcore.parallel.compression.powersgd_hook``)."""
    total = 0
    for shape in shapes:
        n = shape[0]
        m = math.prod(shape[1:])  # 1 for a vector
        r = min(n, m, rank)
        total += (n + m) * r if (n + m) * r * min_compression_rate < n * m else n * m
    return total
