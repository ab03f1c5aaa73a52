"""Rounding float32 to FP8 (e4m3) inside a kernel, exactly as torch's ``.to(torch.float8_e4m3fn)`` does.

Shared by the activation quantization of the W8A8 GEMMs and the FP8 KV cache's store.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..quant_ref import FP8_MAX

RNE_MAGIC = tl.constexpr(12582912.0)
"""1.5 * 2**23: adding then subtracting it rounds a float32 of magnitude under 2**22 to the nearest integer, ties to even.

The same rounding as ``torch.round`` (and CUDA's ``rint``), in plain
arithmetic that Triton's CPU interpreter runs too."""
FP8_LIMIT = tl.constexpr(FP8_MAX)


@triton.jit
def round_to_e4m3(v):
    """``v`` (float32, within +-448) rounded to the nearest e4m3 value, ties to even, still in float32.

    The conversion that follows is then exact everywhere: Triton's CPU
    interpreter rounds float32 to e4m3 itself and loses the carry when the
    mantissa rounds up into the next power of two (127.9 becomes 64), so
    rounding here keeps the interpreter's results the GPU's. A step is
    ``2**(exponent - 3)`` (three mantissa bits), ``2**-9`` below the normal range.
    The magnitude is rounded and the sign put back: a negative value that
    rounds to zero stays -0, as torch's conversion keeps it (byte 0x80).
    """
    bits = v.to(tl.int32, bitcast=True)
    magnitude = tl.abs(v)
    step_exponent = tl.maximum((magnitude.to(tl.int32, bitcast=True) >> 23) - 3, 127 - 9)
    step = (step_exponent << 23).to(tl.float32, bitcast=True)
    inverse_step = ((254 - step_exponent) << 23).to(tl.float32, bitcast=True)
    rounded = ((magnitude * inverse_step + RNE_MAGIC) - RNE_MAGIC) * step
    return tl.where(bits < 0, -rounded, rounded)


@triton.jit
def to_fp8(x, scale):
    """``fp8(x / scale)``, saturated at +-448: `quant_ref.quantize_fp8_static`'s values."""
    q = tl.math.div_rn(x.to(tl.float32), scale)
    return round_to_e4m3(tl.minimum(tl.maximum(q, -FP8_LIMIT), FP8_LIMIT)).to(tl.float8e4nv)

