"""Where a training step's time goes: each operator's own (self) CPU time per step,
from ``torch.profiler``, over steps of the book's loop.

The benchmark records this beside its speeds, so that a claim like "most of the step is
matrix multiplication" is a measurement. Operators are grouped into the few families a
reader can act on (matmuls, attention, element-wise activations, norms, the optimizer);
the rest is "other" (views, additions, the autograd engine's bookkeeping).
"""

from __future__ import annotations

from typing import Callable

from torch.profiler import ProfilerActivity, profile, schedule

FAMILIES = {  # operator name prefix -> family (first match wins)
    "aten::mm": "matmul", "aten::addmm": "matmul", "aten::bmm": "matmul",
    "aten::_scaled_dot_product": "attention", "aten::_softmax": "attention",
    "aten::gelu": "activation", "aten::native_layer_norm": "norm",
    "aten::_fused_adamw": "optimizer", "aten::_foreach": "optimizer",
    "aten::_log_softmax": "loss", "aten::nll_loss": "loss",
}


def family(op: str) -> str:
    return next((f for prefix, f in FAMILIES.items() if op.startswith(prefix)),
                "other")


def profiled(run: Callable[[Callable[[], None]], None], settle: int,
             steps: int) -> dict[str, float]:
    """Milliseconds of self CPU time per step, by family, and their total.

    ``run(tick)`` trains, calling ``tick()`` once per step (from the batch function);
    the first ``settle`` steps are left out, the next ``steps`` are recorded.
    """
    if settle < 1 or steps < 1:
        raise ValueError(f"settle and steps must be >= 1, got {settle}, {steps}")
    sched = schedule(wait=settle - 1, warmup=1, active=steps, repeat=1)
    with profile(activities=[ProfilerActivity.CPU], schedule=sched) as prof:
        run(prof.step)
    shares: dict[str, float] = {}
    for event in prof.key_averages():
        f = family(event.key)
        shares[f] = shares.get(f, 0.0) + event.self_cpu_time_total / 1e3 / steps
    shares["total"] = sum(shares.values())
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))
