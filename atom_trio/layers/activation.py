"""Gated activations."""

from __future__ import annotations

import torch
from torch import nn

from atom_trio.ops import current_backend


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` over a merged ``[gate | up]`` projection (Llama's SwiGLU MLP)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = current_backend()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.silu_and_mul(x)
