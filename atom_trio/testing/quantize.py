"""Quantized checkpoints for tests, written as each format's spec says, and the weights they stand for.

`write_quantized` turns a model directory (safetensors, any dtype) into a
quantized copy: its linear layers' weights replaced by the format's tensors
and config.json given the format's ``quantization_config``. It returns the
dequantized weights, the exact real numbers the checkpoint holds: loaded
into transformers' model in float32 they are the reference the engine is
compared with. compressed-tensors checkpoints are written by the
``compressed-tensors`` library itself (`write_compressed_tensors`).

Formats (options):
- ``fp8``: transformers' fine-grained FP8. ``block_size`` (rows, cols): a
  float32 ``weight_scale_inv`` per block (edge blocks partial), ``amax / 448``;
  None: one ``weight_scale`` per tensor. ``input_amax`` (layer name -> the
  largest input seen) makes the activations static, with ``input_scale = amax / 448``.
- ``gptq``: ``group_size`` (None: -1), ``sym``, ``desc_act`` (a seeded
  permutation of the input columns decides the groups, as act-order does);
  v1 zero points (stored zero - 1).
- ``awq``: ``group_size``; asymmetric, GEMM packing order.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from atom_trio.layers.quantization import AWQ_ORDER, pack_int32
from atom_trio.ops.quant_ref import FP8_DTYPE, FP8_MAX, MIN_AMAX, expand_block_scale

E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def is_quantized_linear(name: str, tensor: torch.Tensor) -> bool:
    """The checkpoint tensors the formats quantize: linear layers' weights, not embeddings or the LM head."""
    return name.endswith("_proj.weight") and tensor.ndim == 2


def write_quantized(src: Path, dst: Path, fmt: str, **options: Any) -> dict[str, torch.Tensor]:
    """``dst``: ``src`` quantized as ``fmt``; returns every weight as the checkpoint means it (float32)."""
    state = safetensors.torch.load_file(src / "model.safetensors")
    quantize = {"fp8": _fp8, "gptq": _gptq, "awq": _awq}[fmt]
    tensors: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not is_quantized_linear(name, tensor):
            tensors[name] = tensor
            dequantized[name] = tensor.float()
            continue
        prefix = name.removesuffix(".weight")
        # Layers that read one input (q/k/v, gate/up) see one act-order, as GPTQ's shared Hessian gives them.
        seed = zlib.crc32(f"{prefix.rpartition('.')[0]}/{tensor.shape[1]}".encode())
        parts, dequantized[name] = quantize(prefix, tensor.float(), seed=seed, **options)
        tensors.update(parts)
    _copy_model_dir(src, dst, _quantization_config(fmt, **options))
    safetensors.torch.save_file(tensors, dst / "model.safetensors")
    return dequantized


def _copy_model_dir(src: Path, dst: Path, quantization_config: dict[str, Any]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        if file.is_file() and file.suffix != ".safetensors":
            shutil.copy(file, dst / file.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config, indent=1))


def _quantization_config(fmt: str, **options: Any) -> dict[str, Any]:
    if fmt == "fp8":
        block = options.get("block_size")
        config = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "static" if options.get("input_amax") else "dynamic",
            "modules_to_not_convert": ["lm_head"],
        }
        return config | ({"weight_block_size": list(block)} if block else {})
    group_size = options.get("group_size") or -1
    if fmt == "gptq":
        return {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group_size,
            "sym": options.get("sym", True),
            "desc_act": options.get("desc_act", False),
            "checkpoint_format": "gptq",
            "lm_head": False,
        }
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}


# -- FP8 ---------------------------------------------------------------------------------------------------------


def _fp8(prefix: str, w: torch.Tensor, *, seed: int, block_size=None, input_amax=None):
    if block_size is None:
        scale = (w.abs().amax().clamp(min=MIN_AMAX) / FP8_MAX).reshape(1)
        per_element, scale_name = scale, "weight_scale"
    else:
        rows, cols = block_size
        out, inp = w.shape
        padded = torch.nn.functional.pad(w.abs(), (0, -inp % cols, 0, -out % rows))
        blocks = padded.reshape(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)
        scale = blocks.amax(dim=(1, 3)).clamp(min=MIN_AMAX) / FP8_MAX
        per_element, scale_name = expand_block_scale(scale, tuple(w.shape), block_size), "weight_scale_inv"
    q = (w / per_element).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    parts = {f"{prefix}.weight": q, f"{prefix}.{scale_name}": scale.float()}
    if input_amax:
        parts[f"{prefix}.input_scale"] = torch.tensor([max(input_amax[prefix], MIN_AMAX) / FP8_MAX])
    return parts, q.float() * per_element


def calibrate_input_amax(model: torch.nn.Module, token_ids: list[int]) -> dict[str, float]:
    """The largest absolute input each linear layer of transformers' ``model`` sees on ``token_ids``."""
    return {name: amax.max().item() for name, amax in _input_channel_amax(model, token_ids).items()}


def _input_channel_amax(model: torch.nn.Module, token_ids: list[int]) -> dict[str, torch.Tensor]:
    """Each linear layer's largest absolute input per input channel over ``token_ids``."""
    amax: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        seen = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0)
        amax[name] = torch.maximum(amax[name], seen) if name in amax else seen

    hooks = [
        module.register_forward_pre_hook(lambda _, args, name=name: record(name, args[0]))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith("_proj")
    ]
    with torch.no_grad():
        model(torch.tensor([token_ids]))
    for hook in hooks:
        hook.remove()
    return amax


def smooth_activations(model: torch.nn.Module, token_ids: list[int], strength: float) -> None:
    """SmoothQuant: move each RMSNorm's outlier channels into the weights of the layers it feeds, in place.

    What llm-compressor's ``SmoothQuantModifier`` does before an INT8 W8A8
    recipe (its examples use strength 0.8), with its default mappings of a
    Llama-like decoder layer: the input norm into q/k/v, the post-attention
    norm into gate/up. Per input channel ``s = amax(x) ** strength /
    amax(|W|) ** (1 - strength)`` (``amax(x)`` over ``token_ids``, ``amax(|W|)`` over
    the layers fed); the norm's weight is divided by ``s`` and those layers'
    columns multiplied by it. The model computes the same function; its
    per-token activations lose their few huge channels, which a per-token
    INT8 scale would otherwise spend its 255 levels on.
    """
    amax = _input_channel_amax(model, token_ids)
    with torch.no_grad():
        for name, layer in model.model.layers.named_children():
            prefix = f"model.layers.{name}"
            attention, mlp = layer.self_attn, layer.mlp
            for norm, fed, calibrated in (
                (layer.input_layernorm, (attention.q_proj, attention.k_proj, attention.v_proj), "self_attn.q_proj"),
                (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj), "mlp.gate_proj"),
            ):
                weight_amax = torch.stack([linear.weight.abs().amax(dim=0) for linear in fed]).amax(dim=0)
                activation_amax = amax[f"{prefix}.{calibrated}"]
                scale = activation_amax.pow(strength) / weight_amax.pow(1 - strength)
                scale = torch.where(weight_amax > 0, scale, activation_amax).clamp(min=1e-5)
                norm.weight.div_(scale)
                for linear in fed:
                    linear.weight.mul_(scale)


# -- 4-bit --------------------------------------------------------------------------------------------------------


def _int4_groups(w: torch.Tensor, group_size: int | None, sym: bool, g_idx: torch.Tensor):
    """Per-(row, group) scales (rounded to float16, as stored) and zero points, and the 4-bit values."""
    out, inp = w.shape
    size = group_size or inp
    grouped = w[:, torch.argsort(g_idx, stable=True)].reshape(out, inp // size, size)  # each group's columns
    if sym:
        scale = (2 * grouped.abs().amax(dim=2) / 15).clamp(min=MIN_AMAX).half()
        zero = torch.full(scale.shape, 8.0)
    else:
        low, high = grouped.amin(dim=2).clamp(max=0), grouped.amax(dim=2).clamp(min=0)
        scale = ((high - low) / 15).clamp(min=MIN_AMAX).half()
        zero = torch.round(-low / scale.float()).clamp(0, 15)
    per_column_scale, per_column_zero = scale.float()[:, g_idx], zero[:, g_idx]
    q = torch.round(w / per_column_scale + per_column_zero).clamp(0, 15)
    return q.to(torch.int32), scale, zero.to(torch.int32), (q - per_column_zero) * per_column_scale


def _group_index(inp: int, group_size: int | None, desc_act: bool, seed: int) -> torch.Tensor:
    """Each input column's group: consecutive runs, or by a seeded order of the columns (act-order)."""
    size = group_size or inp
    if not desc_act:
        return torch.arange(inp) // size
    order = torch.randperm(inp, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(inp, dtype=torch.long)
    g_idx[order] = torch.arange(inp) // size
    return g_idx


def _gptq(prefix: str, w: torch.Tensor, *, seed: int, group_size=None, sym=True, desc_act=False):
    g_idx = _group_index(w.shape[1], group_size, desc_act, seed)
    q, scale, zero, dequantized = _int4_groups(w, group_size, sym, g_idx)
    parts = {
        f"{prefix}.qweight": pack_int32(q.T, 0),  # [in // 8, out]
        f"{prefix}.qzeros": pack_int32(zero.T - 1, 1),  # [groups, out // 8], v1: zero - 1
        f"{prefix}.scales": scale.T.contiguous(),  # [groups, out]
        f"{prefix}.g_idx": g_idx.to(torch.int32),
    }
    return parts, dequantized


def _awq(prefix: str, w: torch.Tensor, *, seed: int, group_size=None):
    g_idx = _group_index(w.shape[1], group_size, False, seed)
    q, scale, zero, dequantized = _int4_groups(w, group_size, False, g_idx)
    parts = {
        f"{prefix}.qweight": pack_int32(q.T, 1, AWQ_ORDER),  # [in, out // 8]
        f"{prefix}.qzeros": pack_int32(zero.T, 1, AWQ_ORDER),  # [groups, out // 8]
        f"{prefix}.scales": scale.T.contiguous(),
    }
    return parts, dequantized


# -- compressed-tensors (its own library writes it) --------------------------------------------------------------


def write_compressed_tensors(
    src: Path,
    dst: Path,
    scheme: str,
    *,
    group_size: int | None = None,
    ignore: tuple[str, ...] = ("lm_head",),
    calibration_ids: tuple[int, ...] = tuple(range(100, 164)),
    smoothing_strength: float | None = None,
) -> dict[str, torch.Tensor]:
    """``dst``: ``src`` quantized with compressed-tensors' preset ``scheme`` (``FP8``, ``FP8_DYNAMIC``,
    ``FP8_BLOCK``, ``INT8``, ``W4A16``, ``W4A16_ASYM``), compressed and described by the library; returns the weights
    the library's own fake quantization gives (float32).

    The library's observers live in llm-compressor, so each weight's min/max is measured here and the library
    turns it into scales and zero points (`calculate_qparams`); a static activation scale is ``amax / 448`` of
    the layer's inputs over ``calibration_ids`` (`calibrate_input_amax`). ``smoothing_strength``: SmoothQuant
    first (`smooth_activations`, over ``calibration_ids``), as INT8 W8A8 recipes do; the returned weights
    (and the checkpoint) then hold the smoothed norms.
    """
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    if smoothing_strength is not None:
        smooth_activations(model, list(calibration_ids), smoothing_strength)
    input_amax = calibrate_input_amax(model, list(calibration_ids))
    chosen = preset_name_to_scheme(scheme, ["Linear"])
    if group_size is not None:
        chosen.weights.group_size = group_size
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": chosen}, ignore=list(ignore)))
    dequantized = {name: tensor.float().clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        for name, module in model.named_modules():
            quant = getattr(module, "quantization_scheme", None)
            if quant is None:
                continue
            args, w = quant.weights, module.weight
            if args.strategy == "tensor":
                low, high = w.amin().reshape(1), w.amax().reshape(1)
            elif args.strategy == "channel":
                low, high = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
            elif args.strategy == "block":  # zero padding changes no block's range: zero is always in it
                rows, cols = args.block_structure
                padded = torch.nn.functional.pad(w, (0, -w.shape[1] % cols, 0, -w.shape[0] % rows))
                blocks = padded.reshape(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)
                low, high = blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))
            else:
                grouped = w.reshape(w.shape[0], -1, args.group_size)
                low, high = grouped.amin(dim=2), grouped.amax(dim=2)
            scale, zero = calculate_qparams(low, high, args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
            if hasattr(module, "input_scale"):
                module.input_scale.data.fill_(input_amax[name] / FP8_MAX)
            dequantized[f"{name}.weight"] = fake_quantize(
                w, module.weight_scale, getattr(module, "weight_zero_point", None), args
            ).float()
        compressor = ModelCompressor.from_pretrained_model(model)
        compressor.compress_model(model)
    _copy_model_dir(src, dst, {})
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    safetensors.torch.save_file(state, dst / "model.safetensors")
    compressor.update_config(str(dst))
    return dequantized


# -- MXFP4 --------------------------------------------------------------------------------------------------------


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` ``[..., n]`` (n a multiple of 32) as MXFP4 ``blocks`` ``[..., n / 32, 16]`` and e8m0 ``scales``.

    The OCP rule: a group's shared exponent is ``floor(log2(amax)) - 2`` (e2m1's
    largest exponent), each value rounded to the nearest e2m1 value, clamped at 6.
    """
    groups = w.float().reshape(*w.shape[:-1], -1, 32)
    amax = groups.abs().amax(dim=-1).clamp(min=2.0**-126)
    exponent = torch.floor(torch.log2(amax)) - 2
    scaled = (groups / torch.exp2(exponent).unsqueeze(-1)).clamp(-6, 6)
    magnitude = (scaled.abs().unsqueeze(-1) - E2M1_GRID).abs().argmin(dim=-1)
    codes = (magnitude | ((scaled < 0).long() << 3)).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exponent + 127).to(torch.uint8)


# -- the tests' formats -------------------------------------------------------------------------------------------

CALIBRATION_IDS = list(range(200, 264))
"""Token ids whose activations set the static input scales of the tiny models."""


def reference_model(src: Path, dequantized: dict[str, torch.Tensor]):
    """Transformers' model of ``src`` holding the checkpoint's dequantized weights (``{}``: its own), in float32."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model.load_state_dict(dequantized, strict=False)
    return model


TINY_FORMATS: dict[str, tuple[str, Callable[[Path, Path], dict[str, torch.Tensor]]]] = {
    "fp8-block": ("qwen3", lambda src, dst: write_quantized(src, dst, "fp8", block_size=(32, 32))),
    # 48 x 48 blocks: q's 64 rows end mid-block (the block scale goes per row), 64 input columns end mid-block.
    "fp8-partial-blocks": ("llama", lambda src, dst: write_quantized(src, dst, "fp8", block_size=(48, 48))),
    "fp8-tensor-static": (
        "llama",
        lambda src, dst: write_quantized(
            src, dst, "fp8", input_amax=calibrate_input_amax(reference_model(src, {}), CALIBRATION_IDS)
        ),
    ),
    "gptq-sym": ("qwen3", lambda src, dst: write_quantized(src, dst, "gptq", group_size=32, sym=True)),
    "gptq-asym-desc-act": (
        "llama",
        lambda src, dst: write_quantized(src, dst, "gptq", group_size=16, sym=False, desc_act=True),
    ),
    "gptq-channel": ("llama", lambda src, dst: write_quantized(src, dst, "gptq", group_size=None, sym=False)),
    "awq": ("qwen3", lambda src, dst: write_quantized(src, dst, "awq", group_size=32)),
    "ct-fp8-dynamic": ("llama", lambda src, dst: write_compressed_tensors(src, dst, "FP8_DYNAMIC")),
    "ct-fp8-static": ("qwen3", lambda src, dst: write_compressed_tensors(src, dst, "FP8")),
    "ct-fp8-block": ("llama", lambda src, dst: write_compressed_tensors(src, dst, "FP8_BLOCK")),
    "ct-int8": ("qwen3", lambda src, dst: write_compressed_tensors(src, dst, "INT8")),
    "ct-w4a16": ("llama", lambda src, dst: write_compressed_tensors(src, dst, "W4A16", group_size=32)),
    "ct-w4a16-asym": ("qwen3", lambda src, dst: write_compressed_tensors(src, dst, "W4A16_ASYM", group_size=16)),
}
"""The formats the tests load, by name: (the tiny architecture quantized, the writer ``(src, dst) -> dequantized``)."""

WEIGHT_ONLY_FORMATS = frozenset(name for name in TINY_FORMATS if name.startswith(("gptq", "awq", "ct-w4a16")))
