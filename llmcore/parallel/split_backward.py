"""A backward in two parts: the input gradient now, the weight gradient later.

The backward of a linear layer y = x W^T + b is two matrix products: the gradient
of its input, dy W, which the layer below needs at once, and the gradient of its
weight, dy^T x, which nothing else needs before the optimizer step. Zero-bubble
pipeline schedules (Qi et al. 2023) run the first as action B, so that the previous
stage gets its gradient early, and the second later as action W, in time the stage
would otherwise sit idle. As in the authors' Megatron implementation, only the
linear layers' weight products wait (they are most of W's work); the norms' and the
embeddings' small weight gradients are computed in B.

:func:`defer_weight_grads` replaces a module's ``nn.Linear`` layers by
:class:`DeferredLinear` ones on the same parameters (same names). Inside
``store.capture(key)`` their backward computes the input gradient only and queues
the weight products under ``key``; ``store.run(key)`` computes and accumulates them.
Outside a capture they are ordinary linear layers.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


class WeightGradStore:
    """Weight-gradient products waiting to run, in lists by key (a micro-batch)."""

    def __init__(self):
        self.queues: dict = {}  # key -> the closures its backward deferred
        self.key = None  # the key a backward running now queues under, or None

    @contextlib.contextmanager
    def capture(self, key):
        """Within: the deferred layers' backward queues its weight products."""
        if self.key is not None:
            raise RuntimeError(f"already capturing for {self.key!r}")
        self.key = key
        self.queues.setdefault(key, [])
        try:
            yield
        finally:
            self.key = None

    def run(self, key) -> None:
        """Compute and accumulate the weight gradients queued under ``key``."""
        if key not in self.queues:
            raise KeyError(f"no weight gradients wait under {key!r}: run its B first")
        for fn in self.queues.pop(key):
            fn()

    def held_bytes(self, key) -> int:
        """Bytes of the activations and output gradients kept for ``key``'s W."""
        return sum(t.numel() * t.element_size() for fn in self.queues.get(key, ())
                   for t in fn.tensors)


def _accumulate(param: nn.Parameter, grad: torch.Tensor) -> None:
    param.grad = grad if param.grad is None else param.grad + grad


class _Deferred:
    """One layer's weight products for one micro-batch: dW = dy^T x, db = sum dy."""

    def __init__(self, x, grad_out, weight, bias):
        self.tensors = (x, grad_out)
        self.weight, self.bias = weight, bias

    def __call__(self) -> None:
        x, dy = self.tensors
        dy2 = dy.reshape(-1, dy.shape[-1])  # (B*T, out)
        _accumulate(self.weight, dy2.t() @ x.reshape(-1, x.shape[-1]))  # (out, in)
        if self.bias is not None:
            _accumulate(self.bias, dy2.sum(0))
        self.tensors = ()  # frees the activation now


class _LinearFn(torch.autograd.Function):
    """F.linear whose weight gradient waits in ``store`` while it captures."""

    @staticmethod
    def forward(ctx, x, weight, bias, store):
        ctx.save_for_backward(x, weight)
        ctx.store, ctx.bias = store, bias
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        late = _Deferred(x, grad_out, weight, ctx.bias)
        if ctx.store.key is None:
            late()  # not capturing: an ordinary backward
        else:
            ctx.store.queues[ctx.store.key].append(late)
        return grad_x, None, None, None


class DeferredLinear(nn.Linear):
    """An ``nn.Linear`` whose weight gradient can wait (see the module docstring)."""

    @classmethod
    def like(cls, linear: nn.Linear, store: WeightGradStore) -> "DeferredLinear":
        """A layer computing with ``linear``'s own parameters (a tied weight stays
        tied)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device="meta")  # no storage: the parameters come from linear
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.store = store
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LinearFn.apply(x, self.weight, self.bias, self.store)


def defer_weight_grads(module: nn.Module) -> WeightGradStore:
    """Replace every ``nn.Linear`` inside ``module`` by a :class:`DeferredLinear` on
    the same parameters (their names stay); the store their backward queues into."""
    store = WeightGradStore()
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, DeferredLinear.like(child, store))
            elif isinstance(child, DeferredLinear):
                child.store = store
    return store
