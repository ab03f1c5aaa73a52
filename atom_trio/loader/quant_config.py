"""Quantized checkpoints: config.json's ``quantization_config`` read into one typed, checked `QuantConfig`.

Each format's public spec decides what its fields mean:

- ``fp8``: transformers' fine-grained FP8 (DeepSeek-V3, Qwen3-FP8): float8_e4m3fn
  weights times ``weight_scale_inv``, per ``weight_block_size`` block or per tensor;
  ``activation_scheme`` dynamic (per token, per 1 x block group) or static (``input_scale``).
- ``compressed-tensors`` (what llm-compressor writes): ``config_groups`` of targets and
  quantization arguments, an ``ignore`` list; FP8 W8A8, INT8 W8A8 and 4-bit pack-quantized
  weight-only schemes are read.
- ``gptq``: 4-bit ``qweight`` packed eight to an int32 along the input, ``qzeros`` along the
  output, optional act-order (``desc_act`` with ``g_idx``); v1 checkpoints store zero - 1.
- ``awq``: AutoAWQ's GEMM layout, eight 4-bit values to an int32 along the output in the
  order 0, 2, 4, 6, 1, 3, 5, 7.
- ``mxfp4``: GPT-OSS's experts (e2m1 values, an e8m0 scale per 32); linear layers stay unquantized.

Everything is checked here, before a weight is read: a field whose value the
engine cannot run (a bit width, a strategy, a combination) is a
`ModelLoadError` naming the field and its value. Fields that only describe
how the checkpoint was made (a calibration dataset, a damping factor) are not read.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from typing import Any, Literal

import attrs

from atom_trio.errors import ModelLoadError

SCHEME_KINDS = ("fp8", "int8", "w4a16")
"""What a linear layer computes with: the names `KernelBackend.quantized_weights` holds."""


@attrs.frozen(kw_only=True)
class Fp8Scheme:
    """FP8 weights and FP8 activations (W8A8).

    ``strategy`` is how the weight scale is shared: one per tensor, per output
    channel, or per ``block_size`` (rows, columns) block. ``static_input``: a
    per-tensor ``input_scale`` comes with the checkpoint; else activations are
    quantized per token as they arrive. ``scale_name`` is the checkpoint's name
    for the weight scale (a multiplier in both formats). ``online``: the
    checkpoint is unquantized and the weights are quantized per channel at load.
    """

    strategy: Literal["tensor", "channel", "block"]
    block_size: tuple[int, int] | None = None
    static_input: bool = False
    scale_name: str = "weight_scale"
    online: bool = False
    kind = "fp8"


@attrs.frozen(kw_only=True)
class Int8Scheme:
    """INT8 weights with a per-channel scale, activations quantized per token as they arrive (W8A8)."""

    kind = "int8"


@attrs.frozen(kw_only=True)
class Int4Scheme:
    """4-bit weights, 16-bit activations (W4A16), in one of three checkpoint layouts.

    ``group_size`` input columns share a scale (and a zero point unless
    ``symmetric``); None means one group per output channel (GPTQ's -1).
    ``desc_act``: GPTQ's act-order, input columns assigned to groups by
    ``g_idx``. ``zero_offset`` is added to the stored zero points (GPTQ v1
    checkpoints store zero - 1).
    """

    layout: Literal["gptq", "awq", "pack-quantized"]
    group_size: int | None
    symmetric: bool
    desc_act: bool = False
    zero_offset: int = 0
    kind = "w4a16"


LinearScheme = Fp8Scheme | Int8Scheme | Int4Scheme


@attrs.frozen(kw_only=True)
class SchemeRule:
    """``scheme`` for the linear layers that ``targets`` name (compressed-tensors' matching), or for all of them."""

    scheme: LinearScheme
    targets: tuple[str, ...] = ("Linear",)

    def matches(self, name: str) -> bool:
        return any(_target_matches(target, name) for target in self.targets)


@attrs.frozen(kw_only=True)
class QuantConfig:
    """A checkpoint's quantization: the scheme of each linear layer, by its checkpoint name.

    ``rules`` are tried in order; ``ignore`` (compressed-tensors' exact names and
    ``re:`` patterns) and ``not_converted`` (transformers' ``modules_to_not_convert``:
    names, name parts or ``*`` patterns) keep a layer unquantized. Embeddings and
    the LM head are never quantized.
    """

    method: str
    rules: tuple[SchemeRule, ...] = ()
    ignore: tuple[str, ...] = ()
    not_converted: tuple[str, ...] = ()

    def scheme_for(self, name: str) -> LinearScheme | None:
        """The scheme of the linear layer the checkpoint calls ``name`` (``model.layers.0.self_attn.q_proj``)."""
        if any(_target_matches(pattern, name) for pattern in self.ignore):
            return None
        if any(not_converted(pattern, name) for pattern in self.not_converted):
            return None
        return next((rule.scheme for rule in self.rules if rule.matches(name)), None)


def detect_quantization(hf_config: Any, forced: str | None) -> QuantConfig | None:
    """The model's `QuantConfig` from ``hf_config.quantization_config``, or None for an unquantized model.

    ``forced`` is ``EngineConfig.quantization``: it must name the checkpoint's
    method, except ``fp8`` on an unquantized checkpoint, which quantizes it at load.
    """
    raw = getattr(hf_config, "quantization_config", None)
    if raw is not None and not isinstance(raw, Mapping):
        raw = raw.to_dict() if hasattr(raw, "to_dict") else raw
    if raw is None:
        if forced is None:
            return None
        if forced == "fp8":
            return QuantConfig(method="fp8", rules=(SchemeRule(scheme=Fp8Scheme(strategy="channel", online=True)),))
        raise ModelLoadError(
            f"quantization {forced!r} needs a checkpoint quantized as {forced} (config.json has no "
            "quantization_config); only 'fp8' quantizes an unquantized checkpoint at load"
        )
    if not isinstance(raw, Mapping):
        raise ModelLoadError(f"quantization_config must be an object; got {raw!r}")
    method = raw.get("quant_method")
    parsers = {
        "fp8": _parse_fp8,
        "compressed-tensors": _parse_compressed_tensors,
        "gptq": _parse_gptq,
        "awq": _parse_awq,
        "mxfp4": _parse_mxfp4,
    }
    if method not in parsers:
        raise ModelLoadError(
            f"quantization_config.quant_method {method!r} is not supported; supported: {', '.join(parsers)}"
        )
    if forced is not None and forced != method:
        raise ModelLoadError(f"quantization {forced!r} was asked for, but the checkpoint is quantized as {method!r}")
    return parsers[method](raw)


# -- the formats ---------------------------------------------------------------------------------------------


def _parse_fp8(raw: Mapping[str, Any]) -> QuantConfig:
    fmt = raw.get("fmt", "e4m3")
    if fmt != "e4m3":
        _unsupported("fmt", fmt, "only 'e4m3' (float8_e4m3fn)")
    activation = raw.get("activation_scheme", "dynamic")
    if activation not in ("dynamic", "static"):
        _unsupported("activation_scheme", activation, "'dynamic' or 'static'")
    block = raw.get("weight_block_size")
    if block is not None:
        block = _block_shape("weight_block_size", block)
        if activation == "static":
            raise ModelLoadError(
                "quantization_config: activation_scheme 'static' with weight_block_size is not supported "
                "(block-wise FP8 quantizes activations dynamically, per 1 x block group)"
            )
    scheme = Fp8Scheme(
        strategy="block" if block else "tensor",
        block_size=block,
        static_input=activation == "static",
        # transformers' and DeepSeek's block scales are "weight_scale_inv"; per-tensor FP8 checkpoints say "weight_scale".
        scale_name="weight_scale_inv" if block else "weight_scale",
    )
    not_converted = _names("modules_to_not_convert", raw.get("modules_to_not_convert"))
    not_converted += _names("ignored_layers", raw.get("ignored_layers"))
    return QuantConfig(method="fp8", rules=(SchemeRule(scheme=scheme),), not_converted=not_converted)


_CT_FORMATS = {"float-quantized": "fp8", "int-quantized": "int8", "pack-quantized": "w4a16"}


_FP8_KV_CACHE_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
"""The one ``kv_cache_scheme`` read: llm-compressor's FP8 KV cache, static per-tensor ``k_scale``/``v_scale``
(which ``--kv-cache-dtype fp8`` uses; `atom_trio.layers.take_kv_scales` takes them)."""


def _parse_compressed_tensors(raw: Mapping[str, Any]) -> QuantConfig:
    for field in ("sparsity_config", "transform_config"):
        if raw.get(field):
            _unsupported(field, raw[field], "none (sparse or transformed checkpoints are not read)")
    kv_scheme = raw.get("kv_cache_scheme")
    if kv_scheme and (
        not isinstance(kv_scheme, Mapping)
        or any(kv_scheme.get(key, wanted) != wanted for key, wanted in _FP8_KV_CACHE_SCHEME.items())
        or (kv_scheme.get("num_bits"), kv_scheme.get("type")) != (8, "float")
    ):
        _unsupported("kv_cache_scheme", kv_scheme, f"none or static per-tensor FP8, {_FP8_KV_CACHE_SCHEME}")
    status = raw.get("quantization_status", "compressed")
    if status != "compressed":
        _unsupported("quantization_status", status, "'compressed'")
    groups = raw.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        _unsupported("config_groups", groups, "a non-empty object of scheme groups")
    rules = []
    for group_name, group in groups.items():
        where = f"config_groups.{group_name}"
        if not isinstance(group, Mapping):
            _unsupported(where, group, "an object")
        fmt = group.get("format") or raw.get("format")
        targets = _names(f"{where}.targets", group.get("targets"))
        if not targets:
            _unsupported(f"{where}.targets", group.get("targets"), "a non-empty list of layer names or patterns")
        scheme = _compressed_scheme(where, group.get("weights"), group.get("input_activations"), fmt)
        if group.get("output_activations"):
            _unsupported(f"{where}.output_activations", group["output_activations"], "null")
        rules.append(SchemeRule(scheme=scheme, targets=targets))
    return QuantConfig(method="compressed-tensors", rules=tuple(rules), ignore=_names("ignore", raw.get("ignore")))


def _compressed_scheme(where: str, weights: Any, inputs: Any, fmt: Any) -> LinearScheme:
    if fmt not in _CT_FORMATS:
        _unsupported(f"{where}.format", fmt, ", ".join(repr(f) for f in _CT_FORMATS))
    if not isinstance(weights, Mapping):
        _unsupported(f"{where}.weights", weights, "an object of quantization arguments")
    w = _QuantArgs.read(f"{where}.weights", weights)
    a = None if inputs is None else _QuantArgs.read(f"{where}.input_activations", inputs)
    wanted = _CT_FORMATS[fmt]
    if wanted == "w4a16":
        _expect(w, "type", "int", where)
        _expect(w, "num_bits", 4, where)
        if a is not None:
            _unsupported(f"{where}.input_activations", inputs, "null (4-bit weights run with 16-bit activations)")
        if w.strategy not in ("group", "channel"):
            _unsupported(f"{where}.weights.strategy", w.strategy, "'group' or 'channel' for 4-bit weights")
        if w.actorder not in (None, "static", "weight"):
            _unsupported(f"{where}.weights.actorder", w.actorder, "null, 'static' or 'weight' (no g_idx)")
        group_size = _positive(f"{where}.weights.group_size", w.group_size) if w.strategy == "group" else None
        return Int4Scheme(layout="pack-quantized", group_size=group_size, symmetric=w.symmetric)
    if a is None:
        _unsupported(f"{where}.input_activations", None, f"activation quantization for {fmt} weights (W8A8)")
    for role, args in (("weights", w), ("input_activations", a)):
        if not args.symmetric:
            _unsupported(f"{where}.{role}.symmetric", False, "true (8-bit schemes are symmetric)")
    _expect(w, "num_bits", 8, where)
    _expect(a, "num_bits", 8, where, role="input_activations")
    if wanted == "int8":
        _expect(w, "type", "int", where)
        _expect(a, "type", "int", where, role="input_activations")
        if w.strategy != "channel":
            _unsupported(f"{where}.weights.strategy", w.strategy, "'channel' for INT8 weights")
        if not (a.dynamic is True and a.strategy == "token"):
            _unsupported(
                f"{where}.input_activations",
                f"strategy {a.strategy!r}, dynamic {a.dynamic!r}",
                "dynamic per-token INT8 activations",
            )
        return Int8Scheme()
    _expect(w, "type", "float", where)
    _expect(a, "type", "float", where, role="input_activations")
    block = None
    if w.strategy == "block":
        block = _block_shape(f"{where}.weights.block_structure", w.block_structure)
        if not (a.dynamic is True and a.strategy == "group" and a.group_size == block[1]):
            _unsupported(
                f"{where}.input_activations",
                f"strategy {a.strategy!r}, group_size {a.group_size!r}",
                f"dynamic per 1 x {block[1]} group with block weights",
            )
    elif w.strategy not in ("tensor", "channel"):
        _unsupported(f"{where}.weights.strategy", w.strategy, "'tensor', 'channel' or 'block' for FP8 weights")
    elif a.dynamic is True:
        if a.strategy != "token":
            _unsupported(f"{where}.input_activations.strategy", a.strategy, "'token' when dynamic")
    elif a.dynamic is False:
        if a.strategy != "tensor":
            _unsupported(f"{where}.input_activations.strategy", a.strategy, "'tensor' when static")
    else:
        _unsupported(f"{where}.input_activations.dynamic", a.dynamic, "true or false")
    return Fp8Scheme(strategy=w.strategy, block_size=block, static_input=a.dynamic is False)


@attrs.frozen(kw_only=True)
class _QuantArgs:
    """The fields of compressed-tensors' ``QuantizationArgs`` that decide the arithmetic."""

    num_bits: Any
    type: Any
    strategy: Any
    symmetric: Any
    dynamic: Any
    group_size: Any
    block_structure: Any
    actorder: Any

    @classmethod
    def read(cls, where: str, raw: Any) -> _QuantArgs:
        if not isinstance(raw, Mapping):
            _unsupported(where, raw, "an object of quantization arguments")
        args = cls(
            num_bits=raw.get("num_bits", 8),
            type=raw.get("type", "int"),
            strategy=raw.get("strategy"),
            symmetric=raw.get("symmetric", True),
            dynamic=raw.get("dynamic", False),
            group_size=raw.get("group_size"),
            block_structure=raw.get("block_structure"),
            actorder=raw.get("actorder"),
        )
        if not isinstance(args.symmetric, bool):
            _unsupported(f"{where}.symmetric", args.symmetric, "true or false")
        if args.dynamic not in (True, False, "local"):
            _unsupported(f"{where}.dynamic", args.dynamic, "true or false")
        return args


def _expect(args: _QuantArgs, field: str, value: Any, where: str, *, role: str = "weights") -> None:
    got = getattr(args, field)
    if got != value or isinstance(got, bool):
        _unsupported(f"{where}.{role}.{field}", got, repr(value))


def _parse_gptq(raw: Mapping[str, Any]) -> QuantConfig:
    bits = raw.get("bits")
    if bits != 4 or isinstance(bits, bool):
        _unsupported("bits", bits, "4")
    symmetric = _bool("sym", raw.get("sym", True))
    desc_act = _bool("desc_act", raw.get("desc_act", False))
    group_size = _group_size("group_size", raw.get("group_size", -1))
    checkpoint_format = raw.get("checkpoint_format", raw.get("format", "gptq"))
    if checkpoint_format not in ("gptq", "gptq_v2"):
        _unsupported("checkpoint_format", checkpoint_format, "'gptq' or 'gptq_v2'")
    if raw.get("lm_head", False) is not False:
        _unsupported("lm_head", raw["lm_head"], "false (the LM head stays unquantized)")
    if raw.get("dynamic"):
        _unsupported("dynamic", raw["dynamic"], "empty (per-module overrides are not read)")
    scheme = Int4Scheme(
        layout="gptq",
        group_size=group_size,
        symmetric=symmetric,
        desc_act=desc_act,
        zero_offset=1 if checkpoint_format == "gptq" else 0,
    )
    return QuantConfig(method="gptq", rules=(SchemeRule(scheme=scheme),))


def _parse_awq(raw: Mapping[str, Any]) -> QuantConfig:
    bits = raw.get("bits", raw.get("w_bit"))
    if bits != 4 or isinstance(bits, bool):
        _unsupported("bits", bits, "4")
    version = raw.get("version", "gemm")
    if not isinstance(version, str) or version.lower() != "gemm":
        _unsupported("version", version, "'gemm' (AutoAWQ's GEMM layout)")
    if _bool("zero_point", raw.get("zero_point", True)) is not True:
        _unsupported("zero_point", raw["zero_point"], "true (AWQ weights are asymmetric)")
    group_size = _group_size("group_size", raw.get("group_size", raw.get("q_group_size", 128)))
    scheme = Int4Scheme(layout="awq", group_size=group_size, symmetric=False)
    return QuantConfig(
        method="awq",
        rules=(SchemeRule(scheme=scheme),),
        not_converted=_names("modules_to_not_convert", raw.get("modules_to_not_convert")),
    )


def _parse_mxfp4(raw: Mapping[str, Any]) -> QuantConfig:
    """GPT-OSS quantizes only its experts (`atom_trio.layers.quantization.dequantize_mxfp4`); linear layers stay."""
    return QuantConfig(method="mxfp4", not_converted=_names("modules_to_not_convert", raw.get("modules_to_not_convert")))


# -- field checks --------------------------------------------------------------------------------------------


def _unsupported(field: str, value: Any, wanted: str) -> None:
    raise ModelLoadError(f"quantization_config.{field} {value!r} is not supported; expected {wanted}")


def _bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _unsupported(field, value, "true or false")
    return value


def _positive(field: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        _unsupported(field, value, "a positive integer")
    return value


def _group_size(field: str, value: Any) -> int | None:
    """A positive group size, or None for GPTQ's and AWQ's -1 (one group over the whole input)."""
    if value == -1 and not isinstance(value, bool):
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % 2:
        _unsupported(field, value, "a positive even integer or -1")
    return value


def _block_shape(field: str, value: Any) -> tuple[int, int]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value)
    ):
        _unsupported(field, value, "[rows, columns], two positive integers")
    return (value[0], value[1])


def _names(field: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        _unsupported(field, value, "a list of module names or patterns")
    for pattern in value:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise ModelLoadError(f"quantization_config.{field} pattern {pattern!r} is not a regex: {exc}") from exc
    return tuple(value)


def _target_matches(target: str, name: str) -> bool:
    """compressed-tensors' matching: ``re:`` a regex from the start of the name, else the exact name or class."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target in ("Linear", name)


def not_converted(pattern: str, name: str) -> bool:
    """transformers' ``modules_to_not_convert``: a module, a module above it, a name part, or a ``*`` pattern."""
    if "*" in pattern:
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")
    return f".{pattern}." in f".{name}."
