"""LoRA: low-rank adapters on a frozen model, and merging them back into its weights.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021). A pretrained
linear layer ``y = x W^T + b`` (W: out x in) stays frozen; fine-tuning learns only a
low-rank update ``Delta W = (alpha / r) B A`` with A: r x in and B: out x r, so

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T.

B starts at zero, so the adapted model starts *exactly* as the pretrained one; A
starts random (Kaiming-uniform, as in the reference implementation) so that the
gradient of B is not zero. Training touches r (in + out) numbers per layer instead of
in x out. After training the update folds into the weight, ``W' = W + (alpha/r) B A``
(:func:`merge_lora`), and inference costs nothing extra.

Public API::

    LoRALinear(base, rank, alpha, dropout=0.0)     # wraps an nn.Linear
    apply_lora(model, rank, alpha, target_modules, dropout=0.0, keep_trainable=())
    merge_lora(model) -> model                      # LoRALinear -> plain nn.Linear
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from llmcore.nn.swap import swap_modules


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``(alpha/r) B A``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base must be an nn.Linear, got {type(base).__name__}")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device,
                                               dtype=w.dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device,
                                               dtype=w.dtype))  # (out, r): zero
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> Tensor:
        """The update ``(alpha/r) B A``, shaped like the base weight (out, in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: Tensor) -> Tensor:
        # Two thin matmuls (in -> r -> out) instead of forming B A: cheaper when r is
        # small, and the dropout acts on the adapter's input only.
        update = (self.dropout(x) @ self.lora_A.t()) @ self.lora_B.t()  # (..., out)
        return self.base(x) + self.scaling * update

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with weight ``W + (alpha/r) B A``; same outputs."""
        b = self.base
        out = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None,
                        device=b.weight.device, dtype=b.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(b.weight + self.delta_weight())
            if b.bias is not None:
                out.bias.copy_(b.bias)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


Target = Iterable[str] | Callable[[nn.Module, str], bool]


def _matches(target: Target) -> Callable[[nn.Module, str], bool]:
    if callable(target):
        return target
    if isinstance(target, str):
        target = [target]
    names = tuple(target)

    def by_name(module: nn.Module, name: str) -> bool:
        # PEFT's rule: a target matches the full name or its last dotted parts.
        return any(name == t or name.endswith("." + t) for t in names)

    return by_name


def apply_lora(model: nn.Module, rank: int, alpha: float, target_modules: Target,
               dropout: float = 0.0, keep_trainable: Iterable[str] = ()) -> nn.Module:
    """Wrap each matching ``nn.Linear`` of ``model`` in a :class:`LoRALinear`, in place.

    ``target_modules``: names (``"q_proj"`` matches ``blocks.0.self_attn.q_proj``) or a
    function ``(module, qualified_name) -> bool``. Every other parameter is frozen
    except those whose name starts with one of ``keep_trainable`` (e.g. a new
    classification head). Returns ``model``.
    """
    match = _matches(target_modules)
    chosen = [name for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name and match(m, name)]
    if not chosen:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"target_modules={target_modules!r} matches no nn.Linear of "
                         f"the model; its linear layers are e.g. {linears[:6]}")
    keep = tuple(keep_trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(bool(keep) and name.startswith(keep))
    swap_modules(model, lambda m, name: name in chosen,
                 lambda m: LoRALinear(m, rank, alpha, dropout))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` by its merged ``nn.Linear``, in place."""
    if isinstance(model, LoRALinear):
        raise ValueError("model is itself a LoRALinear: use model.merged()")
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not names:
        raise ValueError("the model holds no LoRALinear: nothing to merge (call "
                         "apply_lora first)")
    swap_modules(model, lambda m, name: name in names,
                 lambda lora: lora.merged().requires_grad_(False))
    return model
