"""llmcore and nanoGPT side by side on the same CPU model (4 layers, 4 heads, width
128, context 64, batch 12, fp32).

``python -m tools.bench speed --compare-nanogpt PATH`` runs nanoGPT's ``train.py`` (a
checkout at PATH, its shakespeare_char data prepared) and the book's loop in interleaved
rounds, each in a fresh process timing its own steps, and records the ratio of the
median step times, and where llmcore's step spends its time (:mod:`.profile`).

``python -m tools.bench speedrun --compare-nanogpt PATH`` runs nanoGPT's whole CPU
recipe from its README (:func:`run_recipe`): its training time is read from its own
log, evaluation left out, and its final weights are loaded into llmcore's GPT
(:func:`load_checkpoint`), the same network, so that both are scored by the same
evaluation on the same validation split.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
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




# nanoGPT's CPU recipe, as its README gives it for a laptop ("baby GPT" on
# shakespeare_char): 2,000 iterations of batch 12 x 64 characters.
RECIPE = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
          "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12",
          "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
          "--lr_decay_iters=2000", "--dropout=0.0"]
RECIPE_ITERS = 2000


def parse_log(text: str) -> tuple[dict[int, float], set[int]]:
    """``({iteration: ms}, {iterations that began with an evaluation})`` from a
    nanoGPT log (``log_interval=1``)."""
    times = {int(i): float(t) for i, t in
             re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", text)}
    evals = {int(i) for i in re.findall(r"step (\d+): train loss", text)}
    return times, evals


def training_seconds(times: dict[int, float], evals: set[int], iters: int) -> float:
    """Seconds of the first ``iters`` updates (iterations 0 .. iters - 1).

    nanoGPT times an iteration from the end of the one before, so an iteration that
    starts with an evaluation (and, after it, a checkpoint) includes them: those are
    replaced by the median of the others, the evaluation left out as on llmcore's
    side.
    """
    missing = [i for i in range(iters) if i not in times]
    if missing:
        raise ValueError(f"the nanoGPT log lacks iterations {missing[:5]}...: run it "
                         "with --log_interval=1")
    plain = statistics.median(times[i] for i in range(iters) if i not in evals)
    return sum(plain if i in evals else times[i] for i in range(iters)) / 1e3


def run_recipe(path: Path, env: dict, out_dir: Path | None = None) -> dict:
    """nanoGPT's CPU recipe in a fresh process; its training seconds, per-iteration
    median, and the checkpoint holding its weights after ``RECIPE_ITERS`` updates.

    ``--always_save_checkpoint=True`` saves at every evaluation, the one after
    iteration 2,000 included (by default nanoGPT saves only when its 20-batch
    estimate of the validation loss improved); it changes nothing in training.
    """
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="nanogpt-"))
    cmd = [sys.executable, "train.py", *RECIPE, f"--out_dir={out_dir}",
           "--always_save_checkpoint=True"]
    out = subprocess.run(cmd, cwd=path, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"nanoGPT failed in {path} (prepare its data with `python "
                           f"data/shakespeare_char/prepare.py`):\n{out.stderr[-2000:]}")
    times, evals = parse_log(out.stdout)
    logged = re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)",
                        out.stdout)
    return {"seconds": training_seconds(times, evals, RECIPE_ITERS),
            "step_ms": statistics.median(times[i] for i in range(RECIPE_ITERS)
                                         if i not in evals),
            "iters": RECIPE_ITERS, "evaluations_left_out": sorted(
                i for i in evals if i < RECIPE_ITERS),
            "own_val_estimate": {int(s): float(v) for s, v in logged},
            "checkpoint": str(out_dir / "ckpt.pt")}


# nanoGPT's parameter names -> llmcore's GPT (same network: pre-LN blocks, fused
# q/k/v, exact GELU, tied output layer, LayerNorm without bias).
RENAME = (("_orig_mod.", ""), ("transformer.wte", "tok_emb"),
          ("transformer.wpe", "pos_emb"), ("transformer.ln_f", "ln_f"),
          ("transformer.h.", "blocks."), (".ln_1", ".norm1"), (".ln_2", ".norm2"),
          (".attn.c_attn", ".self_attn.qkv_proj"),
          (".attn.c_proj", ".self_attn.out_proj"), (".mlp.c_fc", ".ffn.linear1"),
          (".mlp.c_proj", ".ffn.linear2"))


def load_checkpoint(ckpt_path: str | Path) -> tuple[GPT, dict]:
    """llmcore's GPT holding the weights of a nanoGPT checkpoint, and the checkpoint.

    The checkpoint is nanoGPT's own pickle (its config dict and iteration number
    beside the weights), so it is read with ``weights_only=False``: only load
    checkpoints this benchmark has just written.
    """
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    args = ckpt["model_args"]
    cfg = GPTConfig(args["vocab_size"], args["block_size"], args["n_layer"],
                    args["n_head"], args["n_embd"], bias=args["bias"])
    state = {}
    for name, value in ckpt["model"].items():
        for theirs, ours in RENAME:
            name = name.replace(theirs, ours)
        state[name] = value
    model = GPT(cfg)
    model.load_state_dict(state)  # strict: every weight found, none left over
    return model.eval(), ckpt


def check_same_network(path: Path, ckpt: dict, model: GPT, x: torch.Tensor,
                       y: torch.Tensor) -> float:
    """The largest difference between the logits of nanoGPT's own model (its
    ``model.py``, loaded from ``path``) and of ``model`` on ``x``; raises above
    1e-4: then the two are not the same network and the comparison is void."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", path / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    theirs = module.GPT(module.GPTConfig(**ckpt["model_args"]))
    theirs.load_state_dict({k.replace("_orig_mod.", ""): v
                            for k, v in ckpt["model"].items()})
    with torch.no_grad():
        ref, _ = theirs.eval()(x, y)  # with targets: logits at every position
        mine, _ = model(x, y)
    diff = (ref - mine).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"nanoGPT's model and llmcore's GPT with its weights "
                           f"differ by {diff:.2e} in the logits: the mapping of "
                           "parameter names (RENAME) does not fit this checkout")
    return diff
