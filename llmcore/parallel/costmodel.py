"""What a parallel plan costs: memory per rank and bytes communicated per step.

Closed-form counts for a GPT (``llmcore.models.gpt.GPTConfig``) trained with Adam:

* training state: 16 bytes per parameter in mixed precision (ZeRO paper, section 3),
  divided by the sharding of each scheme;
* communication *payload* per step and rank, per collective, exactly as
  ``llmcore.parallel.comm.Comm`` counts it, so the tests compare prediction and
  measurement byte for byte; :func:`llmcore.parallel.comm.wire_bytes` turns a payload
  into bytes on the wire for a ring;
* the pipeline bubble (p - 1) / (m + p - 1) of GPipe and 1F1B (Huang et al. 2019;
  Narayanan et al. 2021);
* memory per rank: the state plus the activations in flight
  (:mod:`llmcore.parallel.activations`).

:mod:`llmcore.parallel.steptime` turns the bytes into seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from llmcore.accounting import gpt_param_count, zero_state_bytes
from llmcore.config import check_fields
from llmcore.parallel.activations import activation_bytes
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
               act_bytes: int = 4) -> dict[str, float]:
    """Pipeline: a stage sends its output activations forward (all micro-batches
    together are the batch) and the gradient of its input backward."""
    act = batch * seq * n_embd * act_bytes
    sent = act * (stage < n_stages - 1) + act * (stage > 0)
    return {"send": sent} if sent else {}


def bubble_fraction(n_stages: int, n_micro: int) -> float:
    """Idle fraction of a GPipe or 1F1B step: (p - 1) / (m + p - 1)."""
    return (n_stages - 1) / (n_micro + n_stages - 1)


@dataclass(frozen=True)
class Plan:
    """A hybrid layout: dp x tp x pp ranks, ZeRO stage inside the dp group."""

    dp: int = 1  # data-parallel replicas (or ZeRO shards)
    tp: int = 1  # tensor-parallel ranks: each holds 1/tp of every block
    pp: int = 1  # pipeline stages: each holds n_layer/pp blocks
    zero: int = 0  # ZeRO stage within the dp group (0 = plain data parallel)
    micro_batches: int = 1  # per step, for the pipeline bubble

    def __post_init__(self):
        check_fields(self, "dp", "tp", "pp", "micro_batches", integer=True, above=0)
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"Plan.zero must be 0-3, got {self.zero!r}")

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
            "bubble": bubble_fraction(plan.pp, plan.micro_batches)}


def memory_per_rank(cfg, plan: Plan, batch: int, seq: int, act_bytes: int = 2,
                    checkpoint_every: int = 0) -> dict:
    """Bytes per rank: training state (mixed-precision Adam, sharded by the plan) and
    the activations of the micro-batches in flight (1F1B holds up to ``pp`` on its
    first stage), with tensor parallelism splitting what lies between its matmuls."""
    state = estimate(cfg, plan, batch, seq, act_bytes)["state_bytes"]
    micro = batch // (plan.dp * plan.micro_batches)
    local = replace(cfg, n_layer=max(1, cfg.n_layer // plan.pp))
    in_flight = min(plan.pp, plan.micro_batches) if plan.pp > 1 else 1
    acts = in_flight * activation_bytes(local, micro, seq, act_bytes, checkpoint_every,
                                        tp=plan.tp)
    return {"state": state, "activations": acts, "total": state + acts}
