"""MXFP4 (OCP microscaling): e2m1 values with an e8m0 scale per 32, as GPT-OSS ships its experts.

A checkpoint holds, per expert matrix, ``<name>_blocks`` uint8 ``[..., groups, 16]``
(two e2m1 values a byte, the first in the low nibble) and ``<name>_scales``
uint8 ``[..., groups]`` (e8m0: the power of two ``2 ** (s - 127)``).
"""

from __future__ import annotations

import torch

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""The sixteen e2m1 codes: sign bit 3, two exponent bits, one mantissa bit."""
MXFP4_GROUP = 32
E8M0_BIAS = 127


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``[..., groups * 32]`` values of MXFP4 ``blocks`` ``[..., groups, 16]`` and ``scales`` ``[..., groups]``.

    Exact in float32 and bfloat16 while the scales stay within their exponent range.
    """
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MXFP4_GROUP // 2:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match "
            f"([..., groups, {MXFP4_GROUP // 2}] and [..., groups])"
        )
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0xF, blocks >> 4), dim=-1).flatten(-2).long()  # [..., groups, 32]
    values = torch.ldexp(lut[codes], (scales.to(torch.int32) - E8M0_BIAS).unsqueeze(-1))
    return values.flatten(-2).to(dtype)
