"""Linear layers split across tensor-parallel ranks, Megatron style.

Column-parallel layers split their output features across ranks, so each
rank computes its own slice of the output; row-parallel layers split their
input features, so each rank computes a partial sum and an all-reduce adds
them up. A column-parallel layer followed by a row-parallel one (q/k/v then
o, gate/up then down) therefore needs one all-reduce, and none in between.

Each parameter's ``weight_loader`` takes the full Hugging Face tensor and
copies only this rank's block of it; the packed layers (q/k/v and gate/up,
one matmul each) also place each shard (``q_proj``, ``gate_proj`` ...) in its
rows of the packed weight. Shapes and the rank come from the
`TensorParallelGroup` current when the layer is built.
"""

from __future__ import annotations

import torch
from torch import nn

from atom_trio.distributed import current_tp_group
from atom_trio.errors import ModelLoadError
from atom_trio.ops import current_backend

from .layernorm import RMSNorm
from .quantization import QuantMethod, quantized_build


class LinearBase(nn.Module):
    """``y = x @ W.T + b`` on this rank's ``[output_size, input_size]`` block.

    Subclasses define ``weight_loader(param, loaded, shard_id)``, which says
    which block of a checkpoint tensor this rank holds.
    """

    silu_and_mul = False  # whether the output goes through `silu_and_mul` (see MergedColumnParallelLinear)
    input_is_split = False  # whether ranks hold slices of the input features (row-parallel)
    output_is_split = False  # whether ranks hold slices of the output features (column-parallel)
    weight_is_read = False  # whether the model reads the weight itself: it then stays dense, dequantized at load

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False) -> None:
        super().__init__()
        self.tp = current_tp_group()
        self.ops = current_backend()
        self.input_size = input_size
        self.output_size = output_size
        # In a quantized build the dense weight is a placeholder until `quantize_as` (no memory meanwhile).
        self.weight = nn.Parameter(
            torch.empty(output_size, input_size, device="meta" if quantized_build() else None), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader
        self.quant_method: QuantMethod | None = None
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.packed_weight: torch.Tensor | None = None

    def quantize_as(self, method: QuantMethod | None) -> None:
        """Give the layer of a quantized build its parameters: ``method``'s, or a dense weight (None: unquantized).

        A loader the model put on the placeholder (DeepSeek reorders rotary rows) goes to a dense weight; a
        checkpoint's quantized weight cannot take it (its scales would need the same reordering).
        """
        model_loader = self.weight.weight_loader
        del self.weight  # the placeholder
        if method is None:
            self.weight = nn.Parameter(torch.empty(self.output_size, self.input_size), requires_grad=False)
            self.weight.weight_loader = self.weight_loader
        else:
            method.create_weights(self)
        if model_loader != self.weight_loader:
            if method is not None and not getattr(method.scheme, "online", False):
                raise ModelLoadError("the model reorders this layer's rows at load, which its quantized format cannot")
            self.weight.weight_loader = model_loader
        self.quant_method = method

    def process_weights_after_loading(self) -> None:
        """Reorder a CPU bfloat16 weight once into oneDNN's blocked layout (see `pack_cpu_weight`).

        The packed copy replaces the dense one, which is freed: the layer
        then only computes, its weight can no longer be loaded or read. A
        layer that computes on quantized weights is left as it is.
        """
        if self.packed_weight is None and self.quant_method is None:
            self.packed_weight = pack_cpu_weight(self.weight)
            if self.packed_weight is not None:
                self.weight.data = torch.empty(0, dtype=self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.bias)

    def forward_normed(
        self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer of ``norm(x + residual)``, and ``x + residual`` (the next residual; ``x`` without one).

        A pre-norm block's entry in one call, so that the backend may fold the
        add and the norm into the matmul (the one-row GEMV does). Only for a
        layer whose input is whole on every rank (column-parallel).
        """
        if self.packed_weight is None and self.quant_method is None:
            return self.ops.rms_norm_linear(
                x, residual, norm.weight, norm.eps, self.weight, self.bias, silu_and_mul=self.silu_and_mul
            )
        if residual is None:
            return self._linear(norm(x), self.bias), x
        normed, residual = norm(x, residual)
        return self._linear(normed, self.bias), residual

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quant_method is not None:
            y = self.quant_method.apply(self, x, bias)
        elif self.packed_weight is None:
            return self.ops.linear(x, self.weight, bias, silu_and_mul=self.silu_and_mul)
        else:
            y = cpu_linear(x, self.packed_weight, bias)
        return self.ops.silu_and_mul(y) if self.silu_and_mul else y


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks: each rank returns its slice of ``y``."""

    output_is_split = True

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False) -> None:
        super().__init__(input_size, current_tp_group().divide(output_size, "output features"), bias=bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        _copy_shard(param.data, loaded, dim=0, index=self.tp.rank, parts=self.tp.size)


class RowParallelLinear(LinearBase):
    """Input features split across ranks: each rank takes its slice of ``x``; the partial products are summed.

    With ``reduce_results=False`` the layer returns this rank's partial sum, for a caller that adds other
    partial sums first and all-reduces once (a shared expert beside routed ones).
    """

    input_is_split = True

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False, reduce_results: bool = True) -> None:
        super().__init__(current_tp_group().divide(input_size, "input features"), output_size, bias=bias)
        self.reduce_results = reduce_results

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param.ndim == 1:  # the bias is whole on every rank
            _copy_shard(param.data, loaded, dim=0, index=0, parts=1)
        else:
            _copy_shard(param.data, loaded, dim=1, index=self.tp.rank, parts=self.tp.size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias joins once, on rank 0, or the all-reduce would add it size times.
        bias = self.bias if self.tp.rank == 0 else None
        y = self._linear(x, bias)
        return self.tp.all_reduce(y) if self.reduce_results else y


class ReplicatedLinear(LinearBase):
    """The whole matrix on every rank, for a small layer whose whole output every rank needs.

    A mixture-of-experts router is one: every rank must pick the same experts for a token.
    """

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        _copy_shard(param.data, loaded, dim=0, index=0, parts=1)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input stacked in one matrix (gate and up).

    Each rank's rows are ``[its slice of projection 0 | its slice of projection 1 | ...]``,
    so an activation that splits the output in equal parts works on every rank. With
    ``silu_and_mul`` (two equal projections, gate and up: Llama's MLP) the layer returns
    ``silu(gate) * up``, which the backend may compute in the matmul's epilogue.
    """

    def __init__(
        self, input_size: int, output_sizes: list[int], *, bias: bool = False, silu_and_mul: bool = False
    ) -> None:
        if silu_and_mul and (len(output_sizes) != 2 or output_sizes[0] != output_sizes[1]):
            raise ValueError(f"silu_and_mul needs two projections of one size (gate and up), got {output_sizes}")
        self.output_sizes = [current_tp_group().divide(size, "output features") for size in output_sizes]
        super().__init__(input_size, sum(output_sizes), bias=bias)
        self.silu_and_mul = silu_and_mul

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        index = int(shard_id)
        rows = _rows(param, sum(self.output_sizes[:index]), self.output_sizes[index])
        _copy_shard(rows, loaded, dim=0, index=self.tp.rank, parts=self.tp.size)


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matrix, rows ``[q | k | v]`` of this rank's heads.

    Query heads split evenly across ranks. Key/value heads split too while
    there are at least as many as ranks; with fewer, each is replicated on
    ``size / total_num_kv_heads`` consecutive ranks, the ones whose query heads
    attend to it. ``num_heads`` and ``num_kv_heads`` are this rank's counts.
    """

    def __init__(
        self, hidden_size: int, head_dim: int, total_num_heads: int, total_num_kv_heads: int, *, bias: bool = False
    ) -> None:
        tp = current_tp_group()
        self.head_dim = head_dim
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = tp.divide(total_num_heads, "attention heads")
        if total_num_kv_heads >= tp.size:
            self.num_kv_heads = tp.divide(total_num_kv_heads, "key/value heads")
        elif tp.size % total_num_kv_heads:
            raise ValueError(
                f"tensor_parallel_size {tp.size} is not a multiple of the model's {total_num_kv_heads} key/value heads "
                "(needed to replicate them across ranks)"
            )
        else:
            self.num_kv_heads = 1
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        # Not ColumnParallelLinear's even split: replicated K/V heads make this rank's share larger.
        LinearBase.__init__(self, hidden_size, self.q_size + 2 * self.kv_size, bias=bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        offset, size = {
            "q": (0, self.q_size),
            "k": (self.q_size, self.kv_size),
            "v": (self.q_size + self.kv_size, self.kv_size),
        }[shard_id]
        rows = _rows(param, offset, size)
        if shard_id == "q":
            _copy_shard(rows, loaded, dim=0, index=self.tp.rank, parts=self.tp.size)
        else:
            kv_parts = self.total_num_kv_heads // self.num_kv_heads  # distinct K/V blocks across the group
            _copy_shard(rows, loaded, dim=0, index=self.tp.rank * kv_parts // self.tp.size, parts=kv_parts)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


def pack_cpu_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` reordered for oneDNN's matmul, or ``None`` where that does not pay.

    On CPU, ``F.linear`` re-reads a plain ``[out, in]`` weight on every call;
    oneDNN's blocked layout, prepared once (as inductor's weight freezing and
    vLLM's CPU backend do), makes decode matmuls faster (docs/kernels.md): in
    bfloat16 where the CPU computes it natively, and in float32 everywhere
    (on an AVX2 box 1.45x at batch 32, and it streams the weights at 1.9x the
    bandwidth at batch 1). oneDNN sums in another order than ``F.linear``
    (about 1e-6 relative in float32); greedy tokens stay those of
    transformers in every float32 exactness test.
    """
    if (
        weight.device.type != "cpu"
        or weight.dtype not in (torch.bfloat16, torch.float32)
        or not torch.backends.mkldnn.is_available()
        or (weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported())
    ):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def cpu_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` with a weight from `pack_cpu_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


def _rows(param: nn.Parameter, offset: int, size: int) -> torch.Tensor:
    """Rows ``[offset, offset + size)`` of a weight, in ``param``'s rows: a block scale has one per ``output_block``."""
    block = getattr(param, "output_block", 1)
    return param.data.narrow(0, offset // block, size // block)


def _copy_shard(dst: torch.Tensor, src: torch.Tensor, *, dim: int, index: int, parts: int) -> None:
    """Copy block ``index`` of ``src`` cut into ``parts`` equal blocks along ``dim`` into ``dst``."""
    full = list(dst.shape)
    full[dim] *= parts
    if list(src.shape) != full:
        raise ValueError(f"checkpoint tensor of shape {tuple(src.shape)} does not fit parameter {tuple(full)}")
    dst.copy_(src.narrow(dim, index * dst.shape[dim], dst.shape[dim]))
