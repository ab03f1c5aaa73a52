"""Quantized mixture-of-experts weights: the layouts `KernelBackend.fused_experts` takes, and what they stand for.

`FusedMoE` stacks its experts' weights, ``w13`` ``[E, 2I, H]`` and ``w2``
``[E, H, I]`` as ``[E, N, K]`` matrices (N output rows, K input columns). A
quantized layer passes them in one of three layouts with a `QuantizedExperts`
that holds their scales:

- ``fp8``: ``float8_e4m3fn`` ``[E, N, K]`` times float32 scales per
  ``block_size`` (rows, columns) block ``[E, ceil(N / br), ceil(K / bc)]``
  (edge blocks partial), or, with no block size, per output row ``[E, N, 1]``.
- ``w4a16``: ``uint8`` ``[E, N, K // 2]``, column ``2j`` in the low nibble;
  ``W = (q - zero) * scale`` per ``group_size`` columns: ``scales`` ``[E, N, K //
  group_size]`` in the compute dtype, uint8 ``zeros`` alike or None (zero 8).
- ``mxfp4``: the same packing of e2m1 codes, times uint8 e8m0 ``scales``
  ``[E, N, K // 32]`` (``2 ** (s - 127)``), as OCP's microscaling format and
  GPT-OSS's checkpoints define them.

The experts compute weight-only: the activations stay in the compute dtype
and each weight is dequantized (exactly: one float32 rounding for FP8 and
4-bit, none for MXFP4) and rounded once to that dtype before its products.
`dequantize_experts` is that definition in torch, shared by the reference,
the load-time dequantization of backends without a kernel, and the tests.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch

from .quant_ref import SYMMETRIC_INT4_ZERO, unpack_int4

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""The sixteen e2m1 codes: sign bit 3, two exponent bits, one mantissa bit."""
MXFP4_GROUP = 32
E8M0_BIAS = 127

ExpertWeightKind = Literal["fp8", "w4a16", "mxfp4"]


@attrs.frozen(kw_only=True)
class QuantizedExperts:
    """The scales (and 4-bit zero points) of quantized ``w13`` / ``w2`` expert weights, and their layout's name."""

    kind: ExpertWeightKind
    w13_scale: torch.Tensor
    w2_scale: torch.Tensor
    w13_zeros: torch.Tensor | None = None
    w2_zeros: torch.Tensor | None = None
    block_size: tuple[int, int] | None = None
    """FP8: the (rows, columns) each scale covers; None: one scale per output row."""
    group_size: int = 0
    """4-bit: the input columns each scale covers (MXFP4's are always `MXFP4_GROUP`)."""

    def scale_block(self, scale: torch.Tensor, k: int) -> tuple[int, int]:
        """The (rows, columns) of the ``k``-column weight that one element of ``scale`` covers."""
        if self.kind == "fp8":
            return self.block_size if self.block_size is not None else (1, k)
        return (1, MXFP4_GROUP if self.kind == "mxfp4" else self.group_size)

    def logical_k(self, weight: torch.Tensor) -> int:
        """The input columns of a stored expert weight (two to a byte in the 4-bit layouts)."""
        return weight.shape[-1] * (1 if self.kind == "fp8" else 2)


def dequantize_experts(
    weight: torch.Tensor, scale: torch.Tensor, zeros: torch.Tensor | None, quant: QuantizedExperts
) -> torch.Tensor:
    """The float32 ``[E, N, K]`` weights that one quantized expert tensor (``w13`` or ``w2``) and its scales stand for."""
    k = quant.logical_k(weight)
    rows, cols = quant.scale_block(scale, k)
    n = weight.shape[1]
    per_element = scale.float().repeat_interleave(rows, 1)[:, :n].repeat_interleave(cols, 2)[..., :k]
    if quant.kind == "fp8":
        return weight.float() * per_element
    codes = unpack_int4(weight)
    if quant.kind == "mxfp4":
        lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=weight.device)
        return torch.ldexp(lut[codes.long()], per_element.to(torch.int32) - E8M0_BIAS)
    zero = SYMMETRIC_INT4_ZERO if zeros is None else zeros.float().repeat_interleave(cols, 2)
    # (q - zero) * scale is exact in float32; the layer's own rounding to the scales' dtype follows, as for dense W4A16.
    return ((codes.float() - zero) * per_element).to(scale.dtype).float()


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``[..., groups * 32]`` values of MXFP4 ``blocks`` ``[..., groups, 16]`` and e8m0 ``scales`` ``[..., groups]``.

    Two e2m1 codes a byte, the first in the low nibble, times ``2 ** (s - 127)``:
    exact in float32 and bfloat16 while the scales stay within their exponent range.
    """
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MXFP4_GROUP // 2:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match "
            f"([..., groups, {MXFP4_GROUP // 2}] and [..., groups])"
        )
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.ldexp(lut[unpack_int4(blocks).long()], (scales.to(torch.int32) - E8M0_BIAS).unsqueeze(-1))
    return values.flatten(-2).to(dtype)
