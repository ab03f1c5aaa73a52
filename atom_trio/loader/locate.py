"""Where a model's files are: the default model, a local path, or a hub snapshot (no torch here)."""

from __future__ import annotations

import logging
from pathlib import Path

from atom_trio.errors import ModelLoadError
from atom_trio.loader.default_model import default_model_path

logger = logging.getLogger("atom_trio.loader")

# What a hub download fetches: configs, tokenizer files, chat templates, the
# code a checkpoint ships (its tokenizer's runs with --trust-remote-code; none
# other ever does), and the weights unless they are not wanted (dummy weights).
_HUB_METADATA_PATTERNS = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py"]
_HUB_WEIGHT_PATTERNS = ["*.safetensors"]


def locate(model: str | None, *, revision: str | None = None, with_weights: bool = True) -> Path:
    """A local path for ``model``: the default model, a local path, or a hub snapshot."""
    if model is None:
        return default_model_path()
    local = Path(model).expanduser()
    if local.exists():
        return local
    if local.suffix == ".gguf" or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"model path {model!r} does not exist")
    return _download_from_hub(model, revision=revision, with_weights=with_weights)


def _download_from_hub(repo_id: str, *, revision: str | None, with_weights: bool) -> Path:
    import huggingface_hub

    patterns = _HUB_METADATA_PATTERNS + (_HUB_WEIGHT_PATTERNS if with_weights else [])
    logger.info("fetching %s from the Hugging Face hub", repo_id)
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:
        raise ModelLoadError(
            f"model {repo_id!r} is neither a local path nor reachable on the Hugging Face hub "
            f"({type(exc).__name__}: {exc}). Check the id and the network (HF_HUB_OFFLINE, HF_TOKEN), "
            "or pass a local model directory or .gguf file."
        ) from exc
