"""FP8 vs bf16 on one GPU: a matmul-size sweep and end-to-end GPT training speed.

``python -m tools.bench fp8 --out results/fp8-h200.json`` needs a CUDA GPU with
compute capability 8.9 or higher (FP8 tensor cores). It measures

1. the TFLOP/s of ``M x K x N`` matmuls in bf16 and in FP8 through ``torch._scaled_mm``
   with tensorwise and rowwise scales (GEMM alone, operands already in FP8), and
   tensorwise including the casts, for square sizes and GPT-shaped GEMMs;
2. a ~1.3B-parameter GPT trained end to end for ``E2E_STEPS`` steps, bf16 autocast vs
   the same model after ``convert_to_float8(model, size_filter())`` (every block
   linear; the output layer stays bf16), compiled, on the bytes of the Shakespeare
   corpus with the same seed and batches: tokens/s of each, and whether the FP8 loss
   curve ends within 1% of bf16's (the mean of the last tenth of the steps). Sized
   for about two minutes on an H100/H200-class GPU, compilation included.

``--dry-run`` runs the same code at toy sizes through the FP8 emulation on the CPU,
to check the plumbing; its JSON says ``"dry_run": true``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llmcore.accounting import count_params
from llmcore.data import load_corpus
from llmcore.data.lm import get_batch
from llmcore.io import atomic_write
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.precision.fp8 import (_mm, convert_to_float8, fp8_backend, to_float8,
                                   size_filter)
from llmcore.runtime import device_caps, fit_memory
from llmcore.train import TrainConfig, train

E4M3 = torch.float8_e4m3fn


@dataclass(frozen=True)
class E2EModel:
    """One end-to-end training run's model and batch shape."""

    name: str  # label in the results
    n_layer: int  # Transformer blocks
    n_head: int  # attention heads
    n_embd: int  # model width
    block_size: int  # context length T
    batch_size: int  # sequences per step B
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 128


# FP8 pays only where the matmuls are large: a 1.3B GPT on 80 GB cards; a 24 GB sm89
# card (L4, RTX 4090) holds the 350M one (1.3B's fp32 weights and AdamW alone: 21 GB).
GPU_MODELS = {19: (E2EModel("gpt-350M", 24, 16, 1024, 1024, 8),),
              60: (E2EModel("gpt-1.3B", 24, 16, 2048, 1024, 8),)}
E2E_STEPS = 50  # per run: the two compilations take most of the time
DRY_MODELS = (E2EModel("toy", 2, 2, 64, 32, 4, vocab_size=256),)
LOSS_TOLERANCE = 0.01  # FP8's final loss within 1% of bf16's
GPU_SIZES = [(n, n, n) for n in (512, 1024, 2048, 4096, 8192)] + [
    (4096, 384, 1536), (16384, 768, 3072), (16384, 3072, 768), (8192, 2048, 8192),
    (8192, 8192, 2048)]
DRY_SIZES = [(32, 64, 48), (64, 128, 64)]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench fp8",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None,
                   help="JSON file to write (default: results/fp8-<gpu>.json)")
    p.add_argument("--dry-run", action="store_true",
                   help="toy sizes through the emulation path; runs on the CPU")
    p.add_argument("--skip-e2e", action="store_true", help="only the matmul sweep")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps per e2e run (default {E2E_STEPS} on GPU, 3 "
                        "dry)")
    p.add_argument("--iters", type=int, default=None,
                   help="timed repetitions per matmul (default 50 on GPU, 2 dry)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the models in the e2e runs (default: on the "
                        "GPU, off in a dry run)")
    args = p.parse_args(argv)
    for name in ("steps", "iters"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    return args


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200': the part of a file name that names the GPU."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower())
             if w and w not in ("nvidia", "geforce", "tesla")]
    return "-".join(words) or "gpu"


def check_hardware(dry_run: bool) -> str | None:
    """None if the benchmark can run here, else the reason it cannot."""
    if dry_run:
        return None
    if not torch.cuda.is_available():
        return ("the FP8 benchmark needs a CUDA GPU with compute capability >= 8.9 "
                "(Ada, Hopper or later) and torch sees no CUDA device; run with "
                "--dry-run to check it on the CPU")
    backend, why = fp8_backend("cuda")
    if backend != "scaled_mm":
        return f"the FP8 benchmark needs compute capability >= 8.9: {why}"
    return None


def timeit(fn, iters: int, device: torch.device, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` over ``iters`` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_sweep(sizes, iters: int, device: torch.device, backend: str) -> list[dict]:
    rows = []
    low = torch.bfloat16
    for m, k, n in sizes:
        a = torch.randn(m, k, device=device, dtype=low)
        b = torch.randn(n, k, device=device, dtype=low)  # (N, K): b.T is the operand
        a8, sa = to_float8(a)
        b8, sb = to_float8(b)
        ar8, sar = to_float8(a, scaling="rowwise")
        br8, sbr = to_float8(b, scaling="rowwise")
        flops = 2 * m * k * n
        runs = {
            "bf16": lambda: a @ b.t(),
            "fp8_tensorwise": lambda: _mm(a8, sa, b8, sb, low, backend),
            "fp8_rowwise": lambda: _mm(ar8, sar, br8, sbr, low, backend),
            "fp8_tensorwise_with_cast": lambda: _mm(*to_float8(a), *to_float8(b), low,
                                                    backend),
        }
        row = {"M": m, "K": k, "N": n}
        for name, fn in runs.items():
            row[f"{name}_tflops"] = flops / timeit(fn, iters, device) / 1e12
        row["fp8_speedup"] = row["fp8_tensorwise_tflops"] / row["bf16_tflops"]
        rows.append(row)
        print(f"{m:6d} x {k:5d} x {n:5d}  bf16 {row['bf16_tflops']:8.2f}  fp8 "
              f"{row['fp8_tensorwise_tflops']:8.2f} TFLOP/s "
              f"({row['fp8_speedup']:.2f}x)")
    return rows


def byte_tokens(device: torch.device) -> torch.Tensor:
    text = load_corpus("shakespeare")
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long, device=device)


def e2e_run(spec: E2EModel, fp8: bool, steps: int, tokens: torch.Tensor,
            device: torch.device, backend: str, compile_: bool) -> dict:
    torch.manual_seed(0)
    cfg = GPTConfig(spec.vocab_size, spec.block_size, spec.n_layer, spec.n_head,
                    spec.n_embd, bias=False)
    model = GPT(cfg).to(device)
    if fp8:  # a dry run's toy sizes are below any sensible size threshold
        keep = size_filter(min_features=16 if device.type == "cpu" else 1024)
        convert_to_float8(model, keep, backend=backend)

    def batch_fn(step, gen):
        return get_batch(tokens, spec.batch_size, spec.block_size, gen, device)

    tcfg = TrainConfig(max_steps=steps, lr=3e-4, warmup_steps=max(1, steps // 10),
                       precision="bf16", compile=compile_, progress=False)
    hist = train(model, batch_fn, tcfg, generator=torch.Generator().manual_seed(0))
    skip = min(len(hist.tokens_per_s) - 1, max(1, steps // 3))  # warm-up, compile
    result = {"tokens_per_s": statistics.median(hist.tokens_per_s[skip:]),
              "final_loss": statistics.mean(hist.loss[-max(1, steps // 10):]),
              "loss": hist.loss, "params": count_params(model)}
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        torch.cuda.reset_peak_memory_stats(device)
    del model
    return result


def e2e(models, steps: int, device: torch.device, backend: str,
        compile_: bool) -> list[dict]:
    tokens = byte_tokens(device)
    rows = []
    for spec in models:
        bf16 = e2e_run(spec, False, steps, tokens, device, backend, compile_)
        fp8 = e2e_run(spec, True, steps, tokens, device, backend, compile_)
        row = {**asdict(spec), "params": bf16["params"], "steps": steps,
               "bf16": bf16, "fp8": fp8,
               "speedup": fp8["tokens_per_s"] / bf16["tokens_per_s"],
               "loss_rel_diff": fp8["final_loss"] / bf16["final_loss"] - 1,
               "compiled": compile_}
        row["loss_within_tolerance"] = abs(row["loss_rel_diff"]) <= LOSS_TOLERANCE
        rows.append(row)
        print(f"{spec.name}: bf16 {bf16['tokens_per_s']:.0f} tok/s, fp8 "
              f"{fp8['tokens_per_s']:.0f} tok/s ({row['speedup']:.2f}x); final loss "
              f"{bf16['final_loss']:.4f} vs {fp8['final_loss']:.4f} "
              f"({100 * row['loss_rel_diff']:+.2f}%)")
    return rows


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` as JSON, atomically (``llmcore.io.atomic_write``)."""
    with atomic_write(path, "w") as f:
        json.dump(payload, f, indent=1)
    return Path(path)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    problem = check_hardware(args.dry_run)
    if problem:
        print(f"tools.bench fp8: {problem}", file=sys.stderr)
        return 2
    if args.dry_run:
        device, backend, gpu = torch.device("cpu"), "emulate", "none (dry run on CPU)"
        sizes, models = DRY_SIZES, DRY_MODELS
        steps, iters = args.steps or 3, args.iters or 2
        compile_ = bool(args.compile)
    else:
        device, backend = torch.device("cuda"), "scaled_mm"
        gpu = torch.cuda.get_device_name(device)
        sizes = GPU_SIZES
        caps = device_caps(device)
        models = fit_memory(GPU_MODELS, caps)
        steps, iters = args.steps or E2E_STEPS, args.iters or 50
        compile_ = args.compile is not False
    out = args.out or f"results/fp8-{'dry-run' if args.dry_run else gpu_slug(gpu)}.json"
    payload = {
        "benchmark": "fp8", "gpu": gpu, "dry_run": args.dry_run, "backend": backend,
        "capability": (list(torch.cuda.get_device_capability(device))
                       if device.type == "cuda" else None),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "matmul": matmul_sweep(sizes, iters, device, backend),
    }
    if not args.skip_e2e:
        payload["e2e"] = e2e(models, steps, device, backend, compile_)
    print("wrote", write_json(out, payload))
    return 0
