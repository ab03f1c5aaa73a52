"""Weights: read from safetensors or GGUF in Hugging Face names, or made up (dummy)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import safetensors
import torch

from atom_trio.loader.gguf_file import iter_gguf_tensors
from atom_trio.loader.resolve import ResolvedModel

# vLLM's dummy loader draws from the same range: small enough that residual
# streams stay finite in bf16 through dozens of layers, big enough that the
# kernels see non-trivial values.
DUMMY_WEIGHT_RANGE = 1e-3


def iter_weights(resolved: ResolvedModel) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the model, one at a time, in Hugging Face names and ``resolved.dtype``."""
    if resolved.load_format == "gguf":
        yield from iter_gguf_tensors(resolved.path, resolved.hf_config, resolved.dtype)
    elif resolved.load_format == "safetensors":
        for file in safetensors_files(resolved.path):
            with safetensors.safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name).to(resolved.dtype)
    else:
        raise ValueError(f"load_format {resolved.load_format!r} has no weights to read; use init_dummy_weights")


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of a model directory: the index's shards, else every ``*.safetensors``."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    return sorted(model_dir.glob("*.safetensors"))


@torch.no_grad()
def init_dummy_weights(module: torch.nn.Module, seed: int) -> None:
    """Fill ``module``'s parameters with seeded random values (``--load-format dummy``).

    Matrices and biases get uniform(-1e-3, 1e-3); norm weights get 1.0 and
    norm biases 0.0 (a random norm weight would make activations vanish or
    blow up layer after layer). Values are drawn where the parameter lives,
    in its dtype, so a model at real size fills in seconds; the same seed,
    device and dtype give the same weights.
    """
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in module.named_parameters():
        if param.ndim == 1 and "norm" in name:
            param.fill_(1.0 if name.endswith("weight") else 0.0)
            continue
        if param.device not in generators:
            generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        param.uniform_(-DUMMY_WEIGHT_RANGE, DUMMY_WEIGHT_RANGE, generator=generators[param.device])
