"""Model FLOPs utilisation: how much of the hardware's matmul rate training uses.

MFU (Chowdhery et al., "PaLM", 2022, appendix B) divides the FLOPs the model needs per
second, at the measured training throughput, by the hardware's peak. A decoder with
N parameters needs about 6N FLOPs per token for the forward and backward matmuls (2N
forward, 4N backward; Kaplan et al. 2020) plus the attention scores and weighted sums,
12 * n_layer * n_embd * T per token for a context of T. The peak is *measured* here:
the rate of a large square matmul in the same dtype on the same device, since a
datasheet number assumes clocks and shapes that a given machine may not reach.

Run ``python -m llmcore.bench mfu [--precision bf16] [--steps N]``: it trains the tier's
GPT preset for a few steps, measures the peak, and writes ``results/mfu-<tier>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llmcore.config import Tiered
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.nn import gemm
from llmcore.runtime import device_name, setup
from llmcore.train import TrainConfig, train

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_flops(device: torch.device | str, precision: str = "bf16",
                       n: int | None = None, iters: int | None = None) -> float:
    """FLOP/s of an n x n x n matmul in ``precision`` on ``device`` (best of a few).

    On the CPU in fp32 the faster of the two libraries PyTorch carries (MKL's ``a @ b``
    and oneDNN's, :mod:`llmcore.nn.gemm`): the peak is what the device can reach.
    """
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {list(DTYPES)}, got {precision!r}")
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    iters = iters or (20 if device.type == "cuda" else 3)
    a = torch.randn(n, n, device=device, dtype=DTYPES[precision])
    b = torch.randn(n, n, device=device, dtype=DTYPES[precision])
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    kernels = [lambda: a @ b]
    if device.type == "cpu" and precision == "fp32" and gemm.onednn_available():
        kernels.append(lambda: gemm.onednn_linear(a, b))  # a @ b^T: the same FLOPs
    best = float("inf")
    try:
        for kernel in kernels:
            kernel()  # warm-up: kernel selection, allocation
            _sync(device)
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(iters):
                    kernel()
                _sync(device)
                best = min(best, (time.perf_counter() - t0) / iters)
    finally:
        torch.set_float32_matmul_precision(before)
    return 2 * n**3 / best


def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12 * n_layer * n_embd * T (PaLM, appendix B).

    ``n_params``: parameters that take part in matmuls (without the position table).
    """
    return 6 * n_params + 12 * n_layer * n_embd * seq_len


def gpt_flops_per_token(model: GPT, seq_len: int | None = None) -> float:
    c = model.config
    return flops_per_token(model.num_params(non_embedding=True), c.n_layer, c.n_embd,
                           seq_len or c.block_size)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation, a fraction in [0, 1] (above 1: the peak was wrong)."""
    return tokens_per_s * flops_per_token / peak_flops


@dataclass(frozen=True)
class MFUPreset:
    """A model and batch to measure throughput with."""

    model: GPTConfig  # the GPT to train
    batch_size: int  # sequences per step (each block_size tokens long)
    steps: int  # timed training steps, after the warm-up ones


PRESETS = Tiered(
    cpu=MFUPreset(GPTConfig(65, 128, 4, 4, 128), batch_size=16, steps=10),
    gpu=MFUPreset(GPTConfig(50304, 1024, 12, 12, 768), batch_size=12, steps=30),
)


def measure_tokens_per_s(model: GPT, batch_size: int, steps: int, precision: str,
                         warmup: int = 3, compile: bool = False) -> float:
    """Median training throughput (tokens/s) of ``model`` on random tokens."""
    c = model.config

    def batch_fn(step, generator):
        x = torch.randint(c.vocab_size, (batch_size, c.block_size + 1),
                          generator=generator)
        return x[:, :-1], x[:, 1:]

    cfg = TrainConfig(max_steps=warmup + steps, warmup_steps=0, precision=precision,
                      compile=compile, progress=False)
    history = train(model, batch_fn, cfg)
    return statistics.median(history.tokens_per_s[warmup:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmcore.bench mfu",
                                description="Training throughput and MFU of a GPT.")
    p.add_argument("--precision", default="bf16", choices=list(DTYPES))
    p.add_argument("--steps", type=int, default=None, help="timed steps")
    p.add_argument("--compile", action="store_true", help="use torch.compile")
    p.add_argument("--out", default="results", help="folder for the JSON result")
    args = p.parse_args(argv)
    rt = setup(seed=0)
    preset = rt.pick(PRESETS)
    model = GPT(preset.model).to(rt.device)
    tps = measure_tokens_per_s(model, preset.batch_size, args.steps or preset.steps,
                               args.precision, compile=args.compile)
    peak = measure_peak_flops(rt.device, args.precision)
    fpt = gpt_flops_per_token(model)
    result = {
        "benchmark": "mfu", "tier": rt.tier, "precision": args.precision,
        "compile": args.compile, "model": asdict(preset.model),
        "batch_size": preset.batch_size, "params": model.num_params(),
        "tokens_per_s": tps, "flops_per_token": fpt, "peak_flops": peak,
        "mfu": mfu(tps, fpt, peak), "device": device_name(rt.device),
        "torch": torch.__version__, "date": datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out = Path(args.out) / f"mfu-{rt.tier}-{args.precision}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"{tps:,.0f} tokens/s, peak {peak / 1e12:.2f} TFLOP/s, "
          f"MFU {result['mfu']:.1%} -> {out}")
    return 0
