"""FP8 training: the scaled matmul and a drop-in ``Float8Linear``.

An FP8 number has 3 (e4m3) or 2 (e5m2) mantissa bits and a narrow range, so a tensor is
stored as ``x_fp8 = cast(x * scale)`` with a float32 ``scale`` chosen to map the
tensor's largest magnitude (amax) onto the format's largest value, and read back as
``x ~= x_fp8 / scale``. The scale is one number per tensor (*tensorwise*), one per row
(*rowwise*), taken from the amaxes of the last few steps (*delayed*, so no extra
pass over the tensor is needed before the cast), or fine-grained (*blockwise*: one
per 1 x 128 tile of the activations and gradients, one per 128 x 128 block of the
weights, DeepSeek-V3, 2024). Forward operands use e4m3 (precision), the output
gradient e5m2 (range), except that rowwise and blockwise scaling keep e4m3 throughout
(Micikevicius et al., 2022, "FP8 Formats for Deep Learning"; the recipes follow NVIDIA
Transformer Engine and torchao's ``Float8Linear``). The casts and scales are in
``fp8_scaling``; this module re-exports them.

The matmul runs in ``torch._scaled_mm`` on GPUs of compute capability 8.9 or higher
(Ada, Hopper, Blackwell). Elsewhere an emulation does the same products: a product of
two FP8 values has at most 8 significant bits, exact in float32. It sums them in
float32, while the kernel sums them in its own order and in the tensor core's
accumulator, which on Hopper keeps about 14 bits unless the partial sums are
promoted to float32 (``llmcore.precision.accumulate`` emulates that). Blockwise
scaling always runs the emulation: its kernels are not wired here.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from llmcore.nn.swap import swap_modules
from llmcore.precision.fp8_scaling import (  # noqa: F401  (re-exported)
    FP8_DTYPES, AmaxHistory, amax_to_scale, delayed_scale, from_float8, to_float8)
from llmcore.runtime import device_caps

SCALINGS = ("tensorwise", "rowwise", "delayed", "blockwise")
BACKENDS = ("auto", "scaled_mm", "emulate")


@torch.compiler.assume_constant_result
def _capability(index: int) -> tuple[int, int]:
    # Asked once per trace: compiled code treats the answer as a constant.
    return device_caps(torch.device("cuda", index)).capability


def fp8_backend(device: torch.device | str) -> tuple[str, str]:
    """``(backend, reason)``: ``"scaled_mm"`` on CUDA with SM >= 8.9, else
    ``"emulate"``, with the reason said plainly."""
    device = torch.device(device)
    if device.type != "cuda":
        return "emulate", f"emulated: no FP8 tensor cores on {device.type}"
    index = torch.cuda.current_device() if device.index is None else device.index
    cap = _capability(index)
    if cap < (8, 9):
        return "emulate", (f"emulated: GPU has compute capability {cap[0]}.{cap[1]},"
                           " FP8 tensor cores need 8.9")
    return "scaled_mm", f"FP8 tensor cores (SM {cap[0]}.{cap[1]})"


def _mm(a8: torch.Tensor, sa: torch.Tensor, b8: torch.Tensor, sb: torch.Tensor,
        out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """``(a8 / sa) @ (b8 / sb).T`` for FP8 ``a8`` (M, K) and ``b8`` (N, K); the scales
    are 0-d or per row, (M, 1) and (N, 1)."""
    inv_a = sa.reciprocal()
    inv_b = sb.reciprocal().t() if sb.dim() else sb.reciprocal()  # (1, N) or ()
    # Rowwise kernels write bf16 only: compute in bf16, then cast (as torchao does).
    kernel_dtype = torch.bfloat16 if sa.dim() else out_dtype
    if backend == "scaled_mm":
        if a8.shape[1] % 16 or b8.shape[0] % 16:
            raise ValueError(f"torch._scaled_mm needs K and N divisible by 16, got "
                             f"a {tuple(a8.shape)} and b_t {tuple(b8.shape)}; keep "
                             "such layers out with module_filter_fn")
        # _scaled_mm wants b column-major: b8.t() of a contiguous (N, K) is that.
        return torch._scaled_mm(a8, b8.t(), scale_a=inv_a, scale_b=inv_b,
                                out_dtype=kernel_dtype).to(out_dtype)
    with torch.autocast(a8.device.type, enabled=False):
        out = (a8.float() @ b8.float().t()) * inv_a * inv_b  # exact products, fp32 sums
    return out.to(kernel_dtype).to(out_dtype)


def _mm_fine(a8: torch.Tensor, sa: torch.Tensor, b8: torch.Tensor, sb: torch.Tensor,
             out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b_t.T`` for FP8 ``a8`` (M, K) and ``b8`` (N, K) with tile or block scales
    along K: each group of ``block`` products has its own pair of scales, so the
    emulation reads both operands back to float32 (exact up to the last bit of each
    scaled value) and multiplies them once."""
    with torch.autocast(a8.device.type, enabled=False):
        return (from_float8(a8, sa) @ from_float8(b8, sb).t()).to(out_dtype)


def _pad_last(t: torch.Tensor, block: int) -> torch.Tensor:
    """``t`` with zeros appended to its last dimension up to a multiple of ``block``:
    zeros change neither a tile's amax nor a dot product."""
    extra = -t.shape[-1] % block
    return torch.nn.functional.pad(t, (0, extra)) if extra else t

def scaled_matmul(a: torch.Tensor, b_t: torch.Tensor, a_dtype: torch.dtype,
                  b_dtype: torch.dtype, scaling: str, out_dtype: torch.dtype,
                  backend: str, scales=(None, None)) -> torch.Tensor:
    """``a @ b_t.T`` with both operands quantized to FP8 along the contracted (last)
    dimension: ``a`` is (M, K), ``b_t`` is (N, K), the result (M, N)."""
    gran = "rowwise" if scaling == "rowwise" else "tensorwise"
    a8, sa = to_float8(a, a_dtype, gran, scales[0])  # (M, K), scale () or (M, 1)
    b8, sb = to_float8(b_t, b_dtype, gran, scales[1])  # (N, K), scale () or (N, 1)
    return _mm(a8, sa, b8, sb, out_dtype, backend)


class _Float8Matmul(torch.autograd.Function):
    """y = x @ w.T in FP8: e4m3 x e4m3 forward, e5m2 gradients in the backward GEMMs.

    With one scale per tensor the FP8 copies of x and w serve the backward GEMMs too
    (transposing does not change a tensorwise scale) and are what is saved: a quarter
    of fp32's memory. Rowwise scales belong to the rows of the forward GEMM, so x and
    w are saved as they are and quantized again along the dimension each backward GEMM
    contracts; with a range per row the gradients take e4m3 too, as in torchao's
    rowwise recipe (and the rowwise kernels need no e5m2). Blockwise (DeepSeek-V3):
    x in 1 x block tiles, w in block x block squares, all e4m3; the FP8 weight is
    saved (a square's scale serves both orientations), x as it is, to be cast again
    in tiles along the tokens for the weight gradient.
    """

    @staticmethod
    def forward(ctx, x, w, scaling, backend, sx, sw, g_history, g_seen, block):
        # sx, sw: delayed scales or None; g_history, g_seen: the gradient's amax
        # history, updated in backward (None unless delayed)
        e4m3 = torch.float8_e4m3fn
        ctx.conf = (scaling, backend, x.dtype, w.dtype, block)
        ctx.g_state = (g_history, g_seen)
        if scaling == "rowwise":
            ctx.save_for_backward(x, w)
            return scaled_matmul(x, w, e4m3, e4m3, scaling, x.dtype, backend)
        if scaling == "blockwise":
            x8, sx = to_float8(x, e4m3, "tile", block=block)  # (M, K), (M, K/b)
            w8, sw = to_float8(w, e4m3, "block", block=block)  # (N, K), (N/b, K/b)
            ctx.save_for_backward(x, w8, sw)
            return _mm_fine(x8, sx, w8, sw, x.dtype)
        x8, sx = to_float8(x, e4m3, "tensorwise", sx)  # (M, K)
        w8, sw = to_float8(w, e4m3, "tensorwise", sw)  # (N, K)
        ctx.save_for_backward(x8, sx, w8, sw)
        return _mm(x8, sx, w8, sw, x.dtype, backend)

    @staticmethod
    def backward(ctx, gy):
        scaling, backend, x_dtype, w_dtype, block = ctx.conf
        e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
        none = (None,) * 7
        if scaling == "rowwise":
            x, w = ctx.saved_tensors
            # grad_x (M, K) = gy (M, N) @ w (N, K): contract over N.
            gx = scaled_matmul(gy, w.t().contiguous(), e4m3, e4m3, scaling, x_dtype,
                               backend)
            # grad_w (N, K) = gy.T (N, M) @ x (M, K): contract over M.
            gw = scaled_matmul(gy.t().contiguous(), x.t().contiguous(), e4m3, e4m3,
                               scaling, w_dtype, backend)
            return gx, gw, *none
        if scaling == "blockwise":
            return (*_blockwise_grads(ctx, gy, block), *none)
        x8, sx, w8, sw = ctx.saved_tensors
        g_history, g_seen = ctx.g_state
        sg = None if g_history is None else delayed_scale(g_history, g_seen, gy, e5m2)
        # The output gradient is cast too: e5m2, for its range.
        g8, sg = to_float8(gy, e5m2, "tensorwise", sg)  # (M, N)
        gx = _mm(g8, sg, w8.t().contiguous(), sw, x_dtype, backend)  # (M, K)
        gw = _mm(g8.t().contiguous(), sg, x8.t().contiguous(), sx, w_dtype,
                 backend)  # (N, K)
        return gx, gw, *none


def _blockwise_grads(ctx, gy: torch.Tensor, block: int):
    """The two backward GEMMs of DeepSeek-V3's recipe, all in e4m3. grad_x contracts
    over N: the output gradient in 1 x 128 tiles along N, the weight's 128 x 128
    blocks transposed (a square block's scale serves both orientations, which is why
    weights get blocks). grad_w contracts over the M tokens: both operands in tiles
    along M (the activations' 128 x 1 tiles)."""
    x, w8, sw = ctx.saved_tensors
    _, _, x_dtype, w_dtype, _ = ctx.conf
    e4m3 = torch.float8_e4m3fn
    g8, sg = to_float8(gy, e4m3, "tile", block=block)  # (M, N), (M, N/b)
    gx = _mm_fine(g8, sg, w8.t(), sw.t(), x_dtype)  # (M, K)
    gt8, sgt = to_float8(_pad_last(gy.t(), block), e4m3, "tile", block=block)  # (N, M)
    xt8, sxt = to_float8(_pad_last(x.t(), block), e4m3, "tile", block=block)  # (K, M)
    gw = _mm_fine(gt8, sgt, xt8, sxt, w_dtype)  # (N, K)
    return gx, gw


class Float8Linear(nn.Linear):
    """``nn.Linear`` whose matmuls run in FP8; weights stay in high precision (the
    master copy) and are quantized on every forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 scaling: str = "tensorwise", backend: str = "auto",
                 history_len: int = 16, block: int = 128, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if scaling not in SCALINGS:
            raise ValueError(f"scaling={scaling!r}; use one of {SCALINGS}")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; use one of {BACKENDS}")
        if scaling == "blockwise":
            if backend == "scaled_mm":
                raise ValueError("scaling='blockwise' runs the emulation only; use "
                                 "backend='auto' or 'emulate'")
            if in_features % block or out_features % block:
                raise ValueError(f"scaling='blockwise' needs in_features and "
                                 f"out_features divisible by block={block}, got "
                                 f"{in_features} and {out_features}")
        self.scaling, self.backend, self.block = scaling, backend, block
        delayed = scaling == "delayed"
        self.hist_x = AmaxHistory(history_len) if delayed else None
        self.hist_w = AmaxHistory(history_len) if delayed else None
        self.hist_g = AmaxHistory(history_len) if delayed else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "Float8Linear":
        """A Float8Linear that shares ``linear``'s parameters."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features,
                      linear.bias is not None, **kwargs)
        new.weight = linear.weight
        new.bias = linear.bias
        if new.hist_x is not None:  # meta buffers -> real ones beside the weight
            for h in (new.hist_x, new.hist_w, new.hist_g):
                h.to_empty(device=linear.weight.device)
                h.history.zero_()
                h.seen.zero_()
        return new

    def resolved_backend(self, device: torch.device) -> str:
        if self.scaling == "blockwise":
            return "emulate"
        return fp8_backend(device)[0] if self.backend == "auto" else self.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # run in the autocast dtype, like F.linear
            x = x.to(torch.get_autocast_dtype(dev))
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (B*T, C_in)
        sx = sw = g_history = g_seen = None
        if self.scaling == "delayed":  # scales known before the casts, on the device
            sx = self.hist_x.scale(x2, torch.float8_e4m3fn)
            sw = self.hist_w.scale(self.weight, torch.float8_e4m3fn)
            g_history, g_seen = self.hist_g.history, self.hist_g.seen
        y = _Float8Matmul.apply(x2, self.weight, self.scaling,
                                self.resolved_backend(x.device), sx, sw, g_history,
                                g_seen, self.block)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)  # (B, T, C_out)

    def extra_repr(self) -> str:
        block = f", block={self.block}" if self.scaling == "blockwise" else ""
        return (f"{super().extra_repr()}, scaling={self.scaling}, "
                f"backend={self.backend}{block}")


def size_filter(min_features: int = 1024, skip: Sequence[str] = ("lm_head",)
                ) -> Callable[[nn.Module, str], bool]:
    """A ``module_filter_fn`` that converts only linears with both sizes at least
    ``min_features`` and whose name does not end with one of ``skip``.

    FP8 pays only where the matmul is large: casting x and w costs passes over
    ``M * K + N * K`` values and a few small kernels per layer whatever the size,
    while the time saved grows as ``M * N * K``. Below about a thousand features
    the casts eat the gain, so small linears stay in bf16 (torchao filters by size
    for the same reason). The output layer is kept by name: its logits feed the
    loss directly and are the most sensitive to rounding.
    """
    if not (isinstance(min_features, int) and min_features >= 16):
        raise ValueError(f"min_features={min_features!r} must be an int >= 16")
    skip = tuple(skip)

    def keep_small_in_high_precision(module: nn.Module, fqn: str) -> bool:
        if any(fqn == s or fqn.endswith("." + s) for s in skip):
            return False
        return min(module.in_features, module.out_features) >= min_features

    return keep_small_in_high_precision


def convert_to_float8(model: nn.Module, module_filter_fn=None,
                      scaling: str = "tensorwise", backend: str = "auto",
                      quiet: bool = False, block: int = 128) -> nn.Module:
    """Swap, in place, every ``nn.Linear`` for which ``module_filter_fn(module, fqn)``
    is true (all when None) for a ``Float8Linear``; return the model.

    For speed pass ``size_filter()``: small matmuls then stay in high precision.
    A fused q/k/v projection (one ``Linear(C, 3C)``) becomes one ``Float8Linear``,
    so its input is cast to FP8 once, not three times.
    Layers whose sizes are not multiples of 16 stay as they are (``_scaled_mm`` needs
    that), and with ``scaling="blockwise"`` those whose sizes are not multiples of
    ``block``. Prints one line saying how many were swapped and which path runs them.
    """
    skipped = []
    multiple = block if scaling == "blockwise" else 16

    def select(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or isinstance(module, Float8Linear):
            return False
        if module_filter_fn is not None and not module_filter_fn(module, fqn):
            return False
        if module.in_features % multiple or module.out_features % multiple:
            skipped.append(fqn)
            return False
        return True

    if isinstance(model, nn.Linear):
        raise ValueError("model is itself an nn.Linear; wrap it in a module first")
    swapped = swap_modules(model, select, lambda m: Float8Linear.from_linear(
        m, scaling=scaling, backend=backend, block=block))
    if not quiet:
        p = next(model.parameters(), None)
        dev = p.device if p is not None else torch.device("cpu")
        path, why = fp8_backend(dev) if backend == "auto" else (backend, "as asked")
        if scaling == "blockwise":
            path, why = "emulate", "blockwise GEMMs are emulated"
        note = (f", {len(skipped)} kept (sizes not multiples of {multiple})"
                if skipped else "")
        print(f"convert_to_float8: {len(swapped)} Linear -> Float8Linear ({scaling})"
              f"{note}; matmuls run via {path} ({why})")
    return model
