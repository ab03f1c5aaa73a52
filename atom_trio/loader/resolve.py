"""Model resolution: from ``EngineConfig.model`` to files on disk, a config and a dtype."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import attrs
import torch
import transformers

from atom_trio.config import EngineConfig
from atom_trio.errors import ModelLoadError
from atom_trio.loader.locate import locate
from atom_trio.loader.gguf_file import load_gguf_config
from atom_trio.loader.hf_config import read_hf_config
from atom_trio.loader.quant_config import QuantConfig, detect_quantization

logger = logging.getLogger("atom_trio.loader")


# A GGUF holds quantized weights, not a compute dtype; bfloat16 is what the
# default model (itself shipped as GGUF) was published in.
_GGUF_DEFAULT_DTYPE = torch.bfloat16


@attrs.frozen(kw_only=True)
class ResolvedModel:
    """A model located on disk, with everything needed to build and fill it.

    ``path`` is a Hugging Face directory, or the ``.gguf`` file itself when
    ``load_format`` is "gguf". ``quant_config``: how its linear layers are quantized (None: they are not).
    """

    path: Path
    hf_config: transformers.PretrainedConfig
    generation_config: dict[str, Any]
    load_format: str
    dtype: torch.dtype
    quant_config: QuantConfig | None = None


def resolve_model(config: EngineConfig) -> ResolvedModel:
    """Locate ``config.model`` and read its config; raise ``ModelLoadError`` if it can't be used."""
    want_weights = config.load_format != "dummy"
    path = locate(config.model, revision=config.revision, with_weights=want_weights)

    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf file; pass a model directory or a .gguf file")
        if config.load_format not in ("auto", "gguf", "dummy"):
            raise ModelLoadError(f"{path} is a GGUF file; --load-format {config.load_format} cannot read it")
        hf_config = _read(load_gguf_config, path)
        generation_config = generation_config_from(hf_config)
        load_format = "dummy" if config.load_format == "dummy" else "gguf"
        default_dtype = _GGUF_DEFAULT_DTYPE
    else:
        if config.load_format == "gguf":
            raise ModelLoadError(f"--load-format gguf needs a .gguf file, and {path} is a directory")
        hf_config = _read(read_hf_config, path)
        generation_file = path / "generation_config.json"
        if generation_file.is_file():
            generation_config = json.loads(generation_file.read_text())
        else:
            generation_config = generation_config_from(hf_config)
        load_format = "dummy" if config.load_format == "dummy" else "safetensors"
        if load_format == "safetensors" and not any(path.glob("*.safetensors")):
            raise ModelLoadError(
                f"{path} has no *.safetensors weights (other weight formats are not supported); "
                "convert the model to safetensors, or pass --load-format dummy for random weights"
            )
        default_dtype = _config_dtype(hf_config)

    quant_config = detect_quantization(hf_config, config.quantization)
    dtype = getattr(torch, config.dtype) if config.dtype != "auto" else default_dtype
    logger.info("model %s: %s weights, %s", path, load_format, dtype)
    return ResolvedModel(
        path=path,
        hf_config=hf_config,
        generation_config=generation_config,
        load_format=load_format,
        dtype=dtype,
        quant_config=quant_config,
    )


def _read(reader, path: Path):
    """Run a transformers reader, turning its errors into ``ModelLoadError``."""
    try:
        return reader(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot read the model config of {path}: {exc}") from exc


def generation_config_from(hf_config: transformers.PretrainedConfig) -> dict[str, Any]:
    """The generation defaults a model without generation_config.json has: its special token ids."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {key: getattr(hf_config, key) for key in keys if getattr(hf_config, key, None) is not None}


def _config_dtype(hf_config: transformers.PretrainedConfig) -> torch.dtype:
    """The dtype config.json names (``dtype``, or ``torch_dtype`` before transformers 5); float32 if none."""
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
