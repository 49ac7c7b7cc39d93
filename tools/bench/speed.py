"""Training speed: tokens/s, step time, peak memory and MFU, and the ladder of
optimisations that gets there.

``python -m tools.bench speed`` measures, on the current device, the training step of
the book's GPT through ``llmcore.train.train`` (the loop every chapter uses), one rung
of the ladder at a time, each rung adding one thing to the one before: fp32 -> TF32
matmuls -> 16-bit autocast (bf16, or fp16 with loss scaling on a T4) -> fused kernels
(SDPA attention) -> ``torch.compile``. A rung the device cannot run (TF32 off NVIDIA
GPUs) is recorded as skipped, with the reason. The peaks are measured first, a large
matmul on the same device in each precision, and each rung's MFU is against the peak
of its own. FP8 is measured where it pays, on a 1.3B GPT against bf16, by ``python -m
tools.bench fp8``. Results go to ``results/speed-<device>.json`` with the hardware,
the date and the torch version.

``--compare-nanogpt PATH`` runs nanoGPT and llmcore side by side on the same CPU
model (:mod:`tools.bench.nanogpt`). ``--realtime`` (root or CAP_SYS_NICE) runs it
all under round-robin real-time scheduling, so that other programs on a shared machine
do not take the cores; ``--compile`` compiles llmcore's side of the comparison
(nanoGPT's CPU recipe is eager).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from llmcore.accounting import count_params, flops_per_token, measure_peak_flops, mfu
from llmcore.config import Tiered
from llmcore.io import atomic_write
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.runtime import device_caps, device_name, setup
from llmcore.train import TrainConfig, train
from tools.bench.gpus import GPU_BUDGET_GB
from tools.bench.nanogpt import SETTLE, char_run, compare_nanogpt, llmcore_step_ms
from tools.bench.parallel import hardware, realtime
from tools.bench.profile import profiled
from tools.bench.results import device_part


@dataclass(frozen=True)
class Rung:
    """One step of the ladder: what the run uses at this rung."""

    name: str
    precision: str  # TrainConfig.precision; "half": the device's 16-bit format
    sdpa: bool  # PyTorch's fused attention kernel instead of the hand-written one
    compile: bool = False


LADDER = (Rung("fp32", "fp32", sdpa=False), Rung("tf32", "tf32", sdpa=False),
          Rung("16-bit", "half", sdpa=False), Rung("fused kernels", "half", sdpa=True),
          Rung("compile", "half", sdpa=True, compile=True))


def precision_of(rung: Rung, device: torch.device) -> str:
    """The rung's precision on ``device``: its 16-bit rungs run the device's best
    16-bit path, bf16 from Ampere on (and on CPUs), fp16 with loss scaling on a T4."""
    if rung.precision != "half":
        return rung.precision
    caps = device_caps(device)
    return "fp16" if caps.type == "cuda" and not caps.bf16_tensor_cores else "bf16"


@dataclass(frozen=True)
class SpeedPreset:
    model: GPTConfig
    batch_size: int
    steps: int  # timed steps per rung
    warmup: int  # untimed steps first (the compiled rung compiles in them)


GPT2 = GPTConfig(50304, 1024, 12, 12, 768)  # GPT-2 small (124M)
PRESETS = Tiered(
    # The CPU-tier char model of chapter 8; on a GPU GPT-2 small at 1,024 tokens, as
    # many sequences as the device's memory holds for the fp32 rung, whose
    # hand-written attention keeps every T x T score matrix (rt.fit: GiB -> preset).
    cpu=SpeedPreset(GPTConfig(65, 64, 4, 4, 128), batch_size=12, steps=20, warmup=5),
    gpu={11: SpeedPreset(GPT2, batch_size=3, steps=30, warmup=10),  # T4
         19: SpeedPreset(GPT2, batch_size=6, steps=30, warmup=10),  # 24 GB
         70: SpeedPreset(GPT2, batch_size=12, steps=30, warmup=10)},  # 80 GB
)


def preset_for(rt) -> SpeedPreset:
    """The ladder's model and batch for this runtime's tier and memory."""
    return rt.pick(PRESETS) if rt.tier == "cpu" else rt.fit(PRESETS.gpu)


def page_preset() -> SpeedPreset:
    """The ladder a notebook page runs on a GPU: the largest option within a page's
    ``GPU_BUDGET_GB`` (pages share the GPU in ``make test-gpu``), whatever its size."""
    return PRESETS.gpu[max(k for k in PRESETS.gpu if k <= GPU_BUDGET_GB)]


def skip_reason(rung: Rung, device: torch.device) -> str | None:
    """Why ``rung`` cannot run on ``device``, or None."""
    caps = device_caps(device)
    if rung.precision == "tf32" and not caps.bf16_tensor_cores:
        return "TF32 matmuls need an NVIDIA GPU of sm80 or later"
    return None


def measure(preset: SpeedPreset, rung: Rung, device: torch.device,
            peak: float) -> dict:
    """Train ``preset`` at ``rung`` on random tokens; tokens/s, step time, memory, MFU.

    The loop reads the device every ``warmup`` steps, so on a GPU each timed window of
    ``warmup`` steps is measured as a whole; the median over the windows is reported.
    """
    torch.manual_seed(0)
    model = GPT(replace(preset.model, use_sdpa=rung.sdpa)).to(device)
    c, b = model.config, preset.batch_size

    def batch_fn(step, generator):
        x = torch.randint(c.vocab_size, (b, c.block_size + 1), generator=generator)
        return x[:, :-1], x[:, 1:]

    precision = precision_of(rung, device)
    cfg = TrainConfig(max_steps=preset.warmup + preset.steps, warmup_steps=0,
                      precision=precision, compile=rung.compile,
                      log_interval=preset.warmup, progress=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history = train(model, batch_fn, cfg)
    tps = statistics.median(history.tokens_per_s[preset.warmup:])
    fpt = flops_per_token(model.config)
    return {"rung": rung.name, **asdict(rung), "precision": precision,
            "tokens_per_s": tps,
            "step_ms": 1e3 * b * c.block_size / tps,
            "peak_memory_bytes": (torch.cuda.max_memory_allocated(device)
                                  if device.type == "cuda" else None),
            "mfu": mfu(tps, fpt, peak), "params": count_params(model)}


def peaks_of(device: torch.device) -> dict[str, float]:
    """The measured matmul peak of every precision a rung of the ladder can run in
    on ``device``: each rung's MFU is against the peak of its own precision."""
    wanted = {precision_of(r, device) for r in LADDER
              if skip_reason(r, device) is None}
    return {p: measure_peak_flops(device, p) for p in sorted(wanted)}


def ladder(preset: SpeedPreset, device: torch.device, peaks: dict[str, float],
           compiled: bool = True) -> list[dict]:
    """Every rung of ``LADDER`` measured on ``device`` (a row saying why where one is
    skipped); ``compiled=False`` leaves out the compiled rungs (their compilation
    takes about a minute each on a GPU)."""
    rows = []
    for rung in LADDER:
        reason = skip_reason(rung, device)
        if reason is None and rung.compile and not compiled:
            reason = "compiled rungs: run `python -m tools.bench speed`"
        if reason is None:
            rows.append(measure(preset, rung, device,
                                peaks[precision_of(rung, device)]))
            print(f"  {rung.name:14s} {rows[-1]['tokens_per_s']:>12,.0f} tokens/s  "
                  f"{rows[-1]['step_ms']:8.1f} ms/step  MFU {rows[-1]['mfu']:.1%}")
        else:
            rows.append({"rung": rung.name, **asdict(rung), "skipped": reason})
            print(f"  {rung.name:14s} skipped: {reason}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench speed",
                                description="Training speed and the ladder.")
    p.add_argument("--out", default="results", help="folder for the JSON result")
    p.add_argument("--no-ladder", action="store_true", help="skip the ladder")
    p.add_argument("--compare-nanogpt", metavar="PATH", type=Path, default=None)
    p.add_argument("--rounds", type=int, default=9, help="nanoGPT comparison rounds")
    p.add_argument("--steps", type=int, default=60, help="steps per round")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument("--realtime", action="store_true",
                   help="run the comparison under round-robin real-time scheduling")
    p.add_argument("--compile", action="store_true",
                   help="compile llmcore's side of the comparison")
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:  # one llmcore round of the comparison
        torch.set_num_threads(args.threads)
        steps, compile = args.worker, args.compile
        print(json.dumps(profiled(lambda tick: char_run(steps, compile, tick), SETTLE,
                                  steps)
                         if args.profile else llmcore_step_ms(steps, compile)))
        return 0
    policy = realtime() if args.realtime else "normal"  # the ladder too
    rt = setup(seed=0)
    cuda = rt.device.type == "cuda"
    name = device_part(rt.device.type, device_name(rt.device))
    path = Path(args.out) / f"speed-{name}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update({
        "benchmark": "speed", "tier": rt.tier, "device": device_name(rt.device),
        "hardware": rt.caps.describe() if cuda else hardware(),
        "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
        "capability": rt.caps.capability, "load_average": os.getloadavg()[0],
        "scheduling": policy,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")})
    if cuda:
        result["gpu"] = device_name(rt.device)
    if not args.no_ladder:
        preset = preset_for(rt)
        peaks = peaks_of(rt.device)
        for precision, peak in peaks.items():
            print(f"measured {precision} matmul peak: {peak / 1e12:.3f} TFLOP/s")
        result.pop("peak_flops", None)  # one peak for every rung: replaced by peaks
        result.pop("peak_precision", None)
        result.update(peaks=peaks, model=asdict(preset.model),
                      batch_size=preset.batch_size,
                      ladder=ladder(preset, rt.device, peaks))
    if args.compare_nanogpt is not None:
        key = "nanogpt_vs_compiled" if args.compile else "nanogpt"
        result[key] = compare_nanogpt(args.compare_nanogpt, args.rounds, args.steps,
                                      args.threads, args.compile, policy)
        cmp = result[key]
        print(f"llmcore/nanoGPT tokens/s: median {cmp['ratio_median']:.2f}, range "
              f"{cmp['ratio_range'][0]:.2f}-{cmp['ratio_range'][1]:.2f}")
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"-> {path}")
    return 0
