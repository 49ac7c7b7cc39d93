"""Low-precision training: number formats, loss scaling, FP8, MX, quantization.

Modules: ``formats`` (bits of fp32/tf32/fp16/bf16/fp8/fp6/fp4), ``scaler``
(``LossScaler``), ``fp8_scaling`` (scaled FP8 casts ``to_float8``/``from_float8``,
delayed scaling), ``fp8`` (the FP8 matmul, ``Float8Linear``, ``convert_to_float8``
and its ``size_filter``), ``accumulate`` (the tensor core's narrow accumulator,
emulated), ``mx`` (OCP Microscaling block formats), ``quant`` (int8/int4 weight
quantization and QAT: ``quantize``/``dequantize``), ``adam8bit`` (AdamW with
block-wise 8-bit moments).
"""

from llmcore.precision.fp8 import Float8Linear, convert_to_float8, size_filter
from llmcore.precision.quant import (dequantize, fake_quantize, quantize_int8,
                                     quantize_weights)
from llmcore.precision.scaler import LossScaler

__all__ = ["Float8Linear", "LossScaler", "convert_to_float8", "dequantize",
           "fake_quantize", "quantize_int8", "quantize_weights", "size_filter"]
