"""FP8 W8A8 linear layers: transformers' fine-grained FP8, compressed-tensors' FP8, and FP8 quantized at load."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from atom_trio.errors import ModelLoadError
from atom_trio.ops.quant_ref import FP8_DTYPE, FP8_MAX, MIN_AMAX, dequantize_fp8

from .base import (
    QuantMethod,
    add_param,
    checkpoint_rows,
    clear_checkpoint_params,
    converted,
    per_shard_scalar,
    rows_of_shards,
    shard_sizes,
)

if TYPE_CHECKING:
    from atom_trio.layers.linear import LinearBase


class Fp8LinearMethod(QuantMethod):
    """``W = weight.float() * scale`` with an FP8 ``weight`` and a per-tensor, per-channel or block scale.

    Per-tensor scales of packed shards (q, k, v each have one) become one
    per-channel scale, which represents them exactly. A block scale whose
    blocks a packed shard boundary cuts (Llama's q rows end mid-block when
    q is not a multiple of the block) becomes a ``(1, bi)`` scale, one per row
    and input block, equally exact. A tensor-parallel split of the input that
    cuts a block is refused.
    """

    def create_weights(self, layer: LinearBase) -> None:
        scheme = self.scheme
        out, inp = layer.output_size, layer.input_size
        if scheme.online:  # an unquantized checkpoint: the dense weight loads as usual, quantized afterwards
            layer.weight = torch.nn.Parameter(torch.empty(out, inp), requires_grad=False)
            layer.weight.weight_loader = layer.weight_loader
            return
        add_param(layer, "weight", (out, inp), FP8_DTYPE, layer.weight_loader)
        self.block_size = scheme.block_size
        if scheme.strategy == "block":
            bo, bi = scheme.block_size
            if layer.input_is_split and layer.tp.size > 1 and inp % bi:
                raise ModelLoadError(
                    f"tensor_parallel_size {layer.tp.size} splits the {inp * layer.tp.size} input features of a "
                    f"layer into {inp}, which cuts its FP8 blocks of {bi} columns"
                )
            if all(size % bo == 0 for size in shard_sizes(layer)):
                rows, load = out // bo, converted(layer, lambda t: t)
            else:
                self.block_size = (1, bi)
                rows, load = out, self._row_scale_loader(layer, bo)
            add_param(layer, scheme.scale_name, (rows, -(-inp // bi)), torch.float32, load, output_block=out // rows)
        elif scheme.strategy == "channel":
            add_param(layer, scheme.scale_name, (out,), torch.float32, converted(layer, lambda t: t.reshape(-1)))
        else:
            per_shard_scalar(layer, scheme.scale_name)
        if scheme.static_input:
            per_shard_scalar(layer, "input_scale")

    @staticmethod
    def _row_scale_loader(layer: LinearBase, block_rows: int):
        def load(param, loaded: torch.Tensor, shard_id: object = None) -> None:
            rows = checkpoint_rows(layer, shard_id)
            layer.weight_loader(param, loaded.repeat_interleave(block_rows, 0)[:rows], shard_id)

        return load

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        scheme = self.scheme
        if scheme.online:
            weight, scale = quantize_fp8_per_channel(layer.weight.data)
            self.block_size = None
        else:
            weight = layer.weight.data
            scale = getattr(layer, scheme.scale_name).data
            if scheme.strategy == "channel":
                scale = scale.unsqueeze(1)
            elif scheme.strategy == "tensor":
                scale = rows_of_shards(layer, scale)
        if not self.computes_quantized(layer):
            self.dequantized(layer, dequantize_fp8(weight, scale, self.block_size))
            return
        # One static scale for the packed shards' common input: the largest, so that no shard's input clips.
        input_scale = layer.input_scale.data.max().reshape(1) if scheme.static_input else None
        clear_checkpoint_params(layer)
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        layer.register_buffer("weight_scale", scale.contiguous())
        layer.register_buffer("input_scale", input_scale)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return layer.ops.fp8_linear(
            x, layer.weight, layer.weight_scale, bias, block_size=self.block_size, input_scale=layer.input_scale
        )


def quantize_fp8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` ``[out, in]`` as FP8 with a float32 ``[out, 1]`` scale per output channel: ``amax / 448``."""
    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=MIN_AMAX) / FP8_MAX
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale
