"""Expert parallelism: each of N ranks holds E/N experts; the tokens travel to them.

GShard (Lepikhin et al. 2020) and the Switch Transformer (Fedus et al. 2021, sec. 2.2)
spread a layer's experts over devices; DeepSeek-V3 (2024, sec. 3.2) runs 256 of them
on 64-way expert parallelism. Every rank routes its own tokens with the replicated
router and fills the (E, capacity, C) buffers of :class:`llmcore.nn.moe.MoE`, the
rows of expert e in place e. Experts r E/N ... (r + 1) E/N - 1 live on rank r, so the
buffer, cut into N equal chunks along E, is exactly what each rank must receive:

* **dispatch**: an all-to-all sends chunk j to rank j; rank r receives from every
  rank its tokens for r's experts;
* each rank runs its experts on the tokens of all ranks at once;
* **combine**: a second all-to-all returns the outputs to the ranks that own the
  tokens, which weight and sum them exactly as one device would.

Backward runs the two exchanges again in reverse (an all-to-all is its own
transpose). Each all-to-all carries a rank's whole buffer, padding included:
E * capacity * C values, of which the rank keeps 1/N (:func:`ep_payload`).

Everything else (attention, embeddings, routers, shared experts) is replicated and
trained data-parallel on the same ranks: :class:`ExpertDataParallel` averages those
gradients, while an expert's gradient already holds every rank's tokens.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from llmcore.nn.moe import MoE, MoEConfig, capacity
from llmcore.nn.swap import swap_modules
from llmcore.parallel.comm import Comm


class _AllToAll(torch.autograd.Function):
    """Chunk j of the first dimension to rank j; backward sends the gradients back
    the same way (the exchange is its own transpose)."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        comm.all_to_all(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad):
        out = torch.empty_like(grad, memory_format=torch.contiguous_format)
        ctx.comm.all_to_all(out, grad.contiguous())
        return out, None


def all_to_all(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """A differentiable all-to-all over ``x``'s first dimension (N equal chunks)."""
    return _AllToAll.apply(x, comm)


class ExpertParallelMoE(MoE):
    """An :class:`MoE` whose rank r holds experts r E/N ... (r + 1) E/N - 1 of the
    ``comm``'s N ranks; routing, weighting and the balancing losses are MoE's own.
    Ranks must hold the same number of tokens (their buffers are exchanged whole)."""

    def __init__(self, d_model: int, cfg: MoEConfig, comm: Comm, bias: bool = False,
                 activation: str = "gelu"):
        n, r = comm.world_size, comm.rank
        if cfg.n_experts % n:
            raise ValueError(f"n_experts={cfg.n_experts} must be a multiple of the "
                             f"{n} ranks of the expert-parallel group")
        local = cfg.n_experts // n
        super().__init__(d_model, cfg, bias, activation,
                         experts=range(r * local, (r + 1) * local))
        self.comm = comm

    @classmethod
    def from_moe(cls, moe: MoE, comm: Comm) -> "ExpertParallelMoE":
        """This rank's part of a whole ``moe``: its router, its shared experts and
        bias, and the experts this rank holds (copied, on ``moe``'s device)."""
        with torch.device(moe.router.weight.device):
            ep = cls(moe.d_model, moe.cfg, comm, moe.bias, moe.activation)
        state = {k: v for k, v in moe.state_dict().items()
                 if not k.startswith("experts.")}
        for i, e in enumerate(ep.expert_ids):
            state.update({f"experts.{i}.{k}": v
                          for k, v in moe.experts[e].state_dict().items()})
        ep.load_state_dict(state)
        return ep

    def run_experts(self, buffer: torch.Tensor) -> torch.Tensor:
        """Dispatch, compute, combine: (E, capacity, C) of this rank's tokens in,
        the outputs of every expert for them out."""
        n, local = self.comm.world_size, len(self.experts)
        _, cap, c = buffer.shape
        got = all_to_all(buffer, self.comm)  # (N sources * E/N mine, cap, C)
        got = got.view(n, local, cap, c).transpose(0, 1).reshape(local, n * cap, c)
        out = torch.stack([expert(got[i]) for i, expert in enumerate(self.experts)])
        out = out.view(local, n, cap, c).transpose(0, 1).reshape(n * local, cap, c)
        return all_to_all(out, self.comm)  # (E, cap, C): back to the tokens' ranks

    def step_load(self) -> torch.Tensor:
        """The load of the whole step: every rank's counts, summed, so that the
        balancing biases move alike on all ranks."""
        load = self.load.clone()
        self.comm.all_reduce(load)
        return load


def apply_expert_parallel(model: nn.Module, comm: Comm) -> nn.Module:
    """Replace, in place, every :class:`MoE` of ``model`` by this rank's
    :class:`ExpertParallelMoE`; return ``model``."""
    swap_modules(model, lambda m, _: type(m) is MoE,
                 lambda m: ExpertParallelMoE.from_moe(m, comm))
    return model


class ExpertDataParallel(nn.Module):
    """Expert parallel for the MoE layers, data parallel for the rest, one group.

    Used like ``DistributedDataParallel``: wrap the whole model (rank 0's weights are
    broadcast first), call it, and ``loss.backward()`` leaves the gradient of the
    mean over all ranks' tokens; ``no_sync()`` skips the averaging for gradient
    accumulation. Replicated parameters are all-reduced and divided by N; an
    expert's gradient already sums what every rank's tokens sent back through the
    all-to-all, so it is only divided by N.
    """

    def __init__(self, module: nn.Module, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.comm = Comm(group)
        with torch.no_grad():  # one starting point: rank 0's weights, every expert
            for t in [*module.parameters(), *module.buffers()]:
                self.comm.broadcast(t.data, src=0)
        self.module = apply_expert_parallel(module, self.comm)
        experts = {id(p) for m in self.module.modules()
                   if isinstance(m, ExpertParallelMoE) for p in m.experts.parameters()}
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.replicated = [p for p in self.params if id(p) not in experts]
        self.comm.stats.reset()  # from here on: what training sends
        self._sync, self._ready = True, 0
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally; the first backward after the block syncs."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._sync:
            return
        self._ready += 1
        if self._ready < len(self.params):
            return
        self._ready = 0  # the last gradient is in: backward is done
        for q in self.replicated:
            self.comm.all_reduce(q.grad)
        for q in self.params:
            q.grad.div_(self.comm.world_size)


def ep_payload(tokens: int, d_model: int, cfg: MoEConfig, n_layer: int,
               act_bytes: int = 4) -> dict[str, float]:
    """Bytes one rank hands to all-to-alls in a training step (forward + backward)
    of ``n_layer`` MoE layers on its ``tokens`` tokens: per layer two exchanges
    forward and two backward, each of the whole (E, capacity, C) buffer, as
    :class:`~llmcore.parallel.comm.Comm` counts them (``wire_bytes`` keeps
    (N - 1)/N of it)."""
    cap = capacity(tokens, cfg.top_k, cfg.n_experts, cfg.capacity_factor)
    return {"all_to_all": 4 * n_layer * cfg.n_experts * cap * d_model * act_bytes}
