"""AdamW with 8-bit moments: block-wise dynamic quantization of the optimizer state.

Adam keeps two fp32 moments per parameter, 8 of the 16 bytes that mixed-precision
training spends per parameter. Dettmers, Lewis, Shleifer and Zettlemoyer (2022,
"8-bit Optimizers via Block-wise Quantization") store them in 8 bits: each moment
is cut into blocks of ``block_size`` consecutive values (2048 in the paper), each
block is divided by its largest magnitude (its *absmax*, kept in fp32) and every
value of it is replaced by the index of the nearest of 256 code values in [-1, 1].
A block of its own for every 2048 values confines an outlier's damage to its block.

The codes are *dynamic* (tree) quantization, not evenly spaced: after the sign bit a
run of ``E`` zero bits sets a decimal exponent ``10**-E``, a one bit ends the run, and
the remaining bits are a linear fraction in [0.1, 1]. Large values get many fraction
bits, small ones few, and magnitudes from 1 down to 1e-7 of the block's absmax stay
nonzero: the second moment, whose values span many decades, needs that. The second
moment is never negative, so its map spends the sign bit on one more fraction bit.

A step reads both moments back to fp32, takes AdamW's step with them (as
``torch.optim.AdamW`` does) and stores them in 8 bits again. Tensors with fewer than
``min_8bit_size`` values (biases, norm gains) keep fp32 moments: they cost little and
are the most sensitive.
"""

from __future__ import annotations

import math

import torch


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256 code values of dynamic tree quantization, sorted, in [-1, 1] (signed)
    or [0, 1]: for exponent ``E`` in 0..6, ``2**f`` fractions ``10**-E * m`` with ``m``
    the midpoints of ``2**f`` equal bins of [0.1, 1] (``f = 6 - E`` bits, one more
    when unsigned), and the values 0 and 1."""
    values = [0.0, 1.0]
    for e in range(7):
        f = (6 if signed else 7) - e
        edges = torch.linspace(0.1, 1.0, 2 ** f + 1, dtype=torch.float64)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** -e
        values += mids.tolist() + ([-v for v in mids.tolist()] if signed else [])
    code = torch.tensor(sorted(values), dtype=torch.float32)
    return code


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, block_size: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, absmax)``: uint8 indices into ``code`` of ``x / absmax`` per block of
    ``block_size`` consecutive values (flattened; the last block padded with zeros),
    each value rounded to the nearest code value."""
    flat = x.detach().float().flatten()
    pad = -flat.numel() % block_size
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)  # (B, bs)
    absmax = blocks.abs().amax(dim=1)  # (B,)
    normed = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    midpoints = (code[1:] + code[:-1]) / 2  # boundaries between neighbouring codes
    idx = torch.bucketize(normed.flatten(), midpoints)
    return idx[:flat.numel()].to(torch.uint8), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         block_size: int, shape: torch.Size) -> torch.Tensor:
    """The fp32 values ``code[codes] * absmax`` of each block, in ``shape``."""
    values = code[codes.long()]
    block_of = torch.arange(values.numel(), device=values.device) // block_size
    return (values * absmax[block_of]).view(shape)


class AdamW8bit(torch.optim.Optimizer):
    """``torch.optim.AdamW`` with block-wise 8-bit moments (Dettmers et al., 2022)."""

    def __init__(self, params, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, block_size: int = 2048,
                 min_8bit_size: int = 4096):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not all(0 <= b < 1 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not eps > 0 or weight_decay < 0:
            raise ValueError(f"eps must be > 0 and weight_decay >= 0, got {eps} and "
                             f"{weight_decay}")
        if not (isinstance(block_size, int) and block_size > 0):
            raise ValueError(f"block_size must be a positive int (the paper uses 2048),"
                             f" got {block_size!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        block_size=block_size, min_8bit_size=min_8bit_size)
        super().__init__(params, defaults)
        self.codes = {"exp_avg": dynamic_map(signed=True),
                      "exp_avg_sq": dynamic_map(signed=False)}

    def _moment(self, p, state, name, block_size) -> torch.Tensor:
        if name in state:  # a small tensor: fp32 moments, updated in place
            return state[name]
        code = self.codes[name].to(p.device)
        return dequantize_blockwise(state[name + "_codes"], state[name + "_absmax"],
                                    code, block_size, p.shape)

    def _store(self, p, state, name, value, block_size) -> None:
        if name in state:
            return
        code = self.codes[name].to(p.device)
        state[name + "_codes"], state[name + "_absmax"] = quantize_blockwise(
            value, code, block_size)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, bs = group["lr"], group["block_size"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self._init_state(p, state, group)
                state["step"] += 1
                step = state["step"].item()
                grad = p.grad.float()
                m = self._moment(p, state, "exp_avg", bs)
                v = self._moment(p, state, "exp_avg_sq", bs)
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                # The step uses the fp32 moments of this step; only storage is 8-bit.
                w = p.float() if p.dtype != torch.float32 else p
                w.mul_(1 - lr * group["weight_decay"])
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
                w.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))
                if w is not p:
                    p.copy_(w)
                self._store(p, state, "exp_avg", m, bs)
                self._store(p, state, "exp_avg_sq", v, bs)
        return loss

    def _init_state(self, p, state, group) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32)
        if p.numel() < group["min_8bit_size"]:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            return
        for name in ("exp_avg", "exp_avg_sq"):
            self._store(p, state, name, torch.zeros_like(p, dtype=torch.float32),
                        group["block_size"])

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``Optimizer.load_state_dict``, which casts floating state to each
        parameter's dtype; the codes and absmaxes are put back in their own."""
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for key, saved in state_dict["state"].get(i, {}).items():
                if key != "step" and torch.is_tensor(saved):
                    self.state[p][key] = saved.to(p.device, copy=True)
