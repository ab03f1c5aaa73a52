"""4-bit weight-only linear layers (W4A16): GPTQ, AWQ and compressed-tensors' pack-quantized checkpoints.

Each layout is repacked at load into the kernels' one layout
(`atom_trio.ops.quant_ref`): ``qweight`` uint8 ``[out, in // 2]``, input
column ``2j`` in the low nibble; ``scales`` and uint8 ``zeros`` ``[out, in // group]``.

- GPTQ: ``qweight`` int32 ``[in // 8, out]``, value ``i`` of a word in bits ``4i``;
  ``qzeros`` int32 ``[groups, out // 8]``; ``scales`` ``[groups, out]``; ``g_idx`` the
  group of each input column. v1 checkpoints store zero - 1.
- AWQ (GEMM): ``qweight`` int32 ``[in, out // 8]`` and ``qzeros`` ``[groups, out // 8]``,
  packed along the output, bits ``4i`` holding column ``[0, 2, 4, 6, 1, 3, 5, 7][i]``.
- compressed-tensors: ``weight_packed`` int32 ``[out, in // 8]`` (bits ``4i`` hold value
  ``i``, stored plus 8), ``weight_scale`` ``[out, groups]``, ``weight_zero_point`` int32
  ``[out // 8, groups]`` packed along the output (plus 8), ``weight_shape``.

With GPTQ's act-order (``desc_act``), the input columns are sorted by group at
load, so that each group's columns are adjacent as the kernel wants, and the
activations are permuted the same way before each matmul (as vLLM's exllama path does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from atom_trio.errors import ModelLoadError
from atom_trio.ops.quant_ref import dequantize_w4a16, pack_int4, unpack_int4

from .base import QuantMethod, add_param, clear_checkpoint_params, converted

if TYPE_CHECKING:
    from atom_trio.layers.linear import LinearBase

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AutoAWQ's GEMM packing: bits ``4i`` of a word hold column ``AWQ_ORDER[i]`` of its eight."""


def unpack_int32(packed: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """The eight 4-bit values of each int32 of ``packed`` along ``dim`` (uint8), bits ``4i`` holding value ``order[i]``."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF  # [..., 8]: bits 4i
    values = torch.empty_like(nibbles)
    values[..., list(order)] = nibbles
    return values.movedim(-1, dim + 1).flatten(dim, dim + 1).to(torch.uint8)


def pack_int32(values: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """`unpack_int32`'s inverse: values 0..15 packed eight to an int32 along ``dim``."""
    values = values.to(torch.int32).movedim(dim, -1)
    grouped = values.reshape(*values.shape[:-1], -1, 8)[..., list(order)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=values.device)
    packed = (grouped << shifts).sum(-1, dtype=torch.int64)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the word's bits, as int32
    return packed.movedim(-1, dim).contiguous()


class Int4LinearMethod(QuantMethod):
    """``W = (q - zero) * scale`` per group of input columns, from any of the three checkpoint layouts."""

    def create_weights(self, layer: LinearBase) -> None:
        scheme = self.scheme
        out, inp = layer.output_size, layer.input_size
        full_input = inp * layer.tp.size if layer.input_is_split else inp
        self.group_size = scheme.group_size or full_input
        if full_input % self.group_size:
            raise ModelLoadError(f"group_size {self.group_size} does not divide a layer's {full_input} input features")
        if layer.input_is_split and layer.tp.size > 1:
            if scheme.group_size and inp % self.group_size:
                raise ModelLoadError(
                    f"tensor_parallel_size {layer.tp.size} splits a layer's {full_input} input features into {inp}, "
                    f"which cuts its 4-bit groups of {self.group_size}"
                )
            if scheme.desc_act:
                raise ModelLoadError(
                    f"GPTQ desc_act (act-order) with tensor_parallel_size {layer.tp.size} is not supported: a rank's "
                    "share of a row-parallel layer's input columns does not hold whole groups"
                )
        # A whole-input group (GPTQ's -1) keeps one scale per row: 1-D while loading, so that it shards like a bias.
        per_row = scheme.group_size is None
        groups = 1 if per_row else inp // self.group_size
        group_shape = (out,) if per_row else (out, groups)
        order = AWQ_ORDER if scheme.layout == "awq" else tuple(range(8))

        def groups_of(t: torch.Tensor) -> torch.Tensor:  # [groups, out] checkpoint layout -> ours
            return t.reshape(-1) if per_row else t.T

        if scheme.layout == "pack-quantized":
            def rows_of(t: torch.Tensor) -> torch.Tensor:  # already [out, groups]
                return t.reshape(-1) if per_row else t

            add_param(
                layer, "weight_packed", (out, inp // 2), torch.uint8, converted(layer, lambda t: pack_int4(unpack_int32(t, 1)))
            )
            scale_name, zero_name = "weight_scale", "weight_zero_point"
            add_param(layer, scale_name, group_shape, self.dtype, converted(layer, rows_of))
            if not scheme.symmetric:
                add_param(layer, zero_name, group_shape, torch.uint8, converted(layer, lambda t: rows_of(unpack_int32(t, 0))))
            add_param(layer, "weight_shape", (2,), torch.int64, _keep_shape)
        else:
            gptq = scheme.layout == "gptq"
            # GPTQ packs along the input ([in // 8, out]), AWQ along the output ([in, out // 8]).
            add_param(
                layer,
                "qweight",
                (out, inp // 2),
                torch.uint8,
                converted(layer, lambda t: pack_int4(unpack_int32(t, 0 if gptq else 1, order).T)),
            )
            scale_name, zero_name = "scales", "qzeros"
            add_param(layer, scale_name, group_shape, self.dtype, converted(layer, groups_of))
            add_param(
                layer,
                zero_name,
                group_shape,
                torch.uint8,
                converted(layer, lambda t: groups_of(unpack_int32(t, 1, order) + scheme.zero_offset)),
            )
            if gptq:
                self._g_idx_shards: set[object] = set()
                add_param(layer, "g_idx", (inp,), torch.int32, self._g_idx_loader(layer))
        self.names = (scale_name, zero_name)

    def _g_idx_loader(self, layer: LinearBase):
        """g_idx is one per input column: a row-parallel rank takes its columns; packed shards must agree."""

        def load(param, loaded: torch.Tensor, shard_id: object = None) -> None:
            inp = param.shape[0]
            mine = loaded.narrow(0, layer.tp.rank * inp, inp) if layer.input_is_split else loaded
            if mine.shape != param.shape:
                raise ValueError(f"g_idx of shape {tuple(loaded.shape)} does not fit {layer.input_size} input features")
            if self._g_idx_shards and not torch.equal(param.data, mine.to(param.dtype)):
                raise ValueError("the packed shards of one layer have different g_idx (act-order): not supported")
            self._g_idx_shards.add(shard_id)
            param.data.copy_(mine)

        return load

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        scheme = self.scheme
        scale_name, zero_name = self.names
        qweight = (layer.weight_packed if scheme.layout == "pack-quantized" else layer.qweight).data
        scales = getattr(layer, scale_name).data
        zeros = None if scheme.symmetric else getattr(layer, zero_name).data
        if scheme.group_size is None:
            scales = scales.unsqueeze(1)
            zeros = None if zeros is None else zeros.unsqueeze(1)
        group_size = layer.input_size // scales.shape[1]
        perm = None
        if scheme.desc_act:
            g_idx = layer.g_idx.data.long()
            perm = torch.argsort(g_idx, stable=True)
            expected = torch.arange(len(g_idx), device=g_idx.device) // group_size
            if not torch.equal(g_idx[perm], expected):
                raise ModelLoadError(f"g_idx does not give every group {group_size} columns")
            qweight = pack_int4(unpack_int4(qweight)[:, perm])
        if not self.computes_quantized(layer):
            weight = dequantize_w4a16(qweight, scales, zeros, group_size)
            if perm is not None:
                weight = weight[:, torch.argsort(perm)]  # back to the checkpoint's column order
            self.dequantized(layer, weight)
            return
        clear_checkpoint_params(layer)
        self.group_size = group_size
        layer.register_buffer("qweight", qweight.contiguous())
        layer.register_buffer("scales", scales.contiguous())
        layer.register_buffer("zeros", None if zeros is None else zeros.contiguous())
        layer.register_buffer("input_perm", perm)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.input_perm is not None:
            x = x[..., layer.input_perm]
        return layer.ops.w4a16_linear(x, layer.qweight, layer.scales, layer.zeros, bias, group_size=self.group_size)


def _keep_shape(param, loaded: torch.Tensor, shard_id: object = None) -> None:
    """compressed-tensors' ``weight_shape``: the dense shape a packed weight came from (its packing says it too)."""
    param.data.copy_(loaded.reshape(2))
