"""Which library multiplies the matrices of a linear layer on the CPU.

PyTorch computes an fp32 ``nn.Linear`` on the CPU with the BLAS it was built with (MKL
in the x86 wheels). The same wheels also carry oneDNN, PyTorch's deep-learning kernel
library, which picks its kernels from the instruction sets the CPU reports. The two
give the same fp32 result at different speeds: on the AMD EPYC (AVX-512) cores this
book is tested on, oneDNN multiplies the GPT's shapes about twice as fast as MKL
(``gemm_speeds`` measures both; chapter 8 prints them). Same model, same precision,
another kernel: the kind of speed-up a profile shows and a config file hides.

``cpu_gemm()`` is a context in which every fp32 ``F.linear`` on CPU tensors (every
``nn.Linear``) runs forward and backward on oneDNN: ``y = x W^T + b``, ``dx = dy W``,
``dW = dy^T x``, ``db = sum(dy)``, each one oneDNN matmul. Anything else (GPU, bf16,
autocast, DTensors, other functions) passes through untouched. The library is chosen
by ``set_cpu_gemm`` or the environment variable ``LLMCORE_CPU_GEMM``: ``auto`` (the
default: oneDNN on x86 CPUs where this torch has it; elsewhere, e.g. Apple silicon,
PyTorch's own, which calls the platform's BLAS), ``onednn`` or ``mkl`` (PyTorch's
default: MKL in the x86 wheels).
:func:`llmcore.train.train` and ``evaluate`` compute in this context on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import time

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

CPU_GEMMS = ("auto", "onednn", "mkl")
ENV = "LLMCORE_CPU_GEMM"
_choice: str | None = None  # set_cpu_gemm's; None: the environment's, else auto


def _onednn_mm(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """x (M, K) @ w (N, K)^T (+ b) on oneDNN; any strides."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


@functools.cache
def onednn_available() -> bool:
    """Whether this torch can run an fp32 matmul on oneDNN (and gets it right)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        x, w = torch.randn(4, 8), torch.randn(3, 8)
        return bool(torch.allclose(_onednn_mm(x, w), x @ w.T, atol=1e-5))
    except (AttributeError, RuntimeError):
        return False


class OneDNNLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` with every matmul of forward and backward on
    oneDNN; x (..., K), weight (N, K), bias (N,) or None."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.lead = x.shape[:-1]
        ctx.has_bias = bias is not None
        return _onednn_mm(x2, weight, bias).view(*ctx.lead, weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x2, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # dx = g W: W^T as the (K, N) "weight"
            dx = _onednn_mm(g, weight.t()).view(*ctx.lead, weight.shape[1])
        if ctx.needs_input_grad[1]:  # dW = g^T x: x^T as the (K, M) "weight"
            dw = _onednn_mm(g.t(), x2.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum(0)
        return dx, dw, db


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` on oneDNN, differentiable once (what :func:`cpu_gemm` routes)."""
    return OneDNNLinear.apply(x, weight, bias)


def _plain_fp32_cpu(*tensors) -> bool:
    return all(t is None or (type(t) in (Tensor, torch.nn.Parameter)
                             and t.dtype == torch.float32 and t.device.type == "cpu")
               for t in tensors)


class _RouteLinear(TorchFunctionMode):
    """Sends eligible ``F.linear`` calls to :func:`onednn_linear`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func is torch._C._nn.linear:
            x = args[0] if args else kwargs.get("input")
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (x is not None and weight is not None
                    and _plain_fp32_cpu(x, weight, bias) and weight.dim() == 2
                    and x.dim() >= 1 and x.numel() > 0
                    and not torch.is_autocast_enabled("cpu")
                    and not torch.compiler.is_compiling()):
                return onednn_linear(x, weight, bias)
        return func(*args, **kwargs)


def set_cpu_gemm(library: str | None) -> str | None:
    """Choose the CPU library of :func:`cpu_gemm`: ``auto``, ``onednn`` or ``mkl``;
    None: back to the environment variable ``LLMCORE_CPU_GEMM`` (default ``auto``).
    Returns the previous choice, to restore it with."""
    global _choice
    if library is not None:
        _check(library, "library")
    previous, _choice = _choice, library
    return previous


def _check(library: str, what: str) -> str:
    if library not in CPU_GEMMS:
        raise ValueError(f"{what} must be one of {CPU_GEMMS}, got {library!r}")
    if library == "onednn" and not onednn_available():
        raise ValueError(f"{what}='onednn', but this torch has no working oneDNN "
                         "(torch.backends.mkldnn); use 'auto' or 'mkl'")
    return library


def cpu_gemm_library(library: str | None = None) -> str:
    """The library :func:`cpu_gemm` uses for ``library`` (None: the current choice,
    from :func:`set_cpu_gemm` or the environment): ``onednn`` or ``mkl``."""
    if library is not None:
        choice = _check(library, "library")
    elif _choice is not None:
        choice = _choice
    else:
        choice = _check(os.environ.get(ENV, "auto"), f"the environment variable {ENV}")
    return _auto() if choice == "auto" else choice


def _auto() -> str:
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return "onednn" if x86 and onednn_available() else "mkl"


@contextlib.contextmanager
def cpu_gemm(library: str | None = None):
    """Inside, fp32 linear layers on the CPU run on ``library`` (default: the choice
    of :func:`set_cpu_gemm`); nested contexts are harmless."""
    if cpu_gemm_library(library) == "mkl":
        yield
        return
    with _RouteLinear():
        yield


def gemm_speeds(m: int = 768, k: int = 128, n: int = 512, repeats: int = 20,
                rounds: int = 5) -> dict[str, float]:
    """fp32 GFLOP/s of x (m, k) @ W (n, k)^T on one CPU thread's worth of work: MKL
    (``torch.mm``) and, where available, oneDNN; the best of ``rounds`` rounds, each
    the mean of ``repeats`` calls, the two libraries interleaved."""
    x, w = torch.randn(m, k), torch.randn(n, k)
    libs = {"mkl": lambda: torch.mm(x, w.t())}
    if onednn_available():
        libs["onednn"] = lambda: _onednn_mm(x, w)
    best = {name: float("inf") for name in libs}
    for _ in range(rounds):
        for name, fn in libs.items():
            fn()
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / repeats)
    return {name: 2 * m * k * n / s / 1e9 for name, s in best.items()}
