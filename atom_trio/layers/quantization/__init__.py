"""Quantized linear layers: one `QuantMethod` per scheme, chosen per layer from the checkpoint's quantization config.

A model is built under `use_quant_config`, then `quantize_linear_layers` gives
each linear layer the parameters its scheme stores, in the checkpoint's names;
after loading, each method repacks them for the backend's kernels or, where
the backend has none for the scheme, dequantizes them once (the CPU).
"""

from __future__ import annotations

from .attach import finish_quantized_layers, quantize_linear_layers
from .base import QuantMethod, quantized_build, use_quant_config
from .fp8 import Fp8LinearMethod, quantize_fp8_per_channel
from .int4 import AWQ_ORDER, Int4LinearMethod, pack_int32, unpack_int32
from .int8 import Int8LinearMethod
from .mxfp4 import dequantize_mxfp4

__all__ = [
    "AWQ_ORDER",
    "Fp8LinearMethod",
    "Int4LinearMethod",
    "Int8LinearMethod",
    "QuantMethod",
    "dequantize_mxfp4",
    "finish_quantized_layers",
    "pack_int32",
    "quantize_fp8_per_channel",
    "quantize_linear_layers",
    "quantized_build",
    "unpack_int32",
    "use_quant_config",
]
