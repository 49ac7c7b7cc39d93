"""``python -m llmcore.train --preset NAME``: train a named preset from a shell.

    python -m llmcore.train --preset shakespeare-char                # the tier's size
    python -m llmcore.train --preset shakespeare-char --tier cpu --steps 500 \\
        --precision bf16 --out runs/char
    python -m llmcore.train --preset shakespeare-char --tier cpu --steps 800 \\
        --precision bf16 --out runs/char --resume                    # 300 more steps
    python -m llmcore.train --preset shakespeare-char --steps 2000 --stop-at 500 \\
        --out runs/part                  # 500 of 2,000 steps; --resume does the rest
    torchrun --standalone --nproc_per_node 2 -m llmcore.train \\
        --preset shakespeare-char --dp 2 --steps 200 --out runs/fsdp   # FSDP2
    torchrun --standalone --nproc_per_node 4 -m llmcore.train \\
        --preset shakespeare-char --dp 2 --tp 2 --steps 200 --out runs/mesh

writes ``OUT/ckpt.pt`` (every ``ckpt_interval`` steps and at the end; ``--resume``
continues from it), ``OUT/tokenizer.json`` and ``OUT/metrics.json`` (the history, the
preset, a sample of generated text, the hardware and the torch version). A folder that
holds a run needs ``--resume`` or ``--overwrite``; a lock file keeps a second run out
of it. A ``--dp``/``--tp`` run checkpoints in shards (``OUT/ckpt.dcp``), and
``--resume`` continues it on any number of processes. The presets and the run itself
are in :mod:`llmcore.train.run`.
"""

from __future__ import annotations

import argparse
import math
import sys

from llmcore.config import override
from llmcore.runtime import setup
from llmcore.train.loop import PRECISIONS, Interrupted
from llmcore.train.run import PRESETS, run


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got "
                                         f"{text}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llmcore.train",
                                description="Train a named preset.")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--tier", choices=["cpu", "gpu"], default=None,
                   help="preset size (default: from the device)")
    p.add_argument("--precision", choices=PRECISIONS, default=None)
    p.add_argument("--steps", type=positive_int, default=None,
                   help="override max_steps")
    p.add_argument("--stop-at", type=positive_int, default=None,
                   help="end after this many steps, the schedule still that of "
                        "--steps; continue the run later with --resume")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="override the peak lr")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: the preset's choice)")
    p.add_argument("--out", default="runs/out", help="folder for checkpoint + metrics")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in OUT from OUT/ckpt.pt")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run already in OUT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    mesh = p.add_argument_group(
        "parallel training (under torchrun; dp x tp = the processes it starts)")
    mesh.add_argument("--dp", type=positive_int, default=None,
                      help="data-parallel rows of the device mesh, each sharding the "
                           "model, gradients and optimizer state with FSDP2")
    mesh.add_argument("--tp", type=positive_int, default=None,
                      help="tensor-parallel ranks per row of the device mesh")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rt = setup(seed=args.seed, tier=args.tier)
    preset = rt.pick(PRESETS[args.preset])
    mesh = (args.dp or 1, args.tp or 1) if args.dp or args.tp else None
    changes = {"max_steps": args.steps, "lr": args.lr, "precision": args.precision,
               "compile": args.compile,
               "progress": False if args.no_progress else None}
    changes = {k: v for k, v in changes.items() if v is not None}
    if "max_steps" in changes:  # keep the warm-up inside a shortened run
        changes["warmup_steps"] = min(preset.train.warmup_steps, args.steps // 10)
    preset = override(preset, train=override(preset.train, **changes))
    try:
        model, history, _ = run(preset, rt, args.out, resume=args.resume,
                                overwrite=args.overwrite, mesh=mesh,
                                stop_at=args.stop_at)
    except Interrupted as stop:
        print(f"llmcore.train: {stop}", file=sys.stderr)
        return 128 + stop.signum  # the shell's status for a process a signal ended
    if model is None:  # a parallel run's other ranks: rank 0 reports
        return 0
    last = history.eval_loss[-1] if history.eval_loss else float("nan")
    print(f"{len(history.loss)} steps, final train loss {history.loss[-1]:.3f}, "
          f"val loss {last:.3f}, {history.seconds:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
