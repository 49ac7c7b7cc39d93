"""Replacing modules from outside the model: one helper for FP8, quantization, LoRA.

Model code knows nothing of precision or adapters; they are applied afterwards by
swapping submodules in place (torchao's ``swap_linear_with_float8_linear`` and PEFT's
``inject_adapter`` work the same way). ``swap_modules`` walks the model once, asks
``select(module, fqn)`` which modules to replace and ``make(module)`` what with.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

Select = Callable[[nn.Module, str], bool]


def set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    """``model.get_submodule(fqn)`` becomes ``new``; ``fqn`` is a dotted name."""
    parent_name, _, child = fqn.rpartition(".")
    if not child:
        raise ValueError(f"cannot replace the model itself (fqn={fqn!r}); wrap it in "
                         "a module first")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def swap_modules(model: nn.Module, select: Select,
                 make: Callable[[nn.Module], nn.Module]) -> list[str]:
    """Replace, in place, each submodule with ``select(module, fqn)`` true by
    ``make(module)``; return the dotted names replaced, in model order.

    The names are collected before anything changes, so a new module's own children
    are never visited. The root module itself is never replaced.
    """
    chosen = [fqn for fqn, m in model.named_modules() if fqn and select(m, fqn)]
    for fqn in chosen:
        set_submodule(model, fqn, make(model.get_submodule(fqn)))
    return chosen
