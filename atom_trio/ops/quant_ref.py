"""The quantized weight layouts, and the activation quantization the GPU kernels apply, in plain torch.

One definition of each layout (what a quantized weight means in real
numbers) serves the interface's defaults (dequantize, then `linear`), the
torch reference (which also emulates the kernels' activation quantization,
so that a kernel test compares like with like) and the tests.

Layouts:

- FP8: ``float8_e4m3fn`` ``[out, in]`` weights times a float32 scale that is
  per-tensor ``[1]``, per-channel ``[out, 1]`` or per block
  ``[ceil(out / bo), ceil(in / bi)]`` (edge blocks may be partial).
- INT8: ``int8`` ``[out, in]`` weights times a per-channel float32 ``[out, 1]`` scale.
- W4A16: ``uint8`` ``[out, in // 2]``, input column ``2j`` in the low nibble
  and ``2j + 1`` in the high one; ``W = (q - zero) * scale`` per group of
  ``group_size`` input columns, zero 8 when the weights are symmetric.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
INT8_MAX = 127.0
MIN_AMAX = 1e-10
"""Floor of a row's absolute maximum before it becomes a scale: an all-zero row quantizes to zeros, not NaN."""


def dynamic_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """A dynamic activation scale: ``max(amax, MIN_AMAX)`` times the float32 reciprocal of ``qmax``.

    A product, not a quotient, because torch's CUDA division by a Python
    number multiplies by its reciprocal while the CPU divides: the two differ
    in the last bit, which flips the rounding of values on an e4m3 or integer
    tie. The product is the same on every device, and the kernels compute it.
    """
    return amax.clamp(min=MIN_AMAX) * (1.0 / qmax)
SYMMETRIC_INT4_ZERO = 8


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, int], block_size: tuple[int, int]) -> torch.Tensor:
    """A per-block ``[ceil(rows / br), ceil(cols / bc)]`` scale repeated to one value per element of ``shape``."""
    rows, cols = shape
    block_rows, block_cols = block_size
    return scale.repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block_cols, 1)[:, :cols]


def dequantize_fp8(
    weight: torch.Tensor, weight_scale: torch.Tensor, block_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """The float32 weights an FP8 weight and its per-tensor, per-channel or block scale stand for."""
    if block_size is None:
        return weight.float() * weight_scale.float()
    return weight.float() * expand_block_scale(weight_scale.float(), tuple(weight.shape), block_size)


def dequantize_int8(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The float32 weights an INT8 weight and its per-channel scale stand for."""
    return weight.float() * weight_scale.float()


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """``uint8`` ``[out, in]`` values 0..15 from the packed ``[out, in // 2]`` (low nibble first)."""
    return torch.stack((qweight & 0xF, qweight >> 4), dim=-1).flatten(-2)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """The packed ``uint8`` ``[out, in // 2]`` layout of values 0..15 ``[out, in]``: `unpack_int4`'s inverse."""
    values = values.to(torch.uint8)
    return values[..., 0::2] | (values[..., 1::2] << 4)


def dequantize_w4a16(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """The weights, in ``scales``' dtype, of a packed 4-bit weight: ``(q - zero) * scale`` per group.

    Computed in float32 (``q - zero`` times a 16-bit scale is exact there) and
    rounded once to the scales' dtype, as the GPU kernels do before their dot.
    """
    q = unpack_int4(qweight).float()
    zero = (
        torch.full_like(scales, SYMMETRIC_INT4_ZERO, dtype=torch.float32)
        if zeros is None
        else zeros.float()
    )
    per_column = (q - zero.repeat_interleave(group_size, 1)) * scales.float().repeat_interleave(group_size, 1)
    return per_column.to(scales.dtype)


def quantize_fp8_per_token(x: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic FP8 quantization of ``x`` ``[tokens, k]``: each token's row, or each 1 x ``group_size`` group of it.

    Returns the FP8 values and their float32 scales ``[tokens, 1]`` (or
    ``[tokens, ceil(k / group_size)]``): ``scale = amax * (1 / 448)`` (`dynamic_scale`) and
    ``q = fp8(x / scale)`` (round to nearest), which is what the fused
    activation-quantization kernels compute.
    """
    x32 = x.float()
    tokens, k = x32.shape
    if group_size is None:
        scale = dynamic_scale(x32.abs().amax(dim=1, keepdim=True), FP8_MAX)
        return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale
    groups = -(-k // group_size)
    padded = torch.nn.functional.pad(x32, (0, groups * group_size - k)).view(tokens, groups, group_size)
    scale = dynamic_scale(padded.abs().amax(dim=2), FP8_MAX)
    q = (x32 / scale.repeat_interleave(group_size, 1)[:, :k]).clamp(-FP8_MAX, FP8_MAX)
    return q.to(FP8_DTYPE), scale


def quantize_fp8_static(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """Static FP8 quantization of ``x`` with a per-tensor float32 ``input_scale`` ``[1]`` from the checkpoint."""
    return (x.float() / input_scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_int8(x: torch.Tensor, input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 quantization of ``x`` ``[tokens, k]``: ``q = round(x / scale)`` within +-127.

    Dynamic, each token's row gets ``scale = amax * (1 / 127)`` (``[tokens, 1]``);
    static, the per-tensor float32 ``input_scale`` ``[1]``. Rounds half to
    even, as the GPU kernel does. Returns the int8 values and their scales.
    """
    x32 = x.float()
    if input_scale is not None:
        scale = input_scale.float()
    else:
        scale = dynamic_scale(x32.abs().amax(dim=1, keepdim=True), INT8_MAX)
    return torch.round(x32 / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def fp8_activations(
    x: torch.Tensor, input_scale: torch.Tensor | None, group_size: int | None = None
) -> torch.Tensor:
    """``x`` as an FP8 W8A8 kernel sees it: quantized (statically, per token or per group) and back to float32."""
    if input_scale is not None:
        return quantize_fp8_static(x, input_scale).float() * input_scale.float()
    q, scale = quantize_fp8_per_token(x, group_size)
    if group_size is not None:
        scale = scale.repeat_interleave(group_size, 1)[:, : x.shape[1]]
    return q.float() * scale


def int8_activations(x: torch.Tensor, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` as an INT8 W8A8 kernel sees it: quantized (per token, or statically) and back to float32."""
    q, scale = quantize_int8(x, input_scale)
    return q.float() * scale


__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "INT8_MAX",
    "dequantize_fp8",
    "dequantize_int8",
    "dequantize_w4a16",
    "dynamic_scale",
    "expand_block_scale",
    "fp8_activations",
    "int8_activations",
    "pack_int4",
    "quantize_fp8_per_token",
    "quantize_fp8_static",
    "quantize_int8",
    "unpack_int4",
]
