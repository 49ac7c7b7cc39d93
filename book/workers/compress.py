"""Model compression beyond quantization: magnitude pruning and knowledge distillation.

Pruning (Han et al., "Learning both Weights and Connections for Efficient Neural
Networks", 2015) zeroes the weights of smallest magnitude. *Unstructured* pruning
removes single entries (a sparse matrix: smaller only with sparse storage or kernels);
*structured* pruning removes whole rows, i.e. output neurons (Li et al., "Pruning
Filters for Efficient ConvNets", 2017), which a dense kernel can skip by slicing. A
mask (1 = keep) records what was removed so that fine-tuning after pruning can keep
the pruned weights at zero. The masks follow ``torch.nn.utils.prune``: the same
``amount`` rounding and the same choice of entries, tested against it.

Distillation (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015)
trains a small student to match a large teacher's softened distribution
``softmax(z / T)``; the KL term is multiplied by T^2 so that its gradients keep their
size as T changes.

Public API::

    l1_unstructured_mask(weight, amount) -> mask
    ln_structured_mask(weight, amount, n=2, dim=0) -> mask
    prune_model(model, amount, structured=False, filter_fn=None) -> {name: mask}
    apply_masks(model, masks)        # re-zero pruned weights, e.g. after a step
    sparsity(model) -> float         # share of zero weights in the linear layers
    distillation_loss(student_logits, teacher_logits, temperature=2.0,
                      targets=None, alpha=0.5) -> loss
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _count(amount: float | int, total: int, what: str) -> int:
    """How many of ``total`` to prune: a share (float) or a count (int), as in torch."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise ValueError(f"amount must be a float in [0, 1] or an int, got {amount!r}")
    if isinstance(amount, float):
        if not 0.0 <= amount <= 1.0:
            raise ValueError(f"amount={amount} as a share must lie in [0, 1]")
        return round(amount * total)
    if not 0 <= amount <= total:
        raise ValueError(f"amount={amount} must lie in [0, {total}] ({what})")
    return amount


def l1_unstructured_mask(weight: Tensor, amount: float | int) -> Tensor:
    """A 0/1 mask of ``weight``'s shape with the ``amount`` smallest |w| set to 0."""
    k = _count(amount, weight.numel(), "entries")
    mask = torch.ones_like(weight)
    if k:
        smallest = torch.topk(weight.abs().flatten(), k, largest=False).indices
        mask.view(-1)[smallest] = 0
    return mask


def ln_structured_mask(weight: Tensor, amount: float | int, n: float = 2,
                       dim: int = 0) -> Tensor:
    """A 0/1 mask that zeroes the ``amount`` slices along ``dim`` of smallest L_n norm.

    For an ``nn.Linear`` weight (out, in), ``dim=0`` removes output neurons (rows).
    """
    if weight.dim() < 2:
        raise ValueError(f"structured pruning needs a weight with >= 2 dims, got "
                         f"shape {tuple(weight.shape)}")
    dim = dim % weight.dim()
    k = _count(amount, weight.shape[dim], f"slices along dim {dim}")
    others = [d for d in range(weight.dim()) if d != dim]
    norms = torch.linalg.vector_norm(weight, ord=n, dim=others)  # (shape[dim],)
    keep = torch.topk(norms, weight.shape[dim] - k).indices
    shape = [1] * weight.dim()
    shape[dim] = -1
    kept = torch.zeros(weight.shape[dim], dtype=weight.dtype, device=weight.device)
    kept[keep] = 1
    return kept.view(shape).expand_as(weight).clone()


FilterFn = Callable[[nn.Module, str], bool]


def prune_model(model: nn.Module, amount: float | int, structured: bool = False,
                filter_fn: FilterFn | None = None) -> dict[str, Tensor]:
    """Prune the weight of every ``nn.Linear`` (for which ``filter_fn(module, name)``
    is true) in place, layer by layer; return ``{weight name: mask}``.

    ``structured=True`` removes whole output rows by L2 norm. A weight shared with an
    embedding (a tied output layer) is left alone unless ``filter_fn`` selects it.
    """
    masks = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        if filter_fn is None and any(module.weight is m.weight
                                     for m in model.modules()
                                     if isinstance(m, nn.Embedding)):
            continue
        w = module.weight
        mask = (ln_structured_mask(w.detach(), amount, 2, 0) if structured
                else l1_unstructured_mask(w.detach(), amount))
        masks[f"{name}.weight"] = mask
    apply_masks(model, masks)
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Multiply each named weight by its mask, in place."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"masks names {name!r}, which is not a parameter of the "
                             "model")
        params[name].mul_(mask)


def sparsity(model: nn.Module) -> float:
    """The share of exactly-zero entries over all ``nn.Linear`` weights."""
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            zeros += (m.weight == 0).sum().item()
            total += m.weight.numel()
    return zeros / total if total else 0.0


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor,
                      temperature: float = 2.0, targets: Tensor | None = None,
                      alpha: float = 0.5, ignore_index: int = -100) -> Tensor:
    """T^2 KL(softmax(teacher/T) || softmax(student/T)), mixed with cross-entropy.

    Logits are (..., V). With ``targets`` the result is
    ``alpha * T^2 * KL + (1 - alpha) * CE(student, targets)``; without, the KL term
    alone. The teacher gets no gradient. Positions whose target is ``ignore_index``
    are left out of both terms.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and "
                         f"teacher_logits {tuple(teacher_logits.shape)} must match")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V).float()  # (N, V)
    t = teacher_logits.detach().reshape(-1, V).float()
    keep = None
    if targets is not None:
        targets = targets.reshape(-1)
        if targets.numel() != s.shape[0]:
            raise ValueError(f"targets must have {s.shape[0]} entries (the logits "
                             f"without their last dim), got {targets.numel()}")
        keep = targets != ignore_index
        s, t, targets = s[keep], t[keep], targets[keep]
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    soft = kl * temperature ** 2
    if targets is None:
        return soft
    return alpha * soft + (1 - alpha) * F.cross_entropy(s, targets)
