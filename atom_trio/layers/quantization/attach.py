"""Give each linear layer of a model built under `use_quant_config` its parameters: quantized or dense."""

from __future__ import annotations

from torch import nn

from atom_trio.errors import ModelLoadError
from atom_trio.loader.quant_config import (
    Fp8Scheme,
    Int4Scheme,
    Int8Scheme,
    QuantConfig,
    not_converted,
)

from .base import QuantMethod
from .experts import ExpertsQuantMethod, Fp8ExpertsMethod, Int4ExpertsMethod, Mxfp4ExpertsMethod
from .fp8 import Fp8LinearMethod
from .int4 import Int4LinearMethod
from .int8 import Int8LinearMethod

_METHODS: dict[type, type[QuantMethod]] = {
    Fp8Scheme: Fp8LinearMethod,
    Int8Scheme: Int8LinearMethod,
    Int4Scheme: Int4LinearMethod,
}


def quantize_linear_layers(model: nn.Module, quant_config: QuantConfig | None) -> None:
    """Create every linear layer's parameters for ``quant_config``'s scheme, chosen by its checkpoint name.

    A packed layer (q/k/v, gate/up) is looked up under each of its shards'
    checkpoint names (``model.packed_modules`` maps them), and its shards must
    share one scheme; a mixture-of-experts router stays unquantized. Raises
    `ModelLoadError` before any weight is read when a
    layer cannot take its scheme (a group or block that does not divide it,
    a tensor-parallel split that cuts one).
    """
    if quant_config is None:
        return
    from atom_trio.layers.linear import LinearBase  # linear imports this package
    from atom_trio.layers.moe import FusedMoE

    shards_of: dict[str, list[str]] = {}
    for checkpoint_name, (packed_name, _) in getattr(model, "packed_modules", {}).items():
        shards_of.setdefault(packed_name, []).append(checkpoint_name)
    # A linear layer beside the experts is their router: it stays unquantized (as vLLM builds routers).
    moe_blocks = {name.rpartition(".")[0] for name, layer in model.named_modules() if isinstance(layer, FusedMoE)}
    for name, layer in model.named_modules():
        if isinstance(layer, FusedMoE):
            try:
                layer.quantize_as(_experts_method(quant_config, name))
            except ModelLoadError as exc:
                raise ModelLoadError(f"{name}: {exc}") from exc
        if not isinstance(layer, LinearBase):
            continue
        parent, _, leaf = name.rpartition(".")
        names = [f"{parent}.{shard}" if parent else shard for shard in shards_of.get(leaf, [leaf])]
        schemes = {quant_config.scheme_for(checkpoint_name) for checkpoint_name in names}
        if len(schemes) > 1:
            raise ModelLoadError(
                f"{', '.join(names)} are one matrix here ({name}) but the quantization_config gives them "
                "different schemes"
            )
        scheme = None if parent in moe_blocks else schemes.pop()
        try:
            layer.quantize_as(None if scheme is None else _METHODS[type(scheme)](scheme))
        except ModelLoadError as exc:
            raise ModelLoadError(f"{name}: {exc}") from exc


def finish_quantized_layers(model: nn.Module) -> None:
    """After loading: each quantized layer's weights into its kernels' layout, or dequantized for the plain path."""
    for layer in model.modules():
        if getattr(layer, "quant_method", None) is not None:
            layer.quant_method.process_weights_after_loading(layer)


def _experts_method(quant_config: QuantConfig, experts: str) -> ExpertsQuantMethod | None:
    """How the checkpoint holds the experts under ``experts``: quantized, or None (an online FP8 pass leaves them).

    Their scheme is the one their projections' checkpoint names get (``experts.0.gate_proj`` ...), which must
    be one scheme for all three.
    """
    projections = [f"{experts}.0.{projection}" for projection in ("gate_proj", "up_proj", "down_proj")]
    if quant_config.method == "mxfp4":  # only experts are MXFP4: those not listed as left unconverted
        converted = not any(not_converted(pattern, projections[0]) for pattern in quant_config.not_converted)
        return Mxfp4ExpertsMethod() if converted else None
    schemes = {quant_config.scheme_for(name) for name in projections}
    if len(schemes) > 1:
        raise ModelLoadError("the quantization_config gives the experts' gate, up and down projections different schemes")
    scheme = schemes.pop()
    if scheme is None or getattr(scheme, "online", False):
        return None
    if type(scheme) not in _EXPERT_METHODS:
        raise ModelLoadError(f"{scheme.kind} experts are not supported (FP8, 4-bit and MXFP4 experts are)")
    return _EXPERT_METHODS[type(scheme)](scheme)


_EXPERT_METHODS: dict[type, type[ExpertsQuantMethod]] = {Fp8Scheme: Fp8ExpertsMethod, Int4Scheme: Int4ExpertsMethod}
