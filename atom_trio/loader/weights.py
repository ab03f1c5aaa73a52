"""Weights: read from safetensors or GGUF in Hugging Face names, or made up (dummy)."""

from __future__ import annotations

import json
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
