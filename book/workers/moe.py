"""Mixture of experts (chapter 20): expert-parallel training on several ranks, its
one-process reference, and MoE against dense GPT training runs."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from book.workers.common import plain_config, replay
from llmcore.config import check_fields
from llmcore.data import load_corpus
from llmcore.data.lm import get_batch, split_tokens
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.nn.moe import MoE, MoEConfig, end_moe_step
from llmcore.tokenizer.char import CharTokenizer
from llmcore.parallel.expert_parallel import ExpertDataParallel
from llmcore.parallel.ranks import rank_device
from llmcore.train import TrainConfig, evaluate, train


@dataclass(frozen=True)
class MoERun:
    """A dense GPT and its MoE twin of equal active compute, trained on characters."""

    n_layer: int  # blocks
    n_head: int  # heads
    n_embd: int  # width C
    block_size: int  # context T
    batch: int  # sequences per step
    steps: int  # optimizer updates per run
    lr: float  # AdamW peak learning rate (warm-up, then cosine)
    n_experts: int  # E: experts per MoE layer, each 4 C / k wide
    top_k: int  # k: experts per token
    eval_every: int  # updates between validation losses

    def __post_init__(self):
        check_fields(self, "n_layer", "n_head", "n_embd", "block_size", "batch",
                     "steps", "n_experts", "top_k", "eval_every", integer=True,
                     above=0)
        check_fields(self, "lr", above=0)

    def dense(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size, self.block_size, self.n_layer, self.n_head,
                         self.n_embd)

    def moe(self, vocab_size: int, **balance) -> GPTConfig:
        """The MoE twin; ``balance``: MoEConfig fields (aux_loss_coef, bias_rate)."""
        return replace(self.dense(vocab_size), moe=MoEConfig(
            n_experts=self.n_experts, top_k=self.top_k, **balance))


def char_batches(run: MoERun):
    """(vocab size, train batch_fn, validation batch_fn) over Shakespeare's
    characters, the last tenth held out."""
    text = load_corpus("shakespeare")
    tok = CharTokenizer.train(text)
    train_ids, val_ids = split_tokens(torch.tensor(tok.encode(text)))

    def train_fn(step, generator):
        return get_batch(train_ids, run.batch, run.block_size, generator=generator)

    def val_fn(step, generator):
        return get_batch(val_ids, run.batch, run.block_size, generator=generator)
    return tok.vocab_size, train_fn, val_fn


def whole_names(model: torch.nn.Module) -> dict:
    """The model's parameters and balancing biases under the names of the whole
    model: a rank's i-th expert of a layer is that layer's expert ``expert_ids[i]``."""
    out = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.endswith("load"):
            continue  # the step's counts, not state
        parts = name.split(".")
        if "experts" in parts:
            at = parts.index("experts")
            moe = model.get_submodule(".".join(parts[:at]))
            parts[at + 1] = str(moe.expert_ids[int(parts[at + 1])])
        out[".".join(parts).removeprefix("module.")] = t.detach().cpu().clone()
    return out


def ep_worker(rank: int, world_size: int, cfg: GPTConfig, data, lr: float,
              seed: int = 0) -> dict:
    """One rank of expert-parallel training: this rank's slice of every batch, the
    experts of its share, data parallel for the rest; the book's loop, plain SGD."""
    torch.manual_seed(seed)  # the same whole model on every rank (rank 0's wins)
    device = rank_device()
    model = ExpertDataParallel(GPT(cfg).to(device))  # now holds E/N experts a layer
    held = [m.expert_ids for m in model.modules() if isinstance(m, MoE)][0]
    loads = []  # per step: (layers, E), counted over all ranks' tokens
    history = train(model, replay(data, rank, world_size), plain_config(len(data[0])),
                    optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                    dp_group=dist.group.WORLD,
                    on_step=lambda *_: loads.append(end_moe_step(model).cpu()))
    # Who sent what in the last step: this rank's kept choices per destination rank.
    sent = [torch.bincount(m.routing.expert[m.routing.keep] // len(m.experts),
                           minlength=world_size).cpu()
            for m in model.modules() if isinstance(m, MoE)]
    return {"held": (held.start, held.stop), "losses": history.loss,
            "state": whole_names(model), "loads": torch.stack(loads),
            "sent": torch.stack(sent), "payload": dict(model.comm.stats.payload)}


def one_device(cfg: GPTConfig, data, lr: float, micro_batches: int, seed: int = 0,
               device="cpu", threads: int = 1) -> dict:
    """The same training on one process: every batch in ``micro_batches`` parts (the
    ranks' slices, in rank order), their gradients accumulated into one update; on
    ``device`` with ``threads`` CPU threads (the ranks' kind and count, so that both
    round alike and a near tie between two experts is broken alike)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model = GPT(cfg).to(device)
        loads = []
        history = train(model, replay(data, accumulate=micro_batches),
                        plain_config(len(data[0]), grad_accum=micro_batches),
                        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                        on_step=lambda *_: loads.append(end_moe_step(model).cpu()))
    finally:
        torch.set_num_threads(before)
    return {"losses": history.loss, "state": whole_names(model),
            "loads": torch.stack(loads)}


def train_lm(cfg: GPTConfig, train_cfg: TrainConfig, batch_fn, val_batch_fn,
             device, eval_every: int, eval_steps: int, seed: int = 0) -> dict:
    """Train a GPT (dense or MoE) with the book's loop; every ``eval_every`` updates
    the validation cross-entropy; for an MoE the load of every step, (L, E)."""
    torch.manual_seed(seed)
    model = GPT(cfg).to(device)
    loads, evals = [], []
    moe = cfg.moe is not None

    def on_step(done: int, *_) -> None:
        if moe:
            loads.append(end_moe_step(model).cpu())
        if done % eval_every == 0 or done == train_cfg.max_steps:
            evals.append((done, evaluate(model, val_batch_fn, eval_steps,
                                         precision=train_cfg.precision)))

    history = train(model, batch_fn, train_cfg, on_step=on_step)
    return {"history": history, "evals": evals, "model": model,
            "loads": torch.stack(loads) if moe else None}
