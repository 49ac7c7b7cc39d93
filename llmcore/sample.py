"""``python -m llmcore.sample RUN --prompt TEXT``: continue a prompt with a trained run.

    python -m llmcore.sample runs/mine --prompt "the cat" --seed 1
    python -m llmcore.sample runs/mine --prompt-file start.txt --num-samples 3 \\
        --max-new-tokens 300 --temperature 0.8 --top-k 50 --top-p 0.95
    echo "ROMEO:" | python -m llmcore.sample runs/char --prompt -

``RUN`` is the ``--out`` folder of ``python -m llmcore.train``: its ``ckpt.pt``
(loaded with ``weights_only=True``, which cannot run code) and ``tokenizer.json``.
The text is drawn with the KV cache (:func:`llmcore.generate.generate`) from a CPU
random generator seeded with ``--seed``: the same seed gives the same text, on any
device. Each sample is printed whole, the prompt and then its continuation.

In a notebook, ``from llmcore.sample import sample, load_run``: ``sample("runs/mine",
"the cat", seed=1)`` returns the samples as a list of strings; ``load_run(path)``
gives the model and tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from llmcore.config import arg_number
from llmcore.generate import generate
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.runtime import select_device
from llmcore.tokenizer import BPETokenizer, CharTokenizer, Tokenizer
from llmcore.train.checkpoint import CheckpointError, read_checkpoint

TOKENIZERS = {cls.KIND: cls for cls in (CharTokenizer, BPETokenizer)}


class RunError(ValueError):
    """The folder does not hold a run this command can sample from."""


@dataclass
class Run:
    """A trained run, ready to sample: its model (eval mode) and tokenizer."""

    model: GPT
    tokenizer: Tokenizer
    path: Path
    step: int  # optimizer updates the weights have had


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer saved at ``path``, whichever kind it is."""
    try:
        kind = json.loads(path.read_text(encoding="utf-8")).get("type")
    except (OSError, ValueError, AttributeError) as err:
        raise RunError(f"{path} is not a tokenizer file ({err})") from None
    if kind not in TOKENIZERS:
        raise RunError(f"{path} holds a tokenizer of type {kind!r}; llmcore reads "
                       f"{sorted(TOKENIZERS)}")
    return TOKENIZERS[kind].load(path)


def model_config(meta: dict, vocab_size: int) -> GPTConfig:
    """The GPT's shape: stored by the training run, or (older runs) its preset's."""
    if "model" in meta:
        return GPTConfig(**meta["model"])
    p = meta["preset"]
    return GPTConfig(vocab_size, p["block_size"], p["n_layer"], p["n_head"],
                     p["n_embd"], dropout=p.get("dropout", 0.0))


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """The model and tokenizer of the run in folder ``path``, on ``device``."""
    path = Path(path)
    ckpt, tok_file = path / "ckpt.pt", path / "tokenizer.json"
    if not path.is_dir():
        raise RunError(f"{path}: no such folder. Pass the --out folder of a run of "
                       "`python -m llmcore.train`")
    missing = [f.name for f in (ckpt, tok_file) if not f.is_file()]
    if missing:
        raise RunError(f"{path} is not a training run: it has no {' or '.join(missing)}"
                       ". Pass the --out folder of `python -m llmcore.train` (a run "
                       "writes both when it saves)")
    tokenizer = load_tokenizer(tok_file)
    try:
        payload = read_checkpoint(ckpt, map_location=device)
        meta = payload["extra"]["meta"]
        model = GPT(model_config(meta, tokenizer.vocab_size))
        model.load_state_dict(payload["model"])
    except (CheckpointError, KeyError, TypeError, ValueError, RuntimeError) as err:
        raise RunError(f"{ckpt} is not the checkpoint of an llmcore GPT run "
                       f"({type(err).__name__}: {str(err)[:300]})") from None
    if model.config.vocab_size < tokenizer.vocab_size:
        raise RunError(f"{tok_file} has {tokenizer.vocab_size} ids but the model "
                       f"only {model.config.vocab_size}: they are not of one run")
    return Run(model.to(device).eval(), tokenizer, path, payload["step"])


@torch.no_grad()
def sample(run: Run | str | Path, prompt: str, max_new_tokens: int = 200,
           temperature: float = 0.8, top_k: int | None = None,
           top_p: float | None = None, num_samples: int = 1, seed: int = 0,
           device: str | torch.device | None = None) -> list[str]:
    """``num_samples`` continuations of ``prompt``, each returned as prompt + new
    text. ``run``: a :class:`Run` or a run folder (loaded on ``device``, default
    the best there is). A prompt longer than the context is cut to its last
    ``block_size`` tokens for the model (the returned text keeps it whole)."""
    if not isinstance(run, Run):
        run = load_run(run, select_device(device))
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("the prompt is empty; give the model some text to continue")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or \
            num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    ids = run.tokenizer.encode(prompt)[-run.model.config.block_size:]
    device = next(run.model.parameters()).device
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator().manual_seed(seed)  # CPU: one text on any device
    out = generate(run.model, idx, max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, generator=generator, compile=False)
    return [prompt + run.tokenizer.decode(row[len(ids):].tolist()) for row in out]


# what the flags accept (argparse types)
WHOLE, COUNT = arg_number(integer=True, minimum=0), arg_number(integer=True, minimum=1)
NUMBER = arg_number()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llmcore.sample",
                                description="Continue a prompt with a trained run.")
    p.add_argument("run", help="the --out folder of `python -m llmcore.train`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the text to continue; - reads standard input")
    src.add_argument("--prompt-file", help="a UTF-8 file holding the prompt")
    p.add_argument("--max-new-tokens", type=WHOLE, default=200)
    p.add_argument("--temperature", type=NUMBER, default=0.8,
                   help="0: greedy; below 1 sharper, above 1 flatter")
    p.add_argument("--top-k", type=COUNT, default=None,
                   help="sample among the k likeliest tokens only")
    p.add_argument("--top-p", type=NUMBER, default=None,
                   help="sample among the likeliest tokens holding this probability")
    p.add_argument("--num-samples", type=COUNT, default=1)
    p.add_argument("--seed", type=WHOLE, default=0,
                   help="the same seed gives the same text")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, mps (default: the best there is)")
    return p.parse_args(argv)


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        try:
            return Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise RunError(f"--prompt-file {args.prompt_file}: cannot read it as "
                           f"UTF-8 text ({err})") from None
    return sys.stdin.read() if args.prompt == "-" else args.prompt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        device = select_device(args.device)
        texts = sample(load_run(args.run, device), read_prompt(args),
                       args.max_new_tokens, args.temperature, args.top_k,
                       args.top_p, args.num_samples, args.seed)
    except (ValueError, RuntimeError) as err:  # RunError, bad prompt or settings
        print(f"llmcore.sample: {err}", file=sys.stderr)
        return 1
    for i, text in enumerate(texts):
        if i:
            print("\n" + "-" * 40)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
