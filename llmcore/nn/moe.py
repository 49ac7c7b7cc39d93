"""Mixture of experts: a router sends each token to k of E feed-forward networks.

A dense block runs every token through one feed-forward network (FFN). A mixture of
experts (Shazeer et al. 2017, "Outrageously Large Neural Networks") holds E of them,
the *experts*, and a *router*, a linear layer that scores them per token: a token goes
to its k best experts and their outputs are summed, weighted by the router's
probabilities. Parameters grow with E; the compute per token only with k.

Routing follows GShard (Lepikhin et al. 2020): every expert has a buffer of
``capacity`` = ceil(capacity_factor * k * tokens / E) slots, filled with every token's
first choice before any token's second; an assignment beyond it is *dropped* (that
expert's term is missing, the token goes on through the residual). Fixed buffers make
each expert one matmul of fixed shape, and the all-to-all of expert parallelism
(``llmcore.parallel.expert_parallel``) an exchange of fixed size.

Two ways to keep the experts evenly loaded: the auxiliary loss of the Switch
Transformer (Fedus et al. 2021, eq. 4), added to the model's loss, and the bias of
DeepSeek-V3 (2024, sec. 2.1.2, "auxiliary-loss-free"), added to the scores for the
choice only and moved after every update toward the less loaded experts. Shared
experts (DeepSeekMoE, Dai et al. 2024) see every token, unrouted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmcore.accounting import flops_per_token
from llmcore.config import check_fields
from llmcore.nn.layers import FeedForward


@dataclass(frozen=True)
class MoEConfig:
    """A mixture-of-experts FFN; ``MoEConfig()``: 8 experts, each token to 2."""

    n_experts: int = 8  # E: routed experts per layer
    top_k: int = 2  # k: experts each token is sent to
    n_shared: int = 0  # experts every token passes through, unrouted (DeepSeekMoE)
    d_expert: int | None = None  # one expert's hidden width; None: 4 C / (k + shared),
    # so that a token meets as many FFN weights as in the dense 4 C FFN
    capacity_factor: float = 1.25  # slots per expert: ceil(factor * k * tokens / E)
    norm_topk: bool = True  # gates renormalised to sum to 1 over a token's k
    # choices (GShard, Mixtral, DeepSeek-V3); False: the raw probabilities (Switch,
    # DeepSeekMoE; with top_k=1 a renormalised gate is 1: the router learns nothing)
    aux_loss_coef: float = 0.01  # weight of the load-balancing loss; 0: none
    bias_rate: float = 0.0  # gamma of DeepSeek-V3's bias balancing; 0: no bias

    def __post_init__(self):
        check_fields(self, "n_experts", "top_k", integer=True, above=0)
        check_fields(self, "n_shared", integer=True, minimum=0)
        if self.d_expert is not None:
            check_fields(self, "d_expert", integer=True, above=0)
        check_fields(self, "capacity_factor", above=0)
        check_fields(self, "aux_loss_coef", "bias_rate", minimum=0)
        if self.top_k > self.n_experts:
            raise ValueError(f"MoEConfig.top_k={self.top_k} must be at most "
                             f"n_experts={self.n_experts}")

    def expert_width(self, d_model: int) -> int:
        """The hidden width of one expert in a model of width ``d_model``."""
        if self.d_expert is not None:
            return self.d_expert
        active = self.top_k + self.n_shared
        if 4 * d_model % active:
            raise ValueError(f"4 * d_model = {4 * d_model} is not a multiple of "
                             f"top_k + n_shared = {active}; set MoEConfig.d_expert")
        return 4 * d_model // active


class Routing(NamedTuple):
    """Where each token's k choices go; every field is (S, k) for S tokens."""

    expert: Tensor  # the chosen expert, best first
    gate: Tensor  # the weight of its output: the router's probability
    # (renormalised over the k choices with ``normalize``)
    slot: Tensor  # the position in that expert's buffer
    keep: Tensor  # slot < capacity; False: dropped


def capacity(tokens: int, top_k: int, n_experts: int, factor: float) -> int:
    """Buffer slots per expert: ceil(factor * k * tokens / E), at most ``tokens``
    (a token never picks one expert twice)."""
    return min(tokens, math.ceil(round(factor * top_k * tokens / n_experts, 9)))


def top_k_route(probs: Tensor, k: int, capacity: int, bias: Tensor | None = None,
                normalize: bool = False) -> Routing:
    """Each token's ``k`` best experts by ``probs`` (S, E) (+ ``bias`` (E,), which
    steers the choice but not the gates) and its slots in their buffers;
    ``normalize``: the k gates of a token sum to 1."""
    S, E = probs.shape
    scores = probs if bias is None else probs + bias
    expert = scores.topk(k, dim=-1).indices  # (S, k)
    gate = probs.gather(-1, expert)  # (S, k)
    if normalize:
        gate = gate / gate.sum(dim=-1, keepdim=True)
    # Buffers fill in choice-major order, all first choices before any second one
    # (GShard): under pressure a token loses its second expert before anyone's first.
    choices = expert.t().reshape(-1, 1)  # (k S, 1)
    taken = F.one_hot(choices.squeeze(1), E).cumsum(0)  # (k S, E) running counts
    slot = (taken.gather(-1, choices) - 1).view(k, S).t()  # (S, k)
    return Routing(expert, gate, slot, slot < capacity)


def load_balancing_loss(probs: Tensor, expert: Tensor) -> Tensor:
    """E * sum_i f_i P_i (Switch Transformer, eq. 4, for k choices): f_i the share of
    the k S choices that went to expert i, P_i its mean probability over the S tokens.
    1 when both are uniform, E when one expert takes everything; the gradient flows
    through P, lowering the probability of the experts chosen most."""
    n_experts = probs.shape[-1]
    counts = torch.bincount(expert.flatten(), minlength=n_experts).to(probs.dtype)
    return n_experts * (counts / expert.numel() * probs.mean(0)).sum()


def dispatch(x: Tensor, r: Routing, n_experts: int, capacity: int) -> Tensor:
    """The experts' input buffers (E, capacity, C) from the tokens ``x`` (S, C);
    empty slots are zeros."""
    token = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(r.expert)
    buffer = x.new_zeros(n_experts, capacity, x.shape[1])
    return buffer.index_put((r.expert[r.keep], r.slot[r.keep]), x[token[r.keep]])


def combine(out: Tensor, r: Routing) -> Tensor:
    """Each token's gate-weighted sum of its experts' outputs, (E, cap, C) -> (S, C)."""
    token = torch.arange(r.expert.shape[0], device=out.device)
    token = token.unsqueeze(1).expand_as(r.expert)[r.keep]
    y = out[r.expert[r.keep], r.slot[r.keep]] * r.gate[r.keep].unsqueeze(-1)
    return y.new_zeros(r.expert.shape[0], out.shape[-1]).index_add(0, token, y)


class MoE(nn.Module):
    """A mixture-of-experts FFN, (B, T, C) -> (B, T, C); drop-in for ``FeedForward``.

    After each forward, ``aux_loss`` is the batch's load-balancing loss (in the graph;
    ``llmcore.models.gpt`` adds it to the loss) and ``routing`` its :class:`Routing`.
    In training mode ``load`` counts the choices each expert received; call
    :meth:`end_step` (or :func:`end_moe_step`) after every optimizer update. In eval
    mode nothing is dropped, so a token's output never depends on the others'.
    ``experts``: the ids of the experts this module holds (all of them by default;
    an expert-parallel rank holds a range).
    """

    def __init__(self, d_model: int, cfg: MoEConfig, bias: bool = False,
                 activation: str = "gelu", experts: range | None = None):
        super().__init__()
        self.d_model, self.cfg = d_model, cfg
        self.bias, self.activation = bias, activation  # what the experts are built with
        self.expert_ids = range(cfg.n_experts) if experts is None else experts
        width = cfg.expert_width(d_model)
        self.router = nn.Linear(d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(d_model, width, activation, 0.0, bias)
                                     for _ in self.expert_ids)
        self.shared = (FeedForward(d_model, cfg.n_shared * width, activation, 0.0, bias)
                       if cfg.n_shared else None)
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts))
        self.register_buffer("load", torch.zeros(cfg.n_experts), persistent=False)
        self.aux_loss: Tensor | None = None
        self.routing: Routing | None = None

    def forward(self, x: Tensor) -> Tensor:
        shape, E = x.shape, self.cfg.n_experts
        x = x.reshape(-1, shape[-1])  # (S, C): every token of the batch
        logits = self.router(x)  # (S, E); the softmax in fp32 at least, under autocast
        probs = logits.softmax(-1, torch.promote_types(logits.dtype, torch.float32))
        slots = (capacity(x.shape[0], self.cfg.top_k, E, self.cfg.capacity_factor)
                 if self.training else x.shape[0])
        bias = self.expert_bias if self.cfg.bias_rate else None
        r = top_k_route(probs, self.cfg.top_k, slots, bias, self.cfg.norm_topk)
        self.aux_loss = load_balancing_loss(probs, r.expert)
        self.routing = r._replace(gate=r.gate.detach())
        if self.training:
            self.load += torch.bincount(r.expert.flatten(), minlength=E)
        y = combine(self.run_experts(dispatch(x, r, E, slots)), r)  # (S, C)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.to(x.dtype).view(shape)

    def run_experts(self, buffer: Tensor) -> Tensor:
        """(E, capacity, C) -> (E, capacity, C): expert e runs on ``buffer[e]``."""
        return torch.stack([expert(buffer[i]) for i, expert in enumerate(self.experts)])

    def step_load(self) -> Tensor:
        """Choices per expert since the last :meth:`end_step` (over all ranks)."""
        return self.load.clone()

    @torch.no_grad()
    def end_step(self) -> Tensor:
        """After an optimizer update: the step's load (E,); with ``bias_rate`` gamma,
        each bias moves by gamma toward balance, b_i += gamma sign(mean - load_i)
        (DeepSeek-V3, sec. 2.1.2). The counts start again from zero."""
        load = self.step_load()
        if self.cfg.bias_rate:
            self.expert_bias += self.cfg.bias_rate * torch.sign(load.mean() - load)
        self.load.zero_()
        return load


def end_moe_step(model: nn.Module) -> Tensor:
    """:meth:`MoE.end_step` of every MoE layer of ``model``: their loads (L, E). Pass
    it to the loop as ``on_step=lambda *_: end_moe_step(model)``."""
    loads = [m.end_step() for m in model.modules() if isinstance(m, MoE)]
    if not loads:
        raise ValueError("model has no MoE layer (llmcore.nn.moe.MoE); give it one, "
                         "e.g. GPTConfig(..., moe=MoEConfig())")
    return torch.stack(loads)


def active_flops_per_token(cfg) -> float:
    """Training FLOPs per token of a GPT-shaped ``cfg`` with ``cfg.moe``: the dense
    count (``llmcore.accounting.flops_per_token``) with each block's 8 C^2 FFN weights
    replaced by those a token uses: k + shared experts of 2 C d, and the router's
    C E. Padding of the buffers is not counted: it is work, not model."""
    dense, m, c = flops_per_token(cfg), cfg.moe, cfg.n_embd
    if m is None:
        return dense
    used = 2 * c * m.expert_width(c) * (m.top_k + m.n_shared) + c * m.n_experts
    return dense + 6 * cfg.n_layer * (used - 8 * c * c)
