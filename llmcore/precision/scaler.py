"""Dynamic loss scaling for fp16 training, with ``torch.amp.GradScaler``'s interface.

fp16 flushes magnitudes below about 6e-8 to zero, and many gradients are that small.
Multiplying the loss by a large factor S shifts every gradient up by S (the chain rule
is linear), out of the underflow zone; the optimizer then sees the gradients divided
by S again, in fp32. S is chosen on the fly: halve it and skip the step whenever a
gradient overflowed to inf/NaN, double it after ``growth_interval`` clean steps in a
row (Micikevicius et al., 2018, "Mixed Precision Training").
"""

from __future__ import annotations

import math

import torch


class LossScaler:
    """A hand-written ``torch.amp.GradScaler``: same arguments, methods and decisions.

    Use it as ``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``,
    optionally with ``scaler.unscale_(opt)`` before ``step`` to clip gradients.
    Like GradScaler it reads the device once per step: the inf/NaN check of all
    gradients and the scale's update stay on the device, and only ``step`` asks the
    host whether to skip (one ``.item()``).
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000,
                 enabled: bool = True):
        # An infinite scale makes every gradient inf, so every step would be skipped.
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be finite and > 0, got {init_scale}; "
                             "the usual start is 2.0**16")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        if not (isinstance(growth_interval, int) and growth_interval > 0):
            raise ValueError(f"growth_interval must be a positive int, "
                             f"got {growth_interval!r}")
        # fp32, like GradScaler's scale tensor, so both round the same way. Scale and
        # tracker move to the loss's device on first use and stay there.
        self._scale = torch.tensor(float(init_scale), dtype=torch.float32)
        self._growth_tracker = torch.zeros((), dtype=torch.int32)  # clean steps
        self._growth_factor = growth_factor
        self._backoff_factor = backoff_factor
        self._growth_interval = growth_interval
        self._enabled = enabled
        # per optimizer since the last update: a 0-d float tensor, 1.0 if any
        # gradient was inf/NaN (on the device, not read yet)
        self._found_inf: dict[int, torch.Tensor] = {}

    def is_enabled(self) -> bool:
        return self._enabled

    def get_scale(self) -> float:
        return self._scale.item() if self._enabled else 1.0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * S``: call ``.backward()`` on the result."""
        if not self._enabled:
            return loss
        if self._scale.device != loss.device:
            self._scale = self._scale.to(loss.device)
            self._growth_tracker = self._growth_tracker.to(loss.device)
        return loss * self._scale.to(dtype=loss.dtype)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients of ``optimizer``'s parameters by S, in place, and note
        on the device whether any of them is inf or NaN. Once per ``update``."""
        if not self._enabled:
            return
        if id(optimizer) in self._found_inf:
            raise RuntimeError("unscale_() has already been called on this optimizer "
                               "since the last update()")
        # GradScaler computes 1/S in float64 and rounds it to fp32; so do we.
        inv_scale = self._scale.double().reciprocal().float()
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.dtype == torch.float16:
                    raise ValueError("unscale_: a parameter has an fp16 gradient; keep "
                                     "fp32 master weights (autocast does) and scale "
                                     "only the loss")
                by_device.setdefault(p.grad.device, []).append(p.grad)
        found = torch.zeros((), device=self._scale.device)
        for device, grads in by_device.items():
            # one reduction per device, no host round trip per parameter
            finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
            found = torch.maximum(found, (~finite).float().to(found.device))
            for g in grads:
                g.mul_(inv_scale.to(device))
        self._found_inf[id(optimizer)] = found

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):
        """``optimizer.step()`` unless a gradient was inf/NaN; then the step is skipped
        and None returned. The one host synchronisation of a step is here."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if id(optimizer) not in self._found_inf:
            self.unscale_(optimizer)
        if self._found_inf[id(optimizer)].item():
            return None
        return optimizer.step(*args, **kwargs)

    def update(self, new_scale: float | None = None) -> None:
        """Back off after an overflow, grow after ``growth_interval`` clean steps;
        computed on the device with ``torch.where``, so no synchronisation."""
        if not self._enabled:
            return
        if new_scale is not None:
            self._scale.fill_(float(new_scale))
        elif not self._found_inf:
            raise RuntimeError("update(): no inf checks were recorded; call step() or "
                               "unscale_() on an optimizer first")
        else:
            found = torch.stack(list(self._found_inf.values())).amax() > 0
            clean = self._growth_tracker + 1
            grow = clean == self._growth_interval
            grown = self._scale * self._growth_factor
            grown = torch.where(torch.isfinite(grown), grown, self._scale)  # never inf
            self._scale = torch.where(
                found, self._scale * self._backoff_factor,
                torch.where(grow, grown, self._scale))
            self._growth_tracker = torch.where(found | grow, 0, clean).int()
        self._found_inf = {}

    def state_dict(self) -> dict:
        if not self._enabled:
            return {}
        return {"scale": self.get_scale(), "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor,
                "growth_interval": self._growth_interval,
                "_growth_tracker": int(self._growth_tracker.item())}

    def load_state_dict(self, state: dict) -> None:
        if not self._enabled:
            return
        if not state:
            raise RuntimeError("load_state_dict: the state is empty; it came from a "
                               "disabled scaler")
        device = self._scale.device
        self._scale = torch.tensor(float(state["scale"]), dtype=torch.float32,
                                   device=device)
        self._growth_factor = state["growth_factor"]
        self._backoff_factor = state["backoff_factor"]
        self._growth_interval = state["growth_interval"]
        self._growth_tracker = torch.tensor(int(state["_growth_tracker"]),
                                            dtype=torch.int32, device=device)
