"""``python -m llmcore.train --preset NAME``: train a named preset from a shell.

    python -m llmcore.train --preset shakespeare-char                # the tier's size
    python -m llmcore.train --preset shakespeare-char --tier cpu --steps 500 \\
        --precision bf16 --out runs/char

writes ``OUT/ckpt.pt`` (every ``ckpt_interval`` steps and at the end; ``--resume``
continues from it), ``OUT/tokenizer.json`` and ``OUT/metrics.json`` (the history, the
preset, a sample of generated text, the hardware and the torch version).

The run is built in three steps: the data (:func:`build_data`), the model
(:func:`build_model`), then :func:`prepare_model`, the one place where the model is
moved to its device and where a later ``--parallel`` option wraps it (DDP, FSDP,
tensor parallel) before :func:`llmcore.train.train` sees it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmcore.config import Tiered, override
from llmcore.data import get_batch, load_corpus, split_tokens
from llmcore.generate import generate
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.runtime import Runtime, device_name, setup
from llmcore.tokenizer import CharTokenizer
from llmcore.train.loop import PRECISIONS, History, TrainConfig, train


@dataclass(frozen=True)
class RunPreset:
    """A GPT on a corpus: the model's shape, the batch, and how to train it."""

    corpus: str  # a name for llmcore.data.load_corpus
    n_layer: int  # GPT blocks
    n_head: int  # attention heads
    n_embd: int  # model width
    block_size: int  # context length (tokens)
    batch_size: int  # sequences per micro-batch
    dropout: float = 0.0
    train: TrainConfig = field(default_factory=TrainConfig)
    val_fraction: float = 0.1  # the last 10% of the corpus is validation data


PRESETS: dict[str, Tiered[RunPreset]] = {
    # CPU: the book's target, validation loss <= 1.9 within 2,000 steps (nanoGPT's CPU
    # recipe, a higher learning rate). GPU: nanoGPT's shakespeare-char model.
    "shakespeare-char": Tiered(
        cpu=RunPreset("shakespeare", n_layer=4, n_head=4, n_embd=128, block_size=64,
                      batch_size=12, train=TrainConfig(
                          max_steps=2000, lr=2e-3, warmup_steps=100, betas=(0.9, 0.99),
                          eval_interval=250, eval_steps=20, ckpt_interval=500)),
        gpu=RunPreset("shakespeare", n_layer=6, n_head=6, n_embd=384, block_size=256,
                      batch_size=64, dropout=0.2, train=TrainConfig(
                          max_steps=5000, lr=1e-3, warmup_steps=100, betas=(0.9, 0.99),
                          eval_interval=250, eval_steps=200, precision="bf16",
                          ckpt_interval=1000)),
    ),
}


@dataclass(frozen=True)
class RunData:
    """A tokenized corpus split for training."""

    tokenizer: CharTokenizer
    train: torch.Tensor  # 1-D token ids
    val: torch.Tensor


def build_data(preset: RunPreset) -> RunData:
    text = load_corpus(preset.corpus)
    tok = CharTokenizer.train(text)
    ids = torch.from_numpy(np.array(tok.encode(text), dtype=np.int64))
    train_ids, val_ids = split_tokens(ids, preset.val_fraction)
    return RunData(tok, train_ids, val_ids)


def build_model(preset: RunPreset, vocab_size: int) -> GPT:
    return GPT(GPTConfig(vocab_size, preset.block_size, preset.n_layer, preset.n_head,
                         preset.n_embd, dropout=preset.dropout))


def prepare_model(model: torch.nn.Module, rt: Runtime) -> torch.nn.Module:
    """Move the model to the run's device; parallel wrappers will be applied here."""
    return model.to(rt.device)


def batch_fns(data: RunData, preset: RunPreset):
    """``(train_fn, val_fn)`` in the ``batch_fn(step, generator)`` form of ``train``."""
    def train_fn(step, generator):
        return get_batch(data.train, preset.batch_size, preset.block_size, generator)

    def val_fn(step, generator):
        return get_batch(data.val, preset.batch_size, preset.block_size, generator)
    return train_fn, val_fn


def run(preset: RunPreset, rt: Runtime, out: str | Path | None = None,
        resume: bool = False) -> tuple[GPT, History, RunData]:
    """Train ``preset``; with ``out``, write checkpoint, tokenizer and metrics there."""
    data = build_data(preset)
    model = build_model(preset, data.tokenizer.vocab_size)
    model = prepare_model(model, rt)
    train_fn, val_fn = batch_fns(data, preset)
    ckpt = Path(out) / "ckpt.pt" if out is not None else None
    generator = torch.Generator().manual_seed(rt.seed)
    history = train(model, train_fn, preset.train, val_batch_fn=val_fn,
                    generator=generator, ckpt_path=ckpt, resume=resume)
    if out is not None:
        write_outputs(Path(out), preset, rt, model, history, data)
    return model, history, data


def write_outputs(out: Path, preset: RunPreset, rt: Runtime, model: GPT,
                  history: History, data: RunData) -> None:
    data.tokenizer.save(out / "tokenizer.json")
    prompt = torch.tensor([data.tokenizer.encode("\n")], device=rt.device)
    sample = generate(model, prompt, 200, temperature=0.8, top_k=50,
                      generator=torch.Generator(rt.device).manual_seed(rt.seed))
    metrics = {
        "preset": asdict(preset), "tier": rt.tier, "device": device_name(rt.device),
        "torch": torch.__version__, "params": model.num_params(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "history": history.to_dict(),
        "sample": data.tokenizer.decode(sample[0].tolist()),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llmcore.train",
                                description="Train a named preset.")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--tier", choices=["cpu", "gpu"], default=None,
                   help="preset size (default: from the device)")
    p.add_argument("--precision", choices=PRECISIONS, default=None)
    p.add_argument("--steps", type=int, default=None, help="override max_steps")
    p.add_argument("--lr", type=float, default=None, help="override the peak lr")
    p.add_argument("--compile", action="store_true", help="use torch.compile")
    p.add_argument("--out", default="runs/out", help="folder for checkpoint + metrics")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rt = setup(seed=args.seed, tier=args.tier)
    preset = rt.pick(PRESETS[args.preset])
    changes = {"max_steps": args.steps, "lr": args.lr, "precision": args.precision,
               "compile": args.compile or None,
               "progress": False if args.no_progress else None}
    changes = {k: v for k, v in changes.items() if v is not None}
    if "max_steps" in changes:  # keep the warm-up inside a shortened run
        changes["warmup_steps"] = min(preset.train.warmup_steps, args.steps // 10)
    preset = override(preset, train=override(preset.train, **changes))
    _, history, _ = run(preset, rt, args.out, resume=args.resume)
    last = history.eval_loss[-1] if history.eval_loss else float("nan")
    print(f"{len(history.loss)} steps, final train loss {history.loss[-1]:.3f}, "
          f"val loss {last:.3f}, {history.seconds:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
