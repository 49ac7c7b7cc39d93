"""Where and how an experiment runs: device, tier, seed, and the banner of each page.

A *tier* names the size of the experiments a page runs. ``cpu`` is a laptop or a CI
machine with two cores: every page finishes in a minute or two. ``gpu`` is one CUDA
GPU: the same code at real sizes. The tier follows the device unless the environment
variable ``LLMCORE_TIER`` says otherwise (``LLMCORE_TIER=cpu`` on a GPU machine runs
the small experiments fast; ``gpu`` without a GPU is refused). This module and
``llmcore.parallel.launch`` are the only places that read environment variables.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import random
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping, TypeVar

import numpy as np
import torch

from llmcore.config import TIERS, Tiered
T = TypeVar("T")


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
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return torch.Generator().manual_seed(seed)


def device_name(device: torch.device) -> str:
    """A human name for the device: the GPU model, or the CPU and its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


@dataclass(frozen=True)
class Runtime:
    """What ``setup`` decided: pass ``rt.device`` on, pick sizes with ``rt.pick``."""

    device: torch.device  # where tensors and models live
    tier: str  # "cpu" or "gpu": the size of the experiments
    seed: int  # the seed every random generator started from
    generator: torch.Generator  # a CPU generator seeded with `seed`

    def pick(self, presets: "Mapping[str, T] | Tiered[T]") -> T:
        """The preset for this tier from a ``{"cpu": ..., "gpu": ...}`` mapping."""
        if self.tier not in presets:
            raise KeyError(f"presets have no entry for tier {self.tier!r}; "
                           f"they have {sorted(presets)}")
        return presets[self.tier]

    @property
    def banner(self) -> str:
        return (f"llmcore | device: {self.device.type} ({device_name(self.device)}) | "
                f"tier: {self.tier} | torch {torch.__version__} | seed {self.seed}")


def setup(seed: int = 0, *, tier: str | None = None, device: str | None = None,
          quiet: bool = False) -> Runtime:
    """The first call of every page: pick device and tier, seed, print the banner.

    On Colab it first installs the packages the book needs that Colab lacks.
    """
    if in_colab():
        ensure_packages()
    dev = select_device(device)
    rt = Runtime(device=dev, tier=select_tier(dev, tier), seed=seed,
                 generator=seed_everything(seed))
    if not quiet:
        print(rt.banner)
    return rt


def in_colab() -> bool:
    return "google.colab" in sys.modules


# Import name -> pip requirement, for what a notebook may import beyond Colab's stock.
COLAB_PACKAGES = {"jupytext": "jupytext", "accelerate": "accelerate",
                  "hypothesis": "hypothesis", "tqdm": "tqdm"}


def ensure_packages(packages: Mapping[str, str] = COLAB_PACKAGES) -> list[str]:
    """pip-install the packages whose import is missing; return what it installed."""
    missing = [req for name, req in packages.items()
               if importlib.util.find_spec(name) is None]
    if missing:
        print("installing:", " ".join(missing))
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *missing])
    return missing
