"""The step-time model on clusters nobody in the chapter owns: predictions only.

The link figures are the vendors' published peaks (one direction, per GPU); the
compute rate is an assumed share of the published bf16 peak (model FLOPs
utilisation); the latencies are assumptions of the usual order. Real collectives
reach less than the peak bandwidth, so these step times are optimistic.

* NVIDIA H100 SXM5: 989 TFLOP/s dense bf16; NVLink 4: 900 GB/s total bidirectional
  per GPU, 450 GB/s each way (NVIDIA H100 Tensor Core GPU datasheet).
* InfiniBand NDR: 400 Gb/s per port = 50 GB/s each way, one port per GPU as in
  a DGX H100 (NVIDIA ConnectX-7 / Quantum-2 product briefs).
"""

from __future__ import annotations

import itertools

from book.workers.costmodel import Plan, memory_per_rank
from book.workers.steptime import Cluster, Device, Link, step_time
from llmcore.accounting import flops_per_token
from llmcore.models.gpt import GPTConfig

H100_BF16_PEAK = 989e12  # FLOP/s, dense
NVLINK4 = 450e9  # bytes/s per GPU per direction (900 GB/s bidirectional)
IB_NDR = 400e9 / 8  # bytes/s per port per direction


def h100_cluster(mfu: float = 0.4, nvlink_alpha: float = 3e-6,
                 ib_alpha: float = 8e-6) -> Cluster:
    """Nodes of 8 H100s on NVLink, joined by one NDR InfiniBand port per GPU."""
    device = Device(f"H100 SXM at {mfu:.0%} of the bf16 peak", mfu * H100_BF16_PEAK)
    return Cluster(device, intra=Link(nvlink_alpha, NVLINK4),
                   inter=Link(ib_alpha, IB_NDR), per_node=8)


MODELS = {  # GPT-shaped stand-ins (learned positions, GELU MLP, tied embeddings)
    "GPT-2 small": GPTConfig(50304, 2048, 12, 12, 768),
    "1.3B": GPTConfig(50304, 2048, 24, 16, 2048),
    "7B": GPTConfig(32000, 4096, 32, 32, 4096),
    "13B": GPTConfig(32000, 4096, 40, 40, 5120),
    "70B": GPTConfig(32000, 4096, 80, 64, 8192),
}


def layouts(cfg, gpus: int, batch: int, seq: int, cluster: Cluster,
            memory_gb: float = 80.0, checkpoint_every: int = 1) -> list[dict]:
    """Every (dp, tp, pp, ZeRO) layout of ``gpus`` ranks with its predicted step
    time, memory per rank and whether it fits; fastest fitting first. Pipelines run
    4 micro-batches per stage (1F1B); tensor parallelism stays inside a node."""
    rows = []
    for tp, pp in itertools.product((1, 2, 4, 8), (1, 2, 4, 8, 16)):
        dp = gpus // (tp * pp)
        if dp < 1 or dp * tp * pp != gpus or cfg.n_layer % pp or cfg.n_head % tp:
            continue
        m = 4 * pp if pp > 1 else 1
        if batch % (dp * m):
            continue
        for zero in (0, 1, 3) if dp > 1 else (0,):
            plan = Plan(dp=dp, tp=tp, pp=pp, zero=zero, micro_batches=m)
            t = step_time(cfg, plan, batch, seq, cluster, grad_bytes=2, act_bytes=2)
            mem = memory_per_rank(cfg, plan, batch, seq, 2, checkpoint_every)
            flops = batch * seq * flops_per_token(cfg, seq)
            ideal = flops / (gpus * cluster.device.flops)
            rows.append({"plan": plan, "step_s": t["total"], "parts": t,
                         "memory_gb": mem["total"] / 1e9,
                         "fits": mem["total"] <= memory_gb * 1e9,
                         "efficiency": ideal / t["total"]})
    return sorted(rows, key=lambda r: (not r["fits"], r["step_s"]))


def label(plan: Plan) -> str:
    z = f" ZeRO-{plan.zero}" if plan.zero else ""
    return f"dp{plan.dp} tp{plan.tp} pp{plan.pp}{z}"
