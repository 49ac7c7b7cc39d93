"""Counting parameters and FLOPs, and how much of the device a run turns into training.

:func:`count_params` counts a model's parameters (each shared tensor once);
:func:`flops_per_token` is the training FLOPs of a GPT-shaped decoder per token,
:func:`measure_peak_flops` the rate this device reaches on a large matmul, and
:func:`mfu` their ratio at a measured throughput: the model FLOPs utilisation
(Chowdhery et al., "PaLM", 2022, appendix B). What training keeps in memory per
parameter is counted beside the book's chapters, in ``book/workers/memory.py``.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn


def count_params(model: nn.Module, trainable_only: bool = False,
                 exclude: tuple[str, ...] = ()) -> int:
    """Parameters of ``model``, each shared (tied) tensor counted once; ``exclude``
    leaves out the parameters with these names (e.g. ``("pos_emb.weight",)``)."""
    skip = {id(model.get_parameter(name)) for name in exclude}
    params = {id(p): p for p in model.parameters()
              if (p.requires_grad or not trainable_only) and id(p) not in skip}
    return sum(p.numel() for p in params.values())


# ------------------------------------------------------------------ FLOPs and MFU


def flops_per_token(cfg, seq_len: int | None = None) -> float:
    """Training FLOPs per token of a GPT-shaped decoder ``cfg`` (any config with
    ``n_layer``, ``n_embd``, ``vocab_size``, ``block_size``): 6 per matmul weight
    (2 forward, 4 backward; Kaplan et al. 2020), the weights being 12 C^2 per block
    and the V x C output layer, plus 12 L C T for the attention scores and weighted
    sums at context T (Chowdhery et al., "PaLM", 2022, appendix B)."""
    c, layers = cfg.n_embd, cfg.n_layer
    seq = seq_len or cfg.block_size
    return 6 * (12 * layers * c * c + cfg.vocab_size * c) + 12 * layers * c * seq


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: the FLOP/s the model needs at this throughput over
    the device's peak (PaLM, appendix B); above 1 the peak was wrong."""
    if not peak_flops > 0 or not math.isfinite(peak_flops):
        raise ValueError(f"peak_flops must be a positive finite number, got "
                         f"{peak_flops!r} (measure_peak_flops measures one)")
    return tokens_per_s * flops_per_token / peak_flops


MATMUL_DTYPES = {"fp32": torch.float32, "tf32": torch.float32,
                 "bf16": torch.bfloat16, "fp16": torch.float16}


def measure_peak_flops(device: torch.device | str, precision: str = "bf16",
                       n: int | None = None, iters: int | None = None) -> float:
    """FLOP/s of an n x n x n matmul in ``precision`` on ``device``, best of three.

    A *measured* peak: what this device reaches on a large square matmul, where a
    datasheet assumes clocks and shapes a given machine may not reach. MFU against it
    is higher than MFU against the datasheet (PaLM's 46% is against the datasheet).
    """
    if precision not in MATMUL_DTYPES:
        raise ValueError(f"precision must be one of {list(MATMUL_DTYPES)}, "
                         f"got {precision!r}")
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    iters = iters or (20 if device.type == "cuda" else 3)
    a = torch.randn(n, n, device=device, dtype=MATMUL_DTYPES[precision])
    b = torch.randn(n, n, device=device, dtype=MATMUL_DTYPES[precision])
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    best = float("inf")
    try:
        a @ b  # warm-up: kernel selection, allocation
        sync(device)
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(iters):
                a @ b
            sync(device)
            best = min(best, (time.perf_counter() - t0) / iters)
    finally:
        torch.set_float32_matmul_precision(before)
    return 2 * n**3 / best
