"""Quantized linear layers: one `QuantMethod` per scheme, chosen per layer from the checkpoint's quantization config.

A model is built under `use_quant_config`, then `quantize_linear_layers` gives
each linear layer the parameters its scheme stores, in the checkpoint's names;
after loading, each method repacks them for the backend's kernels or, where
the backend has none for the scheme, dequantizes them once (the CPU). A
mixture-of-experts layer's experts get an `ExpertsQuantMethod` the same way
(FP8, 4-bit, and MXFP4, which only experts take).
"""

from __future__ import annotations

from atom_trio.ops.quant_experts import dequantize_mxfp4

from .attach import finish_quantized_layers, quantize_linear_layers
from .base import QuantMethod, quantized_build, use_quant_config
from .experts import ExpertsQuantMethod, Fp8ExpertsMethod, Int4ExpertsMethod, Mxfp4ExpertsMethod
from .fp8 import Fp8LinearMethod, quantize_fp8_per_channel
from .int4 import AWQ_ORDER, Int4LinearMethod, pack_int32, unpack_int32
from .int8 import Int8LinearMethod

__all__ = [
    "AWQ_ORDER",
    "ExpertsQuantMethod",
    "Fp8ExpertsMethod",
    "Fp8LinearMethod",
    "Int4ExpertsMethod",
    "Int4LinearMethod",
    "Int8LinearMethod",
    "Mxfp4ExpertsMethod",
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
