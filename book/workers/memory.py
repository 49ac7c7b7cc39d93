"""Counting parameters and bytes: what a model costs before it computes anything.

Three numbers decide whether a model trains on a device: how many parameters it has,
how many bytes each one takes in the chosen number format, and how many extra bytes
training keeps per parameter (gradients, an fp32 master copy, the optimizer's moments).
The formulas here are checked against real models and real optimizer state in the
book's "core concepts" chapter and its lab.

Mixed-precision Adam keeps 16 bytes per parameter: 2 (bf16/fp16 weights) + 2 (their
gradients) + 4 (fp32 master weights) + 4 + 4 (Adam's two fp32 moments). This is the
K = 12 optimizer-state count of the ZeRO paper (Rajbhandari et al., 2020, section 3.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Bytes one element takes in memory. tf32 is a compute mode: its values are stored as
# fp32. int4 packs two values in a byte.
DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1,
               "int4": 0.5}


def bytes_per_element(fmt: str) -> float:
    if fmt not in DTYPE_BYTES:
        raise ValueError(f"fmt={fmt!r} is not a known number format; "
                         f"use one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[fmt]


def gpt_param_count(n_layer: int, n_embd: int, vocab_size: int, block_size: int,
                    bias: bool = True, tied: bool = True) -> int:
    """Parameters of a GPT-2-shaped decoder (learned positions, LayerNorm, 4x MLP).

    Per block: attention 4 C^2 (+ 4 C biases), MLP 8 C^2 (+ 5 C), two LayerNorms 4 C
    (2 C without biases): 12 C^2 + 13 C in all, 12 C^2 + 2 C without biases. Plus
    token and position embeddings, a final LayerNorm, and an output head unless it is
    tied to the token embedding.
    """
    for name, value in (("n_layer", n_layer), ("n_embd", n_embd),
                        ("vocab_size", vocab_size), ("block_size", block_size)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    c = n_embd
    per_block = 12 * c * c + (13 * c if bias else 2 * c)
    embeddings = vocab_size * c + block_size * c
    final_norm = 2 * c if bias else c
    head = 0 if tied else vocab_size * c
    return n_layer * per_block + embeddings + final_norm + head


@dataclass(frozen=True)
class Recipe:
    """Bytes kept per parameter during training, by role."""

    name: str  # how the book refers to it
    weights: float  # the copy the forward and backward passes read
    grads: float  # gradients, in the weights' format
    master: float  # an fp32 copy the optimizer updates (0 if the weights are fp32)
    optimizer: float  # optimizer state, e.g. Adam's two moments

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.master + self.optimizer


RECIPES = {
    "fp32 + AdamW": Recipe("fp32 + AdamW", weights=4, grads=4, master=0, optimizer=8),
    "mixed bf16 + AdamW": Recipe("mixed bf16 + AdamW", weights=2, grads=2, master=4,
                                 optimizer=8),
    "mixed bf16 + SGD": Recipe("mixed bf16 + SGD", weights=2, grads=2, master=4,
                               optimizer=0),
    "inference bf16": Recipe("inference bf16", weights=2, grads=0, master=0,
                             optimizer=0),
    "inference int4": Recipe("inference int4", weights=0.5, grads=0, master=0,
                             optimizer=0),
}


def training_bytes(n_params: int, recipe: str | Recipe) -> dict[str, float]:
    """Bytes of weights, gradients, master copy and optimizer state for ``n_params``."""
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ValueError(f"recipe={recipe!r} is unknown; use one of "
                             f"{sorted(RECIPES)} or pass a Recipe")
        recipe = RECIPES[recipe]
    parts = {role: n_params * getattr(recipe, role)
             for role in ("weights", "grads", "master", "optimizer")}
    parts["total"] = sum(parts.values())
    return parts


def zero_bytes_per_param(stage: int, world_size: int) -> float:
    """Bytes per parameter on each rank for mixed-precision Adam (16 in all) under
    ZeRO ``stage`` over ``world_size`` ranks (Rajbhandari et al. 2020, figure 1):
    stage 1 shards the 12 bytes of optimizer state, stage 2 also the 2 of gradients,
    stage 3 also the 2 of weights."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage!r}")
    if not isinstance(world_size, int) or world_size <= 0:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    sharded = {0: 0, 1: 12, 2: 14, 3: 16}[stage]
    return 16 - sharded + sharded / world_size


def zero_state_bytes(n_params: int, stage: int, world_size: int) -> float:
    """Weights + gradients + optimizer state per rank, mixed-precision Adam."""
    return zero_bytes_per_param(stage, world_size) * n_params


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_training_state(model: nn.Module,
                           optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes really held by the parameters, their gradients and the optimizer state.

    Scalar (0-dimensional) state such as Adam's step counter is reported apart, under
    ``"counters"``: it grows with the number of tensors, not with their size.
    """
    params = list({id(p): p for p in model.parameters()}.values())
    state = [v for s in optimizer.state.values() for v in s.values()
             if torch.is_tensor(v)]
    return {
        "weights": tensor_bytes(params),
        "grads": tensor_bytes(p.grad for p in params if p.grad is not None),
        "optimizer": tensor_bytes(t for t in state if t.dim() > 0),
        "counters": tensor_bytes(t for t in state if t.dim() == 0),
    }


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``: binary units, as memory is sold and reported."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (a tied weight counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
