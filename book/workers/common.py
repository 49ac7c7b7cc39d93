"""What every parallel experiment shares: the demo GPT, its data, one-process
references, a way to compare weights, and the code of an exercise's printed
solution (so that a chapter can check its own answers)."""

from __future__ import annotations

import re
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmcore.config import Tiered, check_fields
from llmcore.data import load_corpus
from llmcore.data.lm import get_batch
from llmcore.models.gpt import GPTConfig
from llmcore.tokenizer.char import CharTokenizer
from llmcore.train import TrainConfig, train


@dataclass(frozen=True)
class DemoConfig:
    """The GPT and the run that the parallel chapters train on several ranks."""

    n_layer: int  # blocks (a multiple of the pipeline stages)
    n_head: int  # heads (a multiple of the tensor-parallel ranks)
    n_embd: int  # model width C
    block_size: int  # context T
    batch: int  # global batch, split across data-parallel ranks
    steps: int  # training steps per run
    lr: float  # SGD learning rate

    def __post_init__(self):
        check_fields(self, "n_layer", "n_head", "n_embd", "block_size", "batch",
                     "steps", integer=True, above=0)
        check_fields(self, "lr", above=0)

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size,
                         n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd)


# The gpu tier trains a larger model for longer; its ranks run on GPUs with NCCL
# where each has one (launch.default_backend), else on CPU processes with gloo.
DEMO = Tiered(cpu=DemoConfig(2, 4, 32, 32, 8, 20, 0.5),
              gpu=DemoConfig(4, 4, 128, 64, 32, 200, 0.5))


def shakespeare_batches(demo: DemoConfig, seed: int = 0, chars: int = 200_000):
    """(GPTConfig, (X, Y)): character batches (steps, batch, T) of Shakespeare."""
    text = load_corpus("shakespeare")
    tok = CharTokenizer.train(text)  # the whole corpus: every character has an id
    ids = torch.tensor(tok.encode(text[:chars]))
    g = torch.Generator().manual_seed(seed)
    xs, ys = zip(*(get_batch(ids, demo.batch, demo.block_size, generator=g)
                   for _ in range(demo.steps)))
    return demo.gpt_config(tok.vocab_size), (torch.stack(xs), torch.stack(ys))


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest difference between two state dicts with the same keys."""
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def local_batches(data, rank: int, world_size: int, device="cpu"):
    """This rank's slice of every batch of ``data`` = (X, Y), on ``device``."""
    for x, y in zip(*data):
        yield (x.chunk(world_size)[rank].to(device),
               y.chunk(world_size)[rank].to(device))


def to_cpu(state: dict) -> dict:
    """Copies of a state dict's tensors on the CPU, where results are compared."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def plain_config(steps: int, grad_accum: int = 1) -> TrainConfig:
    """The book's loop with nothing added, so that runs compare exactly: a constant
    learning rate (the optimizer's own), no clipping, no weight decay, quiet."""
    return TrainConfig(max_steps=steps, grad_accum=grad_accum, warmup_steps=0,
                       min_lr_ratio=1.0, grad_clip=0.0, weight_decay=0.0,
                       log_interval=steps, progress=False)


def replay(data, rank: int = 0, world_size: int = 1, accumulate: int = 1):
    """A ``batch_fn(step, generator)`` for :func:`llmcore.train.train` that hands out
    this rank's slice of step ``step``'s batch of ``data = (X, Y)``, in
    ``accumulate`` micro-batches (one per call)."""
    calls = {"n": 0}

    def batch_fn(step, generator):
        micro = calls["n"] % accumulate
        calls["n"] += 1
        x = data[0][step].chunk(world_size)[rank].chunk(accumulate)[micro]
        y = data[1][step].chunk(world_size)[rank].chunk(accumulate)[micro]
        return x, y
    return batch_fn


def train_single(model_fn, data, lr: float = 0.1, seed: int = 0, device="cpu",
                 optimizer=torch.optim.SGD) -> dict:
    """The reference: one process, the full batch, the book's loop with ``optimizer``
    (plain SGD), on ``device`` (the ranks' kind of device, so that both round
    alike); weights come back on the CPU."""
    torch.manual_seed(seed)
    model = model_fn().to(device)
    history = train(model, replay(data), plain_config(len(data[0])),
                    optimizer=optimizer(model.parameters(), lr=lr))
    return {"state": to_cpu(model.state_dict()), "losses": history.loss}


def train_adam_single(model_fn, data, lr: float = 1e-2, seed: int = 0,
                      device="cpu") -> dict:
    """The same reference with torch's Adam; the parameters, on the CPU."""
    torch.manual_seed(seed)
    model = model_fn().to(device)
    train(model, replay(data), plain_config(len(data[0])),
          optimizer=torch.optim.Adam(model.parameters(), lr=lr))
    return to_cpu(dict(model.named_parameters()))


def units_of(model: nn.Module, name: str) -> list[nn.Module]:
    """The submodule ``name`` (each child if it is a ModuleList); none for ``""``."""
    if not name:
        return []
    m = model.get_submodule(name)
    return list(m) if isinstance(m, nn.ModuleList) else [m]


def time_steps(cases: dict, device, repeats: int = 3) -> dict:
    """What one device does per step, for each ``name: (model_fn, x, y)`` of ``cases``:
    milliseconds of a forward and backward of the batch (x, y), the best of
    ``repeats`` after a warm-up, and on CUDA the peak memory in bytes that the case
    itself added (its model, batch and step). The cases take turns, so that a slow
    spell of a shared machine falls on all of them alike. On one GPU this is the
    compute a data-parallel or tensor-parallel rank would do."""
    device = torch.device(device)
    cuda = device.type == "cuda"

    def step(model, x, y) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(x, y)[1].backward()
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3

    runs, out = {}, {}
    for name, (model_fn, x, y) in cases.items():  # built and warmed up one by one
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if cuda else 0
        runs[name] = (model_fn().to(device), x.to(device), y.to(device))
        step(*runs[name])  # the warm-up: allocations, kernel selection
        peak = torch.cuda.max_memory_allocated(device) - before if cuda else 0
        out[name] = {"ms": float("inf"), "peak_bytes": peak, "device": str(device)}
    for _ in range(repeats):
        for name, run in runs.items():
            out[name]["ms"] = min(out[name]["ms"], step(*run))
    return out


def solution_code(page: str | Path, label: str) -> str:
    """The code printed in the ``{solution}`` of exercise ``label`` on ``page`` (its
    lines indented by four spaces), ready to run: a chapter runs it in a hidden cell
    and then its check, so every check passes on the answer the book prints."""
    text = Path(page).read_text(encoding="utf-8")
    match = re.search(r"^(`{3,})\{solution\} " + re.escape(label) + r"\n(.*?)^\1\s*$",
                      text, re.MULTILINE | re.DOTALL)
    if match is None:
        raise ValueError(f"no solution {label!r} in {page}")
    lines = [ln for ln in match.group(2).splitlines()
             if ln.startswith("    ") or not ln.strip()]
    code = textwrap.dedent("\n".join(lines)).strip()
    if not code:
        raise ValueError(f"the solution {label!r} in {page} prints no code")
    return code + "\n"
