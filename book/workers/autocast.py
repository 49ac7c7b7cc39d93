"""What ``torch.autocast`` does to each op, measured on this torch and device.

Autocast keeps the weights in fp32 and casts at op boundaries: matmul-like ops run in
the low-precision dtype (they are fast there and accumulate in fp32 inside), ops that
need range or many-term sums (softmax, log, norms, losses) are promoted to fp32, and
the rest follow their inputs. The lists live in PyTorch's C++ source and differ per
device; rather than copy them, :func:`autocast_op_table` asks torch by running a probe
of each op.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F

# name -> (function, input shapes); all inputs are float tensors.
PROBES: dict[str, tuple[Callable, tuple]] = {
    "matmul": (torch.matmul, ((8, 16), (16, 8))),
    "linear": (F.linear, ((8, 16), (4, 16))),
    "bmm": (torch.bmm, ((2, 8, 16), (2, 16, 8))),
    "addmm": (torch.addmm, ((8, 8), (8, 16), (16, 8))),
    "conv1d": (F.conv1d, ((2, 4, 16), (8, 4, 3))),
    "scaled_dot_product_attention": (F.scaled_dot_product_attention,
                                     ((2, 4, 8, 16), (2, 4, 8, 16), (2, 4, 8, 16))),
    "softmax": (lambda x: torch.softmax(x, -1), ((8, 16),)),
    "log_softmax": (lambda x: torch.log_softmax(x, -1), ((8, 16),)),
    "layer_norm": (lambda x: F.layer_norm(x, (16,)), ((8, 16),)),
    "cross_entropy": (lambda x: F.cross_entropy(x, torch.zeros(8, dtype=torch.long)),
                      ((8, 16),)),
    "mse_loss": (F.mse_loss, ((8, 16), (8, 16))),
    "exp": (torch.exp, ((8, 16),)),
    "log": (lambda x: torch.log(x.abs() + 1), ((8, 16),)),
    "sum": (torch.sum, ((8, 16),)),
    "norm": (torch.norm, ((8, 16),)),
    "gelu": (F.gelu, ((8, 16),)),
    "add": (torch.add, ((8, 16), (8, 16))),
    "mul": (torch.mul, ((8, 16), (8, 16))),
}


def _out_dtype(fn, shapes, in_dtype, device_type, dtype) -> torch.dtype | str:
    args = [torch.randn(s, device=device_type).to(in_dtype) for s in shapes]
    try:
        with torch.autocast(device_type, dtype=dtype):
            return fn(*args).dtype
    except (RuntimeError, NotImplementedError) as err:  # no low-precision kernel
        return f"error: {str(err).splitlines()[0][:60]}"


def autocast_op_table(device_type: str = "cpu", dtype: torch.dtype = torch.bfloat16,
                      probes: dict = PROBES) -> list[dict]:
    """One row per probe: output dtype under autocast from fp32 inputs and from
    ``dtype`` inputs, and the verdict: ``"low precision"`` (autocast lowers it),
    ``"fp32"`` (autocast promotes it) or ``"follows inputs"``."""
    rows = []
    for name, (fn, shapes) in probes.items():
        from32 = _out_dtype(fn, shapes, torch.float32, device_type, dtype)
        from_low = _out_dtype(fn, shapes, dtype, device_type, dtype)
        if from32 == dtype:
            verdict = "low precision"
        elif from_low == torch.float32:
            verdict = "fp32"
        else:
            verdict = "follows inputs"
        rows.append({"op": name, "fp32 in": from32, f"{dtype} in": from_low,
                     "autocast": verdict})
    return rows


@contextmanager
def saved_tensor_bytes():
    """Count the bytes autograd saves for the backward pass (the activation memory),
    on any device: ``with saved_tensor_bytes() as mem: loss = ...; mem["bytes"]``."""
    seen: set[int] = set()
    box = {"bytes": 0}

    def pack(t: torch.Tensor):
        # Parameters and views of one storage are counted once.
        key = t.untyped_storage().data_ptr()
        if key not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(key)
            box["bytes"] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield box
