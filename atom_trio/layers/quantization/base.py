"""The `QuantMethod` interface, and what every method needs to know about the layer it quantizes."""

from __future__ import annotations

import abc
import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from atom_trio.layers.linear import LinearBase
    from atom_trio.loader.quant_config import LinearScheme, QuantConfig

_building: contextvars.ContextVar[QuantConfig | None] = contextvars.ContextVar("quant_config", default=None)


@contextlib.contextmanager
def use_quant_config(quant_config: QuantConfig | None) -> Iterator[None]:
    """Build a model whose linear layers `quantize_linear_layers` will give their parameters.

    While a quantized model is built, each linear layer's dense weight is a
    placeholder on the meta device: a quantized checkpoint never needs the
    full-precision matrices in memory.
    """
    token = _building.set(quant_config)
    try:
        yield
    finally:
        _building.reset(token)


def quantized_build() -> bool:
    """Whether the layers built now get their parameters from `quantize_linear_layers`."""
    return _building.get() is not None


class QuantMethod(abc.ABC):
    """How one linear layer stores and computes with quantized weights (one instance per layer).

    `create_weights` registers the parameters in the checkpoint's names, each
    with a ``weight_loader`` that turns a checkpoint tensor into the kernel's
    layout and hands it to the layer's own loader, which takes this rank's
    block (so tensor-parallel sharding, packed q/k/v and gate/up rows work for
    every format alike). `process_weights_after_loading` finishes the kernel
    layout, or, where the backend has no kernel for the scheme
    (`KernelBackend.quantized_weights`), dequantizes once to the compute
    dtype and leaves the layer a plain one. `apply` is the layer's matmul.
    """

    def __init__(self, scheme: LinearScheme) -> None:
        self.scheme = scheme
        self.dtype = torch.get_default_dtype()  # the compute dtype: methods are made while the model is built

    @abc.abstractmethod
    def create_weights(self, layer: LinearBase) -> None: ...

    @abc.abstractmethod
    def process_weights_after_loading(self, layer: LinearBase) -> None: ...

    @abc.abstractmethod
    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...

    def computes_quantized(self, layer: LinearBase) -> bool:
        """Whether the layer's backend computes on this scheme's weights as they are (else: dequantize at load)."""
        return self.scheme.kind in layer.ops.quantized_weights and not layer.weight_is_read

    def dequantized(self, layer: LinearBase, weight: torch.Tensor) -> None:
        """Make ``layer`` a plain linear layer with ``weight`` (its dense ``[out, in]``) in the compute dtype."""
        clear_checkpoint_params(layer)
        layer.weight = nn.Parameter(weight.to(self.dtype), requires_grad=False)
        layer.quant_method = None


def clear_checkpoint_params(layer: LinearBase) -> None:
    """Drop the layer's parameters in the checkpoint's layout (all but the bias) once they are converted."""
    for name in [name for name in layer._parameters if name != "bias"]:
        delattr(layer, name)


def add_param(
    layer: LinearBase,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    loader: Callable[[nn.Parameter, torch.Tensor, Any], None],
    **attributes: Any,
) -> nn.Parameter:
    """Register ``layer.<name>`` (zeros of ``shape``) with ``loader`` as its ``weight_loader``."""
    param = nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
    param.weight_loader = loader
    for key, value in attributes.items():
        setattr(param, key, value)
    layer.register_parameter(name, param)
    return param


def converted(layer: LinearBase, convert: Callable[[torch.Tensor], torch.Tensor]):
    """A ``weight_loader``: ``convert`` the checkpoint tensor to the kernel layout, then the layer's own loader."""

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        layer.weight_loader(param, convert(loaded), shard_id)

    return load


def shard_sizes(layer: LinearBase) -> list[int]:
    """This rank's output rows of each packed shard (q, k, v; gate, up), or of the one matrix."""
    if hasattr(layer, "q_size"):
        return [layer.q_size, layer.kv_size, layer.kv_size]
    return list(getattr(layer, "output_sizes", [layer.output_size]))


def shard_index(shard_id: object) -> int:
    """The position of a packed shard in `shard_sizes`."""
    if shard_id is None:
        return 0
    return "qkv".index(shard_id) if isinstance(shard_id, str) else int(shard_id)


def checkpoint_rows(layer: LinearBase, shard_id: object) -> int:
    """The output rows of the checkpoint tensor that fills shard ``shard_id`` (before this rank takes its block)."""
    if shard_id in ("q", "k", "v"):
        heads = layer.total_num_heads if shard_id == "q" else layer.total_num_kv_heads
        return heads * layer.head_dim
    rows = shard_sizes(layer)[shard_index(shard_id)]
    return rows * layer.tp.size if layer.output_is_split else rows


def per_shard_scalar(layer: LinearBase, name: str) -> nn.Parameter:
    """``layer.<name>``: one float32 value per packed shard (a per-tensor scale of q, k and v ...)."""

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if loaded.numel() != 1:
            raise ValueError(f"a per-tensor scale has one value, got shape {tuple(loaded.shape)}")
        param.data[shard_index(shard_id)] = loaded.reshape(())

    return add_param(layer, name, (len(shard_sizes(layer)),), torch.float32, load)


def rows_of_shards(layer: LinearBase, values: torch.Tensor) -> torch.Tensor:
    """One value per packed shard, repeated over the shard's output rows: ``[out, 1]``."""
    sizes = torch.tensor(shard_sizes(layer), device=values.device)
    return values.repeat_interleave(sizes).unsqueeze(1)
