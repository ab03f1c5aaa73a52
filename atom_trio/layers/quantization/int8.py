"""INT8 W8A8 linear layers (compressed-tensors' int-quantized): per-channel weights, per-token activations."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from atom_trio.ops.quant_ref import dequantize_int8

from .base import QuantMethod, add_param, clear_checkpoint_params, converted

if TYPE_CHECKING:
    from atom_trio.layers.linear import LinearBase


class Int8LinearMethod(QuantMethod):
    """``W = weight * weight_scale``: an int8 ``[out, in]`` weight and a float32 scale per output channel."""

    def create_weights(self, layer: LinearBase) -> None:
        add_param(layer, "weight", (layer.output_size, layer.input_size), torch.int8, layer.weight_loader)
        # One value per row, kept 1-D while loading so that rows shard like a bias.
        add_param(layer, "weight_scale", (layer.output_size,), torch.float32, converted(layer, lambda t: t.reshape(-1)))

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        weight, scale = layer.weight.data, layer.weight_scale.data.unsqueeze(1)
        if not self.computes_quantized(layer):
            self.dequantized(layer, dequantize_int8(weight, scale))
            return
        clear_checkpoint_params(layer)
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        layer.register_buffer("weight_scale", scale.contiguous())

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return layer.ops.int8_linear(x, layer.weight, layer.weight_scale, bias)
