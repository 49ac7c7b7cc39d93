"""llmcore: the package behind the book on how large language models are built and
trained.

Shape key, used in every comment that follows a reshape:

    B   batch size
    T   sequence length (time)
    C   model width (n_embd, d_model)
    nh  number of attention heads
    hs  head size, C // nh
    V   vocabulary size

A comment ``# (B, nh, T, hs)`` gives the shape of the tensor on that line.
"""
from llmcore.runtime import (DeviceCaps, Runtime, default_precision,  # noqa: E402
                             device_caps, setup)

__version__ = "0.1.0"


__all__ = ["DeviceCaps", "Runtime", "default_precision", "device_caps", "setup",
           "__version__"]
