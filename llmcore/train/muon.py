"""Muon: momentum SGD whose update is orthogonalised by a Newton-Schulz iteration.

Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024). For a
weight matrix W the gradient's momentum M = U S V^T is replaced by (about) U V^T: every
direction the gradient points to moves by the same amount, however small its singular
value. Adam scales each *entry* by its own history; Muon scales each *direction of the
matrix* (Bernstein & Newhouse, "Old Optimizer, New Norm", 2024: steepest descent under
the spectral norm). A handful of matrix products replaces the SVD: the odd polynomial
X <- a X + b (X X^T) X + c (X X^T)^2 X, whose coefficients push every singular value in
(0, 1] towards 1 in five steps (to within about [0.7, 1.2]; that is enough).

Muon is for the hidden matrices. Embeddings, the output layer and vectors (norm gains,
biases) keep AdamW: an embedding row is updated only when its token occurs, and the
output layer's rows are per-token too, so orthogonalising them mixes tokens' updates.
:class:`Muon` runs both: a parameter group with ``"adamw": True`` is stepped with
AdamW (``betas``, ``adam_eps``, its own ``lr`` and ``weight_decay``), as in Jordan's
``MuonWithAuxAdam``, so one optimizer (one learning-rate schedule, one checkpoint)
trains the whole model. Its Muon groups compute what ``torch.optim.Muon`` computes,
argument for argument; its AdamW groups what ``torch.optim.AdamW`` computes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan's quintic: steepest slope at 0


def zeropower_via_newtonschulz(grad: Tensor, coefficients: tuple[float, float, float]
                               = COEFFICIENTS, steps: int = 5, eps: float = 1e-7,
                               dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """About U V^T for ``grad`` = U S V^T (m, n), in ``dtype``: ``steps`` iterations
    of X <- a X + (b A + c A^2) X with A = X X^T, from X = grad / ||grad||_F.

    Dividing by the Frobenius norm puts every singular value in (0, 1] (the spectral
    norm is at most the Frobenius norm); the iteration runs on the wide orientation
    (m <= n), so that A is the smaller of the two Gram matrices.
    """
    if grad.dim() != 2:
        raise ValueError(f"grad must be a matrix (m, n), got shape {tuple(grad.shape)}")
    a, b, c = coefficients
    x = grad.to(dtype)
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T  # (n, m), n < m: A is (n, n)
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T  # A: (m, m)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.addmm(x, poly, x, beta=a)  # a X + (b A + c A^2) X
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's learning rate for a (A, B) matrix: ``"original"`` (None) multiplies by
    sqrt(max(1, A / B)), so that tall and wide matrices move their outputs alike;
    ``"match_rms_adamw"`` by 0.2 sqrt(max(A, B)), the RMS of an AdamW update
    (Liu et al., "Muon is Scalable for LLM Training", 2025)."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r}; use None, 'original' or "
                     "'match_rms_adamw'")


class Muon(torch.optim.Optimizer):
    """``torch.optim.Muon``'s arguments and update, plus AdamW parameter groups.

    A group is stepped with Muon (its parameters must be matrices) unless it holds
    ``"adamw": True``. ``ns_dtype`` is the format the Newton-Schulz iteration runs in
    (bf16, as PyTorch's; fp32 where bf16 matmuls are slow). Use
    :func:`muon_param_groups` to split a model.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True,
                 ns_coefficients: tuple[float, float, float] = COEFFICIENTS,
                 eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn: str | None = None,
                 *, betas: tuple[float, float] = (0.9, 0.95), adam_eps: float = 1e-8,
                 ns_dtype: torch.dtype = torch.bfloat16):
        if lr < 0 or weight_decay < 0 or momentum < 0:
            raise ValueError(f"lr, weight_decay and momentum must be >= 0, got {lr}, "
                             f"{weight_decay} and {momentum}")
        if not 0 < ns_steps < 100:
            raise ValueError(f"ns_steps must be in 1..99, got {ns_steps}")
        adjusted_lr(1.0, adjust_lr_fn, torch.Size([1, 1]))  # refuses an unknown name
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        nesterov=nesterov, ns_coefficients=tuple(ns_coefficients),
                        eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                        betas=tuple(betas), adam_eps=adam_eps, adamw=False)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if not group["adamw"] and p.dim() != 2:
                    raise ValueError(
                        f"Muon updates matrices only; a parameter of shape "
                        f"{tuple(p.shape)} is in a Muon group. Put vectors, "
                        "embeddings and the output layer in a group with "
                        "'adamw': True (see muon_param_groups)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["adamw"]:
                    self._adamw(p, group)
                else:
                    self._muon(p, group)
        return loss

    def _muon(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf, mu = state["momentum_buffer"], group["momentum"]
        buf.lerp_(p.grad, 1 - mu)  # an average of gradients (PyTorch's scaling)
        update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
        update = zeropower_via_newtonschulz(update, group["ns_coefficients"],
                                            group["ns_steps"], group["eps"],
                                            self.ns_dtype)
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay
        p.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))

    def _adamw(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        (beta1, beta2), lr = group["betas"], group["lr"]
        state["step"] += 1
        step = state["step"].item()
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        # Bias corrections, as torch.optim.AdamW applies them.
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** step)).add_(
            group["adam_eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** step))


def muon_param_groups(model: nn.Module, lr: float, adam_lr: float,
                      weight_decay: float = 0.0, adam_weight_decay: float = 0.0,
                      adamw_names: tuple[str, ...] = ("lm_head",)) -> list[dict]:
    """The groups of :class:`Muon` for ``model``: the weights of its ``nn.Linear``
    layers in Muon; embeddings, the linears named in ``adamw_names`` (the output
    layer) and every vector in AdamW at ``adam_lr``.

    A linear whose weight is an embedding's (tied) is the embedding's: AdamW.
    """
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden = {id(m.weight): m.weight for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and id(m.weight) not in embedded
              and not name.endswith(adamw_names)}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in hidden]
    return [{"params": [p for p in hidden.values() if p.requires_grad], "lr": lr,
             "weight_decay": weight_decay},
            {"params": rest, "lr": adam_lr, "weight_decay": adam_weight_decay,
             "adamw": True}]
