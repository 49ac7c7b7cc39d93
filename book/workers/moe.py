"""Mixture of experts (chapter 20): expert-parallel training on several ranks, its
one-process reference, and MoE against dense GPT training runs."""

from __future__ import annotations

import torch
import torch.distributed as dist

from book.workers.common import plain_config, replay
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.nn.moe import MoE, end_moe_step
from llmcore.parallel.expert_parallel import ExpertDataParallel
from llmcore.parallel.launch import rank_device
from llmcore.train import TrainConfig, evaluate, train


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


def one_device(cfg: GPTConfig, data, lr: float, micro_batches: int,
               seed: int = 0) -> dict:
    """The same training on one process: every batch in ``micro_batches`` parts (the
    ranks' slices, in rank order), their gradients accumulated into one update."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    loads = []
    history = train(model, replay(data, accumulate=micro_batches),
                    plain_config(len(data[0]), grad_accum=micro_batches),
                    optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                    on_step=lambda *_: loads.append(end_moe_step(model)))
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
