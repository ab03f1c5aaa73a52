"""MXFP4 dequantization (GPT-OSS's experts) against transformers' own, and the spec writer's round trip."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atom_trio.layers.quantization import dequantize_mxfp4
from atom_trio.testing.quantize import quantize_mxfp4


def test_dequantization_equals_transformers_gpt_oss_conversion():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), dtype=torch.uint8, generator=generator)  # [experts, out, groups, 16]
    scales = torch.randint(110, 140, (3, 10, 4), dtype=torch.uint8, generator=generator)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [experts, in, out]
    assert torch.equal(dequantize_mxfp4(blocks, scales).transpose(1, 2), theirs)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), magnitude=st.floats(1e-3, 1e3))
def test_the_writer_rounds_each_value_to_its_group_grid(seed, magnitude):
    """Every value lands within a grid step of itself: e2m1 steps are at most 2 scales apart, and values past
    6 scales (the group's largest may reach 8) saturate at 6, as the spec says."""
    w = torch.randn(5, 64, generator=torch.Generator().manual_seed(seed)) * magnitude
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (5, 2, 16) and scales.shape == (5, 2)
    back = dequantize_mxfp4(blocks, scales)
    scale = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=1)
    assert ((back - w).abs() <= 2 * scale + 1e-6 * magnitude).all()
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(back)), back)  # grid values are fixed points
