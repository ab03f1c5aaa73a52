"""Weights: read from safetensors or GGUF in Hugging Face names, or made up (dummy)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import safetensors
import torch
import transformers
import xxhash
from tqdm.auto import tqdm

from atom_trio.loader.gguf_file import PERMUTED_ARCHITECTURES, hf_tensor_name
from atom_trio.loader.resolve import ResolvedModel

# vLLM's dummy loader draws from the same range: small enough that residual
# streams stay finite in bf16 through dozens of layers, big enough that the
# kernels see non-trivial values.
DUMMY_WEIGHT_RANGE = 1e-3

QUANTIZATION_SCALES = (".weight_scale_inv", ".weight_scale", ".input_scale")
"""The checkpoint tensors of FP8 and INT8 formats that hold float32 scales."""


def iter_weights(
    resolved: ResolvedModel,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    keep_in_float32: tuple[str, ...] = (),
    progress: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the model, one at a time, in Hugging Face names and ``resolved.dtype``.

    ``seed`` and ``device`` matter only for dummy weights (see `iter_dummy_weights`). A safetensors
    tensor whose name ends with one of ``keep_in_float32`` comes in float32 instead, so that a value the
    checkpoint stores in float32 reaches a float32 parameter unrounded (GLM-4-MoE's router).
    ``progress`` shows a progress bar of the files read on a terminal's stderr (one rank's is enough).
    A quantized checkpoint's integer and FP8 tensors come as stored, and its float32 scales stay float32
    (`stored_dtype`).
    """
    if resolved.load_format == "dummy":
        yield from iter_dummy_weights(resolved.hf_config, dtype=resolved.dtype, seed=seed, device=device)
    elif resolved.load_format == "gguf":
        yield from iter_gguf_tensors(resolved.path, resolved.hf_config, resolved.dtype, progress=progress)
    elif resolved.load_format == "safetensors":
        files = safetensors_files(resolved.path)
        total = sum(file.stat().st_size for file in files)
        with terminal_progress(total=total, desc="loading weights", unit="B", unit_scale=True, show=progress) as bar:
            for file in files:
                with safetensors.safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        stored = f.get_tensor(name)
                        bar.update(stored.nbytes)
                        keep = keep_in_float32 and name.endswith(keep_in_float32)
                        yield name, stored.to(torch.float32 if keep else stored_dtype(name, stored, resolved.dtype))
    else:
        raise ValueError(f"unknown load_format {resolved.load_format!r}")


def stored_dtype(name: str, stored: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a checkpoint tensor reaches the model in: ``dtype``, unless it holds quantized data.

    Integers (packed 4-bit values, INT8 weights, zero points), FP8 weights and
    float32 scales keep their stored dtype: converting them would destroy the
    packing or round the scales. Unquantized checkpoints hold none of them
    except float32 matrices, which ``dtype`` rounds as before.
    """
    if not stored.is_floating_point() or stored.element_size() == 1:
        return stored.dtype
    if stored.dtype == torch.float32 and name.endswith(QUANTIZATION_SCALES):
        return torch.float32
    return dtype


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of a model directory: the index's shards, else every ``*.safetensors``."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    return sorted(model_dir.glob("*.safetensors"))


def iter_dummy_weights(
    hf_config, *, dtype: torch.dtype, seed: int, device: torch.device | str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """A made-up checkpoint (``--load-format dummy``): every tensor of ``hf_config``'s architecture, seeded.

    The names and full shapes come from transformers' own model of the
    architecture, built on the meta device (no memory). Each tensor is drawn
    from a generator seeded by ``seed`` and its name, so the checkpoint does
    not depend on the order of reading, and every tensor-parallel rank, which
    takes its shard of the full tensor like from a real checkpoint, ends up
    with a slice of the same model: TP=2 and TP=1 compute the same function.
    Matrices and biases get uniform(-1e-3, 1e-3); norm weights 1.0 and norm
    biases 0.0 (a random norm weight would make activations vanish or blow up
    layer after layer). Values are drawn on ``device`` in ``dtype``, so a
    model at real size fills in seconds.
    """
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(hf_config)
    for name, meta in reference.state_dict().items():
        if "norm" in name and meta.ndim == 1:
            yield name, torch.full(meta.shape, 1.0 if name.endswith("weight") else 0.0, dtype=dtype, device=device)
            continue
        generator = torch.Generator(device=device).manual_seed(xxhash.xxh64_intdigest(f"{seed}/{name}".encode()) >> 1)
        tensor = torch.empty(meta.shape, dtype=dtype, device=device)
        yield name, tensor.uniform_(-DUMMY_WEIGHT_RANGE, DUMMY_WEIGHT_RANGE, generator=generator)


def draw_dummy_quantized(model: torch.nn.Module, *, seed: int) -> list[str]:
    """Give a quantized model's quantized parameters random contents that decode to ±`DUMMY_WEIGHT_RANGE` at most.

    A dense dummy checkpoint has no tensors for them (transformers' model of the architecture is dense), so
    they are drawn where they are, in their loading layout, and the dummy model reads what a quantized
    checkpoint's would: codes of the stored width, scales beside them. They are the parameters of each module
    with a ``quant_method`` but its biases and its dense weight if it has one (an online FP8 pass quantizes that
    after loading); integer metadata (``g_idx``, ``weight_shape``) keeps its zeros, which no kernel reads
    without act-order:

    - codes: FP8 uniform in [-1, 1]; INT8 uniform in [-127, 127]; packed 4-bit codes (INT4, MXFP4's e2m1)
      random bytes, every one a valid pair of codes;
    - scales: the range over the largest code (FP8 1, INT8 127, INT4 8 about its zero point of 8, e2m1 6; an
      e8m0 scale is the power of two at or below it); static activation scales 1.0.

    Returns their names (the metadata's too). Each is drawn from ``seed`` and its name, like
    `iter_dummy_weights`' tensors, but on a rank's own shard: ranks of a tensor-parallel group hold equal
    shards, not slices of one model.
    """
    drawn = []
    for module_name, module in model.named_modules():
        if getattr(module, "quant_method", None) is None:
            continue
        params = {
            name: param
            for name, param in module.named_parameters(recurse=False)
            if "bias" not in name
            and not (param.is_floating_point() and param.element_size() > 1 and not _is_scale(name))
        }
        code_dtypes = {param.dtype for name, param in params.items() if not _is_scale(name)}
        largest_code = 1.0 if torch.float8_e4m3fn in code_dtypes else 127.0 if torch.int8 in code_dtypes else 8.0
        for name, param in params.items():
            full_name = f"{module_name}.{name}"
            generator = torch.Generator(device=param.device).manual_seed(
                xxhash.xxh64_intdigest(f"{seed}/{full_name}".encode()) >> 1
            )
            data = param.data  # zeros, as the quantization method registered it
            if param.dtype in (torch.int32, torch.int64):
                pass  # g_idx (no act-order) and weight_shape: not read by the kernels
            elif name.endswith("input_scale"):
                data.fill_(1.0)
            elif param.is_floating_point() and param.element_size() == 1:
                data.copy_(torch.empty(data.shape, device=data.device).uniform_(-1.0, 1.0, generator=generator))
            elif param.dtype == torch.int8:
                data.copy_(torch.randint(-127, 128, data.shape, device=data.device, generator=generator))
            elif "zero" in name:
                data.fill_(8)
            elif param.dtype == torch.uint8 and _is_scale(name):  # e8m0: 2 ** (s - 127)
                data.fill_(127 + math.floor(math.log2(DUMMY_WEIGHT_RANGE / 6)))
            elif param.dtype == torch.uint8:
                data.copy_(torch.randint(0, 256, data.shape, device=data.device, generator=generator))
            else:
                data.fill_(DUMMY_WEIGHT_RANGE / largest_code)
            drawn.append(full_name)
    return drawn


def _is_scale(name: str) -> bool:
    return "scale" in name


def terminal_progress(iterable=None, *, show: bool, **bar_options) -> tqdm:
    """A tqdm bar on stderr when ``show`` and stderr is a terminal (a log file gets none)."""
    return tqdm(iterable, disable=None if show else True, leave=False, **bar_options)


def unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Invert llama.cpp's q/k row permutation.

    llama.cpp stores each head's rows as ``reshape(heads, 2, d/2).swapaxes(1, 2)``
    of the HF order (interleaving the rotary halves); reading them back as
    ``(heads, d/2, 2)`` and swapping again restores the HF order.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def iter_gguf_tensors(
    path: Path, hf_config: transformers.PretrainedConfig, dtype: torch.dtype, *, progress: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantized tensors of a GGUF file, in Hugging Face names and ``dtype`` (``progress``: a bar on a terminal)."""
    reader = gguf.GGUFReader(path)
    permuted = reader.fields["general.architecture"].contents() in PERMUTED_ARCHITECTURES
    heads = {"attn_q": hf_config.num_attention_heads, "attn_k": hf_config.num_key_value_heads}
    bar = terminal_progress(reader.tensors, desc=f"dequantizing {path.name}", unit="tensor", show=progress)
    for tensor in bar:
        name = hf_tensor_name(tensor.name)
        # F32/F16 tensors come back as read-only views of the memory map.
        array = np.require(gguf.quants.dequantize(tensor.data, tensor.tensor_type), requirements=["C", "W"])
        weight = torch.from_numpy(array)
        part = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        if permuted and part in heads:
            weight = unpermute_rows(weight, heads[part])
        yield name, weight.to(dtype).contiguous()
