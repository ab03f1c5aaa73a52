"""Quantized experts: a `FusedMoE`'s stacked weights from FP8, 4-bit or MXFP4 checkpoint tensors.

Each method registers the checkpoint's tensors under ``w13_<name>`` and
``w2_<name>`` (``model.layers.0.mlp.experts.3.gate_proj.weight_scale_inv``
fills expert 3's gate rows of ``experts.w13_weight_scale_inv``), converted
per expert into the layouts of `atom_trio.ops.quant_experts` as they load,
so `FusedMoE.weight_loader` slices them for tensor or expert parallelism as
it slices dense experts. After loading, `process_weights_after_loading`
keeps them quantized where the backend's `fused_experts` computes on the
layout (`KernelBackend.quantized_experts`), else dequantizes once to the
compute dtype (the CPU).

A rank's slice must hold whole scale blocks: the gate's rows end where the
up rows begin, and the down projection's input columns split between ranks.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import nn

from atom_trio.errors import ModelLoadError
from atom_trio.loader.quant_config import Fp8Scheme, Int4Scheme
from atom_trio.ops.quant_experts import MXFP4_GROUP, QuantizedExperts, dequantize_experts
from atom_trio.ops.quant_ref import FP8_DTYPE, pack_int4

from .int4 import AWQ_ORDER, unpack_int32

if TYPE_CHECKING:
    from atom_trio.layers.moe import FusedMoE

Convert = Callable[[torch.Tensor, str], torch.Tensor]
"""A checkpoint tensor of one expert's projection (``"w1"``, ``"w3"`` or ``"w2"``) into the stacked layout."""


class ExpertsQuantMethod(abc.ABC):
    """How one `FusedMoE` stores its quantized experts: `create_weights`, then `process_weights_after_loading`."""

    kind: str

    def __init__(self, scheme: Any = None) -> None:
        self.scheme = scheme
        self.dtype = torch.get_default_dtype()  # the compute dtype: methods are made while the model is built

    @abc.abstractmethod
    def create_weights(self, layer: FusedMoE) -> None: ...

    @abc.abstractmethod
    def kernel_layout(self, layer: FusedMoE) -> tuple[torch.Tensor, torch.Tensor, QuantizedExperts]:
        """``w13``, ``w2`` and their `QuantizedExperts`, from the loaded checkpoint parameters."""

    def process_weights_after_loading(self, layer: FusedMoE) -> None:
        w13, w2, quant = self.kernel_layout(layer)
        for name in [name for name in layer._parameters if name.startswith(("w13_", "w2_")) and "bias" not in name]:
            delattr(layer, name)
        kept = self.kind in layer.ops.quantized_experts
        for stacked, weight in (("w13", w13), ("w2", w2)):
            scale, zeros = getattr(quant, f"{stacked}_scale"), getattr(quant, f"{stacked}_zeros")
            if kept:  # the module's own buffers, so that moving the module moves what the kernel reads
                layer.register_buffer(f"{stacked}_scale", scale.contiguous())
                layer.register_buffer(f"{stacked}_zeros", None if zeros is None else zeros.contiguous())
            else:
                weight = dequantize_experts(weight, scale, zeros, quant).to(self.dtype)
            setattr(layer, f"{stacked}_weight", nn.Parameter(weight.contiguous(), requires_grad=False))
        layer.quant = None
        if kept:
            buffers = {name: getattr(layer, name) for name in ("w13_scale", "w2_scale", "w13_zeros", "w2_zeros")}
            layer.quant = attrs.evolve(quant, **buffers)
        layer.quant_method = None

    # -- helpers the methods share ---------------------------------------------------------------------------

    @staticmethod
    def add(
        layer: FusedMoE,
        name: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        convert: Convert,
        *,
        keep: bool = True,
        split_columns: bool = True,
    ) -> None:
        """Register ``layer.<name>`` ``[local experts, *shape]``, each expert's checkpoint tensor ``convert``-ed.

        ``keep=False``: a tensor the checkpoint has but the kernels do not need (a shape, a trivial ``g_idx``),
        only checked by ``convert``. ``split_columns=False``: a down projection's tensor that every rank holds
        whole (a scale per output row).
        """
        param = nn.Parameter(
            torch.zeros(layer.num_local_experts, *(shape if keep else (0,)), dtype=dtype), requires_grad=False
        )

        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int | str, str]) -> None:
            converted = convert(loaded, shard_id[1])
            if keep:
                layer.weight_loader(param, converted, shard_id)

        param.weight_loader = load
        param.split_columns = split_columns
        layer.register_parameter(name, param)

    @staticmethod
    def check_blocks(layer: FusedMoE, rows: int, cols: int, what: str) -> None:
        """Refuse a split of the experts that cuts a block of ``rows`` x ``cols`` (gate/up rows, down columns)."""
        inter, full = layer.intermediate_size, layer.intermediate_size_full
        if inter % rows or inter % cols:
            where = f"{full} expert intermediate features"
            if inter != full:
                where += f", {inter} a rank (tensor_parallel_size {layer.tp.size}),"
            raise ModelLoadError(f"{where} do not divide into the {what} of {rows} x {cols}")


def _as_is(t: torch.Tensor, _: str) -> torch.Tensor:
    return t


class Fp8ExpertsMethod(ExpertsQuantMethod):
    """FP8 experts: block scales (``weight_scale_inv``, DeepSeek-V3 and Qwen3-FP8), or per channel or per tensor
    (``weight_scale``, compressed-tensors; a per-tensor scale becomes one per row, which it equals)."""

    kind = "fp8"

    def create_weights(self, layer: FusedMoE) -> None:
        scheme: Fp8Scheme = self.scheme
        if scheme.static_input:
            raise ModelLoadError(
                "static FP8 activation scales (input_scale) on experts are not supported: experts compute weight-only"
            )
        hidden, inter = layer.hidden_size, layer.intermediate_size
        self.add(layer, "w13_weight", (2 * inter, hidden), FP8_DTYPE, _as_is)
        self.add(layer, "w2_weight", (hidden, inter), FP8_DTYPE, _as_is)
        name = self.scale_name = scheme.scale_name
        if scheme.strategy == "block":
            rows, cols = scheme.block_size
            self.check_blocks(layer, rows, cols, "FP8 blocks")
            self.add(layer, f"w13_{name}", (2 * inter // rows, -(-hidden // cols)), torch.float32, _as_is)
            self.add(layer, f"w2_{name}", (-(-hidden // rows), inter // cols), torch.float32, _as_is)
            return
        full_rows = {"w1": layer.intermediate_size_full, "w3": layer.intermediate_size_full, "w2": hidden}

        def per_row(t: torch.Tensor, shard: str) -> torch.Tensor:
            return t.reshape(-1, 1).expand(full_rows[shard], 1) if t.numel() == 1 else t.reshape(-1, 1)

        self.add(layer, f"w13_{name}", (2 * inter, 1), torch.float32, per_row)
        self.add(layer, f"w2_{name}", (hidden, 1), torch.float32, per_row, split_columns=False)

    def kernel_layout(self, layer: FusedMoE) -> tuple[torch.Tensor, torch.Tensor, QuantizedExperts]:
        name = self.scale_name
        quant = QuantizedExperts(
            kind="fp8",
            w13_scale=getattr(layer, f"w13_{name}").data,
            w2_scale=getattr(layer, f"w2_{name}").data,
            block_size=self.scheme.block_size if self.scheme.strategy == "block" else None,
        )
        return layer.w13_weight.data, layer.w2_weight.data, quant


class Int4ExpertsMethod(ExpertsQuantMethod):
    """4-bit experts (W4A16) from GPTQ, AWQ or compressed-tensors' pack-quantized tensors, repacked as the dense
    `Int4LinearMethod` repacks them."""

    kind = "w4a16"

    def create_weights(self, layer: FusedMoE) -> None:
        scheme: Int4Scheme = self.scheme
        if scheme.group_size is None:
            raise ModelLoadError("4-bit experts with one group per output channel (group_size -1) are not supported")
        if scheme.desc_act:
            raise ModelLoadError("GPTQ desc_act (act-order) on experts is not supported")
        group = scheme.group_size
        hidden, inter = layer.hidden_size, layer.intermediate_size
        if hidden % group:
            raise ModelLoadError(f"group_size {group} does not divide the experts' {hidden} hidden features")
        self.check_blocks(layer, 1, group, "4-bit groups")
        shapes = {"w13": (2 * inter, hidden), "w2": (hidden, inter)}
        order = AWQ_ORDER if scheme.layout == "awq" else tuple(range(8))
        if scheme.layout == "pack-quantized":
            names = ("weight_packed", "weight_scale", "weight_zero_point")

            def packed(t: torch.Tensor, _: str) -> torch.Tensor:  # int32 [out, in // 8]
                return pack_int4(unpack_int32(t, 1))

            def scales(t: torch.Tensor, _: str) -> torch.Tensor:  # [out, groups]
                return t

            def zeros(t: torch.Tensor, _: str) -> torch.Tensor:  # int32 [out // 8, groups], packed along the output
                return unpack_int32(t, 0)

        else:
            gptq = scheme.layout == "gptq"
            names = ("qweight", "scales", "qzeros")

            def packed(t: torch.Tensor, _: str) -> torch.Tensor:  # GPTQ [in // 8, out], AWQ [in, out // 8]
                return pack_int4(unpack_int32(t, 0 if gptq else 1, order).T)

            def scales(t: torch.Tensor, _: str) -> torch.Tensor:  # [groups, out]
                return t.T

            def zeros(t: torch.Tensor, _: str) -> torch.Tensor:  # [groups, out // 8]
                return (unpack_int32(t, 1, order) + scheme.zero_offset).T

        self.names = names
        for stacked, (rows, cols) in shapes.items():
            self.add(layer, f"{stacked}_{names[0]}", (rows, cols // 2), torch.uint8, packed)
            self.add(layer, f"{stacked}_{names[1]}", (rows, cols // group), self.dtype, scales)
            # GPTQ and AWQ store zero points even for symmetric weights; symmetric compressed-tensors has none.
            if scheme.layout != "pack-quantized" or not scheme.symmetric:
                self.add(layer, f"{stacked}_{names[2]}", (rows, cols // group), torch.uint8, zeros)
            if scheme.layout == "pack-quantized":
                self.add(layer, f"{stacked}_weight_shape", (2,), torch.int64, _shape_of(layer), keep=False)
            elif scheme.layout == "gptq":
                self.add(layer, f"{stacked}_g_idx", (cols,), torch.int32, _trivial_g_idx(group), keep=False)

    def kernel_layout(self, layer: FusedMoE) -> tuple[torch.Tensor, torch.Tensor, QuantizedExperts]:
        packed, scales, zeros = self.names
        symmetric = self.scheme.symmetric

        def of(stacked: str, name: str) -> torch.Tensor | None:
            return None if symmetric and name == zeros else getattr(layer, f"{stacked}_{name}").data

        quant = QuantizedExperts(
            kind="w4a16",
            w13_scale=of("w13", scales),
            w2_scale=of("w2", scales),
            w13_zeros=of("w13", zeros),
            w2_zeros=of("w2", zeros),
            group_size=self.scheme.group_size,
        )
        return of("w13", packed), of("w2", packed), quant


def _shape_of(layer: FusedMoE) -> Convert:
    """compressed-tensors' ``weight_shape``: checked against the dense shape its expert's projection must have."""
    full = {
        "w1": (layer.intermediate_size_full, layer.hidden_size),
        "w3": (layer.intermediate_size_full, layer.hidden_size),
        "w2": (layer.hidden_size, layer.intermediate_size_full),
    }

    def check(t: torch.Tensor, shard: str) -> torch.Tensor:
        if tuple(t.reshape(-1).tolist()) != full[shard]:
            raise ValueError(f"weight_shape {t.tolist()} is not the expert's {list(full[shard])}")
        return t.reshape(2)

    return check


def _trivial_g_idx(group: int) -> Convert:
    """GPTQ's ``g_idx`` without act-order: column ``c`` in group ``c // group_size``, checked."""

    def check(t: torch.Tensor, _: str) -> torch.Tensor:
        if not torch.equal(t.long(), torch.arange(t.numel(), device=t.device) // group):
            raise ValueError("g_idx orders the columns (act-order), which experts do not support")
        return t

    return check


class Mxfp4ExpertsMethod(ExpertsQuantMethod):
    """MXFP4 experts as GPT-OSS ships them: ``<proj>_blocks`` and ``<proj>_scales`` per stacked projection.

    The model hands them over in `FusedMoE`'s stacked layout (gate rows, then
    up rows; ``[E, N, K // 2]`` bytes, ``[E, N, K // 32]`` scales).
    """

    kind = "mxfp4"

    def create_weights(self, layer: FusedMoE) -> None:
        hidden, inter = layer.hidden_size, layer.intermediate_size
        if hidden % MXFP4_GROUP:
            raise ModelLoadError(f"MXFP4 experts need a hidden size divisible by {MXFP4_GROUP}, got {hidden}")
        self.check_blocks(layer, 1, MXFP4_GROUP, "MXFP4 groups")
        for stacked, (rows, cols) in {"w13": (2 * inter, hidden), "w2": (hidden, inter)}.items():
            self.add(layer, f"{stacked}_blocks", (rows, cols // 2), torch.uint8, _as_is)
            self.add(layer, f"{stacked}_scales", (rows, cols // MXFP4_GROUP), torch.uint8, _as_is)

    def kernel_layout(self, layer: FusedMoE) -> tuple[torch.Tensor, torch.Tensor, QuantizedExperts]:
        quant = QuantizedExperts(kind="mxfp4", w13_scale=layer.w13_scales.data, w2_scale=layer.w2_scales.data)
        return layer.w13_blocks.data, layer.w2_blocks.data, quant
