"""llmcore and nanoGPT side by side on the same CPU model (the configuration of issue
12 of the book's tracker: 4 layers, 4 heads, width 128, context 64, batch 12, fp32).

``python -m tools.bench speed --compare-nanogpt PATH`` runs nanoGPT's ``train.py`` (a
checkout at PATH, its shakespeare_char data prepared) and the book's loop in interleaved
rounds, each in a fresh process timing its own steps, and records the ratio of the
median step times, and where llmcore's step spends its time (:mod:`.profile`).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from llmcore.data import get_batch, load_corpus
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.train import run as runs
from llmcore.train import train

CHAR = GPTConfig(65, 64, 4, 4, 128)  # 4 layers, 4 heads, width 128, context 64
NANO_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
             "--n_layer=4", "--n_head=4", "--n_embd=128", "--block_size=64",
             "--batch_size=12", "--dropout=0.0", "--eval_interval=100000",
             "--eval_iters=1", "--log_interval=1", "--always_save_checkpoint=False"]
SETTLE = 5  # first steps of each process left out (allocation, warm caches)


def char_ids() -> torch.Tensor:
    """tiny-shakespeare as character ids (sorted characters, as CharTokenizer)."""
    raw = np.frombuffer(load_corpus("shakespeare").encode("utf-8"), dtype=np.uint8)
    lut = np.zeros(256, dtype=np.int64)
    chars = np.unique(raw)
    lut[chars] = np.arange(len(chars))
    return torch.from_numpy(lut[raw])


def char_run(steps: int, compile: bool, tick: Callable[[], None]) -> None:
    """The book's loop on the char model for ``SETTLE + steps + 1`` steps, calling
    ``tick()`` at the start of each (when it asks for its batch)."""
    ids = char_ids()

    def batch_fn(step, generator):
        tick()
        return get_batch(ids, 12, CHAR.block_size, generator)

    torch.manual_seed(1337)
    tc = runs.PRESETS["shakespeare-char"].cpu.train
    cfg = replace(tc, max_steps=steps + SETTLE + 1, eval_interval=0, ckpt_interval=0,
                  progress=False, compile=compile)
    train(GPT(CHAR), batch_fn, cfg)


def llmcore_step_ms(steps: int, compile: bool = False) -> list[float]:
    """Per-step wall times (ms): the time between successive calls for a batch, so
    everything a step does is inside."""
    stamps: list[float] = []
    char_run(steps, compile, lambda: stamps.append(time.perf_counter()))
    return [1e3 * (b - a) for a, b in zip(stamps, stamps[1:])][SETTLE:]


def nanogpt_step_ms(path: Path, steps: int, env: dict) -> list[float]:
    """nanoGPT's own per-iteration times (ms), from its log, first steps left out."""
    cmd = [sys.executable, "train.py", *NANO_ARGS, f"--max_iters={steps + SETTLE}"]
    out = subprocess.run(cmd, cwd=path, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"nanoGPT failed in {path} (prepare its data with `python "
                           f"data/shakespeare_char/prepare.py`):\n{out.stderr[-2000:]}")
    times = re.findall(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", out.stdout)
    return [float(t) for t in times][SETTLE + 1:]  # iteration 0 also evaluates


def compare_nanogpt(path: Path, rounds: int, steps: int, threads: int,
                    compile: bool = False, scheduling: str = "normal") -> dict:
    """Interleaved rounds: nanoGPT, then llmcore, each in a fresh process."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    ratios, nano, ours = [], [], []
    cmd = [sys.executable, "-m", "tools.bench", "speed", "--worker", str(steps),
           *(["--compile"] if compile else [])]

    def worker(*extra: str):
        out = subprocess.run([*cmd, *extra], env=env,
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.splitlines()[-1])

    for r in range(rounds):
        n = statistics.median(nanogpt_step_ms(path, steps, env))
        o = statistics.median(worker())
        nano.append(n)
        ours.append(o)
        ratios.append(n / o)
        print(f"  round {r + 1}: nanoGPT {n:.1f} ms, llmcore {o:.1f} ms per step; "
              f"llmcore/nanoGPT tokens/s {n / o:.2f}")
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"), "load_average": os.getloadavg()[0],
            "model": asdict(CHAR), "batch_size": 12, "threads": threads,
            "rounds": rounds, "steps_per_round": steps, "nanogpt_ms": nano,
            "llmcore_compiled": compile, "scheduling": scheduling,
            "llmcore_ms": ours, "ratios": ratios,
            "ratio_median": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
            "llmcore_profile_ms": worker("--profile"),
            "method": "tokens/s ratio = nanoGPT median step time / llmcore median "
                      "step time; each process times its own steps; rounds alternate; "
                      "profile: self CPU ms per step by operator family, one more "
                      "llmcore process under torch.profiler"}


