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
    python -m llmcore.train --data mine.txt --tokenizer bpe --vocab-size 512 \\
        --out runs/mine          # your own text: a UTF-8 file or a folder of .txt
    python -m llmcore.train --data books/ --n-layer 6 --n-embd 192 --out runs/books

``--data`` trains on your own text with the shape and recipe of ``--preset`` (default
``shakespeare-char``, its tier's size) and any of ``--n-layer``, ``--n-head``,
``--n-embd``, ``--block-size``, ``--batch-size``, ``--dropout``. The text is
tokenised once into ``OUT/tokens.bin`` (``--resume`` reads it back) and the last 10%
of its tokens is held out for validation. ``python -m llmcore.sample OUT --prompt
TEXT`` continues a prompt with the trained model.

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
import signal
import sys
from pathlib import Path

import torch.distributed as dist

from llmcore.config import arg_number, override
from llmcore.data.textfiles import TextDataError
from llmcore.runtime import setup
from llmcore.train.loop import PRECISIONS, Interrupted
from llmcore.train.run import PRESETS, RunPreset, run

DATA_PRESET = "shakespeare-char"  # --data without --preset: this shape and recipe
BPE_VOCAB = 512  # --tokenizer bpe without --vocab-size
SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "batch_size")  # --n-layer ...
MAX_SEED = 2**32 - 1  # NumPy's range; a rank's seed adds an offset (parallel.rng)
# what the flags accept (argparse types)
POSITIVE, POSITIVE_REAL = arg_number(integer=True, minimum=1), arg_number(above=0)
SEED = arg_number(integer=True, minimum=0, maximum=MAX_SEED)


def stop_now(signum, frame):
    raise KeyboardInterrupt(signum)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llmcore.train",
                                description="Train a named preset, or on your own "
                                            "text.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help=f"required without --data; with --data, the shape and "
                        f"recipe to train with (default: {DATA_PRESET})")
    p.add_argument("--tier", choices=["cpu", "gpu"], default=None,
                   help="preset size (default: from the device)")
    p.add_argument("--precision", choices=(*PRECISIONS, "auto"), default=None,
                   help="training precision (default: the preset's; auto: the "
                        "device's own, fp16 on a T4, bf16 from Ampere on)")
    p.add_argument("--steps", type=POSITIVE, default=None,
                   help="override max_steps")
    p.add_argument("--stop-at", type=POSITIVE, default=None,
                   help="end after this many steps, the schedule still that of "
                        "--steps; continue the run later with --resume")
    p.add_argument("--lr", type=POSITIVE_REAL, default=None,
                   help="override the peak lr")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: the preset's choice)")
    p.add_argument("--out", default="runs/out", help="folder for checkpoint + metrics")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in OUT from OUT/ckpt.pt")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run already in OUT")
    p.add_argument("--seed", type=SEED, default=0,
                   help=f"random seed, a whole number in [0, {MAX_SEED}] (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    mesh = p.add_argument_group(
        "parallel training (under torchrun; dp x tp = the processes it starts)")
    mesh.add_argument("--dp", type=POSITIVE, default=None,
                      help="data-parallel rows of the device mesh, each sharding the "
                           "model, gradients and optimizer state with FSDP2")
    mesh.add_argument("--tp", type=POSITIVE, default=None,
                      help="tensor-parallel ranks per row of the device mesh")
    own = p.add_argument_group("your own text")
    own.add_argument("--data", default=None,
                     help="a UTF-8 text file or a folder of .txt files to train on; "
                          "the last 10%% of its tokens is held out for validation")
    own.add_argument("--tokenizer", choices=["char", "bpe"], default=None,
                     help="one id per character (default), or byte-level BPE "
                          "trained on the text")
    own.add_argument("--vocab-size", type=POSITIVE, default=None,
                     help=f"bpe: ids in all, 256 bytes + merges (default "
                          f"{BPE_VOCAB})")
    shape = p.add_argument_group("the model's shape (default: the preset's)")
    for flag in SHAPE:
        shape.add_argument(f"--{flag.replace('_', '-')}", type=POSITIVE)
    shape.add_argument("--dropout", type=float, default=None)
    args = p.parse_args(argv)
    if args.preset is None and args.data is None:
        p.error("name a --preset, or give --data PATH to train on your own text")
    if args.vocab_size is not None and args.tokenizer != "bpe":
        p.error("--vocab-size is for --tokenizer bpe; a char tokenizer has one id "
                "per character of the text")
    return args


def own_preset(preset: RunPreset, args: argparse.Namespace) -> RunPreset:
    """``preset`` with ``--data``, ``--tokenizer`` and the shape flags applied."""
    changes = {name: getattr(args, name) for name in (*SHAPE, "dropout")}
    if args.data is not None:  # absolute: the same text wherever --resume runs
        changes["corpus"] = str(Path(args.data).resolve())
    if args.tokenizer is not None:
        changes["tokenizer"] = args.tokenizer
        changes["vocab_size"] = (args.vocab_size or BPE_VOCAB
                                 if args.tokenizer == "bpe" else None)
    return override(preset, **{k: v for k, v in changes.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rt = setup(seed=args.seed, tier=args.tier)
    try:
        preset = own_preset(rt.pick(PRESETS[args.preset or DATA_PRESET]), args)
    except ValueError as err:  # a shape that cannot be (e.g. --n-embd 100 --n-head 3)
        print(f"llmcore.train: {err}", file=sys.stderr)
        return 2
    mesh = (args.dp or 1, args.tp or 1) if args.dp or args.tp else None
    changes = {"max_steps": args.steps, "lr": args.lr, "precision": args.precision,
               "compile": args.compile,
               "progress": False if args.no_progress else None}
    changes = {k: v for k, v in changes.items() if v is not None}
    if "max_steps" in changes:  # keep the warm-up inside a shortened run
        changes["warmup_steps"] = min(preset.train.warmup_steps, args.steps // 10)
    preset = override(preset, train=override(preset.train, **changes))
    # SIGTERM as Ctrl-C outside the training steps (which finish and save first), so
    # that the lock is released and the command ends with one line either way.
    old_term = signal.signal(signal.SIGTERM, stop_now)
    try:
        model, history, _ = run(preset, rt, args.out, resume=args.resume,
                                overwrite=args.overwrite, mesh=mesh,
                                stop_at=args.stop_at)
    except Interrupted as stop:
        if not (dist.is_initialized() and dist.get_rank() > 0):  # one line per run
            print(f"llmcore.train: {stop}", file=sys.stderr)
        return 128 + stop.signum  # the shell's status for a process a signal ended
    except TextDataError as err:  # your own text cannot be used: say why, no trace
        print(f"llmcore.train: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        signum = (stop.args[0] if stop.args and isinstance(stop.args[0], int)
                  else signal.SIGINT)
        print(f"llmcore.train: stopped at once by {signal.Signals(signum).name}; "
              f"{args.out} keeps the last checkpoint saved before", file=sys.stderr)
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, old_term)
    if model is None:  # a parallel run's other ranks: rank 0 reports
        return 0
    val = (f"val loss {history.eval_loss[-1]:.3f}" if history.eval_loss
           else "no validation yet")  # (--stop-at before the first evaluation)
    print(f"{len(history.loss)} steps, final train loss {history.loss[-1]:.3f}, "
          f"{val}, {history.seconds:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
