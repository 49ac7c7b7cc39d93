"""FP8 training: scaled casts, delayed scaling and a drop-in ``Float8Linear``.

An FP8 number has 3 (e4m3) or 2 (e5m2) mantissa bits and a narrow range, so a tensor is
stored as ``x_fp8 = cast(x * scale)`` with a float32 ``scale`` chosen to map the
tensor's largest magnitude (amax) onto the format's largest value, and read back as
``x ~= x_fp8 / scale``. The scale is one number per tensor (*tensorwise*), one per row
(*rowwise*), or taken from the amaxes of the last few steps (*delayed*, so no extra
pass over the tensor is needed before the cast). Forward operands use e4m3
(precision), gradients e5m2 (range), except that rowwise scaling keeps e4m3 throughout
(Micikevicius et al., 2022, "FP8 Formats for Deep Learning"; the recipes follow NVIDIA
Transformer Engine and torchao's ``Float8Linear``).

The matmul runs in ``torch._scaled_mm`` on GPUs of compute capability 8.9 or higher
(Ada, Hopper, Blackwell). Elsewhere an emulation does the same arithmetic: FP8 values
are exact in float32 and so are their products, which are summed in float32 and
multiplied by the two inverse scales, as the kernel does.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from llmcore.nn.swap import swap_modules

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALINGS = ("tensorwise", "rowwise", "delayed")
BACKENDS = ("auto", "scaled_mm", "emulate")


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in FP8_DTYPES:
        raise ValueError(f"dtype={dtype} is not an FP8 dtype; use one of {FP8_DTYPES}")


def amax_to_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float32 scale that maps ``amax`` onto the largest value of ``dtype``."""
    _check_dtype(dtype)
    # An all-zero tensor has amax 0: any scale works, keep it finite.
    return torch.finfo(dtype).max / amax.float().clamp(min=1e-12)


def quantize(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn,
             scaling: str = "tensorwise", scale: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_fp8, scale)`` with ``x ~= x_fp8.float() / scale``.

    ``scaling="tensorwise"`` gives a 0-d scale, ``"rowwise"`` one scale per row (shape
    ``(..., 1)``, the amax taken over the last dimension). A given ``scale`` (from
    delayed scaling) is used as is; values it pushes past the format's range saturate.
    """
    _check_dtype(dtype)
    if scaling not in ("tensorwise", "rowwise"):
        raise ValueError(f"scaling={scaling!r}; use 'tensorwise' or 'rowwise' (delayed "
                         "scaling passes its own `scale`)")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    x = x.float()
    if scale is None:
        amax = x.abs().amax() if scaling == "tensorwise" else \
            x.abs().amax(dim=-1, keepdim=True)
        scale = amax_to_scale(amax, dtype)
    fmax = torch.finfo(dtype).max
    # Saturate before the cast: torch's cast to e5m2 overflows to inf.
    x_fp8 = (x * scale).clamp(-fmax, fmax).to(dtype)
    return x_fp8, scale.float()


def dequantize(x_fp8: torch.Tensor, scale: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (x_fp8.float() / scale).to(dtype)


class AmaxHistory(nn.Module):
    """Delayed scaling: the scale comes from the largest amax of the last ``length``
    steps, so it is known before the tensor is (Transformer Engine's default recipe)."""

    def __init__(self, length: int = 16):
        super().__init__()
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.register_buffer("history", torch.zeros(length))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def scale(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The scale for ``x`` from the history (from ``x`` itself on the first step),
        then record ``x``'s amax for the steps to come."""
        amax = x.detach().abs().amax().float()
        past = self.history.amax() if self.seen > 0 else amax
        self.history.copy_(torch.roll(self.history, 1))
        self.history[0] = amax
        self.seen += 1
        return amax_to_scale(past, dtype)


def fp8_backend(device: torch.device | str) -> tuple[str, str]:
    """``(backend, reason)``: ``"scaled_mm"`` on CUDA with SM >= 8.9, else
    ``"emulate"``."""
    device = torch.device(device)
    if device.type != "cuda":
        return "emulate", f"no FP8 tensor cores on {device.type}"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return "emulate", f"GPU has compute capability {cap[0]}.{cap[1]} < 8.9"
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


def scaled_matmul(a: torch.Tensor, b_t: torch.Tensor, a_dtype: torch.dtype,
                  b_dtype: torch.dtype, scaling: str, out_dtype: torch.dtype,
                  backend: str, scales=(None, None)) -> torch.Tensor:
    """``a @ b_t.T`` with both operands quantized to FP8 along the contracted (last)
    dimension: ``a`` is (M, K), ``b_t`` is (N, K), the result (M, N)."""
    gran = "rowwise" if scaling == "rowwise" else "tensorwise"
    a8, sa = quantize(a, a_dtype, gran, scales[0])  # (M, K), scale () or (M, 1)
    b8, sb = quantize(b_t, b_dtype, gran, scales[1])  # (N, K), scale () or (N, 1)
    return _mm(a8, sa, b8, sb, out_dtype, backend)


class _Float8Matmul(torch.autograd.Function):
    """y = x @ w.T in FP8: e4m3 x e4m3 forward, e5m2 gradients in the backward GEMMs.

    With one scale per tensor the FP8 copies of x and w serve the backward GEMMs too
    (transposing does not change a tensorwise scale) and are what is saved: a quarter
    of fp32's memory. Rowwise scales belong to the rows of the forward GEMM, so x and
    w are saved as they are and quantized again along the dimension each backward GEMM
    contracts; with a range per row the gradients take e4m3 too, as in torchao's
    rowwise recipe (and the rowwise kernels need no e5m2).
    """

    @staticmethod
    def forward(ctx, x, w, scaling, backend, hist_x, hist_w, hist_g):
        e4m3 = torch.float8_e4m3fn
        ctx.conf = (scaling, backend, hist_g, x.dtype, w.dtype)
        if scaling == "rowwise":
            ctx.save_for_backward(x, w)
            return scaled_matmul(x, w, e4m3, e4m3, scaling, x.dtype, backend)
        sx = hist_x.scale(x, e4m3) if hist_x is not None else None
        sw = hist_w.scale(w, e4m3) if hist_w is not None else None
        x8, sx = quantize(x, e4m3, "tensorwise", sx)  # (M, K)
        w8, sw = quantize(w, e4m3, "tensorwise", sw)  # (N, K)
        ctx.save_for_backward(x8, sx, w8, sw)
        return _mm(x8, sx, w8, sw, x.dtype, backend)

    @staticmethod
    def backward(ctx, gy):
        scaling, backend, hist_g, x_dtype, w_dtype = ctx.conf
        e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
        if scaling == "rowwise":
            x, w = ctx.saved_tensors
            # grad_x (M, K) = gy (M, N) @ w (N, K): contract over N.
            gx = scaled_matmul(gy, w.t().contiguous(), e4m3, e4m3, scaling, x_dtype,
                               backend)
            # grad_w (N, K) = gy.T (N, M) @ x (M, K): contract over M.
            gw = scaled_matmul(gy.t().contiguous(), x.t().contiguous(), e4m3, e4m3,
                               scaling, w_dtype, backend)
            return gx, gw, None, None, None, None, None
        x8, sx, w8, sw = ctx.saved_tensors
        sg = hist_g.scale(gy, e5m2) if hist_g is not None else None
        g8, sg = quantize(gy, e5m2, "tensorwise", sg)  # (M, N)
        gx = _mm(g8, sg, w8.t().contiguous(), sw, x_dtype, backend)  # (M, K)
        gw = _mm(g8.t().contiguous(), sg, x8.t().contiguous(), sx, w_dtype,
                 backend)  # (N, K)
        return gx, gw, None, None, None, None, None


class Float8Linear(nn.Linear):
    """``nn.Linear`` whose matmuls run in FP8; weights stay in high precision (the
    master copy) and are quantized on every forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 scaling: str = "tensorwise", backend: str = "auto",
                 history_len: int = 16, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if scaling not in SCALINGS:
            raise ValueError(f"scaling={scaling!r}; use one of {SCALINGS}")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; use one of {BACKENDS}")
        self.scaling, self.backend = scaling, backend
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
        return fp8_backend(device)[0] if self.backend == "auto" else self.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # run in the autocast dtype, like F.linear
            x = x.to(torch.get_autocast_dtype(dev))
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (B*T, C_in)
        y = _Float8Matmul.apply(x2, self.weight, self.scaling,
                                self.resolved_backend(x.device), self.hist_x,
                                self.hist_w, self.hist_g)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)  # (B, T, C_out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scaling={self.scaling}, backend={self.backend}"


def convert_to_float8(model: nn.Module, module_filter_fn=None,
                      scaling: str = "tensorwise", backend: str = "auto",
                      quiet: bool = False) -> nn.Module:
    """Swap, in place, every ``nn.Linear`` for which ``module_filter_fn(module, fqn)``
    is true (all when None) for a ``Float8Linear``; return the model.

    Layers whose sizes are not multiples of 16 stay as they are (``_scaled_mm`` needs
    that). Prints one line saying how many were swapped and which path runs them.
    """
    skipped = []

    def select(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or isinstance(module, Float8Linear):
            return False
        if module_filter_fn is not None and not module_filter_fn(module, fqn):
            return False
        if module.in_features % 16 or module.out_features % 16:
            skipped.append(fqn)
            return False
        return True

    if isinstance(model, nn.Linear):
        raise ValueError("model is itself an nn.Linear; wrap it in a module first")
    swapped = swap_modules(model, select, lambda m: Float8Linear.from_linear(
        m, scaling=scaling, backend=backend))
    if not quiet:
        p = next(model.parameters(), None)
        dev = p.device if p is not None else torch.device("cpu")
        path, why = fp8_backend(dev) if backend == "auto" else (backend, "as asked")
        note = f", {len(skipped)} kept (sizes not multiples of 16)" if skipped else ""
        print(f"convert_to_float8: {len(swapped)} Linear -> Float8Linear ({scaling})"
              f"{note}; matmuls run via {path} ({why})")
    return model
