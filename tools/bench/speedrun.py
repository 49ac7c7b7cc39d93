"""Time to loss: ``python -m tools.bench speedrun``.

Trains the character model on tiny-shakespeare to a target validation loss and
measures the training wall time it took: the time of the steps alone, evaluation left
out, evaluation on the *whole* validation split (the last 10% of the text, every
character scored once in windows of 64) every ``eval_every`` steps. The time to the
target is the training time at the first evaluation at or below it.

A ladder of recipes (:mod:`tools.bench.ladder`) adds one change at a time: precision,
the attention kernel, the learning rate and its schedule, Muon, the batch, then the
architecture. A rung that does not pay is measured and left out of what follows.

``--compare-nanogpt DIR`` first runs nanoGPT's CPU recipe from its README (a checkout
at DIR with ``data/shakespeare_char`` prepared), loads its final weights into
llmcore's GPT and scores them with the same evaluation: that loss is the target. Then,
in interleaved rounds, nanoGPT again and every rung, each in a fresh process with the
same threads; ``--realtime`` runs them all under round-robin real-time scheduling.
``--json PATH`` writes the rounds, the rungs (each rung's times, steps, tokens, FLOPs
and loss curves), the CPU, the load, the date and the torch version.

``--gpu`` runs the same ladder at GPT-2 small's shape (12 layers, width 768) on one
CUDA GPU (``results/speedrun-<gpu>.json``); its target is the baseline rung's lowest
validation loss.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from llmcore.accounting import flops_per_token
from llmcore.data import get_batch, split_tokens
from llmcore.io import atomic_write
from llmcore.models.gpt import GPT
from llmcore.train import train
from llmcore.train.muon import Muon, muon_param_groups
from tools.bench import nanogpt
from tools.bench.ladder import EVAL_CONTEXT, LADDERS, Recipe, Rung
from tools.bench.nanogpt import char_ids
from tools.bench.parallel import hardware, realtime
from tools.bench.results import slug


def splits() -> tuple[torch.Tensor, torch.Tensor]:
    """tiny-shakespeare's character ids, split as nanoGPT's ``prepare.py`` splits
    them: the first 90% to train on, the last 10% to validate."""
    return split_tokens(char_ids(), 0.1)


@torch.no_grad()
def full_val_loss(model: torch.nn.Module, val: torch.Tensor,
                  context: int = EVAL_CONTEXT, chunk: int = 256) -> float:
    """Mean cross-entropy over the whole validation split, in fp32: the split cut
    into consecutive windows of ``context`` characters, each character predicted
    once (the few after the last whole window are left out)."""
    device = next(model.parameters()).device
    n = (len(val) - 1) // context
    x = val[:n * context].view(n, context)  # (N, T)
    y = val[1:n * context + 1].view(n, context)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, n, chunk):
        logits, _ = model(x[i:i + chunk].to(device))  # (b, T, V)
        total += F.cross_entropy(logits.float().flatten(0, 1),
                                 y[i:i + chunk].to(device).flatten(),
                                 reduction="sum").double()
    model.train(was_training)
    return total.item() / (n * context)


def crossing(curve: list[list[float]], target: float) -> float | None:
    """The training seconds at which the curve of ``[step, seconds, loss]`` points,
    drawn straight between evaluations, first meets ``target`` (an estimate finer
    than the evaluation at or below it); None if it never does."""
    before = None
    for _, seconds, loss in curve:
        if loss <= target:
            if before is None:
                return seconds
            return before[0] + (seconds - before[0]) * (before[1] - target) / (
                before[1] - loss)
        before = (seconds, loss)
    return None


class TargetReached(Exception):
    """Raised from the step hook to end a run at its first evaluation at the target."""


def make_optimizer(model: GPT, recipe: Recipe) -> torch.optim.Optimizer | None:
    """Muon for the hidden matrices and AdamW for the rest; None: the loop's AdamW."""
    if not recipe.muon_lr:
        return None
    t = recipe.train
    groups = muon_param_groups(model, recipe.muon_lr, t.lr, weight_decay=0.0,
                               adam_weight_decay=0.0)
    return Muon(groups, momentum=recipe.muon_momentum, betas=t.betas)


def run_rung(recipe: Recipe, seed: int, target: float | None,
             device: torch.device, budget: float | None = None) -> dict:
    """Train ``recipe`` with ``seed`` until its schedule ends, an evaluation is at
    or below ``target``, or (evaluating then) ``budget`` seconds of training are
    spent; the curve of (steps, training seconds, validation loss)."""
    train_ids, val = splits()
    torch.manual_seed(seed)
    model = GPT(recipe.model).to(device)
    optimizer = make_optimizer(model, recipe)
    cfg, batch = recipe.train, recipe.batch_size
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    clock = {"start": None, "eval": 0.0}
    curve: list[list[float]] = []
    step_times: list[float] = []

    def batch_fn(step, generator):
        now = time.perf_counter()
        if clock["start"] is None:
            clock["start"] = now
        step_times.append(now)
        return get_batch(train_ids, batch, recipe.model.block_size, generator)

    def over_budget() -> bool:
        if budget is None:
            return False
        sync(device)
        return time.perf_counter() - clock["start"] - clock["eval"] >= budget

    def on_step(done, *_):
        spent = over_budget()
        if done % recipe.eval_every and done != cfg.max_steps and not spent:
            return
        sync(device)
        now = time.perf_counter()
        seconds = now - clock["start"] - clock["eval"]
        loss = full_val_loss(model, val)
        clock["eval"] += time.perf_counter() - now  # evaluation is not training
        curve.append([done, seconds, loss])
        if spent or (target is not None and loss <= target):
            raise TargetReached

    try:
        train(model, batch_fn, cfg, optimizer=optimizer, on_step=on_step,
              generator=torch.Generator().manual_seed(seed))
    except TargetReached:
        pass
    hit = next((c for c in curve if target is not None and c[2] <= target), None)
    steps = hit[0] if hit else curve[-1][0]
    tokens = steps * batch * recipe.model.block_size
    gaps = sorted(b - a for a, b in zip(step_times, step_times[1:]))
    return {"seed": seed, "curve": curve, "reached": hit is not None,
            "seconds": hit[1] if hit else None,
            "crossing_seconds": crossing(curve, target) if hit else None,
            "end_seconds": curve[-1][1], "steps": steps, "tokens": tokens,
            "flops": tokens * flops_per_token(recipe.model),
            "final_val_loss": curve[-1][2], "best_val_loss": min(c[2] for c in curve),
            "step_ms": 1e3 * gaps[len(gaps) // 2] if gaps else None}


def worker(ladder: str, index: int, seed: int, target: float | None,
           env: dict) -> dict:
    """One rung in a fresh process, with the threads of ``env`` (OMP_NUM_THREADS)
    and the scheduling of this one."""
    cmd = [sys.executable, "-m", "tools.bench", "speedrun", "--ladder", ladder,
           "--worker", str(index), "--seed", str(seed),
           "--threads", env["OMP_NUM_THREADS"]]
    if target is not None:
        cmd += ["--target", repr(target)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"rung {index} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def nanogpt_round(path: Path, env: dict, val: torch.Tensor) -> dict:
    """nanoGPT's recipe once: its training seconds and its weights' loss under our
    evaluation (checked to be nanoGPT's own network first)."""
    with tempfile.TemporaryDirectory(prefix="nanogpt-") as out_dir:
        run = nanogpt.run_recipe(path, env, Path(out_dir))
        model, ckpt = nanogpt.load_checkpoint(run.pop("checkpoint"))
    n = 8 * EVAL_CONTEXT
    x, y = val[:n].view(8, -1), val[1:n + 1].view(8, -1)
    run["same_network_max_logit_diff"] = nanogpt.check_same_network(path, ckpt, model,
                                                                    x, y)
    run["val_loss"] = full_val_loss(model, val)
    return run


def median_or_none(values: list) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if len(got) * 2 > len(values) else None


def summarise(rungs: tuple[Rung, ...], rows: list[list[dict]]) -> list[dict]:
    """Per rung: its recipe, and per round its seconds, steps and curve."""
    out = []
    for i, rung in enumerate(rungs):
        runs = [r[i] for r in rows]
        out.append({"name": rung.name, "why": rung.why, "kept": rung.kept,
                    "recipe": asdict(rung.recipe),
                    "flops_per_token": flops_per_token(rung.recipe.model),
                    "seconds": [r["seconds"] for r in runs],
                    "median_seconds": median_or_none([r["seconds"] for r in runs]),
                    "reached": [r["reached"] for r in runs],
                    **{k: [r[k] for r in runs] for k in (
                        "steps", "tokens", "flops", "final_val_loss", "step_ms",
                        "crossing_seconds", "end_seconds", "seed")},
                    "curves": [r["curve"] for r in runs]})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench speedrun",
                                description="Time to a target validation loss.")
    p.add_argument("--compare-nanogpt", metavar="DIR", type=Path, default=None,
                   help="a nanoGPT checkout: its CPU recipe sets the target")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 1)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument("--realtime", action="store_true",
                   help="round-robin real-time scheduling (root or CAP_SYS_NICE)")
    p.add_argument("--target", type=float, default=None,
                   help="validation loss to reach (default: nanoGPT's, or on --gpu "
                        "the baseline rung's lowest)")
    p.add_argument("--gpu", action="store_true", help="the GPT-2-small ladder on CUDA")
    p.add_argument("--rungs", default=None,
                   help="comma-separated rung names to run (default: all)")
    p.add_argument("--json", type=Path, default=None, help="where to write results")
    p.add_argument("--ladder", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    ladder_name = args.ladder or ("gpu" if args.gpu else "cpu")
    ladder = LADDERS[ladder_name]()
    if args.worker is not None:  # one rung, in this process
        torch.set_num_threads(args.threads)
        device = torch.device("cuda" if ladder_name == "gpu" else "cpu")
        print(json.dumps(run_rung(ladder[args.worker].recipe, args.seed, args.target,
                                  device)))
        return 0
    return run_rounds(args, ladder_name, ladder)


def run_rounds(args, ladder_name: str, ladder: tuple[Rung, ...]) -> int:
    if args.rounds < 1 or args.threads < 1:
        raise SystemExit("--rounds and --threads must be at least 1")
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device and none is visible; run the CPU "
                         "ladder without --gpu")
    if args.gpu and args.compare_nanogpt:
        raise SystemExit("--compare-nanogpt runs nanoGPT's CPU recipe; leave out --gpu")
    picked = list(range(len(ladder)))
    if args.rungs:
        names = [r.name for r in ladder]
        wanted = [n.strip() for n in args.rungs.split(",")]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise SystemExit(f"--rungs: unknown {unknown}; the {ladder_name} ladder "
                             f"has {names}")
        picked = [names.index(n) for n in wanted]
    final_index = next(i for i in reversed(picked) if ladder[i].kept)
    policy = realtime() if args.realtime else "normal"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    _, val = splits()
    target, nano, rows, rounds = args.target, [], [], []
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        row: dict = {"round": r + 1, "seed": r}
        if args.compare_nanogpt is not None:
            nano.append(nanogpt_round(args.compare_nanogpt, env, val))
            if target is None:  # the first run of nanoGPT sets the target
                target = nano[0]["val_loss"]
            row.update(nanogpt_seconds=nano[-1]["seconds"],
                       nanogpt_step_ms=nano[-1]["step_ms"],
                       nanogpt_val_loss=nano[-1]["val_loss"])
            print(f"round {r + 1}: nanoGPT {nano[-1]['seconds']:.1f} s, validation "
                  f"loss {nano[-1]['val_loss']:.4f} (target {target:.4f})", flush=True)
        runs = []
        for i in picked:
            if target is None and i == picked[0]:  # --gpu: the baseline's best
                runs.append(worker(ladder_name, i, r, None, env))
                target = runs[-1]["best_val_loss"]
            else:
                runs.append(worker(ladder_name, i, r, target, env))
            got = runs[-1]
            print(f"  {ladder[i].name:24s} " + (
                f"{got['seconds']:7.1f} s to target, {got['steps']} steps"
                if got["reached"] else f"not reached: {got['final_val_loss']:.4f} "
                f"after {got['steps']} steps"), flush=True)
        rows.append(runs)
        final = runs[picked.index(final_index)]  # the recipe with every kept change
        row.update(llmcore_seconds=final["seconds"], llmcore_steps=final["steps"],
                   rungs={ladder[i].name: got["seconds"]
                          for i, got in zip(picked, runs)},
                   load_average=os.getloadavg()[0])
        if "nanogpt_seconds" in row and final["seconds"]:
            row["speedup"] = row["nanogpt_seconds"] / final["seconds"]
        rounds.append(row)
        load.append(os.getloadavg()[0])
    result = {
        "benchmark": "speedrun", "ladder": ladder_name,
        "hardware": (torch.cuda.get_device_name() if args.gpu else hardware()),
        "device": "cuda" if args.gpu else "cpu", "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "threads": args.threads, "scheduling": policy,
        "load_average": {"before": load[0], "after_each_round": load[1:],
                         "note": "1-minute load average of the whole machine: the "
                                 "other programs running beside the benchmark"},
        "target_val_loss": target,
        "target_source": ("nanoGPT's CPU recipe, first round, scored by "
                          "full_val_loss" if args.compare_nanogpt else
                          "--target" if args.target else
                          "the baseline rung's lowest validation loss"),
        "evaluation": {"split": "last 10% of tiny-shakespeare", "context": EVAL_CONTEXT,
                       "characters": (len(val) - 1) // EVAL_CONTEXT * EVAL_CONTEXT,
                       "precision": "fp32"},
        "final_recipe": asdict(ladder[final_index].recipe),
        "final_rung": ladder[final_index].name,
        "rounds": rounds, "rungs": summarise(tuple(ladder[i] for i in picked), rows)}
    if nano:
        result["nanogpt"] = {"recipe": nanogpt.RECIPE, "runs": nano}
        ratios = [r["speedup"] for r in rounds if "speedup" in r]
        result["speedup_median"] = statistics.median(ratios) if ratios else None
        result["speedup_range"] = [min(ratios), max(ratios)] if ratios else None
        print(f"llmcore reaches nanoGPT's loss {result['speedup_median']:.2f}x faster "
              f"(median of {len(ratios)} rounds)")
    name = slug(result["hardware"]) if args.gpu else "cpu"
    path = args.json or Path("results") / f"speedrun-{name}.json"
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"-> {path}")
    return 0
