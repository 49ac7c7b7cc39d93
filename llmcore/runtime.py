"""Where and how an experiment runs: device, tier, seed, and the banner of each page.

A *tier* names the size of the experiments a page runs. ``cpu`` is a laptop or a CI
machine with two cores: every page finishes in a minute or two. ``gpu`` is one CUDA
GPU: the same code at real sizes. The tier follows the device unless the environment
variable ``LLMCORE_TIER`` says otherwise (``LLMCORE_TIER=cpu`` on a GPU machine runs
the small experiments fast; ``gpu`` without a GPU is refused). Apple's MPS runs the
cpu-tier sizes.

What the device can do is asked, not assumed: ``device_caps()`` (also ``rt.caps``)
tells a GPU's compute capability, memory and which tensor-core formats it has (and
whether a CPU has bf16 instructions); ``default_precision`` (``rt.precision``) turns
that into the training precision every page uses unless it is about precision;
``fit_memory`` (``rt.fit``) picks the largest preset whose declared memory need the
device has.
"""

from __future__ import annotations

import os
import platform
import random
from dataclasses import dataclass, replace
from typing import Mapping, TypeVar

import numpy as np
import torch

from llmcore.config import TIERS, Tiered

T = TypeVar("T")
GiB = 2**30


def select_device(prefer: str | None = None) -> torch.device:
    """CUDA if present, then Apple's MPS, then the CPU; ``prefer`` forces one."""
    if prefer is not None:
        device = torch.device(prefer)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"prefer={prefer!r}: no CUDA device is visible to torch; "
                             "pass prefer=None to fall back to the CPU")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def select_tier(device: torch.device, tier: str | None = None) -> str:
    """The tier: ``tier`` if given, else $LLMCORE_TIER, else from the device."""
    tier = tier or os.environ.get("LLMCORE_TIER") or None
    if tier is None:
        return "gpu" if device.type == "cuda" else "cpu"
    if tier not in TIERS:
        raise ValueError(f"tier (or LLMCORE_TIER) is {tier!r}; use one of {TIERS}")
    if tier == "gpu" and device.type != "cuda":
        raise ValueError("tier 'gpu' needs a CUDA device and none is visible; "
                         "unset LLMCORE_TIER or set it to 'cpu'")
    return tier


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a CPU generator so seeded.

    Pass the returned generator to samplers and data loaders where you want a stream of
    random numbers that later cells cannot disturb.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be a non-negative int below 2**64, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return torch.Generator().manual_seed(seed)


def cpu_name() -> str:
    """The processor's model name (Linux: from /proc/cpuinfo), else its architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """A human name for the device: the GPU model, or the CPU and its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return f"CPU {cpu_name()}, {torch.get_num_threads()} threads"


@dataclass(frozen=True)
class DeviceCaps:
    """What a device can do, from the driver: read once, passed around as data."""

    type: str  # "cuda", "mps" or "cpu"
    name: str  # e.g. "NVIDIA H100 80GB HBM3", or the CPU
    capability: tuple[int, int] | None  # CUDA compute capability (major, minor)
    total_memory: int  # bytes of device memory; 0 where unknown (CPU, MPS)
    multiprocessors: int  # streaming multiprocessors; 0 off CUDA
    cpu_bf16: bool = False  # a CPU with bf16 instructions (AVX512-BF16, AMX)

    @property
    def fp16_tensor_cores(self) -> bool:
        """fp16 matmuls on tensor cores: Volta (sm70) and later."""
        return self.capability is not None and self.capability >= (7, 0)

    @property
    def bf16_tensor_cores(self) -> bool:
        """bf16 matmuls on tensor cores: Ampere (sm80) and later."""
        return self.capability is not None and self.capability >= (8, 0)

    @property
    def fp8_tensor_cores(self) -> bool:
        """FP8 (e4m3/e5m2) matmuls: Ada (sm89) and Hopper (sm90) and later."""
        return self.capability is not None and self.capability >= (8, 9)

    @property
    def memory_gb(self) -> float:
        return self.total_memory / GiB

    def describe(self) -> str:
        if self.capability is None:
            return self.name
        major, minor = self.capability
        return (f"{self.name}, sm{major}{minor}, {self.memory_gb:.0f} GiB, "
                f"{self.multiprocessors} SMs")


def cpu_has_bf16() -> bool:
    """Whether this CPU reports bf16 instructions (Linux's /proc/cpuinfo flags):
    there bf16 matmuls run natively, elsewhere they are emulated and slow."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def device_caps(device: torch.device | str | None = None) -> DeviceCaps:
    """The capabilities of ``device`` (default: what ``select_device`` picks)."""
    device = select_device() if device is None else torch.device(device)
    if device.type != "cuda":
        return DeviceCaps(device.type, device_name(device), None, 0, 0,
                          cpu_bf16=device.type == "cpu" and cpu_has_bf16())
    props = torch.cuda.get_device_properties(device)
    return DeviceCaps("cuda", props.name, (props.major, props.minor),
                      int(props.total_memory), int(props.multi_processor_count))


def default_precision(caps: DeviceCaps) -> str:
    """The training precision for ``caps``, as ``TrainConfig.precision`` names it.

    bf16 where tensor cores run it (sm80+); fp16 on sm70/sm75 (V100, T4), which the
    training loop pairs with dynamic loss scaling; on a CPU bf16 where it has bf16
    instructions (there a bf16 matmul runs about twice as fast as fp32), else fp32;
    fp32 on MPS.
    """
    if caps.bf16_tensor_cores or (caps.type == "cpu" and caps.cpu_bf16):
        return "bf16"
    if caps.fp16_tensor_cores:
        return "fp16"
    return "fp32"


def fit_memory(options: Mapping[float, T], caps: DeviceCaps,
               headroom: float = 0.9) -> T:
    """The option with the largest memory need (GiB) that ``caps`` holds.

    ``options`` maps the GiB each preset needs to the preset, e.g.
    ``{16: small, 40: medium, 80: large}``. A device holds a need if it is at most
    ``headroom`` of its memory: the CUDA context and the allocator's caching take the
    rest. The smallest option is returned where nothing fits (the CPU reports no
    memory), so a page always runs; its gpu-tier preset should be the 16 GiB one.
    """
    if not options:
        raise ValueError("options is empty; map GiB needed -> preset, e.g. {16: cfg}")
    if any(not isinstance(k, (int, float)) or k <= 0 for k in options):
        raise ValueError(f"options keys must be positive GiB numbers, got "
                         f"{sorted(options)}")
    fits = [k for k in options if k * GiB <= headroom * caps.total_memory]
    return options[max(fits) if fits else min(options)]


@dataclass(frozen=True)
class Runtime:
    """What ``setup`` decided: pass ``rt.device`` on, pick sizes with ``rt.pick``."""

    device: torch.device  # where tensors and models live
    tier: str  # "cpu" or "gpu": the size of the experiments
    seed: int  # the seed every random generator started from
    generator: torch.Generator  # a CPU generator seeded with `seed`
    caps: DeviceCaps  # what the device can do (capability, memory, formats)

    def pick(self, presets: "Mapping[str, T] | Tiered[T]") -> T:
        """The preset for this tier from a ``{"cpu": ..., "gpu": ...}`` mapping."""
        if self.tier not in presets:
            raise KeyError(f"presets have no entry for tier {self.tier!r}; "
                           f"they have {sorted(presets)}")
        return presets[self.tier]

    def fit(self, options: Mapping[float, T]) -> T:
        """On the gpu tier, ``fit_memory(options, rt.caps)``; on the cpu tier, the
        smallest option (a page declares its cpu size as the smallest one)."""
        if self.tier == "cpu":
            return fit_memory(options, replace(self.caps, total_memory=0))
        return fit_memory(options, self.caps)

    @property
    def precision(self) -> str:
        """The training precision for this device: ``default_precision(rt.caps)``."""
        return default_precision(self.caps)

    @property
    def banner(self) -> str:
        return (f"llmcore | device: {self.device.type} ({self.caps.describe()}) "
                f"| tier: {self.tier} | precision: {self.precision} | torch "
                f"{torch.__version__} | seed {self.seed}")


def setup(seed: int = 0, *, tier: str | None = None, device: str | None = None,
          quiet: bool = False) -> Runtime:
    """The first call of every page: pick device and tier, seed, print the banner.
    (On Colab, the first cell of a notebook's copy has installed the package.)"""
    dev = select_device(device)
    rt = Runtime(device=dev, tier=select_tier(dev, tier), seed=seed,
                 generator=seed_everything(seed), caps=device_caps(dev))
    if not quiet:
        print(rt.banner)
    return rt
