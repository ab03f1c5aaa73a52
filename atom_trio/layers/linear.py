"""Linear layers, named and shaped for tensor parallelism.

Column-parallel layers split their output features across ranks and
row-parallel layers their input features (then all-reduce), Megatron style.
Today every layer holds the whole matrix (one rank); the split, and the
all-reduce after `RowParallelLinear`, slot into ``weight_loader`` and
``forward`` without changing a model. The packed layers exist so that q/k/v
and gate/up each cost one matmul: their ``weight_loader`` takes a Hugging Face
shard (``q_proj``, ``gate_proj`` ...) and copies it into its rows of the packed
weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearBase(nn.Module):
    """``y = x @ W.T + b`` with a ``weight_loader`` on each parameter."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        _copy_checked(param.data, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split across tensor-parallel ranks (one rank today)."""


class RowParallelLinear(LinearBase):
    """Input features split across tensor-parallel ranks; the partial outputs are summed."""


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input stacked in one matrix (gate and up)."""

    def __init__(self, input_size: int, output_sizes: list[int], *, bias: bool = False) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias=bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        index = int(shard_id)
        offset = sum(self.output_sizes[:index])
        _copy_checked(param.data.narrow(0, offset, self.output_sizes[index]), loaded)


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matrix: rows ``[q | k | v]``."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, *, bias: bool = False
    ) -> None:
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        super().__init__(hidden_size, self.q_size + 2 * self.kv_size, bias=bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        offset, size = {
            "q": (0, self.q_size),
            "k": (self.q_size, self.kv_size),
            "v": (self.q_size + self.kv_size, self.kv_size),
        }[shard_id]
        _copy_checked(param.data.narrow(0, offset, size), loaded)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


def _copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(src.shape)} does not fit parameter {tuple(dst.shape)}")
    dst.copy_(src)
