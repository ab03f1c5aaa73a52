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
E4M3_MIN_STEP_EXPONENT = tl.constexpr(127 - 9)
"""The biased float32 exponent of e4m3's smallest step, ``2**-9`` (its subnormal spacing)."""


@triton.jit
def round_to_e4m3(v):
    """``v`` (float32, within +-448, or NaN) rounded to the nearest e4m3 value, ties to even, still in float32.

    The conversion that follows is then exact everywhere: Triton's CPU
    interpreter rounds float32 to e4m3 itself and loses the carry when the
    mantissa rounds up into the next power of two (127.9 becomes 64), so
    rounding here keeps the interpreter's results the GPU's.

    The rounding is integer arithmetic on the float32 bits: the significand
    (with its implicit bit) is cut to a whole number of e4m3 steps,
    ``2**(exponent - 3)`` (three mantissa bits) or ``2**-9`` below the normal
    range, and rounded half to even by its remainder. A float rounding trick
    (``v * 2**k + 1.5 * 2**23``) gives the same numbers in exact arithmetic,
    but on a GPU Triton flushes float32 subnormals to zero and may contract a
    product and a sum into one FMA, which the interpreter does not: integers
    leave nothing to flush or contract. The one float operation, the count of
    steps times the step, is exact (at most 16 times a power of two no smaller
    than ``2**-9``). The sign is put back last, so a negative value that
    rounds to zero stays -0, as torch's conversion keeps it (byte 0x80).
    """
    bits = v.to(tl.int32, bitcast=True)
    magnitude_bits = bits & 0x7FFFFFFF
    exponent = magnitude_bits >> 23
    significand = (magnitude_bits & 0x7FFFFF) | tl.where(exponent > 0, 0x800000, 0)
    exponent = tl.maximum(exponent, 1)  # a float32 subnormal: no implicit bit, the exponent of 2**-126
    step_exponent = tl.maximum(exponent - 3, E4M3_MIN_STEP_EXPONENT)
    # Significand units are 2**(exponent - 150); a step is 2**shift of them (20 in the normal range). Past 25
    # the half step exceeds any significand: the value rounds to zero.
    shift = tl.minimum(step_exponent - exponent + 23, 25)
    steps = significand >> shift
    remainder = significand - (steps << shift)
    half = 1 << (shift - 1)
    steps += ((remainder > half) | ((remainder == half) & ((steps & 1) == 1))).to(tl.int32)
    step = (step_exponent << 23).to(tl.float32, bitcast=True)
    rounded = steps.to(tl.float32) * step
    rounded = tl.where(bits < 0, -rounded, rounded)
    return tl.where(v != v, v, rounded)  # NaN stays NaN


@triton.jit
def clamp_to_fp8_range(q):
    """``q`` saturated at +-448, NaN kept (as torch's ``clamp`` keeps it; a GPU's plain min/max would drop it)."""
    nan = tl.PropagateNan.ALL
    return tl.minimum(tl.maximum(q, -FP8_LIMIT, propagate_nan=nan), FP8_LIMIT, propagate_nan=nan)


@triton.jit
def to_fp8(x, scale):
    """``fp8(x / scale)``, saturated at +-448: `quant_ref.quantize_fp8_static`'s values."""
    q = tl.math.div_rn(x.to(tl.float32), scale)
    return round_to_e4m3(clamp_to_fp8_range(q)).to(tl.float8e4nv)
