"""The kinds of GPU the book plans for: their memory, precision and datasheet peaks.

``python -m tools.bench plan`` plans every page and benchmark on each class (a T4, the
24 GB class, A100 40/80 GB, H100, H200); ``make test-gpu`` names the class it ran on.
A page never needs the class: it asks its device what it can do (``rt.caps``,
``rt.precision``) and picks its size by memory (``rt.fit``).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmcore.runtime import GiB, DeviceCaps, default_precision

# Gpu-tier presets fit Colab's T4 (16 GB, of which about 15 GiB are usable) unless a
# page declares a larger need and picks its size from the device's memory
# (``Runtime.fit``); the plan checks every preset against it.
GPU_BUDGET_GB = 15


@dataclass(frozen=True)
class DeviceClass:
    """A kind of GPU a learner has, as the book plans for it: its memory, its
    training precision, and its dense tensor-core peaks from the datasheets
    (NVIDIA T4, L4, A100, H100 SXM and H200 SXM datasheets; TF32 and 16-bit without
    sparsity)."""

    name: str  # "t4", "l4", "a100-40gb", "a100-80gb", "h100", "h200"
    capability: tuple[int, int]  # the class's compute capability
    usable_gib: float  # what a page may plan on: the driver reports a little less
    peak_tflops: dict[str, float]  # dense peak per precision it has
    bandwidth_tbs: float  # memory bandwidth, TB/s (what generation waits for)

    @property
    def caps(self) -> DeviceCaps:
        """What ``device_caps`` would report for this class (its usable memory)."""
        memory = int(self.usable_gib * GiB)
        return DeviceCaps("cuda", self.name, self.capability, memory, 1)

    @property
    def precision(self) -> str:
        """The training precision the book uses on this class."""
        return default_precision(self.caps)


DEVICE_CLASSES = {c.name: c for c in (
    # Colab's free GPU: Turing, fp16 tensor cores only, 16 GB of which ~15 usable.
    DeviceClass("t4", (7, 5), 15.0, {"fp32": 8.1, "fp16": 65.0}, 0.32),
    # 24 GB: L4 (sm89), RTX 3090 (sm86), RTX 4090 (sm89); planned as an L4.
    DeviceClass("l4", (8, 9), 22.0, {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0,
                                     "fp16": 121.0, "fp8": 242.0}, 0.30),
    DeviceClass("a100-40gb", (8, 0), 39.0, {"fp32": 19.5, "tf32": 156.0,
                                            "bf16": 312.0, "fp16": 312.0}, 1.56),
    DeviceClass("a100-80gb", (8, 0), 78.0, {"fp32": 19.5, "tf32": 156.0,
                                            "bf16": 312.0, "fp16": 312.0}, 2.04),
    DeviceClass("h100", (9, 0), 78.0, {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4,
                                       "fp16": 989.4, "fp8": 1978.9}, 3.35),
    DeviceClass("h200", (9, 0), 139.0, {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4,
                                        "fp16": 989.4, "fp8": 1978.9}, 4.8),
)}


def device_class(caps: DeviceCaps) -> DeviceClass | None:
    """The class ``caps`` plans as (None off CUDA and below sm70): sm70/sm75 a T4;
    sm80+ with up to 30 GiB the 24 GB class; then A100 40/80 GB, H100, H200 by
    capability and memory."""
    if caps.type != "cuda" or caps.capability is None or caps.capability < (7, 0):
        return None  # no tensor cores: no class the book plans for
    gib = caps.memory_gb
    if caps.capability < (8, 0):
        return DEVICE_CLASSES["t4"]
    if gib <= 30:
        return DEVICE_CLASSES["l4"]
    if caps.capability < (9, 0):
        return DEVICE_CLASSES["a100-40gb" if gib <= 48 else "a100-80gb"]
    return DEVICE_CLASSES["h100" if gib <= 100 else "h200"]
