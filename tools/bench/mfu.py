"""Model FLOPs utilisation: how much of the hardware's matmul rate training uses.

MFU (Chowdhery et al., "PaLM", 2022, appendix B) divides the FLOPs the model needs per
second, at the measured training throughput, by the hardware's peak. A decoder with
N parameters needs about 6N FLOPs per token for the forward and backward matmuls (2N
forward, 4N backward; Kaplan et al. 2020) plus the attention scores and weighted sums,
12 * n_layer * n_embd * T per token for a context of T. The peak is *measured* here:
the rate of a large square matmul in the same dtype on the same device, since a
datasheet number assumes clocks and shapes that a given machine may not reach.

Run ``python -m tools.bench mfu [--precision bf16] [--steps N]``: it trains the tier's
GPT preset for a few steps, measures the peak, and writes
``results/mfu-<device>-<precision>.json`` (the GPU's name, or ``cpu``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llmcore.accounting import (MATMUL_DTYPES, count_params, flops_per_token,
                                measure_peak_flops, mfu)
from llmcore.config import Tiered
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.runtime import device_name, setup
from llmcore.train import TrainConfig, train
from tools.bench.results import device_part


@dataclass(frozen=True)
class MFUPreset:
    """A model and batch to measure throughput with."""

    model: GPTConfig  # the GPT to train
    batch_size: int  # sequences per step (each block_size tokens long)
    steps: int  # timed training steps, after the warm-up ones


GPT2 = GPTConfig(50304, 1024, 12, 12, 768)  # GPT-2 small (124M)
PRESETS = Tiered(  # on a GPU: as many sequences as its memory holds (rt.fit)
    cpu=MFUPreset(GPTConfig(65, 128, 4, 4, 128), batch_size=16, steps=10),
    gpu={12: MFUPreset(GPT2, batch_size=8, steps=30),
         19: MFUPreset(GPT2, batch_size=12, steps=30)},
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
    p = argparse.ArgumentParser(prog="python -m tools.bench mfu",
                                description="Training throughput and MFU of a GPT.")
    p.add_argument("--precision", default="bf16", choices=list(MATMUL_DTYPES))
    p.add_argument("--steps", type=int, default=None, help="timed steps")
    p.add_argument("--compile", action="store_true", help="use torch.compile")
    p.add_argument("--out", default="results", help="folder for the JSON result")
    args = p.parse_args(argv)
    rt = setup(seed=0)
    preset = rt.pick(PRESETS) if rt.tier == "cpu" else rt.fit(PRESETS.gpu)
    model = GPT(preset.model).to(rt.device)
    tps = measure_tokens_per_s(model, preset.batch_size, args.steps or preset.steps,
                               args.precision, compile=args.compile)
    peak = measure_peak_flops(rt.device, args.precision)
    fpt = flops_per_token(model.config)
    result = {
        "benchmark": "mfu", "tier": rt.tier, "precision": args.precision,
        "compile": args.compile, "model": asdict(preset.model),
        "batch_size": preset.batch_size, "params": count_params(model),
        "tokens_per_s": tps, "flops_per_token": fpt, "peak_flops": peak,
        "mfu": mfu(tps, fpt, peak), "device": device_name(rt.device),
        "torch": torch.__version__, "date": datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    name = device_part(rt.device.type, device_name(rt.device))
    out = Path(args.out) / f"mfu-{name}-{args.precision}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"{tps:,.0f} tokens/s, peak {peak / 1e12:.2f} TFLOP/s, "
          f"MFU {result['mfu']:.1%} -> {out}")
    return 0
